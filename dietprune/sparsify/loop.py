"""The block-by-block sparsification loop.

1. Run the calibration batches (general data, and with fusion task data) through the model up to
   the first decoder block; keep that block's inputs and the arguments every block is called with.
2. For each block: hook the first linear of every group of linears that read the same tensor,
   run the block on all batches and add sum x_j^2 per input channel and the token count (and
   X X^T for SparseGPT) into float64 sums, separately for general and task data, padding excluded.
3. Prune every linear of the block (q, k, v, o, MLP in and out) from those sums.
4. Run the pruned block again: its outputs are the next block's inputs. Only one block's inputs
   are held in memory.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass, field

import torch
from torch import nn

from ..adapters import ModelAdapter, adapter_for, get_module
from ..data import calibration_examples, load_rows
from ..encoding import batches, calibration_ids, encode, wants_bos
from ..errors import DietpruneError
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


# ---- capture and statistics ----------------------------------------------------------------

@dataclass
class Batch:
    """One calibration batch at the current block: its input, token mask, and per-block call arguments."""

    hidden: torch.Tensor
    mask: torch.Tensor
    calls: list  # per block: (args after hidden_states, kwargs)


class _Stop(Exception):
    pass


def _skip(*args, **kwargs):
    """Stand-in forward of a decoder block during capture: pass the hidden states through."""
    return args[0] if args else kwargs["hidden_states"]


@torch.no_grad()
def capture(model: nn.Module, adapter: ModelAdapter, sequences: list[list[int]], batch_size: int,
            pad_id: int) -> list[Batch]:
    """Block-0 inputs and every block's call arguments, without computing any decoder block.

    Each block's forward is replaced by a pass-through for the duration of the capture (its
    pre-hook still sees the arguments the model builds for it: masks, rotary embeddings).
    """
    blocks = adapter.blocks(model)
    device = next(model.parameters()).device
    out: list[Batch] = []
    calls: list = [None] * len(blocks)
    first: dict = {}

    def hook(index):
        def fn(module, args, kwargs):
            kwargs = dict(kwargs)
            hidden = args[0] if args else kwargs.pop("hidden_states")
            if index == 0:
                first["hidden"] = hidden
            calls[index] = (tuple(args[1:]), kwargs)
            if index == len(blocks) - 1:
                raise _Stop

        return fn

    handles = [b.register_forward_pre_hook(hook(i), with_kwargs=True) for i, b in enumerate(blocks)]
    for b in blocks:
        b.forward = _skip
    try:
        for ids, attn in batches(sequences, batch_size, pad_id):
            ids, attn = ids.to(device), attn.to(device)
            try:
                model(input_ids=ids, attention_mask=attn, use_cache=False, logits_to_keep=1)
            except _Stop:
                pass
            out.append(Batch(first.pop("hidden"), attn.bool(), list(calls)))
    finally:
        for h in handles:
            h.remove()
        for b in blocks:
            del b.forward
    return out


def run_block(block: nn.Module, index: int, batch: Batch) -> torch.Tensor:
    args, kwargs = batch.calls[index]
    out = block(batch.hidden, *args, **kwargs)
    return out[0] if isinstance(out, (tuple, list)) else out


@dataclass
class InputStats:
    """Float64 sums over non-padding tokens of one linear's input: sum x_j^2, X X^T (optional), count."""

    sq: torch.Tensor
    gram: torch.Tensor | None
    count: int = 0

    def add(self, x: torch.Tensor) -> None:
        self.sq += x.to(torch.float64).pow(2).sum(0)
        if self.gram is not None:
            xf = x.to(torch.float32)
            self.gram += (xf.T @ xf).to(torch.float64)
        self.count += x.shape[0]


@torch.no_grad()
def block_statistics(block: nn.Module, index: int, groups: list[tuple[str, ...]], data: dict[str, list[Batch]],
                     gram: bool) -> dict[str, dict[tuple, InputStats]]:
    """Run every batch of every source through `block` and sum its linears' input statistics."""
    stats: dict[str, dict[tuple, InputStats]] = {}
    state: dict = {}

    def hook(group):
        def fn(module, args):
            x = args[0][state["mask"]]
            stats[state["source"]][group].add(x)

        return fn

    handles = [get_module(block, g[0]).register_forward_pre_hook(hook(g)) for g in groups]
    try:
        for source, items in data.items():
            stats[source] = {}
            for g in groups:
                d = get_module(block, g[0]).in_features
                dev = get_module(block, g[0]).weight.device
                stats[source][g] = InputStats(torch.zeros(d, dtype=torch.float64, device=dev),
                                              torch.zeros(d, d, dtype=torch.float64, device=dev) if gram else None)
            state["source"] = source
            for batch in items:
                state["mask"] = batch.mask
                run_block(block, index, batch)
    finally:
        for h in handles:
            h.remove()
    for source in stats:
        for g, st in stats[source].items():
            if not torch.isfinite(st.sq).all():
                raise DietpruneError(f"non-finite activations (NaN/inf) entering block {index} {g[0]}")
    return stats


# ---- pruning one linear ------------------------------------------------------------------

def relative_error(w: torch.Tensor, w_new: torch.Tensor, gram: torch.Tensor) -> float:
    """||(W - W') X||^2 / ||W X||^2 computed from X X^T."""
    w64, d64 = w.to(torch.float64), (w - w_new).to(torch.float64)
    num = torch.einsum("ij,jk,ik->", d64, gram, d64)
    den = torch.einsum("ij,jk,ik->", w64, gram, w64)
    return float(num / den) if den > 0 else 0.0


@torch.no_grad()
def prune_linear(weight: torch.Tensor, general: InputStats, task: InputStats | None,
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
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    data = {src: capture(model, adapter, seqs, config.batch_size, pad) for src, seqs in sequences.items()}
    report.sequences = {src: len(seqs) for src, seqs in sequences.items()}
    report.tokens = {src: int(sum(b.mask.sum() for b in items)) for src, items in data.items()}
    report.seconds["capture"] = round(time.perf_counter() - t0, 2)

    t0 = time.perf_counter()
    gram = config.method == "sparsegpt" or record_error
    for i, block in enumerate(progress(blocks, desc=f"sparsify {config.method}")):
        stats = block_statistics(block, i, groups, data, gram)
        for n in names:
            lin = get_module(block, n)
            g = group_of[n]
            new, rec = prune_linear(lin.weight, stats["general"][g], stats.get("task", {}).get(g), config)
            lin.weight.copy_(new)
            report.layers[f"{adapter.layers}.{i}.{n}"] = rec
        del stats
        for items in data.values():
            for batch in items:
                batch.hidden = run_block(block, i, batch)
    report.seconds["prune"] = round(time.perf_counter() - t0, 2)
    return report


def _unit_stats(lin: nn.Linear) -> InputStats:
    """Magnitude without calibration: statistics that play no role (unit activations)."""
    return InputStats(torch.ones(lin.in_features, dtype=torch.float64), None, 1)
