"""Training-free repair after a hidden-dimension cut, from calibration statistics.

Both repairs change weights of the *full* model given the kept indices, before surgery:

- ``rms_correct_``: an RMS norm over k of d dimensions divides by the RMS of the kept
  coordinates instead of all of them. Each residual-path norm's gain is multiplied by
  sqrt(ms_kept / ms_all), the ratio of the calibration mean squares at that norm's input, so the
  kept coordinates come out at the scale the full model produced.
- ``ls_compensate_``: the removed coordinates of a norm output are predicted linearly from the
  kept ones, y_r ≈ A y_k with A = G_rk (G_kk + λI)⁻¹ from the calibration Gram matrix G, and A
  is folded into every projection that reads that norm: W_k ← W_k + W_r A. An untied lm_head
  reads the final norm and gets the same fold; a tied one is left alone, because the fold would
  also change the input embedding (untying it would cost vocab × kept parameters).
- ``energy`` (with ``ls``): a least-squares prediction is shrunk towards the mean, so the folded
  projection's outputs come out smaller than the dense ones. Each output row is rescaled so that
  its calibration energy, from the same Gram matrix, equals the dense row's:
  W'_i ← W'_i · sqrt(W_i G W_iᵀ / W'_i G_kk W'_iᵀ).
"""

from __future__ import annotations

import torch
from torch import nn

from .adapters import ModelAdapter, adapter_for
from .errors import DietpruneError
from .stats import NormStats

REPAIRS = ("none", "rms", "ls", "rms+ls", "rms+ls+energy", "refit", "rms+refit", "rms+ls+refit")


def parse_repair(repair: str | None) -> tuple[bool, bool]:
    """(RMS correction, least-squares fold) of a repair name."""
    repair = repair or "none"
    if repair not in REPAIRS:
        raise DietpruneError(f"unknown repair '{repair}'; choose from {', '.join(REPAIRS)}")
    parts = repair.split("+")
    return "rms" in parts, "ls" in parts


def uses_energy(repair: str | None) -> bool:
    """The least-squares fold rescales each output row to the dense calibration energy."""
    return "energy" in (repair or "").split("+")


def uses_refit(repair: str | None) -> bool:
    """The sequential least-squares re-fit (dietprune.refit) runs after the cut."""
    return "refit" in (repair or "")


def complement(kept: torch.Tensor, d: int) -> torch.Tensor:
    mask = torch.ones(d, dtype=torch.bool)
    mask[kept] = False
    return mask.nonzero().flatten()


def rms_ratio(in_sq: torch.Tensor, kept: torch.Tensor) -> float:
    """sqrt(mean square over kept dims / mean square over all dims) for one norm's input."""
    all_ms = in_sq.sum() / in_sq.numel()
    kept_ms = in_sq[kept].sum() / len(kept)
    if all_ms <= 0:
        return 1.0
    return float(torch.sqrt(kept_ms / all_ms))


@torch.no_grad()
def rms_correct_(model: nn.Module, kept: torch.Tensor, norms: NormStats, adapter: ModelAdapter | None = None) -> dict:
    """Rescale every residual-path norm gain (block norms and the final norm); returns the factors."""
    plan = CutPlan(model, kept, norms, rms=True, adapter=adapter)
    plan.repair_(model)
    return plan.rms_factors()


def rescale_gain(weight: torch.Tensor, factor: float, offset: float) -> torch.Tensor:
    """A norm weight whose effective gain (offset + w) is multiplied by `factor`."""
    return (offset + weight) * factor - offset


def rms_factor_for(adapter: ModelAdapter, name: str, kept: torch.Tensor, norms: NormStats) -> float | None:
    """The RMS-correction factor of the norm weight called `name` in the state dict (None: not a norm gain)."""
    role, layer, inner = adapter.locate(name)
    if not name.endswith(".weight"):
        return None
    if role == "norm":
        return rms_ratio(norms.in_sq[layer, adapter.residual_norms.index(inner)], kept)
    if role == "final_norm":
        return rms_ratio(norms.final_in_sq, kept)
    return None


def ls_fold(weight: torch.Tensor, a: torch.Tensor, kept: torch.Tensor, removed: torch.Tensor,
            gram: torch.Tensor | None = None) -> torch.Tensor:
    """W_k + W_r A for a projection reading a norm output; same dtype as `weight`.

    With the norm output's Gram matrix `gram` (d × d), each row is then rescaled so that its output
    energy on the calibration data, W'_k G_kk W'_kᵀ, equals the dense row's W G Wᵀ (``energy``)."""
    w = weight.double()
    a, kept, removed = a.to(w.device), kept.to(w.device), removed.to(w.device)
    dense = w.clone() if gram is not None else None
    w[:, kept] += w[:, removed] @ a
    if gram is not None:
        g = gram.to(w.device, torch.float64)
        wk = w[:, kept]
        want = torch.sum((dense @ g) * dense, dim=1)
        have = torch.sum((wk @ g[kept][:, kept]) * wk, dim=1)
        w = w * torch.sqrt(want / have.clamp_min(1e-30)).where(have > 0, torch.ones_like(have))[:, None]
    return w.to(weight.dtype)


def ls_map(gram: torch.Tensor, kept: torch.Tensor, removed: torch.Tensor, ridge: float) -> torch.Tensor:
    """A = G_rk (G_kk + λI)⁻¹ with λ = ridge · mean(diag G_kk): [removed, kept]."""
    g = gram.double()
    kept, removed = kept.to(g.device), removed.to(g.device)
    gkk = g[kept][:, kept]
    grk = g[removed][:, kept]
    lam = ridge * torch.diagonal(gkk).mean().clamp_min(1e-12)
    eye = torch.eye(len(kept), dtype=torch.float64, device=g.device)
    # A (G_kk + λI) = G_rk  ->  solve (G_kk + λI)ᵀ Aᵀ = G_rkᵀ (G_kk is symmetric)
    return torch.linalg.solve(gkk + lam * eye, grk.T).T


@torch.no_grad()
def ls_compensate_(model: nn.Module, kept: torch.Tensor, norms: NormStats, ridge: float = 1e-2,
                   adapter: ModelAdapter | None = None, energy: bool = False) -> None:
    """Fold the least-squares prediction of removed norm outputs into the projections reading them
    (`energy`: then match each output row's calibration energy to the dense one)."""
    CutPlan(model, kept, norms, ls=True, ridge=ridge, energy=energy, adapter=adapter).repair_(model)


def head_foldable(model: nn.Module, adapter: ModelAdapter, norms: NormStats) -> bool:
    """The least-squares fold reaches lm_head: it is untied and the final norm's Gram matrix is known."""
    return not adapter.tied(model) and norms.final_gram is not None


class CutPlan:
    """The repairs of one hidden-dimension cut, applied tensor by tensor: the one place of the repair order.

    For a state-dict tensor (by name) `transform` returns its repaired full-width version: a
    residual norm's gain rescaled by its RMS factor (``rms``), a reader projection or an untied
    lm_head with the least-squares map of the norm it reads folded in (``ls``, ``energy``).
    Slicing comes after (``surgery.slice_tensor``). The resident cut (`repair_` then
    ``surgery.prune_hidden_``) and the streamed writer (``streaming.stream_checkpoint``) both use
    it, so they agree by construction. Everything is computed on the tensor's device.
    """

    def __init__(self, model: nn.Module, kept, norms: NormStats | None, rms: bool = False, ls: bool = False,
                 ridge: float = 1e-2, energy: bool = False, adapter: ModelAdapter | None = None):
        self.adapter = adapter or adapter_for(model)
        self.d = model.config.hidden_size
        self.kept = torch.as_tensor(kept, dtype=torch.long).cpu()
        self.removed = complement(self.kept, self.d)
        if (rms or ls) and norms is None:
            raise DietpruneError("repair needs norm statistics from profiling")
        if ls and norms.gram is None:
            raise DietpruneError("least-squares repair needs Gram statistics: profile with gram=True")
        self.norms, self.rms, self.ls, self.ridge, self.energy = norms, rms, ls and len(self.removed) > 0, ridge, energy
        self.fold_head = self.ls and head_foldable(model, self.adapter, norms)
        self._maps: dict = {}

    def rms_factors(self) -> dict[str, float]:
        norms, kept = self.norms, self.kept
        out = {f"{i}.{name}": rms_ratio(norms.in_sq[i, j], kept)
               for i in range(norms.in_sq.shape[0]) for j, name in enumerate(self.adapter.residual_norms)}
        out["final"] = rms_ratio(norms.final_in_sq, kept)
        return out

    def _fold(self, key, gram: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if key not in self._maps:
            self._maps.clear()  # tensors come grouped by layer: one map at a time in memory
            self._maps[key] = ls_map(gram.to(t.device), self.kept, self.removed, self.ridge)
        return ls_fold(t, self._maps[key], self.kept, self.removed, gram if self.energy else None)

    def transform(self, name: str, t: torch.Tensor) -> torch.Tensor:
        """The repaired (still full-width) tensor `name`; `t` itself when no repair touches it."""
        if self.rms:
            f = rms_factor_for(self.adapter, name, self.kept, self.norms)
            if f is not None:
                t = rescale_gain(t, f, self.adapter.norm_offset)
        if not self.ls:
            return t
        role, layer, inner = self.adapter.locate(name)
        if role == "reader":
            for j, norm_name in enumerate(self.adapter.reader_norms()):
                if inner in self.adapter.norm_readers[norm_name]:
                    t = self._fold((layer, j), self.norms.gram[layer, j], t)
        elif role == "lm_head" and inner == "weight" and self.fold_head:
            t = self._fold("head", self.norms.final_gram, t)
        return t

    @torch.no_grad()
    def repair_(self, model: nn.Module) -> nn.Module:
        """Apply the repairs to a resident full-width model in place (the cut itself is prune_hidden_)."""
        params = dict(model.named_parameters())
        if self.fold_head:  # named_parameters lists a tied head once; an untied one is its own entry
            params.setdefault(self.adapter.lm_head + ".weight", self.adapter.output_head(model).weight)
        for name, p in params.items():
            new = self.transform(name, p.data)
            if new is not p.data:
                p.data.copy_(new)
        self._maps.clear()
        return model
