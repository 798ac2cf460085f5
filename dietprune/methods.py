"""Method registry: a config dataclass per structured method and the function that picks dimensions.

A hidden-dimension method maps (model, config, context) to the sorted indices of the hidden
dimensions to keep; the shared surgery then cuts them. ``register`` adds a method, the same way
peft maps a config type to its tuner.
"""

from __future__ import annotations

import math

from dataclasses import asdict, dataclass, field, fields
from typing import Callable

import torch

from .errors import DietpruneError
from .merge import MERGES, check_sparsity, keep_count, merge
from .profile import DEFAULT_TAP, TAPS
from .repair import REPAIRS
from .tasks import DIET_TASKS, task_tuple

CONFIG_VERSION = "1"


@dataclass
class PruneConfig:
    """Options of a structured hidden-dimension prune. `method` selects the registered method."""

    method: str = "diet"
    sparsity: float = 0.2
    tasks: tuple[str, ...] = DIET_TASKS
    samples: int = 100
    seed: int = 0
    tap: str = DEFAULT_TAP
    merge: str = "vote"
    align: int = 1
    repair: str = "rms+ls"  # best measured on gemma3-270m, docs/method.md
    ridge: float = 1e-2  # least-squares repair (ls)
    refit_ridge: float = 1e-3  # sequential re-fit (refit)
    fit_samples: int = 64  # calibration sequences the re-fit uses (pooled over tasks)
    fit_max_length: int = 256
    skip_bos: bool = False
    batch_size: int = 8
    max_length: int = 512
    version: str = CONFIG_VERSION
    extra: dict = field(default_factory=dict)

    def __post_init__(self):
        self.tasks = task_tuple(self.tasks)
        check_sparsity(self.sparsity)
        if self.method not in METHODS:
            raise DietpruneError(f"unknown method '{self.method}'; choose from {', '.join(sorted(METHODS))}")
        if self.merge not in MERGES:
            raise DietpruneError(f"unknown merge '{self.merge}'; choose from {', '.join(MERGES)}")
        if self.tap not in TAPS:
            raise DietpruneError(f"unknown tap '{self.tap}'; choose from {', '.join(TAPS)}")
        if self.repair not in REPAIRS:
            raise DietpruneError(f"unknown repair '{self.repair}'; choose from {', '.join(REPAIRS)}")
        if self.align < 1:
            raise DietpruneError(f"align must be at least 1, got {self.align}")
        if self.samples <= 0:
            raise DietpruneError(f"samples must be positive, got {self.samples}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "PruneConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            import warnings

            warnings.warn(f"ignoring unknown config keys {unknown}", stacklevel=2)
        return cls(**{k: v for k, v in data.items() if k in known})


@dataclass
class Selection:
    """What a method decided.

    Hidden-dimension methods set `kept` (sorted indices); the pipeline repairs and cuts.
    Methods with another structure (heads, channels, layers) set `apply`, a function that
    cuts the model in place; then `kept` is None and the hidden-dimension repairs do not apply.
    """

    kept: torch.Tensor | None
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
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


# name -> (needs task profile, function(model, config, ctx: MethodContext) -> Selection)
METHODS: dict[str, tuple[bool, Callable]] = {}
# Methods that run their own calibration: the pipeline profiles nothing for their repairs.
SELF_CALIBRATED: set[str] = set()
# Methods whose profile also holds the MLP-channel / head statistics (dietprune.widthstats).
WIDTH_STATS: set[str] = set()


def register(name: str, needs_profile: bool, self_calibrated: bool = False, widths: bool = False):
    def deco(fn):
        METHODS[name] = (needs_profile, fn)
        if self_calibrated:
            SELF_CALIBRATED.add(name)
        if widths:
            WIDTH_STATS.add(name)
        return fn

    return deco


def width_align(model, config: PruneConfig) -> int:
    """The kept width is a multiple of this: the user's --align and the architecture's head count."""
    from .adapters import adapter_for

    return math.lcm(config.align, adapter_for(model).width_multiple(model.config))


def target_width(model, config: PruneConfig) -> int:
    return keep_count(model.config.hidden_size, config.sparsity, width_align(model, config))


def _merged(model, ctx: MethodContext, config: PruneConfig, how: str) -> Selection:
    profile = ctx.profile
    scores = profile.score_matrix()
    result = merge(scores, config.sparsity, how, width_align(model, config))
    tensors = {"votes": result.votes.to(torch.int32), "task_masks": result.task_masks.to(torch.uint8),
               "scores": scores.float()}
    return Selection(result.kept, tensors, {"merge": how, "task_order": list(profile.tasks)})


@register("diet", needs_profile=True)
def diet(model, config: PruneConfig, ctx: MethodContext) -> Selection:
    """DIET: per-task top-k by mean |activation|, merged by majority vote (or config.merge)."""
    return _merged(model, ctx, config, config.merge)


@register("diet-mean", needs_profile=True)
def diet_mean(model, config: PruneConfig, ctx: MethodContext) -> Selection:
    return _merged(model, ctx, config, "mean")


@register("diet-rank", needs_profile=True)
def diet_rank(model, config: PruneConfig, ctx: MethodContext) -> Selection:
    return _merged(model, ctx, config, "rank")


@register("random", needs_profile=False)
def random_dims(model, config: PruneConfig, ctx: MethodContext) -> Selection:
    d = model.config.hidden_size
    k = target_width(model, config)
    g = torch.Generator().manual_seed(config.seed)
    return Selection(torch.sort(torch.randperm(d, generator=g)[:k]).values)


@register("magnitude", needs_profile=False)
@torch.no_grad()
def magnitude(model, config: PruneConfig, ctx: MethodContext) -> Selection:
    """Hidden dimensions by the L2 norm of every weight slice that touches them."""
    from .adapters import adapter_for, get_module
    from .merge import order_by

    adapter = adapter_for(model)
    d = model.config.hidden_size
    sq = torch.zeros(d, dtype=torch.float64)
    sq += adapter.embedding(model).weight.double().pow(2).sum(0)
    if not adapter.tied(model):
        sq += adapter.output_head(model).weight.double().pow(2).sum(0)
    for block in adapter.blocks(model):
        for name in adapter.readers:
            sq += get_module(block, name).weight.double().pow(2).sum(0)
        for name in adapter.writers:
            sq += get_module(block, name).weight.double().pow(2).sum(1)
    kept = torch.sort(order_by(sq.sqrt())[:target_width(model, config)]).values
    return Selection(kept, {"weight_norm": sq.sqrt().float()})


# The structured baselines register themselves in the same table (agnostic, wanda-sp, flap, shortgpt).
from .baselines import methods as _baselines  # noqa: E402,F401
from . import width as _width  # noqa: E402,F401  (diet-width)
