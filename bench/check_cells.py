"""Does the code still reproduce the structured study's cached `diet` cells (20%, seed 0)?

    DIETPRUNE_DATA_DIR=../shared/benchdata python bench/check_cells.py [--eval] [--out FILE]

For each preset it prunes with the study's settings through `bench/structured.py`'s own path
(one shared task profile with Gram statistics, then `prune(..., scores=profile)`) and compares
with the cached cell: the kept indices (exactly), the per-task DIET scores (the cell keeps 6
significant digits) and, with `--eval`, every task score and the perplexity (to 1e-6; minutes
per preset on a CPU). It also records a SHA-256 of the pruned state dict, so two code versions
can be compared bit for bit without evaluating (`--compare OTHER.json`).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import structured as sb  # noqa: E402

PRESETS = ("smollm2-135m", "gemma3-270m")


def state_sha(model) -> str:
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def check(preset: str, data_dir, do_eval: bool) -> dict:
    from dietprune.merge import merge_k
    from dietprune.models import load
    from dietprune.pipeline import prune

    settings = sb.settings_of(sb.resolve_config(sb.parse_args([])))
    key = sb.cell_key(preset, "diet", 0.2, 0)
    cell = json.loads(sb.cell_file(ROOT / "bench/results/structured/cells", key).read_text())
    lm = load(preset)
    t0 = time.perf_counter()
    if do_eval:
        spec = sb.parse_key(key)
        new = sb.run_cell(lm, spec, settings, data_dir, profiles={})
        kept, scores = new["kept"], new["profile"]["scores"]
        out = {"task_scores_max_abs_diff": max(abs(new["tasks"][t]["score"] - cell["tasks"][t]["score"])
                                               for t in cell["tasks"]),
               "ppl_abs_diff": abs(new["ppl"] - cell["ppl"])}
    else:
        prof = sb.task_profile({}, lm, {"model": preset, "seed": 0}, "diet", {"samples": 100}, settings,
                                      data_dir)
        res = prune(lm, tasks=settings["tasks"], sparsity=0.2, method="diet", seed=0, data_dir=data_dir,
                    scores=prof, samples=100)
        kept = res.kept.tolist()
        s = prof.score_matrix()
        scores = [[float(f"{v:.6g}") for v in row] for row in s.tolist()]
        votes = merge_k(s, len(res.kept), "vote").votes.tolist()
        out = {"votes_equal": votes == cell["profile"]["votes"], "state_sha256": state_sha(res.model)}
    diff = max(abs(a - b) / max(abs(b), 1e-30) for ra, rb in zip(scores, cell["profile"]["scores"])
               for a, b in zip(ra, rb))
    out.update({"kept_equal": kept == cell["kept"], "score_max_rel_diff": diff,
                "seconds": round(time.perf_counter() - t0, 1)})
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default=",".join(PRESETS))
    ap.add_argument("--eval", action="store_true", help="rerun the cell's evaluation too (minutes per preset)")
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    ap.add_argument("--compare", default=None, help="a JSON of another run: the state hashes must agree")
    ap.add_argument("--data-dir", default=os.environ.get("DIETPRUNE_DATA_DIR"))
    args = ap.parse_args(argv)
    results = {m: check(m, args.data_dir, args.eval) for m in args.models.split(",")}
    ok = all(r["kept_equal"] and r["score_max_rel_diff"] < 1e-5 for r in results.values())
    if args.eval:
        ok &= all(r["task_scores_max_abs_diff"] <= 1e-6 and r["ppl_abs_diff"] <= 1e-6 * 300 for r in results.values())
    if args.compare:
        other = json.loads(Path(args.compare).read_text())
        for m, r in results.items():
            r["state_equal_to_compare"] = r.get("state_sha256") == other.get(m, {}).get("state_sha256")
            ok &= r["state_equal_to_compare"]
    print(json.dumps(results, indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1) + "\n")
    print("OK" if ok else "MISMATCH")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
