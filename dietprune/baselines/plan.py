"""Parameter budgets: how many KV groups and MLP channels per layer meet a sparsity target.

A stock config has one head count and one MLP width for all layers, so a structured cut that
must reload without custom code keeps the same number of KV groups ``g`` and channels ``c`` in
every layer. The parameter count of the result is then exactly linear in ``g`` and ``c``:

    params(g, c) = fixed + layers · (g · group_cost + c · channel_cost)

where the costs count every weight and bias entry that goes with one group or one channel,
including biases a method is about to add (FLAP's compensation). For each legal ``g`` the
channel count that lands nearest the target follows in closed form; a method then picks among
the candidates within tolerance by its own rule.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from torch import nn

from ..adapters import ModelAdapter, get_module, param_count
from ..errors import DietpruneError, UnreachableSparsity

TOLERANCE = 0.01  # |achieved sparsity - target sparsity|, as a fraction of the original parameters


@dataclass(frozen=True)
class Budget:
    layers: int
    groups: int  # KV groups per layer
    q_per_kv: int
    head_dim: int
    channels: int  # MLP channels per layer
    hidden: int
    group_cost: int
    channel_cost: int
    fixed: int  # parameters no group or channel owns (embeddings, norms, added o/down biases)
    total: int  # parameters of the model as given (sparsity is measured against this)

    def params(self, g: int, c: int) -> int:
        return self.fixed + self.layers * (g * self.group_cost + c * self.channel_cost)

    def sparsity(self, g: int, c: int) -> float:
        return 1.0 - self.params(g, c) / self.total


def _bias(lin: nn.Linear, forced: bool) -> int:
    return 1 if (lin.bias is not None or forced) else 0


def budget_for(model: nn.Module, adapter: ModelAdapter, attention_bias: bool = False,
               mlp_bias: bool = False) -> Budget:
    """Costs read from the model's own shapes; `*_bias`: count biases a method will add."""
    cfg = model.config
    blocks = adapter.blocks(model)
    block = blocks[0]
    heads, kv = int(getattr(cfg, adapter.heads_key)), int(getattr(cfg, adapter.kv_heads_key))
    if heads % kv:
        raise DietpruneError(f"{heads} attention heads do not split into {kv} KV groups")
    q, k, v, o = (get_module(block, n) for n in (adapter.q_proj, adapter.k_proj, adapter.v_proj, adapter.o_proj))
    head_dim = q.out_features // heads
    qpk = heads // kv
    group_cost = (qpk * head_dim * (q.in_features + _bias(q, attention_bias))
                  + head_dim * (k.in_features + _bias(k, attention_bias))
                  + head_dim * (v.in_features + _bias(v, attention_bias))
                  + o.out_features * qpk * head_dim)
    ins = [get_module(block, n) for n in adapter.mlp_in]
    down = get_module(block, adapter.mlp_out)
    channels = down.in_features
    channel_cost = sum(lin.in_features + _bias(lin, mlp_bias) for lin in ins) + down.out_features
    added = 0
    for b in blocks:
        if attention_bias:
            added += sum(get_module(b, n).out_features for n in (adapter.q_proj, adapter.k_proj, adapter.v_proj,
                                                                  adapter.o_proj) if get_module(b, n).bias is None)
        if mlp_bias:
            added += sum(get_module(b, n).out_features for n in (*adapter.mlp_in, adapter.mlp_out)
                         if get_module(b, n).bias is None)
    total = param_count(model)
    layers = len(blocks)
    fixed = total + added - layers * (kv * group_cost + channels * channel_cost)
    return Budget(layers, kv, qpk, head_dim, channels, int(cfg.hidden_size), group_cost, channel_cost, fixed, total)


def legal_group_counts(budget: Budget, heads_divide_hidden: bool) -> list[int]:
    """KV-group counts a stock config accepts (hidden_size divisible by the head count where checked)."""
    return [g for g in range(1, budget.groups + 1)
            if not heads_divide_hidden or budget.hidden % (g * budget.q_per_kv) == 0]


@dataclass(frozen=True)
class Choice:
    groups: int
    channels: int
    params: int
    sparsity: float


def candidates(budget: Budget, sparsity: float, legal: list[int], tolerance: float = TOLERANCE) -> list[Choice]:
    """For every legal group count, the channel count nearest the target; those within tolerance."""
    target = (1.0 - sparsity) * budget.total
    out = []
    for g in legal:
        c = round((target - budget.fixed - budget.layers * g * budget.group_cost) / (budget.layers * budget.channel_cost))
        c = max(1, min(budget.channels, int(c)))
        achieved = budget.sparsity(g, c)
        if abs(achieved - sparsity) <= tolerance:
            out.append(Choice(g, c, budget.params(g, c), achieved))
    return out


def choose(budget: Budget, sparsity: float, legal: list[int], key: Callable[[Choice], float],
           method: str, tolerance: float = TOLERANCE) -> Choice:
    """The candidate that minimises `key` (ties: nearest the target); a clear error when none fits."""
    found = candidates(budget, sparsity, legal, tolerance)
    if not found:
        lo = max(0.0, budget.sparsity(budget.groups, budget.channels))  # keep-all is 0, not "-0.0%"
        hi = budget.sparsity(min(legal), 1)
        raise UnreachableSparsity(
            f"{method} cannot reach {sparsity:.1%} parameter sparsity within {tolerance:.0%} on this model: "
            f"attention heads and MLP channels allow {lo:.1%}..{hi:.1%} (embeddings and norms are not pruned)",
            method=method, sparsity=sparsity, reachable=(lo, hi))
    return min(found, key=lambda ch: (key(ch), abs(ch.sparsity - sparsity), -ch.groups))
