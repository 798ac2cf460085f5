"""Progress bars: tqdm on stderr, switched off by tqdm's own ``TQDM_DISABLE=1``.

``DIETPRUNE_PROGRESS=0`` sets ``TQDM_DISABLE=1`` when dietprune is imported (``dietprune/__init__``),
so it silences transformers', huggingface_hub's and datasets' bars (tqdm subclasses) as well.
"""

from __future__ import annotations

from tqdm.auto import tqdm


def progress(iterable, total: int | None = None, desc: str = ""):
    return tqdm(iterable, total=total, desc=desc, mininterval=1.0, leave=False, dynamic_ncols=True)
