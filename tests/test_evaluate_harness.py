"""Agreement with the real lm-evaluation-harness, example by example (lm-eval==0.4.13).

The harness runs its own task definitions (``include``d from the installed package) on the same
local JSONL rows; see dietprune/evaluate/harness.py.
"""

import glob
import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("lm_eval")

from dietprune.errors import DietpruneError  # noqa: E402
from dietprune.evaluate import evaluate  # noqa: E402
from dietprune.evaluate.harness import harness_lm, run_harness, write_task_yamls  # noqa: E402

TASKS = ["boolq", "rte", "hellaswag", "winogrande", "arc_easy", "arc_challenge", "openbookqa"]
# 15 examples of each of the 7 tasks (about 300 choices) compared one by one. Looked for in examples 16-20 and
# not found there only: ARC label styles (ARC-Easy #14, inside, is the one numbered 1-4) and choice counts,
# HellaSwag brackets and doubled spaces.
LIMIT = 15
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


def _compare(ours_samples, theirs, task):
    assert len(ours_samples) == len(theirs["loglik"]), f"{task}: number of examples"
    for i, (rec, lls) in enumerate(zip(ours_samples, theirs["loglik"])):
        assert len(rec["loglik"]) == len(lls), f"{task} #{i}: number of choices"
        for a, b in zip(rec["loglik"], lls):
            assert a == pytest.approx(b, abs=1e-3), f"{task} #{i}: loglik {a} vs harness {b}"
        assert float(rec["pred"] == rec["gold"]) == theirs["acc"][i], f"{task} #{i}: acc"
        if theirs["acc_norm"][i] is not None:
            assert float(rec["pred_norm"] == rec["gold"]) == theirs["acc_norm"][i], f"{task} #{i}: acc_norm"


@pytest.mark.slow
def test_smollm2_agrees_with_lm_eval(data_dir, tmp_path):
    from dietprune.models import load

    lm = load("smollm2-135m")
    ours = evaluate(lm.model, lm.tokenizer, TASKS, limit=LIMIT, data_dir=data_dir, progress=False, log_samples=True)
    theirs = run_harness(harness_lm(lm.model, lm.tokenizer, batch_size=16), TASKS, data_dir, LIMIT, tmp_path)
    for task in TASKS:
        assert ours["tasks"][task]["n"] == LIMIT
        _compare(ours["samples"][task], theirs[task], task)
        assert ours["tasks"][task]["acc"] == pytest.approx(theirs[task]["metrics"]["acc"])
        if "acc_norm" in ours["tasks"][task]:
            assert ours["tasks"][task]["acc_norm"] == pytest.approx(theirs[task]["metrics"]["acc_norm"])


@pytest.mark.slow
def test_smollm2_wikitext_agrees_with_lm_eval(data_dir, tmp_path):
    """Rolling log-likelihood of whole articles: word/byte perplexity as the harness's `wikitext` task."""
    from dietprune.models import load

    lm = load("smollm2-135m")
    ours = evaluate(lm.model, lm.tokenizer, ["wikitext2"], limit=2, data_dir=data_dir, progress=False,
                    log_samples=True)
    theirs = run_harness(harness_lm(lm.model, lm.tokenizer, batch_size=4), ["wikitext2"], data_dir, 2,
                         tmp_path)["wikitext2"]
    lls = [r["loglik"] for r in ours["samples"]["wikitext2"]]
    assert len(lls) == len(theirs["loglik"]) == 2
    from dietprune.data import load_rows
    from dietprune.encoding import encode
    from dietprune.evaluate.metrics import wikitext_detokenize, wikitext_documents
    from dietprune.evaluate.requests import rolling_requests
    from dietprune.tasks import get_task

    # the two articles: 1,407 and 5,349 SmolLM2 tokens, so the second crosses two 2048-token window boundaries
    docs = wikitext_documents([r["text"] for r in load_rows(get_task("wikitext2"), "eval", data_dir)])[:2]
    window = ours["tasks"]["wikitext2"]["window"]
    assert [len(rolling_requests(encode(lm.tokenizer, wikitext_detokenize(d), False), 0, window)) for d in docs] \
        == [1, 3]
    for a, (b,) in zip(lls, theirs["loglik"]):  # sums over thousands of tokens: float32 noise ~1e-6 relative
        assert a == pytest.approx(b, rel=2e-5)
    for metric in ("word_perplexity", "byte_perplexity", "bits_per_byte"):
        assert ours["tasks"]["wikitext2"][metric] == pytest.approx(theirs["metrics"][metric], rel=1e-4)


def test_harness_yaml_errors(tmp_path):
    with pytest.raises(DietpruneError, match="no harness counterpart"):
        write_task_yamls(["mytask"], tmp_path, tmp_path / "w")
    with pytest.raises(DietpruneError, match="no local evaluation data"):
        write_task_yamls(["piqa"], tmp_path, tmp_path / "w")


@pytest.mark.slow
def test_pruned_folder_with_lm_eval_cli(data_dir, tmp_path):
    """A pruned checkpoint folder: `lm_eval --model hf` and `dietprune eval` give the same numbers."""
    from dietprune.pipeline import prune
    from test_evaluate import _word_tokenizer
    from tiny import tiny_model

    src = tmp_path / "tiny"
    tiny_model("llama").save_pretrained(src)
    _word_tokenizer().save_pretrained(src)
    out = tmp_path / "pruned"
    prune(str(src), tasks="boolq", samples=4, sparsity=0.25, output=out, data_dir=data_dir)
    tasks, limit = ["boolq", "arc_easy"], 6
    names = write_task_yamls(tasks, data_dir, tmp_path / "yaml")
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    cmd = [sys.executable, "-m", "lm_eval", "--model", "hf", "--model_args", f"pretrained={out},dtype=float32",
           "--tasks", ",".join(names.values()), "--include_path", str(tmp_path / "yaml"), "--limit", str(limit),
           "--batch_size", "4", "--device", "cpu", "--log_samples", "--output_path", str(tmp_path / "h")]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    # `dietprune eval` in this process (its own process adds only the start-up; the CLI's exit codes and
    # one-line errors are tested in test_cli.py and test_trust.py)
    from dietprune.cli import main

    assert main(["eval", str(out), "--tasks", ",".join(tasks), "--limit", str(limit), "--data-dir", data_dir,
                 "--output", str(tmp_path / "d.json"), "--log-samples"]) == 0
    ours = json.loads((tmp_path / "d.json").read_text())
    for task, hname in names.items():
        files = glob.glob(str(tmp_path / "h" / "**" / f"samples_{hname}_*.jsonl"), recursive=True)
        assert files, f"no harness samples for {hname}"
        rows = sorted((json.loads(line) for line in open(files[0])), key=lambda s: s["doc_id"])
        theirs = {"loglik": [[float(x[0]) for x in s["filtered_resps"]] for s in rows],
                  "acc": [s["acc"] for s in rows], "acc_norm": [s.get("acc_norm") for s in rows]}
        assert len(rows) == limit
        _compare(ours["samples"][task], theirs, task)
