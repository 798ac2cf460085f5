import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
os.environ.setdefault("DIETPRUNE_PROGRESS", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "benchdata"


@pytest.fixture(scope="session")
def data_dir():
    d = os.environ.get("DIETPRUNE_DATA_DIR") or (str(SHARED_DATA) if SHARED_DATA.is_dir() else None)
    if not d:
        pytest.skip("no benchmark data: set DIETPRUNE_DATA_DIR")
    d = str(Path(d).resolve())  # tests that change directory (and their child processes) still find it
    os.environ["DIETPRUNE_DATA_DIR"] = d
    return d


TINY_TASKS = Path(__file__).resolve().parent / "fixtures" / "tasks"


@pytest.fixture(scope="session")
def tiny_task_dir():
    """A committed task set of our own (tests/fixtures/make_tasks.py): core tests run without ../shared."""
    return str(TINY_TASKS)
