"""Add per-example records to cached structured-study cells, so docs/results.md can show paired
statistics (difference on the same examples with SE and bootstrap interval, McNemar, agreement).

    python bench/paired_records.py                          # dense + every method at the study sparsity
    python bench/paired_records.py --models smollm2-135m --labels dense,diet,random

Cells written before the study stored records hold aggregates only. For each selected cell without
``records`` this reruns the cell exactly as ``bench/structured.py`` does (``run_cell``: same prune
config, shared task profile, evaluation settings) and compares the rerun's per-task scores with the
cached ones:

- all equal, and the same kept dimensions: the records are added to the cached cell (nothing else
  changes), ``records_check`` says "reproduced" (with ``config_diff`` where the prune config the
  package records now differs from the cached one, e.g. an option the method never read);
- any differs: the cell is replaced by the rerun (its numbers are the ones its records give) and
  ``records_check`` keeps the cached scores it replaced, so a change is visible, not silent.

Each cell is written atomically as soon as it is done: an interrupted run resumes. Then rerun
``python bench/structured.py --render-only``.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import structured as sb  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default=sb.FULL["models"])
    ap.add_argument("--labels", default="dense," + sb.FULL["methods"],
                    help="method labels at the study sparsity (dense: the unpruned cell)")
    ap.add_argument("--sparsity", type=float, default=sb.FULL["study_sparsity"])
    ap.add_argument("--cells-dir", default=sb.FULL["cells_dir"])
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--ppl-eval", action="store_true",
                    help="instead: add the held-out perplexity (wikitext2/eval.jsonl) to cells that have records "
                         "but lack it (prune again, no task evaluation; the kept mask must match the cached one)")
    ap.add_argument("--data-dir", default=os.environ.get("DIETPRUNE_DATA_DIR"))
    args = ap.parse_args(argv)

    import torch

    from dietprune.models import load

    if args.threads:
        torch.set_num_threads(args.threads)
    cells_dir = ROOT / args.cells_dir
    profiles: dict = {}
    for model in [m.strip() for m in args.models.split(",") if m.strip()]:
        lm = None
        for label in [x.strip() for x in args.labels.split(",") if x.strip()]:
            sp = 0.0 if label == "dense" else args.sparsity
            key = sb.cell_key(model, label, sp, 0)
            path = sb.cell_file(cells_dir, key)
            if not path.is_file():
                print(f"{key}: no cached cell, skipped", flush=True)
                continue
            old = sb.json.loads(path.read_text())
            if args.ppl_eval:
                skip = ("has ppl_eval, skipped" if old.get("ppl_eval") is not None else
                        "no records, skipped" if not old.get("records") or old.get("infeasible") else None)
            else:
                skip = "has records already" if old.get("records") or old.get("infeasible") else None
            if skip:
                print(f"{key}: {skip}", flush=True)
                continue
            if lm is None:
                lm = load(model)
            t0 = time.perf_counter()
            spec = {k: old[k] for k in ("model", "label", "sparsity", "seed", "variant")}
            if args.ppl_eval:
                new = sb.run_cell(lm, spec, old["settings"], args.data_dir, profiles, test_ppl=False, tasks_eval=False)
                if new.get("kept") != old.get("kept"):
                    print(f"{key}: the rerun's mask differs from the cached cell's; ppl_eval not added", flush=True)
                    continue
                sb.write_json_atomic(path, dict(old, ppl_eval=new["ppl_eval"]))
                print(f"{key}: ppl_eval {new['ppl_eval']:.2f} in {time.perf_counter() - t0:.0f}s", flush=True)
                continue
            # the cached cell's test.jsonl perplexity is kept when the rerun reproduces it; a replaced cell
            # is rerun whole below
            new = sb.run_cell(lm, spec, old["settings"], args.data_dir, profiles, test_ppl=False)
            old_scores = {t: v["score"] for t, v in old["tasks"].items()}
            new_scores = {t: v["score"] for t, v in new["tasks"].items()}
            # compared as JSON (the rerun's config holds tuples where the cached one, read back, has lists)
            new_config = sb.json.loads(sb.json.dumps(new.get("config")))
            old_config = old.get("config") or {}
            config_diff = {k: [old_config.get(k), (new_config or {}).get(k)]
                           for k in sorted(set(old_config) | set(new_config or {}))
                           if old_config.get(k) != (new_config or {}).get(k)}
            if config_diff:  # package defaults (or what a config records) moved since the cell ran
                print(f"{key}: the rerun's prune config differs from the cached cell's: {config_diff}", flush=True)
            # the same scores from the same mask: the records belong to the cached numbers, whatever the config
            # now records (e.g. a typed config no longer lists an option the method never read)
            if old_scores == new_scores and old.get("kept") == new.get("kept"):
                cell = dict(old, records=new["records"],
                            records_check={"status": "reproduced", "rerun": new["finished"],
                                           **({"config_diff": config_diff} if config_diff else {})})
                if old.get("ppl_eval") is None and new.get("ppl_eval") is not None:
                    cell["ppl_eval"] = new["ppl_eval"]  # held-out perplexity (eval.jsonl), new with the rerun
            else:
                new = sb.run_cell(lm, spec, old["settings"], args.data_dir, profiles)  # with its test perplexity
                cell = dict(new, records_check={"status": "replaced", "cached_scores": old_scores,
                                                "cached_avg": old["avg"], "cached_finished": old.get("finished"),
                                                "same_mask": old.get("kept") == new.get("kept")})
            sb.write_json_atomic(path, cell)
            diff = {t: round(100 * (new_scores[t] - old_scores[t]), 2) for t in old_scores
                    if new_scores.get(t) != old_scores[t]}
            print(f"{key}: {cell['records_check']['status']} in {time.perf_counter() - t0:.0f}s"
                  + (f" (score changes, points: {diff})" if diff else ""), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
