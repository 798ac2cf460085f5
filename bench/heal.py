"""Healing study: how much of what the cut lost does distillation from the dense model win back?

    DIETPRUNE_DATA_DIR=../shared/benchdata python bench/heal.py            # one unit of work, then exit
    python bench/heal.py --render-only                                    # JSON, docs/heal.md, plot

A cell is (model, method, sparsity, mode, tokens): the model is pruned once with
``dietprune.prune`` at the structured study's default recipe (cached outside the repository),
healed with ``dietprune.heal`` on the seven tasks' calibration rows plus WikiText-2's calibration
rows, then evaluated exactly like a study cell (seven tasks, first ``--limit`` eval rows each)
plus token perplexity on ``wikitext2/eval.jsonl`` (never trained on; the study's perplexity
reads the whole test split, which contains the calibration quarter, so it is not used here).

Budgets of one (model, method, mode) are one run: the learning rate is constant after warmup
and the data order does not depend on the budget, so the 100k cell continues the 30k cell's
saved state and equals a straight 100k run. Each invocation does at most one unit of work
(one cell, or ``--minutes`` of healing of a long cell, whose state is saved and resumed by the
next invocation), so the study can run under a shared lock in short turns:

    while true; do flock /tmp/dietprune-heavy.lock python bench/heal.py; [ $? -eq 10 ] || break; sleep 30; done

Exit 10: work remains; 0: the plan is done. Per-example hits are kept in every cell, so each
healed cell's 7-task average comes with its paired difference to dense on the same examples.
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
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dietprune.tasks import DIET_TASKS  # noqa: E402

SCHEMA = "dietprune-heal-study/1"
CHANCE = {"boolq": 0.5, "rte": 0.5, "winogrande": 0.5}  # 0.25 for the others
DEFAULTS = dict(models="smollm2-135m", methods="diet", sparsity=0.2, budgets="0,10000,30000,100000,300000",
                mode_budget=10000, modes="full,lora,norms", limit=50, dense_limit=200, ppl_tokens=16384,
                seq_len=256,
                batch_size=4, minutes=12.0, bf16=True, cells_dir="bench/results/heal/cells",
                out="bench/results/heal.json", doc="docs/heal.md", plot="bench/results/heal/heal.png")
CACHE = Path(os.environ.get("DIETPRUNE_HEAL_CACHE", Path.home() / ".cache" / "dietprune" / "heal-bench"))
MORE_TODO = 10


def chance(task: str) -> float:
    return CHANCE.get(task, 0.25)


def cell_key(model, method, sparsity, mode, tokens) -> str:
    return f"{model}|{method}|{sparsity:.2f}|{mode}|{tokens}"


def cell_file(cells_dir: Path, key: str) -> Path:
    return cells_dir / (key.replace("|", "__") + ".json")


def write_json_atomic(path: Path, data) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=1, allow_nan=False) + "\n")
    os.replace(tmp, path)


def load_cells(cells_dir: Path, settings: dict) -> dict:
    cells = {}
    for f in sorted(cells_dir.glob("*.json")) if cells_dir.is_dir() else []:
        c = json.loads(f.read_text())
        if {k: v for k, v in c.get("settings", {}).items() if k != "limit"} == settings:
            cells[c["key"]] = c
    return cells


def settings_of(cfg: dict) -> dict:
    """What makes a cached cell reusable (the eval limit is per cell; pairs use the rows both evaluated)."""
    return {"tasks": ",".join(DIET_TASKS), "ppl_tokens": cfg["ppl_tokens"],
            "seq_len": cfg["seq_len"], "batch_size": cfg["batch_size"], "bf16": cfg["bf16"],
            "data": "7 tasks calib + wikitext2 calib"}


# ---- the plan ------------------------------------------------------------------------------------

COMPARED = ("full", "lora")  # the mode of the longer budgets is picked between these (norms is measured after)


def best_mode(cells: dict, model, method, sp, modes, budget) -> str | None:
    modes = [m for m in modes if m in COMPARED]
    got = [cells.get(cell_key(model, method, sp, m, budget)) for m in modes]
    if any(c is None for c in got):
        return None
    return min(zip(modes, got), key=lambda mc: mc[1]["ppl"])[0]


def plan(cfg: dict, cells: dict) -> list[str]:
    """Every cell of the study in priority order (finished ones included)."""
    keys = []
    sp = cfg["sparsity"]
    for model in cfg["models"]:
        keys.append(cell_key(model, "dense", 0.0, "none", 0))
        for i, method in enumerate(cfg["methods"]):
            keys.append(cell_key(model, method, sp, "none", 0))
            first = i == 0 and model == cfg["models"][0]
            if first:
                keys += [cell_key(model, method, sp, m, cfg["mode_budget"]) for m in cfg["modes"] if m in COMPARED]
            mode = best_mode(cells, cfg["models"][0], cfg["methods"][0], sp, cfg["modes"], cfg["mode_budget"])
            if mode is None:
                continue
            chain = [cell_key(model, method, sp, mode, b) for b in cfg["budgets"] if b]
            keys += chain[:2]  # the next budget of the chosen mode, then the remaining modes, then longer budgets
            if first:
                keys += [cell_key(model, method, sp, m, cfg["mode_budget"]) for m in cfg["modes"]]
            keys += chain[2:]
    seen, out = set(), []
    for k in keys:
        if k not in seen:
            seen.add(k)
            out.append(k)
    return out


# ---- one cell --------------------------------------------------------------------------------------

def pruned_checkpoint(lm, model, method, sp, data_dir) -> Path:
    """The study's default prune of this model (cached outside the repository)."""
    from dietprune.pipeline import prune

    folder = CACHE / f"{model}__{method}__{sp:.2f}"
    if not (folder / "config.json").is_file():
        CACHE.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        prune(lm, tasks=",".join(DIET_TASKS), sparsity=sp, method=method, seed=0, samples=100, data_dir=data_dir,
              output=folder)
        print(f"  pruned {model} {method} {sp:.0%} in {time.perf_counter() - t0:.0f}s -> {folder}", flush=True)
    return folder


def eval_ppl(model, tokenizer, data_dir, max_tokens: int) -> float:
    from dietprune.data import data_dir as resolve
    from dietprune.evaluate.runner import _token_perplexity

    path = resolve(data_dir) / "wikitext2" / "eval.jsonl"
    rows = [json.loads(line)["text"] for line in path.open()]
    ppl, _ = _token_perplexity(model, tokenizer, rows, max_tokens, 2048, 1, False)
    return ppl


def evaluate_cell(model, tokenizer, settings, data_dir, limit: int) -> dict:
    import torch

    from dietprune.evaluate import evaluate
    from dietprune.evaluate.results import headline

    t0 = time.perf_counter()
    with torch.no_grad():
        ev = evaluate(model, tokenizer, list(DIET_TASKS), limit=limit, data_dir=data_dir,
                      progress=False, log_samples=True)
        t1 = time.perf_counter()
        ppl = eval_ppl(model, tokenizer, data_dir, settings["ppl_tokens"])
    t2 = time.perf_counter()
    tasks, hits = {}, {}
    for name, m in ev["tasks"].items():
        key, value = headline(m)
        tasks[name] = {"metric": key, "score": value, "stderr": m.get(f"{key}_stderr"), "n": m["n"]}
        pred = "pred_norm" if key == "acc_norm" else "pred"
        hits[name] = [int(r[pred] == r["gold"]) for r in ev["samples"][name]]
    return {"tasks": tasks, "hits": hits, "avg": statistics.fmean(t["score"] for t in tasks.values()),
            "ppl": float(ppl), "seconds_eval": round(t1 - t0, 1), "seconds_ppl": round(t2 - t1, 1)}


def run_unit(key: str, cfg: dict, settings: dict, data_dir, models: dict) -> dict | None:
    """Compute the cell `key`, or heal it for ``--minutes`` and return None (resumed next time)."""
    from dietprune.heal import heal
    from dietprune.models import load

    model, method, sp, mode, tokens = key.split("|")
    sp, tokens = float(sp), int(tokens)
    if model not in models:
        models[model] = load(model)
    lm = models[model]
    limit = cfg["dense_limit"] if method == "dense" else cfg["limit"]
    # the other modes at the comparison budget: perplexity only (the tasks cost as much CPU as the healing)
    ppl_only = tokens == cfg["mode_budget"] and mode != "full"
    cell = {"key": key, "model": model, "method": method, "sparsity": sp, "mode": mode, "tokens": tokens,
            "settings": dict(settings, limit=limit)}
    if method == "dense":
        cell.update(evaluate_cell(lm.model, lm.tokenizer, settings, data_dir, limit))
        cell["params"] = sum(p.numel() for p in lm.model.parameters())
        return cell
    folder = pruned_checkpoint(lm, model, method, sp, data_dir)
    heal_info = None
    if tokens == 0:
        student = load(str(folder))
        net, tok = student.model, student.tokenizer
    else:
        state = CACHE / "state" / f"{model}__{method}__{sp:.2f}__{mode}"
        res = heal(str(folder), lm, tasks=DIET_TASKS, general=("wikitext2",), tokens=tokens, mode=mode,
                   seq_len=cfg["seq_len"], batch_size=cfg["batch_size"], seed=0, data_dir=data_dir,
                   state_dir=state, resume=True, keep_state=True, minutes=cfg["minutes"],
                   checkpoint_every=25, bf16=cfg["bf16"])
        if res.summary["stopped"] != "done":
            print(f"  healed to {res.summary['tokens_trained']:,} of {tokens:,} tokens "
                  f"({res.summary['tokens_per_second']} tok/s); state saved, resumes next turn", flush=True)
            return None
        net, tok = res.model, res.tokenizer
        heal_info = {k: res.summary[k] for k in ("tokens_trained", "steps", "seconds_train_total",
                                                  "tokens_per_second", "loss_first", "loss_last")}
        heal_info["config"] = res.config.recipe()
        heal_info["loss_curve"] = [(h["tokens"], h["loss"]) for h in res.history[:: max(1, len(res.history) // 40)]]
        # tokens/s over the whole chain (several turns and budgets): tokens over summed training seconds
        heal_info["tokens_per_second_chain"] = round(res.summary["tokens_trained"]
                                                     / max(res.summary["seconds_train_total"], 1e-9), 1)
    if ppl_only:
        t1 = time.perf_counter()
        import torch

        with torch.no_grad():
            cell["ppl"] = float(eval_ppl(net, tok, data_dir, settings["ppl_tokens"]))
        cell["seconds_eval"], cell["seconds_ppl"] = 0.0, round(time.perf_counter() - t1, 1)
        cell["settings"]["limit"] = 0
    else:
        cell.update(evaluate_cell(net, tok, settings, data_dir, limit))
    cell["params"] = sum(p.numel() for p in net.parameters())
    cell["heal"] = heal_info
    meta = json.loads((folder / "dietprune.json").read_text())
    cell["param_reduction"] = meta["summary"]["param_reduction"]
    cell["prune_config"] = meta["config"]
    del net
    gc.collect()
    return cell


# ---- derived figures and the report ----------------------------------------------------------------

def avg_on(cell, n: dict) -> float:
    """The 7-task average of `cell` on the first n[t] examples of each task."""
    return statistics.fmean(statistics.fmean(cell["hits"][t][:n[t]]) for t in DIET_TASKS)


def common_n(cell, dense) -> dict:
    return {t: min(len(cell["hits"][t]), len(dense["hits"][t])) for t in DIET_TASKS}


def skill_retained(avg_chance, cell, dense) -> float:
    """(avg - chance) / (dense avg - chance), both on the same examples."""
    n = common_n(cell, dense)
    return (avg_on(cell, n) - avg_chance) / (avg_on(dense, n) - avg_chance)


def paired(cell, dense) -> tuple[float, float]:
    """7-task average minus dense's on the same examples, and its standard error."""
    diffs, var = [], 0.0
    for t in DIET_TASKS:
        a, b = cell["hits"][t], dense["hits"][t]
        d = [x - y for x, y in zip(a, b)]  # zip: the first examples both evaluated
        n = len(d)
        mu = sum(d) / n
        diffs.append(mu)
        var += sum((x - mu) ** 2 for x in d) / (n - 1) / n
    return sum(diffs) / len(diffs), math.sqrt(var) / len(diffs)


def derive(cells: dict) -> list[dict]:
    avg_chance = statistics.fmean(chance(t) for t in DIET_TASKS)
    rows = []
    for c in cells.values():
        dense = cells.get(cell_key(c["model"], "dense", 0.0, "none", 0))
        if dense is None:
            continue
        tasks = "hits" in c
        d, se = paired(c, dense) if tasks else (None, None)
        h = c.get("heal") or {}
        rows.append({"model": c["model"], "method": c["method"], "mode": c["mode"], "tokens": c["tokens"],
                     "avg": c.get("avg"), "limit": c["settings"]["limit"],
                     "dense_avg_same": avg_on(dense, common_n(c, dense)) if tasks else None,
                     "skill": skill_retained(avg_chance, c, dense) if tasks else None, "diff": d, "diff_se": se,
                     "ppl": c["ppl"], "ppl_ratio": c["ppl"] / dense["ppl"],
                     "train_s": h.get("seconds_train_total", 0.0), "tok_s": h.get("tokens_per_second_chain"),
                     "param_reduction": c.get("param_reduction", 0.0),
                     "tasks": {t: c["tasks"][t]["score"] for t in DIET_TASKS} if tasks else None})
    order = {"dense": 0}
    rows.sort(key=lambda r: (r["model"], order.get(r["method"], 1), r["method"], r["tokens"], r["mode"]))
    return rows


def render(state: dict) -> str:
    rows, cfg = state["rows"], state["setup"]
    L = ["# Healing: distillation from the dense model", "",
         "Generated by `bench/heal.py` from `bench/results/heal.json`; do not edit by hand.", "",
         "- Student: the model pruned by `dietprune prune` with the structured study's default recipe "
         f"({', '.join(cfg['methods'])}; {cfg['sparsity']:.0%} hidden-dimension sparsity, 100 calibration samples "
         "per task, seed 0, default repair).",
         "- Healing: `dietprune.heal`, KL divergence from the dense model's next-token distribution on every "
         f"token (T = 1), sequences of {cfg['seq_len']} tokens, {cfg['batch_size']} per step, AdamW, constant "
         "learning rate after 5 warmup steps (default per mode: full 1e-4, LoRA rank 16 1e-3, norms 1e-2), "
         "bfloat16 autocast of the decoder bodies (heads and KL in float32; ~1.6x faster here); text = the seven "
         "tasks' calibration rows (query + gold answer) and WikiText-2's calibration rows, packed in a seeded "
         "order. The budgets of one mode are one run (each budget continues the previous one's state).",
         f"- Evaluation: the seven tasks' first {cfg['limit']} eval rows each ({cfg['dense_limit']}, the study's "
         "limit, for dense; a smaller limit for the other cells because evaluation competes with healing for the "
         "shared CPU), headline metric (acc_norm where defined, else acc); skill retained = (avg - chance) / "
         "(dense avg - chance) with dense's average on the same examples, "
         "chance 50% for boolq, rte, winogrande and 25% for the others. Paired difference: the 7-task average "
         "minus dense's on the same examples, ± its standard error.",
         f"- Perplexity: token perplexity on the first {cfg['ppl_tokens']:,} tokens of `wikitext2/eval.jsonl` "
         "(2048-token windows), text no cell trained or calibrated on.",
         "- Wall time and tokens/s: training only (teacher forward + student forward/backward), on the shared "
         "2-core CPU machine, while other jobs ran; evaluation time is not included.", ""]
    for model in dict.fromkeys(r["model"] for r in rows):
        L += [f"## {model}", "",
              "| method | mode | tokens | rows/task | avg % | dense avg % (same rows) | skill retained "
              "| Δ avg vs dense (pts, ± SE) | ppl | ppl / dense | train time | tok/s |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in (r for r in rows if r["model"] == model):
            dense = r["method"] == "dense"
            mode = r["mode"] if r["tokens"] else "-"
            train = _mins(r["train_s"]) if r["tokens"] else "-"
            if r["avg"] is None:
                L.append(f"| {r['method']} | {mode} | {r['tokens']:,} | - (perplexity only) | - | - | - | - "
                         f"| {r['ppl']:.1f} | {r['ppl_ratio']:.2f}x | {train} | {r['tok_s'] or '-'} |")
                continue
            skill = "100%" if dense else f"{100 * r['skill']:.0f}%"
            diff = "-" if dense else f"{100 * r['diff']:+.1f} ± {100 * r['diff_se']:.1f}"
            L.append(f"| {r['method']} | {mode} | {r['tokens']:,} | {r['limit']} | {100 * r['avg']:.1f} "
                     f"| {100 * r['dense_avg_same']:.1f} | {skill} | {diff} "
                     f"| {r['ppl']:.1f} | {r['ppl_ratio']:.2f}x | {train} | {r['tok_s'] or '-'} |")
        L += ["", "Per task (headline metric, %):", "",
              "| method | mode | tokens | " + " | ".join(DIET_TASKS) + " |",
              "|---|---|---|" + "---|" * len(DIET_TASKS)]
        for r in (r for r in rows if r["model"] == model and r["tasks"]):
            mode = r["mode"] if r["tokens"] else "-"
            L.append(f"| {r['method']} | {mode} | {r['tokens']:,} | "
                     + " | ".join(f"{100 * r['tasks'][t]:.1f}" for t in DIET_TASKS) + " |")
        L.append("")
    if state.get("choice"):
        L += ["## Default mode", "", state["choice"], ""]
    if state.get("missing"):
        L += ["## Not measured", "", "Cells of the plan without results: " + ", ".join(f"`{k}`" for k in
                                                                                    state["missing"]) + ".", ""]
    if state.get("notes"):
        L += ["## Notes", ""] + [f"- {n}" for n in state["notes"]] + [""]
    L += ["## Commands", ""] + [f"    {c}" for c in cfg.get("commands", [])] + [""]
    return "\n".join(L)


def _mins(s: float) -> str:
    return f"{s / 60:.1f} min"


def plot(state: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in state["rows"] if r["method"] != "dense"]
    if not rows:
        return
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 4))
    for (model, method, mode), grp in _groups(rows).items():
        pts = sorted(grp, key=lambda r: r["tokens"])
        xs = [max(r["tokens"], 1e3) for r in pts]
        label = f"{model} {method} {mode}"
        a1.plot(xs, [r["ppl_ratio"] for r in pts], "o-", label=label)
        sk = [r for r in pts if r["skill"] is not None]
        a2.errorbar([max(r["tokens"], 1e3) for r in sk], [100 * r["skill"] for r in sk], fmt="o-", label=label,
                    yerr=[100 * r["diff_se"] / max(1e-9, _dense_gap(state, model)) for r in sk])
    a1.axhline(1.5, ls="--", c="grey", lw=1)
    a2.axhline(90, ls="--", c="grey", lw=1)
    for a, yl in ((a1, "perplexity / dense"), (a2, "skill retained %")):
        a.set_xscale("log")
        a.set_xlabel("healing tokens (0 plotted at 1k)")
        a.set_ylabel(yl)
        a.grid(alpha=0.3)
    a1.set_yscale("log")
    from matplotlib.ticker import FormatStrFormatter

    a1.yaxis.set_major_formatter(FormatStrFormatter("%.1f"))
    a1.yaxis.set_minor_formatter(FormatStrFormatter("%.1f"))
    a2.legend(fontsize=7)
    fig.suptitle("Healing by distillation (goal: dashed lines)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _groups(rows):
    out: dict = {}
    for r in rows:
        modes = {r["mode"]} if r["tokens"] else {x["mode"] for x in rows if x["model"] == r["model"]
                                                 and x["method"] == r["method"] and x["tokens"]} or {"none"}
        for m in modes:
            out.setdefault((r["model"], r["method"], m), []).append(r)
    return {k: v for k, v in out.items() if len(v) > 1 or k[2] != "none"}


def _dense_gap(state, model) -> float:
    avg_chance = statistics.fmean(chance(t) for t in DIET_TASKS)
    for r in state["rows"]:
        if r["model"] == model and r["method"] == "dense":
            return r["avg"] - avg_chance
    return 1.0


def finish(cfg, cells, out: Path, doc: Path, plot_path: Path, notes) -> None:
    todo = [k for k in plan(cfg, cells) if k not in cells]
    mode = best_mode(cells, cfg["models"][0], cfg["methods"][0], cfg["sparsity"], cfg["modes"], cfg["mode_budget"])
    choice = None
    if mode:
        first = (cfg["models"][0], cfg["methods"][0], cfg["sparsity"])
        ppls = ", ".join(f"{m} {cells[cell_key(*first, m, cfg['mode_budget'])]['ppl']:.1f}" for m in cfg["modes"]
                         if cell_key(*first, m, cfg["mode_budget"]) in cells)
        choice = (f"At {cfg['mode_budget']:,} tokens on {cfg['models'][0]} the WikiText-2 eval perplexities were "
                  f"{ppls}: the longer budgets use **{mode}**, the lower of full and LoRA (perplexity decides: "
                  "the tasks' evaluation costs as much CPU as the healing, so LoRA and norms cells at this budget "
                  "measure perplexity only). `dietprune heal` defaults to full fine-tuning.")
    keep = ("models", "methods", "sparsity", "budgets", "modes", "mode_budget", "limit", "dense_limit", "ppl_tokens",
            "seq_len", "batch_size", "bf16", "commands")
    state = {"schema": SCHEMA, "setup": {k: cfg[k] for k in keep},
             "rows": derive(cells), "missing": todo, "choice": choice, "notes": notes,
             "cells": sorted(cells)}
    write_json_atomic(out, state)
    doc.write_text(render(state))
    plot(state, plot_path)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default=DEFAULTS["models"])
    ap.add_argument("--methods", default=DEFAULTS["methods"])
    ap.add_argument("--budgets", default=DEFAULTS["budgets"])
    ap.add_argument("--minutes", type=float, default=DEFAULTS["minutes"], help="healing minutes per invocation")
    ap.add_argument("--limit", type=int, default=DEFAULTS["limit"])
    ap.add_argument("--data-dir", default=os.environ.get("DIETPRUNE_DATA_DIR"))
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (default 1: on the shared, overloaded 2-core box a second thread mostly waits)")
    ap.add_argument("--turn-start-minutes", type=float, default=6.0,
                    help="start another unit in the same turn only if the turn is younger than this")
    ap.add_argument("--render-only", action="store_true")
    ap.add_argument("--note", action="append", default=[], help="a line for the Notes section (kept in the JSON)")
    args = ap.parse_args(argv)
    cfg = dict(DEFAULTS, models=args.models.split(","), methods=args.methods.split(","), limit=args.limit,
               budgets=[int(b) for b in args.budgets.split(",")], modes=DEFAULTS["modes"].split(","),
               minutes=args.minutes)
    out, doc, plot_path = ROOT / cfg["out"], ROOT / cfg["doc"], ROOT / cfg["plot"]
    prev = json.loads(out.read_text()) if out.is_file() else {}
    cmd = "DIETPRUNE_DATA_DIR=../shared/benchdata python bench/heal.py " + " ".join(
        shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]) if not a.startswith("--note"))
    commands = list(prev.get("setup", {}).get("commands", []))
    if not args.render_only and cmd.strip() not in commands:
        commands.append(cmd.strip())
    cfg["commands"] = commands
    notes = list(dict.fromkeys(prev.get("notes", []) + args.note))
    settings = settings_of(cfg)
    cells_dir = ROOT / cfg["cells_dir"]
    cells = load_cells(cells_dir, settings)
    if args.render_only:
        finish(cfg, cells, out, doc, plot_path, notes)
        print(f"rendered {doc}")
        return 0
    import torch

    torch.set_num_threads(args.threads)
    todo = [k for k in plan(cfg, cells) if k not in cells]
    if not todo:
        finish(cfg, cells, out, doc, plot_path, notes)
        print("plan done", flush=True)
        return 0
    t_turn, models = time.perf_counter(), {}
    while todo:
        key = todo[0]
        print(f"[{len(cells)} done, {len(todo)} to do] {key}", flush=True)
        t0 = time.perf_counter()
        cell = run_unit(key, cfg, settings, args.data_dir, models)
        if cell is not None:
            cell["seconds_unit"] = round(time.perf_counter() - t0, 1)
            cell["finished"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
            write_json_atomic(cell_file(cells_dir, key), cell)
            cells[key] = cell
            avg = f"avg {100 * cell['avg']:.1f}  " if "avg" in cell else ""
            print(f"  {avg}ppl {cell['ppl']:.1f}  ({cell['seconds_eval']:.0f}s eval)", flush=True)
        finish(cfg, cells, out, doc, plot_path, notes)
        todo = [k for k in plan(cfg, cells) if k not in cells]
        # another unit in this turn only when the turn is still short (the lock is shared)
        if cell is None or time.perf_counter() - t_turn > 60 * args.turn_start_minutes:
            break
    return MORE_TODO if todo else 0


if __name__ == "__main__":
    sys.exit(main())
