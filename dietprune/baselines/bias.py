"""Output biases for FLAP's compensation, where the stock config has a switch for them.

Llama's ``attention_bias`` gives q/k/v/o a bias and ``mlp_bias`` gives gate/up/down one; Qwen3
and Gemma have ``attention_bias`` only; Mistral and Qwen2 (whose q/k/v bias is fixed on and
o_proj bias fixed off) have neither. Turning a switch on adds zero biases to the layers that
lacked one, which leaves every output unchanged, and the compensation then goes into the
o_proj / down_proj bias.
"""

from __future__ import annotations

import torch
from torch import nn

from ..adapters import ModelAdapter, get_module


def bias_switch(adapter: ModelAdapter, kind: str) -> str | None:
    return adapter.attention_bias_key if kind == "attention" else adapter.mlp_bias_key


def _linears(adapter: ModelAdapter, kind: str) -> tuple[str, ...]:
    if kind == "attention":
        return (adapter.q_proj, adapter.k_proj, adapter.v_proj, adapter.o_proj)
    return (*adapter.mlp_in, adapter.mlp_out)


@torch.no_grad()
def enable_bias_(model: nn.Module, adapter: ModelAdapter, kind: str) -> bool:
    """Switch on the config's bias option for `kind` ('attention' or 'mlp'); False if there is none."""
    key = bias_switch(adapter, kind)
    if key is None:
        return False
    for block in adapter.blocks(model):
        for name in _linears(adapter, kind):
            lin = get_module(block, name)
            if lin.bias is None:
                lin.bias = nn.Parameter(torch.zeros(lin.out_features, dtype=lin.weight.dtype,
                                                    device=lin.weight.device), requires_grad=False)
    setattr(model.config, key, True)
    return True


@torch.no_grad()
def add_to_bias_(lin: nn.Linear, delta: torch.Tensor) -> None:
    lin.bias.data += delta.to(lin.bias.dtype).to(lin.bias.device)
