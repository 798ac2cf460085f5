"""Task accuracy of other repairs on the structured study's DIET cell (20%, seed 0).

    DIETPRUNE_DATA_DIR=../shared/benchdata python bench/repair_accuracy.py --model smollm2-135m \\
        --repairs rms+ls+energy,rms+ls+refit,rms+refit

Each repair runs through `bench/structured.py`'s `run_cell` with the study's settings (7 tasks,
100 calibration samples per task, limit 200, 16,384 WikiText-2 tokens), so its numbers compare
directly with the `diet` row of docs/results.md (repair rms+ls). Writes one JSON per repair
under bench/results/repair_accuracy/ and prints avg, perplexity and per-task scores.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import structured as sb  # noqa: E402

from dietprune.models import load  # noqa: E402

SETTINGS = sb.settings_of(sb.resolve_config(sb.parse_args([])))  # the study's defaults


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--repairs", default="rms+ls+energy")
    ap.add_argument("--sparsity", type=float, default=0.2)
    ap.add_argument("--data-dir", default=os.environ.get("DIETPRUNE_DATA_DIR"))
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "repair_accuracy"))
    args = ap.parse_args(argv)
    lm = load(args.model)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for repair in args.repairs.split(","):
        spec = {"model": args.model, "label": "diet", "sparsity": args.sparsity, "seed": 0,
                "variant": f"repair={repair}"}
        cell = sb.run_cell(lm, spec, SETTINGS, args.data_dir)
        scores = {k: round(100 * t["score"], 1) for k, t in cell["tasks"].items()}
        print(f"{args.model} {repair}: avg {100 * cell['avg']:.1f} ppl {cell['ppl']:.1f} {scores}", flush=True)
        sb.write_json_atomic(out / f"{args.model}__{repair}__{args.sparsity:.2f}.json", cell)
    return 0


if __name__ == "__main__":
    sys.exit(main())
