"""Hidden-dimension surgery: slice every weight that touches the residual stream.

``prune_hidden_(model, kept)`` works in place and leaves plain dense tensors plus an updated
config, so ``save_pretrained`` writes a checkpoint stock transformers loads. Per-layer widths
stay uniform (one ``hidden_size``), because a stock config cannot express anything else.

Gemma multiplies embeddings by sqrt(hidden_size) at run time. After the cut that factor would
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


def slice_linear_(lin: nn.Linear, kept: torch.Tensor, side: str) -> None:
    """side='in': keep input features `kept`; side='out': keep output features (and bias)."""
    idx = kept.to(lin.weight.device)
    if side == "in":
        lin.weight = _param(lin.weight.data[:, idx])
        lin.in_features = len(kept)
    else:
        lin.weight = _param(lin.weight.data[idx, :])
        if lin.bias is not None:
            lin.bias = _param(lin.bias.data[idx])
        lin.out_features = len(kept)


def slice_norm_(norm: nn.Module, kept: torch.Tensor) -> None:
    norm.weight = _param(norm.weight.data[kept.to(norm.weight.device)])
    if getattr(norm, "bias", None) is not None:
        norm.bias = _param(norm.bias.data[kept.to(norm.bias.device)])
    for attr in ("normalized_shape", "hidden_size", "dim"):
        if isinstance(getattr(norm, attr, None), int):
            setattr(norm, attr, len(kept))


@torch.no_grad()
def prune_hidden_(model: nn.Module, kept: torch.Tensor, adapter: ModelAdapter | None = None) -> nn.Module:
    """Keep only hidden dimensions `kept` (sorted, unique indices) everywhere in `model`."""
    adapter = adapter or adapter_for(model)
    config = model.config
    d = config.hidden_size
    kept = torch.as_tensor(kept, dtype=torch.long).cpu()
    if kept.dim() != 1 or len(kept) == 0:
        raise DietpruneError("kept indices must be a non-empty 1-D list")
    if len(torch.unique(kept)) != len(kept) or kept.min() < 0 or kept.max() >= d:
        raise DietpruneError(f"kept indices must be unique and within [0, {d})")
    kept = torch.sort(kept).values
    k = len(kept)
    head_dim = getattr(config, "head_dim", None) or d // config.num_attention_heads

    emb = adapter.embedding(model)
    head = adapter.output_head(model)
    tied = adapter.tied(model)
    final_norm = adapter.norm(model)
    ratio = adapter.embed_scale(d) / adapter.embed_scale(k)  # sqrt(d/k) for Gemma, else 1

    for block in adapter.blocks(model):
        for name in adapter.readers:
            slice_linear_(get_module(block, name), kept, "in")
        for name in adapter.writers:
            slice_linear_(get_module(block, name), kept, "out")
        for name in adapter.residual_norms:
            slice_norm_(get_module(block, name), kept)

    slice_norm_(final_norm, kept)
    emb_weight = emb.weight.data[:, kept.to(emb.weight.device)] * ratio
    emb.weight = _param(emb_weight)
    emb.embedding_dim = k
    if hasattr(emb, "embed_scale"):  # Gemma's scaled embedding keeps its factor in a buffer
        emb.embed_scale.fill_(adapter.embed_scale(k))
        emb.scalar_embed_scale = adapter.embed_scale(k)
    if tied:
        head.weight = emb.weight
        if ratio != 1.0:  # lm_head reads the scaled rows: undo the factor before it
            gain = (adapter.norm_offset + final_norm.weight.data) / ratio
            final_norm.weight.data.copy_(gain - adapter.norm_offset)
    else:
        slice_linear_(head, kept, "in")
    head.in_features = k

    config.hidden_size = k
    if hasattr(config, "head_dim") or head_dim != k // config.num_attention_heads:
        config.head_dim = head_dim
    return model
