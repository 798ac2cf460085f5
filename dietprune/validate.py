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


def known_options(options: dict, config_type, call: str) -> None:
    """Keyword options of `call` must be fields of its config dataclass (one line, not a TypeError)."""
    from dataclasses import fields

    known = {f.name for f in fields(config_type)}
    unknown = sorted(set(options) - known)
    if unknown:
        raise DietpruneError(f"{call}() got unknown option(s) {', '.join(unknown)}; "
                             f"known: {', '.join(sorted(known))}")
