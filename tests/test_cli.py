"""Bad input: one line on stderr, exit code 2, nothing written where a checkpoint is expected."""

import json
import subprocess
import sys

import pytest
import torch

from dietprune.cli import main
from tiny import save_tiny, tiny_model


@pytest.fixture
def data_dir(tiny_task_dir):
    """These tests need well-formed rows, not real ones: the committed tiny task set."""
    return tiny_task_dir


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return save_tiny(tmp_path_factory.mktemp("m") / "tiny", "gemma3_text")


def _run(capsys, argv):
    code = main(argv)
    err = capsys.readouterr().err.strip()
    return code, err


def _assert_one_line_error(code, err, needle):
    assert code == 2
    lines = [l for l in err.splitlines() if l.startswith("dietprune: error:")]
    assert len(lines) == 1, err
    assert needle in lines[0], lines[0]


def _prune(tiny_dir, out, data_dir, *extra):
    return ["prune", str(tiny_dir), "--tasks", "boolq,rte", "--samples", "4", "--output", str(out),
            "--data-dir", data_dir, *extra]


@pytest.mark.parametrize("sparsity", ["1.0", "-0.1", "2"])
def test_bad_sparsity(capsys, tiny_dir, tmp_path, data_dir, sparsity):
    out = tmp_path / "out"
    code, err = _run(capsys, _prune(tiny_dir, out, data_dir, "--sparsity", sparsity))
    _assert_one_line_error(code, err, "sparsity must be in [0, 1)")
    assert not out.exists()


def test_unknown_task(capsys, tiny_dir, tmp_path, data_dir):
    out = tmp_path / "out"
    code, err = _run(capsys, ["prune", str(tiny_dir), "--tasks", "boolq,quux", "--output", str(out)])
    _assert_one_line_error(code, err, "unknown task 'quux'")
    assert not out.exists()


def test_empty_and_fieldless_task_files(capsys, tiny_dir, tmp_path):
    empty = tmp_path / "e.jsonl"
    empty.write_text("\n")
    code, err = _run(capsys, ["prune", str(tiny_dir), "--tasks", f"mine={empty}", "--output", str(tmp_path / "o")])
    _assert_one_line_error(code, err, "is empty")
    wrong = tmp_path / "w.jsonl"
    wrong.write_text(json.dumps({"question": "q", "answer": "a"}) + "\n")
    code, err = _run(capsys, ["prune", str(tiny_dir), "--tasks", f"mine={wrong}", "--output", str(tmp_path / "o")])
    _assert_one_line_error(code, err, "needs a 'text' field or 'prompt' and 'completion'")
    assert not (tmp_path / "o").exists()


def test_unsupported_architecture(capsys, tmp_path, data_dir):
    from transformers import GPT2Config, GPT2LMHeadModel

    GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=64)).save_pretrained(tmp_path / "gpt2")
    code, err = _run(capsys, _prune(tmp_path / "gpt2", tmp_path / "out", data_dir))
    _assert_one_line_error(code, err, "unsupported architecture 'gpt2'; supported: gemma2, gemma3_text, llama")
    assert not (tmp_path / "out").exists()


def test_output_not_empty_unless_overwrite(capsys, tiny_dir, tmp_path, data_dir):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("user file")
    code, err = _run(capsys, _prune(tiny_dir, out, data_dir))
    _assert_one_line_error(code, err, "exists and is not empty")
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]
    # --overwrite never deletes a file a checkpoint does not hold
    code, err = _run(capsys, _prune(tiny_dir, out, data_dir, "--overwrite", "--sparsity", "0.25"))
    _assert_one_line_error(code, err, "keep.txt")
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]
    (out / "keep.txt").unlink()
    assert main(_prune(tiny_dir, out, data_dir, "--sparsity", "0.5")) == 0
    assert main(_prune(tiny_dir, out, data_dir, "--overwrite", "--sparsity", "0.25")) == 0
    assert json.loads((out / "config.json").read_text())["hidden_size"] == 48


def test_unwritable_output(capsys, tiny_dir, tmp_path, data_dir):
    code, err = _run(capsys, _prune(tiny_dir, tmp_path / "missing" / "out", data_dir))
    _assert_one_line_error(code, err, "does not exist")


def test_scores_from_another_model(capsys, tiny_dir, tmp_path, data_dir):
    scores = tmp_path / "s.safetensors"
    assert main(["profile", str(tiny_dir), "--tasks", "boolq,rte", "--samples", "4", "--output", str(scores),
                 "--data-dir", data_dir]) == 0
    # the default repair (rms+ls) needs Gram statistics that this scores file lacks: a clear error
    code, err = _run(capsys, _prune(tiny_dir, tmp_path / "out", data_dir, "--scores", str(scores)))
    _assert_one_line_error(code, err, "profile with --gram, or prune with --repair rms")
    assert main(["profile", str(tiny_dir), "--tasks", "boolq,rte", "--samples", "4", "--output", str(scores),
                 "--data-dir", data_dir, "--gram"]) == 0
    other = save_tiny(tmp_path / "other", "gemma3_text", seed=7)
    code, err = _run(capsys, _prune(other, tmp_path / "out", data_dir, "--scores", str(scores)))
    _assert_one_line_error(code, err, "scores belong to another model")
    assert not (tmp_path / "out").exists()
    # the same model accepts them, and gives the same mask as profiling afresh
    assert main(_prune(tiny_dir, tmp_path / "a", data_dir, "--scores", str(scores))) == 0
    assert main(_prune(tiny_dir, tmp_path / "b", data_dir)) == 0
    kept = [json.loads((tmp_path / n / "dietprune.json").read_text())["kept_indices"] for n in ("a", "b")]
    assert kept[0] == kept[1]


def test_nan_activations(capsys, tmp_path, data_dir):
    model = tiny_model("llama")
    with torch.no_grad():
        model.model.layers[1].self_attn.o_proj.weight[3, 3] = float("nan")
    path = tmp_path / "nan"
    model.save_pretrained(path)
    from tiny import tiny_tokenizer

    tiny_tokenizer().save_pretrained(path)
    code, err = _run(capsys, _prune(path, tmp_path / "out", data_dir))
    _assert_one_line_error(code, err, "non-finite activations")
    assert not (tmp_path / "out").exists()
    assert not list(tmp_path.glob(".out.tmp-*"))


def test_real_exit_code_from_a_process(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "dietprune", "prune", "x", "--sparsity", "1.2", "--output",
                           str(tmp_path / "o")], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip() == "dietprune: error: sparsity must be in [0, 1), got 1.2"


def test_prune_summary_and_metadata(capsys, tiny_dir, tmp_path, data_dir):
    out = tmp_path / "p"
    assert main(_prune(tiny_dir, out, data_dir, "--sparsity", "0.5", "--repair", "rms+ls")) == 0
    text = capsys.readouterr().out
    assert "hidden size    64 -> 32" in text and "parameters" in text and "size on disk" in text
    meta = json.loads((out / "dietprune.json").read_text())
    assert meta["config"]["tasks"] == ["boolq", "rte"] and meta["config"]["samples"] == 4
    assert len(meta["kept_indices"]) == 32 and meta["profile"]["tap"] == "norm-out"
    from safetensors.torch import load_file

    mask = load_file(str(out / "dietprune_mask.safetensors"))
    assert mask["task_masks"].shape == (2, 64) and mask["kept"].tolist() == meta["kept_indices"]


def test_summary_shows_structure_changes(capsys, tiny_dir, tmp_path, data_dir):
    assert main(_prune(tiny_dir, tmp_path / "s", data_dir, "--method", "shortgpt", "--sparsity", "0.3")) == 0
    text = capsys.readouterr().out
    assert "shape          num_hidden_layers 2 -> 1" in text
