"""Merging per-task importance into one global set of kept hidden dimensions.

Pure functions: tensors in, tensors out, no model. Every ordering is deterministic: ties
are broken by an explicit secondary key and finally by the dimension index.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .errors import DietpruneError
from .registry import MERGES, check_sparsity  # noqa: F401



def keep_count(d: int, sparsity: float, align: int = 1) -> int:
    """Number of dimensions to keep: round(d * (1 - sparsity)), optionally to a multiple of `align`."""
    check_sparsity(sparsity)
    k = int(round(d * (1.0 - sparsity)))
    if align > 1:
        k = max(align, int(round(k / align)) * align)
    return max(1, min(d, k))


def order_by(*keys: torch.Tensor) -> torch.Tensor:
    """Indices sorted by descending keys[0], then keys[1], ..., then ascending index."""
    n = keys[0].numel()
    order = torch.arange(n)
    for key in reversed(keys):  # least significant first; stable sorts keep earlier order
        order = order[torch.argsort(-key[order].double(), stable=True)]
    return order


def normalize(scores: torch.Tensor) -> torch.Tensor:
    """Per-task scores divided by their mean, so every task weighs the same."""
    scores = scores.double()
    mean = scores.mean(dim=-1, keepdim=True)
    if (mean <= 0).any() or not torch.isfinite(scores).all():
        raise DietpruneError("importance scores must be finite with a positive mean")
    return scores / mean


def task_masks(scores: torch.Tensor, k: int) -> torch.Tensor:
    """[tasks, d] bool: each task's own top-k dimensions."""
    masks = torch.zeros_like(scores, dtype=torch.bool)
    for t in range(scores.shape[0]):
        masks[t, order_by(scores[t])[:k]] = True
    return masks


def ranks(scores: torch.Tensor) -> torch.Tensor:
    """[tasks, d] rank of each dimension within its task (0 = most important)."""
    out = torch.empty_like(scores, dtype=torch.float64)
    for t in range(scores.shape[0]):
        out[t, order_by(scores[t])] = torch.arange(scores.shape[1], dtype=torch.float64)
    return out


@dataclass
class MergeResult:
    kept: torch.Tensor  # sorted LongTensor of kept dimension indices
    votes: torch.Tensor  # [d] number of tasks whose top-k holds each dimension
    task_masks: torch.Tensor  # [tasks, d] bool
    method: str
    k: int

    def mask(self, d: int | None = None) -> torch.Tensor:
        d = d or self.votes.numel()
        m = torch.zeros(d, dtype=torch.bool)
        m[self.kept] = True
        return m


def merge(scores: torch.Tensor, sparsity: float, method: str = "vote", align: int = 1) -> MergeResult:
    """Merge a [tasks, d] score matrix into one mask keeping exactly keep_count(d, sparsity) dims.

    - vote: each task keeps its top-k; a dimension's votes = tasks keeping it; keep the k with
      most votes, ties broken by the mean normalised score, then by index.
    - mean: keep the k with the highest mean normalised score.
    - rank: keep the k with the lowest mean within-task rank (ties by mean normalised score).
    """
    from .validate import integer

    if not isinstance(scores, torch.Tensor) or scores.dim() not in (1, 2) or scores.numel() == 0 \
            or not (scores.is_floating_point() or scores.dtype in (torch.int32, torch.int64)):
        raise DietpruneError("scores must be a non-empty [tasks, d] (or [d]) tensor of numbers, got "
                             + (f"shape {tuple(scores.shape)} {scores.dtype}" if isinstance(scores, torch.Tensor)
                                else type(scores).__name__))
    align = integer("align", align, 1)
    if scores.dim() == 1:
        scores = scores[None]
    if method not in MERGES:
        raise DietpruneError(f"unknown merge '{method}'; choose from {', '.join(MERGES)}")
    d = scores.shape[1]
    return merge_k(scores, keep_count(d, sparsity, align), method)


def merge_k(scores: torch.Tensor, k: int, method: str = "vote") -> MergeResult:
    """``merge`` with the kept count given directly (1 <= k <= d): the rule every width axis shares."""
    if scores.dim() == 1:
        scores = scores[None]
    if method not in MERGES:
        raise DietpruneError(f"unknown merge '{method}'; choose from {', '.join(MERGES)}")
    d = scores.shape[1]
    if not 1 <= k <= d:
        raise DietpruneError(f"cannot keep {k} of {d}")
    norm = normalize(scores)
    mean_norm = norm.mean(0)
    masks = task_masks(scores, k)
    votes = masks.sum(0)
    if method == "vote":
        order = order_by(votes.double(), mean_norm)
    elif method == "mean":
        order = order_by(mean_norm)
    else:
        order = order_by(-ranks(scores).mean(0), mean_norm)
    kept = torch.sort(order[:k]).values
    return MergeResult(kept=kept, votes=votes, task_masks=masks, method=method, k=k)


def merge_layers(scores: torch.Tensor, k: int, method: str = "vote") -> list[MergeResult]:
    """One merge per layer of a [tasks, layers, n] score tensor, the same k in every layer."""
    if scores.dim() != 3:
        raise DietpruneError(f"expected [tasks, layers, n] scores, got shape {tuple(scores.shape)}")
    return [merge_k(scores[:, layer], k, method) for layer in range(scores.shape[1])]


def merge_heads(scores: torch.Tensor, groups: int, per_group: int, n_groups: int,
                method: str = "vote") -> tuple[torch.Tensor, torch.Tensor]:
    """Kept KV groups and query heads of one layer from [tasks, heads] query-head scores.

    Heads are head-major: query heads ``j*q..(j+1)*q-1`` share KV head j (q = heads // n_groups).
    First the `groups` KV groups are voted on (a group's score is the sum of its heads'), then
    inside every kept group its `per_group` query heads; both with ``merge_k``'s rule.
    Returns (sorted kept groups, sorted kept query-head indices, group by group).
    """
    if scores.dim() == 1:
        scores = scores[None]
    tasks, heads = scores.shape
    if heads % n_groups:
        raise DietpruneError(f"{heads} heads do not split into {n_groups} KV groups")
    q = heads // n_groups
    if not (1 <= groups <= n_groups and 1 <= per_group <= q):
        raise DietpruneError(f"cannot keep {groups} of {n_groups} groups with {per_group} of {q} heads each")
    by_group = scores.reshape(tasks, n_groups, q)
    kept_groups = merge_k(by_group.sum(-1), groups, method).kept
    kept_heads = [g * q + merge_k(by_group[:, g], per_group, method).kept for g in kept_groups.tolist()]
    return kept_groups, torch.cat(kept_heads)


def jaccard(a, b) -> float:
    """Overlap |a ∩ b| / |a ∪ b| of two sets of kept dimensions (index tensors or sequences)."""
    a = set(a.tolist() if isinstance(a, torch.Tensor) else a)
    b = set(b.tolist() if isinstance(b, torch.Tensor) else b)
    return len(a & b) / len(a | b) if a | b else 1.0
