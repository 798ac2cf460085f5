"""Progress bars (tqdm on stderr); DIETPRUNE_PROGRESS=0 turns them off."""

from __future__ import annotations

import os

from tqdm.auto import tqdm


def progress(iterable, total: int | None = None, desc: str = ""):
    disable = os.environ.get("DIETPRUNE_PROGRESS", "1") == "0"
    return tqdm(iterable, total=total, desc=desc, disable=disable, mininterval=1.0, leave=False, dynamic_ncols=True)
