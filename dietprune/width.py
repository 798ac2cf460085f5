"""diet-width: DIET's vote on every width axis (hidden, MLP channels, attention heads), with the
split of the parameter budget between them chosen by measurement.

A *shape* is (hidden width k, KV groups g, query heads per group m, MLP channels c), the same in
every layer, because the stock configs of all six supported architectures hold one
``hidden_size``, one head count and one ``intermediate_size``. Pieces, each usable alone:

- ``count_params(model, adapter, shape)``: the exact parameter count of the cut model, from the
  adapter's map of which width every tensor dimension runs along;
- ``candidate_shapes``: for each hidden fraction and head option of a small grid, the channel
  count that meets the parameter target (within 1%), in closed form;
- ``select``: the vote on each axis (``merge.merge_k`` / ``merge_layers`` / ``merge_heads``);
- ``repair_``: RMS correction and least-squares fold for the hidden cut (``repair.py``), and the
  least-squares fold of removed ``down_proj`` / ``o_proj`` input features into the kept ones,
  affine (with the intercept into the bias) where the layer has a bias;
- ``cut_``: hidden surgery (``surgery.py``), then heads, then MLP channels;
- ``KLProbe``: the dense model's next-token distributions on held-out calibration examples (rows
  of each task's calib split that the scoring sample did not draw), and the KL divergence of a
  candidate from them. The method cuts every candidate on a copy and keeps the lowest KL.
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import asdict, dataclass

import torch
from torch import nn

from .adapters import ModelAdapter, adapter_for, get_module
from .errors import DietpruneError, UnreachableSparsity
from .merge import keep_count, merge_heads, merge_k, merge_layers
from .repair import complement, ls_compensate_, ls_fold, ls_map, parse_repair, rms_correct_, uses_energy
from .surgery import prune_hidden_

TOLERANCE = 0.01  # |achieved - target| parameter sparsity
MAX_CANDIDATES = 12


@dataclass(frozen=True)
class Shape:
    hidden: int  # residual width k
    groups: int  # KV heads g
    per_group: int  # query heads per KV head m
    channels: int  # MLP intermediate channels c

    @property
    def heads(self) -> int:
        return self.groups * self.per_group


def full_shape(model: nn.Module, adapter: ModelAdapter) -> Shape:
    heads, kv, _ = adapter.head_layout(model)
    return Shape(int(model.config.hidden_size), kv, heads // kv, int(getattr(model.config, adapter.intermediate_key)))


def count_params(model: nn.Module, adapter: ModelAdapter, shape: Shape) -> int:
    """Parameters of `model` cut to `shape` (tied weights once), without cutting anything."""
    _, _, hd = adapter.head_layout(model)
    sizes = {"hidden": shape.hidden, "q": shape.heads * hd, "kv": shape.groups * hd, "mlp": shape.channels}
    total = 0
    for name, p in model.named_parameters():
        n = 1
        for dim, axis in zip(p.shape, adapter.width_axes(name, p.dim())):
            n *= sizes[axis] if axis else dim
        total += n
    return total


def head_options(model: nn.Module, adapter: ModelAdapter, n: int = 3) -> list[tuple[int, int]]:
    """(groups, per_group) pairs, the full attention first, then the smallest cuts (most kept)."""
    _, kv, hd = adapter.head_layout(model)
    q = adapter.head_layout(model)[0] // kv
    d = model.config.hidden_size
    # attention parameters per layer ~ g*hd*(2d) for k/v + g*m*hd*(2d) for q/o
    opts = sorted(((g, m) for g in range(1, kv + 1) for m in range(1, q + 1)),
                  key=lambda gm: (-(gm[0] * gm[1] * 2 + gm[0] * 2) * hd * d, -gm[0]))
    return opts[:n]


def hidden_width(d: int, fraction: float, heads: int, align: int) -> int:
    """The residual width for a hidden sparsity, a multiple of lcm(align, heads) (stock configs of
    Llama and Gemma reject hidden_size % num_attention_heads != 0)."""
    mult = math.lcm(align, heads)
    k = int(round(keep_count(d, fraction) / mult)) * mult
    while k > d:
        k -= mult
    if k < mult:
        raise DietpruneError(f"hidden width {d} cannot hold a multiple of {mult}")
    return k


def solve_channels(model: nn.Module, adapter: ModelAdapter, hidden: int, groups: int, per_group: int,
                   target: float, align: int = 1) -> Shape:
    """The MLP channel count whose parameter count is nearest `target` (clamped to [1, I]), a
    multiple of `align` unless that would remove every channel or exceed I (then I itself)."""
    full = full_shape(model, adapter)
    p0 = count_params(model, adapter, Shape(hidden, groups, per_group, 0))
    slope = count_params(model, adapter, Shape(hidden, groups, per_group, 1)) - p0
    c = (target - p0) / slope if slope > 0 else full.channels
    if align > 1:
        c = int(round(c / align)) * align
        c = full.channels if c >= full.channels else max(align, c)
    return Shape(hidden, groups, per_group, max(1, min(full.channels, int(round(c)))))


def candidate_shapes(model: nn.Module, adapter: ModelAdapter, sparsity: float, align: int = 1,
                     max_candidates: int = MAX_CANDIDATES, tolerance: float = TOLERANCE,
                     fractions: tuple[float, ...] | None = None) -> list[Shape]:
    """The grid: hidden-only (DIET's cut) first, then hidden fractions 0, s/4, s/2, 3s/4 of the
    target times the head options; MLP channels fill the rest of the budget. Shapes that miss the
    target by more than `tolerance` are dropped; duplicates are dropped."""
    total = count_params(model, adapter, full_shape(model, adapter))
    target = (1.0 - sparsity) * total
    full = full_shape(model, adapter)
    d = full.hidden
    out: list[Shape] = []
    if fractions is None:
        fractions = (sparsity, 0.0, sparsity / 4, sparsity / 2, 3 * sparsity / 4)
    for frac in fractions:
        for g, m in head_options(model, adapter):
            k = hidden_width(d, frac, g * m, align)
            shape = solve_channels(model, adapter, k, g, m, target, align)
            achieved = 1.0 - count_params(model, adapter, shape) / total
            if abs(achieved - sparsity) <= tolerance and shape not in out:
                out.append(shape)
    return out[:max_candidates]


# ---- selection (the vote on every axis) ----------------------------------------------------

@dataclass
class WidthSelection:
    hidden: torch.Tensor  # sorted kept hidden dimensions
    groups: list[torch.Tensor]  # per layer: sorted kept KV groups
    heads: list[torch.Tensor]  # per layer: kept query heads, group by group
    channels: list[torch.Tensor]  # per layer: sorted kept MLP channels


def select(profile, shape: Shape, full: Shape, method: str = "vote") -> WidthSelection:
    """Each task's top-k on each axis, merged by votes (ties as DIET breaks them), per layer."""
    w = profile.widths
    if w is None:
        raise DietpruneError("the profile has no width statistics: profile with widths=True (--widths)")
    hidden = merge_k(profile.score_matrix(), shape.hidden, method).kept
    layers = w.mlp_matrix().shape[1]
    channels = [r.kept for r in merge_layers(w.mlp_matrix(), shape.channels, method)]
    heads_m = w.head_matrix()
    groups, heads = [], []
    for layer in range(layers):
        g, h = merge_heads(heads_m[:, layer], shape.groups, shape.per_group, full.groups, method)
        groups.append(g)
        heads.append(h)
    return WidthSelection(hidden, groups, heads, channels)


# ---- repair -----------------------------------------------------------------------------

def feature_rows(units: torch.Tensor, size: int) -> torch.Tensor:
    """Feature indices of whole units (heads of `size` features each), in unit order."""
    units = torch.as_tensor(units, dtype=torch.long)
    return (units[:, None] * size + torch.arange(size)[None, :]).reshape(-1)


@torch.no_grad()
def fold_inputs_(lin: nn.Linear, s: torch.Tensor, gram: torch.Tensor, count: int, kept: torch.Tensor,
                 ridge: float) -> None:
    """Fold the ridge least-squares prediction of the removed input features from the kept ones
    into the kept columns: W_K ← W_K + W_R A. With a bias the prediction is affine,
    x_R ≈ A x_K + b from the centred second moments, and W_R b goes into the bias."""
    n = lin.in_features
    kept = torch.as_tensor(kept, dtype=torch.long)
    removed = complement(kept, n)
    if len(removed) == 0:
        return
    if lin.bias is not None:
        mean = s.double() / max(count, 1)
        second = gram.double() / max(count, 1) - torch.outer(mean, mean)
        a = ls_map(second, kept, removed, ridge)
        b = mean[removed] - a @ mean[kept]
        lin.bias.data += (lin.weight.data.double()[:, removed] @ b).to(lin.bias.dtype)
    else:
        a = ls_map(gram, kept, removed, ridge)
    lin.weight.data.copy_(ls_fold(lin.weight.data, a, kept, removed))


@torch.no_grad()
def fold_widths_(model: nn.Module, adapter: ModelAdapter, sel: WidthSelection, widths, ridge: float) -> None:
    """The least-squares fold of removed MLP channels (into down_proj) and heads (into o_proj)."""
    if widths.mlp is None or widths.attn is None:
        raise DietpruneError("the width statistics have no moments, which the least-squares fold needs: "
                             "profile with --gram --widths")
    hd = widths.head_dim
    for i, block in enumerate(adapter.blocks(model)):
        fold_inputs_(get_module(block, adapter.mlp_out), widths.mlp.s[i], widths.mlp.gram[i], widths.mlp.count,
                     sel.channels[i], ridge)
        fold_inputs_(get_module(block, adapter.o_proj), widths.attn.s[i], widths.attn.gram[i], widths.attn.count,
                     feature_rows(sel.heads[i], hd), ridge)


@torch.no_grad()
def repair_(model: nn.Module, adapter: ModelAdapter, sel: WidthSelection, profile, repair: str,
            ridge: float) -> dict:
    """Every repair the full model gets before the cut (weights only; shapes unchanged)."""
    use_rms, use_ls = parse_repair(repair)
    info = {}
    if use_rms:
        info["rms_factors"] = rms_correct_(model, sel.hidden, profile.norms, adapter)
    if use_ls:
        ls_compensate_(model, sel.hidden, profile.norms, ridge, adapter, energy=uses_energy(repair))
        fold_widths_(model, adapter, sel, profile.widths, ridge)
    return info


# ---- surgery ------------------------------------------------------------------------------

@torch.no_grad()
def prune_heads_(model: nn.Module, adapter: ModelAdapter, groups: list[torch.Tensor],
                 heads: list[torch.Tensor]) -> nn.Module:
    """Keep KV heads `groups[i]` and query heads `heads[i]` (the same m inside each kept group,
    group by group) in layer i: q rows, k/v rows, o columns; config head counts; head_dim explicit."""
    from .baselines.slicing import keep_features_

    n_heads, kv, hd = adapter.head_layout(model)
    q = n_heads // kv
    blocks = adapter.blocks(model)
    if len(groups) != len(blocks) or len(heads) != len(blocks):
        raise DietpruneError("one list of kept heads per layer")
    g = len(groups[0])
    if g == 0 or len(heads[0]) % g:
        raise DietpruneError("every kept KV group keeps the same, non-zero number of query heads")
    m = len(heads[0]) // g
    for block, gs, hs in zip(blocks, groups, heads):
        gs = torch.as_tensor(gs, dtype=torch.long)
        hs = torch.as_tensor(hs, dtype=torch.long)
        if len(gs) != g or len(hs) != g * m or len(torch.unique(gs)) != g or gs.min() < 0 or gs.max() >= kv:
            raise DietpruneError(f"KV heads must be {g} unique indices within [0, {kv}) in every layer")
        if not torch.equal(hs // q, gs.repeat_interleave(m)) or len(torch.unique(hs)) != len(hs):
            raise DietpruneError("query heads must be listed group by group, m of each kept KV group")
        q_rows, kv_rows = feature_rows(hs, hd), feature_rows(gs, hd)
        keep_features_(get_module(block, adapter.q_proj), q_rows, "out")
        keep_features_(get_module(block, adapter.k_proj), kv_rows, "out")
        keep_features_(get_module(block, adapter.v_proj), kv_rows, "out")
        keep_features_(get_module(block, adapter.o_proj), q_rows, "in")
        attn = get_module(block, adapter.attention)
        for attr, value in (("num_heads", g * m), ("num_attention_heads", g * m), ("num_key_value_heads", g),
                            ("num_key_value_groups", m)):
            if isinstance(getattr(attn, attr, None), int):
                setattr(attn, attr, value)
    setattr(model.config, adapter.heads_key, g * m)
    setattr(model.config, adapter.kv_heads_key, g)
    model.config.head_dim = hd
    return model


@torch.no_grad()
def cut_(model: nn.Module, adapter: ModelAdapter, sel: WidthSelection) -> nn.Module:
    """Hidden, then heads, then MLP channels (each a no-op where everything is kept)."""
    from .baselines.channels import prune_mlp_channels_

    full = full_shape(model, adapter)
    if len(sel.hidden) != full.hidden:
        prune_hidden_(model, sel.hidden, adapter)
    if len(sel.heads[0]) != full.heads:
        prune_heads_(model, adapter, sel.groups, sel.heads)
    if len(sel.channels[0]) != full.channels:
        prune_mlp_channels_(model, adapter, sel.channels)
    return model


def apply_shape_(model: nn.Module, adapter: ModelAdapter, profile, shape: Shape, repair: str, ridge: float,
                 merge: str = "vote") -> tuple[WidthSelection, dict]:
    """Select, repair and cut `model` in place to `shape`."""
    sel = select(profile, shape, full_shape(model, adapter), merge)
    info = repair_(model, adapter, sel, profile, repair, ridge)
    cut_(model, adapter, sel)
    return sel, info


# ---- the measurement that picks the split ------------------------------------------------------

class KLProbe:
    """The dense model's next-token log-probabilities on held-out token sequences (float16 on
    the CPU), and ``kl(model)``: the mean over those tokens of KL(dense ‖ model)."""

    def __init__(self, model: nn.Module, sequences: list[list[int]], pad_id: int, batch_size: int = 8):
        from .encoding import batches

        if not sequences:
            raise DietpruneError("no held-out calibration tokens to compare candidates on: lower --samples "
                                 "or add tasks with more calibration rows")
        self.device = next(model.parameters()).device
        self.batches = []
        self.tokens = 0
        with torch.no_grad():
            for ids, attn in batches(sequences, batch_size, pad_id):
                logp = self._logp(model, ids, attn)
                self.batches.append((ids, attn, logp.clamp_min(-60000.0).to(torch.float16).cpu()))
                self.tokens += logp.shape[0]

    def _logp(self, model, ids, attn) -> torch.Tensor:
        out = model(input_ids=ids.to(self.device), attention_mask=attn.to(self.device), use_cache=False)
        mask = attn.bool().to(self.device)
        return torch.log_softmax(out.logits[mask].float(), dim=-1)

    @torch.no_grad()
    def kl(self, model: nn.Module) -> float:
        total = 0.0
        for ids, attn, dense in self.batches:
            p_log = dense.float().to(self.device)
            q_log = self._logp(model, ids, attn)
            total += float((p_log.exp() * (p_log - q_log)).sum())
        return total / max(self.tokens, 1)


def heldout_sequences(model, tokenizer, tasks, samples: int, seed: int, data_dir, per_task: int,
                      max_tokens: int, max_length: int) -> tuple[list[list[int]], dict]:
    """Token ids of calibration rows the scoring sample did not draw, `per_task` per task, at most
    `max_tokens` in all (taken round-robin over tasks so every task with rows left is represented)."""
    from .data import heldout_examples
    from .encoding import calibration_ids, wants_bos
    from .tasks import parse_tasks

    per = {}
    for task in parse_tasks(tasks):
        ex = heldout_examples(task, samples, seed, per_task, data_dir)
        per[task.name] = [s for s in calibration_ids(tokenizer, ex, wants_bos(model), max_length) if len(s) > 1]
    out, used, tokens = [], {t: 0 for t in per}, 0
    while tokens < max_tokens and any(used[t] < len(per[t]) for t in per):
        for t in per:
            if used[t] < len(per[t]) and tokens < max_tokens:
                seq = per[t][used[t]][: max(2, max_tokens - tokens)]
                out.append(seq)
                used[t] += 1
                tokens += len(seq)
    return out, {"sequences": used, "tokens": tokens}


def choose_shape(model: nn.Module, adapter: ModelAdapter, profile, shapes: list[Shape], probe: KLProbe,
                 repair: str, ridge: float, merge: str = "vote") -> tuple[Shape, list[dict]]:
    """Cut + repair every candidate on a copy; the one with the lowest KL from the dense model."""
    total = count_params(model, adapter, full_shape(model, adapter))
    rows = []
    for shape in shapes:
        t0 = time.perf_counter()
        trial = copy.deepcopy(model)
        apply_shape_(trial, adapter, profile, shape, repair, ridge, merge)
        kl = probe.kl(trial)
        params = count_params(model, adapter, shape)
        rows.append({**asdict(shape), "heads": shape.heads, "params": params, "sparsity": 1 - params / total,
                     "kl": kl, "seconds": round(time.perf_counter() - t0, 2)})
        del trial
    if not rows:
        raise DietpruneError("no candidate split to measure")
    best = min(range(len(rows)), key=lambda i: (not math.isfinite(rows[i]["kl"]), rows[i]["kl"], i))
    return shapes[best], rows


def describe(model: nn.Module, adapter: ModelAdapter, shape: Shape) -> dict:
    """The split of the removed parameters between the axes (removing one axis at a time from the
    full model; the remainder is the overlap, e.g. hidden x MLP entries counted in both)."""
    full = full_shape(model, adapter)
    total = count_params(model, adapter, full)

    def removed(s: Shape) -> float:
        return (total - count_params(model, adapter, s)) / total

    return {"hidden": removed(Shape(shape.hidden, full.groups, full.per_group, full.channels)),
            "heads": removed(Shape(full.hidden, shape.groups, shape.per_group, full.channels)),
            "mlp": removed(Shape(full.hidden, full.groups, full.per_group, shape.channels)),
            "total": removed(shape)}


# ---- the registered method --------------------------------------------------------------------

from .registry import MethodContext, PruneConfig, Selection  # noqa: E402

KL_TOKENS = 2048  # held-out tokens the candidates are compared on
KL_PER_TASK = 16  # held-out calibration examples per task at most


@torch.no_grad()
def diet_width(model, config: PruneConfig, ctx: MethodContext) -> Selection:
    """DIET's vote on hidden dimensions, MLP channels and attention heads; the split of the budget
    between them is the grid candidate with the lowest KL from the dense model on held-out
    calibration tokens. ``config.sparsity`` is the fraction of parameters removed (within 1%).

    ``config.extra`` may set ``kl_tokens``, ``kl_per_task`` and ``fractions`` (hidden
    sparsities of the grid, default the target, 0, 1/4, 1/2 and 3/4 of it)."""
    from .repair import uses_refit

    if uses_refit(config.repair):
        raise DietpruneError("diet-width repairs with rms/ls only (the re-fit does not follow head/channel cuts)")
    adapter = adapter_for(model)
    prof = ctx.profile
    if prof is None or prof.widths is None:
        raise DietpruneError("diet-width needs a profile with width statistics (profile with --widths)")
    full = full_shape(model, adapter)
    t0 = time.perf_counter()
    if config.sparsity == 0:
        shapes = [full]
    else:
        fr = config.extra.get("fractions")
        shapes = candidate_shapes(model, adapter, config.sparsity, config.align,
                                  fractions=tuple(float(x) for x in fr) if fr else None)
    if not shapes:
        raise UnreachableSparsity(f"diet-width cannot reach {config.sparsity:.1%} parameter sparsity within 1% "
                                  "on this model with its grid of splits", method="diet-width",
                                  sparsity=config.sparsity, reachable=(0.0, None))
    probe_info = {}
    if len(shapes) > 1:
        seqs, probe_info = heldout_sequences(model, ctx.tokenizer, config.tasks, config.samples, config.seed,
                                             ctx.data_dir, int(config.extra.get("kl_per_task", KL_PER_TASK)),
                                             int(config.extra.get("kl_tokens", KL_TOKENS)), config.max_length)
        pad = ctx.tokenizer.pad_token_id if ctx.tokenizer.pad_token_id is not None else 0
        probe = KLProbe(model, seqs, pad, config.batch_size)
        best, rows = choose_shape(model, adapter, prof, shapes, probe, config.repair, config.ridge, config.merge)
    else:
        best = shapes[0]
        total = count_params(model, adapter, full)
        rows = [{**asdict(best), "heads": best.heads, "params": count_params(model, adapter, best),
                 "sparsity": 1 - count_params(model, adapter, best) / total, "kl": None}]
    sel = select(prof, best, full, config.merge)
    info = {"structure": "hidden+heads+mlp-channels", "shape_before": {**asdict(full), "heads": full.heads},
            "shape_after": {**asdict(best), "heads": best.heads}, "split": describe(model, adapter, best),
            "target_sparsity": config.sparsity, "candidates": rows,
            "chosen": shapes.index(best), "kl_probe": probe_info, "merge": config.merge,
            "per_layer_widths": "uniform: stock configs hold one hidden size, head count and MLP width",
            "search_seconds": round(time.perf_counter() - t0, 2), "task_order": list(prof.tasks)}

    def apply(net):
        info["repair"] = {k: v for k, v in repair_(net, adapter, sel, prof, config.repair, config.ridge).items()}
        return cut_(net, adapter, sel)

    tensors = {"kept_hidden": sel.hidden.to(torch.int64), "kept_channels": torch.stack(sel.channels),
               "kept_heads": torch.stack(sel.heads), "kept_groups": torch.stack(sel.groups),
               "scores": prof.score_matrix().float()}
    return Selection(None, tensors, info, apply=apply)
