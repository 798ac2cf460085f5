"""Scoring requests shared by dietprune's evaluator (runner.py) and its lm-eval backend.

A leaf of the evaluate package: token ids in, `loglik.Request`s out, no task or harness import.
"""

from __future__ import annotations

from ..errors import DietpruneError
from .loglik import Request

DEFAULT_WINDOW = 2048


def _prefix_token(tokenizer) -> int:
    tok = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    if tok is None:
        raise DietpruneError("the tokenizer has neither a BOS nor an EOS token to start a text with")
    return tok


def _pad_id(tokenizer) -> int:
    for tok in (tokenizer.pad_token_id, tokenizer.eos_token_id, 0):
        if tok is not None:
            return tok
    return 0


def model_window(model, window: int | None = None) -> int:
    """Tokens per forward pass: ``window`` if given, else min(2048, the model's context)."""
    if window:
        return int(window)
    n = getattr(model.config, "max_position_embeddings", None) or DEFAULT_WINDOW
    return min(DEFAULT_WINDOW, int(n))


def example_request(pairs: list[tuple[list[int], list[int]]]) -> Request | None:
    """All choices of one example as one request sharing their longest common prefix.

    The prefix is at most the shortest context, so every scored token stays in its own
    continuation: choices with one context share exactly that context (one pass for all),
    WinoGrande's option-filled contexts share the words before the blank. None when the
    choices do not even share a first token.
    """
    seqs = [c + k for c, k in pairs]
    n = min(len(c) for c, _ in pairs)
    common = 0
    while common < n and all(s[common] == seqs[0][common] for s in seqs):
        common += 1
    if common == 0:
        return None
    return Request(tuple(seqs[0][:common]), tuple(tuple(s[common:]) for s in seqs),
                   tuple(len(k) for _, k in pairs))


def rolling_requests(tokens: list[int], prefix: int, window: int) -> list[Request]:
    """Disjoint scoring windows over a document: every token scored once, each pass ``window`` long."""
    reqs = []
    start = 0
    while start < len(tokens):
        end = min(start + window, len(tokens))
        if start == 0:
            ctx = [prefix]
        else:  # as much preceding text as fits in one pass of `window` inputs
            ctx = tokens[max(0, end - window - 1) : start]
        reqs.append(Request(tuple(ctx), (tuple(tokens[start:end]),)))
        start = end
    return reqs
