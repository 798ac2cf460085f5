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

import time
from dataclasses import dataclass

import torch
from torch import nn

from . import engine
from .adapters import ModelAdapter, adapter_for, get_module
from .data import calibration_examples
from .encoding import calibration_ids, wants_bos
from .engine import RESIDENT, Batch, Observer, Run, WeightSource, make_batches, output_tensor
from .errors import DietpruneError
from .registry import DEFAULT_TAP, TAPS
from .stats import Moments, NormStats, Profile, TaskStats
from .tasks import Task, parse_tasks



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


class DietObserver(Observer):
    """DIET's statistics as an engine observer.

    Per batch tag (task): Σ|x| at every tap point. Over all batches (with `norm_stats`): Σx² entering
    every residual norm and the final norm; with `gram`: Σyyᵀ leaving every reader norm and the
    final norm. Sums live on the activations' device and come back to the CPU in `task_stats`.
    """

    def __init__(self, adapter: ModelAdapter, model_config, tap: str, tags: list[str], norm_stats: bool = True,
                 gram: bool = False, device="cpu"):
        self.adapter, self.tap = adapter, tap
        L, d = model_config.num_hidden_layers, model_config.hidden_size
        self.per_block = len(block_tap_names(adapter, tap))
        self.abs = {t: torch.zeros(L * self.per_block, d, dtype=torch.float64, device=device) for t in tags}
        self.points: list[str] = []
        self.norm_stats = norm_stats or gram
        self.final = self.norm_stats
        z = torch.zeros
        self.in_sq = z(L, len(adapter.residual_norms), d, dtype=torch.float64, device=device) \
            if self.norm_stats else None
        self.final_in_sq = z(d, dtype=torch.float64, device=device) if self.norm_stats else None
        n_r = len(adapter.reader_norms())
        self.gram = z(L, n_r, d, d, dtype=torch.float64, device=device) if gram else None
        self.final_gram = z(d, d, dtype=torch.float64, device=device) if gram else None

    @staticmethod
    def _post(sink, run: Run):
        def fn(module, args, output):
            sink().add(run.select(output_tensor(output)))

        return fn

    @staticmethod
    def _pre(sink: Moments, run: Run):
        def fn(module, args):
            sink.add(run.select(args[0]))

        return fn

    def attach(self, block, index, run):
        handles = []
        for p, (name, module) in enumerate(block_tap_points(block, index, self.adapter, self.tap)):
            row = index * self.per_block + p
            self.points.append(name)
            handles.append(module.register_forward_hook(
                self._post(lambda row=row: Moments(abs=self.abs[run.tag][row]), run)))
        if self.norm_stats:
            for j, name in enumerate(self.adapter.residual_norms):
                handles.append(get_module(block, name).register_forward_pre_hook(
                    self._pre(Moments(sq=self.in_sq[index, j]), run)))
        if self.gram is not None:
            for j, name in enumerate(self.adapter.reader_norms()):
                sink = Moments(gram=self.gram[index, j])
                handles.append(get_module(block, name).register_forward_hook(self._post(lambda s=sink: s, run)))
        return handles

    def attach_final(self, norm, run):
        handles = [norm.register_forward_pre_hook(self._pre(Moments(sq=self.final_in_sq), run))]
        if self.final_gram is not None:
            sink = Moments(gram=self.final_gram)
            handles.append(norm.register_forward_hook(self._post(lambda: sink, run)))
        return handles

    def task_stats(self, batches: list[Batch], samples: dict[str, int]) -> dict[str, TaskStats]:
        out = {}
        for tag, sums in self.abs.items():
            bad = ~torch.isfinite(sums).all(dim=1)
            if bad.any():
                raise DietpruneError(f"non-finite activations (NaN/inf) at {self.points[int(bad.nonzero()[0])]}")
            count = sum(int(b.mask.sum()) for b in batches if b.tag == tag)
            out[tag] = TaskStats(sums.cpu(), count, samples[tag])
        return out

    def norm_stats_of(self, count: int) -> NormStats | None:
        if not self.norm_stats:
            return None
        def cpu(t):
            return None if t is None else t.cpu()

        return NormStats(cpu(self.in_sq), cpu(self.final_in_sq), count, cpu(self.gram), cpu(self.final_gram))


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

    @classmethod
    def of(cls, config, gram: bool, widths: bool = False) -> "ProfileConfig":
        """The profiling options of a prune config (`registry.PruneConfig`; its tap, or the default)."""
        return cls(samples=config.samples, seed=config.seed, tap=getattr(config, "tap", DEFAULT_TAP),
                   batch_size=config.batch_size, max_length=config.max_length, skip_bos=config.skip_bos, gram=gram,
                   widths=widths)

    def __post_init__(self):
        from . import validate as v

        self.samples = v.integer("samples", self.samples, 1)
        self.seed = v.seed(self.seed)
        self.batch_size = v.integer("batch_size", self.batch_size, 1)
        self.max_length = v.integer("max_length", self.max_length, 2)
        self.skip_bos = v.flag("skip_bos", self.skip_bos)
        self.norm_stats = v.flag("norm_stats", self.norm_stats)
        self.gram = v.flag("gram", self.gram)
        if not isinstance(self.tap, str) or self.tap not in TAPS:
            raise DietpruneError(f"unknown tap '{self.tap}'; choose from {', '.join(TAPS)}")
        if self.samples <= 0:
            raise DietpruneError(f"samples must be positive, got {self.samples}")
        if self.batch_size <= 0 or self.max_length <= 1:
            raise DietpruneError("batch_size must be positive and max_length above 1")


def collect(model: nn.Module, tokenizer, sequences: list[list[int]], config: ProfileConfig,
            desc: str = "profile") -> TaskStats:
    """Run `sequences` through the model and return the |activation| sums at the tap."""
    adapter = adapter_for(model)
    batches = make_batches(sequences, config.batch_size, tokenizer, "", config.skip_bos)
    obs = DietObserver(adapter, model.config, config.tap, [""], norm_stats=False,
                       device=next(model.parameters()).device)
    engine.run(model, batches, [obs], desc=desc)
    return obs.task_stats(batches, {"": len(sequences)})[""]


def load_calibration(tasks, config: ProfileConfig, data_dir=None) -> dict[str, list]:
    """Calibration examples of every task, loaded and formatted before any model work."""
    return {t.name: calibration_examples(t, config.samples, config.seed, data_dir) for t in parse_tasks(tasks)}


def profile(model: nn.Module, tokenizer, tasks, config: ProfileConfig | None = None,
            data_dir=None, fingerprint: str | None = None, model_spec: str | None = None,
            examples: dict[str, list] | None = None, source: WeightSource = RESIDENT,
            offload: str = "memory") -> Profile:
    """Profile `model` on each task and return per-task statistics (plus norm statistics).

    One engine pass over every task's batches (tagged by task). `examples` (from load_calibration)
    skips loading the data again; `source` streams the weights (streaming.StreamedWeights), and then
    `fingerprint` should come from the checkpoint.
    """
    config = config or ProfileConfig()
    adapter = adapter_for(model)
    task_list, encoded = encode_tasks(tokenizer, tasks, config, data_dir, wants_bos(model), examples)
    batches = [b for t in task_list
               for b in make_batches(encoded[t.name], config.batch_size, tokenizer, t.name, config.skip_bos)]
    obs = DietObserver(adapter, model.config, config.tap, [t.name for t in task_list], config.norm_stats,
                       config.gram, device=source.device(model))
    observers = [obs]
    if config.widths:  # MLP channels and heads, in the same pass (with the repair's moments when gram)
        from .widthstats import WidthObserver

        observers.append(WidthObserver(adapter, model.config, [t.name for t in task_list], source.device(model),
                                       moments=config.gram))
    t0 = time.perf_counter()
    report = engine.run(model, batches, observers, source=source, offload=offload, desc="profile")
    seconds = round(time.perf_counter() - t0, 2)
    per_task = obs.task_stats(batches, {t.name: len(encoded[t.name]) for t in task_list})
    if fingerprint is None:
        from .models import model_fingerprint

        fingerprint = model_fingerprint(model)
    prof = finish_profile(per_task, obs.norm_stats_of(sum(st.count for st in per_task.values())), task_list,
                          config, {"all tasks": seconds}, model.config, fingerprint, model_spec)
    if config.widths:
        from . import distributed

        prof.widths = observers[1].finish(batches, distributed.all_reduce)
        prof.meta["widths"] = True
    prof.meta["engine"] = {"seconds": report.seconds, "block_seconds": [round(s, 3) for s in report.block_seconds],
                           "tokens_with_padding": report.tokens_with_padding,
                           "activations_on_disk": report.activations_on_disk, "streamed": source.streamed}
    return prof


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


def finish_profile(per_task: dict[str, TaskStats], norms: NormStats | None, task_list: list[Task], config: ProfileConfig,
                   timings: dict, model_config, fingerprint: str, model_spec: str | None) -> Profile:
    """Sum the statistics over processes (when launched as several) and attach the provenance."""
    from . import distributed

    per_task = {name: distributed.reduce_task_stats(st) for name, st in per_task.items()}
    if norms is not None:
        def summed(t):
            return None if t is None else distributed.all_reduce(t)

        norms = NormStats(summed(norms.in_sq), summed(norms.final_in_sq), sum(st.count for st in per_task.values()),
                          summed(norms.gram), summed(norms.final_gram))
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
    return Profile(per_task, meta, norms)
