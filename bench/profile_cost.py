"""What profiling costs: engine pass with DIET's observer vs a plain forward over the same batches.

    DIETPRUNE_DATA_DIR=../shared/benchdata python bench/profile_cost.py [--models ...] [--samples 100]

For each preset the seven tasks' calibration batches are built once (as `profile()` builds them);
then, interleaved and repeated, three passes are timed: a plain forward (`logits_to_keep=1`, no
hooks), the profiling pass without Gram statistics (Σ|x| at the tap, Σx² at every norm input),
and with them (Σyyᵀ at every reader norm, what `--repair ls` needs). Ratios are per repeat and
their median is reported. Writes bench/results/profile_cost.json. Timings on a shared machine:
compare only the ratios measured in the same run.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

TASKS = "boolq,rte,hellaswag,winogrande,arc_easy,arc_challenge,openbookqa"


def measure(preset: str, args) -> dict:
    import torch

    from dietprune import engine
    from dietprune.adapters import adapter_for
    from dietprune.encoding import wants_bos
    from dietprune.models import load
    from dietprune.profile import DietObserver, ProfileConfig, encode_tasks

    lm = load(preset)
    model, tok = lm.model, lm.tokenizer
    cfg = ProfileConfig(samples=args.samples)
    task_list, encoded = encode_tasks(tok, TASKS, cfg, args.data_dir, wants_bos(model))
    batches = [b for t in task_list for b in engine.make_batches(encoded[t.name], cfg.batch_size, tok, t.name)]
    adapter = adapter_for(model)

    @torch.no_grad()
    def plain():
        for b in batches:
            model(input_ids=b.ids, attention_mask=b.attn, use_cache=False, logits_to_keep=1)

    def diet(gram):
        def fn():
            obs = DietObserver(adapter, model.config, cfg.tap, [t.name for t in task_list], True, gram)
            engine.run(model, batches, [obs])
        return fn

    with torch.no_grad():  # warm-up (allocator, kernels) on a few batches, not timed
        for b in batches[:3]:
            model(input_ids=b.ids, attention_mask=b.attn, use_cache=False, logits_to_keep=1)
    passes = {"plain": plain, "profile": diet(False), "profile_gram": diet(True)}
    times = {k: [] for k in passes}
    for _ in range(args.repeats):
        for name, fn in passes.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    ratio = {k: statistics.median(t / p for t, p in zip(times[k], times["plain"])) for k in ("profile", "profile_gram")}
    return {"batches": len(batches), "tokens_with_padding": sum(int(b.ids.numel()) for b in batches),
            "tokens": sum(int(b.mask.sum()) for b in batches), "seconds": {k: [round(x, 2) for x in v]
                                                                           for k, v in times.items()},
            "ratio_without_gram": round(ratio["profile"], 3), "ratio_with_gram": round(ratio["profile_gram"], 3),
            "torch_threads": torch.get_num_threads()}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="smollm2-135m,gemma3-270m")
    ap.add_argument("--samples", type=int, default=100)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--data-dir", default=os.environ.get("DIETPRUNE_DATA_DIR"))
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "profile_cost.json"))
    args = ap.parse_args(argv)
    out = Path(args.out)
    report = json.loads(out.read_text()) if out.is_file() else {}
    report.setdefault("models", {})
    report.update({"samples": args.samples, "repeats": args.repeats, "tasks": TASKS,
                   "note": "shared 2-core machine; compare ratios within one run only"})
    for preset in args.models.split(","):
        report["models"][preset] = r = measure(preset, args)
        print(preset, json.dumps(r), flush=True)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=1) + "\n")  # each preset kept as soon as it is done
    return 0


if __name__ == "__main__":
    sys.exit(main())
