"""GPU smoke check: prune both presets at 20% (rms+ls) on a CUDA device and on the CPU, compare.

    DIETPRUNE_DATA_DIR=../shared/benchdata python bench/gpu_smoke.py [--device cuda] [--limit 20]

For each preset: the same DIET prune (seven tasks, --samples calibration samples per task) runs
with ``device="cuda"`` (profiling, selection, repair and cut on the GPU) and on the CPU; then the
kept indices (which may differ only where two dimensions' votes tie on float noise), the largest
weight difference of the pruned models, and the accuracy of each on the first --limit examples
of every task are compared. Writes bench/results/gpu_smoke.json. Exits 1 when there is no CUDA
device, or when the kept sets differ by more than --max-kept-diff dimensions or the accuracy by
more than --max-acc-diff on average.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PRESETS = ("smollm2-135m", "gemma3-270m")
TASKS = "boolq,rte,hellaswag,winogrande,arc_easy,arc_challenge,openbookqa"


def run(preset: str, device: str, args) -> dict:
    import torch

    from dietprune.evaluate import evaluate
    from dietprune.models import load
    from dietprune.pipeline import prune

    t0 = time.perf_counter()
    lm = load(preset)
    res = prune(lm, tasks=TASKS, sparsity=0.2, repair="rms+ls", samples=args.samples, data_dir=args.data_dir,
                device=device)
    t1 = time.perf_counter()
    dev = {p.device.type for p in res.model.parameters()}
    with torch.no_grad():
        ev = evaluate(res.model, lm.tokenizer, TASKS, limit=args.limit, data_dir=args.data_dir, progress=False)
    scores = {t: m.get("acc") for t, m in ev["tasks"].items()}
    state = {k: v.detach().cpu() for k, v in res.model.state_dict().items()}
    return {"kept": res.kept.tolist(), "devices": sorted(dev), "prune_seconds": round(t1 - t0, 1),
            "eval_seconds": round(time.perf_counter() - t1, 1), "acc": scores, "state": state}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--models", default=",".join(PRESETS))
    ap.add_argument("--samples", type=int, default=100)
    ap.add_argument("--limit", type=int, default=20)
    ap.add_argument("--max-kept-diff", type=int, default=2)
    ap.add_argument("--max-acc-diff", type=float, default=0.05)
    ap.add_argument("--data-dir", default=os.environ.get("DIETPRUNE_DATA_DIR"))
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "gpu_smoke.json"))
    args = ap.parse_args(argv)
    import torch

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("no CUDA device: the GPU smoke check did not run")
        return 1
    report, ok = {"device": args.device, "limit": args.limit, "samples": args.samples, "models": {}}, True
    if args.device.startswith("cuda"):
        report["gpu"] = torch.cuda.get_device_name(0)
    for preset in args.models.split(","):
        gpu, cpu = run(preset, args.device, args), run(preset, "cpu", args)
        kept_diff = len(set(gpu["kept"]) ^ set(cpu["kept"]))
        same_shape = all(gpu["state"][k].shape == cpu["state"][k].shape for k in cpu["state"])
        weight_diff = max(float((gpu["state"][k].float() - cpu["state"][k].float()).abs().max())
                          for k in cpu["state"]) if same_shape else None
        acc_diff = sum(abs(gpu["acc"][t] - cpu["acc"][t]) for t in cpu["acc"]) / len(cpu["acc"])
        row = {"kept_symmetric_difference": kept_diff, "max_weight_abs_diff": weight_diff,
               "mean_acc_abs_diff": acc_diff, "on_device": gpu["devices"],
               **{f"{side}_{k}": r[k] for side, r in (("gpu", gpu), ("cpu", cpu))
                  for k in ("acc", "prune_seconds", "eval_seconds")}}
        row["ok"] = kept_diff <= args.max_kept_diff and acc_diff <= args.max_acc_diff and \
            gpu["devices"] == [torch.device(args.device).type]
        ok &= row["ok"]
        report["models"][preset] = row
        print(preset, json.dumps({k: v for k, v in row.items() if not k.endswith("_acc")}), flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=1) + "\n")
    print("OK" if ok else "MISMATCH", "->", args.out)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
