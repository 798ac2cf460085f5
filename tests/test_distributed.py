"""Several processes (torchrun, gloo on CPU) give the scores and the mask of one process."""

import os
import shutil
import subprocess
import sys

import pytest
import torch

from dietprune.merge import merge
from dietprune.pipeline import profile
from dietprune.stats import Profile
from tiny import save_tiny

TASKS = "boolq,arc_easy"
# under pytest-xdist: on one worker, one after another (their torchrun ports are derived from its pid)
pytestmark = pytest.mark.xdist_group("torchrun")


@pytest.mark.skipif(shutil.which("torchrun") is None and not os.path.exists(
    os.path.join(os.path.dirname(sys.executable), "torchrun")), reason="torchrun not installed")
@pytest.mark.parametrize("low_memory", [False, True])
def test_two_processes_equal_one(tmp_path, data_dir, low_memory):
    folder = save_tiny(tmp_path / "model", "qwen3")
    out = tmp_path / "scores.safetensors"
    torchrun = shutil.which("torchrun") or os.path.join(os.path.dirname(sys.executable), "torchrun")
    env = dict(os.environ, DIETPRUNE_DATA_DIR=data_dir, DIETPRUNE_PROGRESS="0", OMP_NUM_THREADS="1")
    cmd = [torchrun, "--nproc-per-node", "2", "--master-port", str(29500 + os.getpid() % 1000 + low_memory),
           "-m", "dietprune", "profile", str(folder), "--tasks", TASKS, "--samples", "7", "--batch-size", "3",
           "--max-length", "32", "--output", str(out), "--low-memory" if low_memory else "--no-low-memory"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "2 processes" in proc.stdout
    two = Profile.load(out)
    one = profile(str(folder), TASKS, samples=7, batch_size=3, max_length=32, data_dir=data_dir,
                  low_memory=low_memory)
    for task in one.tasks:
        assert two.tasks[task].samples == one.tasks[task].samples == 7
        assert two.tasks[task].count == one.tasks[task].count
        torch.testing.assert_close(two.tasks[task].scores(), one.tasks[task].scores(), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(two.norms.in_sq, one.norms.in_sq, rtol=1e-6, atol=1e-6)
    a = merge(one.score_matrix(), 0.25, "vote", 4)
    b = merge(two.score_matrix(), 0.25, "vote", 4)
    assert torch.equal(a.kept, b.kept)


@pytest.mark.skipif(shutil.which("torchrun") is None and not os.path.exists(
    os.path.join(os.path.dirname(sys.executable), "torchrun")), reason="torchrun not installed")
def test_two_processes_equal_one_on_the_width_statistics(tmp_path, data_dir):
    folder = save_tiny(tmp_path / "model", "llama")
    out = tmp_path / "scores.safetensors"
    torchrun = shutil.which("torchrun") or os.path.join(os.path.dirname(sys.executable), "torchrun")
    env = dict(os.environ, DIETPRUNE_DATA_DIR=data_dir, DIETPRUNE_PROGRESS="0", OMP_NUM_THREADS="1")
    cmd = [torchrun, "--nproc-per-node", "2", "--master-port", str(28500 + os.getpid() % 1000),
           "-m", "dietprune", "profile", str(folder), "--tasks", TASKS, "--samples", "7", "--batch-size", "3",
           "--max-length", "32", "--output", str(out), "--no-low-memory", "--widths", "--gram"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    two = Profile.load(out).widths
    one = profile(str(folder), TASKS, samples=7, batch_size=3, max_length=32, data_dir=data_dir,
                  low_memory=False, widths=True, gram=True).widths
    for task in one.tasks:
        assert two.tasks[task].count == one.tasks[task].count > 0
        torch.testing.assert_close(two.tasks[task].mlp_scores(), one.tasks[task].mlp_scores(), rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(two.tasks[task].head_scores(), one.tasks[task].head_scores(), rtol=1e-6, atol=1e-6)
    assert two.mlp.count == one.mlp.count
    torch.testing.assert_close(two.mlp.gram, one.mlp.gram, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(two.attn.s, one.attn.s, rtol=1e-5, atol=1e-5)
