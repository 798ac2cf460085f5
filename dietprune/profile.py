"""DIET profiling: per-task mean |activation| of every hidden dimension at a tap point.

Tap points (where activations are read):

- ``residual``: the output of every decoder block (the residual stream), the literal reading.
- ``norm-out``: the outputs of the norms that feed projections (what the weights read).
- ``write``: what each sub-layer adds to the residual stream (Gemma's post-norm outputs,
  otherwise the outputs of o_proj / down_proj).

Forward hooks add ``sum |x|`` over non-padding tokens into float64 accumulators; nothing but
those sums is kept, so memory does not grow with the number of samples.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass

import torch
from torch import nn

from .adapters import ModelAdapter, adapter_for, get_module
from .data import calibration_examples
from .encoding import batches, calibration_ids, wants_bos
from .errors import DietpruneError
from .progress import progress
from .stats import NormStats, Profile, TaskStats
from .tasks import Task, parse_tasks

TAPS = ("residual", "norm-out", "write")
DEFAULT_TAP = "norm-out"


def block_tap_names(adapter: ModelAdapter, tap: str) -> tuple[str, ...]:
    """Modules of one block whose outputs are read at `tap` ('' is the block itself)."""
    if tap == "residual":
        return ("",)
    if tap == "norm-out":
        return adapter.reader_norms()
    if tap == "write":
        return adapter.write_norms() or adapter.writers
    raise DietpruneError(f"unknown tap '{tap}'; choose from {', '.join(TAPS)}")


def block_tap_points(block: nn.Module, index: int, adapter: ModelAdapter, tap: str) -> list[tuple[str, nn.Module]]:
    prefix = f"{adapter.layers}.{index}"
    return [(f"{prefix}.{n}" if n else prefix, get_module(block, n) if n else block)
            for n in block_tap_names(adapter, tap)]


def tap_points(model: nn.Module, adapter: ModelAdapter, tap: str) -> list[tuple[str, nn.Module]]:
    return [p for i, b in enumerate(adapter.blocks(model)) for p in block_tap_points(b, i, adapter, tap)]


def _tensor(output):
    return output[0] if isinstance(output, (tuple, list)) else output


class _Accumulator:
    """Holds the current batch's token mask and the running sums."""

    def __init__(self, n_points: int, d: int, device):
        self.mask: torch.Tensor | None = None
        self.abs_sum = torch.zeros(n_points, d, dtype=torch.float64, device=device)
        self.names: list[str] = []

    def hook(self, index: int):
        def fn(module, args, output):
            x = _tensor(output)
            tokens = x[self.mask]  # [N, d]
            self.abs_sum[index] += tokens.abs().sum(0, dtype=torch.float64).to(self.abs_sum.device)

        return fn


class _NormAccumulator:
    """Sums of x**2 entering each residual norm, and optional Gram matrices of reader-norm outputs."""

    def __init__(self, adapter: ModelAdapter, n_layers: int, d: int, device, gram: bool):
        self.adapter = adapter
        self.mask: torch.Tensor | None = None
        self.in_sq = torch.zeros(n_layers, len(adapter.residual_norms), d, dtype=torch.float64, device=device)
        self.final_in_sq = torch.zeros(d, dtype=torch.float64, device=device)
        n_r = len(adapter.reader_norms())
        self.gram = torch.zeros(n_layers, n_r, d, d, dtype=torch.float64, device=device) if gram else None
        self.final_gram = torch.zeros(d, d, dtype=torch.float64, device=device) if gram else None

    def pre_hook(self, layer: int | None, j: int):
        def fn(module, args):
            x = args[0][self.mask].to(self.in_sq.device, torch.float64)
            if layer is None:
                self.final_in_sq += (x * x).sum(0)
            else:
                self.in_sq[layer, j] += (x * x).sum(0)

        return fn

    def gram_hook(self, layer: int | None, j: int):
        def fn(module, args, output):
            # float32 product per batch (fast on CPU), float64 running sum (exact across batches)
            y = _tensor(output)[self.mask].float()
            g = (y.T @ y).to(self.in_sq.device, torch.float64)
            if layer is None:
                self.final_gram += g
            else:
                self.gram[layer, j] += g

        return fn

    def register_block(self, block: nn.Module, i: int) -> list:
        adapter = self.adapter
        handles = []
        for j, name in enumerate(adapter.residual_norms):
            handles.append(get_module(block, name).register_forward_pre_hook(self.pre_hook(i, j)))
        if self.gram is not None:
            for j, name in enumerate(adapter.reader_norms()):
                handles.append(get_module(block, name).register_forward_hook(self.gram_hook(i, j)))
        return handles

    def register_final(self, norm: nn.Module) -> list:
        handles = [norm.register_forward_pre_hook(self.pre_hook(None, 0))]
        if self.final_gram is not None:
            handles.append(norm.register_forward_hook(self.gram_hook(None, 0)))
        return handles

    def register(self, model: nn.Module) -> list:
        handles = []
        for i, block in enumerate(self.adapter.blocks(model)):
            handles += self.register_block(block, i)
        return handles + self.register_final(self.adapter.norm(model))


@contextlib.contextmanager
def _hooks(handles):
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def token_mask(ids: torch.Tensor, attention: torch.Tensor, skip_bos: bool, bos_id: int | None) -> torch.Tensor:
    mask = attention.bool()
    if skip_bos and bos_id is not None:
        mask = mask.clone()
        mask[:, 0] &= ids[:, 0] != bos_id
    return mask


@dataclass
class ProfileConfig:
    samples: int = 100
    seed: int = 0
    tap: str = DEFAULT_TAP
    batch_size: int = 8
    max_length: int = 512
    skip_bos: bool = False
    norm_stats: bool = True  # sums of squares at norm inputs (cheap; used by RMS correction)
    gram: bool = False  # d×d Gram matrices at reader-norm outputs (least-squares repair)
    widths: bool = False  # MLP-channel and head statistics (dietprune.widthstats), for diet-width

    def __post_init__(self):
        if self.tap not in TAPS:
            raise DietpruneError(f"unknown tap '{self.tap}'; choose from {', '.join(TAPS)}")
        if self.samples <= 0:
            raise DietpruneError(f"samples must be positive, got {self.samples}")
        if self.batch_size <= 0 or self.max_length <= 1:
            raise DietpruneError("batch_size must be positive and max_length above 1")


@torch.no_grad()
def collect(model: nn.Module, tokenizer, sequences: list[list[int]], config: ProfileConfig,
            desc: str = "profile", norm_acc: _NormAccumulator | None = None, width_obs=None,
            task: str | None = None) -> TaskStats:
    """Run `sequences` through the model and return the |activation| sums at the tap."""
    adapter = adapter_for(model)
    device = next(model.parameters()).device
    points = tap_points(model, adapter, config.tap)
    acc = _Accumulator(len(points), model.config.hidden_size, device)
    handles = [m.register_forward_hook(acc.hook(i)) for i, (_, m) in enumerate(points)]
    if norm_acc is not None:
        handles += norm_acc.register(model)
    if width_obs is not None:
        handles += width_obs.attach(model)
        width_obs.task = task
    count = 0
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    with _hooks(handles):
        n_batches = -(-len(sequences) // config.batch_size)
        for ids, attn in progress(batches(sequences, config.batch_size, pad), total=n_batches, desc=desc):
            ids, attn = ids.to(device), attn.to(device)
            mask = token_mask(ids, attn, config.skip_bos, tokenizer.bos_token_id)
            acc.mask = mask
            if norm_acc is not None:
                norm_acc.mask = mask
            if width_obs is not None:
                width_obs.mask = mask
            model(input_ids=ids, attention_mask=attn, use_cache=False, logits_to_keep=1)
            count += int(mask.sum())
            if width_obs is not None:
                width_obs.count_batch(int(mask.sum()))
    stats = TaskStats(acc.abs_sum.cpu(), count, len(sequences))
    bad = ~torch.isfinite(stats.abs_sum).all(dim=1)
    if bad.any():
        raise DietpruneError(f"non-finite activations (NaN/inf) at {points[int(bad.nonzero()[0])][0]}")
    return stats


def load_calibration(tasks, config: ProfileConfig, data_dir=None) -> dict[str, list]:
    """Calibration examples of every task, loaded and formatted before any model work."""
    return {t.name: calibration_examples(t, config.samples, config.seed, data_dir) for t in parse_tasks(tasks)}


def profile(model: nn.Module, tokenizer, tasks, config: ProfileConfig | None = None,
            data_dir=None, fingerprint: str | None = None, model_spec: str | None = None,
            examples: dict[str, list] | None = None) -> Profile:
    """Profile `model` on each task and return per-task statistics (plus norm statistics).

    `examples` (from load_calibration) skips loading the data again.
    """
    from .models import model_fingerprint

    config = config or ProfileConfig()
    adapter = adapter_for(model)
    device = next(model.parameters()).device
    task_list, encoded = encode_tasks(tokenizer, tasks, config, data_dir, wants_bos(model), examples)
    norm_acc = new_norm_accumulator(adapter, model.config, config, device)
    width_obs = new_width_observer(adapter, model.config, config, task_list, device)
    per_task, timings = {}, {}
    for task in task_list:
        t0 = time.perf_counter()
        per_task[task.name] = collect(model, tokenizer, encoded[task.name], config, desc=f"profile {task.name}",
                                      norm_acc=norm_acc, width_obs=width_obs, task=task.name)
        timings[task.name] = round(time.perf_counter() - t0, 2)
    return finish_profile(per_task, norm_acc, task_list, config, timings, model.config,
                          fingerprint or model_fingerprint(model), model_spec, width_obs=width_obs)


def encode_tasks(tokenizer, tasks, config: ProfileConfig, data_dir, add_bos: bool,
                 examples: dict[str, list] | None = None) -> tuple[list[Task], dict]:
    """Tokenise every task's calibration examples (sampled here unless given).

    Under torchrun / accelerate launch each process keeps its own deterministic share of every
    task's sampled examples (rank r takes samples r, r+N, r+2N, ...).
    """
    from . import distributed

    task_list: list[Task] = parse_tasks(tasks)
    examples = examples or load_calibration(task_list, config, data_dir)
    encoded = {t.name: distributed.shard(calibration_ids(tokenizer, examples[t.name], add_bos, config.max_length))
               for t in task_list}
    return task_list, encoded


def new_norm_accumulator(adapter: ModelAdapter, model_config, config: ProfileConfig, device):
    if not (config.norm_stats or config.gram):
        return None
    return _NormAccumulator(adapter, model_config.num_hidden_layers, model_config.hidden_size, device,
                            gram=config.gram)


def new_width_observer(adapter: ModelAdapter, model_config, config: ProfileConfig, task_list, device):
    """The MLP-channel / head statistics observer when the profile asks for them (with the repair's
    moments when it also asks for Gram matrices)."""
    if not config.widths:
        return None
    from .widthstats import WidthObserver

    return WidthObserver(adapter, model_config, [t.name for t in task_list], device, moments=config.gram)


def finish_profile(per_task: dict[str, TaskStats], norm_acc, task_list: list[Task], config: ProfileConfig,
                   timings: dict, model_config, fingerprint: str, model_spec: str | None,
                   width_obs=None) -> Profile:
    """Sum the statistics over processes (when launched as several) and attach the provenance."""
    from . import distributed

    per_task = {name: distributed.reduce_task_stats(st) for name, st in per_task.items()}
    norms = None
    if norm_acc is not None:
        total = sum(st.count for st in per_task.values())
        def summed(t):
            return None if t is None else distributed.all_reduce(t.cpu())

        norms = NormStats(summed(norm_acc.in_sq), summed(norm_acc.final_in_sq), total,
                          summed(norm_acc.gram), summed(norm_acc.final_gram))
        if not torch.isfinite(norms.in_sq).all():
            raise DietpruneError("non-finite activations (NaN/inf) entering a residual norm")
    meta = {
        "fingerprint": fingerprint,
        "model": model_spec,
        "model_type": model_config.model_type,
        "hidden_size": model_config.hidden_size,
        "tap": config.tap,
        "skip_bos": config.skip_bos,
        "samples": {t: per_task[t].samples for t in per_task},
        "requested_samples": config.samples,
        "seed": config.seed,
        "max_length": config.max_length,
        "tokens": {t: per_task[t].count for t in per_task},
        "seconds": timings,
        "task_versions": {t.name: t.version for t in task_list},
    }
    widths = None
    if width_obs is not None:
        width_obs.detach()
        widths = width_obs.finish(distributed.all_reduce)
        meta["widths"] = True
    return Profile(per_task, meta, norms, widths)
