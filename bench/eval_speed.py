"""Speed and agreement of dietprune's evaluator against lm-evaluation-harness on the same examples.

For each model and task, the first ``--limit`` local evaluation rows go through
``dietprune.evaluate.evaluate`` and through lm-eval 0.4.13 (``HFLM`` around the same in-memory
model, the harness's own task YAMLs pointed at the local JSONL files), one after the other, so
both see the same machine load. Prints per-task seconds, the speed ratio (harness time / dietprune
time), the share of identical predictions (acc and acc_norm argmax) and the largest
log-likelihood difference, and the multiply-add "work ratio" the token layout allows
(``work_estimate``); writes everything as JSON.

    python bench/eval_speed.py                       # default: both presets, 7 tasks, limit 10
    python bench/eval_speed.py --models smollm2-135m --limit 50 --tasks boolq,hellaswag
    python bench/eval_speed.py --work-only           # add the work ratios to an existing results file

Model loading is not timed. Both sides use the same batch size and a 2048-token window. Wall
clock and process CPU time are both recorded: on a shared machine the CPU-time ratio is the
steadier one (other users' load inflates wall clock on either side at random).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("DIETPRUNE_PROGRESS", "0")

DEFAULT_TASKS = "boolq,rte,hellaswag,winogrande,arc_easy,arc_challenge,openbookqa"
DEFAULT_LIMIT = 10  # keeps the default run (2 models x 7 tasks x 2 evaluators) within ~15 minutes on 2 shared CPU cores


def _argmax(xs):
    return max(range(len(xs)), key=lambda i: (xs[i], -i))


def work_estimate(model, tokenizer, task_name: str, limit: int, data_dir) -> dict:
    """Multiply-adds each evaluator needs for a task's first ``limit`` rows, from the token layout.

    Per token position the decoder body costs its linear weights (attention scores and padding
    ignored, on both sides) and every lm_head row costs hidden x vocabulary. dietprune: the
    requests its evaluator builds, each position once (packed or in two passes, the same count),
    lm_head at scored tokens only. The harness: one
    sequence (context + continuation minus its last token) per distinct request, lm_head at
    every position. The ratio is the speed-up the layout allows at equal arithmetic speed.
    """
    import torch

    from dietprune.data import evaluation_rows
    from dietprune.encoding import wants_bos
    from dietprune.evaluate.loglik import _packed_width, decoder_parts
    from dietprune.evaluate.runner import choice_requests, encode_choices
    from dietprune.tasks import get_task

    body, head, _ = decoder_parts(model)
    per_token = sum(m.weight.numel() for m in body.modules() if isinstance(m, torch.nn.Linear))
    per_row = head.weight.numel()
    task = get_task(task_name)
    examples = [task.format(row) for row in evaluation_rows(task, limit, data_dir)]
    theirs_tokens = 0
    for ex in examples:
        pairs = encode_choices(tokenizer, ex, wants_bos(model))
        theirs_tokens += sum(len(seq) for seq in {tuple(c + k[:-1]) for c, k in pairs})
    reqs, _ = choice_requests(tokenizer, examples, wants_bos(model))
    ours_tokens = sum(_packed_width(r) for r in reqs)
    ours_rows = sum(r.n_scored(i) for r in reqs for i in range(len(r.continuations)))
    ours = ours_tokens * per_token + ours_rows * per_row
    theirs = theirs_tokens * (per_token + per_row)
    return {"dietprune_macs": ours, "harness_macs": theirs, "work_ratio": round(theirs / ours, 2)}


def total_work(per_task: dict) -> dict:
    ours = sum(t["dietprune_macs"] for t in per_task.values())
    theirs = sum(t["harness_macs"] for t in per_task.values())
    return {"dietprune_macs": ours, "harness_macs": theirs, "work_ratio": round(theirs / ours, 2)}


def add_work(path: Path, data_dir) -> None:
    """Fill the multiply-add estimates into an existing results file (no timing; tokenizing only)."""
    from dietprune.models import load

    results = json.loads(path.read_text())
    for spec, summary in results["models"].items():
        lm = load(spec)
        for task, entry in summary["tasks"].items():
            entry.update(work_estimate(lm.model, lm.tokenizer, task, entry["n"], data_dir))
        summary.update(total_work(summary["tasks"]))
        print(f"{spec}: " + ", ".join(f"{t} x{e['work_ratio']}" for t, e in summary["tasks"].items())
              + f"; all x{summary['work_ratio']} (measured wall x{summary['speedup']})", flush=True)
    path.write_text(json.dumps(results, indent=2) + "\n")


def run_model(spec: str, tasks: list[str], limit: int, data_dir, batch_size: int, workdir: Path) -> dict:
    import torch

    from dietprune.evaluate import evaluate
    from dietprune.evaluate.harness import harness_lm, run_harness
    from dietprune.models import load

    t0 = time.perf_counter()
    lm = load(spec)
    load_s = time.perf_counter() - t0
    hlm = harness_lm(lm.model, lm.tokenizer, batch_size=batch_size, max_length=2048)
    per_task = {}
    for task in tasks:
        t0, c0 = time.perf_counter(), time.process_time()
        ours = evaluate(lm.model, lm.tokenizer, [task], limit=limit, data_dir=data_dir, batch_size=batch_size,
                        progress=False, log_samples=True)
        ours_s, ours_cpu = time.perf_counter() - t0, time.process_time() - c0
        c0 = time.process_time()
        theirs = run_harness(hlm, [task], data_dir, limit, workdir / spec / task)[task]
        theirs_cpu = time.process_time() - c0
        recs = ours["samples"][task]
        same = sum(r["pred"] == _argmax(lls) for r, lls in zip(recs, theirs["loglik"]))
        norm_pairs = [(r["pred_norm"] == r["gold"], h) for r, h in zip(recs, theirs["acc_norm"]) if h is not None]
        diff = max(abs(a - b) for r, lls in zip(recs, theirs["loglik"]) for a, b in zip(r["loglik"], lls))
        per_task[task] = {
            "n": len(recs),
            "dietprune_seconds": round(ours_s, 2),
            "harness_seconds": round(theirs["seconds"], 2),
            "speedup": round(theirs["seconds"] / ours_s, 2),
            "dietprune_cpu_seconds": round(ours_cpu, 2),
            "harness_cpu_seconds": round(theirs_cpu, 2),
            "speedup_cpu": round(theirs_cpu / ours_cpu, 2),
            "identical_predictions": same / len(recs),
            "identical_acc_norm_outcomes": (sum(float(a) == b for a, b in norm_pairs) / len(norm_pairs)
                                            if norm_pairs else None),
            "max_abs_loglik_diff": diff,
            **work_estimate(lm.model, lm.tokenizer, task, limit, data_dir),
            "dietprune": {k: v for k, v in ours["tasks"][task].items() if k in ("acc", "acc_norm")},
            "harness": {k: v for k, v in theirs["metrics"].items() if k in ("acc", "acc_norm")},
        }
        print(f"  {task:<14} wall: dietprune {ours_s:6.1f}s harness {theirs['seconds']:6.1f}s "
              f"x{theirs['seconds'] / ours_s:5.2f} | cpu: dietprune {ours_cpu:6.1f}s harness {theirs_cpu:6.1f}s "
              f"x{theirs_cpu / ours_cpu:5.2f} | same predictions {same}/{len(recs)}  "
              f"max |dlogL| {diff:.1e}", flush=True)
    ours_total = sum(t["dietprune_seconds"] for t in per_task.values())
    theirs_total = sum(t["harness_seconds"] for t in per_task.values())
    ours_cpu_total = sum(t["dietprune_cpu_seconds"] for t in per_task.values())
    theirs_cpu_total = sum(t["harness_cpu_seconds"] for t in per_task.values())
    n = sum(t["n"] for t in per_task.values())
    same_total = sum(t["identical_predictions"] * t["n"] for t in per_task.values())
    summary = {
        "model": spec, "fingerprint": ours["meta"]["fingerprint"], "load_seconds": round(load_s, 1),
        "examples": n, "dietprune_seconds": round(ours_total, 1), "harness_seconds": round(theirs_total, 1),
        "speedup": round(theirs_total / ours_total, 2), "dietprune_cpu_seconds": round(ours_cpu_total, 1),
        "harness_cpu_seconds": round(theirs_cpu_total, 1), "speedup_cpu": round(theirs_cpu_total / ours_cpu_total, 2),
        "identical_predictions": same_total / n,
        "max_abs_loglik_diff": max(t["max_abs_loglik_diff"] for t in per_task.values()),
        "torch_threads": torch.get_num_threads(), "tasks": per_task,
    }
    summary.update(total_work(per_task))
    print(f"  => {spec}: wall dietprune {ours_total:.1f}s, harness {theirs_total:.1f}s, speed ratio x{summary['speedup']}; "
          f"cpu dietprune {ours_cpu_total:.1f}s, harness {theirs_cpu_total:.1f}s, ratio x{summary['speedup_cpu']}; "
          f"identical predictions {100 * summary['identical_predictions']:.1f}% of {n}", flush=True)
    del lm, hlm
    return summary


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="gemma3-270m,smollm2-135m")
    p.add_argument("--tasks", default=DEFAULT_TASKS)
    p.add_argument("--limit", type=int, default=DEFAULT_LIMIT, help=f"examples per task (default {DEFAULT_LIMIT})")
    p.add_argument("--batch-size", type=int, default=8, help="both evaluators (default 8: the harness's full-vocabulary "
                   "logits of Gemma take batch x length x 262144 floats)")
    p.add_argument("--data-dir", default=os.environ.get("DIETPRUNE_DATA_DIR"))
    p.add_argument("--output", default=str(Path(__file__).parent / "results" / "eval_speed.json"))
    p.add_argument("--work-only", action="store_true",
                   help="only add the multiply-add estimates (no timing) to the existing --output file")
    args = p.parse_args(argv)
    if not args.data_dir:
        p.error("pass --data-dir or set DIETPRUNE_DATA_DIR (the benchmark reads local task data)")
    if args.work_only:
        add_work(Path(args.output), args.data_dir)
        return 0
    import lm_eval
    import torch
    import transformers

    import dietprune

    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    print(f"eval speed: {args.limit} examples per task, tasks {','.join(tasks)}, batch size {args.batch_size}, "
          f"{os.cpu_count()} CPUs", flush=True)
    results = {"limit": args.limit, "batch_size": args.batch_size, "tasks": tasks, "models": {},
               "versions": {"dietprune": dietprune.__version__, "lm_eval": lm_eval.__version__,
                            "torch": torch.__version__, "transformers": transformers.__version__,
                            "python": platform.python_version()},
               "host": {"cpus": os.cpu_count(), "machine": platform.machine()},
               "note": "wall-clock on a shared machine; both evaluators run back to back per task"}
    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="dietprune-evalspeed-") as work:
        for spec in [m.strip() for m in args.models.split(",") if m.strip()]:
            print(f"{spec}:", flush=True)
            results["models"][spec] = run_model(spec, tasks, args.limit, args.data_dir, args.batch_size, Path(work))
    results["total_seconds"] = round(time.perf_counter() - t_start, 1)
    results["time"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"total {results['total_seconds']:.0f}s -> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
