"""General + task calibration fusion: split input channels into shared and task-exclusive.

For one linear layer, g_j and t_j are the RMS of input channel j on general and on task data.

    r_j       = t_j / g_j
    exclusive = { j : r_j > tau }                      (criterion 'ratio', the default)
              | the ceil(rho * d) channels with largest r_j  (criterion 'top')
    shared    a_j^2 = (1 - lam) * g_j^2 + lam * t_j^2   (lam = task_weight)
    exclusive a_j   = beta * t_j                        (beta = boost >= 1)

Wanda scores |W_ij| * a_j. Magnitude scores |W_ij| * a_j / p_j, where p_j is the shared formula
applied to every channel (1 on shared channels, the exclusive boost elsewhere). SparseGPT uses the
Hessian (1 - lam) * H_g / N_g + lam * H_t / N_t whose diagonal (= p_j^2) is raised to a_j^2 on
exclusive channels. With identical general and task data, r_j = 1 and (for tau >= 1, or beta = 1)
every formula reduces to the plain method on general data.
"""

from __future__ import annotations

import math

import torch

EPS = 1e-30


def mean_sq(sq_sum: torch.Tensor, count: int) -> torch.Tensor:
    """Mean of x_j^2 over tokens: the squared RMS g_j^2 (or t_j^2)."""
    return sq_sum.to(torch.float64) / max(int(count), 1)


def exclusive_channels(g_sq: torch.Tensor, t_sq: torch.Tensor, criterion: str, tau: float,
                       rho: float) -> torch.Tensor:
    """Task-exclusive input channels from the squared RMS on general (g_sq) and task (t_sq) data."""
    ratio = torch.sqrt(t_sq / g_sq.clamp_min(EPS))
    if criterion == "ratio":
        return ratio > tau
    k = math.ceil(rho * ratio.numel())
    mask = torch.zeros_like(ratio, dtype=torch.bool)
    if k > 0:
        mask[torch.sort(ratio, descending=True, stable=True).indices[:k]] = True
    return mask


def mixed_sq(g_sq: torch.Tensor, t_sq: torch.Tensor, task_weight: float) -> torch.Tensor:
    """p_j^2 = (1 - lam) g_j^2 + lam t_j^2."""
    return (1.0 - task_weight) * g_sq + task_weight * t_sq


def fused_norms(g_sq: torch.Tensor, t_sq: torch.Tensor, exclusive: torch.Tensor, task_weight: float,
                boost: float) -> torch.Tensor:
    """a_j: shared channels from both data sets, exclusive channels from task data only."""
    return torch.where(exclusive, boost * torch.sqrt(t_sq), torch.sqrt(mixed_sq(g_sq, t_sq, task_weight)))


def magnitude_factor(g_sq: torch.Tensor, t_sq: torch.Tensor, exclusive: torch.Tensor, task_weight: float,
                     boost: float) -> torch.Tensor:
    """a_j / p_j: 1 on shared channels, the exclusive channels' boost over the mixed norm elsewhere."""
    p = torch.sqrt(mixed_sq(g_sq, t_sq, task_weight))
    a = fused_norms(g_sq, t_sq, exclusive, task_weight, boost)
    return torch.where(exclusive & (p > 0), a / p.clamp_min(EPS), torch.ones_like(p))


def fused_hessian(h_general: torch.Tensor, n_general: int, h_task: torch.Tensor, n_task: int,
                  exclusive: torch.Tensor, task_weight: float, boost: float) -> torch.Tensor:
    """(1 - lam) H_g / N_g + lam H_t / N_t, diagonal raised to (beta t_j)^2 on exclusive channels."""
    h = (1.0 - task_weight) * (h_general / max(n_general, 1)) + task_weight * (h_task / max(n_task, 1))
    t_sq = torch.diagonal(h_task) / max(n_task, 1)
    diag = torch.diagonal(h)
    h.diagonal().copy_(torch.where(exclusive, torch.maximum(diag, boost * boost * t_sq), diag))
    return h
