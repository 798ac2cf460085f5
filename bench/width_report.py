"""diet-width against diet and the baselines, from the structured-study cells (no model runs).

    python bench/width_report.py                       # docs/width_results.md + bench/results/width_report.json
    python bench/width_report.py --extra-cells DIR     # also look for per-example records in DIR

For every model and sparsity with a diet-width cell: the task average, skill retained
((avg - chance) / (dense avg - chance), chance 50 for boolq/rte/winogrande and 25 for the rest),
WikiText-2 perplexity on the first 16,384 tokens of test.jsonl (``ppl``, the study's figure) and
of eval.jsonl (``ppl_eval``: rows no method calibrates on, recorded by cells that were run with
it), and paired differences on the same examples (mean ± SE, `dietprune.evaluate.paired`) against
diet and against dense, with the per-example agreement with the dense model's prediction, where
both cells hold per-example records. Then the grid of splits each diet-width cell measured.

Cells are read from ``--cells-dir`` (the study), ``bench/results/structured/width_pairs/cells``
(diet / dense reruns that store records and ppl_eval) and any ``--extra-cells``; for a
(model, method, sparsity, seed) the first cell with records wins, else the study's.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dietprune.evaluate.paired import CHANCE, aggregate_skill, paired_tasks, results_columns  # noqa: E402

STUDY = "bench/results/structured/cells"
PAIRS = "bench/results/structured/width_pairs/cells"
BASELINES = ("random", "magnitude", "agnostic", "wanda-sp", "flap", "shortgpt")


def load(dirs: list[Path], settings: dict | None) -> dict:
    """(model, label, sparsity, seed) -> cell (variant cells ignored); records-holding cells first."""
    out: dict = {}
    for d in dirs:
        for f in sorted(d.glob("*.json")):
            try:
                c = json.loads(f.read_text())
            except (OSError, json.JSONDecodeError):
                continue
            if c.get("infeasible") or c.get("variant") or "tasks" not in c:
                continue
            if settings is not None and c.get("settings") != settings:
                continue
            key = (c["model"], c["label"], round(float(c["sparsity"]), 2), int(c["seed"]))
            old = out.get(key)
            if old is None or (c.get("records") and not old.get("records")) or \
                    (c.get("records") and old.get("records") and c.get("ppl_eval") and not old.get("ppl_eval")):
                out[key], c = c, old
            # a rerun of the same cell (same settings and prune config) may hold the eval.jsonl
            # perplexity that the copy with records lacks: keep it
            kept = out[key]
            if c is not None and kept.get("ppl_eval") is None and c.get("ppl_eval") is not None and \
                    c.get("settings") == kept.get("settings") and c.get("config") == kept.get("config"):
                out[key] = dict(kept, ppl_eval=c["ppl_eval"])
    return out


def scores(cell: dict) -> dict:
    return {t: v["score"] for t, v in cell["tasks"].items()}


def skill(cell: dict, dense: dict) -> float | None:
    return aggregate_skill(scores(cell), scores(dense), CHANCE)["average"]


def paired(ref: dict | None, new: dict | None) -> dict | None:
    if not ref or not new or not ref.get("records") or not new.get("records"):
        return None
    out = paired_tasks(results_columns(ref), results_columns(new), n_boot=200)
    return out["average"]


def fmt(x, digits=1, pct=False):
    if x is None:
        return "n/a"
    return f"{100 * x:.{digits}f}" if pct else f"{x:.{digits}f}"


def fmt_pair(p) -> str:
    if p is None:
        return "n/a"
    return f"{100 * p['diff']:+.1f} ± {100 * p['se']:.1f}"


def build(cells: dict) -> dict:
    report = {}
    width_keys = sorted(k for k in cells if k[1] == "diet-width")
    for model in sorted({k[0] for k in width_keys}):
        dense = cells.get((model, "dense", 0.0, 0))
        if dense is None:
            continue
        mrep = {"dense": {"avg": statistics.fmean(scores(dense).values()), "ppl": dense.get("ppl"),
                          "ppl_eval": dense.get("ppl_eval"), "records": bool(dense.get("records"))}, "cells": {}}
        for (_, _, sp, seed) in [k for k in width_keys if k[0] == model]:
            rows = {}
            for label in ("diet-width", "diet") + BASELINES:
                c = cells.get((model, label, sp, seed))
                if c is None:
                    continue
                diet = cells.get((model, "diet", sp, seed))
                rows[label] = {
                    "avg": c["avg"], "skill": skill(c, dense), "ppl": c.get("ppl"), "ppl_eval": c.get("ppl_eval"),
                    "param_reduction": c["summary"].get("param_reduction"),
                    "vs_dense": paired(dense, c), "vs_diet": paired(diet, c) if label != "diet" else None,
                    "records": bool(c.get("records"))}
                if label == "diet-width":
                    rows[label]["width"] = c.get("width")
                    rows[label]["seconds"] = c.get("seconds")
            mrep["cells"][f"{sp:.2f}|{seed}"] = rows
        report[model] = mrep
    return report


def ratio(x, ref):
    return None if x is None or not ref else x / ref


def summary_lines(m: dict) -> list[str]:
    """Every diet-width cell of a model in one table, then the issue's goal at 20% (seed mean)."""
    d = m["dense"]
    L = ["Every diet-width cell (ppl × = perplexity over dense's, eval.jsonl where measured, else test.jsonl; "
         "shape = hidden / heads (KV) / MLP channels kept; wall = the cell's prune + evaluation seconds on one "
         "thread of a shared machine):", "",
         "| sparsity | seed | avg | skill | ppl eval | ppl × dense | shape | vs diet | wall s |",
         "|---|---|---|---|---|---|---|---|---|"]
    by_sp: dict = {}
    for key, rows in m["cells"].items():
        sp, seed = key.split("|")
        r = rows.get("diet-width")
        if r is None:
            continue
        pe = ratio(r["ppl_eval"], d["ppl_eval"]) if r["ppl_eval"] is not None and d["ppl_eval"] else None
        px = pe if pe is not None else ratio(r["ppl"], d["ppl"])
        w = (r.get("width") or {}).get("shape_after") or {}
        shape = f"{w.get('hidden')} / {w.get('heads')} ({w.get('groups')}) / {w.get('channels')}" if w else "n/a"
        L.append(f"| {float(sp):.0%} | {seed} | {fmt(r['avg'], pct=True)} | {fmt(r['skill'], 0, pct=True)}% | "
                 f"{fmt(r['ppl_eval'])} | {fmt(px, 2)}{'' if pe is not None else ' (test)'} | {shape} | "
                 f"{fmt_pair(r['vs_diet'])} | {fmt((r.get('seconds') or {}).get('total'), 0)} |")
        by_sp.setdefault(sp, []).append((r, rows.get("diet"), px))
    L.append("")
    got = by_sp.get("0.20")
    if got:
        skills = [r["skill"] for r, _, _ in got if r["skill"] is not None]
        diets = [dd["skill"] for _, dd, _ in got if dd and dd["skill"] is not None]
        pxs = [px for _, _, px in got if px is not None]
        pairs = [r["vs_diet"] for r, _, _ in got if r["vs_diet"]]
        sk = statistics.fmean(skills) if skills else None
        pm = statistics.fmean(pxs) if pxs else None
        goal = [f"skill retained {fmt(sk, 0, pct=True)}% (goal ≥ 85%; diet {fmt(statistics.fmean(diets), 0, pct=True) if diets else 'n/a'}%)",
                f"perplexity {fmt(pm, 2)}× dense (goal ≤ 2×)"]
        if pairs:
            beyond = sum(1 for p in pairs if p["diff"] > 2 * p["se"])
            goal.append(f"paired difference vs diet beyond 2 SE in {beyond} of {len(pairs)} seed(s) "
                        f"({', '.join(fmt_pair(p) for p in pairs)})")
        else:
            goal.append("paired difference vs diet: no cell pair with per-example records yet")
        L += [f"Against the goal at 20% ({len(got)} seed(s), mean): " + "; ".join(goal) + ".", ""]
    return L


def render(report: dict, cmd: str) -> str:
    lines = ["# diet-width: measured results", "",
             "Generated by `bench/width_report.py` from the structured-study cells (7 tasks at limit 200, "
             "100 calibration samples per task; see [width.md](width.md) for the method). Do not edit by hand.", "",
             f"Command: `{cmd}`", "",
             "Columns: parameters removed; task average (%); skill retained = (avg − chance) / (dense avg − "
             "chance); perplexity on the first 16,384 WikiText-2 tokens of test.jsonl (`ppl`, the study's figure, "
             "whose text overlaps wikitext2/calib.jsonl) and of eval.jsonl (`ppl eval`, never calibrated on; only "
             "cells run with it); paired difference on the same examples (points, mean ± SE of the 7-task "
             "average) against diet and against dense; agreement = share of examples where the prediction equals "
             "the dense model's. n/a: a cell without per-example records (or not run).", ""]
    for model, m in report.items():
        d = m["dense"]
        lines += [f"## {model}", "",
                  f"Dense: avg {fmt(d['avg'], pct=True)}, ppl {fmt(d['ppl'])}, ppl eval {fmt(d['ppl_eval'])}.", ""]
        lines += summary_lines(m)
        for key, rows in m["cells"].items():
            sp, seed = key.split("|")
            lines += [f"### {float(sp):.0%} of the parameters, seed {seed}", "",
                      "| method | removed | avg | skill | ppl | ppl eval | vs diet | vs dense | agreement |",
                      "|---|---|---|---|---|---|---|---|---|"]
            for label, r in rows.items():
                vd = r["vs_dense"]
                lines.append(f"| {label} | {fmt(r['param_reduction'], pct=True)}% | {fmt(r['avg'], pct=True)} | "
                             f"{fmt(r['skill'], 0, pct=True)}% | {fmt(r['ppl'])} | {fmt(r['ppl_eval'])} | "
                             f"{fmt_pair(r['vs_diet'])} | {fmt_pair(vd)} | "
                             f"{fmt(vd['agreement'], pct=True) + '%' if vd else 'n/a'} |")
            w = rows.get("diet-width", {}).get("width")
            if w:
                sh = w["shape_after"]
                sp_ = w["split"]
                lines += ["", f"Chosen: hidden {w['shape_before']['hidden']} → {sh['hidden']}, heads "
                          f"{w['shape_before']['heads']} → {sh['heads']} (KV {w['shape_before']['groups']} → "
                          f"{sh['groups']}), MLP {w['shape_before']['channels']} → {sh['channels']}; removed "
                          f"parameters by axis alone: hidden {fmt(sp_['hidden'], pct=True)}%, heads "
                          f"{fmt(sp_['heads'], pct=True)}%, MLP {fmt(sp_['mlp'], pct=True)}% (together "
                          f"{fmt(sp_['total'], pct=True)}%). Held-out KL tokens: {w['kl_probe'].get('tokens')} "
                          f"({', '.join(f'{t} {n}' for t, n in w['kl_probe'].get('sequences', {}).items())} "
                          f"sequences); search {w.get('search_seconds')} s.", "",
                          "| # | hidden | heads (KV) | MLP channels | removed | KL (nats/token) |",
                          "|---|---|---|---|---|---|"]
                for i, c in enumerate(w["candidates"]):
                    mark = " **(chosen)**" if i == w["chosen"] else ""
                    lines.append(f"| {i}{mark} | {c['hidden']} | {c['heads']} ({c['groups']}) | {c['channels']} | "
                                 f"{fmt(c['sparsity'], pct=True)}% | {c['kl']:.4f} |" if c.get("kl") is not None
                                 else f"| {i} | {c['hidden']} | {c['heads']} | {c['channels']} | | |")
            lines.append("")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cells-dir", default=STUDY)
    ap.add_argument("--extra-cells", action="append", default=[])
    ap.add_argument("--out", default="bench/results/width_report.json")
    ap.add_argument("--doc", default="docs/width_results.md")
    args = ap.parse_args(argv)
    dirs = [Path(x) if Path(x).is_absolute() else ROOT / x for x in [*args.extra_cells, PAIRS, args.cells_dir]]
    cells = load([d for d in dirs if d.is_dir()], None)
    report = build(cells)
    cmd = "python bench/width_report.py" + "".join(f" --extra-cells {x}" for x in args.extra_cells)
    (ROOT / args.out).write_text(json.dumps(report, indent=1, default=lambda x: None) + "\n")
    (ROOT / args.doc).write_text(render(report, cmd))
    print(f"wrote {args.out} and {args.doc}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
