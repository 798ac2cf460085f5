"""Calibration passes of the structured baselines: hooks that keep sums and token counts.

The calibration set is the user's task samples pooled (``config.samples`` per task, the same
seeded draw DIET profiles on). Every statistic is a float64 sum over non-padding tokens plus
the token count, as in ``profile.py``; means are taken only when a score is computed. One
forward pass of the dense model collects everything a method needs.
"""

from __future__ import annotations

import torch
from torch import nn

from .. import engine
from ..adapters import ModelAdapter, get_module
from ..data import calibration_examples
from ..encoding import calibration_ids, wants_bos
from ..engine import Observer, make_batches, output_tensor
from ..errors import DietpruneError
from ..stats import Moments
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


class LinearInputs(Observer):
    """Σx and Σx² of the input features of the named linears of every block (one Moments each)."""

    def __init__(self, names: tuple[str, ...], device):
        self.names, self.device = names, device
        self.moments: dict[str, list[Moments]] = {n: [] for n in names}

    def attach(self, block, index, run):
        handles = []
        for name in self.names:
            lin = get_module(block, name)
            mom = Moments.zeros(lin.in_features, sum=True, sq=True, device=self.device)
            self.moments[name].append(mom)
            handles.append(lin.register_forward_pre_hook(lambda m, args, mom=mom: mom.add(args[0][run.mask])))
        return handles

    def finish_model(self, model, run):
        for name, moms in self.moments.items():
            self.moments[name] = [m.cpu() for m in moms]
            if not all(m.finite() for m in moms):
                raise DietpruneError("non-finite activations (NaN/inf) during calibration")


class BlockCosine(Observer):
    """Per decoder block: Σ over tokens of cos(block input, block output), and the token counts."""

    def __init__(self, n_blocks: int):
        self.sums = torch.zeros(n_blocks, dtype=torch.float64)
        self.counts = [0] * n_blocks

    def attach(self, block, index, run):
        def hook(module, args, kwargs, output):
            s, n = cosine_sum(args[0] if args else kwargs["hidden_states"], output_tensor(output), run.mask)
            self.sums[index] += s
            self.counts[index] += n

        return [block.register_forward_hook(hook, with_kwargs=True)]


def _batches(tokenizer, sequences, config):
    batches = make_batches(sequences, config.batch_size, tokenizer, skip_bos=config.skip_bos)
    if sum(int(b.mask.sum()) for b in batches) == 0:
        raise DietpruneError("no calibration tokens after masking")
    return batches


@torch.no_grad()
def linear_input_moments(model: nn.Module, adapter: ModelAdapter, tokenizer, sequences, config,
                         names: tuple[str, ...], desc: str) -> dict[str, list[Moments]]:
    """For each block-relative linear name: per layer, Σx and Σx² of its input features."""
    obs = LinearInputs(names, next(model.parameters()).device)
    engine.run(model, _batches(tokenizer, sequences, config), [obs], desc=desc)
    return obs.moments


@torch.no_grad()
def block_cosine_sums(model: nn.Module, adapter: ModelAdapter, tokenizer, sequences, config,
                      desc: str = "block influence") -> tuple[torch.Tensor, int]:
    """Per decoder block: Σ over tokens of cos(block input, block output), and the token count."""
    obs = BlockCosine(len(adapter.blocks(model)))
    engine.run(model, _batches(tokenizer, sequences, config), [obs], desc=desc)
    if len(set(obs.counts)) != 1:
        raise DietpruneError("decoder blocks saw different token counts during calibration")
    if not torch.isfinite(obs.sums).all():
        raise DietpruneError("non-finite activations (NaN/inf) during calibration")
    return obs.sums, obs.counts[0]
