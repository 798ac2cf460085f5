"""MLP surgery: keep the same number of intermediate channels in every layer."""

from __future__ import annotations

import torch
from torch import nn

from ..adapters import ModelAdapter, get_module
from ..errors import DietpruneError
from .slicing import keep_features_


@torch.no_grad()
def prune_mlp_channels_(model: nn.Module, adapter: ModelAdapter, kept: list[torch.Tensor]) -> nn.Module:
    """Keep intermediate channels `kept[i]` (equal count for every layer) in layer i's MLP."""
    blocks = adapter.blocks(model)
    if len(kept) != len(blocks) or len({len(k) for k in kept}) != 1 or len(kept[0]) == 0:
        raise DietpruneError("every layer must keep the same, non-zero number of MLP channels")
    c = len(kept[0])
    for block, idx in zip(blocks, kept):
        idx = torch.sort(torch.as_tensor(idx, dtype=torch.long)).values
        width = get_module(block, adapter.mlp_out).in_features
        if len(torch.unique(idx)) != c or idx.min() < 0 or idx.max() >= width:
            raise DietpruneError(f"MLP channel indices must be unique and within [0, {width})")
        for name in adapter.mlp_in:
            keep_features_(get_module(block, name), idx, "out")
        keep_features_(get_module(block, adapter.mlp_out), idx, "in")
        mlp = get_module(block, adapter.mlp)
        if isinstance(getattr(mlp, "intermediate_size", None), int):
            mlp.intermediate_size = c
    setattr(model.config, adapter.intermediate_key, c)
    return model
