import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
os.environ.setdefault("DIETPRUNE_PROGRESS", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "benchdata"


def pytest_configure(config):
    # registered here too, so that the marks do not warn where pytest-xdist is not installed
    config.addinivalue_line("markers", "xdist_group(name): run on the same pytest-xdist worker as its group")


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


# ---- pruned real presets, one per session -------------------------------------------------------
# The slow tests that need "a real preset pruned at 20% on boolq,arc_easy" (test_real_models: reload,
# generation, perplexity; test_export: llama.cpp agreement) share one pruned checkpoint per preset instead
# of pruning it again in each test. The checkpoint folder is read only: tests write beside it in their own
# tmp_path. Under pytest-xdist these tests carry xdist_group(preset), so one worker prunes each preset.
PRESET_TASKS = "boolq,arc_easy"
PRESET_SAMPLES = 16


@pytest.fixture(scope="session")
def pruned_preset(tmp_path_factory, data_dir):
    """`get(preset)` -> the PruneResult (model in memory, `output` = its saved checkpoint folder)."""
    made: dict = {}

    def get(preset: str):
        if preset not in made:
            from dietprune.pipeline import prune

            out = tmp_path_factory.mktemp(preset) / "ckpt"
            made[preset] = prune(preset, tasks=PRESET_TASKS, samples=PRESET_SAMPLES, sparsity=0.2, output=out,
                                 data_dir=data_dir)
            assert made[preset].output == out
        return made[preset]

    return get
