"""SparseGPT: prune one linear layer and update its remaining weights to keep W X unchanged.

The layer-wise objective is ||W X - W' X||^2 with Hessian H = 2 X X^T (the factor 2 and any
per-token normalisation cancel in the updates). Columns are processed left to right in blocks of
``blocksize``. Inside a block, removing weight w_ij leaves an error e = w_ij / [H^-1]_jj that the
later columns j' > j of the row absorb (OBS update, using the upper Cholesky factor of H^-1). The
block's accumulated errors are applied to the columns after the block in one matrix product
(lazy update). The mask is chosen per block from the saliency w^2 / [H^-1]_jj^2 of the
already-updated weights: the lowest ``sparsity`` fraction of the whole block (unstructured), or
the M - N lowest of every M consecutive columns of each row (N:M).
"""

from __future__ import annotations

import torch

from ..errors import DietpruneError


def inverse_hessian_factor(hessian: torch.Tensor, percdamp: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Upper Cholesky factor of (H + damp I)^-1, and the columns that never saw a nonzero input."""
    h = hessian.to(torch.float64).clone()
    dead = torch.diagonal(h) == 0
    h[dead, dead] = 1.0
    damp = percdamp * torch.mean(torch.diagonal(h))
    h.diagonal().add_(damp)
    try:
        lower = torch.linalg.cholesky(h)
    except RuntimeError as exc:  # torch raises torch.linalg.LinAlgError, a RuntimeError
        raise DietpruneError("SparseGPT: the Hessian is not positive definite; raise --percdamp") from exc
    hinv = torch.cholesky_inverse(lower)
    return torch.linalg.cholesky(hinv, upper=True), dead


@torch.no_grad()
def sparsegpt_prune(weight: torch.Tensor, hessian: torch.Tensor, sparsity: float,
                    nm: tuple[int, int] | None = None, blocksize: int = 128,
                    percdamp: float = 0.01) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (pruned and updated weight, mask of removed weights) for one linear layer."""
    rows, cols = weight.shape
    if hessian.shape != (cols, cols):
        raise DietpruneError(f"Hessian is {tuple(hessian.shape)}, the layer reads {cols} inputs")
    if nm is not None and cols % nm[1]:
        raise DietpruneError(f"{nm[0]}:{nm[1]} pattern needs the input width ({cols}) to be a multiple of {nm[1]}")
    if nm is not None and blocksize % nm[1]:
        raise DietpruneError(f"SparseGPT blocksize {blocksize} must be a multiple of M = {nm[1]}")
    hinv, dead = inverse_hessian_factor(hessian, percdamp)
    hinv = hinv.to(torch.float32)
    w = weight.detach().to(torch.float32).clone()
    w[:, dead] = 0.0
    mask = torch.zeros(rows, cols, dtype=torch.bool, device=w.device)

    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        width = i2 - i1
        w1 = w[:, i1:i2].clone()
        q1 = torch.zeros_like(w1)
        err1 = torch.zeros_like(w1)
        hinv1 = hinv[i1:i2, i1:i2]
        d1 = torch.diagonal(hinv1)

        if nm is None:
            block_mask = torch.zeros_like(w1, dtype=torch.bool)
            k = int(round(sparsity * rows * width))
            if k > 0:
                saliency = (w1 * w1 / (d1 * d1)[None, :]).reshape(-1)
                block_mask.view(-1)[torch.sort(saliency, stable=True).indices[:k]] = True
        else:
            n, m = nm
            block_mask = torch.zeros_like(w1, dtype=torch.bool)

        for i in range(width):
            if nm is not None and i % nm[1] == 0:
                saliency = w1[:, i : i + m] ** 2 / (d1[i : i + m] ** 2)[None, :]
                low = torch.sort(saliency, dim=1, stable=True).indices[:, : m - n]
                block_mask[:, i : i + m].scatter_(1, low, True)
            col = w1[:, i]
            q = col.clone()
            q[block_mask[:, i]] = 0.0
            q1[:, i] = q
            e = (col - q) / hinv1[i, i]
            w1[:, i:] -= e[:, None] * hinv1[i, i:][None, :]
            err1[:, i] = e

        w[:, i1:i2] = q1
        mask[:, i1:i2] = block_mask
        w[:, i2:] -= err1 @ hinv[i1:i2, i2:]

    w[mask] = 0.0
    return w.to(weight.dtype), mask
