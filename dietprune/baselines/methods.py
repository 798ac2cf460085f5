"""The structured baselines (their specs and configs are in ``dietprune.registry``, beside DIET's).

- ``agnostic``: DIET's activation score on general text (wikitext2 calib.jsonl) instead of the
  task data; hidden dimensions, merged and repaired as DIET does (repairs use the wikitext2
  statistics, so no task data is seen at all).
- ``wanda-sp``: KV groups and MLP channels scored by |W|·‖X‖ on the task calibration data,
  the same pruning ratio for heads and channels in every layer.
- ``flap``: fluctuation metric, standardised so attention and MLP compete globally for the
  budget, mean-output bias compensation where the stock config has a bias switch.
- ``shortgpt``: whole decoder layers removed by lowest Block Influence.

``config.sparsity`` is the fraction of the model's parameters to remove, as the saved
checkpoint counts them (embeddings included, which these structures never cut). Head and
channel methods land within 1% of it or refuse; ``shortgpt`` removes the number of layers
whose parameter fraction is nearest and reports what it achieved.

Stock configs hold one head count and one MLP width for every layer, and the supported
architectures' modelling code does not read transformers' ``per_layer_config``, so every cut
here keeps widths uniform across layers: FLAP's adaptive structure decides only how the
budget splits between attention and MLP, not a width per layer.
"""

from __future__ import annotations

import torch

from ..adapters import adapter_for, get_module, param_count
from ..engine import RESIDENT
from ..merge import merge_k, order_by
from ..methods import target_width
from ..registry import MethodContext, PruneConfig, Selection
from ..repair import parse_repair
from . import scores as S
from .bias import add_to_bias_, enable_bias_
from .calib import block_cosine_sums, linear_input_moments, task_sequences
from .channels import prune_mlp_channels_
from .heads import group_rows, prune_kv_groups_
from .layers import drop_layers_
from .plan import budget_for, choose, legal_group_counts

GENERAL_TEXT = "wikitext2"
NO_REPAIR = "none: DIET's hidden-dimension repairs do not apply to this structure"


def _noop(model):
    return model


def _unchanged(method: str) -> Selection:
    """Zero sparsity: nothing to score, the model is returned as it is."""
    return Selection(None, info={"structure": method, "note": "sparsity 0: model unchanged"}, apply=_noop)


def _calibration_info(config: PruneConfig, sequences, tokens: int) -> dict:
    return {"tasks": list(config.tasks), "samples_per_task": config.samples, "sequences": len(sequences),
            "tokens": tokens, "seed": config.seed}


def agnostic(model, config: PruneConfig, ctx: MethodContext) -> Selection:
    """DIET's score and merge, profiled on wikitext2 text rather than on the tasks."""
    from ..profile import ProfileConfig, profile

    _, use_ls = parse_repair(config.repair)
    pcfg = ProfileConfig.of(config, gram=use_ls)
    source = ctx.source or RESIDENT
    prof = profile(model, ctx.tokenizer, [GENERAL_TEXT], pcfg, data_dir=ctx.data_dir, source=source,
                   fingerprint=source.fingerprint(model) if source.streamed else None)
    scores = prof.score_matrix()
    result = merge_k(scores, target_width(model, config), config.merge)
    tensors = {"votes": result.votes.to(torch.int32), "scores": scores.float()}
    info = {"merge": config.merge, "calibration": GENERAL_TEXT, "profile": prof.meta}
    return Selection(result.kept, tensors, info, repair_profile=prof)


def _layer_weights(block, adapter):
    q, k, v, o = (get_module(block, n).weight for n in (adapter.q_proj, adapter.k_proj, adapter.v_proj,
                                                         adapter.o_proj))
    return q, k, v, o, [get_module(block, n).weight for n in adapter.mlp_in], get_module(block, adapter.mlp_out).weight


def _cut(adapter, kept_groups, kept_channels):
    def apply(net):
        prune_kv_groups_(net, adapter, kept_groups)
        prune_mlp_channels_(net, adapter, kept_channels)
        return net

    return apply


@torch.no_grad()
def wanda_sp(model, config: PruneConfig, ctx: MethodContext) -> Selection:
    """KV groups and MLP channels by Σ|W|·‖X‖ over each unit's weights, one ratio for all layers.

    A group's score sums its q/k/v rows (input: the attention norm's output) and its o_proj
    columns (input: the attention output); a channel's, its gate/up rows and down_proj column.
    ‖X_j‖ is the root mean square of input feature j over the pooled task calibration tokens.
    The group count is the legal one (stock configs may require hidden_size % heads == 0) whose
    pruning ratio is nearest the channels' ratio among those meeting the parameter target.
    """
    if config.sparsity == 0:
        return _unchanged("wanda-sp")
    adapter = adapter_for(model)
    budget = budget_for(model, adapter)
    legal = legal_group_counts(budget, adapter.heads_divide_hidden)
    G, C = budget.groups, budget.channels
    choice = choose(budget, config.sparsity, legal, method="wanda-sp",
                    key=lambda ch: abs((G - ch.groups) / G - (C - ch.channels) / C))
    seqs = task_sequences(model, ctx.tokenizer, config, ctx.data_dir)
    # q/k/v read one input, as do the MLP's input projections: hook the first of each.
    names = (adapter.q_proj, adapter.o_proj, adapter.mlp_in[0], adapter.mlp_out)
    group_scores, channel_scores = [], []

    def score(block, i, moms):  # while the block's weights are loaded (a streamed model has them only now)
        q, k, v, o, ins, down = _layer_weights(block, adapter)
        # statistics to the weights' device, scores back to the CPU
        norm = {n: S.rms_from_sums(moms[n].sq, moms[n].count).to(q.device) for n in names}
        group_scores.append(S.wanda_group_scores(q, k, v, o, norm[adapter.q_proj], norm[adapter.o_proj], G).cpu())
        channel_scores.append(S.wanda_channel_scores(ins, down, norm[adapter.mlp_in[0]],
                                                     norm[adapter.mlp_out]).cpu())

    moms = linear_input_moments(model, adapter, ctx.tokenizer, seqs, config, names, "wanda-sp", source=ctx.source,
                                on_block=score)
    kept_g = [S.keep_top(s, choice.groups) for s in group_scores]
    kept_c = [S.keep_top(s, choice.channels) for s in channel_scores]
    tensors = {"group_scores": torch.stack(group_scores).float(), "channel_scores": torch.stack(channel_scores).float(),
               "kept_groups": torch.stack(kept_g), "kept_channels": torch.stack(kept_c)}
    info = {"structure": "kv-groups+mlp-channels", "kv_groups_per_layer": [G, choice.groups],
            "channels_per_layer": [C, choice.channels], "target_sparsity": config.sparsity,
            "planned_sparsity": choice.sparsity, "per_layer_widths": "uniform",
            "calibration": _calibration_info(config, seqs, moms[adapter.q_proj][0].count), "repair": NO_REPAIR}
    return Selection(None, tensors, info, apply=_cut(adapter, kept_g, kept_c))


def global_attention_share(attn_z: torch.Tensor, mlp_z: torch.Tensor, group_cost: int, channel_cost: int,
                           to_remove: float) -> float:
    """Remove the lowest standardised units across all layers and both kinds until `to_remove`
    parameters are gone; the fraction of those parameters that were attention."""
    z = torch.cat([attn_z.reshape(-1), mlp_z.reshape(-1)])
    cost = torch.cat([torch.full((attn_z.numel(),), float(group_cost), dtype=torch.float64),
                      torch.full((mlp_z.numel(),), float(channel_cost), dtype=torch.float64)])
    order = order_by(-z)  # ascending score, ties by index
    cum = torch.cumsum(cost[order], 0)
    n = int(torch.searchsorted(cum, torch.tensor(float(to_remove), dtype=torch.float64))) + 1
    taken = order[: min(n, len(order))]
    removed = cost[taken]
    attn = removed[taken < attn_z.numel()].sum()
    return float(attn / removed.sum()) if removed.sum() > 0 else 0.0


@torch.no_grad()
def flap(model, config: PruneConfig, ctx: MethodContext) -> Selection:
    """FLAP: fluctuation metric, global attention-vs-MLP competition, bias compensation.

    Metric of input feature j of o_proj / down_proj: Var(x_j) over calibration tokens times
    ‖W[:, j]‖²; a KV group sums its features. Scores are standardised per kind (attention
    groups, MLP channels) over all layers, then the lowest units across everything are removed
    until the parameter target is met; the attention share of that global choice sets how
    many groups vs channels every layer loses (widths stay uniform: see the module docstring).
    Compensation: the removed features' mean contribution W[:, R]·E[x_R] goes into the o_proj
    (down_proj) bias, switched on through the config's ``attention_bias`` (``mlp_bias``). Where
    the architecture has no such switch (Mistral; Qwen2 attention; the MLP of everything but
    Llama) that part is skipped and the metadata says so.
    """
    if config.sparsity == 0:
        return _unchanged("flap")
    adapter = adapter_for(model)
    comp_attn = adapter.attention_bias_key is not None
    comp_mlp = adapter.mlp_bias_key is not None
    budget = budget_for(model, adapter, attention_bias=comp_attn, mlp_bias=comp_mlp)
    legal = legal_group_counts(budget, adapter.heads_divide_hidden)
    G, C = budget.groups, budget.channels
    choose(budget, config.sparsity, legal, key=lambda ch: 0.0, method="flap")  # refuse before calibrating
    seqs = task_sequences(model, ctx.tokenizer, config, ctx.data_dir)
    names = (adapter.o_proj, adapter.mlp_out)
    moms = linear_input_moments(model, adapter, ctx.tokenizer, seqs, config, names, "flap")
    group_scores, channel_scores = [], []
    for i, block in enumerate(adapter.blocks(model)):
        o, down = get_module(block, adapter.o_proj).weight, get_module(block, adapter.mlp_out).weight
        mo, md = moms[adapter.o_proj][i], moms[adapter.mlp_out][i]
        var_o = S.variance_from_sums(mo.sum, mo.sq, mo.count).to(o.device)
        var_d = S.variance_from_sums(md.sum, md.sq, md.count).to(down.device)
        group_scores.append(S.group_sums(S.fluctuation(var_o, o), G).cpu())
        channel_scores.append(S.fluctuation(var_d, down).cpu())
    attn_z, mlp_z = S.standardize(torch.stack(group_scores)), S.standardize(torch.stack(channel_scores))
    to_remove = budget.params(G, C) - (1.0 - config.sparsity) * budget.total
    share = global_attention_share(attn_z, mlp_z, budget.group_cost, budget.channel_cost, to_remove)

    def attn_share(ch):
        a = (G - ch.groups) * budget.group_cost
        m = (C - ch.channels) * budget.channel_cost
        return a / (a + m) if a + m > 0 else 0.0

    choice = choose(budget, config.sparsity, legal, key=lambda ch: abs(attn_share(ch) - share), method="flap")
    kept_g = [S.keep_top(s, choice.groups) for s in group_scores]
    kept_c = [S.keep_top(s, choice.channels) for s in channel_scores]
    rows = budget.q_per_kv * budget.head_dim
    deltas_o, deltas_d = [], []
    for i, block in enumerate(adapter.blocks(model)):
        o, down = get_module(block, adapter.o_proj).weight, get_module(block, adapter.mlp_out).weight
        mo, md = moms[adapter.o_proj][i], moms[adapter.mlp_out][i]
        keep_o = torch.zeros(o.shape[1], dtype=torch.bool)
        keep_o[group_rows(kept_g[i], rows)] = True
        keep_d = torch.zeros(down.shape[1], dtype=torch.bool)
        keep_d[kept_c[i]] = True
        deltas_o.append(S.compensation_bias(o, mo.sum / mo.count, (~keep_o).nonzero().flatten()))
        deltas_d.append(S.compensation_bias(down, md.sum / md.count, (~keep_d).nonzero().flatten()))

    def apply(net):
        prune_kv_groups_(net, adapter, kept_g)
        prune_mlp_channels_(net, adapter, kept_c)
        for kind, name, deltas in (("attention", adapter.o_proj, deltas_o), ("mlp", adapter.mlp_out, deltas_d)):
            if enable_bias_(net, adapter, kind):
                for block, delta in zip(adapter.blocks(net), deltas):
                    add_to_bias_(get_module(block, name), delta)
        return net

    tensors = {"group_scores": torch.stack(group_scores).float(), "channel_scores": torch.stack(channel_scores).float(),
               "kept_groups": torch.stack(kept_g), "kept_channels": torch.stack(kept_c)}
    info = {"structure": "kv-groups+mlp-channels", "kv_groups_per_layer": [G, choice.groups],
            "channels_per_layer": [C, choice.channels], "target_sparsity": config.sparsity,
            "planned_sparsity": choice.sparsity, "attention_share_global": share,
            "attention_share_uniform": attn_share(choice),
            "per_layer_widths": "uniform: stock configs hold one head count and MLP width for all layers",
            "bias_compensation": {
                "attention": adapter.attention_bias_key if comp_attn else "skipped: no attention bias option",
                "mlp": adapter.mlp_bias_key if comp_mlp else "skipped: no MLP bias option"},
            "calibration": _calibration_info(config, seqs, moms[adapter.o_proj][0].count), "repair": NO_REPAIR}
    return Selection(None, tensors, info, apply=apply)


def layers_to_remove(influence: torch.Tensor, block_params: list[int], total: int, sparsity: float) -> list[int]:
    """Lowest-influence layers first; the count whose removed parameter fraction is nearest `sparsity`
    (ties: fewer layers). At least one layer stays."""
    order = order_by(-influence.double()).tolist()  # ascending influence, ties by index
    best_n, best_err = 0, abs(sparsity)
    removed = 0
    for n in range(1, len(order)):
        removed += block_params[order[n - 1]]
        err = abs(removed / total - sparsity)
        if err < best_err - 1e-12:
            best_n, best_err = n, err
    return sorted(order[:best_n])


@torch.no_grad()
def shortgpt(model, config: PruneConfig, ctx: MethodContext) -> Selection:
    """ShortGPT: remove the decoder layers with the lowest Block Influence (1 − mean cos(in, out))."""
    if config.sparsity == 0:
        return _unchanged("shortgpt")
    adapter = adapter_for(model)
    blocks = adapter.blocks(model)
    block_params = [sum(p.numel() for p in b.parameters()) for b in blocks]
    total = param_count(model)
    seqs = task_sequences(model, ctx.tokenizer, config, ctx.data_dir)
    sums, count = block_cosine_sums(model, adapter, ctx.tokenizer, seqs, config, source=ctx.source)
    influence = S.block_influence(sums, count)
    removed = layers_to_remove(influence, block_params, total, config.sparsity)
    achieved = sum(block_params[i] for i in removed) / total
    info = {"structure": "layers", "removed_layers": removed, "layers": [len(blocks), len(blocks) - len(removed)],
            "target_sparsity": config.sparsity, "planned_sparsity": achieved,
            "block_influence": [round(float(x), 6) for x in influence],
            "calibration": _calibration_info(config, seqs, count), "repair": NO_REPAIR}

    def apply(net):
        return drop_layers_(net, adapter, removed)

    return Selection(None, {"block_influence": influence.float()}, info, apply=apply)
