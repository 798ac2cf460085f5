"""Where the hidden dimension lives, per architecture family.

An adapter is data, not code: module paths relative to the model or to one decoder block,
which linear layers read the hidden dimension (input side) and which write it (output side),
which norms sit on the residual path, and the few numeric conventions (Gemma's ``1 + w`` norm
gain, Gemma's ``sqrt(hidden_size)`` embedding scale). Profiling, surgery, repair and the
baselines only ever go through an adapter; no other module looks at model names.

An unknown ``model_type`` is an error listing the supported families, never a guess.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from .errors import DietpruneError


@dataclass(frozen=True)
class ModelAdapter:
    family: str
    model_types: tuple[str, ...]
    # Linear layers of a block whose *input* features are the hidden dimension.
    readers: tuple[str, ...]
    # Linear layers of a block whose *output* features are the hidden dimension.
    writers: tuple[str, ...]
    # Norms of a block that act on the hidden dimension, in execution order.
    residual_norms: tuple[str, ...]
    # For each norm whose output is read by projections: the projections that read it.
    norm_readers: dict[str, tuple[str, ...]]
    # For each writer: the norm applied to its output before the residual add (Gemma), or None.
    attention: str = "self_attn"
    mlp: str = "mlp"
    layers: str = "model.layers"
    embed: str = "model.embed_tokens"
    final_norm: str = "model.norm"
    lm_head: str = "lm_head"
    # RMSNorm output = x / rms(x) * (norm_offset + weight)
    norm_offset: float = 0.0
    # Embeddings are multiplied by sqrt(config.hidden_size) inside the model's forward.
    embed_scaled_by_sqrt_hidden: bool = False
    # lm-evaluation-harness prepends BOS for this family (Gemma); calibration follows the same rule.
    add_bos: bool = False
    # Attention / MLP internals for structured baselines (heads, channels).
    q_proj: str = "self_attn.q_proj"
    k_proj: str = "self_attn.k_proj"
    v_proj: str = "self_attn.v_proj"
    o_proj: str = "self_attn.o_proj"
    mlp_in: tuple[str, ...] = ("mlp.gate_proj", "mlp.up_proj")
    mlp_out: str = "mlp.down_proj"
    # Config keys the structured baselines rewrite (heads, KV heads, MLP width, depth).
    heads_key: str = "num_attention_heads"
    kv_heads_key: str = "num_key_value_heads"
    intermediate_key: str = "intermediate_size"
    layers_key: str = "num_hidden_layers"
    # Per-layer list in the config (attention type of each layer) kept in step when layers go.
    layer_types_key: str | None = "layer_types"
    # The stock config rejects hidden_size % num_attention_heads != 0 (Llama, Gemma).
    heads_divide_hidden: bool = False
    # Config switch that gives q/k/v/o (resp. gate/up/down) a bias; None where the
    # architecture has no such option (Mistral, Qwen2's o_proj, every non-Llama MLP).
    attention_bias_key: str | None = None
    mlp_bias_key: str | None = None
    # Config keys that llama.cpp derives from a GGUF's attention.key_length (the head size): a GGUF
    # read back through transformers gets them from there (transformers' own GGUF mapping misses
    # head_dim for Qwen and assumes Gemma's query_pre_attn_scalar is 256, where llama.cpp takes the head size).
    gguf_key_length_keys: tuple[str, ...] = ("head_dim",)
    extra: dict = field(default_factory=dict)

    # ---- module access -------------------------------------------------------------
    def blocks(self, model: nn.Module) -> list[nn.Module]:
        return list(get_module(model, self.layers))

    def embedding(self, model: nn.Module) -> nn.Embedding:
        return get_module(model, self.embed)

    def output_head(self, model: nn.Module) -> nn.Linear:
        return get_module(model, self.lm_head)

    def norm(self, model: nn.Module) -> nn.Module:
        return get_module(model, self.final_norm)

    def tied(self, model: nn.Module) -> bool:
        return self.output_head(model).weight is self.embedding(model).weight

    def reader_norms(self) -> tuple[str, ...]:
        """Norms whose outputs feed projections: the 'norm-out' tap."""
        return tuple(self.norm_readers)

    def write_norms(self) -> tuple[str, ...]:
        """Residual norms whose output is added to the residual stream (Gemma's post-norms)."""
        return tuple(n for n in self.residual_norms if n not in self.norm_readers)

    def embed_scale(self, hidden_size: int) -> float:
        return float(hidden_size) ** 0.5 if self.embed_scaled_by_sqrt_hidden else 1.0

    def width_multiple(self, config) -> int:
        """Stock transformers configs (Llama, Gemma) require hidden_size % num_attention_heads == 0."""
        return int(config.num_attention_heads)

    def locate(self, name: str) -> tuple[str, int | None, str]:
        """Where a state-dict tensor sits: (role, block index or None, path inside its block).

        role is 'embed', 'final_norm', 'lm_head', 'reader', 'writer', 'norm' (a residual norm)
        or 'other' (untouched by the hidden dimension, e.g. q_norm, rotary buffers).
        """
        module, _, leaf = name.rpartition(".")
        if module == self.embed:
            return "embed", None, leaf
        if module == self.final_norm:
            return "final_norm", None, leaf
        if module == self.lm_head:
            return "lm_head", None, leaf
        prefix = self.layers + "."
        if module.startswith(prefix):
            index, _, inner = module[len(prefix):].partition(".")
            if index.isdigit():
                if inner in self.readers and leaf == "weight":
                    return "reader", int(index), inner
                if inner in self.writers:
                    return "writer", int(index), inner
                if inner in self.residual_norms:
                    return "norm", int(index), inner
                return "other", int(index), inner
        return "other", None, module

    # ---- the width axes (diet-width) -------------------------------------------------
    def head_layout(self, model: nn.Module) -> tuple[int, int, int]:
        """(query heads, KV heads, head_dim) of the model, the same in every layer."""
        cfg = model.config
        heads, kv = int(getattr(cfg, self.heads_key)), int(getattr(cfg, self.kv_heads_key))
        q = get_module(self.blocks(model)[0], self.q_proj)
        if heads % kv or q.out_features % heads:
            raise DietpruneError(f"{heads} heads / {kv} KV heads / q_proj width {q.out_features} do not fit")
        return heads, kv, q.out_features // heads

    def width_axes(self, name: str, ndim: int) -> tuple[str | None, ...]:
        """Which width each dimension of a state-dict tensor runs along.

        'hidden' (the residual stream), 'q' (query-head features: q_proj rows, o_proj columns),
        'kv' (k/v rows), 'mlp' (intermediate channels: gate/up rows, down_proj columns), or None
        (a dimension no width cut changes: vocabulary, head_dim of q/k norms, ...). Weights are
        [out, in]; a bias follows its layer's output side.
        """
        role, layer, module = self.locate(name)
        if role == "embed":
            return (None, "hidden")
        if role == "final_norm":
            return ("hidden",)
        if role == "lm_head":
            return (None, "hidden") if ndim == 2 else (None,)
        if role == "norm":
            return ("hidden",)
        if role in ("reader", "writer", "other") and layer is not None:
            out_in = {self.q_proj: ("q", "hidden"), self.k_proj: ("kv", "hidden"), self.v_proj: ("kv", "hidden"),
                      self.o_proj: ("hidden", "q"), self.mlp_out: ("hidden", "mlp")}
            out_in.update({n: ("mlp", "hidden") for n in self.mlp_in})
            if module in out_in:
                axes = out_in[module]
                return axes if ndim == 2 else axes[:1]
        return (None,) * ndim

    def check(self, model: nn.Module) -> None:
        """Every declared module must exist with the expected hidden width."""
        d = model.config.hidden_size
        blocks = self.blocks(model)
        if len(blocks) != model.config.num_hidden_layers:
            raise DietpruneError(
                f"{self.family} adapter found {len(blocks)} blocks at '{self.layers}', "
                f"config says {model.config.num_hidden_layers}"
            )
        for block in blocks:
            for name in self.readers:
                lin = get_module(block, name)
                if lin.in_features != d:
                    raise DietpruneError(f"{name} reads {lin.in_features} features, hidden_size is {d}")
            for name in self.writers:
                lin = get_module(block, name)
                if lin.out_features != d:
                    raise DietpruneError(f"{name} writes {lin.out_features} features, hidden_size is {d}")
            for name in self.residual_norms:
                if get_module(block, name).weight.shape[0] != d:
                    raise DietpruneError(f"norm {name} is not {d} wide")


def get_module(root: nn.Module, path: str) -> nn.Module:
    mod = root
    for part in path.split("."):
        if not hasattr(mod, part):
            raise DietpruneError(f"{type(root).__name__} has no submodule '{path}'")
        mod = getattr(mod, part)
    return mod


_LLAMA_LIKE = dict(
    readers=("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.gate_proj", "mlp.up_proj"),
    writers=("self_attn.o_proj", "mlp.down_proj"),
    residual_norms=("input_layernorm", "post_attention_layernorm"),
    norm_readers={
        "input_layernorm": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
        "post_attention_layernorm": ("mlp.gate_proj", "mlp.up_proj"),
    },
)

_GEMMA_SANDWICH = dict(
    readers=_LLAMA_LIKE["readers"],
    writers=_LLAMA_LIKE["writers"],
    residual_norms=(
        "input_layernorm",
        "post_attention_layernorm",
        "pre_feedforward_layernorm",
        "post_feedforward_layernorm",
    ),
    norm_readers={
        "input_layernorm": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
        "pre_feedforward_layernorm": ("mlp.gate_proj", "mlp.up_proj"),
    },
    norm_offset=1.0,
    embed_scaled_by_sqrt_hidden=True,
    add_bos=True,
    gguf_key_length_keys=("head_dim", "query_pre_attn_scalar"),
)

ADAPTERS: tuple[ModelAdapter, ...] = (
    ModelAdapter(family="gemma3", model_types=("gemma3_text",), **_GEMMA_SANDWICH, heads_divide_hidden=True,
                 attention_bias_key="attention_bias"),
    ModelAdapter(family="gemma2", model_types=("gemma2",), **_GEMMA_SANDWICH, heads_divide_hidden=True,
                 attention_bias_key="attention_bias"),
    ModelAdapter(family="llama", model_types=("llama",), **_LLAMA_LIKE, heads_divide_hidden=True,
                 attention_bias_key="attention_bias", mlp_bias_key="mlp_bias"),
    ModelAdapter(family="mistral", model_types=("mistral",), **_LLAMA_LIKE, layer_types_key=None),
    ModelAdapter(family="qwen2", model_types=("qwen2",), **_LLAMA_LIKE),
    ModelAdapter(family="qwen3", model_types=("qwen3",), **_LLAMA_LIKE, attention_bias_key="attention_bias"),
)


def supported_model_types() -> list[str]:
    return sorted(t for a in ADAPTERS for t in a.model_types)


def adapter_for_type(model_type: str) -> ModelAdapter:
    for adapter in ADAPTERS:
        if model_type in adapter.model_types:
            return adapter
    raise DietpruneError(
        f"unsupported architecture '{model_type}'; supported: {', '.join(supported_model_types())}"
    )


def bos_policy(config) -> bool:
    """Does this architecture's prompt start with BOS? (False for a family without an adapter.)"""
    model_type = getattr(config, "model_type", None)
    return any(a.add_bos for a in ADAPTERS if model_type in a.model_types)


def adapter_for(model: nn.Module) -> ModelAdapter:
    adapter = adapter_for_type(getattr(model.config, "model_type", "?"))
    adapter.check(model)
    return adapter


@torch.no_grad()
def param_count(model: nn.Module) -> int:
    """Parameters as a saved checkpoint counts them (tied weights once)."""
    seen: set[int] = set()
    total = 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
    return total
