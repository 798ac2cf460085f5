"""Zero-shot evaluation: tasks -> requests -> scores -> metrics, with lm-evaluation-harness semantics.

Multiple-choice tasks (and WinoGrande's partial scoring) follow the harness's
``multiple_choice`` output type: each choice is the continuation of the prompt after the
target delimiter " ", tokenised as the harness does (context encoded alone; continuation =
what follows it in the encoding of the whole string; trailing spaces of the context moved to
the continuation). A BOS token is prepended where :func:`dietprune.encoding.wants_bos` says so
(Gemma), as the harness's tokenizer default does for those models.

WikiText-2 (``wikitext2``) reports three perplexities:

- ``word_perplexity``/``byte_perplexity``/``bits_per_byte`` as the harness's ``wikitext`` task:
  rolling log-likelihood of each detokenised article, ``window`` tokens per forward pass, the
  first conditioned on a prefix token (BOS, or EOS without one), later windows seeing as much
  preceding text as fits. Articles are rebuilt from the hub rows
  (:func:`dietprune.evaluate.metrics.wikitext_documents`); ``limit`` counts articles.
- ``token_perplexity`` as pruning papers report it (:func:`perplexity`); with ``limit`` it covers
  the first ``limit * window`` tokens only.
"""

from __future__ import annotations

import math
import os
import platform
import time
from dataclasses import dataclass, field

import torch

from .. import __version__
from ..data import data_dir as resolve_data_dir
from ..data import evaluation_rows, load_rows
from ..encoding import encode, encode_pair, wants_bos
from ..errors import DietpruneError
from ..tasks import Task, parse_tasks
from .loglik import Request, decoder_parts, head_logprobs, score_requests  # noqa: F401
from .requests import (DEFAULT_WINDOW, _pad_id, _prefix_token, example_request,  # noqa: F401 (re-exported)
                       model_window, rolling_requests)
from .metrics import (choice_predictions, count_bytes, count_words, perplexities, summarize_choices,
                      wikitext_detokenize, wikitext_documents)

@dataclass
class TaskResult:
    name: str
    metrics: dict
    records: list[dict] = field(default_factory=list)
    seconds: float = 0.0


def encode_choices(tokenizer, example, add_bos: bool) -> list[tuple[list[int], list[int]]]:
    """(context ids, continuation ids) per choice, split as the harness splits them."""
    out = []
    for ctx, cont in zip(example.contexts, example.continuations):
        if ctx:
            c, k = encode_pair(tokenizer, ctx, cont, add_bos)
        else:  # the harness conditions an empty context on the prefix token
            c, k = [_prefix_token(tokenizer)], encode(tokenizer, cont, False)
        if not k:
            raise DietpruneError(f"choice {cont!r} encodes to no tokens")
        out.append((c, k))
    return out


def _choice_chars(task: Task, example, i: int) -> int:
    """Length in characters of choice i as the harness normalises acc_norm."""
    if task.kind == "partial":  # the harness's choices are the option-filled contexts
        return len(example.contexts[i])
    cont = example.continuations[i]
    return len(cont) - 1 if cont.startswith(" ") else len(cont)  # drop the target delimiter


def choice_requests(tokenizer, examples, add_bos: bool) -> tuple[list[Request], list[list[tuple[int, int]]]]:
    """The scoring requests of formatted examples, and per example the (request index,
    continuation index) of each choice: one request per example sharing the choices' common
    prefix, else one per distinct context."""
    reqs, where = [], []
    for ex in examples:
        pairs = encode_choices(tokenizer, ex, add_bos)
        req = example_request(pairs)
        if req is not None:
            where.append([(len(reqs), j) for j in range(len(req.continuations))])
            reqs.append(req)
            continue
        groups: dict[tuple[int, ...], int] = {}  # no common first token: one request per context
        slots = []
        for c, k in pairs:
            if tuple(c) not in groups:
                groups[tuple(c)] = len(reqs)
                reqs.append(Request(tuple(c), ()))
            r = groups[tuple(c)]
            slots.append((r, len(reqs[r].continuations)))
            reqs[r] = Request(reqs[r].context, reqs[r].continuations + (tuple(k),))
        where.append(slots)
    return reqs, where


def evaluate_choices(model, tokenizer, task: Task, rows: list[dict], batch_size: int = 16,
                     progress: bool = True) -> TaskResult:
    examples = [task.format(r) for r in rows]
    reqs, where = choice_requests(tokenizer, examples, wants_bos(model))
    scores = score_requests(model, reqs, batch_size=batch_size, pad_id=_pad_id(tokenizer), desc=task.name,
                            show=progress, max_length=model_window(model))
    records = []
    for ex, slots in zip(examples, where):
        got = [scores[r][j] for r, j in slots]
        lls = [s.loglik for s in got]
        chars = [_choice_chars(task, ex, i) for i in range(len(lls))]
        pred, pred_norm = choice_predictions(lls, chars)
        records.append({"gold": ex.gold, "pred": pred, "pred_norm": pred_norm, "loglik": lls,
                        "greedy": [s.greedy for s in got], "chars": chars})
    return TaskResult(task.name, summarize_choices(records, task.metrics), records)


def evaluate_wikitext(model, tokenizer, task: Task, limit=None, data_dir=None, batch_size: int = 16,
                      progress: bool = True, window: int | None = None) -> TaskResult:
    window = model_window(model, window)
    rows = [r["text"] for r in load_rows(task, "eval", data_dir)]
    docs = wikitext_documents(rows)
    if not docs:
        raise DietpruneError(f"task '{task.name}': no article headings found in the text rows")
    if limit:
        docs = docs[:limit]
    prefix = _prefix_token(tokenizer)
    reqs, owner = [], []
    for d, doc in enumerate(docs):
        toks = encode(tokenizer, wikitext_detokenize(doc), False)
        for r in rolling_requests(toks, prefix, window):
            reqs.append(r)
            owner.append(d)
    # windows are long: batch few of them
    scores = score_requests(model, reqs, batch_size=max(1, min(batch_size, 4096 // window)),
                            pad_id=_pad_id(tokenizer), desc=f"{task.name} (articles)", show=progress)
    lls = [0.0] * len(docs)
    for d, s in zip(owner, scores):
        lls[d] += s[0].loglik
    words = [count_words(d) for d in docs]
    nbytes = [count_bytes(d) for d in docs]
    metrics = perplexities(lls, words, nbytes)
    max_tokens = limit * window if limit else None
    tp, n_tok = _token_perplexity(model, tokenizer, rows, max_tokens, window, batch_size, progress)
    metrics.update({"token_perplexity": tp, "n": len(docs), "words": sum(words), "bytes": sum(nbytes),
                    "tokens": n_tok, "window": window})
    records = [{"loglik": ll, "words": w, "bytes": b} for ll, w, b in zip(lls, words, nbytes)]
    return TaskResult(task.name, metrics, records)


@torch.no_grad()
def _token_perplexity(model, tokenizer, rows: list[str], max_tokens, window: int, batch_size: int,
                      progress: bool) -> tuple[float, int]:
    from ..progress import progress as bar

    ids = encode(tokenizer, "\n\n".join(rows), wants_bos(model))
    if max_tokens:
        ids = ids[:max_tokens]
    if len(ids) < 2:
        raise DietpruneError("too little text for a perplexity")
    n_win = len(ids) // window
    chunks = [ids[i * window : (i + 1) * window] for i in range(n_win)] or [ids]
    body, _, _ = decoder_parts(model)
    dev = next(model.parameters()).device
    per_batch = max(1, min(batch_size, 4096 // window))
    groups = [chunks[i : i + per_batch] for i in range(0, len(chunks), per_batch)]
    nll, count = 0.0, 0
    for group in bar(groups, total=len(groups), desc="wikitext2 (tokens)") if progress else groups:
        x = torch.tensor(group, device=dev)
        h = body(input_ids=x).last_hidden_state[:, :-1]
        h = h.reshape(-1, h.shape[-1])
        lp, _ = head_logprobs(model, h, x[:, 1:].reshape(-1))
        nll -= float(lp.double().sum())
        count += lp.numel()
    return math.exp(nll / count), count


def perplexity(model, tokenizer, data_dir=None, max_tokens: int | None = None, window: int = 2048) -> float:
    """Token perplexity on the "\\n\\n"-joined WikiText-2 test text, non-overlapping windows.

    The trailing partial window is dropped (as in the pruning literature) unless the text is
    shorter than one window. ``max_tokens`` keeps only the first N tokens, for quick checks.
    """
    from ..tasks import get_task

    rows = [r["text"] for r in load_rows(get_task("wikitext2"), "eval", data_dir)]
    ppl, _ = _token_perplexity(model, tokenizer, rows, max_tokens, int(window), 1, False)
    return ppl


def _versions() -> dict:
    import transformers

    out = {"dietprune": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
           "python": platform.python_version()}
    try:
        from importlib.metadata import version

        out["datasets"] = version("datasets")
    except Exception:  # noqa: BLE001 - informational only
        pass
    return out


HARNESS_PREFIX = "harness:"


def split_tasks(tasks) -> tuple[list, list[str]]:
    """(dietprune task specs, lm-evaluation-harness task names) of a task list.

    A name dietprune knows (its registry, or ``name=path``) is dietprune's, read from the local
    data; ``harness:NAME`` or any other name goes to the harness (through
    :class:`dietprune.evaluate.lm_eval_backend.DietpruneLM`).
    """
    from ..tasks import Task, list_tasks

    if isinstance(tasks, str):
        tasks = [s.strip() for s in tasks.split(",") if s.strip()]
    ours, theirs, known = [], [], set(list_tasks())
    for t in tasks:
        if isinstance(t, Task) or "=" in t or t in known:
            ours.append(t)
        elif t.startswith(HARNESS_PREFIX) and t[len(HARNESS_PREFIX):]:
            theirs.append(t[len(HARNESS_PREFIX):])
        else:
            theirs.append(t)
    if not ours and not theirs:
        raise DietpruneError("no tasks given")
    return ours, theirs


def check_harness_tasks(names: list[str], include_path=None) -> None:
    """DietpruneError unless lm-eval is installed and knows every name."""
    if not names:
        return
    try:
        from .lm_eval_backend import task_manager
    except DietpruneError as exc:
        raise DietpruneError(f"unknown task(s) {', '.join(map(repr, names))} (harness tasks need lm-eval: {exc})") \
            from None
    task_manager(names, include_path)


def evaluate(model, tokenizer, tasks, limit: int | None = None, data_dir=None, batch_size: int = 16,
             progress: bool = True, log_samples: bool = False, window: int | None = None,
             include_path=None) -> dict:
    """Zero-shot metrics of an in-memory model; see the module docstring for definitions.

    Names dietprune does not know (or ``harness:NAME``) run as lm-evaluation-harness tasks
    through dietprune's scorer (:func:`split_tasks`); ``include_path``: a folder of extra harness
    task YAMLs. Returns ``{"tasks": {name: metrics}, "meta": {...}}`` (plus ``"samples"`` with
    per-example log-likelihoods and predictions when ``log_samples``).
    """
    from ..models import model_fingerprint

    ours, harness_names = split_tasks(tasks)
    check_harness_tasks(harness_names, include_path)
    task_list = parse_tasks(ours) if ours else []
    if limit is not None and limit < 1:
        raise DietpruneError(f"limit must be a positive number of examples, got {limit}")
    if batch_size < 1:
        raise DietpruneError(f"batch size must be at least 1, got {batch_size}")
    root = resolve_data_dir(data_dir)
    for t in task_list:
        if t.kind not in ("multiple_choice", "partial", "perplexity"):
            raise DietpruneError(f"task '{t.name}' is a calibration-only text task; it has no zero-shot metric")
        if root is not None and t.path is None and not (root / t.name / t.local_files["eval"]).is_file():
            raise DietpruneError(f"task '{t.name}' has no local evaluation data: expected "
                                 f"{root / t.name / t.local_files['eval']} (unset the data dir to use the hub)")
    was_training = model.training
    model.eval()
    results: dict = {"tasks": {}, "meta": {}}
    samples: dict = {}
    seconds: dict = {}
    harness_versions: dict = {}
    try:
        for t in task_list:
            t0 = time.perf_counter()
            if t.kind == "perplexity":
                res = evaluate_wikitext(model, tokenizer, t, limit, data_dir, batch_size, progress, window)
            else:
                rows = evaluation_rows(t, limit, data_dir)
                res = evaluate_choices(model, tokenizer, t, rows, batch_size, progress)
            seconds[t.name] = round(time.perf_counter() - t0, 2)
            results["tasks"][t.name] = res.metrics
            samples[t.name] = res.records
        if harness_names:
            from .lm_eval_backend import run_harness_tasks

            t0 = time.perf_counter()
            h_metrics, h_records, h_versions = run_harness_tasks(model, tokenizer, harness_names, limit, batch_size,
                                                                 include_path)
            for name, m in h_metrics.items():
                results["tasks"][name] = m
                samples[name] = h_records.get(name, [])
                harness_versions[name] = h_versions[name]
                seconds[name] = round((time.perf_counter() - t0) / max(1, len(h_metrics)), 2)
    finally:
        model.train(was_training)
    results["meta"] = {
        "model": getattr(model, "name_or_path", None) or type(model).__name__,
        "model_type": getattr(model.config, "model_type", None),
        "fingerprint": model_fingerprint(model),
        "parameters": sum(p.numel() for p in model.parameters()),
        "dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
        "limit": limit,
        "num_fewshot": 0,
        "batch_size": batch_size,
        "bos": wants_bos(model),
        "data": str(root) if root is not None else "huggingface hub",
        "task_versions": {**{t.name: t.version for t in task_list}, **harness_versions},
        "metric_definitions": "lm-evaluation-harness 0.4.x (acc, acc_norm = loglik / len(choice chars))",
        "seconds": seconds,
        "versions": _versions(),
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "host": {"cpus": os.cpu_count(), "device": str(next(model.parameters()).device)},
    }
    if log_samples:
        results["samples"] = samples
    return results


def evaluate_spec(spec: str, tasks, limit: int | None = None, data_dir=None, batch_size: int = 16,
                  progress: bool = True, **kwargs) -> dict:
    """Load a model (preset, .gguf, folder, hub id) and evaluate it; fails on bad tasks before loading."""
    from ..models import load

    ours, theirs = split_tasks(tasks)
    if ours:
        parse_tasks(ours)
    check_harness_tasks(theirs, kwargs.get("include_path"))
    resolve_data_dir(data_dir)
    lm = load(spec)
    res = evaluate(lm.model, lm.tokenizer, tasks, limit=limit, data_dir=data_dir, batch_size=batch_size,
                   progress=progress, **kwargs)
    res["meta"]["model"] = spec
    res["meta"]["source"] = lm.source
    return res
