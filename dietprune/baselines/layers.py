"""Depth surgery: remove whole decoder layers and keep the config and layer indices consistent."""

from __future__ import annotations

import torch
from torch import nn

from ..adapters import ModelAdapter, get_module
from ..errors import DietpruneError


@torch.no_grad()
def drop_layers_(model: nn.Module, adapter: ModelAdapter, removed) -> nn.Module:
    """Delete decoder layers `removed`; renumber ``layer_idx`` (KV-cache slots) of those left.

    The config's layer count and its per-layer list (``layer_types``: sliding vs full attention
    for Gemma and Qwen) are cut the same way, so each kept layer keeps its attention type.
    """
    cfg = model.config
    blocks = adapter.blocks(model)
    n = len(blocks)
    removed = sorted({int(i) for i in removed})
    if any(i < 0 or i >= n for i in removed):
        raise DietpruneError(f"layer indices must be within [0, {n})")
    keep = [i for i in range(n) if i not in removed]
    if not keep:
        raise DietpruneError("cannot remove every decoder layer")
    parent_path, _, attr = adapter.layers.rpartition(".")
    parent = get_module(model, parent_path) if parent_path else model
    setattr(parent, attr, nn.ModuleList([blocks[i] for i in keep]))
    for new, block in enumerate(get_module(model, adapter.layers)):
        for module in block.modules():
            if isinstance(getattr(module, "layer_idx", None), int):
                module.layer_idx = new
    key = adapter.layer_types_key
    types = getattr(cfg, key, None) if key else None
    setattr(cfg, adapter.layers_key, len(keep))
    if isinstance(types, (list, tuple)) and len(types) == n:
        setattr(cfg, key, [types[i] for i in keep])
    return model
