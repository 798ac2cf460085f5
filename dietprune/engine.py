"""One block-sequential calibration engine: every pass over calibration data goes through `run`.

The loop (think llm-compressor's sequential pipeline, without its tracing):

1. **Capture.** The model's own forward runs once per batch with every decoder block's
   ``forward`` replaced by a pass-through; a pre-hook records the arguments each block receives
   (causal and sliding-window masks, rotary cos/sin, position ids: whatever the family's forward
   builds, Gemma-3's per-layer-type masks included) and the hidden state entering block 0. The
   last block's hook stops the forward, so the final norm and lm_head are never run.
2. **Per block.** The `WeightSource` onloads the block (a no-op for a resident model, read from
   safetensors shards for a streamed one), each `Observer` attaches its hooks, every batch runs
   through the block, then every observer finishes the block (adds up statistics, scores units,
   solves a re-fit, prunes weights). If any says it changed the block, the batches run through
   it again so the next block sees the changed block's outputs. The outputs become the next
   block's inputs; the block is offloaded.
3. **After the last block** (only when an observer asks, `Observer.final`): the final norm runs
   on the last outputs with the observers' final hooks; then each observer's `finish_model`.

Activations between blocks live in memory, or in a scratch file (`offload="disk"`, or "auto"
when they would take more than an eighth of the free RAM). During a pass `Run.mask` is the
current batch's token mask (non-padding tokens, optionally without BOS) and `Run.tag` its label
(the task name, or "general"/"task"); hooks read both. Statistics therefore come out exactly as a
whole-model forward with the same hooks would give them: the same batches go through the same
blocks with the same arguments.

Observer protocol (subclass `Observer`; every method has a no-op default)::

    attach(block, index, run) -> list of hook handles      # removed by the engine after the pass
    finish_block(block, index, run) -> bool                 # True: block changed, rerun it
    final: bool                                             # run the final norm after the blocks
    attach_final(norm, run) -> list of hook handles
    finish_model(model, run) -> None
"""

from __future__ import annotations

import os
import tempfile
import time
from dataclasses import dataclass, field

import torch
from torch import nn

from .adapters import ModelAdapter, adapter_for
from .errors import DietpruneError
from .progress import progress


@dataclass
class Batch:
    """One calibration batch: token ids, attention mask, token mask (what statistics count), label."""

    ids: torch.Tensor
    attn: torch.Tensor
    mask: torch.Tensor
    tag: str = ""


def make_batches(sequences: list[list[int]], batch_size: int, tokenizer, tag: str = "",
                 skip_bos: bool = False) -> list[Batch]:
    """Right-padded batches of `sequences` in order, with their token masks."""
    from .encoding import batches

    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    return [Batch(ids, attn, token_mask(ids, attn, skip_bos, tokenizer.bos_token_id), tag)
            for ids, attn in batches(sequences, batch_size, pad)]


def token_mask(ids: torch.Tensor, attention: torch.Tensor, skip_bos: bool, bos_id: int | None) -> torch.Tensor:
    mask = attention.bool()
    if skip_bos and bos_id is not None:
        mask = mask.clone()
        mask[:, 0] &= ids[:, 0] != bos_id
    return mask


class Run:
    """What hooks see during a pass: the current batch's `mask` and `tag`, and the whole plan."""

    def __init__(self, batches: list[Batch], device):
        self.batches = batches
        self.device = torch.device(device)
        self.masks = [b.mask.to(self.device) for b in batches]
        self.index = 0
        self.block: int | None = None
        self.seconds: dict[str, float] = {"capture": 0.0, "onload": 0.0, "blocks": 0.0, "rerun": 0.0}

    @property
    def mask(self) -> torch.Tensor:
        return self.masks[self.index]

    @property
    def tag(self) -> str:
        return self.batches[self.index].tag

    def tokens(self, tag: str | None = None) -> int:
        return sum(int(b.mask.sum()) for b in self.batches if tag is None or b.tag == tag)


class Observer:
    """Base class of everything that watches (or changes) the model block by block."""

    final: bool = False

    def attach(self, block: nn.Module, index: int, run: Run) -> list:
        return []

    def finish_block(self, block: nn.Module, index: int, run: Run) -> bool:
        return False

    def attach_final(self, norm: nn.Module, run: Run) -> list:
        return []

    def finish_model(self, model: nn.Module, run: Run) -> None:
        pass


class WeightSource:
    """Where a block's weights come from. The resident source (this class) does nothing."""

    streamed = False

    def device(self, model: nn.Module) -> torch.device:
        return next(model.parameters()).device

    def onload(self, model: nn.Module, path: str, module: nn.Module) -> None:
        pass

    def offload(self, model: nn.Module, path: str, module: nn.Module) -> None:
        pass


RESIDENT = WeightSource()


def output_tensor(output):
    return output[0] if isinstance(output, (tuple, list)) else output


# ---- activations between blocks ---------------------------------------------------------------
class ActivationStore:
    """One tensor per calibration batch, in memory (on its device) or in a scratch file."""

    def __init__(self, n: int, directory: str | None = None):
        self.tensors: list = [None] * n
        self.fd = None
        if directory is not None:
            self.fd, self.path = tempfile.mkstemp(prefix="dietprune-act-", suffix=".bin", dir=directory)
            self.where: dict[int, tuple] = {}
            self.end = 0

    def put(self, b: int, t: torch.Tensor) -> None:
        t = t.detach()
        if self.fd is None:
            self.tensors[b] = t
            return
        raw = t.cpu().contiguous().view(-1).view(torch.uint8).numpy()
        if b not in self.where or self.where[b][3] != raw.nbytes:
            self.where[b] = (self.end, tuple(t.shape), t.dtype, raw.nbytes, t.device)
            self.end += raw.nbytes
        os.pwrite(self.fd, memoryview(raw), self.where[b][0])

    def get(self, b: int) -> torch.Tensor:
        if self.fd is None:
            return self.tensors[b]
        offset, shape, dtype, nbytes, device = self.where[b]
        data = bytearray(os.pread(self.fd, nbytes, offset))
        return torch.frombuffer(data, dtype=torch.uint8).view(dtype).view(shape).to(device)

    def close(self) -> None:
        self.tensors = []
        if self.fd is not None:
            os.close(self.fd)
            os.unlink(self.path)
            self.fd = None


def spill_dir(batches: list[Batch], d: int, offload: str) -> str | None:
    """Scratch folder for the activations, or None to keep them in memory."""
    if offload == "memory":
        return None
    if offload not in ("auto", "disk"):
        raise DietpruneError(f"offload must be auto, memory or disk, got {offload}")
    if offload == "auto":
        import psutil

        total = sum(4 * b.ids.numel() * d for b in batches)
        if 2 * total < psutil.virtual_memory().available // 8:
            return None
    return os.environ.get("DIETPRUNE_SCRATCH_DIR") or tempfile.gettempdir()


# ---- capture -------------------------------------------------------------------------------------
class _Stop(Exception):
    pass


def _pass_through(*args, **kwargs):
    return args[0] if args else kwargs["hidden_states"]


@torch.no_grad()
def capture(model: nn.Module, adapter: ModelAdapter, batches: list[Batch], store: ActivationStore, device) -> list:
    """Put block 0's input of every batch into `store`; return, per batch, the (args, kwargs) of every block."""
    blocks = adapter.blocks(model)
    calls: list = []
    current: list = [None] * len(blocks)
    first: dict = {}

    def hook(index):
        def fn(module, args, kwargs):
            kwargs = dict(kwargs)
            hidden = args[0] if args else kwargs.pop("hidden_states")
            if index == 0:
                first["hidden"] = hidden
            current[index] = (tuple(args[1:]), kwargs)
            if index == len(blocks) - 1:
                raise _Stop

        return fn

    handles = [b.register_forward_pre_hook(hook(i), with_kwargs=True) for i, b in enumerate(blocks)]
    for b in blocks:
        b.forward = _pass_through
    try:
        for n, batch in enumerate(batches):
            current[:] = [None] * len(blocks)
            try:
                model(input_ids=batch.ids.to(device), attention_mask=batch.attn.to(device), use_cache=False,
                      logits_to_keep=1)
            except _Stop:
                pass
            if "hidden" not in first or any(c is None for c in current):
                raise DietpruneError(f"{type(model).__name__}'s forward did not call every block at "
                                     f"'{adapter.layers}'")
            store.put(n, first.pop("hidden"))
            calls.append(list(current))
    finally:
        for h in handles:
            h.remove()
        for b in blocks:
            del b.forward
    return calls


def _remove(handles) -> None:
    for h in handles:
        h.remove()


# ---- the loop --------------------------------------------------------------------------------------
@dataclass
class RunReport:
    seconds: dict = field(default_factory=dict)
    block_seconds: list = field(default_factory=list)
    tokens_with_padding: int = 0
    activations_on_disk: bool = False


@torch.no_grad()
def run(model: nn.Module, batches: list[Batch], observers: list[Observer], source: WeightSource = RESIDENT,
        offload: str = "memory", desc: str = "blocks") -> RunReport:
    """Drive `batches` through `model` block by block with `observers` (see the module docstring)."""
    if not batches:
        raise DietpruneError("no calibration batches to run")
    adapter = adapter_for(model)
    device = source.device(model)
    blocks = adapter.blocks(model)
    state = Run(batches, device)
    spill = spill_dir(batches, model.config.hidden_size, offload)
    current, following = ActivationStore(len(batches), spill), ActivationStore(len(batches), spill)
    report = RunReport(tokens_with_padding=sum(int(b.ids.numel()) for b in batches),
                       activations_on_disk=spill is not None)
    try:
        t0 = time.perf_counter()
        source.onload(model, adapter.embed, adapter.embedding(model))
        try:
            calls = capture(model, adapter, batches, current, device)
        finally:
            source.offload(model, adapter.embed, adapter.embedding(model))
        state.seconds["capture"] = time.perf_counter() - t0
        for i, block in enumerate(progress(blocks, desc=desc)):
            t0 = time.perf_counter()
            path = f"{adapter.layers}.{i}"
            source.onload(model, path, block)
            t1 = time.perf_counter()
            state.seconds["onload"] += t1 - t0
            state.block = i
            handles = [h for ob in observers for h in ob.attach(block, i, state)]
            try:
                for b in range(len(batches)):
                    state.index = b
                    args, kwargs = calls[b][i]
                    following.put(b, output_tensor(block(current.get(b), *args, **kwargs)))
            finally:
                _remove(handles)
            changed = [bool(ob.finish_block(block, i, state)) for ob in observers]
            t2 = time.perf_counter()
            state.seconds["blocks"] += t2 - t1
            if any(changed):
                for b in range(len(batches)):
                    args, kwargs = calls[b][i]
                    following.put(b, output_tensor(block(current.get(b), *args, **kwargs)))
                state.seconds["rerun"] += time.perf_counter() - t2
            source.offload(model, path, block)
            current, following = following, current
            report.block_seconds.append(time.perf_counter() - t0)
        state.block = None
        if any(ob.final for ob in observers):
            norm = adapter.norm(model)
            source.onload(model, adapter.final_norm, norm)
            handles = [h for ob in observers for h in ob.attach_final(norm, state)]
            try:
                for b in range(len(batches)):
                    state.index = b
                    norm(current.get(b))
            finally:
                _remove(handles)
                source.offload(model, adapter.final_norm, norm)
        for ob in observers:
            ob.finish_model(model, state)
    finally:
        current.close()
        following.close()
    report.seconds = {k: round(v, 3) for k, v in state.seconds.items()}
    return report
