"""Sequential least-squares re-fit of the projections that read a pruned norm.

After the cut, every projection W (out × d) that read a norm output y now reads the pruned
model's own norm output ŷ (k dims), which differs from y[kept] twice over: the removed
coordinates are gone, and everything upstream has drifted. The re-fit solves, per projection,

    W' = argmin Σ_t ‖W' ŷ_t − W y_t‖²  + λ‖W' − W₀‖²   =   (W C + λW₀)(Ĝ + λI)⁻¹,
    C = Σ_t y_t ŷ_tᵀ  (d × k),   Ĝ = Σ_t ŷ_t ŷ_tᵀ  (k × k),

where y_t comes from the dense model and ŷ_t from the pruned model on the same calibration
token, and W₀ is the projection's weight before the re-fit (the sliced dense weight, or the
least-squares fold when `ls` ran first): the ridge pulls the fit towards it, not towards zero.
It runs in one forward pass of the pruned model: a hook on each reader norm re-fits the
projections that read it before they run, so every block is fitted on inputs produced by the
already re-fitted blocks before it. The architecture is unchanged; only reader weights move.
"""

from __future__ import annotations

import torch
from torch import nn

from .adapters import ModelAdapter, adapter_for, get_module
from .encoding import batches, calibration_ids, wants_bos


@torch.no_grad()
def capture_norm_outputs(model: nn.Module, ids: torch.Tensor, attn: torch.Tensor,
                         adapter: ModelAdapter | None = None) -> dict[tuple[int, str], torch.Tensor]:
    """Outputs of every reader norm over the non-padding tokens: {(layer, norm): [tokens, d]}."""
    adapter = adapter or adapter_for(model)
    mask = attn.bool()
    out: dict[tuple[int, str], torch.Tensor] = {}
    handles = []
    for i, block in enumerate(adapter.blocks(model)):
        for name in adapter.reader_norms():
            def hook(module, args, output, key=(i, name)):
                out[key] = output[mask].detach().float()

            handles.append(get_module(block, name).register_forward_hook(hook))
    _forward_once(model, handles, ids, attn)
    return out


def _forward_once(model: nn.Module, handles: list, ids: torch.Tensor, attn: torch.Tensor) -> None:
    """One forward pass for the hooks' sake (no logits beyond the last position), then unhook."""
    try:
        model(input_ids=ids, attention_mask=attn, use_cache=False, logits_to_keep=1)
    finally:
        for h in handles:
            h.remove()


def moments(y: torch.Tensor, y_hat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(Ĝ = Σ ŷŷᵀ, C = Σ yŷᵀ, G = Σ yyᵀ) in float64: everything the fit and its error need."""
    y, y_hat = y.float(), y_hat.float()  # float32 products (fast on CPU), float64 for the solve
    return (y_hat.T @ y_hat).double(), (y.T @ y_hat).double(), (y.T @ y).double()


def solve_refit(w_dense: torch.Tensor, gram_hat: torch.Tensor, cross: torch.Tensor, ridge: float,
                prior: torch.Tensor | None = None) -> torch.Tensor:
    """(W C + λW₀)(Ĝ + λI)⁻¹ with λ = ridge · mean(diag Ĝ) and W₀ = `prior` (zero if None);
    float64 inside, dtype of w_dense out."""
    lam = ridge * torch.diagonal(gram_hat).mean().clamp_min(1e-12)
    eye = torch.eye(gram_hat.shape[0], dtype=torch.float64, device=gram_hat.device)
    rhs = w_dense.double() @ cross.to(w_dense.device)
    if prior is not None:
        rhs = rhs + lam * prior.double()
    rhs = rhs.T  # W' (Ĝ + λI) = W C + λW₀, and Ĝ is symmetric
    return torch.linalg.solve(gram_hat + lam * eye, rhs).T.to(w_dense.dtype)


def relative_error(w_new: torch.Tensor, w_dense: torch.Tensor, gram_hat, cross, gram) -> float:
    """‖W' Ŷ − W Y‖ / ‖W Y‖ from the moments alone (no token-level products)."""
    a, b = w_new.double(), w_dense.double()
    want = torch.sum((b @ gram) * b)
    err = torch.sum((a @ gram_hat) * a) - 2 * torch.sum((b @ cross) * a) + want
    return float(torch.sqrt(err.clamp_min(0) / want.clamp_min(1e-30)))


@torch.no_grad()
def refit_readers_(pruned: nn.Module, dense_weights: dict[tuple[int, str], torch.Tensor],
                   targets: dict[tuple[int, str], torch.Tensor], ids: torch.Tensor, attn: torch.Tensor,
                   ridge: float = 1e-3, adapter: ModelAdapter | None = None) -> dict[str, tuple[float, float]]:
    """Re-fit every reader projection of `pruned` in place; returns relative errors (before, after).

    `dense_weights[(layer, proj)]` is the dense model's weight of that projection,
    `targets[(layer, norm)]` the dense model's norm output on the same tokens (capture_norm_outputs).
    """
    adapter = adapter or adapter_for(pruned)
    mask = attn.bool()
    report: dict[str, tuple[float, float]] = {}
    handles = []
    for i, block in enumerate(adapter.blocks(pruned)):
        for norm_name, readers in adapter.norm_readers.items():
            def hook(module, args, output, i=i, norm_name=norm_name, readers=readers, block=block):
                gram_hat, cross, gram = moments(targets[(i, norm_name)], output[mask])
                for proj in readers:
                    lin = get_module(block, proj)
                    w = dense_weights[(i, proj)]
                    before = relative_error(lin.weight, w, gram_hat, cross, gram)
                    lin.weight.data.copy_(solve_refit(w, gram_hat, cross, ridge, prior=lin.weight))
                    report[f"{i}.{proj}"] = (before, relative_error(lin.weight, w, gram_hat, cross, gram))

            handles.append(get_module(block, norm_name).register_forward_hook(hook))
    _forward_once(pruned, handles, ids, attn)
    return report


def reader_weights(model: nn.Module, adapter: ModelAdapter | None = None) -> dict[tuple[int, str], torch.Tensor]:
    """Copies of every reader projection's weight, keyed (layer, projection)."""
    adapter = adapter or adapter_for(model)
    return {(i, name): get_module(block, name).weight.detach().clone()
            for i, block in enumerate(adapter.blocks(model)) for name in adapter.readers}


def fit_batch(model: nn.Module, tokenizer, examples: dict[str, list], n: int, max_length: int, seed: int = 0):
    """One right-padded batch (ids, attention mask) of `n` calibration sequences pooled over tasks."""
    pooled = [e for task_examples in examples.values() for e in task_examples]
    g = torch.Generator().manual_seed(seed)
    pick = sorted(torch.randperm(len(pooled), generator=g)[:n].tolist())
    seqs = calibration_ids(tokenizer, [pooled[i] for i in pick], wants_bos(model), max_length)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    ids, attn = next(batches(seqs, len(seqs), pad))
    device = next(model.parameters()).device
    return ids.to(device), attn.to(device)
