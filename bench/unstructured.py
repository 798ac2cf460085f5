"""Benchmark: magnitude / Wanda / SparseGPT, plain and with general + task fusion, 50% and 2:4.

Every finished cell (model, method, pattern, fusion) is cached as JSON in bench/results/cells/
and skipped on a rerun with the same settings, so the run can be stopped and resumed. Outputs:
bench/results/unstructured.json and bench/results/unstructured.md.

    python bench/unstructured.py --models smollm2-135m --limit 50
    python bench/unstructured.py --models smollm2-135m,gemma3-270m --methods wanda,sparsegpt --patterns 2:4
    python bench/unstructured.py --render-only    # table and JSON from the cached cells, missing ones listed

Calibration: `--samples` windows of `--seqlen` tokens of wikitext2 calib.jsonl (general), and with
fusion `--task-samples` calib examples of each of the seven tasks. Evaluation: the first `--limit`
eval rows of each task (dietprune.evaluate) and token perplexity on the wikitext2 test text
(first `--ppl-tokens` tokens, windows of `--ppl-window`).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

from dietprune.evaluate.results import headline as headline_metric
from dietprune.tasks import DIET_TASKS

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="smollm2-135m,gemma3-270m")
    p.add_argument("--methods", default="magnitude,wanda,sparsegpt")
    p.add_argument("--patterns", default="unstructured,2:4")
    p.add_argument("--fusion", default="plain,fused", help="which variants: plain, fused or both")
    p.add_argument("--sparsity", type=float, default=0.5, help="unstructured sparsity (2:4 is 0.5 by definition)")
    p.add_argument("--tasks", default=",".join(DIET_TASKS), help="evaluation tasks, also the fusion's task data")
    p.add_argument("--limit", type=int, default=200, help="eval rows per task")
    p.add_argument("--samples", type=int, default=64, help="general calibration windows")
    p.add_argument("--seqlen", type=int, default=256, help="tokens per general window")
    p.add_argument("--task-samples", type=int, default=16, help="calibration examples per task (fusion)")
    p.add_argument("--ppl-tokens", type=int, default=16384, help="wikitext2 test tokens for perplexity (0: all)")
    p.add_argument("--ppl-window", type=int, default=1024)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--data-dir", default=os.environ.get("DIETPRUNE_DATA_DIR"))
    p.add_argument("--no-dense", action="store_true", help="skip the unpruned reference row")
    p.add_argument("--out", default=str(RESULTS))
    p.add_argument("--name", default="unstructured", help="base name of the table/JSON files")
    p.add_argument("--render-only", action="store_true",
                   help="write the table and JSON from the cached cells of the plan; run nothing, list what is missing")
    return p.parse_args(argv)


def cell_settings(args, model, method, pattern, fuse) -> dict:
    return {"model": model, "method": method, "pattern": pattern, "fuse": fuse,
            "sparsity": args.sparsity if pattern == "unstructured" else None, "tasks": args.tasks,
            "limit": args.limit, "samples": args.samples, "seqlen": args.seqlen, "task_samples": args.task_samples,
            "ppl_tokens": args.ppl_tokens, "ppl_window": args.ppl_window}


def cell_path(out: Path, s: dict) -> Path:
    variant = "fused" if s["fuse"] else "plain"
    model = s["model"].strip("/").replace("/", "_")
    name = f"{model}__{s['method']}__{s['pattern'].replace(':', 'of')}__{variant}__l{s['limit']}.json"
    return out / "cells" / name


def load_cached(path: Path, settings: dict) -> dict | None:
    if not path.is_file():
        return None
    data = json.loads(path.read_text())
    return data if data.get("settings") == settings else None


def evaluate_cell(model, tokenizer, args) -> dict:
    from dietprune.evaluate import evaluate, perplexity

    t0 = time.perf_counter()
    res = evaluate(model, tokenizer, args.tasks, limit=args.limit, data_dir=args.data_dir, batch_size=args.batch_size,
                   progress=False, log_samples=True)
    ppl = perplexity(model, tokenizer, data_dir=args.data_dir, max_tokens=args.ppl_tokens or None,
                     window=args.ppl_window)
    # per-example correctness of the headline metric ("0"/"1" per row), for paired comparisons of cells
    correct = {}
    for task, records in res["samples"].items():
        key = "pred_norm" if headline_metric(res["tasks"][task])[0] == "acc_norm" else "pred"
        correct[task] = "".join("1" if r[key] == r["gold"] else "0" for r in records)
    return {"tasks": res["tasks"], "correct": correct, "wikitext2_ppl": ppl,
            "eval_seconds": round(time.perf_counter() - t0, 1)}


def run_cell(lm, args, settings) -> dict:
    from dietprune.sparsify import SparsifyConfig, sparsify

    record = {"settings": settings}
    if settings["method"] == "dense":
        net, seconds = lm.model, {}
    else:
        config = SparsifyConfig(method=settings["method"], pattern=settings["pattern"], sparsity=settings["sparsity"],
                                tasks=args.tasks if settings["fuse"] else (), fuse=settings["fuse"],
                                samples=args.samples, seqlen=args.seqlen, task_samples=args.task_samples)
        res = sparsify(lm.model, config, tokenizer=lm.tokenizer, data_dir=args.data_dir)
        net, seconds = res.model, res.report.seconds
        layers = res.report.layers
        record["sparsity"] = {"overall": res.report.overall_sparsity,
                              "min_layer": min(r["sparsity"] for r in layers.values()),
                              "max_layer": max(r["sparsity"] for r in layers.values()),
                              "nm_ok": res.report.nm_ok}
        if settings["fuse"]:
            fr = [r["exclusive_fraction"] for r in layers.values()]
            record["exclusive_fraction_mean"] = sum(fr) / len(fr)
        record["calibration_tokens"] = res.report.tokens
    record.update(evaluate_cell(net, lm.tokenizer, args))
    record["prune_seconds"] = seconds
    return record


def headline(rec: dict) -> dict:
    """Headline accuracy per task (acc_norm where the task reports it, else acc)."""
    return {t: headline_metric(m)[1] for t, m in rec["tasks"].items()}


def write_outputs(records: list[dict], args, out: Path, missing: list[dict] | None = None) -> None:
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    (out / f"{args.name}.json").write_text(json.dumps({"args": vars(args), "cells": records}, indent=2))
    head = ["model", "method", "pattern", "fusion", "sparsity"] + tasks + ["mean acc", "wikitext2 ppl"]
    lines = [f"Limit {args.limit} eval rows per task; calibration {args.samples}x{args.seqlen} wikitext2 tokens"
             f" (+{args.task_samples} examples per task when fused); perplexity on the first {args.ppl_tokens or 'all'}"
             f" wikitext2 test tokens, windows of {args.ppl_window}. Accuracy: acc_norm for hellaswag, arc_*,"
             " openbookqa; acc otherwise.", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for rec in records:
        s = rec["settings"]
        accs = headline(rec)
        vals = [accs.get(t) for t in tasks]
        mean = sum(vals) / len(vals) if all(v is not None for v in vals) else None
        sp = rec.get("sparsity", {}).get("overall", 0.0)
        row = [s["model"], s["method"], s["pattern"], "fused" if s["fuse"] else "-", f"{sp:.3f}"]
        row += [f"{100 * v:.1f}" if v is not None else "" for v in vals]
        row += [f"{100 * mean:.1f}" if mean is not None else "", f"{rec['wikitext2_ppl']:.2f}"]
        lines.append("| " + " | ".join(row) + " |")
    lines += fusion_effect(records, tasks)
    if missing:
        lines += ["", "Not run (no cached cell): " + ", ".join(
            f"{m['model']} {m['method']} {m['pattern']} {'fused' if m['fuse'] else 'plain'}" for m in missing) + "."]
    (out / f"{args.name}.md").write_text("\n".join(lines) + "\n")


def mean_and_se(rec: dict, tasks: list[str]) -> tuple[float, float] | None:
    """Mean headline accuracy over the tasks and its standard error (tasks independent)."""
    accs = headline(rec)
    if any(accs.get(t) is None for t in tasks):
        return None
    metric = {t: headline_metric(rec["tasks"][t])[0] for t in tasks}
    var = sum(rec["tasks"][t].get(f"{metric[t]}_stderr", 0.0) ** 2 for t in tasks)
    return sum(accs[t] for t in tasks) / len(tasks), var ** 0.5 / len(tasks)


def paired_se(a: dict, b: dict, tasks: list[str]) -> float | None:
    """Standard error of mean(b) - mean(a) over the tasks from per-example correctness (same rows)."""
    ca, cb = a.get("correct"), b.get("correct")
    if not ca or not cb or any(t not in ca or t not in cb or len(ca[t]) != len(cb[t]) for t in tasks):
        return None
    var = 0.0
    for t in tasks:
        d = [int(y) - int(x) for x, y in zip(ca[t], cb[t])]
        n = len(d)
        if n < 2:
            return None
        m = sum(d) / n
        var += sum((v - m) ** 2 for v in d) / (n - 1) / n
    return var ** 0.5 / len(tasks)


def fusion_effect(records: list[dict], tasks: list[str]) -> list[str]:
    """Fused minus plain, per (model, method, pattern) where both cells exist."""
    by_key = {}
    for rec in records:
        s = rec["settings"]
        if s["method"] != "dense":
            by_key.setdefault((s["model"], s["method"], s["pattern"]), {})[bool(s["fuse"])] = rec
    rows = []
    for (model, method, pattern), pair in by_key.items():
        if False not in pair or True not in pair:
            continue
        plain, fused = mean_and_se(pair[False], tasks), mean_and_se(pair[True], tasks)
        if plain is None or fused is None:
            continue
        diff = fused[0] - plain[0]
        se = paired_se(pair[False], pair[True], tasks)
        if se is None:
            se = (plain[1] ** 2 + fused[1] ** 2) ** 0.5
        pp, fp = pair[False]["wikitext2_ppl"], pair[True]["wikitext2_ppl"]
        excl = pair[True].get("exclusive_fraction_mean")
        rows.append((model, method, pattern, plain[0], fused[0], diff, se, pp, fp, excl))
    if not rows:
        return []
    out = ["", "### Fusion effect (fused minus plain, same method and pattern)", "",
           "Both cells score the same rows, so the standard error of the difference is paired: per task, the"
           " spread of (fused correct - plain correct) over the rows; tasks treated as independent.", "",
           "| model | method | pattern | plain mean acc | fused mean acc | fused - plain (points) | plain ppl"
           " | fused ppl | exclusive channels |", "|---|---|---|---|---|---|---|---|---|"]
    for model, method, pattern, pa, fa, diff, se, pp, fp, excl in rows:
        ex = f"{100 * excl:.1f}%" if excl is not None else ""
        out.append(f"| {model} | {method} | {pattern} | {100 * pa:.1f} | {100 * fa:.1f} | {100 * diff:+.1f} ± {100 * se:.1f}"
                   f" | {pp:.2f} | {fp:.2f} | {ex} |")
    wins = sum(r[5] > 0 for r in rows)
    mean_diff = sum(r[5] for r in rows) / len(rows)
    ppl_better = sum(r[8] < r[7] for r in rows)
    out += ["", f"Fusion raised mean accuracy in {wins} of {len(rows)} pairs (average change {100 * mean_diff:+.2f}"
                f" points) and lowered perplexity in {ppl_better} of {len(rows)}."]
    return out


def main(argv=None) -> int:
    from dietprune.models import load

    args = parse_args(argv)
    out = Path(args.out)
    (out / "cells").mkdir(parents=True, exist_ok=True)
    torch.set_grad_enabled(False)
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    fusions = [v.strip() == "fused" for v in args.fusion.split(",") if v.strip()]
    plan = []
    for model in models:
        if not args.no_dense:
            plan.append(cell_settings(args, model, "dense", "dense", False))
        for pattern in [p.strip() for p in args.patterns.split(",") if p.strip()]:
            for method in [m.strip() for m in args.methods.split(",") if m.strip()]:
                for fuse in fusions:
                    plan.append(cell_settings(args, model, method, pattern, fuse))
    cached_cells = [load_cached(cell_path(out, s), s) for s in plan]
    todo = [s for s, c in zip(plan, cached_cells) if c is None]
    print(f"{len(plan)} cells, {len(plan) - len(todo)} cached, {len(todo)} to run", flush=True)
    if args.render_only:
        for s in todo:
            print(f"missing: {cell_path(out, s).name}")
        write_outputs([c for c in cached_cells if c is not None], args, out, missing=todo)
        print((out / f"{args.name}.md").read_text())
        return 0
    records: list[dict] = []
    lm, lm_name, durations = None, None, []
    for s, cached in zip(plan, cached_cells):
        path = cell_path(out, s)
        if cached is not None:
            records.append(cached)
            continue
        if lm_name != s["model"]:
            lm = None
            t0 = time.perf_counter()
            lm = load(s["model"])
            lm_name = s["model"]
            print(f"loaded {lm_name} in {time.perf_counter() - t0:.0f}s", flush=True)
        t0 = time.perf_counter()
        rec = run_cell(lm, args, s)
        rec["seconds"] = round(time.perf_counter() - t0, 1)
        path.write_text(json.dumps(rec, indent=2))
        records.append(rec)
        durations.append(rec["seconds"])
        left = len(todo) - len(durations)
        eta = left * sum(durations) / len(durations)
        accs = headline(rec)
        mean = sum(accs.values()) / len(accs)
        print(f"[{len(durations)}/{len(todo)}] {s['model']} {s['method']} {s['pattern']} "
              f"{'fused' if s['fuse'] else 'plain'}: mean acc {100 * mean:.1f}, ppl {rec['wikitext2_ppl']:.2f}, "
              f"{rec['seconds']:.0f}s; about {eta / 60:.0f} min left", flush=True)
        write_outputs(records, args, out)
    write_outputs(records, args, out)
    print((out / f"{args.name}.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
