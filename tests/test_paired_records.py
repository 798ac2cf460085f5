"""bench/paired_records.py: records are added to a cached cell only when the rerun reproduces it."""

import importlib
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _cell(label, scores, kept, config):
    return {"model": "m", "label": label, "sparsity": 0.2, "seed": 0, "variant": "", "settings": {"limit": 4},
            "config": config, "kept": kept, "avg": sum(scores.values()) / len(scores),
            "tasks": {t: {"score": v, "metric": "acc"} for t, v in scores.items()}, "finished": "then"}


def test_reproduced_or_replaced(tmp_path, monkeypatch):
    sys.path.insert(0, str(ROOT / "bench"))
    pr = importlib.import_module("paired_records")
    sb = pr.sb
    cached = {"diet": _cell("diet", {"boolq": 0.5}, [0, 1], {"tasks": ["boolq"], "merge": "vote"}),
              "random": _cell("random", {"boolq": 0.5}, [0, 2], {"tasks": ["boolq"], "merge": "vote"}),
              "magnitude": _cell("magnitude", {"boolq": 0.5}, [1, 2], {"tasks": ["boolq"]})}
    for lab, c in cached.items():
        sb.write_json_atomic(sb.cell_file(tmp_path, sb.cell_key("m", lab, 0.2, 0)), c)
    records = {"boolq": {"gold": [0, 1], "pred": [0, 0]}}
    reruns = {  # diet: same numbers, the config as a tuple and without the unused merge; random: a score moved;
        # magnitude: same score from another mask
        "diet": _cell("diet", {"boolq": 0.5}, [0, 1], {"tasks": ("boolq",)}),
        "random": _cell("random", {"boolq": 0.55}, [0, 2], {"tasks": ("boolq",), "merge": "vote"}),
        "magnitude": _cell("magnitude", {"boolq": 0.5}, [1, 3], {"tasks": ("boolq",)})}
    calls = []

    def rerun(lm, spec, *a, test_ppl=True, tasks_eval=True):
        calls.append((spec["label"], test_ppl))
        return dict(reruns[spec["label"]], records=records, finished="now", ppl=19.0 if test_ppl else None,
                    ppl_eval=21.0)

    monkeypatch.setattr(sb, "run_cell", rerun)
    monkeypatch.setattr("dietprune.models.load", lambda name: object())
    assert pr.main(["--models", "m", "--labels", "diet,random,magnitude,dense", "--cells-dir", str(tmp_path)]) == 0
    got = {lab: json.loads(sb.cell_file(tmp_path, sb.cell_key("m", lab, 0.2, 0)).read_text()) for lab in cached}
    d = got["diet"]
    assert d["records_check"] == {"status": "reproduced", "rerun": "now", "config_diff": {"merge": ["vote", None]}}
    assert d["records"] == records and d["config"] == cached["diet"]["config"] and d["finished"] == "then"
    assert d["ppl_eval"] == 21.0 and "ppl" not in d  # the held-out perplexity is added; the cached cell had no ppl
    # the first rerun skips the test perplexity; a cell that is replaced is rerun whole, with it
    assert calls == [("diet", False), ("random", False), ("random", True), ("magnitude", False), ("magnitude", True)]
    r = got["random"]
    assert r["records_check"]["status"] == "replaced" and r["records_check"]["cached_scores"] == {"boolq": 0.5}
    assert r["tasks"]["boolq"]["score"] == 0.55 and r["records"] == records and r["ppl"] == 19.0
    m = got["magnitude"]
    assert m["records_check"]["status"] == "replaced" and m["records_check"]["same_mask"] is False
    # a second run leaves cells with records alone
    monkeypatch.setattr(sb, "run_cell", lambda *a: (_ for _ in ()).throw(AssertionError("rerun")))
    assert pr.main(["--models", "m", "--labels", "diet", "--cells-dir", str(tmp_path)]) == 0


def test_ppl_eval_backfill(tmp_path, monkeypatch):
    """--ppl-eval adds the held-out perplexity to cells with records, only where the rerun's mask matches."""
    sys.path.insert(0, str(ROOT / "bench"))
    pr = importlib.import_module("paired_records")
    sb = pr.sb
    records = {"boolq": {"gold": [0, 1], "pred": [0, 0]}}
    cells = {"diet": dict(_cell("diet", {"boolq": 0.5}, [0, 1], {}), records=records),
             "random": dict(_cell("random", {"boolq": 0.5}, [0, 2], {}), records=records),
             "magnitude": _cell("magnitude", {"boolq": 0.5}, [1, 2], {})}  # no records: left alone
    for lab, c in cells.items():
        sb.write_json_atomic(sb.cell_file(tmp_path, sb.cell_key("m", lab, 0.2, 0)), c)
    seen = []

    def rerun(lm, spec, *a, test_ppl=True, tasks_eval=True):
        seen.append((spec["label"], test_ppl, tasks_eval))
        return {"kept": [0, 1] if spec["label"] == "diet" else [0, 3], "ppl_eval": 30.5}

    monkeypatch.setattr(sb, "run_cell", rerun)
    monkeypatch.setattr("dietprune.models.load", lambda name: object())
    assert pr.main(["--models", "m", "--labels", "diet,random,magnitude", "--cells-dir", str(tmp_path),
                    "--ppl-eval"]) == 0
    got = {lab: json.loads(sb.cell_file(tmp_path, sb.cell_key("m", lab, 0.2, 0)).read_text()) for lab in cells}
    assert seen == [("diet", False, False), ("random", False, False)]
    assert got["diet"]["ppl_eval"] == 30.5 and got["diet"]["records"] == records
    assert "ppl_eval" not in got["random"]  # another mask: not the cached cell's model
    assert got["magnitude"] == cells["magnitude"]
