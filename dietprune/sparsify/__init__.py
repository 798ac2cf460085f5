"""Unstructured and N:M sparsification (magnitude, Wanda, SparseGPT) with general + task fusion.

    from dietprune.sparsify import sparsify
    sparsify("smollm2-135m", method="wanda", pattern="2:4", tasks="boolq,arc_easy", fuse=True, output="out")

Imports are lazy so that building the CLI parser stays cheap.
"""

_LAZY = {
    "SparsifyConfig": "config",
    "parse_pattern": "config",
    "sparsify": "api",
    "SparsifyResult": "api",
    "sparsify_model": "loop",
}

__all__ = sorted(_LAZY)


def __getattr__(name):
    if name in _LAZY:
        from importlib import import_module

        return getattr(import_module(f"{__name__}.{_LAZY[name]}"), name)
    raise AttributeError(f"module 'dietprune.sparsify' has no attribute '{name}'")
