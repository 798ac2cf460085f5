"""Property: whatever options and files the CLI gets, it either succeeds with a valid, loadable
output, or fails with exit 2, one line on stderr and nothing written; the inputs never change.

Hypothesis draws a command (prune, profile, compare), a model (a tiny random Llama folder or one
of many damaged copies), task files (good or malformed), an output path (fresh, empty, a
file, a user's folder, the input model, a missing parent...) and random values of every flag,
valid and invalid. Each case runs ``dietprune.cli.main`` in-process. The run is derandomized,
so CI sees the same cases every time; `DIETPRUNE_PROPERTY_EXAMPLES` changes how many (default 300).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import os
import shutil
from pathlib import Path

import pytest
import torch

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from dietprune.cli import main  # noqa: E402
from tiny import save_tiny  # noqa: E402

EXAMPLES = int(os.environ.get("DIETPRUNE_PROPERTY_EXAMPLES", "300"))


def tree(folder: Path) -> dict:
    """Every path under `folder` -> the sha256 of its bytes (None for a folder)."""
    out = {}
    for p in sorted(folder.rglob("*")):
        rel = p.relative_to(folder).as_posix()
        out[rel] = hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() and not p.is_symlink() else None
    return out


# ---- the inputs, built once --------------------------------------------------------------------
def _weights(folder: Path, fn) -> None:
    from safetensors.torch import load_file, save_file

    save_file(fn(load_file(str(folder / "model.safetensors"))), str(folder / "model.safetensors"),
              metadata={"format": "pt"})


def _config(folder: Path, fn) -> None:
    cfg = json.loads((folder / "config.json").read_text())
    fn(cfg)
    (folder / "config.json").write_text(json.dumps(cfg))


def _pickle(folder: Path) -> None:
    import pickle

    class Evil:
        def __reduce__(self):
            return (os.system, ("touch PWNED",))

    (folder / "model.safetensors").unlink()
    (folder / "pytorch_model.bin").write_bytes(pickle.dumps(Evil()))


def _index_to_nowhere(folder: Path) -> None:
    from safetensors import safe_open

    with safe_open(str(folder / "model.safetensors"), "pt") as fh:
        names = list(fh.keys())
    (folder / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {n: "model-00001-of-00002.safetensors" for n in names}}))
    (folder / "model.safetensors").unlink()


DAMAGES = {
    "truncated": lambda f: (f / "model.safetensors").write_bytes((f / "model.safetensors").read_bytes()[:5000]),
    "header-garbage": lambda f: (f / "model.safetensors").write_bytes(b"\xff" * 64),
    "no-config": lambda f: (f / "config.json").unlink(),
    "config-not-json": lambda f: (f / "config.json").write_text("{oops"),
    "config-a-list": lambda f: (f / "config.json").write_text("[1, 2]"),
    "no-model-type": lambda f: _config(f, lambda c: (c.pop("model_type"), c.pop("architectures", None))),
    "foreign-model-type": lambda f: _config(f, lambda c: c.update(model_type="bert", architectures=["BertModel"])),
    "hidden-size-text": lambda f: _config(f, lambda c: c.update(hidden_size="sixty-four")),
    "hidden-size-wrong": lambda f: _config(f, lambda c: c.update(hidden_size=32, head_dim=8)),
    "missing-layer": lambda f: _weights(f, lambda t: {k: v for k, v in t.items() if ".layers.1." not in k}),
    "missing-norm": lambda f: _weights(f, lambda t: {k: v for k, v in t.items() if k != "model.norm.weight"}),
    "extra-tensor": lambda f: _weights(f, lambda t: {**t, "model.layers.0.stray": torch.ones(2)}),
    "no-tokenizer": lambda f: [p.unlink() for p in f.glob("tokenizer*")],
    "tokenizer-garbage": lambda f: (f / "tokenizer.json").write_text("not a tokenizer"),
    "pickle": _pickle,
    "index-to-nowhere": _index_to_nowhere,
}

TEXT_ROWS = [{"text": f"the cat is on the mat {i} and it was yes or no"} for i in range(6)]


@pytest.fixture(scope="module")
def world(tmp_path_factory, data_dir):
    root = tmp_path_factory.mktemp("property")
    inputs, work, scratch = root / "inputs", root / "work", root / "scratch"
    for d in (inputs, work, scratch):
        d.mkdir()
    good = save_tiny(inputs / "tiny", "llama")
    models = {"good": str(good)}
    for name, damage in DAMAGES.items():
        folder = inputs / f"tiny-{name}"
        shutil.copytree(good, folder)
        damage(folder)
        models[name] = str(folder)
    (inputs / "fake.gguf").write_bytes(b"GGUF" + bytes(64))
    (inputs / "notes.txt").write_text("not a model")
    models.update({"fake-gguf": str(inputs / "fake.gguf"), "a-text-file": str(inputs / "notes.txt"),
                   "nowhere": str(inputs / "missing-folder"), "empty-spec": "", "no-slash": "never-there"})

    files = {
        "good": [json.dumps(r) for r in TEXT_ROWS],
        "prompt": [json.dumps({"prompt": "Question: yes or no? Answer:", "completion": " yes"})] * 3,
        "empty": [""],
        "not-json": ["{text: oops"],
        "a-list": ["[1, 2, 3]"],
        "wrong-fields": [json.dumps({"question": "q", "answer": "a"})],
        "blank-text": [json.dumps({"text": "   "})],
        "text-not-string": [json.dumps({"text": 5})],
    }
    tasks = {}
    for name, lines in files.items():
        path = inputs / f"{name}.jsonl"
        path.write_text("\n".join(lines) + "\n")
        tasks[name] = f"t={path}"
    (inputs / "binary.jsonl").write_bytes(b"\xff\xfe\x00\x01\x80 binary")
    (inputs / "bad.csv").write_text('foo,bar\n1,2\n')
    (inputs / "table.tsv").write_text("text\nhello\n")
    tasks.update({"binary": f"t={inputs / 'binary.jsonl'}", "bad-csv": f"t={inputs / 'bad.csv'}",
                  "wrong-suffix": f"t={inputs / 'table.tsv'}", "missing-file": f"t={inputs / 'nope.jsonl'}",
                  "unknown-name": "quux", "none": "", "twice": f"t={inputs / 'good.jsonl'},t={inputs / 'good.jsonl'}",
                  "no-name": f"={inputs / 'good.jsonl'}", "benchmark": "arc_easy"})
    bad_data = inputs / "bad-data" / "arc_easy"
    bad_data.mkdir(parents=True)
    (bad_data / "calib.jsonl").write_text('{"question": 1\n')

    # scores for the good model and its good task; and damaged copies
    scores = inputs / "scores.safetensors"
    with contextlib.redirect_stdout(io.StringIO()):
        assert main(["profile", str(good), "--tasks", tasks["good"], "--samples", "3", "--gram",
                     "--output", str(scores)]) == 0
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(scores), "pt") as fh:
        meta, tensors = fh.metadata(), {k: fh.get_tensor(k) for k in fh.keys()}
    key = next(k for k in tensors if k.endswith("/abs_sum"))
    save_file({**tensors, key: tensors[key][:, :8].contiguous()}, str(inputs / "short.safetensors"), metadata=meta)
    save_file({**tensors, "norms/gram": tensors["norms/gram"][..., :4, :4].contiguous()},
              str(inputs / "bad-gram.safetensors"), metadata=meta)
    save_file({**tensors, key: torch.full_like(tensors[key], float("nan"))}, str(inputs / "nan.safetensors"),
              metadata=meta)
    save_file(tensors, str(inputs / "no-meta.safetensors"), metadata={"format": "dietprune-profile"})
    (inputs / "garbage.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not a header}")
    score_files = {"good": str(scores), "short": str(inputs / "short.safetensors"),
                   "bad-gram": str(inputs / "bad-gram.safetensors"), "nan": str(inputs / "nan.safetensors"),
                   "no-meta": str(inputs / "no-meta.safetensors"), "garbage": str(inputs / "garbage.safetensors"),
                   "missing": str(inputs / "absent.safetensors"), "a-model": str(good / "config.json")}

    results = {"good": {"tasks": {"arc_easy": {"acc": 0.5, "acc_norm": 0.6}}, "meta": {"model": "m"}},
               "text-metric": {"tasks": {"arc_easy": {"acc": "high"}}},
               "bool-metric": {"tasks": {"arc_easy": {"acc": True}}},
               "no-tasks": {"meta": {}}, "tasks-list": {"tasks": [1]}, "meta-list": {"tasks": {}, "meta": [1]},
               "task-number": {"tasks": {"arc_easy": 3}}}
    result_files = {}
    for name, data in results.items():
        (inputs / f"r-{name}.json").write_text(json.dumps(data))
        result_files[name] = str(inputs / f"r-{name}.json")
    (inputs / "r-binary.json").write_bytes(b"\xff\xfe")
    result_files.update({"binary": str(inputs / "r-binary.json"), "missing": str(inputs / "r-none.json")})

    checkpoint = work / ".template-checkpoint"  # a real output, copied where a case overwrites one
    with contextlib.redirect_stdout(io.StringIO()):
        assert main(["prune", str(good), "--tasks", tasks["good"], "--samples", "2", "--output",
                     str(checkpoint)]) == 0
    shutil.move(str(checkpoint), str(root / "template-checkpoint"))
    return {"root": root, "inputs": inputs, "work": work, "scratch": scratch, "models": models, "tasks": tasks,
            "scores": score_files, "results": result_files, "template": root / "template-checkpoint",
            "data_dir": data_dir, "bad_data": str(inputs / "bad-data"), "counter": [0],
            "inputs_sum": tree(inputs), "stats": {}}


# ---- drawing a command ------------------------------------------------------------------------
NUMBER_TEXT = st.sampled_from(["abc", "", "1e3", "0x10", "nan", "-inf", "1,5", " 3 "])


def numeric(usual, odd, ints=True):
    """(usual values, anything): the second mixes random numbers, odd ones and text."""
    sane = st.sampled_from([str(v) for v in usual])
    if ints:
        wild = st.integers(-3, 2**65).map(str)
    else:
        wild = st.floats(allow_nan=True, allow_infinity=True).map(repr)
    return sane, st.one_of(sane, wild, st.sampled_from([str(v) for v in odd]), NUMBER_TEXT)


def names(usual, odd):
    return st.sampled_from(usual), st.sampled_from(usual + odd)


PRUNE_FLAGS = {
    "--sparsity": numeric([0, 0.1, 0.25, 0.5, 0.9], [0.999, 1, -0.1, 1e-300], ints=False),
    "--samples": numeric([1, 2, 3], [0, -1, 10**9]),
    "--seed": numeric([0, 1, 7], [2**63, 2**64, -1]),
    "--align": numeric([1, 2, 4, 8, 16], [48, 63, 64, 65, 1000, 0]),
    "--ridge": numeric([1e-2, 1, 1e-4], [1e-300, 1e300, 0, -1], ints=False),
    "--batch-size": numeric([1, 2, 8], [0, 10**6]),
    "--max-length": numeric([2, 16, 64], [1, 0, 100000]),
    "--method": names(["diet", "random", "magnitude", "diet-mean", "diet-rank"], ["wanda-sp", "shortgpt", "nope", ""]),
    "--merge": names(["vote", "mean", "rank"], ["median"]),
    "--tap": names(["residual", "norm-out", "write"], ["everywhere"]),
    "--repair": names(["none", "rms", "ls", "rms+ls", "rms+ls+energy"], ["refit", "rms+refit", "magic"]),
    "--dtype": names(["float32", "bfloat16", "float16"], ["int8"]),
    "--max-shard-size": names(["2GB", "20KB", "100"], ["1", "0", "-5MB", "abc", "infGB", "1e999MB"]),
    "--offload": names(["auto", "memory", "disk"], ["tape"]),
}
SWITCHES = ["--low-memory", "--no-low-memory", "--skip-bos", "--overwrite", "--json", "--gram"]
OUTPUTS = ["fresh", "fresh", "fresh", "empty-string", "blank", "existing-empty", "users-folder", "a-file",
           "missing-parent", "checkpoint", "the-model", "inside-the-model", "cwd", "parent"]


def _output(world, kind: str, case: str, profile: bool) -> str:
    work = world["work"]
    if kind == "fresh":
        return str(work / (f"{case}.safetensors" if profile else case))
    if kind == "empty-string":
        return ""
    if kind == "blank":
        return "  "
    if kind == "existing-empty":
        (work / case).mkdir()
        return str(work / case)
    if kind == "users-folder":
        (work / case).mkdir()
        (work / case / "notes.txt").write_text("mine")
        (work / case / "config.json").write_text("{}")
        return str(work / case)
    if kind == "a-file":
        (work / case).write_text("a file")
        return str(work / case)
    if kind == "missing-parent":
        return str(work / "no-such-folder" / case)
    if kind == "checkpoint":
        shutil.copytree(world["template"], work / case)
        return str(work / case)
    if kind == "the-model":
        return world["models"]["good"]
    if kind == "inside-the-model":
        return str(Path(world["models"]["good"]) / "sub")
    if kind == "cwd":
        return "."
    return ".."


@st.composite
def commands(draw, world):
    world["counter"][0] += 1
    case = f"case{world['counter'][0]}"
    command = draw(st.sampled_from(["prune"] * 6 + ["profile"] * 2 + ["compare"]))
    if command == "compare":
        files = draw(st.lists(st.sampled_from(sorted(world["results"])), min_size=1, max_size=3))
        argv = ["compare", *[world["results"][f] for f in files]]
        if draw(st.booleans()):
            argv += ["--plot", _output(world, draw(st.sampled_from(["fresh", "a-file", "missing-parent", "cwd"])),
                                       case + draw(st.sampled_from(["", ".png", ".svg", ".v2"])), profile=False)]
        if draw(st.booleans()):
            argv += ["--metric", draw(st.sampled_from(["acc", "acc_norm", "f1"]))]
        return {"argv": argv, "command": command, "output": None}
    sane = draw(st.integers(0, 9)) < 6  # most cases are valid apart from one or two values
    model = "good" if sane else draw(st.sampled_from(sorted(world["models"])))
    task = draw(st.sampled_from(["good", "good", "prompt"])) if sane else draw(st.sampled_from(sorted(world["tasks"])))
    argv = [command, world["models"][model], "--tasks", world["tasks"][task]]
    if task == "benchmark":
        argv += ["--data-dir", draw(st.sampled_from([world["data_dir"], world["bad_data"],
                                                      str(world["inputs"] / "no-data")]))]
    out_kind = draw(st.sampled_from(["fresh", "fresh", "checkpoint"] if sane else OUTPUTS))
    output = _output(world, out_kind, case, profile=command == "profile")
    argv += ["--output", output]
    flags = sorted(PRUNE_FLAGS) if command == "prune" else ["--samples", "--seed", "--batch-size", "--max-length",
                                                            "--tap", "--offload"]
    chosen = draw(st.lists(st.sampled_from(flags), unique=True, max_size=5))
    if "--samples" not in chosen:
        argv += ["--samples", "2"]  # keep the successful cases fast
    odd = set() if not sane else set(draw(st.lists(st.sampled_from(chosen), unique=True, max_size=1))
                                      if chosen else [])
    for flag in chosen:
        usual, anything = PRUNE_FLAGS[flag]
        argv += [flag, draw(anything if (not sane or flag in odd) else usual)]
    switches = draw(st.lists(st.sampled_from(SWITCHES if command == "prune" else SWITCHES[:3] + ["--gram"]),
                             unique=True, max_size=3))
    if out_kind == "checkpoint" and sane and "--overwrite" not in switches and command == "prune":
        switches.append("--overwrite")
    argv += switches
    if command == "prune" and draw(st.integers(0, 4)) == 0 and task == "good":
        argv += ["--scores", world["scores"][draw(st.sampled_from(["good"] if sane else sorted(world["scores"])))]]
    return {"argv": argv, "command": command, "output": output, "out_kind": out_kind}


# ---- checking one case -------------------------------------------------------------------------
def _valid_output(cmd, stdout: str) -> None:
    out = Path(cmd["output"]).expanduser()
    if cmd["command"] == "profile":
        from dietprune.stats import Profile

        prof = Profile.load(out)
        assert prof.tasks and all(torch.isfinite(s).all() for s in prof.scores().values())
        return
    from dietprune.models import load

    meta = json.loads((out / "dietprune.json").read_text())
    lm = load(str(out))  # strict: every tensor present, nothing unexpected
    assert lm.model.config.hidden_size == meta["summary"]["hidden_size_after"]
    assert all(torch.isfinite(p).all() for p in lm.model.parameters())


class _Logged(logging.Handler):
    """What the libraries' loggers would print on stderr (their handlers hold the real stderr)."""

    def __init__(self):
        super().__init__(logging.WARNING)
        self.lines: list[str] = []

    def emit(self, record):
        self.lines.append(f"[{record.name}] {record.getMessage()}")


LIBRARY_LOGGERS = ("", "transformers", "datasets", "huggingface_hub", "accelerate", "dietprune")


def _run(cmd):
    stdout, stderr = io.StringIO(), io.StringIO()
    logged = _Logged()
    loggers = [logging.getLogger(name) for name in LIBRARY_LOGGERS]
    for lg in loggers:
        lg.addHandler(logged)
    try:
        with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
            try:
                code = main(cmd["argv"])
            except SystemExit as exc:  # argparse refusing a flag
                code = exc.code
    finally:
        for lg in loggers:
            lg.removeHandler(logged)
    err = stderr.getvalue() + "".join(line + "\n" for line in logged.lines)
    return code, stdout.getvalue(), err


def test_any_input_gives_a_valid_output_or_one_line_and_nothing_written(world, monkeypatch):
    monkeypatch.chdir(world["work"])
    monkeypatch.setenv("DIETPRUNE_SCRATCH_DIR", str(world["scratch"]))
    monkeypatch.delenv("DIETPRUNE_DATA_DIR", raising=False)
    stats = world["stats"]
    import time

    start = time.perf_counter()

    @settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None, print_blob=True,
              suppress_health_check=list(HealthCheck))
    @given(st.data())
    def check(data):
        before = tree(world["work"])
        cmd = data.draw(commands(world))
        made = set(tree(world["work"])) - set(before)  # what the case itself set up (an existing folder, ...)
        before = tree(world["work"])
        code, stdout, stderr = _run(cmd)
        after = tree(world["work"])
        lines = [line for line in stderr.splitlines() if line.strip()]
        assert tree(world["inputs"]) == world["inputs_sum"], f"an input changed: {cmd['argv']}"
        assert list(world["scratch"].iterdir()) == [], f"scratch debris: {cmd['argv']}"
        assert not (world["work"] / "PWNED").exists()
        stats[code] = stats.get(code, 0) + 1
        if code == 0:
            if cmd.get("output") is not None:
                _valid_output(cmd, stdout)
            changed = {k for k in set(after) | set(before) if after.get(k, "gone") != before.get(k, "gone")}
            if cmd["command"] != "compare":
                out = Path(cmd["output"]).expanduser().absolute()
                rel = out.relative_to(world["work"]).as_posix()
                assert all(k == rel or k.startswith(rel + "/") for k in changed), (cmd["argv"], changed)
            else:
                assert all(k.startswith("case") for k in changed), (cmd["argv"], changed)
        else:
            assert code == 2, (cmd["argv"], code, stderr[-2000:])
            assert len(lines) == 1, (cmd["argv"], stderr[-2000:])
            assert lines[0].startswith("dietprune") and "Traceback" not in stderr, (cmd["argv"], stderr)
            assert after == before, (cmd["argv"], "wrote on failure", set(after) ^ set(before))
        # clear the case away, so the next snapshot stays small
        for name in {k.split("/")[0] for k in set(after) | made}:
            target = world["work"] / name
            if target.is_dir() and not target.is_symlink():
                shutil.rmtree(target)
            elif target.exists() or target.is_symlink():
                target.unlink()

    check()
    print(f"{EXAMPLES} cases in {time.perf_counter() - start:.1f}s: exit codes {stats}")
    # as many cases as asked, and both outcomes, or the property says little
    assert sum(stats.values()) >= EXAMPLES, stats
    assert stats.get(0, 0) >= EXAMPLES // 10 and stats.get(2, 0) >= EXAMPLES // 3, stats


# ---- and each malformed input on its own: always refused ---------------------------------------
GOOD_TASKS = ("good", "prompt", "benchmark")


def test_every_malformed_input_alone_is_one_line(world, monkeypatch):
    """The property allows exit 0; here each damaged input alone, with everything else valid, must
    give exit 2, one line (so a damage that is silently accepted cannot hide in the property)."""
    monkeypatch.chdir(world["work"])
    monkeypatch.setenv("DIETPRUNE_SCRATCH_DIR", str(world["scratch"]))
    good_model, good_task = world["models"]["good"], world["tasks"]["good"]
    cases = [["prune", model, "--tasks", good_task, "--samples", "2"] for name, model in world["models"].items()
             if name != "good"]
    cases += [["prune", good_model, "--tasks", task, "--samples", "2"] for name, task in world["tasks"].items()
              if name not in GOOD_TASKS]
    cases += [["prune", good_model, "--tasks", "arc_easy", "--data-dir", d, "--samples", "2"]
              for d in (world["bad_data"], str(world["inputs"] / "no-data"))]
    cases += [["prune", good_model, "--tasks", good_task, "--scores", f] for name, f in world["scores"].items()
              if name != "good"]
    cases += [["compare", world["results"]["good"], f] for name, f in world["results"].items() if name != "good"]
    messages = {}
    for i, argv in enumerate(cases):
        if argv[0] == "prune":
            argv = argv + ["--output", str(world["work"] / f"alone{i}")]
        code, _, stderr = _run({"argv": argv})
        lines = [line for line in stderr.splitlines() if line.strip()]
        assert code == 2 and len(lines) == 1 and lines[0].startswith("dietprune"), (argv, code, stderr[-2000:])
        assert sorted(p.name for p in world["work"].iterdir()) == [], (argv, list(world["work"].iterdir()))
        messages[" ".join(argv[:4])] = lines[0]
    assert tree(world["inputs"]) == world["inputs_sum"]
    print("\n".join(f"{k}\n    {v}" for k, v in messages.items()))
