"""Calibration passes of the structured baselines: hooks that keep sums and token counts.

The calibration set is the user's task samples pooled (``config.samples`` per task, the same
seeded draw DIET profiles on). Every statistic is a float64 sum over non-padding tokens plus
the token count, as in ``profile.py``; means are taken only when a score is computed. One
forward pass of the dense model collects everything a method needs.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from torch import nn

from ..adapters import ModelAdapter, get_module
from ..data import calibration_examples
from ..encoding import batches, calibration_ids, wants_bos
from ..errors import DietpruneError
from ..profile import token_mask
from ..progress import progress
from ..tasks import parse_tasks
from .scores import cosine_sum


def task_sequences(model, tokenizer, config, data_dir) -> list[list[int]]:
    """Token ids of the pooled task calibration samples (query + gold answer each)."""
    if tokenizer is None:
        raise DietpruneError(f"method '{config.method}' calibrates on task data and needs a tokenizer")
    add_bos = wants_bos(model)
    seqs: list[list[int]] = []
    for task in parse_tasks(config.tasks):
        examples = calibration_examples(task, config.samples, config.seed, data_dir)
        seqs += [s for s in calibration_ids(tokenizer, examples, add_bos, config.max_length) if s]
    if not seqs:
        raise DietpruneError("no calibration tokens: every calibration sample encoded to nothing")
    return seqs


@dataclass
class InputMoments:
    """Σx, Σx² per input feature of one linear layer, over `count` tokens."""

    s: torch.Tensor
    sq: torch.Tensor
    count: int = 0


def _first(args, kwargs, name):
    if args:
        return args[0]
    return kwargs[name]


def _tensor(output):
    return output[0] if isinstance(output, (tuple, list)) else output


class _Pass:
    def __init__(self):
        self.mask: torch.Tensor | None = None
        self.handles = []


@contextlib.contextmanager
def _removing(handles):
    try:
        yield
    finally:
        for h in handles:
            h.remove()


@torch.no_grad()
def run_calibration(model: nn.Module, tokenizer, sequences: list[list[int]], config, state: _Pass, desc: str) -> int:
    """Forward every batch with `state.mask` set to its token mask; returns the token count."""
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    bos = tokenizer.bos_token_id
    tokens = 0
    n_batches = -(-len(sequences) // config.batch_size)
    with _removing(state.handles):
        for ids, attn in progress(batches(sequences, config.batch_size, pad), total=n_batches, desc=desc):
            ids, attn = ids.to(device), attn.to(device)
            state.mask = token_mask(ids, attn, config.skip_bos, bos)
            model(input_ids=ids, attention_mask=attn, use_cache=False, logits_to_keep=1)
            tokens += int(state.mask.sum())
    if tokens == 0:
        raise DietpruneError("no calibration tokens after masking")
    return tokens


@torch.no_grad()
def linear_input_moments(model: nn.Module, adapter: ModelAdapter, tokenizer, sequences, config,
                         names: tuple[str, ...], desc: str) -> dict[str, list[InputMoments]]:
    """For each block-relative linear name: per layer, Σx and Σx² of its input features."""
    state = _Pass()
    out: dict[str, list[InputMoments]] = {}
    device = next(model.parameters()).device
    for name in names:
        out[name] = []
        for block in adapter.blocks(model):
            lin = get_module(block, name)
            mom = InputMoments(torch.zeros(lin.in_features, dtype=torch.float64, device=device),
                               torch.zeros(lin.in_features, dtype=torch.float64, device=device))
            out[name].append(mom)

            def hook(module, args, mom=mom):
                x = args[0][state.mask].to(torch.float64)
                mom.s += x.sum(0)
                mom.sq += (x * x).sum(0)
                mom.count += x.shape[0]

            state.handles.append(lin.register_forward_pre_hook(hook))
    run_calibration(model, tokenizer, sequences, config, state, desc)
    for moms in out.values():
        for m in moms:
            m.s, m.sq = m.s.cpu(), m.sq.cpu()
            if not (torch.isfinite(m.s).all() and torch.isfinite(m.sq).all()):
                raise DietpruneError("non-finite activations (NaN/inf) during calibration")
    return out


@torch.no_grad()
def block_cosine_sums(model: nn.Module, adapter: ModelAdapter, tokenizer, sequences, config,
                      desc: str = "block influence") -> tuple[torch.Tensor, int]:
    """Per decoder block: Σ over tokens of cos(block input, block output), and the token count."""
    state = _Pass()
    blocks = adapter.blocks(model)
    sums = torch.zeros(len(blocks), dtype=torch.float64)
    counts = [0] * len(blocks)
    for i, block in enumerate(blocks):
        def hook(module, args, kwargs, output, i=i):
            x = _first(args, kwargs, "hidden_states")
            s, n = cosine_sum(x, _tensor(output), state.mask)
            sums[i] += s
            counts[i] += n

        state.handles.append(block.register_forward_hook(hook, with_kwargs=True))
    run_calibration(model, tokenizer, sequences, config, state, desc)
    if len(set(counts)) != 1:
        raise DietpruneError("decoder blocks saw different token counts during calibration")
    if not torch.isfinite(sums).all():
        raise DietpruneError("non-finite activations (NaN/inf) during calibration")
    return sums, counts[0]
