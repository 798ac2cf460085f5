"""Cutting one linear layer along its input or output features (plain dense tensors)."""

from __future__ import annotations

import torch
from torch import nn


def _param(t: torch.Tensor) -> nn.Parameter:
    return nn.Parameter(t.contiguous().clone(), requires_grad=False)


@torch.no_grad()
def keep_features_(lin: nn.Linear, idx: torch.Tensor, side: str) -> None:
    """side='in': keep input features `idx`; side='out': keep output features `idx` (and bias)."""
    idx = torch.as_tensor(idx, dtype=torch.long).to(lin.weight.device)
    if side == "in":
        lin.weight = _param(lin.weight.data[:, idx])
        lin.in_features = len(idx)
    elif side == "out":
        lin.weight = _param(lin.weight.data[idx, :])
        if lin.bias is not None:
            lin.bias = _param(lin.bias.data[idx])
        lin.out_features = len(idx)
    else:
        raise ValueError(f"side must be 'in' or 'out', got {side!r}")
