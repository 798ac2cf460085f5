"""Where to read activations (tap) and how to repair after the cut: wikitext2 perplexity grid.

    python bench/tap_repair.py --model gemma3-270m --sparsity 0.2 --tasks boolq,arc_easy,hellaswag

Profiles the model once per tap on task calibration data, builds masks (DIET vote at each tap,
plus random and weight-magnitude references), applies each repair, cuts, and measures token
perplexity on the first --ppl-tokens tokens of the WikiText-2 test text (never calibration
text). Every finished cell is cached in the JSON, so a rerun skips it. Writes
bench/results/tap_repair_<model>.json and .md.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dietprune.evaluate import perplexity  # noqa: E402
from dietprune.merge import merge  # noqa: E402
from dietprune.methods import magnitude, random_dims, width_align  # noqa: E402
from dietprune.registry import method_config  # noqa: E402
from dietprune.models import load  # noqa: E402
from dietprune.profile import ProfileConfig, load_calibration  # noqa: E402
from dietprune.profile import profile as run_profile  # noqa: E402
from dietprune.pipeline import cut_resident  # noqa: E402
from dietprune.repair import CutPlan, parse_repair, uses_refit  # noqa: E402

REPAIRS = ("none", "rms", "rms+ls", "refit", "rms+refit")


def apply_variant(dense, tok, kept, repair: str, norms, examples, args):
    """A copy of `dense` repaired and cut as `prune` does it (repair.CutPlan, pipeline.cut_resident)."""
    cfg = method_config("diet", repair=repair, refit_ridge=args.ridge, fit_samples=args.fit_samples,
                        fit_max_length=256)
    model = copy.deepcopy(dense)
    rms, ls = parse_repair(repair)
    cut_resident(model, tok, CutPlan(model, kept, norms, rms=rms, ls=ls), cfg, examples, uses_refit(repair))
    return model


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="gemma3-270m")
    ap.add_argument("--tasks", default="boolq,arc_easy,hellaswag")
    ap.add_argument("--samples", type=int, default=100)
    ap.add_argument("--sparsity", type=float, default=0.2)
    ap.add_argument("--ppl-tokens", type=int, default=4096)
    ap.add_argument("--fit-samples", type=int, default=64, help="sequences for the refit repair")
    ap.add_argument("--ridge", type=float, default=1e-3)
    ap.add_argument("--masks", default="random,magnitude,residual,norm-out,write")
    ap.add_argument("--repairs", default=",".join(REPAIRS))
    ap.add_argument("--data-dir", default=os.environ.get("DIETPRUNE_DATA_DIR"))
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    out = Path(args.out or ROOT / "bench" / "results" / f"tap_repair_{args.model}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    state = json.loads(out.read_text()) if out.exists() else {"cells": {}}
    state["setup"] = {k: v for k, v in vars(args).items() if k != "out"}

    t0 = time.perf_counter()
    lm = load(args.model)
    dense, tok = lm.model, lm.tokenizer
    pcfg = ProfileConfig(samples=args.samples, gram=True)
    examples = load_calibration(args.tasks, pcfg, args.data_dir)
    if "dense" not in state["cells"]:
        state["cells"]["dense"] = {"ppl": perplexity(dense, tok, args.data_dir, max_tokens=args.ppl_tokens)}
    print(f"dense ppl {state['cells']['dense']['ppl']:.2f}  (load+eval {time.perf_counter() - t0:.0f}s)", flush=True)

    cfg = method_config("diet", sparsity=args.sparsity, tasks=args.tasks)
    align = width_align(dense, cfg)
    profiles, norms = {}, None
    masks = {}
    for name in args.masks.split(","):
        if name == "random":
            masks[name] = random_dims(dense, cfg, None).kept
        elif name == "magnitude":
            masks[name] = magnitude(dense, cfg, None).kept
        else:
            t1 = time.perf_counter()
            pc = ProfileConfig(samples=args.samples, tap=name, gram=norms is None)
            prof = run_profile(dense, tok, args.tasks, pc, data_dir=args.data_dir, examples=examples)
            norms = norms or prof.norms
            profiles[name] = prof
            masks[name] = merge(prof.score_matrix(), args.sparsity, "vote", align).kept
            print(f"profiled tap {name} in {time.perf_counter() - t1:.0f}s", flush=True)
    if norms is None:
        prof = run_profile(dense, tok, args.tasks, ProfileConfig(samples=args.samples, gram=True),
                           data_dir=args.data_dir, examples=examples)
        norms = prof.norms

    names = list(masks)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            inter = len(set(masks[a].tolist()) & set(masks[b].tolist()))
            state.setdefault("overlap", {})[f"{a}|{b}"] = inter / len(masks[a])

    for mname, kept in masks.items():
        for repair in args.repairs.split(","):
            key = f"{mname}/{repair}"
            if key in state["cells"]:
                print(f"{key:28s} ppl {state['cells'][key]['ppl']:10.2f}  (cached)", flush=True)
                continue
            t1 = time.perf_counter()
            model = apply_variant(dense, tok, kept, repair, norms, examples, args)
            ppl = perplexity(model, tok, args.data_dir, max_tokens=args.ppl_tokens)
            state["cells"][key] = {"ppl": ppl, "hidden": int(model.config.hidden_size),
                                   "seconds": round(time.perf_counter() - t1, 1)}
            del model
            print(f"{key:28s} ppl {ppl:10.2f}  ({time.perf_counter() - t1:.0f}s)", flush=True)
            out.write_text(json.dumps(state, indent=2))
    out.write_text(json.dumps(state, indent=2))
    out.with_suffix(".md").write_text(render(state))
    print(render(state))
    return 0


def render(state: dict) -> str:
    s = state["setup"]
    cells = state["cells"]
    masks = sorted({k.split("/")[0] for k in cells if "/" in k}, key=lambda m: m)
    repairs = [r for r in REPAIRS if any(k.endswith("/" + r) for k in cells)]
    lines = [f"# Tap point × repair: {s['model']} at {s['sparsity']:.0%} hidden sparsity",
             "",
             f"WikiText-2 token perplexity on the first {s['ppl_tokens']} test tokens (2048-token windows); "
             f"calibration: {s['tasks']} × {s['samples']} samples; refit on {s['fit_samples']} of them. "
             f"Dense: **{cells['dense']['ppl']:.2f}**. Generated by `bench/tap_repair.py`.",
             "",
             "| mask \\ repair | " + " | ".join(repairs) + " |",
             "|---|" + "---|" * len(repairs)]
    for m in masks:
        row = [f"{cells[f'{m}/{r}']['ppl']:.1f}" if f"{m}/{r}" in cells else "–" for r in repairs]
        lines.append(f"| {m} | " + " | ".join(row) + " |")
    if state.get("overlap"):
        lines += ["", "Overlap of kept dimensions between masks (share of k):", ""]
        lines += [f"- {k.replace('|', ' vs ')}: {v:.2f}" for k, v in state["overlap"].items()]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
