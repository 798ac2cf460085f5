"""Layer streaming: a weight source for the engine, and a writer for the cut.

Only the model's *skeleton* is built in full: the architecture from its config with every
parameter on the meta device (``accelerate.init_empty_weights``; buffers such as rotary
frequencies stay real). `StreamedWeights` is an ``engine.WeightSource``: the engine asks it for
the embedding while it captures block 0's inputs, then for one decoder block at a time, and
sends each back to the meta device when it is done, so profiling and every other calibration
pass run the same code as for a resident model.

The cut reads one tensor at a time, applies the plan of the in-memory path
(``repair.CutPlan.transform`` then ``surgery.slice_tensor``) and writes it straight into
size-limited safetensors shards plus ``model.safetensors.index.json``.

Peak memory is about one block in float32, plus the calibration activations (twice), plus
one tensor being written. GGUF files are not streamed: they are loaded in memory or converted
once with ``save_pretrained``.
"""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path

import torch
from torch import nn

from .adapters import adapter_for, adapter_for_type, get_module, param_count
from .engine import WeightSource
from .errors import DietpruneError
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


def overwrite_tensor(ckpt: Checkpoint, name: str, t: torch.Tensor) -> None:
    """Write `t` over tensor `name` in its shard, in place (same shape and dtype as stored)."""
    path = ckpt.folder / ckpt.weight_map[name]
    with open(path, "r+b") as fh:
        n = int.from_bytes(fh.read(8), "little")
        entry = json.loads(fh.read(n))[name]
        data = t.detach().to("cpu").contiguous()
        if _ST_DTYPES.get(data.dtype) != entry["dtype"] or list(data.shape) != entry["shape"]:
            raise DietpruneError(f"internal: {name} is {tuple(data.shape)} {data.dtype}, stored {entry['shape']} "
                                 f"{entry['dtype']}")
        fh.seek(8 + n + entry["data_offsets"][0])
        fh.write(data.view(-1).view(torch.uint8).numpy().tobytes())


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


def materialize_(model: nn.Module, prefix: str, module: nn.Module, ckpt: Checkpoint, device="cpu") -> None:
    """Give `module` (at `prefix` in the model) its float32 weights from the checkpoint, on `device`."""
    names = [n for n, _ in module.named_parameters()]
    tensors = ckpt.get_many([f"{prefix}.{n}" for n in names])
    for n in names:
        owner, _, leaf = n.rpartition(".")
        t = tensors.pop(f"{prefix}.{n}")
        t = t.to(device, torch.float32) if t.is_floating_point() else t.to(device)
        setattr(get_module(module, owner) if owner else module, leaf, nn.Parameter(t, requires_grad=False))


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


class StreamedWeights(WeightSource):
    """engine.WeightSource reading a skeleton's blocks from safetensors shards, one at a time."""

    streamed = True

    def __init__(self, model: nn.Module, ckpt: Checkpoint, device="cpu"):
        self.ckpt = ckpt
        self.tied = adapter_for(model).tied(model)
        self._device = torch.device(device)

    def device(self, model: nn.Module) -> torch.device:
        return self._device

    def onload(self, model: nn.Module, path: str, module: nn.Module) -> None:
        materialize_(model, path, module, self.ckpt, self._device)

    def offload(self, model: nn.Module, path: str, module: nn.Module) -> None:
        release_(module)
        if self.tied:  # a new embedding parameter unties lm_head: tie them again
            model.tie_weights()

    def fingerprint(self, model: nn.Module) -> str:
        return checkpoint_fingerprint(model, self.ckpt)


def open_streamed(folder, spec: str | None = None, device="cpu"):
    """(LoadedModel holding the skeleton, its StreamedWeights) of a safetensors folder."""
    from .models import LoadedModel, load_tokenizer

    ckpt = Checkpoint(folder)
    model = skeleton(folder)
    check_complete(model, ckpt)
    lm = LoadedModel(model=model, tokenizer=load_tokenizer(folder), spec=spec or str(folder), source="streamed")
    return lm, StreamedWeights(model, ckpt, device)


# ---- writing ----------------------------------------------------------------------------------
_ST_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64",
              torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
              torch.bool: "BOOL"}


class ShardWriter:
    """Safetensors shards written tensor by tensor from a plan of (name, shape, dtype).

    huggingface_hub plans the shards (``split_torch_state_dict_into_shards`` on meta tensors:
    names, sizes, file names, one ``model.safetensors`` when everything fits). Each shard's
    header is then known, so every tensor goes to disk as soon as it is computed; memory holds
    one tensor at a time whatever the shard size.
    """

    def __init__(self, folder: Path, plan: list[tuple[str, tuple[int, ...], torch.dtype]], max_bytes: int):
        from huggingface_hub import split_torch_state_dict_into_shards

        self.folder = folder
        self.expected = {name: (tuple(shape), dtype) for name, shape, dtype in plan}
        split = split_torch_state_dict_into_shards(
            {n: torch.empty(shape, dtype=dtype, device="meta") for n, (shape, dtype) in self.expected.items()},
            max_shard_size=max_bytes)
        self.sharded, self.files = split.is_sharded, list(split.filename_to_tensors)
        self.where: dict[str, tuple[int, int]] = {}  # name -> (shard, byte offset in that file)
        self.total, self.fds = 0, []
        for shard, names in enumerate(split.filename_to_tensors.values()):
            header, offset, starts = {"__metadata__": {"format": "pt"}}, 0, {}
            for name in names:
                shape, dtype = self.expected[name]
                nbytes = int(torch.Size(shape).numel()) * dtype.itemsize
                header[name] = {"dtype": _ST_DTYPES[dtype], "shape": list(shape),
                                "data_offsets": [offset, offset + nbytes]}
                starts[name], offset = offset, offset + nbytes
            raw = json.dumps(header, separators=(",", ":")).encode()
            raw += b" " * (-len(raw) % 8)
            fd = os.open(folder / self.files[shard], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            os.write(fd, len(raw).to_bytes(8, "little") + raw)
            os.ftruncate(fd, 8 + len(raw) + offset)
            self.fds.append(fd)
            self.where.update({name: (shard, 8 + len(raw) + start) for name, start in starts.items()})
            self.total += offset

    def write(self, name: str, t: torch.Tensor, first_row: int = 0) -> None:
        """Write tensor `name` (or its rows first_row, first_row + 1, ... when `t` is a block of rows)."""
        shape, dtype = self.expected[name]
        if t.dtype != dtype or tuple(t.shape[1:]) != shape[1:] or first_row + (t.shape[0] if t.dim() else 1) > \
                (shape[0] if shape else 1) or (first_row == 0 and t.dim() != len(shape)):
            raise DietpruneError(f"internal: {name} is {tuple(t.shape)} {t.dtype}, planned {shape} {dtype}")
        if t.is_floating_point() and not torch.isfinite(t).all():
            raise DietpruneError(f"the pruned weights are not finite ({name}); nothing was written "
                                 "(try another --repair or a larger --ridge)")
        shard, offset = self.where[name]
        row_bytes = int(torch.Size(shape[1:]).numel()) * dtype.itemsize
        data = t.contiguous().view(-1).view(torch.uint8).numpy()
        os.pwrite(self.fds[shard], memoryview(data), offset + first_row * row_bytes)

    def close(self) -> None:
        for fd in self.fds:
            os.fsync(fd)
            os.close(fd)
        self.fds = []
        if self.sharded:
            index = {"metadata": {"total_size": self.total},
                     "weight_map": {name: self.files[s] for name, (s, _) in self.where.items()}}
            (self.folder / INDEX_NAME).write_text(json.dumps(index, indent=2))


def _out_dtype(t_dtype: torch.dtype, dtype: str | None) -> torch.dtype:
    if not t_dtype.is_floating_point:
        return t_dtype
    return getattr(torch, dtype) if dtype else torch.float32


@torch.no_grad()
def stream_checkpoint(model: nn.Module, ckpt: Checkpoint, plan, folder: Path, dtype: str | None = None,
                      max_shard_bytes: int = DEFAULT_SHARD_BYTES) -> dict:
    """Write the cut (and repaired) weights of `ckpt` into `folder`, one tensor at a time.

    `plan` is the ``repair.CutPlan`` of the in-memory path: each tensor is repaired by
    ``plan.transform``, sliced by ``surgery.slice_tensor`` and cast. Returns {"params_after": ...}.
    """
    from .surgery import check_kept, cut_config_, slice_tensor

    adapter = adapter_for(model)
    d = model.config.hidden_size
    kept = check_kept(plan.kept, d)
    tied = adapter.tied(model)
    params = dict(model.named_parameters())  # meta tensors: shapes only
    layout = []  # what save_pretrained writes: the state dict, without a tied lm_head
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
            layout.append((name, tuple(out.shape), _out_dtype(src_dtype, dtype)))
    writer = ShardWriter(folder, layout, max_shard_bytes)

    def transform(name: str, t: torch.Tensor) -> torch.Tensor:
        if t.is_floating_point():
            t = t.to(torch.float32)
        t = slice_tensor(adapter, name, plan.transform(name, t), kept, d, tied)
        return t.to(_out_dtype(t.dtype, dtype))

    params_after = 0
    try:
        for name, shape, _ in progress(layout, desc="write"):
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
    _write_configs(model, config, ckpt, folder, dtype)
    return {"params_after": params_after}


def _write_configs(model: nn.Module, config, ckpt: Checkpoint, folder: Path, dtype: str | None) -> None:
    config.dtype = getattr(torch, dtype) if dtype else torch.float32
    config.save_pretrained(folder)
    if model.can_generate():
        from transformers import GenerationConfig

        src = ckpt.folder / "generation_config.json"
        gen = GenerationConfig.from_pretrained(ckpt.folder) if src.is_file() else \
            GenerationConfig.from_model_config(config)
        gen.save_pretrained(folder)


@torch.no_grad()
def stream_apply(model: nn.Module, ckpt: Checkpoint, apply, folder: Path, dtype: str | None = None,
                 max_shard_bytes: int = DEFAULT_SHARD_BYTES) -> dict:
    """Write `ckpt` cut by a structural method's `apply` (heads, channels, layers) into `folder`, block by block.

    `apply` runs once on a copy of the meta skeleton for the layout (names, shapes, the new config),
    then once per decoder block on a copy holding only that block's weights; the block's tensors
    that come out real are written under their new names. Tensors outside the blocks (embedding,
    final norm, lm_head), which these structures leave alone, are copied from the checkpoint.
    """
    adapter = adapter_for(model)
    layout_model = apply(copy.deepcopy(model))
    tied = adapter.tied(layout_model)
    state = layout_model.state_dict()
    skip = {adapter.lm_head + ".weight"} if tied else set()
    layout = [(n, tuple(t.shape), _out_dtype(t.dtype if not t.is_meta else torch.float32, dtype))
              for n, t in state.items() if n not in skip]
    block_prefix = adapter.layers + "."
    writer = ShardWriter(folder, layout, max_shard_bytes)
    written: set[str] = set()
    try:
        for name, _, out_dtype in layout:
            if not name.startswith(block_prefix):
                t = ckpt.get(name)
                writer.write(name, t.to(out_dtype) if t.is_floating_point() else t)
                written.add(name)
        for i in progress(range(len(adapter.blocks(model))), desc="write blocks"):
            one = copy.deepcopy(model)
            materialize_(one, f"{adapter.layers}.{i}", adapter.blocks(one)[i], ckpt)
            for name, t in apply(one).state_dict().items():
                if name.startswith(block_prefix) and not t.is_meta and name not in written:
                    writer.write(name, t.to(_out_dtype(t.dtype, dtype)) if t.is_floating_point() else t)
                    written.add(name)
            del one
            trim_heap()
    finally:
        writer.close()
    missing = [n for n, _, _ in layout if n not in written]
    if missing:
        raise DietpruneError(f"internal: the streamed cut did not produce {missing[0]}")
    _write_configs(model, copy.deepcopy(layout_model.config), ckpt, folder, dtype)
    params = {id(p): p.numel() for p in layout_model.parameters()}
    return {"params_after": sum(params.values())}


# ---- the workflow -----------------------------------------------------------------------------
def fits_in_memory(folder) -> bool:
    """Would the float32 model (plus working room) fit in the RAM available now?"""
    import psutil

    model = skeleton(folder)
    need = 4 * param_count(model) * 1.3
    return need < psutil.virtual_memory().available


def parse_size(size) -> int:
    """Bytes of a size like 500MB, 2GB, 1GiB (accelerate's parser) or a plain integer."""
    from accelerate.utils import convert_file_size_to_int

    if isinstance(size, int) or str(size).strip().isdigit():
        return int(size)
    try:
        return int(convert_file_size_to_int(str(size).strip()))
    except (ValueError, TypeError) as exc:
        raise DietpruneError(f"cannot read size '{size}' (use e.g. 500MB, 2GB)") from exc


class WeightsNeeded(Exception):
    pass


class NoWeights(torch.overrides.TorchFunctionMode):
    """Any torch operation on a meta tensor (a weight of the skeleton) stops the method.

    Without it a method reading weights would silently compute on meta tensors (CPU += meta
    is a no-op) and pick garbage dimensions.
    """

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if getattr(func, "__name__", "") == "__get__" or func in (torch.Tensor.size, torch.Tensor.dim,
                                                                   torch.Tensor.numel):
            return func(*args, **kwargs)  # shape, dtype, device: metadata, not values
        for a in list(args) + list(kwargs.values()):
            items = a if isinstance(a, (list, tuple)) else (a,)
            if any(isinstance(x, torch.Tensor) and x.is_meta for x in items):
                raise WeightsNeeded(getattr(func, "__name__", str(func)))
        return func(*args, **kwargs)
