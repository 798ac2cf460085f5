"""Block-by-block sparsification: one observer of the calibration engine (``dietprune.engine``).

The engine runs the calibration batches (general data, tagged "general", and with fusion task
data, tagged "task") block by block. For each block `LinearStats` hooks the first linear of every
group of linears that read the same tensor and adds Σx_j² per input channel and the token count
(and XXᵀ for SparseGPT) into float64 sums per tag, padding excluded; then every linear of the
block (q, k, v, o, MLP in and out) is pruned from those sums, and the engine reruns the pruned
block so the next block sees its outputs. Only one block's inputs are held.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass, field

import torch
from torch import nn

from .. import engine
from ..adapters import ModelAdapter, adapter_for, get_module
from ..data import calibration_examples, load_rows
from ..encoding import calibration_ids, encode, wants_bos
from ..engine import Observer, make_batches
from ..errors import DietpruneError
from ..stats import Moments
from ..progress import progress
from ..tasks import get_task, parse_tasks
from .config import SparsifyConfig
from .fusion import exclusive_channels, fused_hessian, fused_norms, magnitude_factor, mean_sq
from .metrics import magnitude_scores, nm_holds, select_mask, sparsity_of, wanda_scores
from .sparsegpt import sparsegpt_prune


def prunable_linears(adapter: ModelAdapter) -> list[str]:
    """Every linear layer inside a decoder block: q, k, v, o, the MLP inputs and output."""
    return [adapter.q_proj, adapter.k_proj, adapter.v_proj, adapter.o_proj, *adapter.mlp_in, adapter.mlp_out]


def input_groups(adapter: ModelAdapter) -> list[tuple[str, ...]]:
    """Linears that read the same tensor (q/k/v read one norm's output) share one set of statistics."""
    names = prunable_linears(adapter)
    groups = [tuple(n for n in readers if n in names) for readers in adapter.norm_readers.values()]
    grouped = {n for g in groups for n in g}
    return [g for g in groups if g] + [(n,) for n in names if n not in grouped]


# ---- calibration data ------------------------------------------------------------------------

def general_sequences(tokenizer, task_name: str, samples: int, seqlen: int, seed: int, add_bos: bool,
                      data_dir=None) -> list[list[int]]:
    """`samples` seeded windows of `seqlen` tokens from the general text (rows joined by blank lines)."""
    task = get_task(task_name)
    if task.kind not in ("perplexity", "text"):
        examples = calibration_examples(task, samples, seed, data_dir)
        return calibration_ids(tokenizer, examples, add_bos, seqlen)
    rows = load_rows(task, "calib", data_dir)
    text = "\n\n".join(task.format(r).continuations[0] for r in rows)
    ids = encode(tokenizer, text, add_bos=False)
    body = seqlen - 1 if add_bos and tokenizer.bos_token_id is not None else seqlen
    if len(ids) <= body:
        raise DietpruneError(f"general data '{task_name}' has {len(ids)} tokens, fewer than --seqlen {seqlen}")
    rng = random.Random(seed)
    starts = [rng.randrange(0, len(ids) - body) for _ in range(samples)]
    prefix = [tokenizer.bos_token_id] if body < seqlen else []
    return [prefix + ids[s : s + body] for s in starts]


def task_sequences(tokenizer, tasks, samples: int, seed: int, add_bos: bool, max_length: int,
                   data_dir=None) -> list[list[int]]:
    """`samples` examples (query + gold answer) of every task, pooled."""
    out: list[list[int]] = []
    for task in parse_tasks(tasks):
        out += calibration_ids(tokenizer, calibration_examples(task, samples, seed, data_dir), add_bos, max_length)
    return out


# ---- statistics ----------------------------------------------------------------------------

class LinearStats(Observer):
    """Σx² (and Σxxᵀ with `gram`: True, or the tags that need it) of the input of the first linear of
    every input group, per batch tag.

    `stats[tag][group]` holds the current block's Moments; `on_block(block, index, stats)` (the
    pruning step) runs in `finish_block`, and the block is rerun when it returns True.
    """

    def __init__(self, groups: list[tuple[str, ...]], tags: list[str], gram: bool, on_block=None):
        self.groups, self.tags, self.gram, self.on_block = groups, tags, gram, on_block
        self.stats: dict[str, dict[tuple, Moments]] = {}

    def attach(self, block, index, run):
        self.stats = {}
        for tag in self.tags:
            self.stats[tag] = {}
            for g in self.groups:
                lin = get_module(block, g[0])
                gram = self.gram if isinstance(self.gram, bool) else tag in self.gram
                self.stats[tag][g] = Moments.zeros(lin.in_features, sq=True, gram=gram,
                                                   device=lin.weight.device)
        return [get_module(block, g[0]).register_forward_pre_hook(
            lambda m, args, g=g: self.stats[run.tag][g].add(args[0][run.mask])) for g in self.groups]

    def finish_block(self, block, index, run):
        for tag in self.stats:
            for g, st in self.stats[tag].items():
                if not torch.isfinite(st.sq).all():
                    raise DietpruneError(f"non-finite activations (NaN/inf) entering block {index} {g[0]}")
        changed = bool(self.on_block(block, index, self.stats)) if self.on_block is not None else False
        self.stats = {}
        return changed


# ---- pruning one linear ------------------------------------------------------------------

def relative_error(w: torch.Tensor, w_new: torch.Tensor, gram: torch.Tensor) -> float:
    """||(W - W') X||^2 / ||W X||^2 computed from X X^T."""
    w64, d64 = w.to(torch.float64), (w - w_new).to(torch.float64)
    num = torch.einsum("ij,jk,ik->", d64, gram, d64)
    den = torch.einsum("ij,jk,ik->", w64, gram, w64)
    return float(num / den) if den > 0 else 0.0


@torch.no_grad()
def prune_linear(weight: torch.Tensor, general: Moments, task: Moments | None,
                 config: SparsifyConfig) -> tuple[torch.Tensor, dict]:
    """New weight of one linear layer and a record of what happened."""
    nm = config.nm
    g_sq = mean_sq(general.sq, general.count)
    exclusive = None
    if config.fuse:
        t_sq = mean_sq(task.sq, task.count)
        exclusive = exclusive_channels(g_sq, t_sq, config.criterion, config.tau, config.rho)
    if config.method == "sparsegpt":
        if config.fuse:
            hessian = fused_hessian(general.gram, general.count, task.gram, task.count, exclusive,
                                    config.task_weight, config.boost)
        else:
            hessian = general.gram / max(general.count, 1)
        new, _ = sparsegpt_prune(weight, hessian, config.sparsity, nm, config.blocksize, config.percdamp)
    else:
        if config.method == "magnitude":
            scores = magnitude_scores(weight)
            if config.fuse:
                scores = scores * magnitude_factor(g_sq, t_sq, exclusive, config.task_weight, config.boost)[None, :]
        else:
            act = torch.sqrt(g_sq) if not config.fuse else fused_norms(g_sq, t_sq, exclusive, config.task_weight,
                                                                      config.boost)
            scores = wanda_scores(weight, act)
        new = weight.masked_fill(select_mask(scores, config.sparsity, nm), 0.0)
    record = {"shape": list(weight.shape), "sparsity": sparsity_of(new)}
    if nm is not None:
        record["nm_ok"] = nm_holds(new, *nm)
    if exclusive is not None:
        record["exclusive_fraction"] = float(exclusive.float().mean())
    if general.gram is not None:
        record["rel_error_general"] = relative_error(weight, new, general.gram)
        if task is not None and task.gram is not None:
            record["rel_error_task"] = relative_error(weight, new, task.gram)
    return new, record


# ---- the loop ------------------------------------------------------------------------------

@dataclass
class SparsifyReport:
    layers: dict = field(default_factory=dict)  # "model.layers.3.mlp.down_proj" -> record
    tokens: dict = field(default_factory=dict)
    sequences: dict = field(default_factory=dict)
    seconds: dict = field(default_factory=dict)

    @property
    def overall_sparsity(self) -> float:
        zeros = sum(r["sparsity"] * r["shape"][0] * r["shape"][1] for r in self.layers.values())
        total = sum(r["shape"][0] * r["shape"][1] for r in self.layers.values())
        return zeros / total if total else 0.0

    @property
    def nm_ok(self) -> bool | None:
        flags = [r["nm_ok"] for r in self.layers.values() if "nm_ok" in r]
        return all(flags) if flags else None

    def to_dict(self) -> dict:
        return {"overall_sparsity": self.overall_sparsity, "nm_ok": self.nm_ok, "tokens": self.tokens,
                "sequences": self.sequences, "seconds": self.seconds, "layers": self.layers}


def needs_calibration(config: SparsifyConfig, record_error: bool = False) -> bool:
    return config.method != "magnitude" or config.fuse or record_error


@torch.no_grad()
def sparsify_model(model: nn.Module, tokenizer, config: SparsifyConfig, data_dir=None,
                   record_error: bool = False) -> SparsifyReport:
    """Prune every decoder-block linear of `model` in place; return per-layer sparsity and statistics."""
    adapter = adapter_for(model)
    names = prunable_linears(adapter)
    groups = input_groups(adapter)
    group_of = {n: g for g in groups for n in g}
    blocks = adapter.blocks(model)
    report = SparsifyReport()
    nm = config.nm
    if nm is not None:
        for block in blocks:
            for n in names:
                if get_module(block, n).in_features % nm[1]:
                    raise DietpruneError(f"{config.pattern} pattern: {n} reads {get_module(block, n).in_features} "
                                         f"inputs, not a multiple of {nm[1]}")

    if not needs_calibration(config, record_error):
        t0 = time.perf_counter()
        for i, block in enumerate(progress(blocks, desc="sparsify")):
            for n in names:
                lin = get_module(block, n)
                new, rec = prune_linear(lin.weight, _unit_stats(lin), None, config)
                lin.weight.copy_(new)
                report.layers[f"{adapter.layers}.{i}.{n}"] = rec
        report.seconds["prune"] = round(time.perf_counter() - t0, 2)
        return report

    t0 = time.perf_counter()
    add_bos = wants_bos(model)
    sequences = {"general": general_sequences(tokenizer, config.general, config.samples, config.seqlen, config.seed,
                                              add_bos, data_dir)}
    if config.fuse:
        sequences["task"] = task_sequences(tokenizer, config.tasks, config.task_samples, config.seed, add_bos,
                                           config.max_length, data_dir)
    data = [b for src, seqs in sequences.items() for b in make_batches(seqs, config.batch_size, tokenizer, src)]
    report.sequences = {src: len(seqs) for src, seqs in sequences.items()}
    report.tokens = {src: int(sum(b.mask.sum() for b in data if b.tag == src)) for src in sequences}

    def prune_block(block, i, stats):
        for n in names:
            lin = get_module(block, n)
            g = group_of[n]
            new, rec = prune_linear(lin.weight, stats["general"][g], stats.get("task", {}).get(g), config)
            lin.weight.copy_(new)
            report.layers[f"{adapter.layers}.{i}.{n}"] = rec
        return True

    gram = config.method == "sparsegpt" or record_error
    obs = LinearStats(groups, list(sequences), gram, prune_block)
    run = engine.run(model, data, [obs], desc=f"sparsify {config.method}")
    report.seconds["capture"] = round(time.perf_counter() - t0 - sum(run.block_seconds), 2)
    report.seconds["prune"] = round(sum(run.block_seconds), 2)
    return report


def _unit_stats(lin: nn.Linear) -> Moments:
    """Magnitude without calibration: statistics that play no role (unit activations)."""
    return Moments(sq=torch.ones(lin.in_features, dtype=torch.float64), count=1)
