"""Rows for a task, from the Hugging Face hub or a local folder, through one loader.

Local data (``--data-dir`` or ``DIETPRUNE_DATA_DIR``) is JSONL in the hub schema, laid out as
``DIR/<task>/calib.jsonl`` and ``DIR/<task>/eval.jsonl``. Both paths go through
``datasets.load_dataset``; calibration rows are drawn with a seeded sample, evaluation rows are
the first ``limit`` rows (as ``lm_eval --limit`` does).
"""

from __future__ import annotations

import os
import random
from pathlib import Path

from .errors import DietpruneError
from .tasks import Example, Task
from .userfiles import read_user_file

DATA_ENV = "DIETPRUNE_DATA_DIR"


def data_dir(explicit: str | os.PathLike | None = None) -> Path | None:
    d = explicit or os.environ.get(DATA_ENV)
    if not d:
        return None
    p = Path(d).expanduser()
    if not p.is_dir():
        raise DietpruneError(f"data dir {p} does not exist (from {'--data-dir' if explicit else DATA_ENV})")
    return p


def _load_local(task: Task, role: str, root: Path) -> list[dict]:
    fname = task.local_files.get(role)
    path = root / task.name / fname if fname else None
    if path is None or not path.is_file():
        raise DietpruneError(f"task '{task.name}' has no local {role} data: expected {path or root / task.name}")
    import datasets

    datasets.disable_progress_bars()
    verbosity = datasets.logging.get_verbosity()
    datasets.logging.set_verbosity(datasets.logging.CRITICAL)  # a bad file is our one line, not also its log
    try:
        ds = datasets.load_dataset("json", data_files=str(path), split="train")
    except Exception as exc:  # datasets wraps a bad line, bad bytes or mixed types in its own errors
        cause = exc.__cause__ or exc.__context__ or exc
        raise DietpruneError(f"cannot read task data {path}: not valid JSON lines "
                             f"({type(cause).__name__}: {str(cause).splitlines()[0] if str(cause) else ''})") from exc
    finally:
        datasets.logging.set_verbosity(verbosity)
    return list(ds)


def _load_hub(task: Task, role: str) -> list[dict]:
    if task.hub_path is None or role not in task.hub_splits:
        raise DietpruneError(f"task '{task.name}' has no hub source for {role} data; set {DATA_ENV}")
    import datasets

    try:
        ds = datasets.load_dataset(task.hub_path, task.hub_name, split=task.hub_splits[role])
    except Exception as exc:  # network, auth, missing dataset: all end the same way for the user
        raise DietpruneError(
            f"could not load task '{task.name}' from the Hugging Face hub ({type(exc).__name__}); "
            f"set {DATA_ENV} (or pass --data-dir) to a folder with {task.name}/{task.local_files.get(role)}"
        ) from exc
    return list(ds)


def load_rows(task: Task, role: str, data_dir_: str | os.PathLike | None = None) -> list[dict]:
    """All rows of a task for a role ('calib' or 'eval')."""
    if task.path is not None:
        rows = read_user_file(Path(task.path))
    else:
        root = data_dir(data_dir_)
        rows = _load_local(task, role, root) if root else _load_hub(task, role)
    if not rows:
        raise DietpruneError(f"task '{task.name}' has no {role} rows")
    return rows


def calibration_examples(task: Task, samples: int, seed: int = 0, data_dir_=None) -> list[Example]:
    """`samples` seeded-random examples for profiling (text tasks: non-blank rows only)."""
    examples, idx = _calibration_draw(task, samples, seed, data_dir_)
    return [examples[i] for i in idx]


def _calibration_draw(task: Task, samples: int, seed: int, data_dir_) -> tuple[list[Example], list[int]]:
    """All formatted calibration examples and the sorted indices of the seeded draw."""
    if samples <= 0:
        raise DietpruneError(f"samples must be positive, got {samples}")
    rows = load_rows(task, "calib", data_dir_)
    examples = [task.format(r) for r in rows]
    if task.kind in ("perplexity", "text"):
        examples = [e for e in examples if e.continuations[0].strip()]
        if not examples:
            raise DietpruneError(f"task '{task.name}' has only blank text rows")
    rng = random.Random(seed)
    if samples >= len(examples):
        return examples, list(range(len(examples)))
    return examples, sorted(rng.sample(range(len(examples)), samples))


def heldout_examples(task: Task, samples: int, seed: int, n: int, data_dir_=None) -> list[Example]:
    """Up to `n` calibration-split examples that ``calibration_examples(task, samples, seed)`` does
    not draw (seeded); empty when the draw takes the whole split."""
    examples, drawn = _calibration_draw(task, samples, seed, data_dir_)
    rest = sorted(set(range(len(examples))) - set(drawn))
    if n < len(rest):
        rest = sorted(random.Random(seed + 7919).sample(rest, n))
    return [examples[i] for i in rest]


def evaluation_rows(task: Task, limit: int | None = None, data_dir_=None) -> list[dict]:
    rows = load_rows(task, "eval", data_dir_)
    return rows[:limit] if limit else rows
