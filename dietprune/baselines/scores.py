"""Pure scoring functions of the structured baselines: tensors in, tensors out, no model.

Shapes follow ``nn.Linear``: a weight is ``[out_features, in_features]``. Statistics of a
linear layer's input are per input feature, already reduced over calibration tokens.

A KV group is one key/value head together with the query heads that share it (GQA): query
heads ``j * q_per_kv ... (j + 1) * q_per_kv - 1`` read kv head ``j``, as ``repeat_kv`` lays
them out. With plain multi-head attention a group is one head.
"""

from __future__ import annotations

import torch


def wanda(weight: torch.Tensor, in_norm: torch.Tensor) -> torch.Tensor:
    """|W_ij| · ‖X_j‖ for every weight: [out, in] (reference form; the reductions below avoid it)."""
    return weight.double().abs() * in_norm.double()[None, :]


def wanda_rows(weight: torch.Tensor, in_norm: torch.Tensor) -> torch.Tensor:
    """Σ_j |W_ij|·‖X_j‖ for every output row i: [out]."""
    return (weight.abs().float() @ in_norm.float()).double()


def wanda_cols(weight: torch.Tensor, in_norm: torch.Tensor) -> torch.Tensor:
    """Σ_i |W_ij|·‖X_j‖ for every input column j: [in]."""
    return weight.abs().sum(0, dtype=torch.float64) * in_norm.double()


def wanda_group_scores(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor,
                       attn_in_norm: torch.Tensor, o_in_norm: torch.Tensor, n_groups: int) -> torch.Tensor:
    """Wanda-SP score of each KV group: |W|·‖X‖ summed over the group's q/k/v rows and o_proj columns."""
    total = group_sums(wanda_cols(o, o_in_norm), n_groups)
    for w in (q, k, v):
        total = total + group_sums(wanda_rows(w, attn_in_norm), n_groups)
    return total


def wanda_channel_scores(mlp_in: list[torch.Tensor], down: torch.Tensor, mlp_in_norm: torch.Tensor,
                         down_in_norm: torch.Tensor) -> torch.Tensor:
    """Wanda-SP score of each MLP channel: its gate/up rows and its down_proj column."""
    total = wanda_cols(down, down_in_norm)
    for w in mlp_in:
        total = total + wanda_rows(w, mlp_in_norm)
    return total


def rms_from_sums(sq_sum: torch.Tensor, count: int) -> torch.Tensor:
    """Per-feature root mean square over `count` tokens (‖X_j‖ up to the constant sqrt(count))."""
    return (sq_sum.double() / max(count, 1)).sqrt()


def variance_from_sums(s: torch.Tensor, sq: torch.Tensor, count: int) -> torch.Tensor:
    """Per-feature variance over tokens from Σx and Σx² (population variance, clamped at 0)."""
    n = max(count, 1)
    mean = s.double() / n
    return (sq.double() / n - mean * mean).clamp_min(0.0)


def fluctuation(variance: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """FLAP's metric per input feature of a linear layer: Var(x_j) · ‖W[:, j]‖²."""
    return variance.double() * weight.float().pow(2).sum(0, dtype=torch.float64)


def group_sums(per_feature: torch.Tensor, n_groups: int) -> torch.Tensor:
    """Sum per-feature scores over contiguous equal groups (the head-major o_proj input layout)."""
    return per_feature.reshape(n_groups, -1).sum(1)


def standardize(scores: torch.Tensor) -> torch.Tensor:
    """(x - mean) / std over all entries; a constant input gives zeros."""
    x = scores.double()
    std = x.std(unbiased=False) if x.numel() > 1 else x.new_tensor(0.0)
    if std <= 0 or not torch.isfinite(std):
        return torch.zeros_like(x)
    return (x - x.mean()) / std


def compensation_bias(weight: torch.Tensor, mean_in: torch.Tensor, removed: torch.Tensor) -> torch.Tensor:
    """What removed input features add on average to a linear layer's output: W[:, R] · E[x_R]."""
    if removed.numel() == 0:
        return torch.zeros(weight.shape[0], dtype=torch.float64)
    w = weight.double()  # computed on the weight's device, returned on the CPU
    removed = removed.to(w.device)
    return (w[:, removed] @ mean_in.to(w.device, torch.float64)[removed]).cpu()


def cosine_sum(x: torch.Tensor, y: torch.Tensor, mask: torch.Tensor | None = None) -> tuple[float, int]:
    """Σ cos(x_t, y_t) over tokens t (mask selects them) and the number of tokens: [.., d] inputs."""
    x = x.double().reshape(-1, x.shape[-1])
    y = y.double().reshape(-1, y.shape[-1])
    if mask is not None:
        keep = mask.reshape(-1).bool()
        x, y = x[keep], y[keep]
    cos = torch.nn.functional.cosine_similarity(x, y, dim=-1, eps=1e-12)
    return float(cos.sum()), int(cos.numel())


def block_influence(cos_sum: torch.Tensor, count: int) -> torch.Tensor:
    """ShortGPT's Block Influence: 1 − mean cosine similarity of a block's input and output."""
    if count <= 0:
        raise ValueError("block influence needs at least one token")
    return 1.0 - cos_sum.double() / count


def keep_top(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Sorted indices of the k highest scores; ties go to the lower index."""
    from ..merge import order_by

    return torch.sort(order_by(scores)[:k]).values
