"""Statistics on the width axes inside each block: MLP channels and attention heads.

Per task (importance, for the vote):

- ``mlp_abs[l, c]``: Σ over tokens of |x_c| at the input of block l's ``down_proj`` (the MLP's
  intermediate activation, after the gate);
- ``head_norm[l, h]``: Σ over tokens of ‖x_h‖₂, the norm of query head h's attention output,
  read at the input of ``o_proj`` (head-major layout, ``head_dim`` features per head).

Pooled over tasks (for the least-squares fold of ``diet-width``'s repair): Σx and Σxxᵀ at the
input of ``down_proj`` and of ``o_proj`` in every block.

Everything is a float64 sum plus a token count, so shards, processes and tasks add up exactly.
The observer keeps its own hooks per block (``attach_block``), so it can follow any forward
loop that runs blocks one at a time, or the whole model at once (``attach``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from .adapters import ModelAdapter, get_module
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
class Moments:
    """Σx [L, n] and Σxxᵀ [L, n, n] of one linear layer's input in every block, over `count` tokens."""

    s: torch.Tensor
    gram: torch.Tensor
    count: int = 0

    def __add__(self, other: "Moments") -> "Moments":
        return Moments(self.s + other.s, self.gram + other.gram, self.count + other.count)


@dataclass
class WidthProfile:
    """Width statistics of every task, plus the pooled moments the repair uses (None: not collected)."""

    tasks: dict[str, WidthTaskStats]
    head_dim: int
    mlp: Moments | None = None  # input of down_proj
    attn: Moments | None = None  # input of o_proj
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
            moms[key] = (Moments(get(f"width/{key}/s"), get(f"width/{key}/gram"), counts[f"__{key}__"])
                         if f"width/{key}/gram" in keys else None)
        return cls(tasks, int(header["head_dim"]), moms["mlp"], moms["attn"], header.get("meta", {}))


class WidthObserver:
    """Forward pre-hooks on ``o_proj`` and ``down_proj`` that add into the width sums.

    Use: ``attach(model)`` (or ``attach_block(block, i)`` per block as a block-wise loop reaches
    it), then for each batch set ``mask`` (the [batch, seq] bool mask of counted tokens) and
    ``task`` (the task the batch belongs to) before the forward, and ``finish()`` at the end.
    ``detach()`` removes the hooks.
    """

    def __init__(self, adapter: ModelAdapter, model_config, tasks: list[str], device=None, moments: bool = True):
        self.adapter = adapter
        L = int(getattr(model_config, adapter.layers_key))
        heads = int(getattr(model_config, adapter.heads_key))
        inter = int(getattr(model_config, adapter.intermediate_key))
        self.heads = heads
        self.head_dim = None  # read from o_proj at attach time (configs without head_dim derive it)
        self.layers, self.inter = L, inter
        self.device = device
        self.moments = moments
        self.mask: torch.Tensor | None = None
        self.task: str | None = None
        z = dict(dtype=torch.float64, device=device)
        self.stats = {t: WidthTaskStats(torch.zeros(L, inter, **z), torch.zeros(L, heads, **z), 0) for t in tasks}
        self.mlp = Moments(torch.zeros(L, inter, **z), torch.zeros(L, inter, inter, **z)) if moments else None
        self.attn = None
        self._counted: set[int] = set()  # layers whose token count this batch already went into
        self.handles: list = []

    def _attn_moments(self, width: int) -> Moments:
        if self.attn is None:
            z = dict(dtype=torch.float64, device=self.device)
            self.attn = Moments(torch.zeros(self.layers, width, **z), torch.zeros(self.layers, width, width, **z))
        return self.attn

    def attach_block(self, block: nn.Module, index: int) -> list:
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
        if self.moments:
            self._attn_moments(o.in_features)
        new = [o.register_forward_pre_hook(self._attn_hook(index)),
               down.register_forward_pre_hook(self._mlp_hook(index))]
        self.handles += new
        return new

    def attach(self, model: nn.Module) -> list:
        new = []
        for i, block in enumerate(self.adapter.blocks(model)):
            new += self.attach_block(block, i)
        return new

    def detach(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []

    def _tokens(self, args) -> torch.Tensor:
        if self.task is None or self.mask is None:
            raise DietpruneError("width observer: set task and mask before each forward")
        x = args[0]
        return x[self.mask.to(x.device)] if x.dim() == 3 else x.reshape(-1, x.shape[-1])

    def _attn_hook(self, layer: int):
        def fn(module, args):
            x = self._tokens(args).float()
            st = self.stats[self.task]
            norms = x.view(x.shape[0], self.heads, -1).norm(dim=-1)  # [N, H]
            st.head_norm[layer] += norms.sum(0, dtype=torch.float64).to(st.head_norm.device)
            if self.attn is not None:
                self.attn.s[layer] += x.sum(0, dtype=torch.float64).to(self.attn.s.device)
                self.attn.gram[layer] += (x.T @ x).to(self.attn.gram.device, torch.float64)

        return fn

    def _mlp_hook(self, layer: int):
        def fn(module, args):
            x = self._tokens(args).float()
            st = self.stats[self.task]
            st.mlp_abs[layer] += x.abs().sum(0, dtype=torch.float64).to(st.mlp_abs.device)
            if self.mlp is not None:
                self.mlp.s[layer] += x.sum(0, dtype=torch.float64).to(self.mlp.s.device)
                self.mlp.gram[layer] += (x.T @ x).to(self.mlp.gram.device, torch.float64)

        return fn

    def count_batch(self, tokens: int) -> None:
        """Add a finished batch's token count (every hooked layer saw the same tokens)."""
        self.stats[self.task].count += int(tokens)
        for mom in (self.mlp, self.attn):
            if mom is not None:
                mom.count += int(tokens)

    def finish(self, reduce=None) -> WidthProfile:
        """The statistics so far; `reduce` (e.g. ``distributed.all_reduce``) sums tensors over processes."""
        reduce = reduce or (lambda t: t)

        def red_count(n):
            return int(reduce(torch.tensor([n], dtype=torch.float64))[0])

        tasks = {t: WidthTaskStats(reduce(st.mlp_abs.cpu()), reduce(st.head_norm.cpu()), red_count(st.count))
                 for t, st in self.stats.items()}

        def red(m):
            return None if m is None else Moments(reduce(m.s.cpu()), reduce(m.gram.cpu()), red_count(m.count))

        out = WidthProfile(tasks, int(self.head_dim or 0), red(self.mlp), red(self.attn))
        for st in out.tasks.values():
            if not (torch.isfinite(st.mlp_abs).all() and torch.isfinite(st.head_norm).all()):
                raise DietpruneError("non-finite activations (NaN/inf) at an MLP or attention output")
        return out
