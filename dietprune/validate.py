"""Up-front checks of option values, shared by the library and the CLI.

Each option is checked in one place (the config dataclass that holds it calls these helpers
in ``__post_init__``), before any data or model is loaded, and a bad value is one line naming
the option and what it accepts. Numbers must be real numbers of the right kind (a bool, a
string or NaN is refused, not coerced).
"""

from __future__ import annotations

import math
import numbers
import os

from .errors import DietpruneError

SEED_MAX = 2**63 - 1


def integer(name: str, value, minimum: int | None = None, maximum: int | None = None) -> int:
    """`value` as an int within [minimum, maximum], or a one-line error."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise DietpruneError(f"{name} must be an integer, got {value!r}")
    value = int(value)
    if minimum is not None and value < minimum:
        raise DietpruneError(f"{name} must be at least {minimum}, got {value}")
    if maximum is not None and value > maximum:
        raise DietpruneError(f"{name} must be at most {maximum}, got {value}")
    return value


def real(name: str, value, minimum: float | None = None, maximum: float | None = None,
         above: float | None = None, below: float | None = None) -> float:
    """`value` as a finite float; `minimum`/`maximum` are inclusive bounds, `above`/`below` strict ones."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise DietpruneError(f"{name} must be a number, got {value!r}")
    value = float(value)
    if not math.isfinite(value):
        raise DietpruneError(f"{name} must be a finite number, got {value}")
    if minimum is not None and value < minimum:
        raise DietpruneError(f"{name} must be at least {minimum:g}, got {value:g}")
    if above is not None and value <= above:
        raise DietpruneError(f"{name} must be above {above:g}, got {value:g}")
    if maximum is not None and value > maximum:
        raise DietpruneError(f"{name} must be at most {maximum:g}, got {value:g}")
    if below is not None and value >= below:
        raise DietpruneError(f"{name} must be below {below:g}, got {value:g}")
    return value


def flag(name: str, value) -> bool:
    if not isinstance(value, bool):
        raise DietpruneError(f"{name} must be True or False, got {value!r}")
    return value


def choice(name: str, value, choices) -> str:
    if not isinstance(value, str) or value not in choices:
        raise DietpruneError(f"unknown {name} {value!r}; choose from {', '.join(choices)}")
    return value


def optional_choice(name: str, value, choices):
    return None if value is None else choice(name, value, choices)


def seed(value) -> int:
    return integer("seed", value, 0, SEED_MAX)


def ridge(name: str, value) -> float:
    """A ridge is a positive finite factor (λ = ridge · mean(diag G)); any size is allowed, and a
    result that still is not finite is refused before it is written (pipeline.check_finite)."""
    return real(name, value, above=0.0)


def align_within(align: int, width: int, what: str = "hidden size") -> None:
    """--align asks for a multiple of `align` kept dimensions: more than the width is not possible."""
    if align > width:
        raise DietpruneError(f"align {align} is larger than the model's {what} {width}: "
                             f"no multiple of it can be kept")


OFFLOADS = ("auto", "memory", "disk")
DTYPES = ("float32", "bfloat16", "float16")


def run_options(low_memory=None, offload="auto", device_map=None, dtype=None, overwrite=False) -> None:
    """The options of a prune / profile run that are not part of the method's config."""
    if low_memory is not None:
        flag("low_memory", low_memory)
    choice("offload", offload, OFFLOADS)
    optional_choice("device_map", device_map, ("auto",))
    optional_choice("dtype", dtype, DTYPES)
    flag("overwrite", overwrite)
    if os.environ.get("DIETPRUNE_SCRATCH_DIR") and offload != "memory":
        scratch_dir()


def shard_size(value) -> int:
    """--max-shard-size as a positive number of bytes: an integer or e.g. '500MB', '2GB', '1GiB'."""
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise DietpruneError(f"max_shard_size must be a size like 500MB or 2GB, got {value!r}")
    from .streaming import parse_size

    try:
        size = parse_size(value)
    except (OverflowError, ValueError) as exc:  # 'infGB', '1e999MB'
        raise DietpruneError(f"cannot read size '{value}' (use e.g. 500MB, 2GB)") from exc
    if size < 1:
        raise DietpruneError(f"max_shard_size must be positive, got {value!r}")
    return size


def scratch_dir() -> str:
    """Where activation spill files go: $DIETPRUNE_SCRATCH_DIR (checked) or the system temp folder."""
    import tempfile

    value = os.environ.get("DIETPRUNE_SCRATCH_DIR")
    if not value:
        return tempfile.gettempdir()
    path = os.path.expanduser(value)
    if not os.path.isdir(path):
        raise DietpruneError(f"DIETPRUNE_SCRATCH_DIR={value} is not a folder")
    if not os.access(path, os.W_OK | os.X_OK):
        raise DietpruneError(f"DIETPRUNE_SCRATCH_DIR={value} is not writable")
    return path


def profile_shapes(prof, model_config, adapter, source="the scores file") -> None:
    """Every tensor of a Profile has the shape this model's statistics have (a scores file
    edited, truncated or written for another width is refused before it is used)."""
    from .profile import block_tap_names

    d, n_layers = int(model_config.hidden_size), int(model_config.num_hidden_layers)
    hidden = prof.meta.get("hidden_size")
    if hidden is not None and hidden != d:
        raise DietpruneError(f"{source} is for hidden size {hidden}, this model has {d}")
    tap = prof.meta.get("tap")
    if not isinstance(tap, str):
        raise DietpruneError(f"{source} does not say which tap it read (meta 'tap' missing)")
    points = n_layers * len(block_tap_names(adapter, tap))

    def expect(name, tensor, shape):
        import torch

        if tuple(tensor.shape) != shape:
            raise DietpruneError(f"{source}: {name} has shape {tuple(tensor.shape)}, this model needs {shape}")
        if not tensor.is_floating_point() or not torch.isfinite(tensor).all():
            raise DietpruneError(f"{source}: {name} holds non-finite or non-float values")

    for task, st in prof.tasks.items():
        expect(f"task/{task}/abs_sum", st.abs_sum, (points, d))
        if not isinstance(st.count, int) or st.count <= 0:
            raise DietpruneError(f"{source}: task {task} counts {st.count!r} tokens")
    norms = prof.norms
    if norms is not None:
        expect("norms/in_sq", norms.in_sq, (n_layers, len(adapter.residual_norms), d))
        expect("norms/final_in_sq", norms.final_in_sq, (d,))
        if (norms.gram is None) != (norms.final_gram is None):
            raise DietpruneError(f"{source} has only one of norms/gram and norms/final_gram")
        if norms.gram is not None:
            expect("norms/gram", norms.gram, (n_layers, len(adapter.reader_norms()), d, d))
            expect("norms/final_gram", norms.final_gram, (d, d))


def load_scores(path):
    """A scores file as a Profile; anything unreadable in it (header, metadata) is one line."""
    from .stats import Profile

    if not isinstance(path, (str, os.PathLike)) or not str(path).strip():
        raise DietpruneError(f"scores must be a scores file path or a Profile, got {path!r}")
    try:
        prof = Profile.load(path)
    except (KeyError, ValueError, TypeError) as exc:
        raise DietpruneError(f"{path} is not a readable dietprune scores file ({type(exc).__name__}: {exc})") from exc
    if not isinstance(prof.meta, dict):
        raise DietpruneError(f"{path} is not a readable dietprune scores file (its metadata is not an object)")
    return prof


def known_options(options: dict, config_type, call: str) -> None:
    """Keyword options of `call` must be fields of its config dataclass (one line, not a TypeError)."""
    from dataclasses import fields

    known = {f.name for f in fields(config_type)}
    unknown = sorted(set(options) - known)
    if unknown:
        raise DietpruneError(f"{call}() got unknown option(s) {', '.join(unknown)}; "
                             f"known: {', '.join(sorted(known))}")
