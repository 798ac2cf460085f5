"""Metrics with lm-evaluation-harness definitions (v0.4.x).

- ``acc``: the choice with the highest summed log-likelihood is right (first one on ties).
- ``acc_norm``: the same after dividing each log-likelihood by the length in characters of
  the choice text (the answer string itself, without the target delimiter " ").
- ``*_stderr``: sample standard deviation (n - 1) over sqrt(n), the harness's ``mean_stderr``.
- Perplexities: ``word_perplexity = exp(-sum loglik / sum words)``, likewise per UTF-8 byte;
  ``bits_per_byte = -sum loglik / sum bytes / ln 2``. Words and bytes are counted on the
  document *before* detokenisation, log-likelihoods on the detokenised text, as the harness's
  ``wikitext`` task does.
"""

from __future__ import annotations

import math
import re


def argmax(values) -> int:
    best = 0
    for i, v in enumerate(values):
        if v > values[best]:
            best = i
    return best


def mean(xs) -> float:
    return sum(xs) / len(xs) if xs else float("nan")


def mean_stderr(xs) -> float:
    n = len(xs)
    if n < 2:
        return float("nan")
    mu = mean(xs)
    var = sum((x - mu) ** 2 for x in xs) / (n - 1)
    return math.sqrt(var / n)


def choice_predictions(logliks: list[float], choice_chars: list[int]) -> tuple[int, int]:
    """(prediction by raw log-likelihood, prediction by log-likelihood per character)."""
    norm = [ll / max(c, 1) if c else ll for ll, c in zip(logliks, choice_chars)]
    return argmax(logliks), argmax(norm)


def summarize_choices(records: list[dict], metrics: tuple[str, ...]) -> dict:
    """Per-task metrics from per-example records holding 'gold', 'pred', 'pred_norm'."""
    out: dict = {}
    hits = [float(r["pred"] == r["gold"]) for r in records]
    out["acc"], out["acc_stderr"] = mean(hits), mean_stderr(hits)
    if "acc_norm" in metrics:
        hits_n = [float(r["pred_norm"] == r["gold"]) for r in records]
        out["acc_norm"], out["acc_norm_stderr"] = mean(hits_n), mean_stderr(hits_n)
    out["n"] = len(records)
    return out


def count_words(text: str) -> int:
    return len(re.split(r"\s+", text))


def count_bytes(text: str) -> int:
    return len(text.encode("utf-8"))


def perplexities(logliks: list[float], words: list[int], nbytes: list[int]) -> dict:
    total = sum(logliks)
    return {
        "word_perplexity": math.exp(-total / sum(words)),
        "byte_perplexity": math.exp(-total / sum(nbytes)),
        "bits_per_byte": -total / sum(nbytes) / math.log(2),
    }


# WikiText detokenisation, the same rules as the harness's wikitext task, in its order:
# contractions, literal replacements, bracket/quote tightening (regex), then the heading and spacing fixes.
_BEFORE = [(" @-@ ", "-"), (" @,@ ", ","), (" @.@ ", "."), (" : ", ": "), (" ; ", "; "),
           (" . ", ". "), (" ! ", "! "), (" ? ", "? "), (" , ", ", ")]
_TIGHTEN = [(r"\(\s*([^\)]*?)\s*\)", r"(\1)"), (r"\[\s*([^\]]*?)\s*\]", r"[\1]"), (r"{\s*([^}]*?)\s*}", r"{\1}"),
            (r"\"\s*([^\"]*?)\s*\"", r'"\1"'), (r"'\s*([^']*?)\s*'", r"'\1'")]
_AFTER = [("= = = =", "===="), ("= = =", "==="), ("= =", "=="), (" \u00b0 ", "\u00b0"), (" \n", "\n"),
          ("\n ", "\n"), (" N ", " 1 "), (" 's", "'s")]


def wikitext_detokenize(text: str) -> str:
    text = text.replace("s '", "s'")
    # a pattern with literal slashes that hardly ever matches; kept for parity with the harness
    text = re.sub(r"/' [0-9]/", r"/'[0-9]/", text)
    for old, new in _BEFORE:
        text = text.replace(old, new)
    for pattern, repl in _TIGHTEN:
        text = re.sub(pattern, repl, text)
    for old, new in _AFTER:
        text = text.replace(old, new)
    return text


_TITLE = re.compile(r"^ = [^=].* = \n$")


def wikitext_documents(rows: list[str]) -> list[str]:
    """Articles rebuilt from hub rows of wikitext-2-raw: a new article starts at each top-level
    heading row (`` = Title = ``); blank rows are line breaks; rows are concatenated.

    This mirrors the harness's ``EleutherAI/wikitext_document_level`` pages (62 articles in the
    test split); rows before the first heading (one blank row) are dropped.
    """
    docs: list[list[str]] = []
    for row in rows:
        if _TITLE.match(row):
            docs.append([])
        if docs:
            docs[-1].append(row if row else "\n")
    return ["".join(d) for d in docs]
