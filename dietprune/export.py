"""Export a checkpoint folder to a GGUF file that llama.cpp runs.

The conversion is llama.cpp's own ``convert_hf_to_gguf.py`` (the copy vendored in the
``llama-cpp-python`` source distribution, with its ``gguf-py``), run as a subprocess on the
checkpoint folder: it knows each family's conventions (tensor names, Gemma's ``1 + w`` norm
gains stored shifted, tied output, softcapping, sliding window, rope) and it matches the
runtime that loads the file. ``q4_k_m`` is made from the converter's f32 file by llama.cpp's
own quantizer, called through llama-cpp-python's C API (``llama_model_quantize``), so no
separate ``llama-quantize`` binary is needed. The converter runs on the ``gguf-py`` it ships with
(newer than PyPI's ``gguf`` 0.19.0 under the same version number: it needs ``LazyChunkedTensor``,
which 0.19.0 lacks); dietprune's own reading and metadata rewriting use the installed ``gguf``,
which reads and writes the same file format (GGUF v3).

dietprune then checks and, where needed, patches the file with the ``gguf`` package:

* **head size**: after a width cut the head size is no longer ``hidden_size / num_heads``;
  llama.cpp then needs ``{arch}.attention.key_length`` / ``value_length``. The converter
  writes them from ``head_dim`` in config.json; the export checks they are there and equal
  to the checkpoint's head size, and adds them if not.
* **tokenizer**: a checkpoint pruned from a GGUF file (both presets) carries a tokenizer that
  transformers rebuilt from that GGUF; re-deriving llama.cpp's tokenizer from it is lossy
  (Gemma's SentencePiece vocabulary comes back as a byte-level BPE whose pre-tokenizer hash
  llama.cpp mistakes for another model's). When ``dietprune.json`` names a GGUF source whose
  vocabulary has as many tokens as the exported embedding, its ``tokenizer.*`` metadata (the
  tokenizer llama.cpp already ran that model with, chat template included) replaces the
  converter's.
* **row lengths**: q8_0 needs rows that are a multiple of 32, K-quants of 256. The converter
  and llama.cpp's quantizer fall back per tensor (f16, resp. q5_0/q8_0/f16) where a row does
  not divide; the export reports those tensors in one line.

The file is written to a temporary name beside the target and renamed into place when done.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from .errors import DietpruneError

GGUF_TYPES = ("f32", "f16", "bf16", "q8_0", "q4_k_m")
# the row length (values per row, GGUF's ne[0]) each type's blocks need
ROW_MULTIPLE = {"f32": 1, "f16": 1, "bf16": 1, "q8_0": 32, "q4_k_m": 256}
# ggml type names of what each requested type writes into the weight matrices when rows divide
_EXPECTED = {"f32": {"F32"}, "f16": {"F16"}, "bf16": {"BF16"}, "q8_0": {"Q8_0"},
             "q4_k_m": {"Q4_K", "Q5_K", "Q6_K"}}
LLAMA_CPP_ENV = "DIETPRUNE_LLAMA_CPP"
GGUF_ALIGN = 32


@dataclass
class ExportResult:
    path: Path
    gguf_type: str
    size_bytes: int
    architecture: str
    n_tensors: int
    notes: list[str] = field(default_factory=list)
    tensor_types: dict[str, int] = field(default_factory=dict)

    def summary(self) -> str:
        lines = [f"gguf           {self.path}  ({self.gguf_type}, {self.architecture}, {self.n_tensors} tensors, "
                 f"{self.size_bytes / 2**20:,.1f} MiB)"]
        lines += [f"               {n}" for n in self.notes]
        return "\n".join(lines)


def converter_dir() -> Path:
    """The folder holding llama.cpp's ``convert_hf_to_gguf.py`` (with ``conversion/`` and ``gguf-py/``).

    ``$DIETPRUNE_LLAMA_CPP``, else ``<venv>/share/llama.cpp`` where scripts/setup.sh unpacks it
    from the llama-cpp-python source distribution.
    """
    value = os.environ.get(LLAMA_CPP_ENV, "").strip()
    folder = Path(value).expanduser() if value else Path(sys.prefix) / "share" / "llama.cpp"
    if not (folder / "convert_hf_to_gguf.py").is_file():
        where = f"${LLAMA_CPP_ENV}={value}" if value else str(folder)
        raise DietpruneError(
            f"GGUF export needs llama.cpp's convert_hf_to_gguf.py (shipped in the llama-cpp-python source "
            f"distribution) and found none at {where}: run scripts/setup.sh, or set {LLAMA_CPP_ENV} to a "
            "llama.cpp source folder")
    return folder


def llama_cpp_available() -> bool:
    try:
        import llama_cpp  # noqa: F401
    except (ImportError, OSError):
        return False
    return True


def check_gguf_type(gguf_type: str) -> str:
    t = str(gguf_type).lower()
    if t not in GGUF_TYPES:
        raise DietpruneError(f"GGUF type must be one of {', '.join(GGUF_TYPES)}, got '{gguf_type}'")
    return t


def check_gguf_output(path, overwrite: bool = False, inside: Path | None = None) -> Path:
    """The absolute path of the GGUF file to write, checked before any work.

    `inside`: the checkpoint folder ``prune`` is about to create; a path in it needs no existing parent.
    """
    from .outputs import check_output_file

    if path is None or not str(path).strip():
        raise DietpruneError("GGUF output path is empty")
    p = Path(path).expanduser().absolute()
    if p.suffix.lower() != ".gguf":
        raise DietpruneError(f"GGUF output {p} must end in .gguf")
    if inside is not None and p.parent == Path(inside).absolute():
        return p
    p = check_output_file(p, "GGUF output")
    if p.exists() and not overwrite:
        raise DietpruneError(f"GGUF output {p} exists (use --overwrite to replace it)")
    return p


def _checkpoint_config(folder: Path) -> dict:
    if not folder.is_dir():
        raise DietpruneError(f"{folder} is not a checkpoint folder")
    cfg_path = folder / "config.json"
    if not cfg_path.is_file():
        raise DietpruneError(f"{folder} has no config.json: not a transformers checkpoint")
    if not any(folder.glob("*.safetensors")) and not any(folder.glob("*.bin")):
        raise DietpruneError(f"{folder} holds no weights (*.safetensors)")
    try:
        cfg = json.loads(cfg_path.read_text())
    except (OSError, ValueError) as exc:
        raise DietpruneError(f"cannot read {cfg_path}: {exc}") from exc
    from .adapters import adapter_for_type

    adapter_for_type(cfg.get("model_type", "?"))
    return cfg


def head_size(cfg: dict) -> int:
    """The attention head size of a checkpoint: head_dim when the config has it."""
    if cfg.get("head_dim"):
        return int(cfg["head_dim"])
    return int(cfg["hidden_size"]) // int(cfg["num_attention_heads"])


def source_gguf(folder: Path) -> Path | None:
    """The GGUF file a dietprune checkpoint was pruned from (preset or .gguf spec), if it still exists."""
    meta = folder / "dietprune.json"
    if not meta.is_file():
        return None
    try:
        spec = json.loads(meta.read_text()).get("source_model")
    except (OSError, ValueError):
        return None
    if not isinstance(spec, str):
        return None
    from .models import PRESETS

    try:
        if spec in PRESETS:
            return PRESETS[spec].gguf_path()
    except DietpruneError:
        return None
    p = Path(spec).expanduser()
    return p if p.suffix == ".gguf" and p.is_file() else None


def source_tokenizer_model(folder: Path) -> Path | None:
    """The SentencePiece ``tokenizer.model`` of the local folder a checkpoint was pruned from.

    transformers' ``save_pretrained`` writes tokenizer.json but not the SentencePiece model, which
    llama.cpp's converter needs for Gemma 2 (and prefers for Llama, Gemma 3, Qwen).
    """
    if (folder / "tokenizer.model").is_file() or not (folder / "dietprune.json").is_file():
        return None
    try:
        spec = json.loads((folder / "dietprune.json").read_text()).get("source_model")
    except (OSError, ValueError):
        return None
    if not isinstance(spec, str):
        return None
    candidate = Path(spec).expanduser() / "tokenizer.model"
    return candidate if candidate.is_file() else None


def _staged(folder: Path, tmp: Path, extra: dict[str, Path]) -> Path:
    """A folder of links to the checkpoint's files plus `extra` (name -> file); the checkpoint is not touched."""
    stage = tmp / "stage"
    stage.mkdir()
    for f in folder.iterdir():
        if f.is_file():
            (stage / f.name).symlink_to(f)
    for name, f in extra.items():
        (stage / name).symlink_to(f.resolve())
    return stage


def _run_converter(folder: Path, out: Path, outtype: str, log: Path) -> None:
    script = converter_dir() / "convert_hf_to_gguf.py"
    cmd = [sys.executable, str(script), str(folder), "--outtype", outtype, "--outfile", str(out)]
    env = dict(os.environ)
    env.pop("NO_LOCAL_GGUF", None)  # the converter must use the gguf-py it ships with
    with open(log, "w") as fh:
        rc = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env, cwd=str(script.parent)).returncode
    if rc != 0 or not out.is_file():
        raise DietpruneError(f"llama.cpp's converter failed on {folder}: {_last_error(log)}")


def _last_error(log: Path) -> str:
    lines = [ln.strip() for ln in log.read_text(errors="replace").splitlines() if ln.strip()]
    for ln in reversed(lines):
        if "Error" in ln or "error" in ln or ln.startswith(("raise", "NotImplemented")):
            return ln[:300]
    return lines[-1][:300] if lines else "no output"


_LOAD_CHECK = """
import sys
from llama_cpp import Llama
Llama(model_path=sys.argv[1], n_ctx=64, n_batch=8, n_threads=1, verbose=True, vocab_only=False)
"""


def runtime_check(path: Path) -> str | None:
    """Load `path` in llama.cpp in a subprocess; None if it loads, else llama.cpp's own reason.

    A subprocess because llama.cpp reports why it refuses a file only on its stderr (and a
    refusal must not take this process down).
    """
    proc = subprocess.run([sys.executable, "-c", _LOAD_CHECK, str(path)], capture_output=True, text=True,
                          errors="replace", env=dict(os.environ, OMP_NUM_THREADS="1"))
    if proc.returncode == 0:
        return None
    lines = proc.stderr.splitlines()
    for ln in lines:
        if "error loading model:" in ln:
            return ln.split("error loading model:", 1)[1].strip()[:300]
    return (lines[-1] if lines else f"exit status {proc.returncode}")[:300]


def _quantize(src: Path, dst: Path, gguf_type: str, threads: int) -> None:
    if not llama_cpp_available():
        raise DietpruneError(f"--type {gguf_type} needs llama.cpp's quantizer from the package llama-cpp-python: "
                             "run scripts/setup.sh (or `pip install llama-cpp-python`)")
    import ctypes

    import llama_cpp

    ftypes = {"q4_k_m": llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_K_M}
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftypes[gguf_type]
    params.nthread = threads
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params))
    if rc != 0 or not dst.is_file():
        raise DietpruneError(f"llama.cpp's quantizer failed ({gguf_type}) with status {rc}")


def _field_value(field):
    from gguf import GGUFValueType

    vtype = field.types[0]
    sub = field.types[-1] if vtype == GGUFValueType.ARRAY else None
    return field.contents(), vtype, sub


def rewrite_metadata(src: Path, dst: Path, set_fields: dict, replace_prefix: str | None = None,
                     prefix_from=None) -> None:
    """Copy GGUF `src` to `dst` with some metadata changed; tensors are copied byte for byte.

    `set_fields`: key -> (value, GGUFValueType[, sub_type]) to add or replace. With
    `replace_prefix`, every key of `src` under that prefix is dropped and the keys of the
    reader `prefix_from` under it are written instead.
    """
    from gguf import GGUFReader, GGUFWriter, Keys

    reader = GGUFReader(src)
    arch = reader.fields[Keys.General.ARCHITECTURE].contents()
    writer = GGUFWriter(dst, arch, endianess=reader.endianess)
    keys: dict[str, tuple] = {}
    for f in reader.fields.values():
        if f.name == Keys.General.ARCHITECTURE or f.name.startswith("GGUF."):
            continue
        if replace_prefix and f.name.startswith(replace_prefix):
            continue
        keys[f.name] = _field_value(f)
    if replace_prefix and prefix_from is not None:
        for f in prefix_from.fields.values():
            if f.name.startswith(replace_prefix):
                keys[f.name] = _field_value(f)
    for k, v in set_fields.items():
        keys[k] = (v[0], v[1], v[2] if len(v) > 2 else None)
    for k, (value, vtype, sub) in keys.items():
        writer.add_key_value(k, value, vtype, sub_type=sub)
    for t in reader.tensors:
        writer.add_tensor_info(t.name, t.data.shape, t.data.dtype, t.data.nbytes, t.tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for t in reader.tensors:
        writer.write_tensor_data(t.data, tensor_endianess=reader.endianess)
    writer.close()


def _tokenizer_from_source(reader, source: Path):
    """The source GGUF's reader when its vocabulary fits the exported embedding, else (None, why)."""
    from gguf import GGUFReader

    try:
        src = GGUFReader(source)
    except (OSError, ValueError) as exc:
        return None, f"cannot read the source GGUF {source} ({exc})"
    tokens = src.fields.get("tokenizer.ggml.tokens")
    if tokens is None:
        return None, f"the source GGUF {source.name} has no tokenizer"
    rows = [t for t in reader.tensors if t.name == "token_embd.weight"]
    n_vocab = int(rows[0].shape[1]) if rows else -1
    if len(tokens.data) != n_vocab:
        return None, (f"the source GGUF {source.name} has {len(tokens.data)} tokens, the embedding "
                      f"{n_vocab} rows")
    return src, None


def export_gguf(checkpoint, output, gguf_type: str = "f16", overwrite: bool = False,
                tokenizer: str = "auto", threads: int | None = None, check: bool = True) -> ExportResult:
    """Write the checkpoint folder `checkpoint` as the GGUF file `output` (see the module doc).

    `tokenizer`: ``auto`` (the source GGUF's tokenizer when dietprune.json names one that
    fits, else the converter's), ``converter``, or a path to a GGUF file to take it from.
    `check`: where llama-cpp-python is installed, load the file in llama.cpp before it is renamed
    into place; a file llama.cpp refuses is not written, and its reason is the error.
    """
    from gguf import GGUFReader, GGUFValueType

    gguf_type = check_gguf_type(gguf_type)
    folder = Path(checkpoint).expanduser().absolute()
    cfg = _checkpoint_config(folder)
    out = check_gguf_output(output, overwrite)
    converter_dir()  # fail before any work
    if tokenizer not in ("auto", "converter"):
        tok_src = Path(tokenizer).expanduser()
        if not tok_src.is_file():
            raise DietpruneError(f"tokenizer GGUF not found: {tok_src}")
    elif tokenizer == "auto":
        tok_src = source_gguf(folder)
    else:
        tok_src = None
    if gguf_type == "q4_k_m" and not llama_cpp_available():
        _quantize(Path("-"), Path("-"), gguf_type, 1)  # raises the one-line error

    threads = threads or max(1, int(os.environ.get("OMP_NUM_THREADS", "0") or 0) or os.cpu_count() or 1)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    notes: list[str] = []
    try:
        source = folder
        spm = source_tokenizer_model(folder)
        if spm is not None:
            source = _staged(folder, tmp, {"tokenizer.model": spm})
            notes.append(f"tokenizer.model: from the source folder {spm.parent} (save_pretrained does not keep it)")
        converted = tmp / "convert.gguf"
        _run_converter(source, converted, "f32" if gguf_type == "q4_k_m" else gguf_type, tmp / "convert.log")
        current = converted
        if gguf_type == "q4_k_m":
            quantized = tmp / "quant.gguf"
            _quantize(converted, quantized, gguf_type, threads)
            converted.unlink()
            current = quantized

        reader = GGUFReader(current)
        arch = reader.fields["general.architecture"].contents()
        set_fields: dict = {}
        want = head_size(cfg)
        had = {}
        for key in (f"{arch}.attention.key_length", f"{arch}.attention.value_length"):
            had[key] = reader.fields[key].contents() if key in reader.fields else None
            if had[key] != want:
                set_fields[key] = (want, GGUFValueType.UINT32)
        if set_fields:
            notes.append(f"head size {want} written as attention.key_length/value_length (the converter wrote "
                         f"{sorted(set(map(str, had.values())))}); llama.cpp would otherwise take "
                         f"{cfg['hidden_size']} / {cfg['num_attention_heads']} heads")
        src_reader = None
        if tok_src is not None:
            src_reader, why = _tokenizer_from_source(reader, tok_src)
            if src_reader is None:
                notes.append(f"tokenizer: the converter's ({why})")
            else:
                notes.append(f"tokenizer: taken from {tok_src.name} (the tokenizer llama.cpp runs the source with)")
        if set_fields or src_reader is not None:
            final = tmp / "final.gguf"
            rewrite_metadata(current, final, set_fields, "tokenizer." if src_reader is not None else None,
                             src_reader)
            del reader, src_reader
            current.unlink()
            current = final
            reader = GGUFReader(current)

        types: dict[str, int] = {}
        fallback: dict[str, list] = {}
        need = ROW_MULTIPLE[gguf_type]
        for t in reader.tensors:
            types[t.tensor_type.name] = types.get(t.tensor_type.name, 0) + 1
            if len(t.shape) >= 2 and t.tensor_type.name not in _EXPECTED[gguf_type] \
                    and int(t.shape[0]) % need != 0:
                fallback.setdefault(t.tensor_type.name, []).append(int(t.shape[0]))
        if fallback:
            n = sum(len(v) for v in fallback.values())
            rows = sorted({r for v in fallback.values() for r in v})
            used = ", ".join(f"{k.lower()} x{len(v)}" for k, v in sorted(fallback.items()))
            notes.append(f"{n} of {len(reader.tensors)} tensors not in {gguf_type}: rows of {rows} values do not "
                         f"divide by {need} (used {used}; a width that is a multiple of {need} avoids this)")
        n_tensors = len(reader.tensors)
        del reader
        if check and llama_cpp_available():
            why = runtime_check(current)
            if why is not None:
                raise DietpruneError(f"llama.cpp refuses the exported {arch} file: {why}")
        os.chmod(current, 0o666 & ~_umask())
        os.replace(current, out)
    except OSError as exc:
        raise DietpruneError(f"cannot write GGUF to {out}: {exc.strerror or exc}") from exc
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return ExportResult(out, gguf_type, out.stat().st_size, arch, n_tensors, notes, types)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def gguf_align(config, sparsity: float, widths: bool = False) -> tuple[int, str | None]:
    """The --align that `prune --gguf` uses when the user gave none, and a note when it is 1.

    32 (q8_0 blocks) unless the architecture's own width rule (hidden_size a multiple of the
    head count) makes the common multiple so coarse that the kept width would move by more
    than 32 from the requested sparsity (SmolLM2's 9 heads: multiples of 288). A method that
    also cuts MLP channels (`widths`, diet-width) always gets 32: its channels align freely,
    and its grid keeps only hidden widths that are multiples of lcm(32, heads).
    """
    if widths:
        return GGUF_ALIGN, None
    import math

    from .adapters import adapter_for_type
    from .merge import keep_count

    d = int(config.hidden_size)
    m = adapter_for_type(config.model_type).width_multiple(config)
    plain = keep_count(d, sparsity, m)
    aligned = keep_count(d, sparsity, math.lcm(GGUF_ALIGN, m))
    if abs(aligned - plain) <= GGUF_ALIGN and aligned < d or sparsity == 0:
        return GGUF_ALIGN, None
    return 1, (f"not aligning the width to {GGUF_ALIGN}: with {m} attention heads it would have to be a multiple "
               f"of {math.lcm(GGUF_ALIGN, m)} ({aligned} kept instead of {plain}); q8_0/K-quant rows that do not "
               "divide stay f16")


def add_export(sub):
    p = sub.add_parser("export", help="write a checkpoint folder as a GGUF file for llama.cpp")
    p.add_argument("checkpoint", help="checkpoint folder (e.g. the output of `dietprune prune`)")
    p.add_argument("--gguf", required=True, help="GGUF file to write (.gguf)")
    p.add_argument("--type", default="f16", choices=GGUF_TYPES, help="weight type (default f16)")
    p.add_argument("--tokenizer", default="auto",
                   help="auto (the source GGUF's when dietprune.json names one), converter, or a GGUF file")
    p.add_argument("--overwrite", action="store_true", help="replace an existing GGUF file")
    p.add_argument("--no-check", action="store_true", help="do not load the file in llama.cpp before writing it")

    def run(args) -> int:
        res = export_gguf(args.checkpoint, args.gguf, args.type, overwrite=args.overwrite, tokenizer=args.tokenizer,
                          check=not args.no_check)
        print(res.summary())
        return 0

    return run


def prepare_gguf(model, output, gguf, gguf_type: str, sparsity: float, align: int | None,
                 overwrite: bool, widths: bool = False) -> tuple[Path, int, str | None]:
    """For ``prune --gguf``: check the GGUF request before any work; pick --align when not given.

    Returns (GGUF path, align, a note to print or None).
    """
    check_gguf_type(gguf_type)
    out_dir = Path(output).expanduser().absolute() if output is not None else None
    path = check_gguf_output(gguf, overwrite, inside=out_dir)
    converter_dir()
    if gguf_type == "q4_k_m" and not llama_cpp_available():
        _quantize(Path("-"), Path("-"), gguf_type, 1)
    if align is not None:
        return path, align, None
    from transformers import AutoConfig

    from .models import resolve

    where, kwargs, _ = resolve(str(model))
    if "gguf_file" in kwargs:  # the dequantized cache's config.json, when there is one, reads in milliseconds
        import torch

        from .models import gguf_cache_entry

        entry = gguf_cache_entry(Path(where) / kwargs["gguf_file"], torch.float32)
        if entry is not None and (entry / "config.json").is_file():
            where, kwargs = str(entry), {}
    try:
        config = AutoConfig.from_pretrained(where, **kwargs)
    except (OSError, ValueError) as exc:
        raise DietpruneError(f"cannot read the config of '{model}': {str(exc).splitlines()[0]}") from exc
    align, note = gguf_align(config, sparsity, widths)
    return path, align, note


def llama_cpp_model(path, threads: int = 1, n_ctx: int = 512, logits_all: bool = True, f32_cache: bool = False):
    """Load a GGUF file in llama.cpp (llama-cpp-python), quietly; a one-line error if it cannot."""
    if not llama_cpp_available():
        raise DietpruneError("running a GGUF file needs the package llama-cpp-python: run scripts/setup.sh")
    from llama_cpp import Llama

    kv = {"type_k": 0, "type_v": 0} if f32_cache else {}  # GGML_TYPE_F32 (default f16)
    try:
        return Llama(model_path=str(path), n_ctx=n_ctx, n_batch=n_ctx, n_ubatch=n_ctx, n_threads=threads,
                     n_threads_batch=threads, logits_all=logits_all, verbose=False, swa_full=True, **kv)
    except (ValueError, RuntimeError) as exc:
        raise DietpruneError(f"llama.cpp cannot load {path}: {exc}") from exc


def llama_cpp_logits(llm, ids) -> "np.ndarray":  # noqa: F821
    """Logits (positions x vocab) of llama.cpp on token ids, from a fresh context."""
    import numpy as np

    llm.reset()  # the next eval drops the cached positions
    llm.eval(list(map(int, ids)))
    return np.array(llm.scores[: len(ids)], dtype=np.float32)


def llama_cpp_greedy(llm, ids, n: int) -> list[int]:
    """`n` greedy tokens after `ids` (argmax of llama.cpp's logits, no sampler)."""
    import numpy as np

    def last_logits():
        if llm._logits_all:
            return llm.scores[llm.n_tokens - 1]
        return np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(llm.n_vocab(),))

    llm.reset()
    llm.eval(list(map(int, ids)))
    out = []
    for i in range(n):
        out.append(int(np.argmax(last_logits())))
        if i + 1 < n:
            llm.eval([out[-1]])
    return out
