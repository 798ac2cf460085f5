"""SHA-256 of a pruned model's state dict, to compare two checkouts bit for bit (seconds per run).

    DIETPRUNE_DATA_DIR=../shared/benchdata python bench/state_hash.py --root OTHER_CHECKOUT smollm2-135m diet rms+ls

Prunes PRESET with METHOD (and REPAIR, '-' for the method's default) at 20% on the seven tasks
with --samples calibration samples each, using the dietprune package under --root (default: this
checkout), and prints the kept indices' head and the hash. Run it under two roots: equal hashes
mean the two versions compute the same checkpoint.
"""

import argparse
import hashlib
import os
import sys
import time
from pathlib import Path

ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
ap.add_argument("preset")
ap.add_argument("method", nargs="?", default="diet")
ap.add_argument("repair", nargs="?", default="-")
ap.add_argument("--root", default=str(Path(__file__).resolve().parents[1]))
ap.add_argument("--samples", type=int, default=4)
args = ap.parse_args()
sys.path.insert(0, args.root)

from dietprune.models import load  # noqa: E402
from dietprune.pipeline import prune  # noqa: E402

t0 = time.time()
res = prune(load(args.preset), tasks="boolq,rte,hellaswag,winogrande,arc_easy,arc_challenge,openbookqa", sparsity=0.2,
            samples=args.samples, method=args.method, data_dir=os.environ.get("DIETPRUNE_DATA_DIR"),
            **({"repair": args.repair} if args.repair != "-" else {}))
h = hashlib.sha256()
for k, v in sorted(res.model.state_dict().items()):
    h.update(k.encode())
    h.update(v.detach().cpu().contiguous().numpy().tobytes())
head = None if res.kept is None else res.kept[:8].tolist()
print(args.preset, args.method, args.repair, head, h.hexdigest(), f"{time.time() - t0:.1f}s")
