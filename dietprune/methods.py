"""The hidden-dimension methods: DIET and its merges, random, magnitude.

Their specs and configs live in ``dietprune.registry`` (which imports nothing from here); each
function maps (model, config, context) to the sorted indices of the hidden dimensions to keep,
and the shared cut (``repair.CutPlan``, ``surgery``) does the rest.
"""

from __future__ import annotations

import math

import torch

from .errors import DietpruneError
from .merge import keep_count, merge_k
from .registry import METHODS, MethodContext, PruneConfig, Selection, register  # noqa: F401 (re-exported)


def width_align(model, config: PruneConfig) -> int:
    """The kept width is a multiple of this: the user's --align and the architecture's head count."""
    from .adapters import adapter_for
    from .validate import align_within

    multiple = math.lcm(config.align, adapter_for(model).width_multiple(model.config))
    d = model.config.hidden_size
    if multiple > d:
        if config.align > d:
            align_within(config.align, d)
        raise DietpruneError(f"align {config.align} with the model's {adapter_for(model).width_multiple(model.config)} "
                             f"attention heads needs a multiple of {multiple} dimensions, more than its hidden "
                             f"size {d}")
    return multiple


def target_width(model, config: PruneConfig) -> int:
    """The kept hidden width: the multiple of `width_align` whose cut removes the parameter fraction
    nearest `config.sparsity` (or `keep_count` of `config.hidden_sparsity`, the hidden fraction)."""
    align = width_align(model, config)
    if getattr(config, "hidden_sparsity", None) is not None:
        return keep_count(model.config.hidden_size, config.hidden_sparsity, align)
    return width_for_params(model, config.sparsity, align)


def width_for_params(model, sparsity: float, align: int = 1) -> int:
    """The multiple of `align` (at least `align`, at most the hidden size) whose hidden-only cut removes
    the parameter fraction nearest `sparsity`; ties keep the wider. Counts shapes, cuts nothing (works
    on a meta skeleton)."""
    from .adapters import adapter_for
    from .width import Shape, count_params, full_shape

    adapter = adapter_for(model)
    full = full_shape(model, adapter)
    total = count_params(model, adapter, full)

    def removed(k: int) -> float:
        return 1.0 - count_params(model, adapter, Shape(k, full.groups, full.per_group, full.channels)) / total

    d = full.hidden
    p0 = total * (1.0 - removed(0))  # parameters are linear in the width: p0 + k * (total - p0) / d
    k_real = ((1.0 - sparsity) * total - p0) * d / (total - p0)
    near = {max(align, min(d // align * align, int(math.floor(k_real / align) + j) * align)) for j in (0, 1)}
    return min(sorted(near, reverse=True), key=lambda k: abs(removed(k) - sparsity))


def _merged(model, ctx: MethodContext, config: PruneConfig, how: str) -> Selection:
    profile = ctx.profile
    scores = profile.score_matrix()
    result = merge_k(scores, target_width(model, config), how)
    tensors = {"votes": result.votes.to(torch.int32), "task_masks": result.task_masks.to(torch.uint8),
               "scores": scores.float()}
    return Selection(result.kept, tensors, {"merge": how, "task_order": list(profile.tasks)})


def diet(model, config: PruneConfig, ctx: MethodContext) -> Selection:
    """DIET: per-task top-k by mean |activation|, merged by majority vote (or config.merge)."""
    return _merged(model, ctx, config, config.merge)


def diet_mean(model, config: PruneConfig, ctx: MethodContext) -> Selection:
    return _merged(model, ctx, config, "mean")


def diet_rank(model, config: PruneConfig, ctx: MethodContext) -> Selection:
    return _merged(model, ctx, config, "rank")


def random_dims(model, config: PruneConfig, ctx: MethodContext) -> Selection:
    d = model.config.hidden_size
    k = target_width(model, config)
    g = torch.Generator().manual_seed(config.seed)
    return Selection(torch.sort(torch.randperm(d, generator=g)[:k]).values)


@torch.no_grad()
def magnitude(model, config: PruneConfig, ctx: MethodContext) -> Selection:
    """Hidden dimensions by the L2 norm of every weight slice that touches them (block by block: streamable)."""
    from .adapters import adapter_for, get_module
    from .engine import RESIDENT, each_block
    from .merge import order_by

    adapter = adapter_for(model)
    source = (ctx.source if ctx is not None else None) or RESIDENT
    d = model.config.hidden_size
    sq = torch.zeros(d, dtype=torch.float64)  # the sums stay on the CPU; each term is computed on its weight's device

    def add(w: torch.Tensor, dim: int) -> None:
        sq.add_(w.double().pow(2).sum(dim).cpu())

    outer = [(adapter.embed, adapter.embedding(model))]
    if not adapter.tied(model):
        outer.append((adapter.lm_head, adapter.output_head(model)))
    for path, module in outer:
        source.onload(model, path, module)
        try:
            add(module.weight, 0)
        finally:
            source.offload(model, path, module)
    for _, block in each_block(model, source):
        for name in adapter.readers:
            add(get_module(block, name).weight, 0)
        for name in adapter.writers:
            add(get_module(block, name).weight, 1)
    kept = torch.sort(order_by(sq.sqrt())[:target_width(model, config)]).values
    return Selection(kept, {"weight_norm": sq.sqrt().float()})
