"""Importance scores and masks: pure functions on tensors, no model access.

A mask is a boolean tensor shaped like the weight, True where the weight is removed. The
comparison group is one output row: every row loses the same number of weights (unstructured),
or the same number in every group of M consecutive input weights (N:M).
"""

from __future__ import annotations

import torch

from ..errors import DietpruneError


def magnitude_scores(weight: torch.Tensor) -> torch.Tensor:
    return weight.detach().abs().to(torch.float64)


def wanda_scores(weight: torch.Tensor, act: torch.Tensor) -> torch.Tensor:
    """|W_ij| * a_j, with a_j the RMS of input channel j (Wanda's ||X_j|| up to a per-layer constant)."""
    if act.shape != (weight.shape[1],):
        raise DietpruneError(f"activation norms have shape {tuple(act.shape)}, weight reads {weight.shape[1]} inputs")
    return weight.detach().abs().to(torch.float64) * act.to(torch.float64)[None, :]


def unstructured_mask(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Remove the round(sparsity * columns) lowest-scoring weights of every row."""
    rows, cols = scores.shape
    k = int(round(sparsity * cols))
    mask = torch.zeros(rows, cols, dtype=torch.bool, device=scores.device)
    if k > 0:
        order = torch.sort(scores, dim=1, stable=True).indices
        mask.scatter_(1, order[:, :k], True)
    return mask


def nm_mask(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Keep the n highest-scoring weights in every group of m consecutive inputs of a row."""
    rows, cols = scores.shape
    if cols % m:
        raise DietpruneError(f"{n}:{m} pattern needs the input width ({cols}) to be a multiple of {m}")
    groups = scores.reshape(rows, cols // m, m)
    order = torch.sort(groups, dim=2, stable=True).indices
    mask = torch.zeros_like(groups, dtype=torch.bool)
    mask.scatter_(2, order[:, :, : m - n], True)
    return mask.reshape(rows, cols)


def select_mask(scores: torch.Tensor, sparsity: float, nm: tuple[int, int] | None) -> torch.Tensor:
    return unstructured_mask(scores, sparsity) if nm is None else nm_mask(scores, *nm)


def nm_holds(weight: torch.Tensor, n: int, m: int) -> bool:
    """True when every group of m consecutive input weights of every row has at least m - n zeros."""
    rows, cols = weight.shape
    if cols % m:
        return False
    zeros = (weight.reshape(rows, cols // m, m) == 0).sum(dim=2)
    return bool((zeros >= m - n).all())


def sparsity_of(weight: torch.Tensor) -> float:
    return float((weight == 0).sum()) / weight.numel()
