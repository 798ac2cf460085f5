"""dietprune's scorer as an lm-evaluation-harness model, against the harness's own `hf` model.

Tiny random models, the harness's own task YAMLs on the local data (dietprune/evaluate/harness.py).
Harness tasks from the hub cannot run in this offline sandbox; `--include_path` YAMLs stand in.
"""

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("lm_eval")

from dietprune.errors import DietpruneError  # noqa: E402
from dietprune.evaluate import evaluate  # noqa: E402
from dietprune.evaluate.harness import run_harness, write_task_yamls  # noqa: E402
from dietprune.evaluate.lm_eval_backend import DietpruneLM  # noqa: E402
from test_evaluate import _word_tokenizer  # noqa: E402
from tiny import tiny_model  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
TASKS = ["boolq", "hellaswag", "winogrande", "arc_easy"]
LIMIT = 6


@pytest.fixture(scope="module")
def tiny():
    return tiny_model("llama"), _word_tokenizer()


def _hf(model, tok, max_length=None):
    """The harness's model with dietprune's window (min(2048, model context): 128 here) and BOS setting."""
    from lm_eval.models.huggingface import HFLM

    max_length = max_length or min(2048, model.config.max_position_embeddings)

    return HFLM(pretrained=model, tokenizer=tok, batch_size=4, max_length=max_length, add_bos_token=False)


def test_same_predictions_as_hf_model(tiny, data_dir, tmp_path):
    model, tok = tiny
    ours = run_harness(DietpruneLM(model=model, tokenizer=tok, batch_size=4), TASKS, data_dir, LIMIT, tmp_path / "a")
    theirs = run_harness(_hf(model, tok), TASKS, data_dir, LIMIT, tmp_path / "b")
    for task in TASKS:
        a, b = ours[task], theirs[task]
        assert len(a["loglik"]) == len(b["loglik"]) == LIMIT
        for i, (x, y) in enumerate(zip(a["loglik"], b["loglik"])):
            assert x == pytest.approx(y, abs=1e-4), f"{task} #{i}"
        assert a["acc"] == b["acc"], task
        assert a["acc_norm"] == b["acc_norm"], task
        assert a["greedy"] == b["greedy"], task


def test_rolling_loglikelihood_windows_as_hf(tiny, data_dir, tmp_path):
    model, tok = tiny
    ours = run_harness(DietpruneLM(model=model, tokenizer=tok, max_length=64), ["wikitext2"], data_dir, 1,
                       tmp_path / "a")["wikitext2"]
    theirs = run_harness(_hf(model, tok, max_length=64), ["wikitext2"], data_dir, 1, tmp_path / "b")["wikitext2"]
    assert ours["loglik"][0][0] == pytest.approx(theirs["loglik"][0][0], rel=1e-5)
    assert ours["metrics"]["word_perplexity"] == pytest.approx(theirs["metrics"]["word_perplexity"], rel=1e-5)


def test_generate_until_as_hf(tiny):
    from lm_eval.api.instance import Instance

    model, tok = tiny
    reqs = [Instance("generate_until", {}, (ctx, {"until": [stop], "max_gen_toks": 12, "do_sample": False}), 0)
            for ctx, stop in (("the a is of", "w7"), ("Question : is it", "."), ("Dennis and Hunter", "\n"))]
    ours = DietpruneLM(model=model, tokenizer=tok).generate_until(reqs)
    theirs = _hf(model, tok).generate_until(reqs)
    assert ours == theirs and any(ours)
    with pytest.raises(DietpruneError, match="greedily"):
        DietpruneLM(model=model, tokenizer=tok).generate_until(
            [Instance("generate_until", {}, ("the", {"do_sample": True, "temperature": 1.0}), 0)])


def test_eval_runs_harness_task_names(tiny, data_dir, tmp_path):
    """`evaluate` routes names it does not know to the harness, with dietprune's scorer."""
    model, tok = tiny
    names = write_task_yamls(["arc_easy"], data_dir, tmp_path / "yaml")
    res = evaluate(model, tok, ["boolq", names["arc_easy"]], limit=LIMIT, data_dir=data_dir, progress=False,
                   log_samples=True, include_path=tmp_path / "yaml")
    ours = evaluate(model, tok, ["arc_easy"], limit=LIMIT, data_dir=data_dir, progress=False, log_samples=True)
    h = res["tasks"][names["arc_easy"]]
    assert h["acc"] == pytest.approx(ours["tasks"]["arc_easy"]["acc"])
    assert h["acc_norm"] == pytest.approx(ours["tasks"]["arc_easy"]["acc_norm"])
    recs, mine = res["samples"][names["arc_easy"]], ours["samples"]["arc_easy"]
    assert [r["pred"] for r in recs] == [r["pred"] for r in mine]
    assert [r["pred_norm"] for r in recs] == [r["pred_norm"] for r in mine]
    assert res["tasks"]["boolq"]["n"] == LIMIT and res["meta"]["task_versions"][names["arc_easy"]].startswith("lm-eval")
    with pytest.raises(DietpruneError, match="unknown task"):
        evaluate(model, tok, ["no_such_task_anywhere"], data_dir=data_dir)


def test_harness_cli_entry_point(tiny, data_dir, tmp_path):
    """`python -m dietprune.harness --model dietprune` is lm-eval's CLI with our model registered."""
    model, tok = tiny
    src = tmp_path / "tiny"
    model.save_pretrained(src)
    tok.save_pretrained(src)
    names = write_task_yamls(["arc_easy"], data_dir, tmp_path / "yaml")
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               PYTHONPATH=os.pathsep.join([str(tmp_path.parents[0]), os.environ.get("PYTHONPATH", "")]))
    cmd = [sys.executable, "-m", "dietprune.harness", "--model", "dietprune", "--model_args",
           f"pretrained={src},add_bos_token=False", "--tasks", names["arc_easy"], "--include_path",
           str(tmp_path / "yaml"), "--limit", str(LIMIT), "--batch_size", "4", "--log_samples",
           "--output_path", str(tmp_path / "h")]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    files = list((tmp_path / "h").rglob(f"samples_{names['arc_easy']}_*.jsonl"))
    assert files
    rows = sorted((json.loads(line) for line in files[0].open()), key=lambda s: s["doc_id"])
    theirs = run_harness(_hf(model, tok), ["arc_easy"], data_dir, LIMIT, tmp_path / "b")["arc_easy"]
    assert [s["acc"] for s in rows] == theirs["acc"] and [s["acc_norm"] for s in rows] == theirs["acc_norm"]
    for s, lls in zip(rows, theirs["loglik"]):
        assert [float(x[0]) for x in s["filtered_resps"]] == pytest.approx(lls, abs=1e-4)
