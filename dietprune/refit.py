"""Sequential least-squares re-fit of the projections that read a pruned norm.

After the cut, every projection W (out × d) that read a norm output y now reads the pruned
model's own norm output ŷ (k dims), which differs from y[kept] twice over: the removed
coordinates are gone, and everything upstream has drifted. The re-fit solves, per projection,

    W' = argmin Σ_t ‖W' ŷ_t − W y_t‖²  + λ‖W' − W₀‖²   =   (W C + λW₀)(Ĝ + λI)⁻¹,
    C = Σ_t y_t ŷ_tᵀ  (d × k),   Ĝ = Σ_t ŷ_t ŷ_tᵀ  (k × k),

where y_t comes from the dense model and ŷ_t from the pruned model on the same calibration
token, and W₀ is the projection's weight before the re-fit (the sliced dense weight, or the
least-squares fold when `ls` ran first): the ridge pulls the fit towards it, not towards zero.
It runs as one engine pass (``dietprune.engine``) over the pruned model: a hook on each reader
norm re-fits the projections that read it before they run, so every block is fitted on inputs
produced by the already re-fitted blocks before it. The architecture is unchanged; only reader weights move.
"""

from __future__ import annotations

import torch
from torch import nn

from . import engine
from .adapters import ModelAdapter, adapter_for, get_module
from .encoding import batches, calibration_ids, wants_bos
from .engine import Batch, Observer


class _NormOutputs(Observer):
    """Records every reader norm's output over the selected tokens (the re-fit's dense targets)."""

    def __init__(self, adapter: ModelAdapter):
        self.adapter, self.out = adapter, {}

    def attach(self, block, index, run):
        def hook(module, args, output, key):
            self.out[key] = run.select(output).detach().float()

        return [get_module(block, n).register_forward_hook(lambda m, a, o, key=(index, n): hook(m, a, o, key))
                for n in self.adapter.reader_norms()]


class _Refit(Observer):
    """Re-fits the projections reading each norm inside the block's pass, before they run: every block is
    fitted on inputs produced by the already re-fitted blocks before it, and its outputs (passed on by the
    engine) are those of the re-fitted block, so no rerun is needed."""

    def __init__(self, adapter, dense_weight, targets, ridge, after_block=None):
        """`dense_weight(layer, proj)`: the dense model's weight; `after_block(block, index)`: called with
        the re-fitted block still loaded (the streamed path writes its readers back there)."""
        self.adapter, self.dense_weight, self.targets, self.ridge = adapter, dense_weight, targets, ridge
        self.after_block = after_block
        self.report: dict[str, tuple[float, float]] = {}

    def finish_block(self, block, index, run):
        if self.after_block is not None:
            self.after_block(block, index)
        return False

    def attach(self, block, index, run):
        def hook(module, args, output, norm_name):
            gram_hat, cross, gram = moments(self.targets[(index, norm_name)], run.select(output))
            for proj in self.adapter.norm_readers[norm_name]:
                lin = get_module(block, proj)
                w = self.dense_weight(index, proj).to(lin.weight.device)
                before = relative_error(lin.weight, w, gram_hat, cross, gram)
                lin.weight.data.copy_(solve_refit(w, gram_hat, cross, self.ridge, prior=lin.weight))
                self.report[f"{index}.{proj}"] = (before, relative_error(lin.weight, w, gram_hat, cross, gram))

        return [get_module(block, n).register_forward_hook(lambda m, a, o, n=n: hook(m, a, o, n))
                for n in self.adapter.norm_readers]


def _one_batch(ids: torch.Tensor, attn: torch.Tensor) -> list[Batch]:
    return [Batch(ids, attn, attn.bool())]


@torch.no_grad()
def capture_norm_outputs(model: nn.Module, ids: torch.Tensor, attn: torch.Tensor,
                         adapter: ModelAdapter | None = None, source=engine.RESIDENT) -> dict[tuple[int, str], torch.Tensor]:
    """Outputs of every reader norm over the non-padding tokens: {(layer, norm): [tokens, d]}."""
    obs = _NormOutputs(adapter or adapter_for(model))
    engine.run(model, _one_batch(ids, attn), [obs], source=source, desc="refit targets")
    return obs.out


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
    obs = _Refit(adapter or adapter_for(pruned), lambda i, p: dense_weights[(i, p)], targets, ridge)
    engine.run(pruned, _one_batch(ids, attn), [obs], desc="refit")
    return obs.report


@torch.no_grad()
def refit_streamed_(folder, dense_ckpt, targets: dict, ids: torch.Tensor, attn: torch.Tensor,
                    ridge: float = 1e-3) -> dict[str, tuple[float, float]]:
    """`refit_readers_` for a cut checkpoint folder (float32 safetensors) streamed block by block: each
    block's re-fitted readers are written back into its shards in place; dense weights come from `dense_ckpt`."""
    from .streaming import Checkpoint, StreamedWeights, overwrite_tensor, skeleton

    ckpt = Checkpoint(folder)
    pruned = skeleton(folder)
    adapter = adapter_for(pruned)

    def dense_weight(i, proj):
        return dense_ckpt.get(f"{adapter.layers}.{i}.{proj}.weight").to(torch.float32)

    def write_back(block, i):
        for proj in adapter.readers:
            overwrite_tensor(ckpt, f"{adapter.layers}.{i}.{proj}.weight", get_module(block, proj).weight)

    obs = _Refit(adapter, dense_weight, targets, ridge, after_block=write_back)
    engine.run(pruned, _one_batch(ids, attn), [obs], source=StreamedWeights(pruned, ckpt), desc="refit")
    return obs.report


def reader_weights(model: nn.Module, adapter: ModelAdapter | None = None) -> dict[tuple[int, str], torch.Tensor]:
    """Copies of every reader projection's weight, keyed (layer, projection)."""
    adapter = adapter or adapter_for(model)
    return {(i, name): get_module(block, name).weight.detach().clone()
            for i, block in enumerate(adapter.blocks(model)) for name in adapter.readers}


def fit_batch(model: nn.Module, tokenizer, examples: dict[str, list], n: int, max_length: int, seed: int = 0,
              device=None):
    """One right-padded batch (ids, attention mask) of `n` calibration sequences pooled over tasks."""
    pooled = [e for task_examples in examples.values() for e in task_examples]
    g = torch.Generator().manual_seed(seed)
    pick = sorted(torch.randperm(len(pooled), generator=g)[:n].tolist())
    seqs = calibration_ids(tokenizer, [pooled[i] for i in pick], wants_bos(model), max_length)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    ids, attn = next(batches(seqs, len(seqs), pad))
    device = device or next(model.parameters()).device
    return ids.to(device), attn.to(device)
