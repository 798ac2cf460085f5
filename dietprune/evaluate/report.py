"""``dietprune report``: one self-contained HTML page about a pruned model.

    dietprune report out/pruned dense.json pruned.json --output report.html

Inputs: at most one pruned checkpoint folder (its ``dietprune.json`` and
``dietprune_mask.safetensors``) and any number of results files (``dietprune eval`` JSON, or
structured-study cells); the first results file is the reference (the dense model) that the others
are compared with, on the same examples (:mod:`dietprune.evaluate.paired`).

The page: what was cut (hidden size, parameters, size on disk, every shape change, so a width split
shows; the per-task importance heat map and the vote histogram of the mask), per-task accuracy with
paired 95% intervals of each difference from the reference, perplexity, evaluation speed, and the
commands and package versions recorded in the inputs. Figures are matplotlib PNGs embedded as
base64 ``data:`` URIs, the CSS is inline and there is no script: nothing is fetched at view time.
"""

from __future__ import annotations

import base64
import html
import io
import json
import shlex
import time
from pathlib import Path

from .. import __version__
from ..errors import DietpruneError
from .compare import _label, _value, build_paired
from .paired import CHANCE, aggregate_skill
from .results import load_results

MASK_FILE = "dietprune_mask.safetensors"
META_FILE = "dietprune.json"
CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:2rem auto;max-width:1100px;
color:#1b1f24;padding:0 1rem;line-height:1.45}
h1{font-size:1.6rem;margin-bottom:.2rem}h2{border-bottom:1px solid #d0d7de;padding-bottom:.2rem;margin-top:2rem}
table{border-collapse:collapse;margin:.6rem 0;font-size:.88rem}th,td{border:1px solid #d0d7de;padding:.25rem .55rem}
th{background:#f6f8fa;text-align:left}td.n{text-align:right;font-variant-numeric:tabular-nums}
.muted{color:#57606a;font-size:.85rem}figure{margin:1rem 0}figure img{max-width:100%;height:auto;
border:1px solid #eaeef2}figcaption{color:#57606a;font-size:.85rem}
pre{background:#f6f8fa;padding:.6rem;white-space:pre-wrap;word-break:break-all;font-size:.82rem}.pos{color:#1a7f37}.neg{color:#cf222e}
"""


def _esc(x) -> str:
    return html.escape(str(x))


def _png(fig) -> str:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=96)
    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _figure(b64: str, caption: str, alt: str) -> str:
    return (f'<figure><img class="figure" alt="{_esc(alt)}" src="data:image/png;base64,{b64}">'
            f"<figcaption>{_esc(caption)}</figcaption></figure>")


def _table(head: list[str], rows: list[list], numeric_from: int = 1) -> str:
    h = "".join(f"<th>{_esc(c)}</th>" for c in head)
    body = "".join("<tr>" + "".join(f'<td{" class=n" if j >= numeric_from else ""}>{c}</td>'
                                    for j, c in enumerate(r)) + "</tr>" for r in rows)
    return f"<table><tr>{h}</tr>{body}</table>"


def _mb(n) -> str:
    return "–" if n is None else f"{n / 2**20:.1f} MiB"


def _pct(x, signed=False) -> str:
    return "–" if x is None else (f"{100 * x:+.1f}" if signed else f"{100 * x:.1f}")


# ---- inputs -------------------------------------------------------------------------------------

def read_checkpoint(folder: Path) -> dict:
    """dietprune.json, the mask tensors (if any) and the file sizes of a pruned folder."""
    meta_path = folder / META_FILE
    if not meta_path.is_file():
        raise DietpruneError(f"{folder} is not a dietprune output folder (no {META_FILE})")
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DietpruneError(f"{meta_path} is not valid JSON ({exc})") from exc
    tensors = {}
    if (folder / MASK_FILE).is_file():
        from safetensors.torch import load_file

        try:
            tensors = load_file(str(folder / MASK_FILE))
        except Exception as exc:  # noqa: BLE001 - a damaged file: say which
            raise DietpruneError(f"cannot read {folder / MASK_FILE}: {exc}") from exc
    files = {f.name: f.stat().st_size for f in folder.iterdir() if f.is_file()}
    weights = sum(v for k, v in files.items() if (k.endswith(".safetensors") or k.endswith(".bin")
                                                  or k.endswith(".gguf")) and k != MASK_FILE)
    return {"folder": folder, "meta": meta, "tensors": tensors, "total_bytes": sum(files.values()),
            "weight_bytes": weights}


def split_inputs(paths: list) -> tuple[Path | None, list[Path]]:
    folder, results = None, []
    for p in paths:
        q = Path(p).expanduser()
        if q.is_dir():
            if folder is not None:
                raise DietpruneError(f"give at most one pruned folder ({folder} and {q})")
            folder = q
        elif q.is_file():
            results.append(q)
        else:
            raise DietpruneError(f"not found: {q}")
    if folder is None and not results:
        raise DietpruneError("give a pruned output folder and/or results files")
    return folder, results


# ---- figures ------------------------------------------------------------------------------------

def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def importance_figure(scores, votes, kept, tasks) -> str:
    import torch

    from ..merge import normalize, order_by

    plt = _plt()
    norm = normalize(scores)
    order = order_by(votes.double(), norm.mean(0))
    logn = norm[:, order].clamp(min=1e-12).log2()
    lim = max(float(logn.abs().quantile(0.99)), 1e-6)
    fig, ax = plt.subplots(figsize=(10.5, 0.42 * len(tasks) + 1.6))
    im = ax.imshow(logn.numpy(), aspect="auto", interpolation="nearest", cmap="RdBu_r", vmin=-lim, vmax=lim)
    ax.set_yticks(range(len(tasks)), tasks)
    if kept is not None:
        ax.axvline(int(torch.as_tensor(kept).numel()) - 0.5, color="k", lw=1)
    ax.set_xlabel("hidden dimension, sorted by votes then mean normalised score (black line: kept | removed)")
    ax.set_title("importance per task: log2(score / task mean)")
    fig.colorbar(im, ax=ax, fraction=0.025)
    fig.tight_layout()
    return _png(fig)


def votes_figure(votes, kept, n_tasks: int) -> str:
    plt = _plt()
    keep = set(int(i) for i in kept.tolist()) if kept is not None else set()
    v = [int(x) for x in votes.tolist()]
    kept_c = [sum(1 for j, x in enumerate(v) if x == t and j in keep) for t in range(n_tasks + 1)]
    cut_c = [sum(1 for j, x in enumerate(v) if x == t and j not in keep) for t in range(n_tasks + 1)]
    fig, ax = plt.subplots(figsize=(5.5, 3.4))
    ax.bar(range(n_tasks + 1), kept_c, label="kept")
    ax.bar(range(n_tasks + 1), cut_c, bottom=kept_c, label="removed")
    ax.set_ylim(0, 1.08 * max(1, max(a + b for a, b in zip(kept_c, cut_c))))  # stacked bars: no autoscale margin
    ax.set_xticks(range(n_tasks + 1))
    ax.set_xlabel(f"votes (tasks whose own top-k holds the dimension, of {n_tasks})")
    ax.set_ylabel("hidden dimensions")
    ax.legend()
    fig.tight_layout()
    return _png(fig)


def accuracy_figure(labels: list[str], columns: list[str], values: list[dict], errors: list[dict]) -> str:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(max(6.5, 1.1 * len(columns) + 2), 3.8))
    w = 0.8 / max(1, len(labels))
    for i, (lab, vals, errs) in enumerate(zip(labels, values, errors)):
        xs = [j + (i - (len(labels) - 1) / 2) * w for j in range(len(columns))]
        ys = [100 * vals.get(c, float("nan")) if vals.get(c) is not None else float("nan") for c in columns]
        es = [100 * (errs.get(c) or 0.0) for c in columns]
        ax.bar(xs, ys, width=w, yerr=es, capsize=2, label=lab)
    for j, c in enumerate(columns):
        if c in CHANCE:
            ax.hlines(100 * CHANCE[c], j - 0.45, j + 0.45, colors="k", linestyles=":", lw=1)
    ax.set_xticks(range(len(columns)), columns, rotation=25, ha="right")
    ax.set_ylabel("accuracy (%)")
    ax.set_title("accuracy per task (± SE; dotted: chance)")
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    return _png(fig)


def difference_figure(paired: dict) -> str:
    plt = _plt()
    comps = [c for c in paired["comparisons"] if c["paired"]]
    tasks = list(comps[0]["paired"]["tasks"]) + ["average"]
    fig, ax = plt.subplots(figsize=(max(6.5, 1.1 * len(tasks) + 2), 3.8))
    w = 0.8 / len(comps)
    for i, c in enumerate(comps):
        pr = c["paired"]
        sts = [pr["tasks"].get(t) if t != "average" else pr["average"] for t in tasks]
        xs = [j + (i - (len(comps) - 1) / 2) * w for j in range(len(tasks))]
        ys = [100 * s["diff"] if s else float("nan") for s in sts]
        lo = [100 * (s["diff"] - s["ci"][0]) if s else 0 for s in sts]
        hi = [100 * (s["ci"][1] - s["diff"]) if s else 0 for s in sts]
        ax.errorbar(xs, ys, yerr=[lo, hi], fmt="o", capsize=3, label=c["label"])
    ax.axhline(0, color="k", lw=0.8)
    ax.set_xticks(range(len(tasks)), tasks, rotation=25, ha="right")
    ax.set_ylabel(f"points vs {paired['reference']}")
    ax.set_title("paired difference from the reference, 95% bootstrap interval")
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    return _png(fig)


# ---- sections -------------------------------------------------------------------------------------

def prune_command(meta: dict, folder: Path) -> str:
    cfg = meta.get("config") or {}
    words = ["dietprune", "prune", str(meta.get("source_model", "MODEL"))]
    for key, flag in (("method", "--method"), ("sparsity", "--sparsity"), ("tasks", "--tasks"),
                      ("samples", "--samples"), ("seed", "--seed"), ("tap", "--tap"), ("merge", "--merge"),
                      ("align", "--align"), ("repair", "--repair"), ("ridge", "--ridge")):
        v = cfg.get(key)
        if v is None:
            continue
        words += [flag, ",".join(v) if isinstance(v, (list, tuple)) else str(v)]
    return " ".join(shlex.quote(w) for w in words + ["--output", str(folder)])


def cut_section(ck: dict) -> list[str]:
    meta, tensors = ck["meta"], ck["tensors"]
    s = meta.get("summary") or {}
    out = ["<h2>What was cut</h2>"]
    red = s.get("param_reduction")
    rows = [["source model", _esc(meta.get("source_model", "?"))],
            ["method", _esc(meta.get("method", "?"))],
            ["hidden size", f"{s.get('hidden_size_before', '?')} → {s.get('hidden_size_after', '?')}"],
            ["parameters", f"{s.get('params_before', 0):,} → {s.get('params_after', 0):,}"
             + ("" if red is None else f" (−{100 * red:.1f}%)")],
            ["weights on disk", _mb(ck["weight_bytes"])], ["folder on disk", _mb(ck["total_bytes"])]]
    for name, (a, b) in (s.get("shape_changes") or {}).items():
        rows.append([f"shape: {_esc(name)}", f"{_esc(a)} → {_esc(b)}"])
    for key in ("width", "budget", "width_split"):  # a width split, where the method records one
        if key in meta or key in s:
            rows.append([key, f"<code>{_esc(json.dumps(meta.get(key, s.get(key))))}</code>"])
    out.append(_table(["property", "value"], rows, numeric_from=9))
    tasks = (meta.get("selection") or {}).get("task_order") or list((meta.get("config") or {}).get("tasks") or [])
    kept = tensors.get("kept")
    if "scores" in tensors and "votes" in tensors and tasks and len(tasks) == tensors["scores"].shape[0]:
        out.append(_figure(importance_figure(tensors["scores"], tensors["votes"], kept, tasks),
                           "Per-task importance of every hidden dimension (red: above the task's mean, blue: below), "
                           "in the order the vote merge ranks them.", "importance heat map"))
        out.append(_figure(votes_figure(tensors["votes"], kept, len(tasks)),
                           "Vote histogram: how many tasks want each dimension, split into kept and removed.",
                           "vote histogram"))
    else:
        out.append('<p class="muted">The mask file holds no per-task scores for this method '
                   "(no importance heat map or vote histogram).</p>")
    return out


def accuracy_section(paths: list[Path], metric: str, n_boot: int, seed: int) -> tuple[list[str], list[str]]:
    """HTML of the accuracy, perplexity and speed sections, and the eval commands."""
    files = [(p, load_results(p)) for p in paths]
    labels = [_label(p, d) for p, d in files]
    columns = []
    for _, d in files:
        for t, m in d["tasks"].items():
            if _value(m, metric)[1] is not None and t not in columns:
                columns.append(t)
    values = [{t: _value(d["tasks"][t], metric)[1] for t in columns if t in d["tasks"]} for _, d in files]
    errors = [{t: d["tasks"][t].get(f"{_value(d['tasks'][t], metric)[0]}_stderr") for t in columns
               if t in d["tasks"]} for _, d in files]
    out = ["<h2>Accuracy</h2>"]
    if columns:
        head = ["results"] + [t + ("*" if any(d["tasks"].get(t, {}).get("acc_norm") is not None
                                              for _, d in files) and metric == "acc_norm" else "")
                              for t in columns] + ["average", "skill retained"]
        rows = []
        for i, (lab, vals) in enumerate(zip(labels, values)):
            avg = sum(vals.values()) / len(vals) if len(vals) == len(columns) else None
            sk = aggregate_skill(vals, values[0])["average"] if i else 1.0
            rows.append([_esc(lab)] + [_pct(vals.get(t)) for t in columns]
                        + [_pct(avg), "–" if sk is None else f"{100 * sk:.1f}%"])
        out.append(_table(head, rows))
        out.append('<p class="muted">Accuracy in %; * = acc_norm (length-normalised); skill retained = '
                   "(avg − chance) / (reference avg − chance), chance per task: "
                   + ", ".join(f"{t} {_pct(CHANCE[t])}" for t in columns if t in CHANCE) + ".</p>")
        out.append(_figure(accuracy_figure(labels, columns, values, errors),
                           "Accuracy per task of every results file (error bars: ± one standard error).",
                           "accuracy per task"))
    if len(files) > 1:
        paired = build_paired([str(p) for p in paths], metric=metric, n_boot=n_boot, seed=seed)
        out.append(f"<h3>Paired against {_esc(paired['reference'])}</h3>")
        for c in paired["comparisons"]:
            pr = c["paired"]
            if pr is None:
                out.append(f"<p><b>{_esc(c['label'])}</b>: {_esc(c['note'])}.</p>")
                continue
            rows = []
            for name, st in list(pr["tasks"].items()) + [("average", pr["average"])]:
                d = st["diff"]
                cls = "pos" if st["ci"][0] > 0 else "neg" if st["ci"][1] < 0 else ""
                rows.append([_esc(name), str(st["n"]), _pct(st["ref_acc"]), _pct(st["acc"]),
                             f'<span class="{cls}">{_pct(d, True)} ± {_pct(st["se"])}</span>',
                             f"[{_pct(st['ci'][0], True)}, {_pct(st['ci'][1], True)}]",
                             f"{st['mcnemar']['b']}/{st['mcnemar']['c']}",
                             "<0.001" if st["mcnemar"]["p"] < 0.001 else f"{st['mcnemar']['p']:.3f}",
                             f"{100 * st['agreement']:.0f}%",
                             "–" if st["dll"] is None else f"{st['dll']:+.3f}",
                             "–" if st["skill"] is None else f"{100 * st['skill']:.0f}%"])
            out.append(f"<p><b>{_esc(c['label'])}</b></p>")
            out.append(_table(["task", "n", "ref", "new", "diff ± SE", "95% CI", "McNemar b/c", "p", "agree",
                               "Δ gold loglik", "skill"], rows))
            if c["note"]:
                out.append(f'<p class="muted">{_esc(c["note"])}</p>')
        if any(c["paired"] for c in paired["comparisons"]):
            out.append(_figure(difference_figure(paired), "Difference from the reference on the same examples, "
                               f"with paired bootstrap 95% intervals ({n_boot} replicates, seed {seed}).",
                               "paired differences"))
            out.append('<p class="muted">diff: accuracy points, new − reference, on the same examples; CI: paired '
                       "bootstrap; McNemar: b = only the reference right, c = only the new model right, exact "
                       "two-sided p; agree: same prediction; Δ gold loglik: mean change of the gold answer's "
                       "log-likelihood (nats); average row: mean over tasks, McNemar on pooled counts. Green/red: "
                       "the interval excludes zero.</p>")
    ppl_rows = []
    for lab, (_, d) in zip(labels, files):
        w = d["tasks"].get("wikitext2") or {}
        ppl = d.get("ppl")  # a structured-study cell
        if w or ppl is not None:
            ppl_rows.append([_esc(lab), "–" if w.get("word_perplexity") is None else f"{w['word_perplexity']:.2f}",
                             "–" if w.get("token_perplexity", ppl) is None else f"{w.get('token_perplexity', ppl):.2f}"])
    out.append("<h2>Perplexity</h2>")
    out.append(_table(["results", "WikiText-2 word ppl", "token ppl"], ppl_rows) if ppl_rows else
               '<p class="muted">No WikiText-2 perplexity in the results files (evaluate with '
               "<code>--tasks ...,wikitext2</code>).</p>")
    speed = []
    for lab, (_, d) in zip(labels, files):
        secs = (d.get("meta") or {}).get("seconds") or (d.get("seconds") or {}).get("eval_per_task")
        if secs:
            speed.append([_esc(lab)] + [f"{secs.get(t, float('nan')):.1f}" if t in secs else "–" for t in columns]
                         + [f"{sum(v for v in secs.values()):.1f}"])
    out.append("<h2>Speed</h2>")
    out.append(_table(["results"] + columns + ["total"], speed) + '<p class="muted">Evaluation wall time in seconds '
               "per task, as recorded in each results file (machine and load as recorded below).</p>"
               if speed else '<p class="muted">No timings recorded in the results files.</p>')
    commands = []
    for p, d in files:
        m = d.get("meta") or {}
        if m.get("command"):
            commands.append(m["command"])
        elif m.get("model"):
            tasks = ",".join(t for t in d["tasks"])
            commands.append(" ".join(shlex.quote(w) for w in ["dietprune", "eval", str(m["model"]), "--tasks", tasks]
                                     + (["--limit", str(m["limit"])] if m.get("limit") else [])
                                     + ["--output", str(p)]) + "   # rebuilt from the file's meta")
        elif isinstance(d.get("settings"), dict) and "label" in d:  # a bench/structured.py cell
            st = d["settings"]
            commands.append(f"python bench/structured.py  # cell {d.get('model')}|{d['label']}|{d.get('sparsity')}|"
                            f"seed {d.get('seed')}: tasks {st.get('tasks')}, limit {st.get('limit')}, "
                            f"samples {st.get('samples')}, ppl tokens {st.get('ppl_tokens')} ({p})")
    return out, commands


def build_report(paths: list, metric: str = "acc_norm", n_boot: int = 2000, seed: int = 0) -> str:
    folder, results = split_inputs(paths)
    parts = []
    title = "dietprune report"
    commands, versions = [], {"dietprune (report)": __version__}
    if folder is not None:
        ck = read_checkpoint(folder)
        title = f"dietprune report: {folder.name}"
        parts += cut_section(ck)
        commands.append(prune_command(ck["meta"], folder) + "   # rebuilt from dietprune.json's config")
        versions.update({f"{k} (prune)": v for k, v in (ck["meta"].get("versions") or {}).items()})
        versions["dietprune (prune)"] = ck["meta"].get("dietprune_version", "?")
    if results:
        sec, cmds = accuracy_section(results, metric, n_boot, seed)
        parts += sec
        commands += cmds
        for p in results:
            d = load_results(p)
            for k, v in ((d.get("meta") or {}).get("versions") or {}).items():
                versions.setdefault(f"{k} (eval)", v)
            host = (d.get("meta") or {}).get("host")
            if host:
                versions.setdefault("eval host", json.dumps(host))
    parts.append("<h2>Commands and versions</h2>")
    parts.append("<pre>" + _esc("\n".join(commands) or "(none recorded)") + "</pre>")
    parts.append(_table(["package", "version"], [[_esc(k), _esc(v)] for k, v in versions.items()], numeric_from=9))
    stamp = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    inputs = ", ".join(_esc(p) for p in ([folder] if folder else []) + results)
    return ("<!DOCTYPE html><html lang=en><head><meta charset=utf-8>"
            "<meta name=viewport content='width=device-width,initial-scale=1'>"
            f"<title>{_esc(title)}</title><style>{CSS}</style></head><body>"
            f"<h1>{_esc(title)}</h1><p class=muted>Generated {stamp} by dietprune {__version__} from {inputs}.</p>"
            + "\n".join(parts) + "</body></html>\n")


def write_report(paths: list, output, **kwargs) -> Path:
    from ..outputs import check_output_file

    out = Path(output).expanduser()
    check_output_file(out)
    if any(Path(p).expanduser().resolve() == out.resolve() for p in paths):
        raise DietpruneError(f"the report {out} would overwrite one of its inputs")
    page = build_report(paths, **kwargs)
    from ..outputs import atomic_file

    with atomic_file(out, "the report") as tmp:
        tmp.write_text(page, encoding="utf-8")
    return out


def add_report(sub):
    p = sub.add_parser("report", help="one self-contained HTML page: what was cut, accuracy with paired intervals, "
                                      "perplexity, speed, commands")
    p.add_argument("inputs", nargs="+", help="a pruned output folder and/or results JSON files (the first "
                                             "results file is the reference, e.g. the dense model)")
    p.add_argument("--output", required=True, help="HTML file to write")
    p.add_argument("--metric", default="acc_norm", choices=["acc", "acc_norm"])
    p.add_argument("--boot", type=int, default=2000, help="paired bootstrap replicates (default 2000)")
    p.add_argument("--seed", type=int, default=0, help="bootstrap seed")

    def run(args) -> int:
        out = write_report(args.inputs, args.output, metric=args.metric, n_boot=args.boot, seed=args.seed)
        print(f"report -> {out}")
        return 0

    return run
