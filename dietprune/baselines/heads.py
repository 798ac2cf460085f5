"""Attention surgery: keep whole KV groups (a kv head and the query heads that read it).

Every layer keeps the same number of groups, so the stock config's single
``num_attention_heads`` / ``num_key_value_heads`` still describes the model; ``head_dim`` is
written explicitly because Llama-style configs would otherwise derive it from hidden_size.
"""

from __future__ import annotations

import torch
from torch import nn

from ..adapters import ModelAdapter, get_module
from ..errors import DietpruneError
from .slicing import keep_features_


def group_rows(groups: torch.Tensor, rows_per_group: int) -> torch.Tensor:
    """Row indices of the given groups in a head-major projection, in group order."""
    groups = torch.as_tensor(groups, dtype=torch.long)
    return (groups[:, None] * rows_per_group + torch.arange(rows_per_group)[None, :]).reshape(-1)


@torch.no_grad()
def prune_kv_groups_(model: nn.Module, adapter: ModelAdapter, kept: list[torch.Tensor]) -> nn.Module:
    """Keep KV groups `kept[i]` (sorted indices, equal count for every layer) in layer i."""
    cfg = model.config
    blocks = adapter.blocks(model)
    if len(kept) != len(blocks) or len({len(k) for k in kept}) != 1 or len(kept[0]) == 0:
        raise DietpruneError("every layer must keep the same, non-zero number of KV groups")
    heads, kv = int(getattr(cfg, adapter.heads_key)), int(getattr(cfg, adapter.kv_heads_key))
    qpk = heads // kv
    head_dim = get_module(blocks[0], adapter.q_proj).out_features // heads
    g = len(kept[0])
    for block, groups in zip(blocks, kept):
        groups = torch.sort(torch.as_tensor(groups, dtype=torch.long)).values
        if len(torch.unique(groups)) != g or groups.min() < 0 or groups.max() >= kv:
            raise DietpruneError(f"KV group indices must be unique and within [0, {kv})")
        q_rows = group_rows(groups, qpk * head_dim)
        kv_rows = group_rows(groups, head_dim)
        keep_features_(get_module(block, adapter.q_proj), q_rows, "out")
        keep_features_(get_module(block, adapter.k_proj), kv_rows, "out")
        keep_features_(get_module(block, adapter.v_proj), kv_rows, "out")
        keep_features_(get_module(block, adapter.o_proj), q_rows, "in")
        attn = get_module(block, adapter.attention)
        for attr, value in (("num_heads", g * qpk), ("num_attention_heads", g * qpk), ("num_key_value_heads", g)):
            if isinstance(getattr(attn, attr, None), int):
                setattr(attn, attr, value)
    setattr(cfg, adapter.heads_key, g * qpk)
    setattr(cfg, adapter.kv_heads_key, g)
    cfg.head_dim = head_dim
    return model
