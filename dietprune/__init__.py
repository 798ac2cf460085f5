"""dietprune: task-aware, training-free pruning of LLMs into smaller standard checkpoints.

Public API (imported lazily so ``import dietprune`` stays cheap)::

    dietprune.profile(model, tasks, samples=100)          -> Profile
    dietprune.prune(model, tasks, sparsity=0.2, output=)  -> PruneResult
    dietprune.merge(scores, sparsity, method="vote")      -> MergeResult
    dietprune.load(spec)                                  -> LoadedModel
    dietprune.heal(student, teacher, output=, tokens=)    -> HealResult
"""

__version__ = "0.1.0"

_LAZY = {
    "profile": ("pipeline", "profile"),
    "prune": ("pipeline", "prune"),
    "PruneConfig": ("methods", "PruneConfig"),
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


def __getattr__(name):
    if name in _LAZY:
        from importlib import import_module

        module, attr = _LAZY[name]
        return getattr(import_module(f"{__name__}.{module}"), attr)
    raise AttributeError(f"module 'dietprune' has no attribute '{name}'")
