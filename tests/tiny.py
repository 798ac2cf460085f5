"""Tiny randomly initialised models of every supported architecture, for fast tests."""

from __future__ import annotations

import torch

ARCHS = ("gemma3_text", "gemma2", "llama", "mistral", "qwen2", "qwen3")


def tiny_config(model_type: str, **overrides):
    from transformers import AutoConfig

    common = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=128,
                  rms_norm_eps=1e-6, tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    if model_type in ("gemma3_text", "gemma2"):
        common.update(sliding_window=16, query_pre_attn_scalar=16)
    if model_type == "gemma3_text":
        common.update(layer_types=["sliding_attention", "full_attention"])
    if model_type == "llama":
        common.update(tie_word_embeddings=False)  # cover an untied lm_head too
    common.update(overrides)
    return AutoConfig.for_model(model_type, **common)


def tiny_model(model_type: str, seed: int = 0, **overrides):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    config = tiny_config(model_type, **overrides)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32, attn_implementation="eager")
    with torch.no_grad():  # random norm gains and biases so slicing mistakes cannot hide behind ones/zeros
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith(".bias"):
                p.normal_(0.0, 0.3)
    return model.eval()
