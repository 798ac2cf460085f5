"""Ablation of the task-exclusive criterion (ratio t/g > tau vs top-rho by t/g), layer-wise proxy.

One dense engine pass collects, for every block linear, sum x^2 on the calibration data (general
and task, as the sparsify loop does) and X X^T on held-out data: general windows drawn with
another seed, and task calib rows that the calibration sample did not pick. For each criterion
setting, Wanda masks are computed per layer (no sequential propagation) and the relative
reconstruction error ||(W - W')X||^2 / ||W X||^2 is averaged over layers on the held-out general
and held-out task data. Writes bench/results/fusion_ablation.{json,md}.

    python bench/fusion_ablation.py --model smollm2-135m
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from dietprune.adapters import adapter_for, get_module
from dietprune.data import calibration_examples
from dietprune.encoding import calibration_ids, wants_bos
from dietprune.models import load
from dietprune.sparsify.config import SparsifyConfig
from dietprune import engine
from dietprune.engine import make_batches
from dietprune.sparsify.loop import (LinearStats, general_sequences, input_groups, prunable_linears, prune_linear,
                                     task_sequences)
from dietprune.tasks import DIET_TASKS, parse_tasks

RESULTS = Path(__file__).resolve().parent / "results"
VARIANTS = [("plain", {}), ("ratio tau=1.25", dict(criterion="ratio", tau=1.25)),
            ("ratio tau=1.5", dict(criterion="ratio", tau=1.5)), ("ratio tau=2", dict(criterion="ratio", tau=2.0)),
            ("ratio tau=3", dict(criterion="ratio", tau=3.0)), ("top rho=0.02", dict(criterion="top", rho=0.02)),
            ("top rho=0.05", dict(criterion="top", rho=0.05)), ("top rho=0.1", dict(criterion="top", rho=0.1))]


class _Done(Exception):
    pass


def quadratic(delta: torch.Tensor, gram: torch.Tensor) -> float:
    """sum_i delta_i^T G delta_i = ||delta X||^2 (float32: this is a proxy measurement)."""
    return float(((delta @ gram) * delta).sum())


def heldout_task_sequences(tokenizer, tasks, samples, add_bos, max_length, data_dir):
    out = []
    for task in parse_tasks(tasks):
        everything = calibration_examples(task, 10**9, 0, data_dir)
        chosen = set(calibration_examples(task, samples, 0, data_dir))
        rest = [e for e in everything if e not in chosen][:samples]
        out += calibration_ids(tokenizer, rest, add_bos, max_length)
    return out


@torch.no_grad()
def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--tasks", default=",".join(DIET_TASKS))
    p.add_argument("--samples", type=int, default=64)
    p.add_argument("--seqlen", type=int, default=256)
    p.add_argument("--task-samples", type=int, default=16)
    p.add_argument("--data-dir", default=None)
    p.add_argument("--blocks", default="", help="comma-separated block indices to measure (default: all)")
    args = p.parse_args(argv)

    t0 = time.perf_counter()
    lm = load(args.model)
    model, tok = lm.model, lm.tokenizer
    adapter = adapter_for(model)
    add_bos = wants_bos(model)
    seqs = {
        "general": general_sequences(tok, "wikitext2", args.samples, args.seqlen, 0, add_bos, args.data_dir),
        "task": task_sequences(tok, args.tasks, args.task_samples, 0, add_bos, 512, args.data_dir),
        "general_heldout": general_sequences(tok, "wikitext2", args.samples, args.seqlen, 1, add_bos, args.data_dir),
        "task_heldout": heldout_task_sequences(tok, args.tasks, args.task_samples, add_bos, 512, args.data_dir),
    }
    data = [b for k, v in seqs.items() for b in make_batches(v, 8, tok, k)]
    groups = input_groups(adapter)
    group_of = {n: g for g in groups for n in g}
    configs = {pattern: {name: SparsifyConfig(method="wanda", pattern=pattern, sparsity=sp, tasks=args.tasks,
                                              fuse=bool(opts), **opts) for name, opts in VARIANTS}
               for pattern, sp in (("unstructured", 0.5), ("2:4", None))}
    errors = {pat: {name: {"general": [], "task": [], "exclusive": []} for name, _ in VARIANTS} for pat in configs}
    measure = {int(b) for b in args.blocks.split(",") if b.strip()} or set(range(len(adapter.blocks(model))))

    def measure_block(block, i, stats):  # the block is not changed: dense propagation
        for name in prunable_linears(adapter) if i in measure else []:
            lin = get_module(block, name)
            g = group_of[name]
            grams = {k: stats[f"{k}_heldout"][g].gram.to(torch.float32) for k in ("general", "task")}
            dense = {k: quadratic(lin.weight, grams[k]) for k in grams}
            for pat, by_variant in configs.items():
                for variant, cfg in by_variant.items():
                    new, rec = prune_linear(lin.weight, stats["general"][g], stats["task"][g] if cfg.fuse else None,
                                            cfg)
                    e = errors[pat][variant]
                    for k in grams:
                        e[k].append(quadratic(lin.weight - new, grams[k]) / dense[k])
                    e["exclusive"].append(rec.get("exclusive_fraction", 0.0))
        print(f"block {i} done ({time.perf_counter() - t0:.0f}s)", flush=True)
        if i >= max(measure):
            raise _Done
        return False

    try:
        engine.run(model, data, [LinearStats(groups, list(seqs), {"general_heldout", "task_heldout"}, measure_block)])
    except _Done:
        pass

    summary = {pat: {v: {k: sum(x) / len(x) for k, x in e.items()} for v, e in by.items()}
               for pat, by in errors.items()}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "fusion_ablation.json").write_text(json.dumps({"args": vars(args), "summary": summary}, indent=2))
    where = f"blocks {sorted(measure)}" if args.blocks else "all blocks"
    lines = [f"Wanda on {args.model} ({where}), layer-wise relative reconstruction error (mean over all block linears) on "
             f"held-out data; calibration {args.samples}x{args.seqlen} wikitext2 tokens + {args.task_samples} "
             "examples per task.", "",
             "| pattern | variant | exclusive channels | general error | task error |", "|---|---|---|---|---|"]
    for pat, by in summary.items():
        for v, s in by.items():
            lines.append(f"| {pat} | {v} | {100 * s['exclusive']:.1f}% | {s['general']:.4f} | {s['task']:.4f} |")
    (RESULTS / "fusion_ablation.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
