"""dietprune: task-aware, training-free pruning of LLMs into smaller standard checkpoints.

Public API (imported lazily so ``import dietprune`` stays cheap)::

    dietprune.profile(model, tasks, samples=100)          -> Profile
    dietprune.prune(model, tasks, sparsity=0.2, output=)  -> PruneResult
    dietprune.merge(scores, sparsity, method="vote")      -> MergeResult
    dietprune.load(spec)                                  -> LoadedModel
    dietprune.heal(student, teacher, output=, tokens=)    -> HealResult

``dietprune.profile``, ``dietprune.merge`` and ``dietprune.heal`` are also the names of submodules; once Python
imports one (``dietprune.prune`` does), the package attribute is that module. The module is then
made callable, forwarding to the function, so the calls above work in any order and
``dietprune.profile.ProfileConfig`` still names the class.
"""

import os
import sys
import types
from importlib import import_module

if os.environ.get("DIETPRUNE_PROGRESS") == "0":  # the older switch, as tqdm's own (read when tqdm is imported)
    os.environ.setdefault("TQDM_DISABLE", "1")

__version__ = "0.1.0"

_LAZY = {
    "profile": ("pipeline", "profile"),
    "prune": ("pipeline", "prune"),
    "PruneConfig": ("registry", "PruneConfig"),
    "method_config": ("registry", "method_config"),
    "PruneResult": ("pipeline", "PruneResult"),
    "merge": ("merge", "merge"),
    "load": ("models", "load"),
    "Profile": ("stats", "Profile"),
    "prune_hidden_": ("surgery", "prune_hidden_"),
    "DietpruneError": ("errors", "DietpruneError"),
    "heal": ("heal", "heal"),
    "HealConfig": ("heal", "HealConfig"),
    "HealResult": ("heal", "HealResult"),
}

__all__ = sorted(_LAZY) + ["__version__"]


def _target(name: str):
    module, attr = _LAZY[name]
    return getattr(import_module(f"{__name__}.{module}"), attr)


class _CallableModule(types.ModuleType):
    """A submodule that shares its name with a public function and calls it."""

    def __call__(self, *args, **kwargs):
        return _target(self.__name__.rpartition(".")[2])(*args, **kwargs)


class _Package(types.ModuleType):
    def __setattr__(self, name, value):
        # the import system binds a loaded submodule here; one named like a public function
        # becomes callable so that `dietprune.<name>(...)` keeps calling the function
        if name in _LAZY and isinstance(value, types.ModuleType) and type(value) is types.ModuleType:
            value.__class__ = _CallableModule
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package


def __getattr__(name):
    if name in _LAZY:
        return _target(name)
    raise AttributeError(f"module 'dietprune' has no attribute '{name}'")
