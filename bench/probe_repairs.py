"""Probes of ideas beyond the default mask + repair, on one model at one sparsity (perplexity only).

    python bench/probe_repairs.py --model smollm2-135m --sparsity 0.2

Profiles the model once on task calibration data (norm-out tap, Gram statistics), then measures
WikiText-2 token perplexity (first --ppl-tokens test tokens) of:

- ``vote``: the default DIET vote mask with the default repair (rms+ls);
- ``vote+head``: the same, with lm_head untied and the final-norm least-squares fold applied to it
  (what ``ls`` does by itself for a model whose lm_head is untied; for a tied model the untied
  head costs vocab × kept extra parameters, reported);
- ``obs`` / ``obs-rel`` / ``obs-rel-head``: hidden dimensions removed greedily by their
  least-squares compensation cost instead of their activation magnitude. Removing input j of the
  readers W of a norm, with the rest re-fitted on the Gram matrix G, costs ‖W[:, j]‖² / (G⁻¹)_jj
  (the optimal-brain-surgeon cost of a column); the cost is summed over every reader norm of
  every block, the cheapest dimension goes, G⁻¹ and W are updated, and so on. ``rel`` divides
  each norm's term by its readers' output energy tr(W G Wᵀ); ``head`` adds the uncompensated
  lm_head term ‖E[:, j]‖² G_final[j, j] (relative too). Every mask gets the rms+ls repair.
- ``refit`` / ``refit-late``: the sequential re-fit with its dense targets read before the RMS
  correction (current) or after it (before a fix, for the record).
- ``energy``: the vote mask with rms+ls+energy (the least-squares fold, then every reader row
  rescaled to its dense calibration energy).
- ``ls+refit``: rms+ls, then the sequential re-fit anchored at the least-squares weights (its
  ridge pulls towards them). A variant may carry its re-fit ridge: ``ls+refit:0.1``.

Writes bench/results/probe_repairs_<model>.json and .md.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dietprune.adapters import adapter_for, get_module  # noqa: E402
from dietprune.evaluate import perplexity  # noqa: E402
from dietprune.merge import jaccard, merge  # noqa: E402
from dietprune.models import load  # noqa: E402
from dietprune.profile import ProfileConfig, load_calibration  # noqa: E402
from dietprune.profile import profile as run_profile  # noqa: E402
from dietprune.refit import capture_norm_outputs, fit_batch, reader_weights, refit_readers_  # noqa: E402
from dietprune.repair import complement, ls_compensate_, rms_correct_  # noqa: E402
from dietprune.surgery import prune_hidden_  # noqa: E402

VARIANTS = ("vote", "vote+head", "obs", "obs-rel", "obs-rel-head", "refit", "refit-late", "ls+refit", "energy")


@torch.no_grad()
def obs_kept(model: nn.Module, norms, k: int, rel: bool, head: float, ridge: float = 1e-2) -> torch.Tensor:
    """Greedy least-squares-aware choice of k kept hidden dimensions (see the module docstring)."""
    ad = adapter_for(model)
    d = model.config.hidden_size
    eye = torch.eye(d, dtype=torch.float64)
    hinv, ws = [], []
    for i, block in enumerate(ad.blocks(model)):
        for j, norm in enumerate(ad.reader_norms()):
            g = norms.gram[i, j].double()
            g = g + ridge * torch.diagonal(g).mean() * eye
            w = torch.cat([get_module(block, r).weight.double() for r in ad.norm_readers[norm]], 0)
            if rel:
                w = w / torch.sum((w @ g) * w).sqrt()
            hinv.append(torch.linalg.inv(g))
            ws.append(w)
    extra = torch.zeros(d, dtype=torch.float64)
    if head:
        e, gf = ad.output_head(model).weight.double(), norms.final_gram.double()
        denom = float(((e.T @ e) * gf).sum()) if rel else 1.0
        extra = head * (e * e).sum(0) * torch.diagonal(gf) / denom
    alive = torch.ones(d, dtype=torch.bool)
    for _ in range(d - k):
        cost = extra.clone()
        for h, w in zip(hinv, ws):
            cost += (w * w).sum(0) / torch.diagonal(h).clamp_min(1e-30)
        cost[~alive] = float("inf")
        jx = int(torch.argmin(cost))
        for h, w in zip(hinv, ws):
            hj = h[:, jx].clone()
            w -= torch.outer(w[:, jx] / hj[jx], hj)  # the other columns absorb column jx
            h -= torch.outer(hj, hj) / hj[jx]  # inverse of G without row/column jx
            h[jx, jx] = 1.0  # removed: keep the diagonal finite, its cost is masked
        alive[jx] = False
    return alive.nonzero().flatten()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--sparsity", type=float, default=0.2)
    ap.add_argument("--tasks", default="boolq,arc_easy,hellaswag")
    ap.add_argument("--samples", type=int, default=50)
    ap.add_argument("--fit-samples", type=int, default=64)
    ap.add_argument("--ppl-tokens", type=int, default=4096)
    ap.add_argument("--ppl-window", type=int, default=1024)
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--data-dir", default=os.environ.get("DIETPRUNE_DATA_DIR"))
    ap.add_argument("--out", default=str(ROOT / "bench" / "results"))
    args = ap.parse_args(argv)
    torch.set_grad_enabled(False)

    lm = load(args.model)
    dense, tok = lm.model, lm.tokenizer
    ad = adapter_for(dense)
    pcfg = ProfileConfig(samples=args.samples, gram=True)
    t0 = time.perf_counter()
    examples = load_calibration(args.tasks, pcfg, args.data_dir)
    prof = run_profile(dense, tok, args.tasks, pcfg, data_dir=args.data_dir, examples=examples)
    print(f"profile {time.perf_counter() - t0:.0f}s", flush=True)
    d = dense.config.hidden_size
    vote = merge(prof.score_matrix(), args.sparsity, "vote", ad.width_multiple(dense.config))
    ppl_kw = dict(data_dir=args.data_dir, max_tokens=args.ppl_tokens, window=args.ppl_window)
    rows = [{"variant": "dense", "hidden": d, "ppl": perplexity(dense, tok, **ppl_kw)}]
    print(f"dense: ppl {rows[0]['ppl']:.2f}", flush=True)

    for name in [x.strip() for x in args.variants.split(",") if x.strip()]:
        t0 = time.perf_counter()
        row: dict = {"variant": name}
        v, _, ridge = name.partition(":")
        refit_ridge = float(ridge) if ridge else 1e-3
        if v.startswith("obs"):
            kept = obs_kept(dense, prof.norms, vote.k, rel="rel" in v, head=1.0 if "head" in v else 0.0)
        else:
            kept = vote.kept
        row["jaccard_with_vote"] = round(jaccard(kept, vote.kept), 3)
        m = copy.deepcopy(dense)
        a = adapter_for(m)
        fit = targets = weights = None
        refits = v.startswith("refit") or v.endswith("+refit")
        if refits:
            fit = fit_batch(m, tok, examples, args.fit_samples, 512, 0)
            if v != "refit-late":
                targets, weights = capture_norm_outputs(m, *fit, adapter=a), reader_weights(m, a)
        rms_correct_(m, kept, prof.norms, a)
        if v == "refit-late":
            targets, weights = capture_norm_outputs(m, *fit, adapter=a), reader_weights(m, a)
        if v == "vote+head" and a.tied(m):
            head = a.output_head(m)
            head.weight = nn.Parameter(head.weight.detach().clone())
            m.config.tie_word_embeddings = False
            row["extra_params"] = head.weight.shape[0] * len(kept)
        if not v.startswith("refit"):  # ls+refit too
            ls_compensate_(m, kept, prof.norms, 1e-2, a, energy=v == "energy")
        prune_hidden_(m, kept, a)
        if targets is not None:
            refit_readers_(m, weights, targets, *fit, ridge=refit_ridge, adapter=a)
            del targets
        row.update(hidden=len(kept), removed=len(complement(kept, d)), ppl=perplexity(m, tok, **ppl_kw),
                   seconds=round(time.perf_counter() - t0, 1))
        rows.append(row)
        print(f"{name}: ppl {row['ppl']:.2f} (jaccard with vote {row['jaccard_with_vote']}, {row['seconds']:.0f}s)",
              flush=True)
        del m

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    name = f"probe_repairs_{args.model.replace('/', '_')}"
    (out / f"{name}.json").write_text(json.dumps({"args": vars(args), "rows": rows}, indent=2))
    lines = [f"`python bench/probe_repairs.py --model {args.model} --sparsity {args.sparsity}` "
             f"(calibration {args.tasks} × {args.samples}; perplexity: first {args.ppl_tokens} WikiText-2 test tokens, "
             f"windows of {args.ppl_window})", "",
             "| variant | hidden | Jaccard with vote mask | extra params | ppl |", "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['variant']} | {r['hidden']} | {r.get('jaccard_with_vote', '')} | "
                     f"{r.get('extra_params', '')} | {r['ppl']:.2f} |")
    (out / f"{name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
