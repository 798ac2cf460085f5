"""Cheap levers of diet-width, measured by the method's own criterion (KL from the dense model on
the held-out calibration tokens), from one profile, without the task evaluation.

    python bench/width_levers.py --model smollm2-135m --sparsity 0.2     # bench/results/width_levers/<model>-<sp>.json

Variants, each cut and repaired on a copy of the model:

- the grid's chosen shape as diet-width cuts it (the reference; the study cell's KL for seed 0);
- the same shape with other ridges of the MLP / head least-squares fold (and without the fold);
- MLP channels scored by mean |activation| x the L2 norm of the channel's ``down_proj`` column
  (what the channel writes into the residual, instead of its input size alone);
- depth as one more axis: drop the n layers of lowest ShortGPT Block Influence (1 - mean cosine of
  block input and output on the scoring samples) and spend the rest of the budget on MLP channels.

This only measures; nothing here changes the method's defaults.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--sparsity", type=float, default=0.2)
    ap.add_argument("--samples", type=int, default=100)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--ridges", default="0.0001,0.001,0.1,1")
    ap.add_argument("--depths", default="1,2,3,4")
    ap.add_argument("--reference", type=int, default=None,
                    help="grid index of the reference shape (default: measure the whole grid and take the best)")
    ap.add_argument("--heads", type=int, default=2, help="head options tried with each depth")
    ap.add_argument("--kl-tokens", type=int, default=None, help="held-out tokens (default: the method's)")
    ap.add_argument("--out", default=None)
    ap.add_argument("--data-dir", default=os.environ.get("DIETPRUNE_DATA_DIR"))
    args = ap.parse_args(argv)

    import torch

    from dietprune import width as W
    from dietprune.adapters import adapter_for, get_module
    from dietprune.baselines.calib import block_cosine_sums, task_sequences
    from dietprune.baselines.layers import drop_layers_
    from dietprune.baselines.scores import block_influence
    from dietprune.models import load
    from dietprune.pipeline import profile
    from dietprune.registry import spec
    from dietprune.tasks import DIET_TASKS
    from dietprune.widthstats import WidthTaskStats

    torch.set_grad_enabled(False)
    t_all = time.perf_counter()
    tasks = ",".join(DIET_TASKS)
    lm = load(args.model)
    model, tok = lm.model, lm.tokenizer
    cfg = spec("diet-width").config(method="diet-width", tasks=tasks, sparsity=args.sparsity,
                                     samples=args.samples, seed=args.seed)
    t0 = time.perf_counter()
    prof = profile(lm, tasks, samples=args.samples, seed=args.seed, data_dir=args.data_dir, gram=True, widths=True)
    t_profile = time.perf_counter() - t0
    adapter = adapter_for(model)
    full = W.full_shape(model, adapter)
    total = W.count_params(model, adapter, full)
    target = (1 - args.sparsity) * total
    seqs, probe_info = W.heldout_sequences(model, tok, cfg.tasks, cfg.samples, cfg.seed, args.data_dir,
                                           W.KL_PER_TASK, args.kl_tokens or W.KL_TOKENS, cfg.max_length)
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    probe = W.KLProbe(model, seqs, pad, cfg.batch_size)
    shapes = W.candidate_shapes(model, adapter, args.sparsity, cfg.align)
    rows = []
    path = Path(args.out or ROOT / f"bench/results/width_levers/{args.model}-{args.sparsity:g}-s{args.seed}.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")

    def run(name, shape, prof_=prof, ridge=cfg.ridge, repair=cfg.repair, drop=(), **extra):
        t = time.perf_counter()
        trial = copy.deepcopy(model)
        W.apply_shape_(trial, adapter, prof_, shape, repair, ridge, cfg.merge)
        if drop:
            drop_layers_(trial, adapter, drop)
        kl = probe.kl(trial)
        params = sum(p.numel() for p in {id(p): p for p in trial.parameters()}.values())
        row = {"variant": name, "hidden": shape.hidden, "heads": shape.heads, "groups": shape.groups,
               "channels": shape.channels, "dropped_layers": list(drop), "ridge": ridge, "repair": repair,
               "sparsity": round(1 - params / total, 4), "kl": round(kl, 4),
               "seconds": round(time.perf_counter() - t, 1), **extra}
        rows.append(row)
        print(json.dumps(row), flush=True)
        partial.write_text(json.dumps({"model": args.model, "rows": rows}, indent=1) + "\n")
        del trial
        return kl

    # 1. the grid as the method measures it
    if args.reference is None:
        kls = [run(f"grid {i}", s) for i, s in enumerate(shapes)]
        best = shapes[min(range(len(kls)), key=lambda i: kls[i])]
    else:
        best = shapes[args.reference]
        run(f"grid {args.reference}", best)
    # 2. ridge of the folds (and none: rms only, which is a no-op without a hidden cut)
    for r in [float(x) for x in args.ridges.split(",") if x]:
        run(f"ridge {r:g}", best, ridge=r)
    run("no least-squares fold", best, repair="rms")
    # 3. MLP channels scored with the down_proj column norm
    blocks = adapter.blocks(model)
    col = torch.stack([get_module(b, adapter.mlp_out).weight.double().norm(dim=0) for b in blocks])  # [L, I]
    wprof = copy.copy(prof)
    wprof.widths = replace(prof.widths, tasks={t: WidthTaskStats(st.mlp_abs * col, st.head_norm, st.count)
                                              for t, st in prof.widths.tasks.items()})
    run("MLP score x |down col|", best, prof_=wprof)
    # 4. depth: drop the lowest-Block-Influence layers, MLP channels fill the rest of the budget
    t = time.perf_counter()
    sums, count = block_cosine_sums(model, adapter, tok, task_sequences(model, tok, cfg, args.data_dir), cfg)
    bi = block_influence(sums, count)
    t_bi = time.perf_counter() - t
    order = sorted(range(len(blocks)), key=lambda i: (float(bi[i]), i))
    ids0 = {id(p) for p in blocks[0].parameters()}
    names0 = [n for n, p in model.named_parameters() if id(p) in ids0]

    def layer_params(shape):
        _, _, hd = adapter.head_layout(model)
        sizes = {"hidden": shape.hidden, "q": shape.heads * hd, "kv": shape.groups * hd, "mlp": shape.channels}
        n_all = 0
        for name, p in model.named_parameters():
            if name in names0:
                n = 1
                for dim, axis in zip(p.shape, adapter.width_axes(name, p.dim())):
                    n *= sizes[axis] if axis else dim
                n_all += n
        return n_all

    for n in [int(x) for x in args.depths.split(",") if x]:
        drop = tuple(sorted(order[:n]))
        for g, m in W.head_options(model, adapter)[:args.heads]:
            s0 = W.Shape(full.hidden, g, m, 0)
            s1 = W.Shape(full.hidden, g, m, 1)
            p0 = W.count_params(model, adapter, s0) - n * layer_params(s0)
            slope = (W.count_params(model, adapter, s1) - n * layer_params(s1)) - p0
            c = max(1, min(full.channels, int(round((target - p0) / slope))))
            run(f"drop {n} layers", W.Shape(full.hidden, g, m, c), drop=drop,
                block_influence=[round(float(bi[i]), 4) for i in drop])
    out = {"model": args.model, "sparsity": args.sparsity, "samples": args.samples, "seed": args.seed,
           "kl_probe": probe_info, "block_influence": [round(float(x), 4) for x in bi], "rows": rows,
           "seconds": {"profile": round(t_profile, 1), "block_influence": round(t_bi, 1),
                       "total": round(time.perf_counter() - t_all, 1)},
           "note": "one thread on a machine shared by several agents"}
    path.write_text(json.dumps(out, indent=1) + "\n")
    partial.unlink(missing_ok=True)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
