"""Options of an unstructured / N:M sparsification run, validated on construction."""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field

from ..errors import DietpruneError
from ..tasks import task_tuple

METHODS = ("magnitude", "wanda", "sparsegpt")
CRITERIA = ("ratio", "top")
CONFIG_VERSION = "1"


def parse_pattern(pattern: str) -> tuple[int, int] | None:
    """'unstructured' -> None; 'N:M' -> (N, M): keep at most N nonzero weights in every M consecutive inputs."""
    if pattern == "unstructured":
        return None
    match = re.fullmatch(r"(\d+):(\d+)", str(pattern))
    if not match:
        raise DietpruneError(f"pattern must be 'unstructured' or N:M like 2:4, got '{pattern}'")
    n, m = int(match.group(1)), int(match.group(2))
    if not 0 < n < m:
        raise DietpruneError(f"pattern {pattern}: need 0 < N < M (N weights kept in every M)")
    return n, m


@dataclass
class SparsifyConfig:
    """One sparsification run.

    Calibration: ``samples`` windows of ``seqlen`` tokens from the general text (wikitext2 calib
    split), and with ``fuse`` also ``task_samples`` examples (query + gold answer) of every task.

    Fusion (see docs/unstructured.md): per linear layer and input channel j, g_j and t_j are the
    RMS activations on general and task data. Channel j is task-exclusive when t_j / g_j > tau
    (criterion 'ratio') or when it is among the top ``rho`` fraction by t_j / g_j (criterion 'top').
    Shared channels use a_j^2 = (1 - task_weight) g_j^2 + task_weight t_j^2; exclusive channels use
    a_j = boost * t_j.
    """

    method: str = "wanda"
    pattern: str = "unstructured"
    sparsity: float | None = None  # unstructured: required; N:M: 1 - N/M (checked if given)
    general: str = "wikitext2"
    tasks: tuple[str, ...] = ()
    fuse: bool = False
    criterion: str = "ratio"
    tau: float = 1.5
    rho: float = 0.05
    task_weight: float = 0.5
    boost: float = 1.0
    samples: int = 64
    seqlen: int = 256
    task_samples: int = 16
    seed: int = 0
    batch_size: int = 8
    max_length: int = 512
    blocksize: int = 128  # SparseGPT: columns per lazy-update block
    percdamp: float = 0.01  # SparseGPT: dampening, as a fraction of the mean Hessian diagonal
    version: str = CONFIG_VERSION
    extra: dict = field(default_factory=dict)

    def __post_init__(self):
        self.tasks = task_tuple(self.tasks)
        if self.method not in METHODS:
            raise DietpruneError(f"unknown method '{self.method}'; choose from {', '.join(METHODS)}")
        nm = parse_pattern(self.pattern)
        if nm is None:
            if self.sparsity is None:
                raise DietpruneError("unstructured pruning needs --sparsity")
            if not isinstance(self.sparsity, (int, float)) or not 0.0 < self.sparsity < 1.0:
                raise DietpruneError(f"sparsity must be in (0, 1), got {self.sparsity}")
        else:
            implied = 1.0 - nm[0] / nm[1]
            if self.sparsity is not None and abs(self.sparsity - implied) > 1e-9:
                raise DietpruneError(f"pattern {self.pattern} means sparsity {implied:g}, got --sparsity {self.sparsity}")
            self.sparsity = implied
        if self.fuse and not self.tasks:
            raise DietpruneError("--fuse needs task data: pass --tasks")
        if self.criterion not in CRITERIA:
            raise DietpruneError(f"unknown criterion '{self.criterion}'; choose from {', '.join(CRITERIA)}")
        if not self.tau > 0:
            raise DietpruneError(f"tau must be positive, got {self.tau}")
        if not 0.0 <= self.rho < 1.0:
            raise DietpruneError(f"rho must be in [0, 1), got {self.rho}")
        if not 0.0 <= self.task_weight <= 1.0:
            raise DietpruneError(f"task_weight must be in [0, 1], got {self.task_weight}")
        if not self.boost >= 1.0:
            raise DietpruneError(f"boost must be at least 1, got {self.boost}")
        for name in ("samples", "seqlen", "task_samples", "batch_size", "max_length", "blocksize"):
            if int(getattr(self, name)) <= 0:
                raise DietpruneError(f"{name} must be positive, got {getattr(self, name)}")
        if not 0.0 <= self.percdamp < 1.0:
            raise DietpruneError(f"percdamp must be in [0, 1), got {self.percdamp}")

    @property
    def nm(self) -> tuple[int, int] | None:
        return parse_pattern(self.pattern)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["tasks"] = list(self.tasks)
        return d
