"""Does `--low-memory` give the in-memory checkpoint on a real model? (magnitude, wanda-sp, shortgpt, diet, refit)

    DIETPRUNE_DATA_DIR=../shared/benchdata python bench/check_low_memory.py [--model smollm2-135m]

Saves the preset once as a safetensors folder (under the scratch dir), then for each method runs
`dietprune prune FOLDER --method M` with and without `--low-memory` (same calibration sample) and
compares every saved tensor, the kept indices / selection record and the config. Prints and
writes bench/results/low_memory_equality.json.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def tensors(folder: Path) -> dict:
    from dietprune.streaming import Checkpoint

    ckpt = Checkpoint(folder)
    return {n: ckpt.get(n) for n in ckpt.weight_map}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--methods", default="magnitude,wanda-sp,shortgpt,diet,diet+refit",
                    help="registry methods; diet+refit is diet with --repair rms+ls+refit")
    ap.add_argument("--samples", type=int, default=16)
    ap.add_argument("--sparsity", type=float, default=0.2)
    ap.add_argument("--data-dir", default=os.environ.get("DIETPRUNE_DATA_DIR"))
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "low_memory_equality.json"))
    args = ap.parse_args(argv)

    from dietprune.models import load
    from dietprune.pipeline import prune

    scratch = Path(os.environ.get("DIETPRUNE_SCRATCH_DIR") or tempfile.gettempdir()) / f"dietprune-{args.model}-st"
    if not (scratch / "config.json").is_file():
        lm = load(args.model)
        lm.model.save_pretrained(scratch)
        lm.tokenizer.save_pretrained(scratch)
        del lm
    report, ok = {"model": args.model, "samples": args.samples, "sparsity": args.sparsity, "methods": {}}, True
    with tempfile.TemporaryDirectory() as tmp:
        for method in args.methods.split(","):
            opts = dict(method=method.split("+")[0], sparsity=args.sparsity, samples=args.samples,
                        data_dir=args.data_dir)
            if method.startswith("diet"):
                opts["repair"] = "rms+ls+refit" if method.endswith("+refit") else "rms+ls"
            times = {}
            for low in (False, True):
                t0 = time.perf_counter()
                prune(str(scratch), output=Path(tmp) / f"{method}-{low}", low_memory=low, **opts)
                times["low_memory" if low else "in_memory"] = round(time.perf_counter() - t0, 1)
            a, b = tensors(Path(tmp) / f"{method}-False"), tensors(Path(tmp) / f"{method}-True")
            same_names = sorted(a) == sorted(b)
            diff = max(float((a[n].double() - b[n].double()).abs().max()) for n in a) if same_names else None
            meta = [json.loads((Path(tmp) / f"{method}-{low}" / "dietprune.json").read_text()) for low in (False, True)]
            conf = [json.loads((Path(tmp) / f"{method}-{low}" / "config.json").read_text()) for low in (False, True)]
            row = {"same_tensor_names": same_names, "max_abs_diff": diff,
                   "same_kept": meta[0]["kept_indices"] == meta[1]["kept_indices"],
                   "same_selection": meta[0]["selection"] == meta[1]["selection"], "same_config": conf[0] == conf[1],
                   "seconds": times}
            row["ok"] = same_names and diff is not None and diff <= 1e-5 and row["same_kept"] and row["same_config"]
            ok &= row["ok"]
            report["methods"][method] = row
            print(method, json.dumps(row), flush=True)
    Path(args.out).write_text(json.dumps(report, indent=1) + "\n")
    print("OK" if ok else "MISMATCH", "->", args.out)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
