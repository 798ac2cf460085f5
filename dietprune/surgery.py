"""Hidden-dimension surgery: slice every weight that touches the residual stream.

``prune_hidden_(model, kept)`` works in place and leaves plain dense tensors plus an updated
config, so ``save_pretrained`` writes a checkpoint stock transformers loads. Per-layer widths
stay uniform (one ``hidden_size``), because a stock config cannot express anything else.

The rules live in ``slice_tensor`` (state-dict name + tensor -> cut tensor), shared with the
streaming writer. Gemma multiplies embeddings by sqrt(hidden_size) at run time. After the cut that factor would
be sqrt(k) instead of sqrt(d), so the embedding rows are multiplied by sqrt(d/k); when the
embedding is tied to lm_head the final norm's gain is divided by the same factor, which
leaves the logits exactly as before.
"""

from __future__ import annotations

import torch
from torch import nn

from .adapters import ModelAdapter, adapter_for, get_module
from .errors import DietpruneError


def _param(t: torch.Tensor) -> nn.Parameter:
    return nn.Parameter(t.contiguous().clone(), requires_grad=False)


def embed_ratio(adapter: ModelAdapter, d: int, k: int) -> float:
    """Factor applied to the kept embedding columns: sqrt(d/k) for Gemma, else 1."""
    return adapter.embed_scale(d) / adapter.embed_scale(k)


def slice_tensor(adapter: ModelAdapter, name: str, tensor: torch.Tensor, kept: torch.Tensor, d: int,
                 tied: bool) -> torch.Tensor | None:
    """The cut version of one state-dict tensor, by its name; None means "not saved" (a tied lm_head).

    These are the only slicing rules: the in-memory cut (``prune_hidden_``) and the streaming cut
    (``streaming.stream_checkpoint``) both call this, tensor by tensor.
    """
    role, _, leaf = adapter.locate(name)
    idx = kept.to(tensor.device)
    if role == "reader":
        return tensor[:, idx]
    if role in ("writer", "norm"):
        return tensor[idx]
    if role == "embed":
        return tensor[:, idx] * embed_ratio(adapter, d, len(kept))
    if role == "final_norm":
        out = tensor[idx]
        ratio = embed_ratio(adapter, d, len(kept))
        if tied and ratio != 1.0 and leaf == "weight":  # lm_head reads the scaled rows: undo the factor before it
            out = (adapter.norm_offset + out) / ratio - adapter.norm_offset
        return out
    if role == "lm_head":
        if tied:
            return None
        return tensor[:, idx] if leaf == "weight" else tensor
    return tensor


def cut_config_(config, k: int) -> None:
    """hidden_size -> k; head_dim pinned so attention keeps its width."""
    d = config.hidden_size
    head_dim = getattr(config, "head_dim", None) or d // config.num_attention_heads
    config.hidden_size = k
    if hasattr(config, "head_dim") or head_dim != k // config.num_attention_heads:
        config.head_dim = head_dim


def check_kept(kept, d: int) -> torch.Tensor:
    kept = torch.as_tensor(kept, dtype=torch.long).cpu()
    if kept.dim() != 1 or len(kept) == 0:
        raise DietpruneError("kept indices must be a non-empty 1-D list")
    if len(torch.unique(kept)) != len(kept) or kept.min() < 0 or kept.max() >= d:
        raise DietpruneError(f"kept indices must be unique and within [0, {d})")
    return torch.sort(kept).values


def _set_norm_width(norm: nn.Module, k: int) -> None:
    for attr in ("normalized_shape", "hidden_size", "dim"):
        if isinstance(getattr(norm, attr, None), int):
            setattr(norm, attr, k)


@torch.no_grad()
def prune_hidden_(model: nn.Module, kept: torch.Tensor, adapter: ModelAdapter | None = None) -> nn.Module:
    """Keep only hidden dimensions `kept` (sorted, unique indices) everywhere in `model`."""
    adapter = adapter or adapter_for(model)
    config = model.config
    d = config.hidden_size
    kept = check_kept(kept, d)
    k = len(kept)

    emb = adapter.embedding(model)
    head = adapter.output_head(model)
    tied = adapter.tied(model)

    # named_parameters() lists a tied lm_head once, under the embedding's name.
    for name, p in list(model.named_parameters()):
        data = p.data
        new = slice_tensor(adapter, name, data, kept, d, tied)
        if new is not None and new is not data:
            module, _, leaf = name.rpartition(".")
            setattr(get_module(model, module), leaf, _param(new))

    for block in adapter.blocks(model):
        for name in adapter.readers:
            get_module(block, name).in_features = k
        for name in adapter.writers:
            get_module(block, name).out_features = k
        for name in adapter.residual_norms:
            _set_norm_width(get_module(block, name), k)
    _set_norm_width(adapter.norm(model), k)
    emb.embedding_dim = k
    if hasattr(emb, "embed_scale"):  # Gemma's scaled embedding keeps its factor in a buffer
        emb.embed_scale.fill_(adapter.embed_scale(k))
        emb.scalar_embed_scale = adapter.embed_scale(k)
    if tied:
        head.weight = emb.weight
    head.in_features = k
    cut_config_(config, k)
    return model
