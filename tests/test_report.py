"""`dietprune report`: the HTML page from a pruned tiny model and two results files, in headless Chromium."""

import re
import shutil
import subprocess
import sys

import pytest

from dietprune.errors import DietpruneError
from dietprune.evaluate import evaluate
from dietprune.evaluate.report import build_report, write_report
from dietprune.evaluate.results import save_results
from test_evaluate import _word_tokenizer
from tiny import tiny_model

TASKS = "boolq,arc_easy"


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, data_dir):
    from dietprune.models import load
    from dietprune.pipeline import prune

    root = tmp_path_factory.mktemp("report")
    src = root / "tiny"
    tiny_model("llama").save_pretrained(src)
    _word_tokenizer().save_pretrained(src)
    out = root / "pruned"
    prune(str(src), tasks=TASKS, samples=4, sparsity=0.25, output=out, data_dir=data_dir)
    files = []
    for name, spec in (("dense", src), ("pruned", out)):
        lm = load(str(spec))
        res = evaluate(lm.model, lm.tokenizer, TASKS, limit=12, data_dir=data_dir, progress=False, log_samples=True)
        files.append(save_results(res, root / f"{name}.json"))
    return root, out, files


def test_page_is_self_contained_and_complete(inputs):
    root, out, (dense, pruned) = inputs
    page = build_report([out, dense, pruned])
    assert "What was cut" in page and "Paired against" in page and "McNemar" in page
    assert "64 → 48" in page or re.search(r"\d+ → \d+", page)  # hidden size before -> after
    assert page.count('<img class="figure"') == 4  # importance, votes, accuracy, paired differences
    assert not re.search(r"""(src|href)=["']?(https?:)?//""", page), "nothing may be fetched at view time"
    assert "<script" not in page
    assert "dietprune prune" in page and "dietprune eval" in page  # commands
    # results only (no folder): no cut section; a file without records says what is missing
    save_results({"tasks": {"boolq": {"acc": 0.5, "n": 12}}, "meta": {}}, root / "old.json")
    page2 = build_report([dense, root / "old.json"])
    assert "What was cut" not in page2 and "need per-example records" in page2


def test_report_errors(inputs, tmp_path):
    root, out, (dense, pruned) = inputs
    with pytest.raises(DietpruneError, match="not found"):
        build_report([tmp_path / "nope.json"])
    with pytest.raises(DietpruneError, match="at most one pruned folder"):
        build_report([out, out])
    with pytest.raises(DietpruneError, match="no dietprune.json"):
        build_report([tmp_path])
    with pytest.raises(DietpruneError, match="overwrite one of its inputs"):
        write_report([out, dense], dense)
    r = subprocess.run([sys.executable, "-m", "dietprune", "report", str(out), "--output", str(tmp_path / "no" / "r.html")],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "does not exist" in r.stderr


def test_report_renders_in_headless_chromium(inputs, tmp_path):
    root, out, (dense, pruned) = inputs
    from browser import chromium, inspect

    if chromium() is None:
        pytest.skip("no chromium: `apt-get install -y chromium` (Debian) to run the browser check")
    pytest.importorskip("aiohttp", reason="the DevTools client uses aiohttp")
    r = subprocess.run([sys.executable, "-m", "dietprune", "report", str(out), str(dense), str(pruned),
                        "--output", str(tmp_path / "report.html")], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    got = inspect(tmp_path / "report.html", screenshot=True)
    assert got["errors"] == [], got["errors"]
    assert got["title"].startswith("dietprune report")
    assert len(got["figures"]) == 4
    for f in got["figures"]:
        assert f["complete"] and f["width"] > 50 and f["height"] > 50, f
        assert f["natural"][0] > 0 and f["natural"][1] > 0, f
    assert got["screenshot"][:8] == b"\x89PNG\r\n\x1a\n"
    # the check itself can fail: a broken image is caught
    broken = tmp_path / "broken.html"
    broken.write_text('<html><body><img alt=x src="data:image/png;base64,AAAA"></body></html>')
    bad = inspect(broken)
    assert bad["figures"][0]["natural"] == [0, 0]
    if shutil.which("true"):  # a network fetch is blocked and reported
        net = tmp_path / "net.html"
        net.write_text('<html><body><img alt=y src="https://example.com/x.png"></body></html>')
        assert inspect(net)["errors"]
