"""Tokenising formatted examples, shared by calibration and evaluation.

BOS policy: the harness prepends BOS for Gemma models and not for others unless asked; the
same rule (``ModelAdapter.add_bos``) applies here everywhere, so calibration sees exactly what
evaluation sees.
"""

from __future__ import annotations

import torch

from .tasks import Example


def wants_bos(model_or_config) -> bool:
    """The BOS policy of the model's family (``ModelAdapter.add_bos``)."""
    from .adapters import bos_policy

    return bos_policy(getattr(model_or_config, "config", model_or_config))


def encode(tokenizer, text: str, add_bos: bool) -> list[int]:
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if add_bos and tokenizer.bos_token_id is not None:
        ids = [tokenizer.bos_token_id] + ids
    return ids


def encode_pair(tokenizer, context: str, continuation: str, add_bos: bool) -> tuple[list[int], list[int]]:
    """(context ids, continuation ids) split the way lm-evaluation-harness splits them.

    Trailing spaces of the context move to the continuation; the context is encoded on its own
    and the continuation is what follows as many tokens in the encoding of the whole string.
    """
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        continuation = context[-n_spaces:] + continuation
        context = context[:-n_spaces]
    whole = encode(tokenizer, context + continuation, add_bos)
    ctx = encode(tokenizer, context, add_bos)
    return ctx, whole[len(ctx) :]


def calibration_ids(tokenizer, examples: list[Example], add_bos: bool, max_length: int) -> list[list[int]]:
    """Each calibration sample is the query followed by its gold answer."""
    out = []
    for ex in examples:
        context, continuation = ex.calibration_text
        ids = encode(tokenizer, context + continuation, add_bos)
        out.append(ids[:max_length])
    return out


def batches(sequences: list[list[int]], batch_size: int, pad_id: int):
    """Length-sorted right-padded batches: yields (input_ids, attention_mask)."""
    order = sorted(range(len(sequences)), key=lambda i: -len(sequences[i]))
    for start in range(0, len(order), batch_size):
        chunk = [sequences[i] for i in order[start : start + batch_size]]
        width = max(len(s) for s in chunk)
        ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for row, seq in enumerate(chunk):
            ids[row, : len(seq)] = torch.tensor(seq, dtype=torch.long)
            mask[row, : len(seq)] = 1
        yield ids, mask
