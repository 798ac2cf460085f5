"""bench/structured.py without a model: cell keys, plan, resumability, derived numbers, rendering."""

import json
import math
from pathlib import Path

import pytest
from benchload import load_bench


@pytest.fixture(scope="module")
def sb():
    return load_bench("structured")


TASKS = ["boolq", "arc_easy"]


def fake_cell(sb, model, label, sp, seed=0, variant="", avg=0.5, kept=None, reduction=None, d=12):
    tasks = {t: {"acc": avg, "acc_stderr": 0.05, "n": 10, "metric": "acc", "score": avg, "score_stderr": 0.05}
             for t in TASKS}
    cell = {"model": model, "label": label, "sparsity": sp, "seed": seed, "variant": variant,
            "settings": {"tasks": ",".join(TASKS), "limit": 10, "samples": 8, "ppl_tokens": 1024},
            "summary": {"hidden_size_before": d, "hidden_size_after": len(kept) if kept else d,
                        "params_before": 100, "params_after": 80,
                        "param_reduction": sp if reduction is None else reduction},
            "tasks": tasks, "avg": avg, "ppl": 20.0 + 10 * sp,
            "seconds": {"prune": 1.0, "eval": 2.0, "ppl": 1.0, "total": 4.0}}
    if kept is not None:
        cell["kept"] = kept
    return cell


def config(sb, tmp_path, **kw):
    args = sb.parse_args(["--quick", "--tasks", ",".join(TASKS), "--methods", "diet,random,magnitude,shortgpt",
                          "--out", str(tmp_path / "s.json"), "--doc", str(tmp_path / "r.md"),
                          "--plots-dir", str(tmp_path / "plots"), "--cells-dir", str(tmp_path / "cells"),
                          *[x for k, v in kw.items() for x in (f"--{k.replace('_', '-')}", str(v))]])
    cfg = sb.resolve_config(args)
    cfg["settings"] = sb.settings_of(cfg)
    cfg["commands"] = ["python bench/structured.py --quick"]
    return cfg


def test_keys_and_labels(sb, tmp_path):
    key = sb.cell_key("smollm2-135m", "diet", 0.2, 1, "samples=25")
    assert sb.parse_key(key) == {"model": "smollm2-135m", "label": "diet", "sparsity": 0.2, "seed": 1,
                                 "variant": "samples=25"}
    assert sb.parse_key(sb.cell_key("m", "dense", 0.0, 0))["variant"] == ""
    assert sb.prune_options("diet-norepair", "") == ("diet", {"repair": "none"})
    assert sb.prune_options("diet", "samples=25") == ("diet", {"samples": 25})
    assert sb.prune_options("diet", "tap=residual") == ("diet", {"tap": "residual"})
    assert sb.prune_options("flap", "") == ("flap", {})
    f = sb.cell_file(tmp_path, key)
    assert "|" not in f.name and "=" not in f.name


def test_jaccard(sb):
    assert sb.jaccard([1, 2, 3], [1, 2, 3]) == 1.0
    assert sb.jaccard([1, 2], [3, 4]) == 0.0
    assert sb.jaccard([1, 2, 3], [2, 3, 4]) == pytest.approx(0.5)
    # two random halves of d overlap by d/4 in expectation: J = (d/4) / (3d/4)
    assert sb.random_jaccard(50, 100) == pytest.approx(1 / 3)


def test_plan_order_and_strongest(sb, tmp_path):
    cfg = config(sb, tmp_path, sparsities="0.1,0.2", seeds="0,1,2")
    steps = sb.plan(cfg, {})
    phases = [p for p, _ in steps]
    assert phases == sorted(phases, key=["main", "seeds", "ablations", "sweep"].index)
    assert steps[0][1] == sb.cell_key("smollm2-135m", "dense", 0.0, 0)
    # strongest baselines unknown until every baseline has its seed-0 cell at 20%
    assert sum(1 for _, k in steps if k is None) == 2 * 3
    cells = {}
    for lab, avg in (("random", 0.4), ("magnitude", 0.45), ("shortgpt", 0.42)):
        cells[sb.cell_key("smollm2-135m", lab, 0.2, 0)] = fake_cell(sb, "smollm2-135m", lab, 0.2, avg=avg)
    assert sb.strongest_baselines(cells, "smollm2-135m", 0.2, cfg["methods"]) == ["magnitude", "shortgpt"]
    keys = [k for _, k in sb.plan(cfg, cells)]
    assert None not in keys and len(keys) == len(set(keys))
    assert sb.cell_key("smollm2-135m", "shortgpt", 0.2, 2) in keys
    assert sb.cell_key("smollm2-135m", "random", 0.2, 1) not in keys
    # the default sample count and the default tap are the main DIET cell, not extra cells
    assert sb.cell_key("smollm2-135m", "diet", 0.2, 0, "samples=8") not in keys
    assert sb.cell_key("smollm2-135m", "diet", 0.2, 0, "tap=residual") in keys


def test_eta_uses_each_models_median_of_pruned_cells(sb):
    def timed(model, label, seed, total):
        c = fake_cell(sb, model, label, 0.2 if label != "dense" else 0.0, seed=seed)
        c["seconds"]["total"] = total
        return c
    cells = {str(i): c for i, c in enumerate([
        timed("a", "dense", 0, 1000.0), timed("a", "diet", 0, 100.0), timed("a", "diet", 1, 120.0),
        timed("a", "diet", 2, 900.0),  # run while the cores were shared: the median ignores it
        timed("b", "diet", 0, 50.0)])}
    todo = [sb.cell_key("a", "random", 0.1, 0), sb.cell_key("b", "random", 0.1, 0), sb.cell_key("c", "flap", 0.1, 0)]
    # a: median(100, 120, 900) = 120; b: 50; c has no cells: median over all pruned cells = 110
    assert sb.eta_seconds(cells, todo) == pytest.approx(120 + 50 + 110)
    assert sb.eta_seconds(cells, todo[:1], unknown=2) == pytest.approx(120 + 2 * 110)
    assert sb.eta_seconds({}, todo) is None
    assert sb.eta_seconds({}, []) == 0.0


def test_resume_skips_only_matching_settings(sb, tmp_path):
    cfg = config(sb, tmp_path)
    cdir = tmp_path / "cells"
    good = fake_cell(sb, "smollm2-135m", "diet", 0.2, kept=list(range(9)))
    stale = dict(fake_cell(sb, "smollm2-135m", "random", 0.2, kept=list(range(9))), settings={"limit": 200})
    for c in (good, stale):
        sb.write_json_atomic(sb.cell_file(cdir, sb.cell_key(c["model"], c["label"], c["sparsity"], c["seed"])), c)
    cells, stale_keys, unreachable = sb.load_cells(cdir, cfg["settings"])
    assert list(cells) == [sb.cell_key("smollm2-135m", "diet", 0.2, 0)] and unreachable == {}
    assert stale_keys == [sb.cell_key("smollm2-135m", "random", 0.2, 0)]
    assert not list(cdir.glob(".*tmp*"))


def test_derive_render_plots(sb, tmp_path):
    cfg = config(sb, tmp_path, seeds="0,1,2", sparsities="0.1,0.2,0.3")
    m = "smollm2-135m"
    cdir = tmp_path / "cells"
    cells = [fake_cell(sb, m, "dense", 0.0, avg=0.6),
             fake_cell(sb, m, "random", 0.2, avg=0.40, kept=[0, 1, 2, 3, 4, 5, 6, 7, 8]),
             fake_cell(sb, m, "magnitude", 0.2, avg=0.45, kept=[1, 2, 3, 4, 5, 6, 7, 8, 9]),
             fake_cell(sb, m, "shortgpt", 0.2, avg=0.42, reduction=0.25),
             fake_cell(sb, m, "diet", 0.1, avg=0.50, kept=list(range(10))),
             fake_cell(sb, m, "random", 0.1, avg=0.52, kept=list(range(10))),
             fake_cell(sb, m, "magnitude", 0.3, avg=0.30, kept=list(range(8)))]
    diet_masks = {0: list(range(9)), 1: list(range(1, 10)), 2: list(range(9))}
    for s, avg in ((0, 0.55), (1, 0.53), (2, 0.57)):
        c = fake_cell(sb, m, "diet", 0.2, seed=s, avg=avg, kept=diet_masks[s])
        if s == 0:
            c["profile"] = {"tasks": TASKS, "scores": [[float(j + 1) for j in range(12)],
                                                       [float(12 - j) for j in range(12)]],
                            "votes": [1, 1, 1, 2, 2, 2, 2, 2, 2, 1, 1, 1]}
        cells.append(c)
    for s, avg in ((1, 0.44), (2, 0.46)):
        cells.append(fake_cell(sb, m, "magnitude", 0.2, seed=s, avg=avg, kept=list(range(9))))
    cells.append(fake_cell(sb, m, "shortgpt", 0.2, seed=1, avg=0.42, reduction=0.25))
    for c in cells:
        sb.write_json_atomic(sb.cell_file(cdir, sb.cell_key(c["model"], c["label"], c["sparsity"], c["seed"],
                                                            c["variant"])), c)
    state = sb.build_state(cfg, cdir, cfg["settings"])
    d = state["derived"][m]
    assert d["strongest_baselines"] == ["magnitude", "shortgpt"]
    gap = d["gap"]
    assert gap["best_baseline"] == "magnitude"
    assert gap["gap_seed0"] == pytest.approx(0.10)
    assert gap["gap_mean"] == pytest.approx(0.55 - 0.45)
    assert gap["seed_se"] == pytest.approx(math.sqrt(0.02 ** 2 / 3 + 0.01 ** 2 / 3))
    assert d["sweep_gaps"]["0.20"]["best_baseline"] == "magnitude"
    assert d["sweep_gaps"]["0.20"]["gap"] == pytest.approx(0.10)
    assert d["sweep_gaps"]["0.20"]["eval_se"] == pytest.approx(gap["eval_se"])
    assert d["sweep_gaps"]["0.20"]["complete"]  # the test config runs random, magnitude, shortgpt
    # at 10% only random has run: a provisional gap; at 30% there is no DIET cell: no gap
    assert d["sweep_gaps"]["0.10"]["gap"] == pytest.approx(-0.02) and not d["sweep_gaps"]["0.10"]["complete"]
    assert "0.30" not in d["sweep_gaps"]
    st = d["stability"]
    assert st["pairs"]["0-2"] == 1.0 and st["pairs"]["0-1"] == pytest.approx(8 / 10)
    assert sb.flagged(state["cells"][sb.cell_key(m, "shortgpt", 0.2, 0)], 0.01)
    assert not sb.flagged(state["cells"][sb.cell_key(m, "diet", 0.2, 0)], 0.01)
    # still missing: shortgpt seeds, ablation cells
    assert sb.cell_key(m, "shortgpt", 0.2, 2) in state["missing"]

    sb.finish(state, Path(cfg["out"]), Path(cfg["doc"]))
    doc = Path(cfg["doc"]).read_text()
    assert "+10.0 points at seed 0" in doc
    assert "| **DIET − best baseline** | -2.0 ± 5.0 vs random (provisional) |  | +10.0 ± 5.0 vs magnitude |  | – | – |" in doc
    assert "55.0 ± 2.0 (n=3)" in doc
    assert doc.count("shortgpt at 20%: 25.0%") == 1  # once, not once per seed
    assert "shortgpt removes whole decoder layers" in doc
    assert "Incomplete run" in doc and "`smollm2-135m|shortgpt|0.20|2|default`" in doc
    assert "python bench/structured.py --quick" in doc
    data = json.loads(Path(cfg["out"]).read_text())
    assert data["schema"] == sb.SCHEMA and len(data["cells"]) == len(cells)
    for name in ("acc_vs_sparsity", "importance", "votes"):
        assert (tmp_path / "plots" / f"{m}_{name}.png").stat().st_size > 1000
    # the markdown is a function of the JSON alone
    assert sb.render(data) == doc


def test_unreachable_targets_are_settled_not_missing(sb, tmp_path):
    from dietprune.errors import UnreachableSparsity

    cfg = config(sb, tmp_path, sparsities="0.2,0.3")
    m, cdir = "smollm2-135m", tmp_path / "cells"
    done = [fake_cell(sb, m, "dense", 0.0, avg=0.6)]
    done += [fake_cell(sb, m, lab, sp, avg=avg, kept=list(range(9)))
             for sp in (0.2, 0.3) for lab, avg in (("diet", 0.5), ("random", 0.4), ("magnitude", 0.45))]
    for c in done:
        sb.write_json_atomic(sb.cell_file(cdir, sb.cell_key(c["model"], c["label"], c["sparsity"], c["seed"])), c)
    before = sb.build_state(cfg, cdir, cfg["settings"])
    key = sb.cell_key(m, "shortgpt", 0.3, 0)
    assert key in before["missing"] and not before["derived"][m]["sweep_gaps"]["0.30"]["complete"]

    exc = UnreachableSparsity("shortgpt cannot reach 30.0% ...", method="shortgpt", sparsity=0.3,
                              reachable=(0.0, 0.264))
    sb.write_json_atomic(sb.cell_file(cdir, key), sb.unreachable_record(sb.parse_key(key), cfg["settings"], exc))
    state = sb.build_state(cfg, cdir, cfg["settings"])
    assert key not in state["missing"] and key not in state["cells"]
    assert state["infeasible"][key]["reachable"] == [0.0, 0.264]
    assert state["derived"][m]["sweep_gaps"]["0.30"]["complete"]
    # at the study sparsity an unreachable baseline does not hold back the choice of the strongest two
    assert sb.strongest_baselines(state["cells"], m, 0.2, cfg["methods"]) is None  # shortgpt 20% not run
    assert sb.strongest_baselines(state["cells"], m, 0.2, cfg["methods"],
                                  infeasible={sb.cell_key(m, "shortgpt", 0.2, 0)}) == ["magnitude", "random"]
    sb.finish(state, Path(cfg["out"]), Path(cfg["doc"]), make_plots=False)
    doc = Path(cfg["doc"]).read_text()
    assert "| shortgpt | – | – | n/a | n/a |" in doc
    assert "shortgpt at 30% (reachable 0.0%..26.4%)" in doc
    assert "1 planned cell(s) are targets their method cannot reach" in doc
    assert sb.render(json.loads(Path(cfg["out"]).read_text())) == doc


@pytest.mark.parametrize("label,variant", [("diet", ""), ("random", ""), ("diet-mean", "tap=residual")])
def test_shared_profile_equals_profiling_inside_prune(sb, label, variant, data_dir):
    """A cell pruned with the shared task profile is the cell `prune()` would make on its own."""
    import torch
    from tiny import tiny_model, tiny_tokenizer

    from dietprune.models import LoadedModel
    from dietprune.pipeline import prune

    lm = LoadedModel(tiny_model("llama"), tiny_tokenizer(), "tiny", "memory")
    settings = {"tasks": "boolq,arc_easy", "limit": 2, "samples": 4, "ppl_tokens": 64}
    spec = {"model": "tiny", "label": label, "sparsity": 0.25, "seed": 1, "variant": variant}
    method, opts = sb.prune_options(label, variant)
    opts["samples"] = settings["samples"]
    cache = {}
    prof = sb.task_profile(cache, lm, spec, method, opts, settings, data_dir)
    assert prof is not None and len(cache) == 1
    assert sb.task_profile(cache, lm, spec, method, opts, settings, data_dir) is prof
    shared = prune(lm, tasks=settings["tasks"], sparsity=0.25, method=method, seed=1, data_dir=data_dir,
                   scores=prof, **opts)
    alone = prune(lm, tasks=settings["tasks"], sparsity=0.25, method=method, seed=1, data_dir=data_dir, **opts)
    assert torch.equal(shared.kept, alone.kept)
    ids = torch.tensor([[1, 5, 17, 40, 9, 3]])
    with torch.no_grad():
        torch.testing.assert_close(shared.model(input_ids=ids).logits, alone.model(input_ids=ids).logits)
    # self-calibrated methods and the re-fit repair still calibrate inside prune()
    assert sb.task_profile(cache, lm, spec, "wanda-sp", opts, settings, data_dir) is None
    assert sb.task_profile(cache, lm, spec, "diet", {**opts, "repair": "rms+refit"}, settings, data_dir) is None


def test_render_paired_and_skill_columns(sb, tmp_path):
    """Cells with per-example records get paired rows against dense and diet; skill retained from aggregates."""
    cfg = config(sb, tmp_path)
    m = "smollm2-135m"
    cdir = tmp_path / "cells"
    right = {"dense": [1] * 8 + [0] * 2, "diet": [1] * 7 + [0] * 3, "random": [1] * 5 + [0] * 5}
    for lab, corr in right.items():
        sp = 0.0 if lab == "dense" else 0.2
        c = fake_cell(sb, m, lab, sp, avg=sum(corr) / 10, kept=None if lab == "dense" else list(range(9)))
        c["records"] = {t: {"gold": [0] * 10, "pred": [0 if x else 1 for x in corr],
                            "gold_loglik": [-1.0] * 10, "n_choices": [2 if t == "boolq" else 4] * 10} for t in TASKS}
        sb.write_json_atomic(sb.cell_file(cdir, sb.cell_key(m, lab, sp, 0)), c)
    sb.write_json_atomic(sb.cell_file(cdir, sb.cell_key(m, "magnitude", 0.2, 0)),
                         fake_cell(sb, m, "magnitude", 0.2, avg=0.6, kept=list(range(9))))
    doc = sb.render(sb.build_state(cfg, cdir, cfg["settings"]))
    # boolq chance 50, arc_easy 25: diet avg 70 vs dense 80, chance 37.5 -> (70 - 37.5) / (80 - 37.5)
    row = next(line for line in doc.splitlines() if line.startswith("| diet | 9 |"))
    assert f"| {100 * (0.7 - 0.375) / (0.8 - 0.375):.0f}% |" in row
    paired = next(line for line in doc.splitlines() if line.startswith("| random | -30.0 ±"))
    assert "| -20.0 ±" in paired  # random vs diet
    assert "No per-example records (aggregates only" in doc and "magnitude" in doc
    # the summary JSON leaves the records in the cell files and says which cells have them
    sb.finish(sb.build_state(cfg, cdir, cfg["settings"]), tmp_path / "s.json", tmp_path / "s.md", make_plots=False)
    cells = sb.json.loads((tmp_path / "s.json").read_text())["cells"]
    assert cells[sb.cell_key(m, "diet", 0.2, 0)]["has_records"] and "records" not in cells[sb.cell_key(m, "diet", 0.2, 0)]
    assert "has_records" not in cells[sb.cell_key(m, "magnitude", 0.2, 0)]
    assert "| random | -30.0 ±" in (tmp_path / "s.md").read_text()  # the doc still has the paired rows
