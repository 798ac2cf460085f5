"""--overwrite may replace only a checkpoint folder; no output path can lose a user's files."""

from pathlib import Path

import pytest

from dietprune.cli import main
from dietprune.errors import DietpruneError
from dietprune.outputs import check_output_dir, check_output_file
from tiny import save_tiny


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return save_tiny(tmp_path_factory.mktemp("m") / "tiny", "llama")


def _prune(capsys, tiny_dir, data_dir, output, *extra):
    code = main(["prune", str(tiny_dir), "--tasks", "arc_easy", "--samples", "2", "--data-dir", data_dir,
                 "--output", output, *extra])
    return code, capsys.readouterr().err.strip()


def _snapshot(folder: Path) -> dict:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def test_empty_output_with_overwrite_keeps_the_current_directory(capsys, tiny_dir, data_dir, tmp_path,
                                                                  monkeypatch):
    work = tmp_path / "work"
    work.mkdir()
    (work / "notes.txt").write_text("mine")
    monkeypatch.chdir(work)
    code, err = _prune(capsys, tiny_dir, data_dir, "", "--overwrite")
    assert code == 2 and err.startswith("dietprune: error:") and "empty" in err, err
    assert _snapshot(work) == {"notes.txt": b"mine"}


@pytest.mark.parametrize("target", [".", "..", "sub/.."])
def test_current_directory_and_parents_are_never_replaced(capsys, tiny_dir, data_dir, tmp_path, monkeypatch,
                                                          target):
    work = tmp_path / "work"
    (work / "sub").mkdir(parents=True)
    # even a folder that looks like a checkpoint is refused when it is the cwd or above it
    for name in ("config.json", "model.safetensors"):
        (work / name).write_text("{}")
    (work / "sub" / "config.json").write_text("{}")
    monkeypatch.chdir(work / "sub" if target == ".." else work)
    before = _snapshot(tmp_path)
    code, err = _prune(capsys, tiny_dir, data_dir, target, "--overwrite")
    assert code == 2 and "current directory" in err, err
    assert _snapshot(tmp_path) == before


def test_overwrite_refuses_a_folder_with_a_users_file(capsys, tiny_dir, data_dir, tmp_path):
    out = tmp_path / "out"
    code, _ = _prune(capsys, tiny_dir, data_dir, str(out))
    assert code == 0
    (out / "notes.txt").write_text("do not lose me")
    before = _snapshot(out)
    code, err = _prune(capsys, tiny_dir, data_dir, str(out), "--overwrite")
    assert code == 2 and "notes.txt" in err, err
    assert _snapshot(out) == before
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no temp folder left beside it


def test_overwrite_refuses_a_folder_that_is_not_a_checkpoint(capsys, tiny_dir, data_dir, tmp_path):
    out = tmp_path / "data"
    out.mkdir()
    (out / "model.safetensors").write_text("x")  # checkpoint-like name, but no config.json
    code, err = _prune(capsys, tiny_dir, data_dir, str(out), "--overwrite")
    assert code == 2 and "does not hold a checkpoint" in err, err
    assert _snapshot(out) == {"model.safetensors": b"x"}


def test_overwrite_replaces_its_own_checkpoint(capsys, tiny_dir, data_dir, tmp_path):
    out = tmp_path / "out"
    assert _prune(capsys, tiny_dir, data_dir, str(out))[0] == 0
    first = (out / "dietprune.json").read_text()
    assert _prune(capsys, tiny_dir, data_dir, str(out), "--overwrite", "--sparsity", "0.3")[0] == 0
    assert (out / "dietprune.json").read_text() != first
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_the_input_model_folder_is_never_the_output(capsys, tiny_dir, data_dir, tmp_path):
    before = _snapshot(tiny_dir)
    for target in (str(tiny_dir), str(tiny_dir.parent), str(tiny_dir / "inside")):
        code, err = _prune(capsys, tiny_dir, data_dir, target, "--overwrite")
        assert code == 2 and "input model" in err, (target, err)
    assert _snapshot(tiny_dir) == before


def test_rule_refuses_home_and_root(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for target in ("~", "/"):
        with pytest.raises(DietpruneError, match="refusing to replace|current directory"):
            check_output_dir(target, overwrite=True)
    with pytest.raises(DietpruneError, match="empty"):
        check_output_dir("   ", overwrite=True)


def test_output_file_checks(tmp_path):
    with pytest.raises(DietpruneError, match="empty"):
        check_output_file("", "scores")
    with pytest.raises(DietpruneError, match="is a folder"):
        check_output_file(tmp_path, "scores")
    with pytest.raises(DietpruneError, match="does not exist"):
        check_output_file(tmp_path / "no" / "s.safetensors", "scores")
    assert check_output_file(tmp_path / "s.safetensors") == tmp_path / "s.safetensors"
