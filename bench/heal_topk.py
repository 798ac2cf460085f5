"""Teacher on the fly vs the teacher's top-k cache (`heal --teacher-topk K`): which is faster?

    DIETPRUNE_DATA_DIR=../shared/benchdata python bench/heal_topk.py [--k 64] [--repeats 2]

The student is the healing study's pruned smollm2-135m (diet-width at 20%, made by
bench/heal.py and cached under ~/.cache/dietprune/heal-bench; pruned here if absent), the
teacher the dense preset. The training text is a small slice of the study's (``--samples``
calibration rows per task, no WikiText-2), so one epoch is a few steps and a run covers
``--epochs`` epochs. Runs alternate (on the fly, cached, on the fly, cached, ...), one thread,
the study's step (4 x 256 tokens, bfloat16 bodies). Reported per run: tokens/s over the first
epoch (the cache is being filled) and over the later epochs (read back), the teacher's mean
probability mass inside its top k, and the full-vocabulary KL to the teacher on 8 held-out
windows of wikitext2/eval.jsonl after training. Writes bench/results/heal_topk.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))


def heldout_windows(tokenizer, data_dir, n: int, seq_len: int) -> list[list[int]]:
    from dietprune.data import data_dir as resolve

    rows = [json.loads(line)["text"] for line in (resolve(data_dir) / "wikitext2" / "eval.jsonl").open()]
    ids = tokenizer("".join(rows[:400]), add_special_tokens=False)["input_ids"]
    return [ids[i:i + seq_len] for i in range(0, n * seq_len, seq_len)]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--k", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--samples", type=int, default=6, help="calibration rows per task (sets the epoch size)")
    ap.add_argument("--epochs", type=float, default=4.0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--data-dir", default=os.environ.get("DIETPRUNE_DATA_DIR"))
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "heal_topk.json"))
    args = ap.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    import heal as study

    from dietprune.heal import SequenceStream, heal, kl_to_teacher, training_texts
    from dietprune.encoding import wants_bos
    from dietprune.models import load
    from dietprune.tasks import DIET_TASKS

    lm = load("smollm2-135m")
    folder = study.pruned_checkpoint(lm, "smollm2-135m", "diet-width", 0.2, args.data_dir)
    student = load(str(folder))
    texts = training_texts(DIET_TASKS, (), (), args.samples, 0, args.data_dir)
    seq_len, batch = study.DEFAULTS["seq_len"], study.DEFAULTS["batch_size"]
    stream = SequenceStream(lm.tokenizer, texts, seq_len, 0, wants_bos(lm.model), fixed_windows=True)
    per_epoch_steps = stream.sequences_per_epoch / batch
    steps = max(2, round(args.epochs * per_epoch_steps))
    heldout = heldout_windows(lm.tokenizer, args.data_dir, 8, seq_len)
    print(f"epoch: {stream.sequences_per_epoch} windows = {per_epoch_steps:.1f} steps; {steps} steps a run",
          flush=True)
    runs = []
    for rep in range(args.repeats):
        for k in (0, args.k):
            t0 = time.perf_counter()
            res = heal(student, lm, tasks=DIET_TASKS, samples=args.samples, tokens=steps * batch * seq_len,
                       seq_len=seq_len, batch_size=batch, seed=0, data_dir=args.data_dir, teacher_topk=k,
                       bf16=True, checkpoint_every=0, progress=False)
            wall = time.perf_counter() - t0
            secs = [h["seconds"] for h in res.history]
            first = int(per_epoch_steps)  # steps wholly inside the first epoch
            step_s = [b - a for a, b in zip([0.0] + secs, secs)]
            tok = batch * seq_len
            with torch.no_grad():
                kl = kl_to_teacher(res.model, lm.model, heldout)
            row = {"repeat": rep, "teacher_topk": k, "steps": len(secs),
                   "tok_s_first_epoch": round(tok * first / sum(step_s[:first]), 1),
                   "tok_s_later_epochs": round(tok * (len(step_s) - first - 1) / sum(step_s[first + 1:]), 1),
                   "tok_s_all": res.summary["tokens_per_second"], "wall_seconds": round(wall, 1),
                   "teacher_topk_mass": res.summary.get("teacher_topk_mass"), "heldout_kl": round(kl, 5),
                   "loss_last": res.summary["loss_last"]}
            runs.append(row)
            print(json.dumps(row), flush=True)
            del res

    def med(k, key):
        return statistics.median(r[key] for r in runs if r["teacher_topk"] == k)

    ratio_later = med(args.k, "tok_s_later_epochs") / med(0, "tok_s_later_epochs")
    ratio_first = med(args.k, "tok_s_first_epoch") / med(0, "tok_s_first_epoch")
    out = {"schema": "dietprune-heal-topk/1", "student": str(folder.name), "teacher": "smollm2-135m",
           "k": args.k, "samples_per_task": args.samples, "windows_per_epoch": stream.sequences_per_epoch,
           "steps_per_run": steps, "seq_len": seq_len, "batch_size": batch, "threads": args.threads,
           "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
           "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "runs": runs,
           "median": {"fly_later_tok_s": med(0, "tok_s_later_epochs"), "cached_later_tok_s": med(args.k, "tok_s_later_epochs"),
                      "cached_over_fly_later": round(ratio_later, 3), "cached_over_fly_first_epoch": round(ratio_first, 3),
                      "fly_heldout_kl": med(0, "heldout_kl"), "cached_heldout_kl": med(args.k, "heldout_kl"),
                      "topk_mass": med(args.k, "teacher_topk_mass")}}
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps(out["median"], indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
