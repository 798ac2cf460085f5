"""Structured pruning study: DIET against the baselines, with seed error bars and ablations.

    python bench/structured.py                    # the full study (hours on a small CPU box)
    python bench/structured.py --quick            # smoke run: smollm2-135m, 20%, 3 methods, tiny limits
    python bench/structured.py --render-only      # rebuild JSON, docs/results.md and plots from the cells
    python bench/structured.py --models google/gemma-2-2b --device cuda   # the paper's setting (hub + a GPU)

Every cell is one (model, method, sparsity, seed, variant): prune a fresh copy of the model
with ``dietprune.prune`` (calibration from the tasks' calib split, as the package does),
evaluate the seven tasks' eval split with a fixed ``--limit`` and measure WikiText-2 token
perplexity. Each finished cell is written atomically to its own JSON under ``--cells-dir``
and skipped on rerun (when its evaluation settings match), so an interrupted study resumes;
the cells are committed to the repository, so it resumes on another machine too. A cell records
the prune config it ran with: a change of package defaults does not invalidate old cells, so
delete the affected cells (or use another ``--cells-dir``) after changing a default.

Plan, in this order, so that a partial run holds the headline numbers first:

1. per model: the dense model, then every method at ``--study-sparsity`` (seed 0);
2. error bars: DIET and the two strongest baselines (best seed-0 average at the study
   sparsity) over ``--seeds`` (calibration seeds);
3. ablations of DIET at the study sparsity: samples per task, vote/mean/rank merge, tap point,
   repair (``diet-norepair``); the mask stability (Jaccard of kept dimensions between seeds)
   comes from step 2;
4. every method at the other sparsities.

Method labels are registry names plus ``diet-norepair`` (DIET with ``repair="none"``).
``sparsity`` is what ``prune`` takes: the parameter fraction for every method (the cells of
diet*, random, magnitude and agnostic ran when it meant hidden dimensions; on both presets both
units give the same widths, see docs/method.md §2). The parameter reduction actually achieved (``summary["param_reduction"]``) is
recorded for every cell and cells more than ``--flag-tolerance`` off the target are flagged.

Outputs: ``--out`` (results JSON), ``--doc`` (markdown generated from that JSON only),
plots in ``--plots-dir``.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import shlex
import statistics
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dietprune.errors import UnreachableSparsity  # noqa: E402
from dietprune.evaluate.paired import CHANCE, aggregate_skill, columns, paired_tasks  # noqa: E402
from dietprune.evaluate.results import headline  # noqa: E402
from dietprune.merge import jaccard  # noqa: E402
from dietprune.profile import DEFAULT_TAP, TAPS  # noqa: E402
from dietprune.tasks import DIET_TASKS  # noqa: E402

SCHEMA = "dietprune-structured-study/1"
BASELINES = ("random", "magnitude", "agnostic", "wanda-sp", "flap", "shortgpt")
DIET_VARIANTS = ("diet", "diet-norepair", "diet-mean", "diet-rank")
ALL_METHODS = ("diet", "diet-norepair", "random", "magnitude", "agnostic", "diet-mean", "diet-rank",
               "wanda-sp", "flap", "shortgpt", "diet-width")
LABELS = {"diet-norepair": ("diet", {"repair": "none"})}  # label -> (registry method, PruneConfig overrides)
# How the hidden dimension is chosen: these cells have `kept`; the others cut heads, channels or layers.
HIDDEN_DIM = {"diet", "diet-norepair", "diet-mean", "diet-rank", "random", "magnitude", "agnostic"}

FULL = dict(models="gemma3-270m,smollm2-135m", sparsities="0.1,0.2,0.3", methods=",".join(ALL_METHODS),
            tasks=",".join(DIET_TASKS), limit=200, samples=100, ppl_tokens=16384, seeds="0,1,2",
            ablation_samples="10,25,50,100,200", ablation_taps=",".join(TAPS), study_sparsity=0.2,
            parts="main,seeds,ablations,sweep",
            out="bench/results/structured.json", cells_dir="bench/results/structured/cells",
            plots_dir="bench/results/structured", doc="docs/results.md")
QUICK = dict(FULL, models="smollm2-135m", sparsities="0.2", methods="diet,random,magnitude", limit=10, samples=8,
             ppl_tokens=1024, seeds="0,1", ablation_samples="4,8", ablation_taps="residual,norm-out",
             out="bench/results/structured/quick/structured.json",
             cells_dir="bench/results/structured/quick/cells", plots_dir="bench/results/structured/quick",
             doc="bench/results/structured/quick/results.md")


# ---- cells ------------------------------------------------------------------------------

def cell_key(model: str, label: str, sparsity: float, seed: int, variant: str = "") -> str:
    return f"{model}|{label}|{sparsity:.2f}|{seed}|{variant or 'default'}"


def parse_key(key: str) -> dict:
    model, label, sp, seed, variant = key.split("|")
    return {"model": model, "label": label, "sparsity": float(sp), "seed": int(seed),
            "variant": "" if variant == "default" else variant}


def cell_file(cells_dir: Path, key: str) -> Path:
    safe = key.replace("|", "__").replace("=", "-").replace("/", "_")
    return cells_dir / f"{safe}.json"


def prune_options(label: str, variant: str) -> tuple[str, dict]:
    """(registry method, PruneConfig overrides) of a method label and a variant like 'samples=25'."""
    method, opts = LABELS.get(label, (label, {}))
    opts = dict(opts)
    if variant:
        name, value = variant.split("=", 1)
        opts[name] = int(value) if name == "samples" else value
    return method, opts


def write_json_atomic(path: Path, data) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=1, allow_nan=False) + "\n")
    os.replace(tmp, path)


def _finite(x):
    return None if x is None or (isinstance(x, float) and not math.isfinite(x)) else x


def task_summary(metrics: dict) -> dict:
    """Per-task numbers kept in a cell: acc, acc_norm, their stderrs, n, and the headline metric."""
    out = {}
    for name, m in metrics.items():
        key, value = headline(m)
        out[name] = {k: _finite(m.get(k)) for k in ("acc", "acc_stderr", "acc_norm", "acc_norm_stderr", "n")
                     if k in m}
        out[name]["metric"] = key
        out[name]["score"] = _finite(value)
        out[name]["score_stderr"] = _finite(m.get(f"{key}_stderr"))
    return out


# Methods whose only calibration is the task profile (mask and/or the rms/ls repairs): their profile
# depends on (model, samples, seed, tap) alone, so one profile serves every sparsity and merge.
PROFILE_SHARED = {"diet", "diet-mean", "diet-rank", "random", "magnitude", "diet-width"}
# ... and these also need the MLP-channel / head statistics in it.
WIDTH_PROFILE = {"diet-width"}


def heldout_perplexity(model, tokenizer, data_dir, max_tokens) -> float | None:
    """Token perplexity on wikitext2/eval.jsonl (2048-token windows, as `perplexity`), None without local data."""
    from dietprune.data import data_dir as resolve
    from dietprune.evaluate.runner import _token_perplexity

    root = resolve(data_dir)
    path = root / "wikitext2" / "eval.jsonl" if root else None
    if path is None or not path.is_file():
        return None
    rows = [json.loads(line)["text"] for line in path.read_text().splitlines() if line.strip()]
    return _token_perplexity(model, tokenizer, rows, max_tokens, 2048, 1, False)[0]


def task_profile(cache: dict | None, lm, spec: dict, method: str, opts: dict, settings: dict, data_dir):
    """The task profile `prune()` would compute for this cell, computed once per (model, samples, seed, tap).

    Returns None where the cell must profile inside `prune()` (self-calibrated methods, repairs that
    need more than the norm statistics).
    """
    from dietprune.pipeline import profile

    from dietprune.registry import DietConfig

    if cache is None or method not in PROFILE_SHARED or opts.get("repair", DietConfig.repair) not in (
            "none", "rms", "ls", "rms+ls"):
        return None
    widths = method in WIDTH_PROFILE
    key = (spec["model"], opts["samples"], spec["seed"], opts.get("tap", DEFAULT_TAP))
    if key in cache and widths and cache[key].widths is None:
        del cache[key]  # profiled without the width statistics: profile again with them
    if key not in cache:  # with Gram statistics, so one profile also serves the ls repair
        cache[key] = profile(lm, settings["tasks"], samples=opts["samples"], seed=spec["seed"],
                             tap=opts.get("tap", DEFAULT_TAP), data_dir=data_dir, gram=True,
                             **({"widths": True} if widths else {}))
    return cache[key]


def run_cell(lm, spec: dict, settings: dict, data_dir, profiles: dict | None = None,
             test_ppl: bool = True, tasks_eval: bool = True) -> dict:
    """Prune a fresh copy of `lm` (LoadedModel), evaluate it, return the cell's JSON.

    `profiles`: a cache of task profiles shared between cells (see `task_profile`); None profiles
    inside every `prune()` call. `test_ppl=False` skips the perplexity on test.jsonl (`ppl` is then
    None; bench/paired_records.py keeps the cached one when the rerun reproduces the cell);
    `tasks_eval=False` skips the task evaluation too (no "tasks", "records" or "avg": a perplexity-only
    rerun).
    """
    import torch

    from dietprune.evaluate import evaluate, perplexity
    from dietprune.evaluate.paired import compact_records
    from dietprune.merge import merge_k
    from dietprune.pipeline import prune

    tasks = settings["tasks"]
    cell = dict(spec, settings=settings)
    t0 = time.perf_counter()
    res = None
    if spec["label"] == "dense":
        model = lm.model
        n = sum(p.numel() for p in model.parameters())
        cell["summary"] = {"hidden_size_before": model.config.hidden_size,
                           "hidden_size_after": model.config.hidden_size,
                           "params_before": n, "params_after": n, "param_reduction": 0.0}
    else:
        method, opts = prune_options(spec["label"], spec["variant"])
        opts.setdefault("samples", settings["samples"])
        cached = profiles is not None and any(k[:3] == (spec["model"], opts["samples"], spec["seed"])
                                              and k[3] == opts.get("tap", DEFAULT_TAP) for k in profiles)
        scores = task_profile(profiles, lm, spec, method, opts, settings, data_dir)
        res = prune(lm, tasks=tasks, sparsity=spec["sparsity"], method=method, seed=spec["seed"],
                    data_dir=data_dir, scores=scores, **opts)
        cell["profile_source"] = "prune" if scores is None else ("shared (reused)" if cached else "shared (computed)")
        model = res.model
        cell["config"] = res.config.to_dict()
        cell["summary"] = {k: v for k, v in res.summary.items() if k != "seconds"}
        cell["prune_seconds"] = res.summary.get("seconds", {})
        if res.kept is not None:
            cell["kept"] = [int(i) for i in res.kept.tolist()]
        if method == "diet-width":  # the chosen split and every candidate's KL
            cell["width"] = {k: res.selection.get(k) for k in ("shape_before", "shape_after", "split", "candidates",
                                                               "chosen", "kl_probe", "search_seconds")}
        if res.profile is not None and method == "diet" and not spec["variant"] and spec["label"] == "diet":
            scores = res.profile.score_matrix()
            votes = merge_k(scores, len(res.kept), "vote").votes
            cell["profile"] = {"tasks": list(res.profile.tasks),
                               "scores": [[float(f"{v:.6g}") for v in row] for row in scores.tolist()],
                               "votes": [int(v) for v in votes.tolist()]}
    t1 = time.perf_counter()
    with torch.no_grad():
        ev = (evaluate(model, lm.tokenizer, tasks, limit=settings["limit"], data_dir=data_dir, progress=False,
                       log_samples=True) if tasks_eval else None)
        t2 = time.perf_counter()
        ppl = (perplexity(model, lm.tokenizer, data_dir, max_tokens=settings["ppl_tokens"] or None)
               if test_ppl else None)
        t3 = time.perf_counter()
        ppl_eval = heldout_perplexity(model, lm.tokenizer, data_dir, settings["ppl_tokens"] or None)
    t4 = time.perf_counter()
    if ev is not None:
        cell["tasks"] = task_summary(ev["tasks"])
        # per-example records (gold, predictions, gold log-likelihood): paired comparisons between cells
        cell["records"] = {t: compact_records(r) for t, r in ev["samples"].items() if r and "gold" in r[0]}
        cell["avg"] = statistics.fmean(t["score"] for t in cell["tasks"].values())
    cell["ppl"] = _finite(float(ppl)) if ppl is not None else None
    # WikiText-2 perplexity on eval.jsonl (the rows no method calibrates on; `ppl` reads test.jsonl,
    # whose first quarter is wikitext2/calib.jsonl)
    cell["ppl_eval"] = _finite(float(ppl_eval)) if ppl_eval is not None else None
    cell["seconds"] = {"prune": round(t1 - t0, 1), "eval": round(t2 - t1, 1), "ppl": round(t3 - t2, 1),
                       "ppl_eval": round(t4 - t3, 1), "total": round(t4 - t0, 1),
                       "eval_per_task": ev["meta"].get("seconds", {}) if ev is not None else {}}
    cell["finished"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    del model, res
    gc.collect()
    return cell


# ---- the plan -----------------------------------------------------------------------------

def strongest_baselines(cells: dict, model: str, sparsity: float, methods, n: int = 2,
                        infeasible=()) -> list[str] | None:
    """The n baselines with the best seed-0 average at `sparsity`; None until all that can reach
    it (those not in `infeasible`) have run."""
    got = {}
    for b in methods:
        if b not in BASELINES or cell_key(model, b, sparsity, 0) in infeasible:
            continue
        c = cells.get(cell_key(model, b, sparsity, 0))
        if c is None:
            return None
        got[b] = c["avg"]
    return sorted(got, key=lambda b: (-got[b], b))[:n]


def plan(cfg: dict, cells: dict, infeasible=()) -> list[tuple[str, int, str | None]]:
    """Ordered (phase, sort key, cell key or None for a not-yet-known cell) of the whole study."""
    models, sps, methods = cfg["models"], cfg["sparsities"], cfg["methods"]
    sp0, seeds, parts = cfg["study_sparsity"], cfg["seeds"], cfg["parts"]
    out: list = []
    seen: set = set()

    def add(phase, key):
        if key is None or key not in seen:
            out.append((phase, key))
            if key is not None:
                seen.add(key)

    for m in models:
        add("main", cell_key(m, "dense", 0.0, 0))
        if "main" in parts and sp0 in sps:
            for label in methods:
                add("main", cell_key(m, label, sp0, 0))
    if "seeds" in parts:
        for m in models:
            top = strongest_baselines(cells, m, sp0, methods, infeasible=infeasible)
            chosen = ["diet", "diet-width"] + (top if top is not None else [None, None])
            for label in chosen:
                for s in seeds:
                    add("seeds", None if label is None else cell_key(m, label, sp0, s))
    if "ablations" in parts:
        for m in models:
            for n in cfg["ablation_samples"]:
                add("ablations", cell_key(m, "diet", sp0, 0, "" if n == cfg["samples"] else f"samples={n}"))
            for label in ("diet-mean", "diet-rank", "diet-norepair"):
                add("ablations", cell_key(m, label, sp0, 0))
            for tap in cfg["ablation_taps"]:
                add("ablations", cell_key(m, "diet", sp0, 0, "" if tap == DEFAULT_TAP else f"tap={tap}"))
    if "sweep" in parts:
        for m in models:
            for sp in sps:
                if sp == sp0:
                    continue
                for label in methods:
                    add("sweep", cell_key(m, label, sp, 0))
    return [(p, k) for p, k in out]


def eta_seconds(cells: dict, todo: list[str], unknown: int = 0) -> float | None:
    """Time left for the cells in todo: each costs the median of its model's finished pruned cells.

    `unknown` counts planned cells whose key is not known yet (seed cells of baselines still to be
    ranked); they cost the median over all models.

    The median (not the mean) because a cell run while the cores were shared can take 3-5x longer;
    dense cells are left out because they evaluate the unpruned model. A model with no finished
    pruned cell takes the median over all models; with none at all there is no estimate.
    """
    def median(xs):
        return statistics.median(xs) if xs else None

    pruned = [c for c in cells.values() if c["label"] != "dense"]
    overall = median([c["seconds"]["total"] for c in pruned])
    per_model = {m: median([c["seconds"]["total"] for c in pruned if c["model"] == m])
                 for m in {c["model"] for c in pruned}}
    if unknown and overall is None:
        return None
    total = unknown * (overall or 0.0)
    for key in todo:
        per = per_model.get(parse_key(key)["model"]) or overall
        if per is None:
            return None
        total += per
    return total


def unreachable_record(spec: dict, settings: dict, exc: UnreachableSparsity) -> dict:
    """The cell file of a target the method cannot reach (`load_cells` reads it back as settled)."""
    return {**spec, "settings": settings, "infeasible": str(exc), "reachable": list(exc.reachable)}


def load_cells(cells_dir: Path, settings: dict) -> tuple[dict, list[str], dict]:
    """Finished cells whose evaluation settings match; the keys of those that do not; and the
    targets a method cannot reach on a model (key -> {"reason", "reachable"}), recorded by a run
    so that they count as settled, not missing."""
    cells, stale, infeasible = {}, [], {}
    if not cells_dir.is_dir():
        return cells, stale, infeasible
    for f in sorted(cells_dir.glob("*.json")):
        try:
            c = json.loads(f.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        key = cell_key(c["model"], c["label"], c["sparsity"], c["seed"], c["variant"])
        if c.get("settings") != settings:
            stale.append(key)
        elif c.get("infeasible"):
            infeasible[key] = {"reason": c["infeasible"], "reachable": c.get("reachable")}
        else:
            cells[key] = c
    return cells, stale, infeasible


def fmt_time(s: float) -> str:
    s = int(round(s))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


# ---- derived numbers (from cells only) ------------------------------------------------------

def random_jaccard(k: int, d: int) -> float:
    """Expected Jaccard of two independent uniformly random k-subsets of d (≈, via expected overlap)."""
    inter = k * k / d
    return inter / (2 * k - inter)


def seed_stats(cells: dict, model: str, label: str, sp: float, seeds) -> dict | None:
    vals = [cells[k] for s in seeds if (k := cell_key(model, label, sp, s)) in cells]
    if not vals:
        return None
    avgs = [c["avg"] for c in vals]
    ppls = [c["ppl"] for c in vals if c["ppl"] is not None]
    return {"n": len(avgs), "mean": statistics.fmean(avgs),
            "std": statistics.stdev(avgs) if len(avgs) > 1 else None,
            "ppl_mean": statistics.fmean(ppls) if ppls else None,
            "ppl_std": statistics.stdev(ppls) if len(ppls) > 1 else None}


def eval_se(cell: dict) -> float:
    """Sampling standard error of the task-average score (independent tasks)."""
    ses = [t["score_stderr"] or 0.0 for t in cell["tasks"].values()]
    return math.sqrt(sum(s * s for s in ses)) / len(ses)


def seed0_gap(cells: dict, model: str, sp: float, methods, infeasible=()) -> dict | None:
    """DIET minus the best baseline at one sparsity (seed 0), with the evaluation SE of the difference."""
    diet = cells.get(cell_key(model, "diet", sp, 0))
    base = {b: c for b in methods if b in BASELINES and (c := cells.get(cell_key(model, b, sp, 0)))}
    if diet is None or not base:
        return None
    best = max(base, key=lambda b: (base[b]["avg"], b))
    return {"best_baseline": best, "gap": diet["avg"] - base[best]["avg"],
            "eval_se": math.hypot(eval_se(diet), eval_se(base[best])),
            "complete": all(b in base or cell_key(model, b, sp, 0) in infeasible for b in methods if b in BASELINES)}


def derive(cfg: dict, cells: dict, infeasible=()) -> dict:
    sp0, seeds, methods = cfg["study_sparsity"], cfg["seeds"], cfg["methods"]
    out = {}
    for m in cfg["models"]:
        d: dict = {}
        top = strongest_baselines(cells, m, sp0, methods, infeasible=infeasible)
        d["strongest_baselines"] = top
        d["seed_stats"] = {lab: st for lab in ["diet"] + (top or [])
                           if (st := seed_stats(cells, m, lab, sp0, seeds)) is not None}
        g0 = seed0_gap(cells, m, sp0, methods, infeasible)
        if g0:
            gap = {"best_baseline": g0["best_baseline"], "complete": g0["complete"],
                   "gap_seed0": g0["gap"], "eval_se": g0["eval_se"]}
            # over seeds, the best baseline is the one with the highest seed mean (not the seed-0 winner)
            sd = d["seed_stats"].get("diet")
            seeded = {b: st for b, st in d["seed_stats"].items() if b != "diet" and st["n"] >= 2}
            if sd and seeded:
                best_s = max(seeded, key=lambda b: (seeded[b]["mean"], b))
                sb = seeded[best_s]
                gap["best_baseline_seeds"] = best_s
                gap["gap_mean"] = sd["mean"] - sb["mean"]
                gap["n_seeds"] = [sd["n"], sb["n"]]
                if sd["std"] is not None and sb["std"] is not None:
                    gap["seed_se"] = math.sqrt(sd["std"] ** 2 / sd["n"] + sb["std"] ** 2 / sb["n"])
            d["gap"] = gap
        d["sweep_gaps"] = {f"{sp:.2f}": g for sp in cfg["sparsities"]
                           if (g := seed0_gap(cells, m, sp, methods, infeasible)) is not None}
        masks = {s: cells[k]["kept"] for s in seeds if (k := cell_key(m, "diet", sp0, s)) in cells}
        pairs = [(a, b) for i, a in enumerate(sorted(masks)) for b in sorted(masks)[i + 1:]]
        if pairs:
            dd = cells[cell_key(m, "diet", sp0, sorted(masks)[0])]["summary"]["hidden_size_before"]
            k = len(next(iter(masks.values())))
            js = {f"{a}-{b}": jaccard(masks[a], masks[b]) for a, b in pairs}
            d["stability"] = {"pairs": js, "mean": statistics.fmean(js.values()), "k": k, "d": dd,
                              "random_expected": random_jaccard(k, dd)}
        sample_masks = {}
        for n in cfg["ablation_samples"]:
            k = cell_key(m, "diet", sp0, 0, "" if n == cfg["samples"] else f"samples={n}")
            if k in cells:
                sample_masks[n] = cells[k]["kept"]
        if sample_masks:
            ref = max(sample_masks)
            d["samples_overlap"] = {"reference": ref,
                                    "jaccard": {str(n): jaccard(v, sample_masks[ref]) for n, v in sample_masks.items()}}
        out[m] = d
    return out


def flagged(cell: dict, tol: float) -> bool:
    return cell["label"] != "dense" and abs(cell["summary"]["param_reduction"] - cell["sparsity"]) > tol


# ---- rendering -------------------------------------------------------------------------------

def command_line(cfg: dict, data_dir) -> str:
    words = [f"DIETPRUNE_DATA_DIR={shlex.quote(str(data_dir))}"] if data_dir else []
    words += ["python", "bench/structured.py"] + (["--quick"] if cfg["quick"] else [])
    for k, v in cfg["cli"].items():
        words += [f"--{k.replace('_', '-')}", shlex.quote(str(v))]
    return " ".join(words)


def headline_metric(task: str) -> str:
    """The metric `headline()` reports for a task, from the task registry (before any cell ran)."""
    from dietprune.tasks import get_task

    try:
        metrics = get_task(task).metrics
    except Exception:  # noqa: BLE001 - a custom task: learn it from the cells
        return "?"
    return "acc_norm" if "acc_norm" in metrics else "acc"


def _pct(x):
    return "–" if x is None else f"{100 * x:.1f}"


def _ppl(x):
    return "–" if x is None else (f"{x:.1f}" if x < 1e4 else f"{x:.2e}")


def _diet_defaults(cells: dict) -> str:
    """Repair, tap and merge of the `diet` cells as recorded in them (the package defaults when they ran)."""
    seen = sorted({(c["config"].get("repair"), c["config"].get("tap"), c["config"].get("merge"))
                   for c in cells.values() if c["label"] == "diet" and not c["variant"] and "config" in c})
    if not seen:
        return "no diet cell yet"
    return "; ".join(f"repair `{r}`, tap `{t}`, {m} merge" for r, t, m in seen)


def _skill_cell(cell: dict, dense: dict | None) -> str:
    if dense is None:
        return "–"
    agg = aggregate_skill({t: v["score"] for t, v in cell["tasks"].items()},
                          {t: v["score"] for t, v in dense["tasks"].items()})
    return "–" if agg["average"] is None else f"{100 * agg['average']:.0f}%"


def _cell_columns(cell: dict) -> dict:
    """task -> paired.columns of a cell's records, scored with the cell's headline metric."""
    return {t: columns(r, cell["tasks"][t]["metric"]) for t, r in (cell.get("records") or {}).items()
            if t in cell["tasks"]}


def paired_rows(cells: dict, model: str, sp: float, methods, ref_label: str) -> dict:
    """label -> paired_tasks(reference cell, cell) at one sparsity, for cells with records."""
    ref = cells.get(cell_key(model, ref_label, 0.0 if ref_label == "dense" else sp, 0))
    if ref is None or not ref.get("records"):
        return {}
    rc = _cell_columns(ref)
    out = {}
    for lab in methods:
        c = cells.get(cell_key(model, lab, sp, 0))
        if c is None or lab == ref_label or not c.get("records"):
            continue
        out[lab] = paired_tasks(rc, _cell_columns(c))
    return out


def _ci(st: dict) -> str:
    return f"{100 * st['diff']:+.1f} ± {100 * st['se']:.1f} [{100 * st['ci'][0]:+.1f}, {100 * st['ci'][1]:+.1f}]"


def _pval(p: float) -> str:
    return "<0.001" if p < 0.001 else f"{p:.3f}"


def paired_section(cells: dict, model: str, sp: float, methods, tasks) -> list[str]:
    """Markdown: each method's paired difference from dense and from diet on the same examples."""
    L = [f"#### Paired differences at {sp:.0%} (same examples, seed 0)", ""]
    vs_dense = paired_rows(cells, model, sp, methods, "dense")
    vs_diet = paired_rows(cells, model, sp, methods, "diet")
    have = [lab for lab in methods if (c := cells.get(cell_key(model, lab, sp, 0))) and c.get("records")]
    lacking = [lab for lab in ["dense"] + list(methods)
               if (c := cells.get(cell_key(model, lab, 0.0 if lab == "dense" else sp, 0))) and not c.get("records")]
    if not vs_dense and not vs_diet:
        L += ["Not available: " + ("no per-example records in the cells of " + ", ".join(lacking)
                                   + " (aggregate scores only); `python bench/paired_records.py` reruns them "
                                   "with records." if lacking else "no cells yet."), ""]
        return L
    L.append("| method | Δ avg vs dense ± SE [95% CI] | McNemar p | agree | Δ gold ll | skill ret. [95% CI] "
             "| Δ avg vs diet ± SE [95% CI] | McNemar p |")
    L.append("|---|---|---|---|---|---|---|---|")
    for lab in have:
        a = vs_dense.get(lab, {}).get("average")
        b = vs_diet.get(lab, {}).get("average")
        cells_a = ["–"] * 5 if not a else [
            _ci(a), _pval(a["mcnemar"]["p"]), f"{100 * a['agreement']:.0f}%",
            "–" if a["dll"] is None else f"{a['dll']:+.3f} ± {a['dll_se']:.3f}",
            "–" if a["skill"] is None else f"{100 * a['skill']:.0f}%" + (
                f" [{100 * a['skill_ci'][0]:.0f}, {100 * a['skill_ci'][1]:.0f}]" if a.get("skill_ci") else "")]
        cells_b = ["–", "–"] if not b else [_ci(b), _pval(b["mcnemar"]["p"])]
        L.append(f"| {lab} | " + " | ".join(cells_a + cells_b) + " |")
    L += ["", "Δ avg: mean over the tasks of (method − reference) accuracy on the same examples, in points, ± its SE "
          "(per-task paired SEs combined), [paired bootstrap 95% interval, 2000 replicates, seed 0, each task "
          "resampled]; McNemar: exact test on the discordant examples pooled over tasks; agree: mean fraction of "
          "examples with the reference's prediction; Δ gold ll: mean change of the gold answer's log-likelihood "
          "(nats, per example, mean over tasks)."]
    if lacking:
        L.append("No per-example records (aggregates only; `python bench/paired_records.py` adds them): "
                 + ", ".join(lacking) + ".")
    big = []
    for lab, pr in vs_dense.items():
        for t, st in pr["tasks"].items():
            if abs(st["diff"]) > 2 * (st["se"] or 0) and st["diff"] > 0:
                big.append(f"{lab} {t} {100 * st['diff']:+.1f} ± {100 * st['se']:.1f}")
    if big:
        L.append("Per-task gains over dense beyond 2 SE (label drift rather than skill where the skill "
                 "retained stays low): " + "; ".join(big) + ".")
    L.append("")
    return L


def render(state: dict) -> str:
    cfg, cells, der = state["setup"], state["cells"], state["derived"]
    unreachable = state.get("infeasible", {})
    sp0, tasks, tol = cfg["study_sparsity"], cfg["tasks"], cfg["flag_tolerance"]
    metric_of = {t: headline_metric(t) for t in tasks}
    for c in cells.values():
        for t, v in c["tasks"].items():
            metric_of[t] = v["metric"]
    L = ["# Structured pruning study: DIET vs. baselines", "",
         f"Generated by `bench/structured.py` from `{cfg['out']}` "
         f"({state['generated']}); do not edit by hand, rerun with `--render-only`.", "",
         "## Setup", "",
         f"- Models: {', '.join(cfg['models'])}. Sparsities: {', '.join(f'{s:.0%}' for s in cfg['sparsities'])}; "
         f"error bars and ablations at {sp0:.0%}.",
         f"- Calibration: each task's calib split, {cfg['samples']} samples per task (seed 0 unless stated), "
         "drawn by the package. Evaluation: the eval split of "
         f"{', '.join(tasks)}, first {cfg['limit']} examples per task, zero-shot, harness semantics.",
         "- Score per task: the harness headline metric (`dietprune.evaluate.results.headline`): "
         + ", ".join(f"{t} {metric_of.get(t, '?')}" for t in tasks)
         + ". **avg** is the unweighted mean over the tasks, in %.",
         "- Perplexity: WikiText-2 test token perplexity, 2048-token windows, "
         + ("the full test text." if not cfg["ppl_tokens"] else f"first {cfg['ppl_tokens']} tokens.")
         + " **ppl (eval)** at the study sparsity: the same on `wikitext2/eval.jsonl`, text no method calibrates "
         "on (measured where a cell was run or rerun since it was added; – where not).",
         "- Caveat: `agnostic` calibrates on `wikitext2/calib.jsonl`, and that file is the first 1009 rows of "
         "`wikitext2/test.jsonl`, the text `perplexity()` reads (the wikitext2 task's eval split): its perplexity "
         "is measured partly on its own calibration text; compare it on accuracy.",
         "- `sparsity` is what `prune()` takes: the fraction of parameters removed, for every method (cells of "
         "diet*, random, magnitude and agnostic ran when it meant hidden dimensions; on both presets both units "
         "give the same widths, docs/method.md §2). **params −** is the parameter "
         "reduction achieved (`summary[\"param_reduction\"]`), measured the same way for all; ⚑ marks cells "
         f"more than {tol:.0%} off the target.",
         f"- `diet` uses the package defaults ({_diet_defaults(cells)}); `diet-norepair` is the "
         "same mask with `repair=\"none\"`.",
         "- Commands:", ""]
    L += [f"      {c}" for c in cfg["commands"]] or ["      (none recorded)"]
    L.append("")
    for m in cfg["models"]:
        dense = cells.get(cell_key(m, "dense", 0.0, 0))
        dm = der.get(m, {})
        L += [f"## {m}", ""]
        top = dm.get("strongest_baselines")
        L += [f"### All methods at {sp0:.0%}", ""]
        L.append("| method | hidden | params − | " + " | ".join(tasks) + " | avg | skill ret. | avg over seeds | ppl | ppl (eval) |")
        L.append("|---|---|---|" + "---|" * len(tasks) + "---|---|---|---|---|")
        rows = [("dense", 0.0)] + [(lab, sp0) for lab in cfg["methods"]]
        for lab, sp in rows:
            c = cells.get(cell_key(m, lab, sp, 0))
            if cell_key(m, lab, sp, 0) in unreachable:
                L.append(f"| {lab} | " + " | ".join(["n/a"] * (len(tasks) + 7)) + " |")
                continue
            if c is None:
                L.append(f"| {lab} | " + " | ".join(["–"] * (len(tasks) + 7)) + " |")
                continue
            st = dm.get("seed_stats", {}).get(lab)
            seedtxt = "–" if not st or st["n"] < 2 else f"{100 * st['mean']:.1f} ± {100 * st['std']:.1f} (n={st['n']})"
            s = c["summary"]
            flag = " ⚑" if flagged(c, tol) else ""
            L.append(f"| {lab} | {s['hidden_size_after']} | {_pct(s['param_reduction'])}%{flag} | "
                     + " | ".join(_pct(c["tasks"][t]["score"]) if t in c["tasks"] else "–" for t in tasks)
                     + f" | **{_pct(c['avg'])}** | {_skill_cell(c, dense)} | {seedtxt} | {_ppl(c['ppl'])} | "
                     + (_ppl(c["ppl_eval"]) if c.get("ppl_eval") is not None else "–") + " |")
        L.append("")
        L += [f"**skill ret.** = skill retained, (avg − chance) / (dense avg − chance) over the {len(tasks)} tasks, "
              "chance per task " + ", ".join(f"{t} {_pct(CHANCE.get(t))}" for t in tasks) + "; from the "
              "aggregate scores.", ""]
        L += paired_section(cells, m, sp0, cfg["methods"], tasks)
        gap = dm.get("gap")
        if gap:
            line = (f"**DIET − best baseline ({gap['best_baseline']}) at {sp0:.0%}**: "
                    f"{100 * gap['gap_seed0']:+.1f} points at seed 0 (± {100 * gap['eval_se']:.1f} evaluation "
                    "sampling SE of the difference)")
            if gap.get("seed_se") is not None:
                line += (f"; over seeds, against the baseline with the best seed mean "
                         f"({gap.get('best_baseline_seeds', gap['best_baseline'])}), "
                         f"{100 * gap['gap_mean']:+.1f} ± {100 * gap['seed_se']:.1f} points "
                         f"(difference of seed means ± its SE; n = {gap['n_seeds'][0]} and {gap['n_seeds'][1]} seeds)")
            if not gap["complete"]:
                line += " — provisional: not every baseline has run at this sparsity"
            L += [line + ".", ""]
            if dense:
                L += [f"Dense: avg {_pct(dense['avg'])}, ppl {_ppl(dense['ppl'])}.", ""]
        if top:
            L += [f"Strongest baselines at {sp0:.0%} (seed 0), used for the error bars: {', '.join(top)}.", ""]
        # sparsity sweep
        L += ["### Accuracy (avg %) and perplexity across sparsities", ""]
        sps = cfg["sparsities"]
        L.append("| method | " + " | ".join(f"{s:.0%} avg | {s:.0%} ppl" for s in sps) + " |")
        L.append("|---|" + "---|---|" * len(sps))
        for lab in cfg["methods"]:
            parts = []
            for sp in sps:
                c = cells.get(cell_key(m, lab, sp, 0))
                if cell_key(m, lab, sp, 0) in unreachable:
                    parts += ["n/a", "n/a"]
                elif c is None:
                    parts += ["–", "–"]
                else:
                    flag = " ⚑" if flagged(c, tol) else ""
                    parts += [f"{_pct(c['avg'])}{flag}", _ppl(c["ppl"])]
            L.append(f"| {lab} | " + " | ".join(parts) + " |")
        gaps = dm.get("sweep_gaps", {})
        parts = []
        for sp in sps:
            g = gaps.get(f"{sp:.2f}")
            parts += (["–", "–"] if g is None else
                      [f"{100 * g['gap']:+.1f} ± {100 * g['eval_se']:.1f} vs {g['best_baseline']}"
                       + ("" if g["complete"] else " (provisional)"), ""])
        L.append("| **DIET − best baseline** | " + " | ".join(parts) + " |")
        L += ["", "DIET − best baseline: seed 0, ± the evaluation sampling SE of the difference; "
              "provisional where not every baseline has run at that sparsity."]
        mine = {k: v for k, v in sorted(unreachable.items()) if parse_key(k)["model"] == m}
        if mine:
            L += ["", "n/a: the method cannot reach that target on this model (`prune()` refuses it): "
                  + "; ".join(f"{parse_key(k)['label']} at {parse_key(k)['sparsity']:.0%} "
                              f"(reachable {v['reachable'][0]:.1%}..{v['reachable'][1]:.1%})" for k, v in mine.items())
                  + "."]
        flags = list(dict.fromkeys(  # seeds of one cell reach the same size: list it once
            f"{c['label']} at {c['sparsity']:.0%}: {_pct(c['summary']['param_reduction'])}%"
            for k, c in sorted(cells.items()) if c["model"] == m and flagged(c, tol)))
        L += ["", "Achieved parameter reduction off target by more than "
              f"{tol:.0%}: " + ("; ".join(flags) if flags else "none") + "."]
        if any(f.startswith("shortgpt ") for f in flags):
            L.append("shortgpt removes whole decoder layers and takes the layer count whose parameter "
                     "fraction is nearest the target; no count lands within the tolerance there.")
        L.append("")
        # ablations
        L += [f"### Ablations of DIET at {sp0:.0%} (seed 0)", ""]
        L += ["| ablation | setting | hidden | avg | ppl | Jaccard with reference mask |", "|---|---|---|---|---|---|"]
        so = dm.get("samples_overlap")
        for n in cfg["ablation_samples"]:
            c = cells.get(cell_key(m, "diet", sp0, 0, "" if n == cfg["samples"] else f"samples={n}"))
            j = so["jaccard"].get(str(n)) if so else None
            ref = f" (vs {so['reference']})" if so else ""
            L.append(f"| samples per task | {n} | " + ("– | – | – |" if c is None else
                     f"{c['summary']['hidden_size_after']} | {_pct(c['avg'])} | {_ppl(c['ppl'])} |")
                     + (f" {j:.3f}{ref} |" if j is not None else " – |"))
        ref_mask = cells.get(cell_key(m, "diet", sp0, 0), {}).get("kept")
        for lab, setting in (("diet", "vote"), ("diet-mean", "mean"), ("diet-rank", "rank")):
            c = cells.get(cell_key(m, lab, sp0, 0))
            j = jaccard(c["kept"], ref_mask) if c and ref_mask and c.get("kept") else None
            L.append(f"| merge | {setting} | " + ("– | – | – |" if c is None else
                     f"{c['summary']['hidden_size_after']} | {_pct(c['avg'])} | {_ppl(c['ppl'])} |")
                     + (f" {j:.3f} (vs vote) |" if j is not None else " – |"))
        for tap in cfg["ablation_taps"]:
            c = cells.get(cell_key(m, "diet", sp0, 0, "" if tap == DEFAULT_TAP else f"tap={tap}"))
            j = jaccard(c["kept"], ref_mask) if c and ref_mask and c.get("kept") else None
            L.append(f"| tap | {tap}{' (default)' if tap == DEFAULT_TAP else ''} | " + ("– | – | – |" if c is None else
                     f"{c['summary']['hidden_size_after']} | {_pct(c['avg'])} | {_ppl(c['ppl'])} |")
                     + (f" {j:.3f} (vs {DEFAULT_TAP}) |" if j is not None else " – |"))
        for lab, setting in (("diet", "rms+ls (default)"), ("diet-norepair", "none")):
            c = cells.get(cell_key(m, lab, sp0, 0))
            L.append(f"| repair | {setting} | " + ("– | – | – |" if c is None else
                     f"{c['summary']['hidden_size_after']} | {_pct(c['avg'])} | {_ppl(c['ppl'])} |") + " same mask |")
        L.append("")
        stab = dm.get("stability")
        L += ["### Stability of the DIET mask across calibration seeds", ""]
        if stab:
            L.append(f"Jaccard overlap of kept dimensions (k = {stab['k']} of {stab['d']}): "
                     + ", ".join(f"seeds {p}: {v:.3f}" for p, v in stab["pairs"].items())
                     + f"; mean {stab['mean']:.3f}. Two random masks of that size overlap "
                     f"{stab['random_expected']:.3f} in expectation.")
        else:
            L.append("Needs DIET at two or more seeds: not run yet.")
        L.append("")
        for name, what in (("acc_vs_sparsity", "accuracy vs sparsity"), ("importance", "per-task importance"),
                           ("votes", "vote histogram")):
            p = Path(cfg["plots_dir"]) / f"{m}_{name}.png"
            if (ROOT / p).is_file():
                rel = os.path.relpath(ROOT / p, (ROOT / cfg["doc"]).parent)
                L.append(f"![{m} {what}]({rel})")
        L.append("")
    missing = state["missing"]
    L += ["## Completeness", ""]
    if missing:
        L.append(f"**Incomplete run: {len(missing)} planned cell(s) missing** (model | method | sparsity | seed | variant): "
                 + "; ".join(f"`{k}`" for k in missing) + ".")
    else:
        L.append("All planned cells are present.")
    if unreachable:
        L.append(f"{len(unreachable)} planned cell(s) are targets their method cannot reach (n/a above); "
                 "they are settled, not missing.")
    if state.get("stale"):
        L.append(f"{len(state['stale'])} cached cell(s) with other evaluation settings were ignored.")
    secs = [c["seconds"]["total"] for c in cells.values()]
    if secs:
        L.append(f"Compute: {len(secs)} cells, {fmt_time(sum(secs))} in total, {statistics.fmean(secs):.0f} s per "
                 f"cell on average ({state.get('host', '')}).")
    return "\n".join(L) + "\n"


# ---- plots -------------------------------------------------------------------------------------

def plots(state: dict) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cfg, cells, der = state["setup"], state["cells"], state["derived"]
    folder = ROOT / cfg["plots_dir"]
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    sp0 = cfg["study_sparsity"]
    for m in cfg["models"]:
        fig, ax = plt.subplots(figsize=(7, 4.5))
        dense = cells.get(cell_key(m, "dense", 0.0, 0))
        any_line = False
        for lab in cfg["methods"]:
            xs, ys, es = [], [], []
            for sp in cfg["sparsities"]:
                c = cells.get(cell_key(m, lab, sp, 0))
                if c is None:
                    continue
                st = der[m].get("seed_stats", {}).get(lab) if sp == sp0 else None
                xs.append(100 * sp)
                ys.append(100 * (st["mean"] if st and st["n"] > 1 else c["avg"]))
                es.append(100 * st["std"] if st and st["n"] > 1 else 0.0)
            if xs:
                any_line = True
                style = "-o" if lab.startswith("diet") else "--s"
                ax.errorbar(xs, ys, yerr=es, fmt=style, capsize=3, label=lab, lw=2.2 if lab == "diet" else 1.2)
        if dense:
            ax.axhline(100 * dense["avg"], color="k", ls=":", label="dense")
        if any_line or dense:
            ax.set_xlabel("target sparsity (%)")
            ax.set_ylabel(f"mean score over {len(cfg['tasks'])} tasks (%)")
            ax.set_title(f"{m}: accuracy vs sparsity (limit {cfg['limit']}/task)\n"
                         f"at {sp0:.0%}: mean ± std over seeds where several ran", fontsize=10)
            ax.legend(fontsize=7, ncol=2)
            ax.grid(alpha=0.3)
            p = folder / f"{m}_acc_vs_sparsity.png"
            fig.tight_layout()
            fig.savefig(p, dpi=90)
            written.append(p)
        plt.close(fig)

        c = cells.get(cell_key(m, "diet", sp0, 0))
        if c and c.get("profile"):
            import torch

            from dietprune.merge import normalize, order_by

            prof = c["profile"]
            scores = torch.tensor(prof["scores"], dtype=torch.float64)
            norm = normalize(scores)  # per task: divided by its mean, as the merge sees it
            votes = torch.tensor(prof["votes"])
            order = order_by(votes.double(), norm.mean(0))
            fig, ax = plt.subplots(figsize=(10, 3.2))
            logn = norm[:, order].log2()
            lim = float(logn.abs().quantile(0.99))
            im = ax.imshow(logn.numpy(), aspect="auto", interpolation="nearest", cmap="RdBu_r", vmin=-lim, vmax=lim)
            ax.set_yticks(range(len(prof["tasks"])), prof["tasks"])
            k = len(c["kept"])
            ax.axvline(k - 0.5, color="k", lw=1)
            ax.set_xlabel(f"hidden dimension, sorted by votes then mean score (black line: k = {k} kept)")
            ax.set_title(f"{m}: DIET importance per task, log2(score / task mean), {sp0:.0%}, seed 0")
            fig.colorbar(im, ax=ax, fraction=0.03)
            fig.tight_layout()
            p = folder / f"{m}_importance.png"
            fig.savefig(p, dpi=90)
            written.append(p)
            plt.close(fig)

            fig, ax = plt.subplots(figsize=(5, 3.5))
            kept = set(c["kept"])
            T = len(prof["tasks"])
            kept_counts = [sum(1 for j, v in enumerate(prof["votes"]) if v == t and j in kept) for t in range(T + 1)]
            cut_counts = [sum(1 for j, v in enumerate(prof["votes"]) if v == t and j not in kept) for t in range(T + 1)]
            ax.bar(range(T + 1), kept_counts, label="kept")
            ax.bar(range(T + 1), cut_counts, bottom=kept_counts, label="removed")
            ax.set_xlabel(f"votes (tasks whose top-k holds the dimension, of {T})")
            ax.set_ylabel("hidden dimensions")
            ax.set_title(f"{m}: DIET votes at {sp0:.0%}")
            ax.legend()
            fig.tight_layout()
            p = folder / f"{m}_votes.png"
            fig.savefig(p, dpi=90)
            written.append(p)
            plt.close(fig)
    return written


# ---- driver ----------------------------------------------------------------------------------

def pending(cfg: dict, cells: dict, infeasible) -> tuple[list[str], int]:
    """Planned cells still to compute, in plan order (reachable targets only), and the number of
    cells not yet known (seed cells of baselines not yet chosen)."""
    wanted = plan(cfg, cells, infeasible)
    todo = [k for _, k in wanted if k is not None and k not in cells and k not in infeasible]
    return todo, sum(1 for _, k in wanted if k is None)


def build_state(cfg: dict, cells_dir: Path, settings: dict) -> dict:
    cells, stale, infeasible = load_cells(cells_dir, settings)
    todo, unknown = pending(cfg, cells, infeasible)
    missing = todo + (["(seed cells of the two strongest baselines, not yet "
                       f"chosen: {unknown})"] if unknown else [])
    import platform

    return {"schema": SCHEMA, "setup": cfg, "generated": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "host": f"{platform.machine()}, {os.cpu_count()} CPUs", "cells": cells,
            "derived": derive(cfg, cells, infeasible), "missing": missing, "stale": stale,
            "infeasible": infeasible}


def finish(state: dict, out: Path, doc: Path, make_plots: bool = True) -> None:
    # the per-example records stay in the cell files (about 70 KB a cell): the summary JSON says which have them
    slim = {k: ({x: v for x, v in c.items() if x != "records"} | {"has_records": True} if c.get("records") else c)
            for k, c in state["cells"].items()}
    write_json_atomic(out, dict(state, cells=slim))
    if make_plots:
        try:
            plots(state)
        except Exception:  # noqa: BLE001 - a plot must not lose the numbers
            traceback.print_exc()
    doc.parent.mkdir(parents=True, exist_ok=True)
    tmp = doc.with_name(f".{doc.name}.tmp-{os.getpid()}")
    tmp.write_text(render(state))
    os.replace(tmp, doc)


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--quick", action="store_true", help="smoke preset (smollm2-135m, 20%%, 3 methods, limit 10, "
                                                         "samples 8, 1024 ppl tokens) writing under "
                                                         "bench/results/structured/quick/")
    ap.add_argument("--render-only", action="store_true", help="rebuild JSON, markdown and plots from the cells")
    ap.add_argument("--models")
    ap.add_argument("--sparsities")
    ap.add_argument("--methods", help=f"comma list of {', '.join(ALL_METHODS)}")
    ap.add_argument("--tasks")
    ap.add_argument("--limit", type=int, help="examples per task (default 200)")
    ap.add_argument("--samples", type=int, help="calibration samples per task (default 100)")
    ap.add_argument("--ppl-tokens", type=int, help="WikiText-2 test tokens for perplexity (default 16384 = 8 windows of 2048; "
                    "0 = the full test text, many times slower on a CPU)")
    ap.add_argument("--seeds", help="calibration seeds for the error bars (default 0,1,2)")
    ap.add_argument("--ablation-samples")
    ap.add_argument("--ablation-taps")
    ap.add_argument("--study-sparsity", type=float, help="sparsity of the error bars and ablations (0.2)")
    ap.add_argument("--parts", help="which of main,seeds,ablations,sweep to run (all)")
    ap.add_argument("--flag-tolerance", type=float, default=0.01)
    ap.add_argument("--max-cells", type=int, default=None, help="stop after computing this many cells")
    ap.add_argument("--no-profile-cache", action="store_true",
                    help="profile inside every prune() call instead of sharing one task profile per "
                         "(model, samples, seed, tap) between the cells that only need that profile")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--device", default=None, help="load every model there (e.g. cuda): profiling, repair, cut and "
                                                   "evaluation run on it")
    ap.add_argument("--out")
    ap.add_argument("--cells-dir")
    ap.add_argument("--plots-dir")
    ap.add_argument("--doc")
    ap.add_argument("--data-dir", default=os.environ.get("DIETPRUNE_DATA_DIR"))
    return ap.parse_args(argv)


def resolve_config(args) -> dict:
    base = QUICK if args.quick else FULL
    given = {k: getattr(args, k) for k in base if getattr(args, k) is not None}
    raw = {**base, **given}

    def lst(s):
        return [x.strip() for x in str(s).split(",") if x.strip()]

    cfg = {"models": lst(raw["models"]), "sparsities": [round(float(x), 4) for x in lst(raw["sparsities"])],
           "methods": lst(raw["methods"]), "tasks": lst(raw["tasks"]), "limit": int(raw["limit"]),
           "samples": int(raw["samples"]), "ppl_tokens": int(raw["ppl_tokens"]),
           "seeds": [int(x) for x in lst(raw["seeds"])],
           "ablation_samples": [int(x) for x in lst(raw["ablation_samples"])],
           "ablation_taps": lst(raw["ablation_taps"]), "study_sparsity": round(float(raw["study_sparsity"]), 4),
           "parts": lst(raw["parts"]), "flag_tolerance": args.flag_tolerance,
           "out": raw["out"], "cells_dir": raw["cells_dir"], "plots_dir": raw["plots_dir"], "doc": raw["doc"],
           "quick": bool(args.quick), "cli": given}
    from dietprune.registry import METHODS

    bad = [m for m in cfg["methods"] if LABELS.get(m, (m,))[0] not in METHODS]
    if bad:
        raise SystemExit(f"unknown method(s) {bad}; choose from {', '.join(ALL_METHODS)}")
    bad = [t for t in cfg["ablation_taps"] if t not in TAPS]
    if bad:
        raise SystemExit(f"unknown tap(s) {bad}; choose from {', '.join(TAPS)}")
    bad = [p for p in cfg["parts"] if p not in ("main", "seeds", "ablations", "sweep")]
    if bad:
        raise SystemExit(f"unknown part(s) {bad}")
    if 0 not in cfg["seeds"]:
        raise SystemExit("--seeds must include 0 (the seed of the main grid)")
    return cfg


def settings_of(cfg: dict) -> dict:
    """What makes a cached cell reusable: evaluation and calibration settings (not the plan)."""
    return {"tasks": ",".join(cfg["tasks"]), "limit": cfg["limit"], "samples": cfg["samples"],
            "ppl_tokens": cfg["ppl_tokens"]}


def main(argv=None) -> int:
    args = parse_args(argv)
    cfg = resolve_config(args)
    out, doc = ROOT / cfg["out"], ROOT / cfg["doc"]
    cells_dir = ROOT / cfg["cells_dir"]
    settings = settings_of(cfg)
    cfg["settings"] = settings
    prev = json.loads(out.read_text()) if out.is_file() else {}
    # the commands that produced cells with these settings (a rerun with other limits starts afresh)
    commands = list(prev.get("setup", {}).get("commands", [])) if prev.get("setup", {}).get("settings") == settings \
        else []
    cmd = command_line(cfg, args.data_dir)
    if cmd not in commands and not args.render_only:
        commands.append(cmd)
    cfg["commands"] = commands
    if args.render_only:
        finish(build_state(cfg, cells_dir, settings), out, doc)
        print(f"rendered {doc} and {out}")
        return 0

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    from dietprune.models import load

    models: dict = {}
    profiles: dict | None = None if args.no_profile_cache else {}
    computed, failed = 0, {}
    t_start = time.perf_counter()
    while True:
        state = build_state(cfg, cells_dir, settings)
        cells = state["cells"]
        todo, unknown = pending(cfg, cells, state["infeasible"])
        todo = [k for k in todo if k not in failed]
        if not todo or (args.max_cells is not None and computed >= args.max_cells):
            break
        key = todo[0]
        spec = parse_key(key)
        left = len(todo) + unknown
        secs = eta_seconds(cells, todo, unknown)
        eta = f"~{fmt_time(secs)} left for {left} cells" if secs is not None else f"{left} cells left, no timing yet"
        print(f"[{len(cells)} done | {eta}] {key}", flush=True)
        if spec["model"] not in models:
            t0 = time.perf_counter()
            models[spec["model"]] = load(spec["model"], device=args.device)
            print(f"  loaded {spec['model']} in {time.perf_counter() - t0:.0f}s", flush=True)
        try:
            cell = run_cell(models[spec["model"]], spec, settings, args.data_dir, profiles)
        except UnreachableSparsity as exc:  # the method's structure cannot get there: settled, not failed
            write_json_atomic(cell_file(cells_dir, key), unreachable_record(spec, settings, exc))
            print(f"  NOT REACHABLE {key}: {exc}", flush=True)
            continue
        except Exception as exc:  # noqa: BLE001 - one failing cell must not stop the study
            traceback.print_exc()
            failed[key] = f"{type(exc).__name__}: {exc}"
            print(f"  FAILED {key}: {failed[key]}", flush=True)
            gc.collect()
            continue
        write_json_atomic(cell_file(cells_dir, key), cell)
        computed += 1
        s = cell["summary"]
        print(f"  avg {100 * cell['avg']:.1f}  ppl {_ppl(cell['ppl'])}  hidden {s['hidden_size_after']}  "
              f"params -{100 * s['param_reduction']:.1f}%  ({cell['seconds']['prune']:.0f}s prune, "
              f"{cell['seconds']['eval']:.0f}s eval, {cell['seconds']['ppl']:.0f}s ppl)", flush=True)
        finish(build_state(cfg, cells_dir, settings), out, doc, make_plots=False)
    state = build_state(cfg, cells_dir, settings)
    state["failed"] = failed
    finish(state, out, doc)
    print(f"computed {computed} cells in {fmt_time(time.perf_counter() - t_start)}; "
          f"{len(state['missing'])} missing; wrote {out}, {doc}", flush=True)
    if failed:
        print("failed cells: " + "; ".join(f"{k}: {v}" for k, v in failed.items()), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
