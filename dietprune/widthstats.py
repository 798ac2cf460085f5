"""Statistics on the width axes inside each block: MLP channels and attention heads.

Per task (importance, for the vote):

- ``mlp_abs[l, c]``: Σ over tokens of |x_c| at the input of block l's ``down_proj`` (the MLP's
  intermediate activation, after the gate);
- ``head_norm[l, h]``: Σ over tokens of ‖x_h‖₂, the norm of query head h's attention output,
  read at the input of ``o_proj`` (head-major layout, ``head_dim`` features per head).

Pooled over tasks (for the least-squares fold of ``diet-width``'s repair): Σx and Σxxᵀ at the
input of ``down_proj`` and of ``o_proj`` in every block.

Everything is a float64 sum plus a token count, so shards, processes and tasks add up exactly.
``WidthObserver`` collects them as an observer of the block-sequential engine (``engine.py``),
in the same pass as DIET's hidden-dimension statistics.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from .adapters import ModelAdapter, get_module
from .engine import Observer
from .errors import DietpruneError


@dataclass
class WidthTaskStats:
    """One task's importance sums on the width axes, over `count` tokens."""

    mlp_abs: torch.Tensor  # [L, I] float64
    head_norm: torch.Tensor  # [L, H] float64 (query heads)
    count: int = 0

    def __add__(self, other: "WidthTaskStats") -> "WidthTaskStats":
        if self.mlp_abs.shape != other.mlp_abs.shape or self.head_norm.shape != other.head_norm.shape:
            raise DietpruneError("cannot merge width statistics of different shapes")
        return WidthTaskStats(self.mlp_abs + other.mlp_abs, self.head_norm + other.head_norm,
                              self.count + other.count)

    def mlp_scores(self) -> torch.Tensor:
        """[L, I] mean |activation| of every MLP channel."""
        if self.count == 0:
            raise DietpruneError("no tokens were profiled for the width statistics")
        return self.mlp_abs / self.count

    def head_scores(self) -> torch.Tensor:
        """[L, H] mean output norm of every query head."""
        if self.count == 0:
            raise DietpruneError("no tokens were profiled for the width statistics")
        return self.head_norm / self.count


@dataclass
class GramSums:
    """Σx [L, n] and Σxxᵀ [L, n, n] of one linear layer's input in every block, over `count` tokens."""

    s: torch.Tensor
    gram: torch.Tensor
    count: int = 0

    def __add__(self, other: "GramSums") -> "GramSums":
        return GramSums(self.s + other.s, self.gram + other.gram, self.count + other.count)


@dataclass
class WidthProfile:
    """Width statistics of every task, plus the pooled moments the repair uses (None: not collected)."""

    tasks: dict[str, WidthTaskStats]
    head_dim: int
    mlp: GramSums | None = None  # input of down_proj
    attn: GramSums | None = None  # input of o_proj
    meta: dict = field(default_factory=dict)

    def __add__(self, other: "WidthProfile") -> "WidthProfile":
        if set(self.tasks) != set(other.tasks) or self.head_dim != other.head_dim:
            raise DietpruneError("width profiles cover different tasks or head sizes")

        def add(a, b):
            return None if a is None or b is None else a + b

        return WidthProfile({t: self.tasks[t] + other.tasks[t] for t in self.tasks}, self.head_dim,
                            add(self.mlp, other.mlp), add(self.attn, other.attn), dict(self.meta))

    def mlp_matrix(self) -> torch.Tensor:
        """[tasks, L, I] in task order."""
        return torch.stack([st.mlp_scores() for st in self.tasks.values()])

    def head_matrix(self) -> torch.Tensor:
        """[tasks, L, H] in task order."""
        return torch.stack([st.head_scores() for st in self.tasks.values()])

    # ---- persistence: tensors under "width/" in the scores file -----------------------
    def to_tensors(self) -> tuple[dict[str, torch.Tensor], dict]:
        tensors, counts = {}, {}
        for name, st in self.tasks.items():
            tensors[f"width/task/{name}/mlp_abs"] = st.mlp_abs.contiguous()
            tensors[f"width/task/{name}/head_norm"] = st.head_norm.contiguous()
            counts[name] = st.count
        for key, mom in (("mlp", self.mlp), ("attn", self.attn)):
            if mom is not None:
                tensors[f"width/{key}/s"] = mom.s.contiguous()
                tensors[f"width/{key}/gram"] = mom.gram.contiguous()
                counts[f"__{key}__"] = mom.count
        return tensors, {"counts": counts, "head_dim": self.head_dim, "tasks": list(self.tasks), "meta": self.meta}

    @classmethod
    def from_tensors(cls, get, keys: set, header: dict) -> "WidthProfile":
        counts = header["counts"]
        tasks = {name: WidthTaskStats(get(f"width/task/{name}/mlp_abs"), get(f"width/task/{name}/head_norm"),
                                      counts[name]) for name in header["tasks"]}
        moms = {}
        for key in ("mlp", "attn"):
            moms[key] = (GramSums(get(f"width/{key}/s"), get(f"width/{key}/gram"), counts[f"__{key}__"])
                         if f"width/{key}/gram" in keys else None)
        return cls(tasks, int(header["head_dim"]), moms["mlp"], moms["attn"], header.get("meta", {}))


class WidthObserver(Observer):
    """The width statistics as an observer of the block-sequential engine (``engine.run``).

    Hooks (forward pre-hooks on ``o_proj`` and ``down_proj`` of every block) read the engine's
    ``run.mask`` (counted tokens of the current batch) and ``run.tag`` (its task). Token counts
    come from the batches afterwards (``finish``), as DIET's observer does.
    """

    def __init__(self, adapter: ModelAdapter, model_config, tasks: list[str], device=None, moments: bool = True):
        self.adapter = adapter
        L = int(getattr(model_config, adapter.layers_key))
        heads = int(getattr(model_config, adapter.heads_key))
        inter = int(getattr(model_config, adapter.intermediate_key))
        self.heads, self.layers, self.inter = heads, L, inter
        self.head_dim = None  # read from o_proj at attach time (configs without head_dim derive it)
        self.device = device
        self.moments = moments
        z = dict(dtype=torch.float64, device=device)
        self.mlp_abs = {t: torch.zeros(L, inter, **z) for t in tasks}
        self.head_norm = {t: torch.zeros(L, heads, **z) for t in tasks}
        self.mlp = GramSums(torch.zeros(L, inter, **z), torch.zeros(L, inter, inter, **z)) if moments else None
        self.attn = None

    def attach(self, block: nn.Module, index: int, run) -> list:
        o = get_module(block, self.adapter.o_proj)
        down = get_module(block, self.adapter.mlp_out)
        if o.in_features % self.heads:
            raise DietpruneError(f"o_proj reads {o.in_features} features, not a multiple of {self.heads} heads")
        hd = o.in_features // self.heads
        if self.head_dim not in (None, hd):
            raise DietpruneError("blocks disagree on head_dim")
        self.head_dim = hd
        if down.in_features != self.inter:
            raise DietpruneError(f"down_proj reads {down.in_features} features, intermediate_size is {self.inter}")
        if self.moments and self.attn is None:
            z = dict(dtype=torch.float64, device=self.device)
            self.attn = GramSums(torch.zeros(self.layers, o.in_features, **z),
                                torch.zeros(self.layers, o.in_features, o.in_features, **z))
        return [o.register_forward_pre_hook(self._attn_hook(index, run)),
                down.register_forward_pre_hook(self._mlp_hook(index, run))]

    @staticmethod
    def _tokens(args, run) -> torch.Tensor:
        x = args[0]
        return x[run.mask.to(x.device)].float()

    def _attn_hook(self, layer: int, run):
        def fn(module, args):
            x = self._tokens(args, run)
            sink = self.head_norm[run.tag]
            sink[layer] += x.view(x.shape[0], self.heads, -1).norm(dim=-1).sum(0, dtype=torch.float64).to(sink.device)
            if self.attn is not None:
                self.attn.s[layer] += x.sum(0, dtype=torch.float64).to(self.attn.s.device)
                self.attn.gram[layer] += (x.T @ x).to(self.attn.gram.device, torch.float64)

        return fn

    def _mlp_hook(self, layer: int, run):
        def fn(module, args):
            x = self._tokens(args, run)
            sink = self.mlp_abs[run.tag]
            sink[layer] += x.abs().sum(0, dtype=torch.float64).to(sink.device)
            if self.mlp is not None:
                self.mlp.s[layer] += x.sum(0, dtype=torch.float64).to(self.mlp.s.device)
                self.mlp.gram[layer] += (x.T @ x).to(self.mlp.gram.device, torch.float64)

        return fn

    def finish(self, batches, reduce=None) -> WidthProfile:
        """The statistics of the pass over `batches` (engine.Batch: tag and token mask);
        `reduce` (e.g. ``distributed.all_reduce``) sums the tensors over processes."""
        reduce = reduce or (lambda t: t)

        def red_count(n):
            return int(reduce(torch.tensor([n], dtype=torch.float64))[0])

        counts = {t: sum(int(b.mask.sum()) for b in batches if b.tag == t) for t in self.mlp_abs}
        tasks = {t: WidthTaskStats(reduce(self.mlp_abs[t].cpu()), reduce(self.head_norm[t].cpu()), red_count(counts[t]))
                 for t in self.mlp_abs}
        total = sum(counts.values())

        def red(m):
            return None if m is None else GramSums(reduce(m.s.cpu()), reduce(m.gram.cpu()), red_count(total))

        out = WidthProfile(tasks, int(self.head_dim or 0), red(self.mlp), red(self.attn))
        for st in out.tasks.values():
            if not (torch.isfinite(st.mlp_abs).all() and torch.isfinite(st.head_norm).all()):
                raise DietpruneError("non-finite activations (NaN/inf) at an MLP or attention output")
        return out
