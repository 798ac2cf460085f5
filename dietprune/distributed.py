"""Several processes profiling one model: torchrun / accelerate launch.

Each process profiles its own deterministic share of every task's sampled examples; the sums
and counts are then added across processes with ``torch.distributed.all_reduce`` (gloo on CPU,
NCCL on GPU). Statistics are sums, so the result equals one process over all samples (up to
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


def _backend() -> str:
    return "nccl" if torch.cuda.is_available() and os.environ.get("DIETPRUNE_DEVICE", "cuda") != "cpu" else "gloo"


def init() -> None:
    """Join the process group the launcher described in the environment (once)."""
    import torch.distributed as dist

    if launched() and not dist.is_initialized():
        backend = _backend()
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend)


def rank() -> int:
    import torch.distributed as dist

    init()
    return dist.get_rank() if dist.is_initialized() else 0


def world_size() -> int:
    import torch.distributed as dist

    init()
    return dist.get_world_size() if dist.is_initialized() else 1


def is_main() -> bool:
    return rank() == 0


def device() -> str | None:
    """The device this process should put its model on: its own GPU under a multi-GPU launch."""
    if launched() and _backend() == "nccl":
        return f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
    return None


def shard(items: list) -> list:
    """This process's share: items r, r+N, r+2N, ... (all of them in a single process)."""
    n = world_size()
    return list(items) if n == 1 else list(items)[rank()::n]


def all_reduce(t: torch.Tensor) -> torch.Tensor:
    """Sum of `t` over all processes (returns `t` itself in a single process)."""
    if world_size() == 1:
        return t
    import torch.distributed as dist

    work = t.to(f"cuda:{torch.cuda.current_device()}") if _backend() == "nccl" else t.clone()
    dist.all_reduce(work, op=dist.ReduceOp.SUM)
    return work.to(t.device)


def reduce_task_stats(st: TaskStats) -> TaskStats:
    if world_size() == 1:
        return st
    counts = all_reduce(torch.tensor([st.count, st.samples], dtype=torch.int64))
    return TaskStats(all_reduce(st.abs_sum), int(counts[0]), int(counts[1]))


def barrier() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()
