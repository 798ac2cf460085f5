"""Compare results files: one table (tasks as columns) and an optional bar plot."""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import DietpruneError
from .results import load_results

PPL_KEY = "word_perplexity"


def _label(path, data: dict) -> str:
    if {"model", "label", "sparsity", "seed", "settings"} <= set(data):  # a bench/structured.py cell
        sp = data["sparsity"]
        return " ".join([str(data["model"]), str(data["label"])] + ([f"{100 * sp:g}%"] if sp else [])
                        + [f"seed {data['seed']}"] + ([str(data["variant"])] if data.get("variant") else []))
    model = str(data.get("meta", {}).get("model") or "")
    stem = Path(path).stem
    return stem if not model or Path(model).name in stem else f"{stem} ({Path(model).name})"


def _value(metrics: dict, metric: str):
    if metric == "acc_norm" and metrics.get("acc_norm") is not None:
        return "acc_norm", metrics["acc_norm"]
    if metrics.get("acc") is not None:
        return "acc", metrics["acc"]
    return None, None


def build_comparison(paths: list, metric: str = "acc_norm") -> dict:
    """Rows of {label, values: {task: value}, average, ppl} plus the task columns and metric names."""
    if metric not in ("acc", "acc_norm"):
        raise DietpruneError(f"metric must be acc or acc_norm, got {metric}")
    if not paths:
        raise DietpruneError("give at least one results file")
    files = [(p, load_results(p)) for p in paths]
    columns: list[str] = []
    used: dict[str, str] = {}
    has_ppl = False
    for _, data in files:
        for task, m in data["tasks"].items():
            key, val = _value(m, metric)
            if val is not None and task not in columns:
                columns.append(task)
                used[task] = key
            has_ppl = has_ppl or m.get(PPL_KEY) is not None
    rows = []
    for p, data in files:
        values = {t: _value(data["tasks"][t], metric)[1] for t in columns if t in data["tasks"]}
        complete = len(values) == len(columns) and columns
        ppl = data["tasks"].get("wikitext2", {}).get(PPL_KEY)
        rows.append({"label": _label(p, data), "values": values,
                     "average": sum(values.values()) / len(values) if complete else None,
                     "ppl": ppl, "limit": data.get("meta", {}).get("limit")})
    return {"columns": columns, "metrics": used, "rows": rows, "has_ppl": has_ppl}


def format_comparison(cmp: dict) -> str:
    cols = cmp["columns"]
    head = ["model"] + [f"{t}{'*' if cmp['metrics'][t] == 'acc_norm' else ''}" for t in cols] + ["average"]
    if cmp["has_ppl"]:
        head.append("wikitext2 ppl")
    base = cmp["rows"][0]
    table = []
    for i, row in enumerate(cmp["rows"]):
        cells = [row["label"]]
        for t in cols + ["average"]:
            v = row["average"] if t == "average" else row["values"].get(t)
            b = base["average"] if t == "average" else base["values"].get(t)
            if v is None:
                cells.append("-")
            elif i == 0 or b is None:
                cells.append(f"{100 * v:.1f}")
            else:
                cells.append(f"{100 * v:.1f} ({100 * (v - b):+.1f})")
        if cmp["has_ppl"]:
            v, b = row["ppl"], base["ppl"]
            cells.append("-" if v is None else f"{v:.2f}" if i == 0 or b is None else f"{v:.2f} ({v - b:+.2f})")
        table.append(cells)
    widths = [max(len(r[j]) for r in [head] + table) for j in range(len(head))]
    fmt = lambda r: "  ".join(c.ljust(w) if j == 0 else c.rjust(w) for j, (c, w) in enumerate(zip(r, widths)))  # noqa: E731
    lines = [fmt(head), fmt(["-" * w for w in widths])] + [fmt(r) for r in table]
    notes = ["accuracy in %, deltas against the first file"]
    if any(m == "acc_norm" for m in cmp["metrics"].values()):
        notes.append("* = acc_norm (length-normalised), others acc")
    if cmp["has_ppl"]:
        notes.append("wikitext2 ppl = word perplexity (lower is better), not in the average")
    limits = {r["limit"] for r in cmp["rows"]}
    if len(limits) > 1:
        notes.append(f"WARNING: the files used different --limit values {sorted(limits, key=str)}")
    if any(r["average"] is None for r in cmp["rows"]):
        notes.append("average left out where a file lacks a task")
    return "\n".join(lines + [""] + notes)


PLOT_FORMATS = ("png", "pdf", "svg", "jpg", "jpeg")


def plot_path(path) -> Path:
    """The file the plot is written to: ``.png`` appended to a name without a suffix (as matplotlib
    does), so the path printed is the path written; checked writable before any work."""
    from ..outputs import check_output_file, is_image_file

    out = check_output_file(path, "plot")
    if not out.suffix:
        out = out.with_name(out.name + ".png")
    elif out.suffix[1:].lower() not in PLOT_FORMATS:
        raise DietpruneError(f"plot {out}: unknown image type '{out.suffix}'; use {', '.join(PLOT_FORMATS)}")
    return check_output_file(out, "plot", replaceable=is_image_file)


def plot_comparison(cmp: dict, path: str | os.PathLike) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = plot_path(path)
    cols = cmp["columns"] + ["average"]
    rows = cmp["rows"]
    with_ppl = cmp["has_ppl"] and any(r["ppl"] is not None for r in rows)
    fig, axes = plt.subplots(1, 2 if with_ppl else 1, figsize=(max(7.0, 1.2 * len(cols) + 2.5) + (3 if with_ppl else 0),
                             4.6), gridspec_kw={"width_ratios": [len(cols), 2]} if with_ppl else None, squeeze=False)
    ax = axes[0][0]
    width = 0.8 / len(rows)
    for i, row in enumerate(rows):
        vals = [row["average"] if c == "average" else row["values"].get(c) for c in cols]
        xs = [j + (i - (len(rows) - 1) / 2) * width for j in range(len(cols))]
        ax.bar([x for x, v in zip(xs, vals) if v is not None], [100 * v for v in vals if v is not None],
               width=width, label=row["label"])
    ax.set_xticks(range(len(cols)))
    ax.set_xticklabels([c + ("*" if cmp["metrics"].get(c) == "acc_norm" else "") for c in cols], rotation=30,
                       ha="right")
    ax.set_ylabel("accuracy (%)")
    ax.set_title("zero-shot accuracy (* = acc_norm)")
    ax.grid(axis="y", alpha=0.3)
    top = max([100 * v for r in rows for v in list(r["values"].values()) + [r["average"]] if v is not None] or [1])
    ax.set_ylim(0, min(100, top * 1.2) if top <= 100 else top * 1.2)
    ax.legend(fontsize=8, loc="upper right", ncol=min(len(rows), 3))
    if with_ppl:
        ax2 = axes[0][1]
        ax2.bar(range(len(rows)), [r["ppl"] or 0 for r in rows], color=[f"C{i}" for i in range(len(rows))])
        ax2.set_xticks(range(len(rows)))
        ax2.set_xticklabels([str(i + 1) for i in range(len(rows))])
        ax2.set_xlabel("file (legend order)")
        ax2.set_title("wikitext2 word ppl (lower is better)")
        ax2.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


# ---- paired statistics against the first file ------------------------------------------------------

NEEDS_RECORDS = ("paired statistics need per-example records; {what} has none. `dietprune eval` stores them "
                 "by default (rerun it on older files, without --no-log-samples; structured-study cells: "
                 "python bench/paired_records.py)")


def build_paired(paths: list, metric: str = "acc_norm", n_boot: int = 2000, seed: int = 0) -> dict:
    """Each file after the first against the first (the reference), on the same examples.

    ``{"reference": label, "skill": [...], "comparisons": [{label, paired or None, note}]}``;
    ``skill`` (skill retained from the aggregate accuracies) is there even without records.
    """
    from .paired import aggregate_skill, paired_tasks, results_columns

    if len(paths) < 2:
        raise DietpruneError("give a reference results file and at least one to compare with it")
    files = [(p, load_results(p)) for p in paths]
    ref_path, ref = files[0]
    ref_cols = results_columns(ref, metric)
    ref_scores = {t: _value(m, metric)[1] for t, m in ref["tasks"].items()}
    out = {"reference": _label(ref_path, ref), "metric": metric, "comparisons": []}
    for p, data in files[1:]:
        scores = {t: _value(m, metric)[1] for t, m in data["tasks"].items()}
        item = {"label": _label(p, data), "skill": aggregate_skill(scores, ref_scores), "paired": None, "note": None}
        cols = results_columns(data, metric)
        if not ref_cols:
            item["note"] = NEEDS_RECORDS.format(what=f"the reference {ref_path}")
        elif not cols:
            item["note"] = NEEDS_RECORDS.format(what=str(p))
        else:
            item["paired"] = paired_tasks(ref_cols, cols, n_boot=n_boot, seed=seed)
            missing = sorted(set(ref_cols) ^ set(cols))
            if missing:
                item["note"] = f"tasks with records in only one file, left out: {', '.join(missing)}"
        out["comparisons"].append(item)
    return out


def _pts(x, signed=True, digits=1):
    return "-" if x is None else (f"{100 * x:+.{digits}f}" if signed else f"{100 * x:.{digits}f}")


def _p(p):
    return "-" if p is None else ("<0.001" if p < 0.001 else f"{p:.3f}")


def format_paired(res: dict) -> str:
    """One table per compared file: task rows, then the average."""
    blocks = []
    for item in res["comparisons"]:
        lines = [f"paired: {item['label']} vs {res['reference']} (reference)"]
        pr = item["paired"]
        if pr is None:
            sk = item["skill"]["average"]
            lines.append(f"  skill retained (from the aggregate accuracies, {item['skill']['n_tasks']} tasks): "
                         + ("-" if sk is None else f"{100 * sk:.1f}%"))
            lines.append(f"  {item['note']}")
            blocks.append("\n".join(lines))
            continue
        head = ["task", "metric", "n", "ref", "new", "diff ± SE", "95% CI", "McNemar b/c", "p", "agree",
                "Δ gold ll ± SE", "skill"]
        rows = []
        for name, st in list(pr["tasks"].items()) + ([("average", pr["average"])] if pr["average"] else []):
            dll = "-" if st["dll"] is None else (f"{st['dll']:+.3f}" + ("" if st["dll_se"] is None
                                                                        else f" ± {st['dll_se']:.3f}"))
            rows.append([name + ("†" if st.get("truncated") else ""), st.get("metric", ""), str(st["n"]),
                         _pts(st["ref_acc"], False), _pts(st["acc"], False),
                         f"{_pts(st['diff'])} ± {_pts(st['se'], False)}",
                         f"[{_pts(st['ci'][0])}, {_pts(st['ci'][1])}]",
                         f"{st['mcnemar']['b']}/{st['mcnemar']['c']}", _p(st["mcnemar"]["p"]),
                         _pts(st["agreement"], False) + "%", dll,
                         "-" if st["skill"] is None else f"{100 * st['skill']:.0f}%"])
        widths = [max(len(r[j]) for r in [head] + rows) for j in range(len(head))]
        fmt = lambda r: "  ".join(c.ljust(w) if j < 2 else c.rjust(w) for j, (c, w) in enumerate(zip(r, widths)))  # noqa: E731
        lines += [fmt(head), fmt(["-" * w for w in widths])] + [fmt(r) for r in rows]
        avg = pr["average"]
        if avg and avg.get("skill_ci"):
            lines.append(f"skill retained {100 * avg['skill']:.1f}% "
                         f"(95% CI {100 * avg['skill_ci'][0]:.1f}..{100 * avg['skill_ci'][1]:.1f}), "
                         f"chance {100 * avg['chance']:.1f}% on average")
        lines.append(f"accuracy in %; diff = new - ref on the same examples; CI: paired bootstrap, "
                     f"{pr['n_boot']} replicates, seed {pr['seed']}; McNemar b = only ref right, c = only new "
                     "right (exact two-sided p); agree = same prediction; Δ gold ll = mean change of the gold "
                     "answer's log-likelihood (nats); skill = (acc - chance) / (ref - chance); average row: mean "
                     "over tasks, McNemar on pooled counts")
        if any(st.get("truncated") for st in pr["tasks"].values()):
            lines.append("† the files hold different numbers of examples: the first n of each are compared")
        if item["note"]:
            lines.append(item["note"])
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks)
