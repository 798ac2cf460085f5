"""Paired comparison statistics on synthetic records whose answers are worked out by hand."""

import json
import math
import subprocess
import sys

import pytest

from dietprune.errors import DietpruneError
from dietprune.evaluate.compare import build_paired, format_paired
from dietprune.evaluate.paired import (PairedCounts, aggregate_skill, columns, compact_records, mcnemar_p,
                                       paired_tasks, skill_retained)
from dietprune.evaluate.results import save_results


def cols(correct, gold=None, pred=None, gold_ll=None, k=4):
    """Columns with gold 0 everywhere; a wrong prediction is choice 1 unless `pred` says otherwise."""
    n = len(correct)
    gold = gold or [0] * n
    pred = pred or [g if c else (g + 1) % k for c, g in zip(correct, gold)]
    return columns({"gold": gold, "pred": pred, "gold_loglik": gold_ll, "n_choices": [k] * n}, "acc")


REF = [1, 1, 0, 0, 1, 0, 1, 1, 0, 1]
NEW = [1, 0, 0, 1, 1, 0, 0, 1, 1, 1]


def test_difference_se_and_mcnemar_by_hand():
    st = paired_tasks({"arc_easy": cols(REF)}, {"arc_easy": cols(NEW)}, n_boot=500)["tasks"]["arc_easy"]
    # d = new - ref = [0,-1,0,1,0,0,-1,0,1,0]: mean 0, sum of squares 4, var 4/9
    assert st["n"] == 10 and st["ref_acc"] == 0.6 and st["acc"] == 0.6
    assert st["diff"] == 0 and st["se"] == pytest.approx(math.sqrt(4 / 9 / 10))
    assert st["mcnemar"]["b"] == 2 and st["mcnemar"]["c"] == 2 and st["mcnemar"]["p"] == 1.0
    # both wrong predict choice 1 (same), both right predict 0: they differ on the 4 discordant ones
    assert st["agreement"] == pytest.approx(0.6)
    assert st["skill"] == pytest.approx(1.0) and st["chance"] == 0.25
    assert st["dll"] is None


def test_mcnemar_exact_values():
    assert mcnemar_p(0, 0) == 1.0
    assert mcnemar_p(0, 5) == pytest.approx(2 / 32)
    assert mcnemar_p(9, 1) == pytest.approx(2 * (1 + 10) / 1024)
    assert mcnemar_p(3, 3) == 1.0
    # symmetric, and a large count stays finite (integer ratio, no overflow)
    assert mcnemar_p(400, 600) == mcnemar_p(600, 400) and 0 < mcnemar_p(400, 600) < 1e-9


def test_agreement_counts_identical_wrong_answers_only():
    ref = cols([0, 0, 1, 1], pred=[1, 2, 0, 0])
    new = cols([0, 0, 1, 0], pred=[1, 3, 0, 2])
    st = paired_tasks({"hellaswag": ref}, {"hellaswag": new}, n_boot=10)["tasks"]["hellaswag"]
    assert st["agreement"] == 0.5  # examples 0 and 2


def test_gold_loglik_change_and_skill():
    ref = cols([1, 1, 1, 0], gold_ll=[-1.0, -2.0, -3.0, -4.0])
    new = cols([1, 0, 1, 0], gold_ll=[-1.5, -2.5, -3.0, -5.0])
    st = paired_tasks({"arc_easy": ref}, {"arc_easy": new}, n_boot=10)["tasks"]["arc_easy"]
    assert st["dll"] == pytest.approx(-0.5)  # (-0.5 - 0.5 + 0 - 1) / 4
    assert st["dll_se"] == pytest.approx(math.sqrt(((0) ** 2 * 2 + 0.5 ** 2 + 0.5 ** 2) / 3 / 4))
    # ref 75%, new 50%, chance 25%: half the skill is left
    assert st["skill"] == pytest.approx(0.5)


def test_average_over_tasks_and_skill_retained():
    # boolq: ref 7/10, new 6/10 (chance 50); arc_easy: ref 9/20 -> new 7/20 (chance 25)
    ref = {"boolq": cols([1] * 7 + [0] * 3, k=2), "arc_easy": cols([1] * 9 + [0] * 11)}
    new = {"boolq": cols([1] * 6 + [0] * 4, k=2), "arc_easy": cols([1] * 7 + [0] * 13)}
    res = paired_tasks(ref, new, n_boot=2000, seed=3)
    avg = res["average"]
    assert avg["ref_acc"] == pytest.approx(0.575) and avg["acc"] == pytest.approx(0.475)
    assert avg["diff"] == pytest.approx(-0.1)
    assert avg["chance"] == pytest.approx(0.375) and avg["skill"] == pytest.approx(0.5)
    ses = [res["tasks"][t]["se"] for t in ("boolq", "arc_easy")]
    assert avg["se"] == pytest.approx(math.hypot(*ses) / 2)
    # pooled McNemar: only-ref counts 1 + 2, only-new 0
    assert avg["mcnemar"]["b"] == 3 and avg["mcnemar"]["c"] == 0 and avg["mcnemar"]["p"] == pytest.approx(2 / 8)
    assert avg["n"] == 30 and avg["tasks"] == 2
    lo, hi = avg["ci"]
    assert lo <= -0.1 <= hi and hi <= 0.0 + 1e-12  # new never beats ref on any example
    assert avg["skill_ci"][0] <= 0.5 <= avg["skill_ci"][1]
    # the same seed gives the same interval, another seed another
    assert paired_tasks(ref, new, n_boot=2000, seed=3)["average"]["ci"] == avg["ci"]
    assert paired_tasks(ref, new, n_boot=2000, seed=4)["average"]["ci"] != avg["ci"]
    # aggregates alone give the same skill retained
    agg = aggregate_skill({"boolq": 0.6, "arc_easy": 0.35}, {"boolq": 0.7, "arc_easy": 0.45})
    assert agg["average"] == pytest.approx(0.5) and agg["tasks"]["boolq"] == pytest.approx(0.5)


def test_bootstrap_interval_matches_normal_width_and_identity_is_zero():
    g = [(i * 7919) % 13 for i in range(400)]  # a deterministic pattern of concordant/discordant pairs
    ref = [int(x < 7) for x in g]
    new = [int(x < 5 or x == 11) for x in g]
    st = paired_tasks({"rte": cols(ref, k=2)}, {"rte": cols(new, k=2)}, n_boot=4000)["tasks"]["rte"]
    width = st["ci"][1] - st["ci"][0]
    assert width == pytest.approx(2 * 1.96 * st["se"], rel=0.12)
    assert st["ci"][0] < st["diff"] < st["ci"][1]
    same = paired_tasks({"rte": cols(ref, k=2)}, {"rte": cols(ref, k=2)}, n_boot=100)["tasks"]["rte"]
    assert same["ci"] == [0.0, 0.0] and same["se"] == 0 and same["agreement"] == 1.0 and same["mcnemar"]["p"] == 1.0


def test_counts_merge_across_shards():
    a, b = cols(REF, gold_ll=[-float(i) for i in range(10)]), cols(NEW, gold_ll=[-2.0 * i for i in range(10)])
    half = lambda c, s: {k: (v[s] if isinstance(v, list) else v) for k, v in c.items()}  # noqa: E731
    whole = PairedCounts.of(a, b)
    parts = PairedCounts.of(half(a, slice(0, 4)), half(b, slice(0, 4))) + PairedCounts.of(
        half(a, slice(4, 10)), half(b, slice(4, 10)))
    assert parts == whole


def test_metric_choice_records_and_mismatch():
    recs = [{"gold": 0, "pred": 1, "pred_norm": 0, "loglik": [-2.0, -1.0], "chars": [5, 1]},
            {"gold": 1, "pred": 1, "pred_norm": 0, "loglik": [-3.0, -1.0], "chars": [9, 1]}]
    assert columns(recs, "acc_norm")["correct"] == [True, False]
    assert columns(recs, "acc")["correct"] == [False, True]
    c = compact_records(recs)
    assert c["gold_loglik"] == [-2.0, -1.0] and c["n_choices"] == [2, 2]
    assert columns(c, "acc_norm") == columns(recs, "acc_norm")
    other = [dict(r, gold=1 - r["gold"]) for r in recs]
    with pytest.raises(DietpruneError, match="different examples"):
        paired_tasks({"boolq": columns(recs)}, {"boolq": columns(other)})
    # different --limit: the common first rows are compared, and flagged
    st = paired_tasks({"boolq": columns(recs)}, {"boolq": columns(recs[:1])}, n_boot=5)["tasks"]["boolq"]
    assert st["n"] == 1 and st["truncated"]
    assert skill_retained(0.6, 0.5, 0.5) is None  # a reference at chance has no skill to retain


def _file(path, samples, model, metric_values=None):
    tasks = {}
    for t, recs in samples.items():
        acc = sum(r["pred"] == r["gold"] for r in recs) / len(recs)
        tasks[t] = {"acc": acc, "acc_stderr": 0.1, "n": len(recs)}
    save_results({"tasks": tasks, "meta": {"model": model, "limit": None}, "samples": samples}, path)
    return path


def _recs(correct, k=2):
    return [{"gold": 0, "pred": 0 if c else 1, "pred_norm": 0 if c else 1, "loglik": [-1.0 if c else -2.0] + [-1.5] * (k - 1),
             "chars": [1] * k} for c in correct]


def test_compare_cli_paired_table_and_json(tmp_path):
    a = _file(tmp_path / "dense.json", {"boolq": _recs(REF), "rte": _recs([1] * 8 + [0] * 2)}, "d")
    b = _file(tmp_path / "pruned.json", {"boolq": _recs(NEW), "rte": _recs([1] * 4 + [0] * 6)}, "p")
    run = lambda *x: subprocess.run([sys.executable, "-m", "dietprune", "compare", *x],  # noqa: E731
                                    capture_output=True, text=True, timeout=120)
    r = run(str(a), str(b))
    assert r.returncode == 0, r.stderr
    assert "paired: pruned" in r.stdout and "McNemar" in r.stdout and "average" in r.stdout
    rte_line = next(line for line in r.stdout.splitlines() if line.startswith("rte "))
    assert "-40.0" in rte_line and "4/0" in rte_line and "0.125" in rte_line  # p = 2/16
    r = run(str(a), str(b), "--json")
    data = json.loads(r.stdout)
    st = data["paired"]["comparisons"][0]["paired"]["tasks"]["rte"]
    assert st["diff"] == pytest.approx(-0.4) and st["mcnemar"] == {"b": 4, "c": 0, "p": 0.125}
    # without records: says so, and still gives skill retained from the aggregates
    save_results({"tasks": {"boolq": {"acc": 0.55, "n": 10}, "rte": {"acc": 0.6, "n": 10}}, "meta": {}},
                 tmp_path / "old.json")
    res = build_paired([a, tmp_path / "old.json"])
    assert res["comparisons"][0]["paired"] is None
    text = format_paired(res)
    assert "need per-example records" in text and "stores them by default" in text
    assert res["comparisons"][0]["skill"]["average"] == pytest.approx((0.575 - 0.5) / (0.7 - 0.5))


def test_study_cells_pair_and_are_labelled(tmp_path):
    """bench/structured.py cells (compact records, no meta) are results files: paired and named by their key."""
    def cell(label, sp, correct):
        gold = [i % 2 for i in range(len(correct))]
        pred = [g if c else 1 - g for g, c in zip(gold, correct)]
        p = tmp_path / f"{label}.json"
        p.write_text(json.dumps({
            "model": "m", "label": label, "sparsity": sp, "seed": 0, "variant": "",
            "settings": {"tasks": "boolq", "limit": len(gold)},
            "tasks": {"boolq": {"acc": sum(correct) / len(correct), "n": len(gold), "metric": "acc", "score": 0}},
            "records": {"boolq": {"gold": gold, "pred": pred, "gold_loglik": [-1.0] * len(gold),
                                  "n_choices": [2] * len(gold)}}}))
        return p
    res = build_paired([cell("dense", 0.0, [1] * 8 + [0] * 2), cell("diet", 0.2, [1] * 5 + [0] * 5)])
    assert res["reference"] == "m dense seed 0"
    c = res["comparisons"][0]
    assert c["label"] == "m diet 20% seed 0"
    assert c["paired"]["tasks"]["boolq"]["diff"] == pytest.approx(-0.3)
    assert c["paired"]["tasks"]["boolq"]["mcnemar"]["b"] == 3
