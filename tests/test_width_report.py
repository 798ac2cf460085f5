"""bench/width_report.py: which copy of a cell it reads, and the goal line (no model runs)."""

import importlib.util
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("width_report", ROOT / "bench" / "width_report.py")
wr = importlib.util.module_from_spec(spec)
spec.loader.exec_module(wr)

TASKS = ("boolq", "rte", "hellaswag", "winogrande", "arc_easy", "arc_challenge", "openbookqa")


def cell(label, sp, scores, records=None, ppl_eval=None, config=None):
    c = {"model": "m", "label": label, "sparsity": sp, "seed": 0, "variant": "", "settings": {"limit": 4},
         "tasks": {t: {"score": s, "metric": "acc"} for t, s in zip(TASKS, scores)},
         "avg": sum(scores) / len(scores), "ppl": 10.0, "ppl_eval": ppl_eval, "summary": {"param_reduction": sp}}
    if records is not None:
        c["records"] = records
    if config is not None:
        c["config"] = config
    return c


def write(d: Path, c):
    d.mkdir(parents=True, exist_ok=True)
    (d / f"{c['label']}-{c['sparsity']}.json").write_text(json.dumps(c))


def test_records_copy_wins_and_keeps_the_rerun_perplexity(tmp_path):
    write(tmp_path / "pairs", cell("dense", 0.0, [0.6] * 7, ppl_eval=19.0))
    write(tmp_path / "study", cell("dense", 0.0, [0.6] * 7, records={"boolq": {}}))
    # a pruned cell with another prune config must not lend its perplexity
    write(tmp_path / "pairs", cell("diet", 0.2, [0.55] * 7, ppl_eval=90.0, config={"ridge": 0.1}))
    write(tmp_path / "study", cell("diet", 0.2, [0.55] * 7, records={"boolq": {}}, config={"ridge": 0.01}))
    cells = wr.load([tmp_path / "pairs", tmp_path / "study"], None)
    dense = cells[("m", "dense", 0.0, 0)]
    assert dense["records"] and dense["ppl_eval"] == 19.0
    diet = cells[("m", "diet", 0.2, 0)]
    assert diet["records"] and diet["ppl_eval"] is None


def test_goal_line_reports_skill_and_perplexity_ratio():
    dense = {"avg": 0.5, "ppl": 20.0, "ppl_eval": 20.0, "records": False}
    row = {"avg": 0.45, "skill": 0.7, "ppl": 50.0, "ppl_eval": 50.0, "vs_diet": {"diff": 0.03, "se": 0.01},
           "width": None, "seconds": {"total": 60.0}}
    diet = {"skill": 0.5}
    lines = "\n".join(wr.summary_lines({"dense": dense, "cells": {"0.20|0": {"diet-width": row, "diet": diet}}}))
    assert "skill retained 70% (goal ≥ 85%; diet 50%)" in lines
    assert "perplexity 2.50× dense" in lines
    assert "beyond 2 SE in 1 of 1 seed(s) (+3.0 ± 1.0)" in lines
