"""Activation statistics kept as sums and token counts.

Everything here is additive: two shards of calibration data (or two processes) give two
objects whose ``+`` equals the statistics of the union exactly. Means are only taken when a
score is read. Saved as safetensors with the metadata in the safetensors header.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .errors import DietpruneError

FORMAT_VERSION = "1"


@dataclass
class Moments:
    """Running float64 sums over the tokens of one activation x [tokens, d]: the one accumulator.

    Which sums are kept is chosen by which fields are tensors: ``abs`` (Σ|x|, DIET), ``sum`` (Σx),
    ``sq`` (Σx², RMS / variance), ``gram`` (Σxxᵀ, least squares / SparseGPT); ``count`` tokens.
    The fields may be views of a larger tensor (one row of a per-layer stack): `add` writes in place.
    Gram products are float32 per batch (fast on CPU) added into a float64 sum (exact across batches).
    """

    abs: torch.Tensor | None = None
    sum: torch.Tensor | None = None
    sq: torch.Tensor | None = None
    gram: torch.Tensor | None = None
    count: int = 0

    @classmethod
    def zeros(cls, d: int, *, abs: bool = False, sum: bool = False, sq: bool = False, gram: bool = False,
              device=None) -> "Moments":
        def z(on, *shape):
            return torch.zeros(*shape, dtype=torch.float64, device=device) if on else None

        return cls(z(abs, d), z(sum, d), z(sq, d), z(gram, d, d))

    def add(self, x: torch.Tensor) -> None:
        """Add the rows of x (the selected tokens, [tokens, d])."""
        if self.abs is not None:
            self.abs += x.abs().sum(0, dtype=torch.float64).to(self.abs.device)
        if self.sum is not None or self.sq is not None:
            x64 = x.to(torch.float64)
            if self.sum is not None:
                self.sum += x64.sum(0).to(self.sum.device)
            if self.sq is not None:
                self.sq += (x64 * x64).sum(0).to(self.sq.device)
        if self.gram is not None:
            xf = x.to(torch.float32)
            self.gram += (xf.T @ xf).to(self.gram.device, torch.float64)
        self.count += x.shape[0]

    def fields(self) -> dict[str, torch.Tensor]:
        return {k: v for k, v in (("abs", self.abs), ("sum", self.sum), ("sq", self.sq), ("gram", self.gram))
                if v is not None}

    def finite(self) -> bool:
        return all(bool(torch.isfinite(v).all()) for v in self.fields().values())

    def cpu(self) -> "Moments":
        return Moments(**{k: v.cpu() for k, v in self.fields().items()}, count=self.count)

    def __add__(self, other: "Moments") -> "Moments":
        a, b = self.fields(), other.fields()
        if set(a) != set(b):
            raise DietpruneError(f"cannot merge moments with fields {sorted(a)} and {sorted(b)}")
        return Moments(**{k: a[k] + b[k] for k in a}, count=self.count + other.count)


@dataclass
class TaskStats:
    """Sum of |activation| per tap point and hidden dimension, over `count` tokens."""

    abs_sum: torch.Tensor  # [points, d] float64
    count: int  # non-padding tokens seen
    samples: int  # calibration samples seen

    def __add__(self, other: "TaskStats") -> "TaskStats":
        if self.abs_sum.shape != other.abs_sum.shape:
            raise DietpruneError(f"cannot merge statistics of shapes {self.abs_sum.shape} and {other.abs_sum.shape}")
        return TaskStats(self.abs_sum + other.abs_sum, self.count + other.count, self.samples + other.samples)

    def scores(self) -> torch.Tensor:
        """DIET importance: mean |activation| averaged across tap points, then tokens."""
        if self.count == 0:
            raise DietpruneError("no tokens were profiled")
        return (self.abs_sum / self.count).mean(dim=0)


@dataclass
class NormStats:
    """Second moments of what enters / leaves the residual-path norms, for training-free repair.

    ``in_sq[l, j, :]``: sum over tokens of x**2 at the input of block l's j-th residual norm
    (``final_in_sq`` for the final norm). ``gram[l, j]``: sum of y yᵀ at the output of the j-th
    norm that feeds projections (optional, d×d each).
    """

    in_sq: torch.Tensor  # [L, R, d]
    final_in_sq: torch.Tensor  # [d]
    count: int
    gram: torch.Tensor | None = None  # [L, Rr, d, d]
    final_gram: torch.Tensor | None = None  # [d, d]

    def __add__(self, other: "NormStats") -> "NormStats":
        def add(a, b):
            return None if a is None or b is None else a + b

        return NormStats(self.in_sq + other.in_sq, self.final_in_sq + other.final_in_sq, self.count + other.count,
                         add(self.gram, other.gram), add(self.final_gram, other.final_gram))


@dataclass
class Profile:
    """Per-task statistics of one model at one tap point, with provenance."""

    tasks: dict[str, TaskStats]
    meta: dict = field(default_factory=dict)
    norms: NormStats | None = None
    widths: object = None  # widthstats.WidthProfile: MLP-channel and head statistics (diet-width)

    def scores(self) -> dict[str, torch.Tensor]:
        return {name: st.scores() for name, st in self.tasks.items()}

    def score_matrix(self) -> torch.Tensor:
        """[tasks, d] in task order."""
        return torch.stack([st.scores() for st in self.tasks.values()])

    def __add__(self, other: "Profile") -> "Profile":
        if set(self.tasks) != set(other.tasks):
            raise DietpruneError("profiles cover different tasks")
        for key in ("fingerprint", "tap"):
            if self.meta.get(key) != other.meta.get(key):
                raise DietpruneError(f"profiles differ in {key}: {self.meta.get(key)} vs {other.meta.get(key)}")
        norms = None if self.norms is None or other.norms is None else self.norms + other.norms
        meta = dict(self.meta)
        meta["samples"] = {t: self.tasks[t].samples + other.tasks[t].samples for t in self.tasks}
        widths = None if self.widths is None or other.widths is None else self.widths + other.widths
        return Profile({t: self.tasks[t] + other.tasks[t] for t in self.tasks}, meta, norms, widths)

    # ---- persistence -----------------------------------------------------------------
    def save(self, path: str | os.PathLike) -> Path:
        from safetensors.torch import save_file

        tensors = {}
        counts = {}
        for name, st in self.tasks.items():
            tensors[f"task/{name}/abs_sum"] = st.abs_sum.contiguous()
            tensors[f"task/{name}/scores"] = st.scores().contiguous()
            counts[name] = {"count": st.count, "samples": st.samples}
        if self.norms is not None:
            tensors["norms/in_sq"] = self.norms.in_sq.contiguous()
            tensors["norms/final_in_sq"] = self.norms.final_in_sq.contiguous()
            counts["__norms__"] = {"count": self.norms.count}
            if self.norms.gram is not None:
                tensors["norms/gram"] = self.norms.gram.contiguous()
                tensors["norms/final_gram"] = self.norms.final_gram.contiguous()
        width_header = None
        if self.widths is not None:
            width_tensors, width_header = self.widths.to_tensors()
            tensors.update(width_tensors)
        header = {"format": "dietprune-profile", "version": FORMAT_VERSION,
                  "meta": json.dumps(self.meta), "counts": json.dumps(counts), "tasks": json.dumps(list(self.tasks))}
        if width_header is not None:
            header["widths"] = json.dumps(width_header)
        path = Path(path)
        if path.parent and not path.parent.exists():
            raise DietpruneError(f"cannot write scores: folder {path.parent} does not exist")
        from .outputs import atomic_file

        with atomic_file(path, "scores") as tmp:  # a unique temp name; nothing left on an error or interrupt
            save_file(tensors, str(tmp), metadata=header)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Profile":
        from safetensors import safe_open

        path = Path(path)
        if not path.is_file():
            raise DietpruneError(f"scores file not found: {path}")
        try:
            with safe_open(str(path), framework="pt") as fh:
                header = fh.metadata() or {}
                if header.get("format") != "dietprune-profile":
                    raise DietpruneError(f"{path} is not a dietprune scores file")
                counts = json.loads(header["counts"])
                tasks = {}
                for name in json.loads(header["tasks"]):
                    tasks[name] = TaskStats(fh.get_tensor(f"task/{name}/abs_sum"), counts[name]["count"],
                                            counts[name]["samples"])
                norms = None
                keys = set(fh.keys())
                if "norms/in_sq" in keys:
                    gram = fh.get_tensor("norms/gram") if "norms/gram" in keys else None
                    fgram = fh.get_tensor("norms/final_gram") if "norms/final_gram" in keys else None
                    norms = NormStats(fh.get_tensor("norms/in_sq"), fh.get_tensor("norms/final_in_sq"),
                                      counts["__norms__"]["count"], gram, fgram)
                widths = None
                if "widths" in header:
                    from .widthstats import WidthProfile

                    widths = WidthProfile.from_tensors(fh.get_tensor, keys, json.loads(header["widths"]))
        except DietpruneError:
            raise
        except Exception as exc:  # safetensors raises several types for a damaged file
            raise DietpruneError(f"cannot read scores file {path}: {exc}") from exc
        return cls(tasks, json.loads(header["meta"]), norms, widths)
