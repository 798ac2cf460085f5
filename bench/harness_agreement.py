"""dietprune's lm-eval backend against the harness's own ``hf`` model on a real checkpoint.

    python bench/harness_agreement.py smol-diet20 --tasks arc_easy,boolq --limit 20

Both run the harness's task YAMLs on the local rows (``dietprune.evaluate.harness``: no hub),
with the same window and BOS setting. Reports, per task, the largest per-example log-likelihood
difference, whether acc / acc_norm flags are identical, and each side's wall time.
Writes ``--out`` (JSON).
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


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", help="preset or pruned folder")
    ap.add_argument("--tasks", default="arc_easy")
    ap.add_argument("--limit", type=int, default=20)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--data-dir", default=os.environ.get("DIETPRUNE_DATA_DIR"))
    ap.add_argument("--out", default="bench/results/harness_agreement.json")
    args = ap.parse_args(argv)

    import tempfile

    from lm_eval.models.huggingface import HFLM

    from dietprune.evaluate.harness import run_harness
    from dietprune.evaluate.lm_eval_backend import DietpruneLM
    from dietprune.models import load

    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    lm = load(args.model)
    ours = DietpruneLM(model=lm.model, tokenizer=lm.tokenizer, batch_size=args.batch_size)
    theirs = HFLM(pretrained=lm.model, tokenizer=lm.tokenizer, batch_size=args.batch_size,
                  max_length=ours.max_length, add_bos_token=ours.add_bos)
    with tempfile.TemporaryDirectory() as tmp:
        a = run_harness(ours, tasks, args.data_dir, args.limit, Path(tmp) / "a")
        b = run_harness(theirs, tasks, args.data_dir, args.limit, Path(tmp) / "b")
    out = {"model": args.model, "limit": args.limit, "max_length": ours.max_length, "add_bos": ours.add_bos,
           "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "tasks": {}}
    for t in tasks:
        x, y = a[t], b[t]
        diffs = [abs(p - q) for rx, ry in zip(x["loglik"], y["loglik"]) for p, q in zip(rx, ry)]
        out["tasks"][t] = {"n": len(x["loglik"]), "max_abs_loglik_diff": max(diffs),
                           "acc_identical": x["acc"] == y["acc"], "acc_norm_identical": x["acc_norm"] == y["acc_norm"],
                           "greedy_identical": x["greedy"] == y["greedy"],
                           "acc": [x["metrics"].get("acc"), y["metrics"].get("acc")],
                           "acc_norm": [x["metrics"].get("acc_norm"), y["metrics"].get("acc_norm")],
                           "seconds": [round(x["seconds"], 1), round(y["seconds"], 1)]}
        print(t, json.dumps(out["tasks"][t]), flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1) + "\n")
    ok = all(v["acc_identical"] and v["acc_norm_identical"] and v["max_abs_loglik_diff"] < 1e-3
             for v in out["tasks"].values())
    print("agree" if ok else "DISAGREE", "->", args.out)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
