"""Layer streaming: profile and cut a model that does not fit in memory.

Only the model's *skeleton* is built in full: the architecture from its config with every
parameter on the meta device (``accelerate.init_empty_weights``; buffers such as rotary
frequencies stay real). Weights are read from the safetensors shards when needed:

- profiling materialises the embedding once to embed the calibration batches, then one decoder
  block at a time; every batch goes through that block with the same hooks and accumulators as
  the in-memory path (``profile.py``), its outputs become the next block's inputs (in memory,
  or in a scratch file when large), and the block goes back to the meta device.
- the keyword arguments a block receives (causal / sliding-window masks, rotary cos/sin,
  position ids) are not rebuilt by hand: the model's own forward computes them, with every
  block's ``forward`` replaced by a stub that records its arguments and passes the hidden state
  through (``block_arguments``). Whatever a model family does there, the blocks see what the
  in-memory forward gives them.
- the cut reads one tensor at a time, applies the same repair and slicing rules as the
  in-memory path (``repair.rescale_gain`` / ``repair.ls_fold`` / ``surgery.slice_tensor``) and
  writes it straight into size-limited safetensors shards plus ``model.safetensors.index.json``.

Peak memory is about one block in float32, plus the calibration activations (twice), plus
one tensor being written. GGUF files are not streamed: they are loaded in memory or converted
once with ``save_pretrained``.
"""

from __future__ import annotations

import copy
import json
import os
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

from .adapters import ModelAdapter, adapter_for, adapter_for_type, get_module, param_count
from .errors import DietpruneError
from .profile import (ProfileConfig, _Accumulator, _hooks, _tensor, block_tap_names, block_tap_points,
                      encode_tasks, finish_profile, new_norm_accumulator, token_mask)
from .progress import progress

INDEX_NAME = "model.safetensors.index.json"
DEFAULT_SHARD_BYTES = 2 * 2**30
ROW_BLOCK_BYTES = 64 * 2**20  # a column-cut tensor larger than this is read and written in blocks of rows


# ---- reading ----------------------------------------------------------------------------
class Checkpoint:
    """A safetensors checkpoint folder, read tensor by tensor (nothing is kept open)."""

    def __init__(self, folder: str | os.PathLike):
        from .models import check_safetensors_files

        self.folder = Path(folder)
        index = self.folder / INDEX_NAME
        single = self.folder / "model.safetensors"
        if index.is_file() or single.is_file():
            # every shard's header is read now: a damaged or truncated file fails before any work
            self.weight_map = check_safetensors_files(self.folder)
        else:
            raise DietpruneError(
                f"{self.folder} has no safetensors weights (model.safetensors or {INDEX_NAME}); "
                "--low-memory streams safetensors folders only (convert a GGUF file once with save_pretrained)"
            )
        self.files = sorted(set(self.weight_map.values()))

    def __contains__(self, name: str) -> bool:
        return name in self.weight_map

    def size_on_disk(self) -> int:
        return sum((self.folder / f).stat().st_size for f in self.files)

    def get_many(self, names: list[str]) -> dict[str, torch.Tensor]:
        from safetensors import safe_open

        missing = [n for n in names if n not in self.weight_map]
        if missing:
            raise DietpruneError(f"checkpoint {self.folder} has no tensor '{missing[0]}'")
        by_file: dict[str, list[str]] = {}
        for n in names:
            by_file.setdefault(self.weight_map[n], []).append(n)
        out = {}
        for file, group in by_file.items():
            with safe_open(str(self.folder / file), framework="pt") as fh:
                for n in group:
                    out[n] = fh.get_tensor(n)
        return out

    def sample(self, name: str, flat_index: torch.Tensor) -> torch.Tensor:
        """Values at these positions of the flattened tensor, read without loading the tensor."""
        from safetensors import safe_open

        if name not in self.weight_map:
            raise DietpruneError(f"checkpoint {self.folder} has no tensor '{name}'")
        with safe_open(str(self.folder / self.weight_map[name]), framework="pt") as fh:
            sl = fh.get_slice(name)
            shape = list(sl.get_shape())
            values = []
            for i in flat_index.tolist():
                pos = []
                for size in reversed(shape):
                    pos.append(i % size)
                    i //= size
                pos.reverse()
                values.append(sl[tuple(slice(j, j + 1) for j in pos)].reshape(-1))
        return torch.cat(values) if values else torch.zeros(0)

    def shape(self, name: str) -> list[int]:
        from safetensors import safe_open

        with safe_open(str(self.folder / self.weight_map[name]), framework="pt") as fh:
            return list(fh.get_slice(name).get_shape())

    def rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        """Rows start..stop-1 of a tensor, read without loading the rest."""
        from safetensors import safe_open

        with safe_open(str(self.folder / self.weight_map[name]), framework="pt") as fh:
            return fh.get_slice(name)[start:stop]

    def get(self, name: str) -> torch.Tensor:
        return self.get_many([name])[name]


def is_safetensors_folder(path) -> bool:
    p = Path(path)
    return p.is_dir() and ((p / INDEX_NAME).is_file() or (p / "model.safetensors").is_file())


def skeleton(folder: str | os.PathLike) -> nn.Module:
    """The model with meta-device parameters (buffers real), tied like the real one."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    from .models import load_config

    config = load_config(folder)
    adapter_for_type(getattr(config, "model_type", "?"))
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        with init_empty_weights():
            model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    finally:
        hf_logging.set_verbosity(verbosity)
    model.tie_weights()
    model.config.dtype = torch.float32  # what the in-memory loader gives
    return model.eval()


def load_tokenizer(folder):
    from .models import load_tokenizer as load_checked

    return load_checked(folder)


def check_complete(model: nn.Module, ckpt: Checkpoint) -> None:
    """The checkpoint holds exactly the skeleton's tensors (the in-memory loader's strict check)."""
    import re
    from types import SimpleNamespace

    from .models import check_weight_names, incomplete_allowed

    expected = {n for n, _ in model.named_parameters()}  # a tied lm_head is the embedding's entry
    known = set(model.state_dict())
    info = SimpleNamespace(missing_keys=expected - set(ckpt.weight_map),
                           unexpected_keys={n for n in ckpt.weight_map if n not in known})
    adjust = getattr(model, "_adjust_missing_and_unexpected_keys", None)
    if adjust is not None:  # transformers' own exceptions (old per-layer rotary buffers, position_ids, ...)
        adjust(info)
    else:
        ignore = [re.compile(p) for p in (getattr(model, "_keys_to_ignore_on_load_unexpected", None) or [])]
        info.unexpected_keys = {n for n in info.unexpected_keys if not any(p.search(n) for p in ignore)}
    unexpected, missing = info.unexpected_keys, sorted(info.missing_keys)
    if missing and incomplete_allowed():
        raise DietpruneError(f"--low-memory cannot stream {ckpt.folder}: {len(missing)} tensor(s) are missing "
                             f"({', '.join(missing[:3])}); load it in memory (--no-low-memory) to have them random")
    check_weight_names(missing, unexpected, ckpt.folder)


def materialize_(model: nn.Module, prefix: str, module: nn.Module, ckpt: Checkpoint) -> None:
    """Give `module` (at `prefix` in the model) its float32 weights from the checkpoint."""
    names = [n for n, _ in module.named_parameters()]
    tensors = ckpt.get_many([f"{prefix}.{n}" for n in names])
    for n in names:
        owner, _, leaf = n.rpartition(".")
        t = tensors.pop(f"{prefix}.{n}")
        setattr(get_module(module, owner) if owner else module, leaf,
                nn.Parameter(t.to(torch.float32) if t.is_floating_point() else t, requires_grad=False))


def release_(module: nn.Module) -> None:
    """Send `module`'s parameters back to the meta device (frees their memory)."""
    for n, p in list(module.named_parameters()):
        owner, _, leaf = n.rpartition(".")
        setattr(get_module(module, owner) if owner else module, leaf,
                nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=False))
    trim_heap()


def trim_heap() -> None:
    """Give freed heap memory back to the OS (glibc keeps it otherwise, and RSS creeps up block after block)."""
    global _LIBC
    if _LIBC is None:
        try:
            import ctypes

            _LIBC = ctypes.CDLL("libc.so.6")
        except OSError:
            _LIBC = False
    if _LIBC:
        _LIBC.malloc_trim(0)


_LIBC = None


def checkpoint_fingerprint(model: nn.Module, ckpt: Checkpoint) -> str:
    """models.model_fingerprint from the shards, reading only the 64 sampled values of each weight."""
    from .models import fingerprint_indices, fingerprint_of

    def samples():
        for name, p in model.named_parameters():
            yield name, ckpt.sample(name, fingerprint_indices(p.numel()))

    return fingerprint_of(model.config, samples())


# ---- block inputs -------------------------------------------------------------------------
class _Stop(Exception):
    pass


@torch.no_grad()
def block_arguments(model: nn.Module, adapter: ModelAdapter, ids: torch.Tensor, attn: torch.Tensor):
    """(first block's input, [(args, kwargs) each block receives]) as the model's forward builds them.

    Every block's forward is swapped for a recorder that returns its input unchanged; the last
    one stops the forward, so the final norm and lm_head (still on meta) are never reached.
    """
    blocks = adapter.blocks(model)
    calls: list = [None] * len(blocks)
    first: list[torch.Tensor] = []

    def recorder(i):
        def forward(hidden_states, *args, **kwargs):
            if i == 0:
                first.append(hidden_states)
            calls[i] = (args, kwargs)
            if i == len(blocks) - 1:
                raise _Stop
            return hidden_states

        return forward

    for i, block in enumerate(blocks):
        block.forward = recorder(i)
    try:
        model(input_ids=ids, attention_mask=attn, use_cache=False, logits_to_keep=1)
    except _Stop:
        pass
    finally:
        for block in blocks:
            del block.forward
    if not first or any(c is None for c in calls):
        raise DietpruneError(f"{type(model).__name__}'s forward did not call every block at '{adapter.layers}'")
    return first[0], calls


# ---- activations between blocks ---------------------------------------------------------------
class ActivationStore:
    """One float32 tensor per calibration batch, in memory or in a scratch file."""

    def __init__(self, shapes: list[tuple[int, ...]], directory: str | None):
        self.shapes = shapes
        self.tensors: list[torch.Tensor | None] = [None] * len(shapes)
        self.fd = None
        if directory is not None:
            sizes = [4 * int(torch.Size(s).numel()) for s in shapes]
            self.offsets = [sum(sizes[:i]) for i in range(len(sizes))]
            try:
                handle, self.path = tempfile.mkstemp(prefix="dietprune-act-", suffix=".bin", dir=directory)
            except OSError as exc:
                raise DietpruneError(f"cannot create the activation spill file in {directory}: "
                                     f"{exc.strerror or exc}") from exc
            os.unlink(self.path)  # the open descriptor keeps it: nothing is left behind, whatever kills us
            self.fd = handle

    def put(self, b: int, t: torch.Tensor) -> None:
        t = t.detach().to(torch.float32).contiguous()
        if self.fd is None:
            self.tensors[b] = t
        else:
            os.pwrite(self.fd, t.numpy().tobytes(), self.offsets[b])

    def get(self, b: int) -> torch.Tensor:
        if self.fd is None:
            return self.tensors[b]
        n = int(torch.Size(self.shapes[b]).numel())
        data = bytearray(os.pread(self.fd, 4 * n, self.offsets[b]))
        return torch.frombuffer(data, dtype=torch.float32).view(self.shapes[b])

    def close(self) -> None:
        self.tensors = []
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


def _spill_dir(shapes, offload: str) -> str | None:
    if offload == "memory":
        return None
    if offload not in ("auto", "disk"):
        raise DietpruneError(f"offload must be auto, memory or disk, got {offload}")
    total = sum(4 * int(torch.Size(s).numel()) for s in shapes)
    if offload == "auto":
        import psutil

        if 2 * total < psutil.virtual_memory().available // 8:
            return None
    from .validate import scratch_dir

    return scratch_dir()


# ---- profiling ----------------------------------------------------------------------------------
@torch.no_grad()
def stream_profile(folder, tokenizer, tasks, config: ProfileConfig | None = None, data_dir=None,
                   model_spec: str | None = None, offload: str = "auto", model: nn.Module | None = None,
                   ckpt: Checkpoint | None = None, fingerprint: str | None = None, examples: dict | None = None):
    """The same Profile as ``profile.profile`` on the loaded model, one block in memory at a time."""
    from .encoding import batches, wants_bos
    from .stats import TaskStats

    config = config or ProfileConfig()
    given = ckpt is not None
    ckpt = ckpt or Checkpoint(folder)
    model = model if model is not None else skeleton(folder)
    if not given:
        check_complete(model, ckpt)
    adapter = adapter_for(model)
    task_list, encoded = encode_tasks(tokenizer, tasks, config, data_dir, wants_bos(model), examples)
    fingerprint = fingerprint or checkpoint_fingerprint(model, ckpt)
    t_start = time.perf_counter()

    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    plan = []  # (task, attention mask, token mask) per batch, in collect()'s order
    for task in task_list:
        for ids, attn in batches(encoded[task.name], config.batch_size, pad):
            plan.append((task.name, ids, attn, token_mask(ids, attn, config.skip_bos, tokenizer.bos_token_id)))
    d = model.config.hidden_size
    shapes = [(ids.shape[0], ids.shape[1], d) for _, ids, _, _ in plan]
    spill = _spill_dir(shapes, offload)
    current, following = ActivationStore(shapes, spill), ActivationStore(shapes, spill)

    tied = adapter.tied(model)
    materialize_(model, adapter.embed, adapter.embedding(model), ckpt)
    calls = []
    try:
        for b, (_, ids, attn, _) in enumerate(progress(plan, desc="embed")):
            hidden, block_calls = block_arguments(model, adapter, ids, attn)
            current.put(b, hidden)
            calls.append(block_calls)
    finally:
        release_(adapter.embedding(model))
        if tied:  # a new embedding parameter unties lm_head: tie them again
            model.tie_weights()

    blocks = adapter.blocks(model)
    per_block = len(block_tap_names(adapter, config.tap))
    sums = {t.name: torch.zeros(len(blocks) * per_block, d, dtype=torch.float64) for t in task_list}
    acc = _Accumulator(len(blocks) * per_block, d, "cpu")
    norm_acc = new_norm_accumulator(adapter, model.config, config, "cpu")
    block_seconds, read_seconds = [], []
    try:
        for i, block in enumerate(progress(blocks, desc="profile blocks")):
            t0 = time.perf_counter()
            prefix = f"{adapter.layers}.{i}"
            materialize_(model, prefix, block, ckpt)
            read_seconds.append(time.perf_counter() - t0)
            points = block_tap_points(block, i, adapter, config.tap)
            handles = [m.register_forward_hook(acc.hook(i * per_block + p)) for p, (_, m) in enumerate(points)]
            if norm_acc is not None:
                handles += norm_acc.register_block(block, i)
            with _hooks(handles):
                for b, (task, _, _, mask) in enumerate(plan):
                    acc.abs_sum, acc.mask = sums[task], mask
                    if norm_acc is not None:
                        norm_acc.mask = mask
                    args, kwargs = calls[b][i]
                    following.put(b, _tensor(block(current.get(b), *args, **kwargs)))
            release_(block)
            current, following = following, current
            block_seconds.append(time.perf_counter() - t0)
        if norm_acc is not None:  # the final norm's input statistics
            final = adapter.norm(model)
            materialize_(model, adapter.final_norm, final, ckpt)
            with _hooks(norm_acc.register_final(final)):
                for b, (_, _, _, mask) in enumerate(plan):
                    norm_acc.mask = mask
                    final(current.get(b))
            release_(final)
    finally:
        current.close()
        following.close()

    per_task = {}
    for task in task_list:
        count = sum(int(mask.sum()) for name, _, _, mask in plan if name == task.name)
        per_task[task.name] = TaskStats(sums[task.name], count, len(encoded[task.name]))
        bad = ~torch.isfinite(sums[task.name]).all(dim=1)
        if bad.any():
            raise DietpruneError(f"non-finite activations (NaN/inf) at block {int(bad.nonzero()[0]) // per_block}")
    seconds = round(time.perf_counter() - t_start, 2)
    prof = finish_profile(per_task, norm_acc, task_list, config, {"all tasks (streamed)": seconds}, model.config,
                          fingerprint, model_spec)
    tokens = sum(int(p[1].numel()) for p in plan)
    prof.meta["streaming"] = {"block_seconds": [round(s, 3) for s in block_seconds],
                              "block_read_seconds": [round(s, 3) for s in read_seconds],
                              "tokens_with_padding": tokens, "activations_on_disk": spill is not None}
    return prof


# ---- writing ----------------------------------------------------------------------------------
_ST_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64",
              torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
              torch.bool: "BOOL"}


class ShardWriter:
    """Safetensors shards written tensor by tensor from a plan of (name, shape, dtype).

    The header of each shard is known from the plan, so every tensor goes to disk as soon as it
    is computed; memory holds one tensor at a time whatever the shard size.
    """

    def __init__(self, folder: Path, plan: list[tuple[str, tuple[int, ...], torch.dtype]], max_bytes: int):
        self.folder = folder
        groups, size = [[]], 0
        for name, shape, dtype in plan:
            nbytes = int(torch.Size(shape).numel()) * dtype.itemsize
            if groups[-1] and size + nbytes > max_bytes:
                groups.append([])
                size = 0
            groups[-1].append((name, shape, dtype, nbytes))
            size += nbytes
        n = len(groups)
        self.files = [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        self.where: dict[str, tuple[int, int]] = {}  # name -> (shard, byte offset in that file)
        self.expected: dict[str, tuple] = {}
        self.total = 0
        self.fds = []
        for shard, group in enumerate(groups):
            header, offset = {"__metadata__": {"format": "pt"}}, 0
            for name, shape, dtype, nbytes in group:
                header[name] = {"dtype": _ST_DTYPES[dtype], "shape": list(shape),
                                "data_offsets": [offset, offset + nbytes]}
                self.expected[name] = (tuple(shape), dtype)
                offset += nbytes
            raw = json.dumps(header, separators=(",", ":")).encode()
            raw += b" " * (-len(raw) % 8)
            fd = os.open(folder / self.files[shard], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            os.write(fd, len(raw).to_bytes(8, "little") + raw)
            os.ftruncate(fd, 8 + len(raw) + offset)
            self.fds.append(fd)
            base = 8 + len(raw)
            running = 0
            for name, _, _, nbytes in group:
                self.where[name] = (shard, base + running)
                running += nbytes
            self.total += offset

    def write(self, name: str, t: torch.Tensor, first_row: int = 0) -> None:
        """Write tensor `name` (or its rows first_row, first_row + 1, ... when `t` is a block of rows)."""
        shape, dtype = self.expected[name]
        if t.dtype != dtype or tuple(t.shape[1:]) != shape[1:] or first_row + (t.shape[0] if t.dim() else 1) > \
                (shape[0] if shape else 1) or (first_row == 0 and t.dim() != len(shape)):
            raise DietpruneError(f"internal: {name} is {tuple(t.shape)} {t.dtype}, planned {shape} {dtype}")
        shard, offset = self.where[name]
        row_bytes = int(torch.Size(shape[1:]).numel()) * dtype.itemsize
        data = t.contiguous().view(-1).view(torch.uint8).numpy()
        os.pwrite(self.fds[shard], memoryview(data), offset + first_row * row_bytes)

    def close(self) -> None:
        for fd in self.fds:
            os.fsync(fd)
            os.close(fd)
        self.fds = []
        index = {"metadata": {"total_size": self.total},
                 "weight_map": {name: self.files[s] for name, (s, _) in self.where.items()}}
        (self.folder / INDEX_NAME).write_text(json.dumps(index, indent=2))


def _out_dtype(t_dtype: torch.dtype, dtype: str | None) -> torch.dtype:
    if not t_dtype.is_floating_point:
        return t_dtype
    return getattr(torch, dtype) if dtype else torch.float32


@torch.no_grad()
def stream_checkpoint(model: nn.Module, ckpt: Checkpoint, kept: torch.Tensor, folder: Path,
                      dtype: str | None = None, norms=None, rms: bool = False, ls: bool = False,
                      ridge: float = 1e-2, max_shard_bytes: int = DEFAULT_SHARD_BYTES, energy: bool = False) -> dict:
    """Write the cut (and repaired) weights of `ckpt` into `folder`, one tensor at a time.

    The same steps as the in-memory path (rms_correct_, ls_compensate_, prune_hidden_, cast),
    tensor by tensor. Returns {"params_after": ...}.
    """
    from .repair import complement, head_foldable, ls_fold, ls_map, rescale_gain, rms_factor_for
    from .surgery import check_kept, cut_config_, slice_tensor

    adapter = adapter_for(model)
    d = model.config.hidden_size
    kept = check_kept(kept, d)
    tied = adapter.tied(model)
    if (rms or ls) and norms is None:
        raise DietpruneError("repair needs norm statistics from profiling")
    if ls and norms.gram is None:
        raise DietpruneError("least-squares repair needs Gram statistics: profile with gram=True")
    removed = complement(kept, d)
    params = dict(model.named_parameters())  # meta tensors: shapes only
    plan = []  # what save_pretrained writes: the state dict, without a tied lm_head
    for name in model.state_dict():
        if name in params:
            shape, src_dtype = params[name].shape, torch.float32
        elif name in ckpt:  # a persistent buffer (small)
            buf = ckpt.get(name)
            shape, src_dtype = buf.shape, buf.dtype
        else:
            continue
        out = slice_tensor(adapter, name, torch.empty(shape, device="meta"), kept, d, tied)
        if out is not None:
            plan.append((name, tuple(out.shape), _out_dtype(src_dtype, dtype)))
    writer = ShardWriter(folder, plan, max_shard_bytes)
    ls_cache: dict = {}

    def transform(name: str, t: torch.Tensor) -> torch.Tensor:
        if t.is_floating_point():
            t = t.to(torch.float32)
        if rms:
            f = rms_factor_for(adapter, name, kept, norms)
            if f is not None:
                t = rescale_gain(t, f, adapter.norm_offset)
        role, layer, inner = adapter.locate(name)
        if ls and role == "reader" and len(removed):
            for j, norm_name in enumerate(adapter.reader_norms()):
                if inner in adapter.norm_readers[norm_name]:
                    if (layer, j) not in ls_cache:
                        ls_cache.clear()
                        ls_cache[(layer, j)] = ls_map(norms.gram[layer, j], kept, removed, ridge)
                    t = ls_fold(t, ls_cache[(layer, j)], kept, removed, norms.gram[layer, j] if energy else None)
        if ls and role == "lm_head" and inner == "weight" and len(removed) and head_foldable(model, adapter, norms):
            if "head" not in ls_cache:
                ls_cache.clear()
                ls_cache["head"] = ls_map(norms.final_gram, kept, removed, ridge)
            t = ls_fold(t, ls_cache["head"], kept, removed, norms.final_gram if energy else None)
        t = slice_tensor(adapter, name, t, kept, d, tied)
        return t.to(_out_dtype(t.dtype, dtype))

    params_after = 0
    try:
        for name, shape, _ in progress(plan, desc="write"):
            # Rules that only cut columns (readers, embedding, lm_head) act on each row alone: a large
            # tensor of that kind is done in blocks of rows, so it is never whole in memory.
            rows_only = adapter.locate(name)[0] in ("reader", "embed", "lm_head") and len(shape) == 2
            step = max(1, ROW_BLOCK_BYTES // max(1, 4 * ckpt.shape(name)[1])) if rows_only else None
            if step is None or step >= shape[0]:
                writer.write(name, transform(name, ckpt.get(name)))
            else:
                for r0 in range(0, shape[0], step):
                    writer.write(name, transform(name, ckpt.rows(name, r0, r0 + step)), first_row=r0)
            if name in params:
                params_after += int(torch.Size(shape).numel())
            trim_heap()
    finally:
        writer.close()
    config = copy.deepcopy(model.config)
    cut_config_(config, len(kept))
    config.dtype = getattr(torch, dtype) if dtype else torch.float32
    config.save_pretrained(folder)
    if model.can_generate():
        from transformers import GenerationConfig

        src = ckpt.folder / "generation_config.json"
        gen = GenerationConfig.from_pretrained(ckpt.folder) if src.is_file() else \
            GenerationConfig.from_model_config(config)
        gen.save_pretrained(folder)
    return {"params_after": params_after}


# ---- the workflow -----------------------------------------------------------------------------
def fits_in_memory(folder) -> bool:
    """Would the float32 model (plus working room) fit in the RAM available now?"""
    import psutil

    model = skeleton(folder)
    need = 4 * param_count(model) * 1.3
    return need < psutil.virtual_memory().available


def parse_size(size) -> int:
    if isinstance(size, int):
        return size
    s = str(size).strip().upper()
    for unit, mult in (("GIB", 2**30), ("MIB", 2**20), ("KIB", 2**10), ("GB", 10**9), ("MB", 10**6),
                       ("KB", 10**3), ("B", 1)):
        if s.endswith(unit):
            try:
                return int(float(s[: -len(unit)]) * mult)
            except ValueError:
                break
    if s.isdigit():
        return int(s)
    raise DietpruneError(f"cannot read size '{size}' (use e.g. 500MB, 2GB)")


def prune_streaming(folder, spec: str, config, out: Path | None, scores=None, data_dir=None,
                    overwrite: bool = False, dtype: str | None = None, max_shard_size=DEFAULT_SHARD_BYTES,
                    offload: str = "auto", examples: dict | None = None, timings: dict | None = None):
    """pipeline.prune for a safetensors folder, one block / one tensor in memory at a time."""
    from . import distributed
    from .methods import METHODS, MethodContext
    from .methods import width_align
    from .pipeline import PruneResult, _metadata, dir_size, load_checked_scores, save_checkpoint, scores_config
    from .profile import ProfileConfig
    from .repair import parse_repair, uses_energy
    from .tasks import parse_tasks

    needs_profile, method_fn = METHODS[config.method]
    use_rms, use_ls = parse_repair(config.repair)
    timings = timings if timings is not None else {}

    t0 = time.perf_counter()
    ckpt = Checkpoint(folder)
    model = skeleton(folder)
    check_complete(model, ckpt)
    width_align(model, config)  # an --align the width cannot hold fails before profiling
    adapter = adapter_for(model)
    tokenizer = load_tokenizer(folder)
    fingerprint = checkpoint_fingerprint(model, ckpt)
    timings["load"] = time.perf_counter() - t0
    d = model.config.hidden_size
    params_before = param_count(model)

    t0 = time.perf_counter()
    prof = None
    if scores is not None:
        prof = load_checked_scores(scores, model, config, fingerprint, use_rms, use_ls)
        config = scores_config(config, prof, False)
    elif examples is not None or needs_profile:
        pcfg = ProfileConfig(samples=config.samples, seed=config.seed, tap=config.tap, batch_size=config.batch_size,
                             max_length=config.max_length, skip_bos=config.skip_bos, gram=use_ls)
        prof = stream_profile(folder, tokenizer, parse_tasks(config.tasks), pcfg, data_dir=data_dir,
                              model_spec=spec, offload=offload, model=model, ckpt=ckpt, fingerprint=fingerprint,
                              examples=examples)
    timings["profile"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    try:
        with _NoWeights():
            selection = method_fn(model, config, MethodContext(profile=prof, tokenizer=tokenizer, data_dir=data_dir))
    except _WeightsNeeded as exc:
        raise DietpruneError(f"method '{config.method}' needs the weights in memory; run it without --low-memory") \
            from exc
    kept = selection.kept
    if selection.apply is not None or kept is None or kept.device.type == "meta":
        raise DietpruneError(f"method '{config.method}' needs the weights in memory; run it without --low-memory")
    timings["select"] = time.perf_counter() - t0
    repair_prof = getattr(selection, "repair_profile", None) or prof

    k = len(kept)
    summary = {"model": spec, "method": config.method, "hidden_size_before": d, "hidden_size_after": k,
               "params_before": params_before, "low_memory": True}
    repair_info = {}
    if use_rms:
        from .repair import rms_ratio

        norms = repair_prof.norms
        repair_info["rms_factors"] = {f"{i}.{name}": rms_ratio(norms.in_sq[i, j], kept)
                                      for i in range(model.config.num_hidden_layers)
                                      for j, name in enumerate(adapter.residual_norms)}
        repair_info["rms_factors"]["final"] = rms_ratio(norms.final_in_sq, kept)
    result = PruneResult(None, tokenizer, kept, config, summary, profile=prof, timings=timings)
    if out is not None and distributed.is_main():
        t0 = time.perf_counter()
        written = {}

        def write_model(tmp: Path) -> None:
            written.update(stream_checkpoint(model, ckpt, kept, tmp, dtype=dtype,
                                             norms=None if repair_prof is None else repair_prof.norms,
                                             rms=use_rms, ls=use_ls, energy=uses_energy(config.repair),
                                             ridge=config.ridge, max_shard_bytes=parse_size(max_shard_size)))

        tensors = dict(selection.tensors)
        tensors["kept"] = kept.to(torch.int64)

        def metadata():
            summary["params_after"] = written["params_after"]
            summary["param_reduction"] = 1 - summary["params_after"] / summary["params_before"]
            return _metadata(_Spec(spec), config, kept, summary, fingerprint, prof, selection, repair_info)

        save_checkpoint(None, tokenizer, out, metadata, tensors, overwrite=overwrite, dtype=dtype,
                        write_model=write_model)
        timings["cut+save"] = time.perf_counter() - t0
        result.output = out
        summary["size_on_disk_bytes"] = dir_size(out)
    summary["seconds"] = {key: round(v, 2) for key, v in timings.items()}
    return result


class _WeightsNeeded(Exception):
    pass


class _NoWeights(torch.overrides.TorchFunctionMode):
    """Any torch operation on a meta tensor (a weight of the skeleton) stops the method.

    Without it a method reading weights would silently compute on meta tensors (CPU += meta
    is a no-op) and pick garbage dimensions.
    """

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if getattr(func, "__name__", "") == "__get__" or func in (torch.Tensor.size, torch.Tensor.dim):
            return func(*args, **kwargs)  # shape, dtype, device: metadata, not values
        for a in list(args) + list(kwargs.values()):
            items = a if isinstance(a, (list, tuple)) else (a,)
            if any(isinstance(x, torch.Tensor) and x.is_meta for x in items):
                raise _WeightsNeeded(getattr(func, "__name__", str(func)))
        return func(*args, **kwargs)


class _Spec:
    """What pipeline._metadata reads from a LoadedModel."""

    def __init__(self, spec: str):
        self.spec = spec
