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


def tiny_tokenizer():
    """A word-level fast tokenizer over 128 ids (0 pad, 1 bos, 2 eos, 3 unk), no downloads."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<pad>", "<bos>", "<eos>", "<unk>"] + [chr(c) for c in range(33, 127)]
    words += [w for w in ("the", "a", "is", "of", "and", "to", "in", "yes", "no", "True", "False", "Question",
                          "Answer", "it", "was", "for", "on", "that", "with", "as", "be", "at", "by", "this",
                          "are", "or", "an", "from", "not", "he", "she", "they", "we", "you") if w not in words]
    vocab = {w: i for i, w in enumerate(words[:128])}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", unk_token="<unk>",
                                   pad_token="<pad>")


def save_tiny(path, model_type: str, seed: int = 0, **overrides):
    """A tiny checkpoint folder (model + tokenizer) that `dietprune` can load like any other."""
    model = tiny_model(model_type, seed=seed, **overrides)
    model.save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path


def random_ids(batch=2, length=12, seed=1):
    """Seeded token ids of the tiny vocabulary, above the special tokens."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, 128, (batch, length), generator=g)


@torch.no_grad()
def tiny_logits(model, ids):
    return model(input_ids=ids).logits
