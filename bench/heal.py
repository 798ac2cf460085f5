"""Healing study: how much of what the cut lost does distillation from the dense model win back?

    DIETPRUNE_DATA_DIR=../shared/benchdata python bench/heal.py            # one turn of work, then exit
    python bench/heal.py --render-only                                    # JSON, docs/heal.md, plot

A cell is (model, method, sparsity, mode, tokens): the model is pruned once with
``dietprune.prune`` at the structured study's default recipe (cached outside the repository),
healed with ``dietprune.heal`` on the seven tasks' calibration rows plus WikiText-2's calibration
rows, then evaluated exactly like a study cell (seven tasks, first ``--limit`` eval rows each)
plus token perplexity on ``wikitext2/eval.jsonl`` (never trained on; the study's perplexity
reads the whole test split, which contains the calibration quarter, so it is not used here).

Budgets of one (model, method, mode) are one run: the learning rate is constant after warmup
and the data order does not depend on the budget, so the 100k cell continues the 30k cell's
saved state and equals a straight 100k run; the healed model of every budget reached on the way
is saved (outside the repository) and evaluated in its own unit. The largest budget is planned
first. Each invocation works for at most ``--minutes`` (a heal that runs out saves its state and
the next invocation resumes it; an evaluation starts only with ``--eval-minutes`` left), so the
study runs in short turns under the shared CPU slots:

    while true; do /work/wt/bin/heavy python bench/heal.py; [ $? -eq 10 ] || break; sleep 30; done

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
DEFAULTS = dict(models="smollm2-135m", methods="diet-width,diet", sparsity=0.2, budgets="0,30000,100000",
                mode_budget=10000, modes="full", limit=200, dense_limit=200, ppl_tokens=16384,
                seq_len=256,
                batch_size=4, minutes=24.0, eval_minutes=16.0, bf16=True, cells_dir="bench/results/heal/cells",
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


EVAL_KEYS = ("tasks", "ppl_tokens")  # what an unhealed cell's reuse depends on


def load_cells(cells_dir: Path, settings: dict) -> dict:
    """Cached cells whose settings match (unhealed cells: the evaluation settings only)."""
    cells = {}
    for f in sorted(cells_dir.glob("*.json")) if cells_dir.is_dir() else []:
        c = json.loads(f.read_text())
        got = {k: v for k, v in c.get("settings", {}).items() if k != "limit"}
        want = settings if c.get("tokens") else {k: settings[k] for k in EVAL_KEYS}
        if (got if c.get("tokens") else {k: got.get(k) for k in EVAL_KEYS}) == want:
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
    modes = [m for m in modes if m in COMPARED] or list(modes)
    if len(modes) == 1:
        return modes[0]
    got = [cells.get(cell_key(model, method, sp, m, budget)) for m in modes]
    if any(c is None for c in got):
        return None
    return min(zip(modes, got), key=lambda mc: mc[1]["ppl"])[0]


def plan(cfg: dict, cells: dict) -> list[str]:
    """Every cell of the study in priority order (finished ones included).

    Per model: dense, the unhealed cut of every method, then (with several modes) the mode
    comparison at ``mode_budget`` on the first method, then the healed cells from the largest
    budget down, method by method within a budget (the largest budget answers the study's
    question; the smaller ones are checkpoints on the way to it, saved while healing)."""
    keys = []
    sp = cfg["sparsity"]
    for model in cfg["models"]:
        keys.append(cell_key(model, "dense", 0.0, "none", 0))
        unhealed = [cell_key(model, method, sp, "none", 0) for method in cfg["methods"]]
        keys += [k for k in unhealed if k in cells]  # imported from the structured study (main does it first)
        several = len([m for m in cfg["modes"] if m in COMPARED]) > 1
        if several and model == cfg["models"][0]:
            keys += [cell_key(model, cfg["methods"][0], sp, m, cfg["mode_budget"]) for m in cfg["modes"]
                     if m in COMPARED]
        mode = best_mode(cells, cfg["models"][0], cfg["methods"][0], sp, cfg["modes"], cfg["mode_budget"])
        if mode is None:
            continue
        for b in sorted((b for b in cfg["budgets"] if b), reverse=True):
            keys += [cell_key(model, method, sp, mode, b) for method in cfg["methods"]]
        if several and model == cfg["models"][0]:
            keys += [cell_key(model, cfg["methods"][0], sp, m, cfg["mode_budget"]) for m in cfg["modes"]]
        keys += unhealed  # the ones the structured study has no per-example records of: evaluated last
    return list(dict.fromkeys(keys))


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
        from dietprune.models import load

        import torch

        with torch.no_grad():  # checks the prune against the structured study's cell of the same recipe
            ppl = eval_ppl(load(str(folder)).model, lm.tokenizer, data_dir, DEFAULTS["ppl_tokens"])
        write_json_atomic(folder / "bench_ppl.json", {"ppl_eval": ppl})
        print(f"  its wikitext2/eval.jsonl perplexity: {ppl:.2f}", flush=True)
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


STRUCTURED_CELLS = ROOT / "bench" / "results" / "structured" / "cells"


def structured_cell(model, method, sp, settings, ppl: float | None = None) -> dict | None:
    """The unhealed (or dense) cell from the structured study, when it holds per-example records and the
    held-out perplexity at the same settings (the same prune recipe, evaluation rows and perplexity text).

    `ppl`: the held-out perplexity measured here on the same model (the dense one, or this study's prune of
    the same recipe), for a cell that has the records but not that perplexity."""
    from dietprune.evaluate.paired import columns

    f = STRUCTURED_CELLS / f"{model}__{method}__{sp:.2f}__0__default.json"
    if not f.is_file():
        return None
    c = json.loads(f.read_text())
    st = c.get("settings", {})
    if c.get("ppl_eval") is None and ppl is not None:
        c["ppl_eval"] = ppl
    if (not c.get("records") or c.get("ppl_eval") is None or st.get("tasks") != settings["tasks"]
            or st.get("ppl_tokens") != settings["ppl_tokens"] or (method != "dense" and st.get("samples") != 100)):
        return None
    tasks, hits = {}, {}
    for t in DIET_TASKS:
        m = c["tasks"][t]
        tasks[t] = {"metric": m["metric"], "score": m["score"], "stderr": m.get("score_stderr"), "n": m["n"]}
        hits[t] = [int(x) for x in columns(c["records"][t], m["metric"])["correct"]]
    return {"tasks": tasks, "hits": hits, "avg": c["avg"], "ppl": c["ppl_eval"], "limit": st["limit"],
            "seconds_eval": c["seconds"]["eval"], "seconds_ppl": c["seconds"].get("ppl_eval"),
            "param_reduction": c["summary"]["param_reduction"], "prune_config": c.get("config"),
            "source": str(f.relative_to(ROOT))}


def same_mask(folder: Path, model, method, sp) -> bool:
    """Whether this study's prune keeps the hidden dimensions the structured cell recorded (True when
    either side records none, e.g. methods that keep the hidden size)."""
    from safetensors.torch import load_file

    c = json.loads((STRUCTURED_CELLS / f"{model}__{method}__{sp:.2f}__0__default.json").read_text())
    f = folder / "dietprune_mask.safetensors"
    if "kept" not in c or not f.is_file():
        return True
    kept = load_file(str(f)).get("kept")
    return kept is None or kept.tolist() == c["kept"]


def chain_name(model, method, sp, mode) -> str:
    return f"{model}__{method}__{sp:.2f}__{mode}"


def healed_folder(key: str) -> Path:
    return CACHE / "healed" / key.replace("|", "__")


def heal_to(key: str, cfg: dict, data_dir, lm, folder: Path, minutes: float) -> bool:
    """Heal the chain of `key` towards its budget, saving a checkpoint at every budget reached on the way.

    Returns True when the checkpoint of `key` exists (its budget is reached), False when the minutes ran out
    (the state is saved; the next turn resumes it)."""
    from dietprune.heal import heal
    from dietprune.pipeline import save_checkpoint

    model, method, sp, mode, tokens = key.split("|")
    sp, tokens = float(sp), int(tokens)
    state = CACHE / "state" / chain_name(model, method, sp, mode)
    t_end = time.perf_counter() + 60 * minutes
    for b in sorted(x for x in cfg["budgets"] if 0 < x <= tokens):
        k = cell_key(model, method, sp, mode, b)
        if (healed_folder(k) / "heal_info.json").is_file():
            continue
        left = (t_end - time.perf_counter()) / 60
        if left < 0.5:
            return False
        res = heal(str(folder), lm, tasks=DIET_TASKS, general=("wikitext2",), tokens=b, mode=mode,
                   seq_len=cfg["seq_len"], batch_size=cfg["batch_size"], seed=0, data_dir=data_dir,
                   state_dir=state, resume=True, keep_state=True, minutes=left,
                   checkpoint_every=25, bf16=cfg["bf16"], progress=False)
        s = res.summary
        if s["stopped"] != "done":
            print(f"  healed {chain_name(model, method, sp, mode)} to {s['tokens_trained']:,} of {b:,} tokens "
                  f"({s['tokens_per_second']} tok/s this call); state saved, resumes next turn", flush=True)
            return False
        info = {k2: s[k2] for k2 in ("tokens_trained", "steps", "seconds_train_total", "tokens_per_second",
                                     "loss_first", "loss_last")}
        info["config"] = res.config.recipe()
        info["loss_curve"] = [(h["tokens"], h["loss"]) for h in res.history[:: max(1, len(res.history) // 40)]]
        # tokens/s over the whole chain (several turns and budgets): tokens over summed training seconds
        info["tokens_per_second_chain"] = round(s["tokens_trained"] / max(s["seconds_train_total"], 1e-9), 1)
        meta = json.loads((folder / "dietprune.json").read_text())
        out = healed_folder(k)
        out.parent.mkdir(parents=True, exist_ok=True)
        save_checkpoint(res.model, res.tokenizer, out, meta, {}, overwrite=True)
        write_json_atomic(out / "heal_info.json", info)
        print(f"  healed {k}: {s['tokens_trained']:,} tokens, {s['seconds_train_total']:.0f}s in all, "
              f"{info['tokens_per_second_chain']} tok/s, loss {s['loss_first']} -> {s['loss_last']}", flush=True)
        del res
        gc.collect()
    return True


def run_unit(key: str, cfg: dict, settings: dict, data_dir, models: dict, minutes_left: float) -> dict | None:
    """Compute the cell `key`; or heal towards it for at most `minutes_left` and return None (resumed next time).

    An evaluation is only started with at least ``eval_minutes`` left in the turn."""
    from dietprune.models import load

    model, method, sp, mode, tokens = key.split("|")
    sp, tokens = float(sp), int(tokens)
    limit = cfg["dense_limit"] if method == "dense" else cfg["limit"]
    # the other modes at the comparison budget: perplexity only (the tasks cost as much CPU as the healing)
    ppl_only = tokens == cfg["mode_budget"] and mode != "full"
    cell = {"key": key, "model": model, "method": method, "sparsity": sp, "mode": mode, "tokens": tokens,
            "settings": dict(settings, limit=limit)}
    if tokens == 0:
        got = structured_cell(model, method, sp, settings)
        if got is None and minutes_left > 0 and structured_cell(model, method, sp, settings, ppl=0.0) is not None:
            # records without the held-out perplexity: measure only that, on the dense model or on this
            # study's own prune of the same recipe (the structured study's cells reproduce exactly)
            if model not in models:
                models[model] = load(model)
            if method == "dense":
                import torch

                with torch.no_grad():
                    ppl = float(eval_ppl(models[model].model, models[model].tokenizer, data_dir,
                                         settings["ppl_tokens"]))
            else:
                folder = pruned_checkpoint(models[model], model, method, sp, data_dir)
                ppl = json.loads((folder / "bench_ppl.json").read_text())["ppl_eval"]
                if not same_mask(folder, model, method, sp):
                    ppl = None  # not the structured cell's model: evaluated here in full below
            got = structured_cell(model, method, sp, settings, ppl=ppl) if ppl is not None else None
            if got is not None:
                got["ppl_source"] = "measured here (the structured cell has records but no held-out perplexity)"
        if got is not None and got["limit"] == limit:
            cell.update({k: v for k, v in got.items() if k != "limit"})
            cell["params"] = None
            cell["heal"] = None
            print(f"  from {got['source']} (the structured study's cell, same recipe and rows)", flush=True)
            return cell
    if model not in models:
        models[model] = load(model)
    lm = models[model]
    if method == "dense":
        if minutes_left < cfg["eval_minutes"]:
            return None
        cell.update(evaluate_cell(lm.model, lm.tokenizer, settings, data_dir, limit))
        cell["params"] = sum(p.numel() for p in lm.model.parameters())
        return cell
    folder = pruned_checkpoint(lm, model, method, sp, data_dir)
    heal_info = None
    if tokens == 0:
        src = folder
    else:
        t0 = time.perf_counter()
        if not heal_to(key, cfg, data_dir, lm, folder, minutes_left):
            return None
        minutes_left -= (time.perf_counter() - t0) / 60
        src = healed_folder(key)
        heal_info = json.loads((src / "heal_info.json").read_text())
    if minutes_left < (1 if ppl_only else cfg["eval_minutes"]):
        print(f"  {key}: {minutes_left:.0f} min left in this turn, evaluation next turn", flush=True)
        return None
    student = load(str(src))
    net, tok = student.model, student.tokenizer
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
    del net, student
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
        cut = cells.get(cell_key(c["model"], c["method"], c["sparsity"], "none", 0))
        d0, se0 = paired(c, cut) if tasks and c["tokens"] and cut and "hits" in cut else (None, None)
        h = c.get("heal") or {}
        rows.append({"model": c["model"], "method": c["method"], "mode": c["mode"], "tokens": c["tokens"],
                     "avg": c.get("avg"), "limit": c["settings"]["limit"],
                     "dense_avg_same": avg_on(dense, common_n(c, dense)) if tasks else None,
                     "skill": skill_retained(avg_chance, c, dense) if tasks else None, "diff": d, "diff_se": se,
                     "ppl": c["ppl"], "ppl_ratio": c["ppl"] / dense["ppl"],
                     "train_s": h.get("seconds_train_total", 0.0), "tok_s": h.get("tokens_per_second_chain"),
                     "param_reduction": c.get("param_reduction", 0.0),
                     "diff_unhealed": d0, "diff_unhealed_se": se0,
                     "tasks": {t: c["tasks"][t]["score"] for t in DIET_TASKS} if tasks else None})
    order = {"dense": 0}
    rows.sort(key=lambda r: (r["model"], order.get(r["method"], 1), r["method"], r["tokens"], r["mode"]))
    return rows


def render(state: dict) -> str:
    rows, cfg = state["rows"], state["setup"]
    L = ["# Healing: distillation from the dense model", "",
         "Generated by `bench/heal.py` from `bench/results/heal.json`; do not edit by hand.", "",
         "- Student: the model pruned by `dietprune prune` with the structured study's default recipe "
         f"({', '.join(cfg['methods'])}; sparsity {cfg['sparsity']:.2f}: `diet` removes about that share of the "
         "parameters by the hidden dimension alone (20.3% in these cells), `diet-width` that share of the parameters "
         "split by task votes over MLP channels, heads and the hidden dimension; 100 calibration samples per task, seed 0, default repair).",
         "- Healing: `dietprune.heal`, KL divergence from the dense model's next-token distribution on every "
         f"token (T = 1), sequences of {cfg['seq_len']} tokens, {cfg['batch_size']} per step, AdamW, constant "
         "learning rate after 5 warmup steps (default per mode: full 1e-4, LoRA rank 16 1e-3, norms 1e-2), "
         "bfloat16 autocast of the decoder bodies (heads and KL in float32; ~1.6x faster here); text = the seven "
         "tasks' calibration rows (query + gold answer) and WikiText-2's calibration rows, packed in a seeded "
         "order. The budgets of one mode are one run (each budget continues the previous one's state).",
         f"- Evaluation: the seven tasks' first {cfg['limit']} eval rows each ({cfg['dense_limit']} for dense; "
         "rte has 177), headline metric (acc_norm where defined, else acc). Unhealed cuts whose structured-study "
         "cell (`bench/results/structured/cells/`, same prune recipe, rows and perplexity text) holds per-example "
         "records are taken from it instead of being re-evaluated. Skill retained = (avg - chance) / "
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
              "| Δ avg vs dense (pts, ± SE) | Δ avg vs unhealed (pts, ± SE) | ppl | ppl / dense | train time | tok/s |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in (r for r in rows if r["model"] == model):
            dense = r["method"] == "dense"
            mode = r["mode"] if r["tokens"] else "-"
            train = _mins(r["train_s"]) if r["tokens"] else "-"
            if r["avg"] is None:
                L.append(f"| {r['method']} | {mode} | {r['tokens']:,} | - (perplexity only) | - | - | - | - | - "
                         f"| {r['ppl']:.1f} | {r['ppl_ratio']:.2f}x | {train} | {r['tok_s'] or '-'} |")
                continue
            skill = "100%" if dense else f"{100 * r['skill']:.0f}%"
            diff = "-" if dense else f"{100 * r['diff']:+.1f} ± {100 * r['diff_se']:.1f}"
            d0 = "-" if r.get("diff_unhealed") is None else \
                f"{100 * r['diff_unhealed']:+.1f} ± {100 * r['diff_unhealed_se']:.1f}"
            L.append(f"| {r['method']} | {mode} | {r['tokens']:,} | {r['limit']} | {100 * r['avg']:.1f} "
                     f"| {100 * r['dense_avg_same']:.1f} | {skill} | {diff} | {d0} "
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
    if out.is_file():  # another invocation may have finished meanwhile: keep its commands and cells
        prev = json.loads(out.read_text())
        cfg = dict(cfg, commands=list(dict.fromkeys(prev.get("setup", {}).get("commands", []) + cfg["commands"])))
        cells = {**load_cells(ROOT / cfg["cells_dir"], settings_of(cfg)), **cells}
    todo = [k for k in plan(cfg, cells) if k not in cells]
    mode = best_mode(cells, cfg["models"][0], cfg["methods"][0], cfg["sparsity"], cfg["modes"], cfg["mode_budget"])
    choice = None
    if mode and len([m for m in cfg["modes"] if m in COMPARED]) > 1:
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
    ap.add_argument("--modes", default=DEFAULTS["modes"],
                    help="training modes (several: full and LoRA are compared at --mode-budget first)")
    ap.add_argument("--mode-budget", type=int, default=DEFAULTS["mode_budget"],
                    help="token budget of the mode comparison; a budget the first method's full chain has a saved "
                         "checkpoint of, or one it has not passed yet")
    ap.add_argument("--minutes", type=float, default=DEFAULTS["minutes"],
                    help="minutes of work per invocation (healing and evaluation; a heal stops and saves its state)")
    ap.add_argument("--eval-minutes", type=float, default=DEFAULTS["eval_minutes"],
                    help="start an evaluation only with this many minutes left in the invocation")
    ap.add_argument("--limit", type=int, default=DEFAULTS["limit"])
    ap.add_argument("--data-dir", default=os.environ.get("DIETPRUNE_DATA_DIR"))
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (default 1: on the shared, overloaded 2-core box a second thread mostly waits)")
    ap.add_argument("--render-only", action="store_true")
    ap.add_argument("--note", action="append", default=[], help="a line for the Notes section (kept in the JSON)")
    ap.add_argument("--replace-notes", action="store_true", help="drop the notes kept in the JSON (use with --note)")
    args = ap.parse_args(argv)
    cfg = dict(DEFAULTS, models=args.models.split(","), methods=args.methods.split(","), limit=args.limit,
               budgets=[int(b) for b in args.budgets.split(",")], modes=args.modes.split(","),
               minutes=args.minutes, eval_minutes=args.eval_minutes, mode_budget=args.mode_budget)
    if cfg["mode_budget"] not in cfg["budgets"] and len([m for m in cfg["modes"] if m in COMPARED]) > 1:
        cfg["budgets"] = sorted(set(cfg["budgets"]) | {cfg["mode_budget"]})  # a checkpoint on every mode's chain
    out, doc, plot_path = ROOT / cfg["out"], ROOT / cfg["doc"], ROOT / cfg["plot"]
    prev = json.loads(out.read_text()) if out.is_file() else {}
    cmd = "DIETPRUNE_DATA_DIR=../shared/benchdata python bench/heal.py " + " ".join(
        shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]) if not a.startswith("--note"))
    commands = list(prev.get("setup", {}).get("commands", []))
    if not args.render_only and cmd.strip() not in commands:
        commands.append(cmd.strip())
    cfg["commands"] = commands
    notes = list(dict.fromkeys(([] if args.replace_notes else prev.get("notes", [])) + args.note))
    settings = settings_of(cfg)
    cells_dir = ROOT / cfg["cells_dir"]
    cells = load_cells(cells_dir, settings)
    if args.render_only:
        finish(cfg, cells, out, doc, plot_path, notes)
        print(f"rendered {doc}")
        return 0
    import torch

    torch.set_num_threads(args.threads)
    for key in plan(cfg, cells):  # unhealed cuts the structured study evaluated: reused, not recomputed
        model, method, sp, mode, tokens = key.split("|")
        if key not in cells and method != "dense" and int(tokens) == 0 and structured_cell(
                model, method, float(sp), settings) is not None:
            got = run_unit(key, cfg, settings, args.data_dir, {}, 0.0)
            if got is not None:
                got["finished"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
                write_json_atomic(cell_file(cells_dir, key), got)
                cells[key] = got
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
        left = args.minutes - (t0 - t_turn) / 60
        cell = run_unit(key, cfg, settings, args.data_dir, models, left)
        if cell is not None:
            cell["seconds_unit"] = round(time.perf_counter() - t0, 1)
            cell["finished"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
            write_json_atomic(cell_file(cells_dir, key), cell)
            cells[key] = cell
            avg = f"avg {100 * cell['avg']:.1f}  " if "avg" in cell else ""
            print(f"  {avg}ppl {cell['ppl']:.1f}  ({cell['seconds_eval']:.0f}s eval)", flush=True)
        finish(cfg, cells, out, doc, plot_path, notes)
        todo = [k for k in plan(cfg, cells) if k not in cells]
        if cell is None:  # the turn's minutes are spent (a heal saved its state, or no time for an evaluation)
            break
    return MORE_TODO if todo else 0


if __name__ == "__main__":
    sys.exit(main())
