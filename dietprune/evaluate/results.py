"""Results files: write and read the JSON that ``dietprune eval`` produces."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

from ..errors import DietpruneError

ACCURACY_KEYS = ("acc", "acc_norm")


def _clean(x):
    """JSON has no NaN: write null instead."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_clean(v) for v in x]
    return x


def save_results(results: dict, path: str | os.PathLike) -> Path:
    out = Path(path).expanduser()
    if not out.parent.is_dir():
        raise DietpruneError(f"cannot write results: folder {out.parent} does not exist")
    from ..outputs import atomic_file

    with atomic_file(out, "results") as tmp:
        tmp.write_text(json.dumps(_clean(results), indent=2) + "\n", encoding="utf-8")
    return out


def load_results(path: str | os.PathLike) -> dict:
    p = Path(path).expanduser()
    if not p.is_file():
        raise DietpruneError(f"results file not found: {p}")
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DietpruneError(f"{p} is not a JSON results file ({exc})") from exc
    if not isinstance(data, dict) or not isinstance(data.get("tasks"), dict):
        raise DietpruneError(f"{p} is not a dietprune results file (no 'tasks' object)")
    if not isinstance(data.get("meta", {}), dict):
        raise DietpruneError(f"{p}: 'meta' is not an object")
    for task, metrics in data["tasks"].items():
        if not isinstance(metrics, dict):
            raise DietpruneError(f"{p}: task '{task}' holds {type(metrics).__name__}, not an object of metrics")
        for key, value in metrics.items():
            numeric = key in ("acc", "acc_norm", "n") or key.endswith(("_stderr", "perplexity"))
            if numeric and value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
                raise DietpruneError(f"{p}: metric {task}.{key} is {value!r}, not a number")
    return data


def headline(metrics: dict) -> tuple[str, float | None]:
    """(metric name, value) shown for a task: acc_norm where the task reports it, else acc, else
    word perplexity."""
    for key in ("acc_norm", "acc", "word_perplexity", "token_perplexity"):
        if metrics.get(key) is not None:
            return key, metrics[key]
    return "", None


def format_table(results: dict) -> str:
    """One line per task for the terminal."""
    lines = [f"{'task':<15}{'metric':<18}{'value':>10}{'stderr':>10}{'n':>7}"]
    for name, m in results["tasks"].items():
        for key in ("acc", "acc_norm", "word_perplexity", "byte_perplexity", "token_perplexity"):
            if m.get(key) is None:
                continue
            se = m.get(f"{key}_stderr")
            lines.append(f"{name:<15}{key:<18}{m[key]:>10.4f}{'' if se is None else f'{se:.4f}':>10}"
                         f"{m.get('n', ''):>7}")
    return "\n".join(lines)
