"""The typed method registry: method specs, one config dataclass per method, `register`.

This module imports no implementation. A `MethodSpec` names its function as "module:function"
and the function is imported on first use, so the table is complete without importing DIET or
the baselines (and they import this module, never the other way round). `register` adds a
method whose function is given directly (a plug-in).

Configs: `PruneConfig` holds what every structured method shares (tasks, calibration sample,
sparsity); `HiddenConfig` adds the shared hidden-dimension cut and its repairs; `DietConfig`
the merge. Head, channel and layer methods use their own configs without repair options, so
their records never show a repair they did not run. `method_config(method, **options)` builds
the method's config and refuses options it does not have. Every field carries its help text in
``metadata["help"]`` (and ``metadata["choices"]``): the CLI derives its flags from the configs
(`cli_options`).
"""

from __future__ import annotations

from dataclasses import MISSING, asdict, dataclass, field, fields
from importlib import import_module
from typing import Callable

from .errors import DietpruneError
from .tasks import DIET_TASKS, task_tuple

CONFIG_VERSION = "2"  # 2: `sparsity` is the parameter fraction for every method (1: hidden dims for hidden methods)
TAPS = ("residual", "norm-out", "write")
DEFAULT_TAP = "norm-out"
MERGES = ("vote", "mean", "rank")
REPAIRS = ("none", "rms", "ls", "rms+ls", "rms+ls+energy", "refit", "rms+refit", "rms+ls+refit")


def _opt(default, help: str, choices=None, cli: bool = True, kind=None):
    meta = {"help": help, "cli": cli, **({"type": kind} if kind else {})}
    if choices is not None:
        meta["choices"] = choices
    if isinstance(default, dict):
        return field(default_factory=dict, metadata=meta)
    return field(default=default, metadata=meta)


def check_sparsity(sparsity: float, name: str = "sparsity") -> None:
    import numbers

    if isinstance(sparsity, bool) or not isinstance(sparsity, numbers.Real):
        raise DietpruneError(f"{name} must be a number in [0, 1), got {sparsity!r}")
    if not (0.0 <= float(sparsity) < 1.0) or sparsity != sparsity:
        raise DietpruneError(f"{name} must be in [0, 1), got {sparsity}")


@dataclass
class PruneConfig:
    """Options every structured method shares. Build one with `method_config`."""

    method: str = _opt("diet", "structured method (see `dietprune ls`)", cli=False)
    sparsity: float = _opt(0.2, "fraction of the parameters removed, in [0, 1), for every method (a hidden-dimension "
                                "method keeps the width whose cut is nearest)", cli=False)
    tasks: tuple[str, ...] = _opt(DIET_TASKS, "calibration tasks", cli=False)
    samples: int = _opt(100, "calibration samples per task", cli=False)
    seed: int = _opt(0, "seed of the calibration sample", cli=False)
    batch_size: int = _opt(8, "calibration batch size", cli=False)
    max_length: int = _opt(512, "calibration tokens per sample at most", cli=False)
    skip_bos: bool = _opt(False, "leave the BOS token out of the statistics", cli=False)
    version: str = _opt(CONFIG_VERSION, "config format version", cli=False)
    extra: dict = _opt({}, "free-form notes", cli=False)

    def __new__(cls, *args, **kwargs):
        """`PruneConfig(method=m, ...)` builds method m's own config class (as `method_config` does)."""
        if cls is PruneConfig and not args:
            cls = spec(kwargs.get("method", "diet")).config
        return object.__new__(cls)

    def __post_init__(self):
        from . import validate as v  # a leaf module: typed checks of option values

        self.tasks = task_tuple(self.tasks)
        if not isinstance(self.method, str):
            raise DietpruneError(f"method must be a name, got {self.method!r}")
        self.sparsity = v.real("sparsity", self.sparsity)
        check_sparsity(self.sparsity)
        self.samples = v.integer("samples", self.samples, 1)
        self.seed = v.seed(self.seed)
        self.skip_bos = v.flag("skip_bos", self.skip_bos)
        self.batch_size = v.integer("batch_size", self.batch_size, 1)
        self.max_length = v.integer("max_length", self.max_length, 2)
        if not isinstance(self.extra, dict):
            raise DietpruneError(f"extra must be a dict, got {self.extra!r}")
        for f in fields(self):
            choices = f.metadata.get("choices")
            if choices is not None and not isinstance(getattr(self, f.name), str):
                raise DietpruneError(f"{f.name} must be a name, got {getattr(self, f.name)!r}")
            if choices is not None and getattr(self, f.name) not in choices:
                raise DietpruneError(f"unknown {f.name} '{getattr(self, f.name)}'; choose from {', '.join(choices)}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "PruneConfig":
        """The method's config from a saved dict (unknown keys are ignored with a warning)."""
        target = spec(data.get("method", "diet")).config if cls is PruneConfig else cls
        data = dict(data)
        if data.get("version", "1") == "1" and issubclass(target, HiddenConfig) \
                and not spec(data.get("method", "diet")).widths and "sparsity" in data:
            data["hidden_sparsity"] = data["sparsity"]  # version 1 meant hidden dimensions here
        data["version"] = CONFIG_VERSION
        known = {f.name for f in fields(target)}
        unknown = sorted(set(data) - known)
        if unknown:
            import warnings

            warnings.warn(f"ignoring unknown config keys {unknown}", stacklevel=2)
        return target(**{k: v for k, v in data.items() if k in known})


@dataclass
class HiddenConfig(PruneConfig):
    """Hidden-dimension methods: the kept width and the repairs of the shared cut."""

    tap: str = _opt(DEFAULT_TAP, "where activations are read (see docs/method.md)", TAPS, cli=False)
    align: int = _opt(1, "keep a multiple of this many dimensions (e.g. 8, 64; diet-width: MLP channels too)")
    hidden_sparsity: float | None = _opt(None, "fraction of hidden dimensions removed, instead of --sparsity's "
                                               "parameter fraction (what --sparsity meant for these methods "
                                               "before config version 2)", kind=float)
    repair: str = _opt("rms+ls", "training-free repair after the cut (default: see docs/method.md)", REPAIRS)
    ridge: float = _opt(1e-2, "ridge of the least-squares repair (ls)")
    refit_ridge: float = _opt(1e-3, "ridge of the sequential re-fit (refit), towards the weights it starts from")
    fit_samples: int = _opt(64, "calibration sequences the re-fit uses (pooled over tasks)")
    fit_max_length: int = _opt(256, "tokens per re-fit sequence at most")

    def __post_init__(self):
        from . import validate as v

        super().__post_init__()
        self.align = v.integer("align", self.align, 1)
        if self.hidden_sparsity is not None:
            if spec(self.method).widths:
                raise DietpruneError(f"--hidden-sparsity does not apply to {self.method}, which splits a parameter "
                                     "budget (--sparsity) between several widths")
            self.hidden_sparsity = v.real("hidden_sparsity", self.hidden_sparsity)
            check_sparsity(self.hidden_sparsity, "hidden_sparsity")
        self.ridge = v.ridge("ridge", self.ridge)
        self.refit_ridge = v.ridge("refit_ridge", self.refit_ridge)
        self.fit_samples = v.integer("fit_samples", self.fit_samples, 1)
        self.fit_max_length = v.integer("fit_max_length", self.fit_max_length, 2)


@dataclass
class DietConfig(HiddenConfig):
    """DIET (and its wikitext-calibrated variant `agnostic`): per-task rankings merged into one mask."""

    merge: str = _opt("vote", "how per-task rankings become one mask", MERGES)


@dataclass
class UnitConfig(PruneConfig):
    """Head, channel and layer methods (wanda-sp, flap, shortgpt): `sparsity` is the parameter fraction."""


@dataclass
class Selection:
    """What a method decided.

    Hidden-dimension methods set `kept` (sorted indices); the pipeline repairs and cuts.
    Methods with another structure (heads, channels, layers) set `apply`, a function that
    cuts the model in place; then `kept` is None and the hidden-dimension repairs do not apply.
    """

    kept: object  # torch.Tensor | None
    tensors: dict = field(default_factory=dict)
    info: dict = field(default_factory=dict)
    apply: Callable | None = None
    # Statistics the repairs use instead of the task profile (a method calibrated on other data).
    repair_profile: object = None


@dataclass
class MethodContext:
    """What a method may use besides the model and its config."""

    profile: object = None  # stats.Profile on the task data, when the method needs one
    tokenizer: object = None
    data_dir: object = None
    source: object = None  # engine.WeightSource of the model's weights (None: resident)


@dataclass(frozen=True)
class MethodSpec:
    name: str
    config: type
    needs_profile: bool  # the task profile is computed for the method (not only for its repairs)
    self_calibrated: bool = False  # runs its own calibration: nothing is profiled for its repairs
    target: str | None = None  # "module:function", imported on first use
    fn: Callable | None = None
    help: str = ""
    widths: bool = False  # its profile also holds MLP-channel / head statistics (dietprune.widthstats)

    def function(self) -> Callable:
        if self.fn is not None:
            return self.fn
        module, name = self.target.split(":")
        return getattr(import_module(module), name)

    def __iter__(self):
        """`needs_profile, fn = METHODS[name]`: the table's former (tuple) entries still unpack."""
        return iter((self.needs_profile, self.function()))


METHODS: dict[str, MethodSpec] = {}


def _declare(name, config, needs_profile, target, help, self_calibrated=False, widths=False):
    METHODS[name] = MethodSpec(name, config, needs_profile, self_calibrated, target=target, help=help, widths=widths)


_declare("diet", DietConfig, True, "dietprune.methods:diet", "DIET: per-task top-k merged by vote")
_declare("diet-mean", HiddenConfig, True, "dietprune.methods:diet_mean", "DIET scores, mean merge")
_declare("diet-rank", HiddenConfig, True, "dietprune.methods:diet_rank", "DIET scores, rank merge")
_declare("random", HiddenConfig, False, "dietprune.methods:random_dims", "random hidden dimensions")
_declare("magnitude", HiddenConfig, False, "dietprune.methods:magnitude", "hidden dimensions by weight norm")
_declare("agnostic", DietConfig, False, "dietprune.baselines.methods:agnostic",
         "DIET on wikitext2 instead of the tasks", self_calibrated=True)
_declare("wanda-sp", UnitConfig, False, "dietprune.baselines.methods:wanda_sp", "KV groups + MLP channels by |W|·‖X‖",
         self_calibrated=True)
_declare("flap", UnitConfig, False, "dietprune.baselines.methods:flap", "FLAP fluctuation, bias compensation",
         self_calibrated=True)
_declare("shortgpt", UnitConfig, False, "dietprune.baselines.methods:shortgpt", "layers by Block Influence",
         self_calibrated=True)

_declare("diet-width", DietConfig, True, "dietprune.width:diet_width",
         "DIET's vote on hidden dims, MLP channels and heads; budget split by KL (sparsity = parameters)",
         widths=True)


def register(name: str, needs_profile: bool = False, self_calibrated: bool = False, config: type = HiddenConfig,
             help: str = "", widths: bool = False):
    """Decorator adding a method function(model, config, ctx) -> Selection under `name`."""
    def deco(fn):
        METHODS[name] = MethodSpec(name, config, needs_profile, self_calibrated, fn=fn, help=help, widths=widths)
        return fn

    return deco


def spec(name: str) -> MethodSpec:
    if name not in METHODS:
        raise DietpruneError(f"unknown method '{name}'; choose from {', '.join(sorted(METHODS))}")
    return METHODS[name]


def method_config(method: str = "diet", **options) -> PruneConfig:
    """The config of `method` from keyword options; an option the method does not have is an error."""
    cls = spec(method).config
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(options) - known)
    if unknown:
        raise DietpruneError(f"method '{method}' has no option {', '.join(unknown)} "
                             f"(its options: {', '.join(sorted(known - {'method', 'version', 'extra'}))})")
    return cls(method=method, **options)


def cli_options() -> list[tuple[str, type, object, dict]]:
    """(field name, type, default, metadata) of every CLI-visible option over all registered configs, once each."""
    seen: dict[str, tuple] = {}
    for s in METHODS.values():
        for f in fields(s.config):
            if f.metadata.get("cli") and f.name not in seen:
                default = f.default if f.default is not MISSING else None
                seen[f.name] = (f.name, f.metadata.get("type", type(default)), default, dict(f.metadata))
    return list(seen.values())
