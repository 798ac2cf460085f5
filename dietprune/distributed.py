"""Several processes profiling one model: torchrun / accelerate launch.

Each process profiles its own deterministic share of every task's sampled examples; the sums
and counts are then added across processes (accelerate's ``PartialState`` and ``reduce``: gloo on
CPU, NCCL on GPU). Statistics are sums, so the result equals one process over all samples (up to
float64 summation order). Only rank 0 writes files. A single process is world size 1 and
every function here is a no-op.
"""

from __future__ import annotations

import os

import torch

from .stats import TaskStats


def launched() -> bool:
    """True under torchrun / accelerate launch with more than one process."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def _state():
    """accelerate's process state (joins the launcher's process group once: NCCL on GPUs, gloo on CPU)."""
    from accelerate import PartialState

    return PartialState(cpu=not torch.cuda.is_available() or os.environ.get("DIETPRUNE_DEVICE") == "cpu")


def rank() -> int:
    return _state().process_index if launched() else 0


def world_size() -> int:
    return _state().num_processes if launched() else 1


def is_main() -> bool:
    return rank() == 0


def device() -> str | None:
    """The device this process should put its model on: its own GPU under a multi-GPU launch."""
    return str(_state().device) if launched() and _state().device.type == "cuda" else None


def shard(items: list) -> list:
    """This process's share: items r, r+N, r+2N, ... (all of them in a single process)."""
    n = world_size()
    return list(items) if n == 1 else list(items)[rank()::n]


def all_reduce(t: torch.Tensor) -> torch.Tensor:
    """Sum of `t` over all processes (returns `t` itself in a single process)."""
    if world_size() == 1:
        return t
    from accelerate.utils import reduce

    return reduce(t.to(_state().device), reduction="sum").to(t.device)


def reduce_task_stats(st: TaskStats) -> TaskStats:
    if world_size() == 1:
        return st
    counts = all_reduce(torch.tensor([st.count, st.samples], dtype=torch.int64))
    return TaskStats(all_reduce(st.abs_sum), int(counts[0]), int(counts[1]))


def barrier() -> None:
    if launched():
        _state().wait_for_everyone()
