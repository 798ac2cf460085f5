"""Run the real lm-evaluation-harness on the same local examples, for agreement checks.

Needs the optional dependency ``lm-eval==0.4.13`` (``pip install dietprune[eval]``). For each task
a YAML file is written that ``include``s the harness's own task definition (prompt, choices,
target, metrics, ``process_docs``) and only swaps the data source for the local JSONL file, so
prompts are the harness's, not re-typed ones. The harness is not patched.

HellaSwag's local copy has ``ctx`` but no ``ctx_a``/``ctx_b``; a converted copy with
``ctx_a = ctx`` and ``ctx_b = ""`` is written into the work folder, which gives the harness's
``process_docs`` the same query text as dietprune's formatter. For ``wikitext2`` the harness's
``wikitext`` task reads the articles dietprune rebuilds from the local rows
(:func:`dietprune.evaluate.metrics.wikitext_documents`) as its ``page`` field.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from ..data import data_dir as resolve_data_dir
from ..encoding import wants_bos
from ..errors import DietpruneError
from ..tasks import get_task

#: dietprune task -> harness task YAML (relative to lm_eval/tasks). RTE uses the SuperGLUE
#: variant because the local rows have SuperGLUE fields; its prompt is the GLUE ``rte`` one.
HARNESS_YAML = {
    "boolq": "super_glue/boolq/default.yaml",
    "rte": "super_glue/rte/default.yaml",
    "hellaswag": "hellaswag/hellaswag.yaml",
    "winogrande": "winogrande/default.yaml",
    "arc_easy": "arc/arc_easy.yaml",
    "arc_challenge": "arc/arc_challenge.yaml",
    "openbookqa": "openbookqa/openbookqa.yaml",
    "piqa": "piqa/piqa.yaml",
    "wikitext2": "wikitext/wikitext.yaml",
}


def _lm_eval():
    try:
        import lm_eval
    except ImportError as exc:
        raise DietpruneError("the harness comparison needs lm-eval: run `pip install lm-eval==0.4.13`") from exc
    return lm_eval


def write_task_yamls(tasks: list[str], data_dir, workdir: str | os.PathLike) -> dict[str, str]:
    """Write one harness task per dietprune task into ``workdir``; returns {task: harness task name}."""
    lm_eval = _lm_eval()
    root = resolve_data_dir(data_dir)
    if root is None:
        raise DietpruneError("the harness comparison reads local data: pass a data dir")
    tasks_root = Path(lm_eval.__file__).parent / "tasks"
    work = Path(workdir)
    work.mkdir(parents=True, exist_ok=True)
    names = {}
    for name in tasks:
        if name not in HARNESS_YAML:
            raise DietpruneError(f"no harness counterpart for task '{name}'")
        task = get_task(name)
        src = root / name / task.local_files["eval"]
        if not src.is_file():
            raise DietpruneError(f"task '{name}' has no local evaluation data at {src}")
        if name == "wikitext2":  # the harness reads document-level pages: give it dietprune's rebuilt articles
            from ..data import load_rows
            from .metrics import wikitext_documents

            rows = [r["text"] for r in load_rows(task, "eval", root)]  # as evaluate_wikitext reads them
            conv = work / "wikitext2_pages.jsonl"
            conv.write_text("".join(json.dumps({"page": d}) + "\n" for d in wikitext_documents(rows)),
                            encoding="utf-8")
            src = conv
        if name == "hellaswag":
            conv = work / "hellaswag_eval.jsonl"
            with src.open(encoding="utf-8") as fin, conv.open("w", encoding="utf-8") as fout:
                for line in fin:
                    if line.strip():
                        row = json.loads(line)
                        row.setdefault("ctx_a", row["ctx"])
                        row.setdefault("ctx_b", "")
                        fout.write(json.dumps(row) + "\n")
            src = conv
        hname = f"dietprune_{name}"
        cfg = {
            "include": str(tasks_root / HARNESS_YAML[name]),
            "task": hname,
            "tag": [],
            "dataset_path": "json",
            "dataset_name": None,
            "dataset_kwargs": {"data_files": {"test": str(src)}},
            "training_split": None,
            "validation_split": None,
            "test_split": "test",
        }
        (work / f"{hname}.yaml").write_text(json.dumps(cfg, indent=2) + "\n", encoding="utf-8")  # JSON is YAML
        names[name] = hname
    return names


def harness_lm(model, tokenizer, batch_size: int = 16, max_length: int = 2048):
    """lm-eval's HFLM around an in-memory model, with dietprune's BOS policy and window."""
    _lm_eval()
    from lm_eval.models.huggingface import HFLM

    return HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, max_length=max_length,
                add_bos_token=wants_bos(model))


def run_harness(lm, tasks: list[str], data_dir, limit: int | None, workdir) -> dict:
    """Per task: metrics, seconds and per-example log-likelihoods/greedy flags from the harness."""
    _lm_eval()
    import lm_eval
    from lm_eval.tasks import TaskManager

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    names = write_task_yamls(tasks, data_dir, workdir)
    manager = TaskManager(include_path=str(workdir), include_defaults=False)
    out = {}
    for name, hname in names.items():  # one task at a time, to time each
        t0 = time.perf_counter()
        res = lm_eval.simple_evaluate(model=lm, tasks=[hname], task_manager=manager, limit=limit, num_fewshot=0,
                                      log_samples=True, bootstrap_iters=0, verbosity="ERROR")
        seconds = time.perf_counter() - t0
        samples = sorted(res["samples"][hname], key=lambda s: s["doc_id"])
        if name == "wikitext2":  # loglikelihood_rolling: one number per document
            lls = [[float(s["filtered_resps"][0])] for s in samples]
            greedy = [[None] for _ in samples]
        else:
            lls = [[float(r[0]) for r in s["filtered_resps"]] for s in samples]
            greedy = [[bool(r[1]) for r in s["filtered_resps"]] for s in samples]
        metrics = {k.split(",")[0]: v for k, v in res["results"][hname].items() if k.endswith(",none")}
        out[name] = {"metrics": metrics, "loglik": lls, "greedy": greedy, "seconds": seconds,
                     "acc": [s.get("acc") for s in samples], "acc_norm": [s.get("acc_norm") for s in samples]}
    return out
