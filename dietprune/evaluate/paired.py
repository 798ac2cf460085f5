"""Paired comparison of two evaluations on the same examples: numbers in, numbers out.

Two models scored on the same examples make correlated mistakes, so the standard error of their
difference is far smaller than the two accuracies' standard errors combined. Per task, from the
per-example records of a reference (dense by default) and of another model:

- ``diff``: mean of ``correct_new - correct_ref`` over the examples (accuracy difference), with
  ``se`` = sample standard deviation of the per-example differences / sqrt(n), and a paired
  bootstrap 95% interval (``ci``; examples resampled with replacement, both models together,
  ``n_boot`` replicates from a seeded generator, percentile interval);
- McNemar's exact test on correctness: ``b`` = examples only the reference gets right, ``c`` =
  examples only the other model gets right; two-sided binomial p-value of b against b + c at 1/2;
- ``agreement``: fraction of examples where both predict the same choice;
- ``dll``: mean change of the gold answer's summed log-likelihood (new - ref, nats), with its
  SE: continuous, so it moves long before the argmax flips;
- ``skill``: skill retained = (acc - chance) / (ref acc - chance), chance = 1 / number of choices
  (:data:`CHANCE` for the built-in tasks: 50% for two choices, 25% for four).

On average over the tasks (unweighted, as the headline average): the mean of the task
differences, SE = sqrt(sum of task SE^2) / T (tasks hold disjoint examples), a stratified
bootstrap (each task resampled on its own, the same replicate count), McNemar's test on the
discordant counts pooled over tasks, the mean agreement and log-likelihood change, and skill
retained = (avg - mean chance) / (ref avg - mean chance), with its bootstrap interval.

The correctness used is the task's headline metric: ``acc_norm`` where the records carry
``pred_norm`` and the metric asks for it, else ``acc``.

Statistics are kept as sums and counts (:class:`PairedCounts`), so shards merge by addition.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..errors import DietpruneError

#: Chance accuracy of the built-in tasks (one over the number of choices).
CHANCE = {"boolq": 0.5, "rte": 0.5, "winogrande": 0.5, "piqa": 0.5,
          "hellaswag": 0.25, "arc_easy": 0.25, "arc_challenge": 0.25, "openbookqa": 0.25}

DEFAULT_BOOT = 2000
DEFAULT_SEED = 0


# ---- per-example columns ------------------------------------------------------------------------

def compact_records(records: list[dict]) -> dict:
    """Columnar form of ``evaluate(..., log_samples=True)["samples"][task]`` for multiple-choice
    tasks: gold, pred, pred_norm, the gold choice's log-likelihood and the number of choices."""
    out = {"gold": [int(r["gold"]) for r in records], "pred": [int(r["pred"]) for r in records],
           "gold_loglik": [float(f"{r['loglik'][r['gold']]:.7g}") for r in records],
           "n_choices": [len(r["loglik"]) for r in records]}
    if all(r.get("pred_norm") is not None for r in records):
        out["pred_norm"] = [int(r["pred_norm"]) for r in records]
    return out


def columns(records, metric: str = "acc_norm") -> dict:
    """{gold, pred, correct, gold_loglik or None, n_choices or None, metric} of one task's records,
    given as a list of per-example dicts (results JSON ``samples``) or in :func:`compact_records` form.

    ``metric`` acc_norm uses ``pred_norm`` where the records have it, else ``pred`` (acc).
    """
    if isinstance(records, list):
        if not records or "gold" not in records[0] or "pred" not in records[0]:
            raise DietpruneError("per-example records lack gold/pred (not a multiple-choice task?)")
        records = compact_records(records) if "loglik" in records[0] else {
            "gold": [r["gold"] for r in records], "pred": [r["pred"] for r in records],
            **({"pred_norm": [r["pred_norm"] for r in records]} if all("pred_norm" in r for r in records) else {})}
    if not isinstance(records, dict) or "gold" not in records or "pred" not in records:
        raise DietpruneError("per-example records lack gold/pred")
    use_norm = metric == "acc_norm" and records.get("pred_norm") is not None
    pred = list(records["pred_norm"] if use_norm else records["pred"])
    gold = list(records["gold"])
    if len(pred) != len(gold):
        raise DietpruneError("per-example records: gold and pred differ in length")
    return {"gold": gold, "pred": pred, "correct": [p == g for p, g in zip(pred, gold)],
            "gold_loglik": records.get("gold_loglik"), "n_choices": records.get("n_choices"),
            "metric": "acc_norm" if use_norm else "acc"}


def chance_of(task: str, cols: dict | None = None) -> float | None:
    """Chance accuracy: :data:`CHANCE`, else the mean of 1 / number of choices in the records."""
    if task in CHANCE:
        return CHANCE[task]
    n = (cols or {}).get("n_choices")
    return sum(1.0 / k for k in n) / len(n) if n else None


# ---- statistics as sums and counts ---------------------------------------------------------------

@dataclass
class PairedCounts:
    """Sums over examples of one task; ``a + b`` merges two shards of the same task."""

    n: int = 0
    ref_correct: int = 0
    new_correct: int = 0
    only_ref: int = 0  # McNemar's b
    only_new: int = 0  # McNemar's c
    agree: int = 0
    d_sum: float = 0.0  # sum of (correct_new - correct_ref)
    d_sq: float = 0.0
    ll_n: int = 0
    ll_sum: float = 0.0  # sum of (gold loglik new - ref)
    ll_sq: float = 0.0

    def __add__(self, other: "PairedCounts") -> "PairedCounts":
        return PairedCounts(*(getattr(self, f) + getattr(other, f) for f in self.__dataclass_fields__))

    @classmethod
    def of(cls, ref: dict, new: dict) -> "PairedCounts":
        out = cls()
        dll = None
        if ref.get("gold_loglik") is not None and new.get("gold_loglik") is not None:
            dll = [b - a for a, b in zip(ref["gold_loglik"], new["gold_loglik"])]
        for i, (a, b) in enumerate(zip(ref["correct"], new["correct"])):
            d = int(b) - int(a)
            out.n += 1
            out.ref_correct += int(a)
            out.new_correct += int(b)
            out.only_ref += int(a and not b)
            out.only_new += int(b and not a)
            out.agree += int(ref["pred"][i] == new["pred"][i])
            out.d_sum += d
            out.d_sq += d * d
            if dll is not None:
                out.ll_n += 1
                out.ll_sum += dll[i]
                out.ll_sq += dll[i] ** 2
        return out


def _mean_se(total: float, sq: float, n: int) -> tuple[float | None, float | None]:
    if n == 0:
        return None, None
    mu = total / n
    if n < 2:
        return mu, None
    var = max(0.0, (sq - n * mu * mu) / (n - 1))
    return mu, math.sqrt(var / n)


def mcnemar_p(b: int, c: int) -> float:
    """Exact two-sided McNemar p-value: P(|X - m/2| >= |b - m/2|), X ~ Binomial(m = b + c, 1/2)."""
    m = b + c
    if m == 0:
        return 1.0
    k = min(b, c)
    tail = sum(math.comb(m, i) for i in range(k + 1))
    return min(1.0, 2 * tail / 2**m)  # exact integer ratio, correctly rounded to a float


def skill_retained(acc: float | None, ref_acc: float | None, chance: float | None) -> float | None:
    """(acc - chance) / (ref_acc - chance); None where the reference is not above chance."""
    if acc is None or ref_acc is None or chance is None or ref_acc - chance <= 1e-12:
        return None
    return (acc - chance) / (ref_acc - chance)


def summarize(c: PairedCounts, chance: float | None = None) -> dict:
    diff, se = _mean_se(c.d_sum, c.d_sq, c.n)
    dll, dll_se = _mean_se(c.ll_sum, c.ll_sq, c.ll_n)
    ref_acc = c.ref_correct / c.n if c.n else None
    acc = c.new_correct / c.n if c.n else None
    return {"n": c.n, "ref_acc": ref_acc, "acc": acc, "diff": diff, "se": se,
            "mcnemar": {"b": c.only_ref, "c": c.only_new, "p": mcnemar_p(c.only_ref, c.only_new)},
            "agreement": c.agree / c.n if c.n else None, "dll": dll, "dll_se": dll_se,
            "chance": chance, "skill": skill_retained(acc, ref_acc, chance)}


def _bootstrap(ref: torch.Tensor, new: torch.Tensor, n_boot: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Per replicate: mean correctness of ref and of new on the same resampled examples."""
    n = ref.numel()
    step = max(1, 2**22 // n)  # at most ~4M indices (32 MiB) at a time
    rs, ns = [], []
    for start in range(0, n_boot, step):
        idx = torch.randint(n, (min(step, n_boot - start), n), generator=gen)
        rs.append(ref[idx].mean(1))
        ns.append(new[idx].mean(1))
    return torch.cat(rs), torch.cat(ns)


def _interval(x: torch.Tensor) -> list[float]:
    q = torch.quantile(x.double(), torch.tensor([0.025, 0.975], dtype=torch.float64))
    return [float(q[0]), float(q[1])]


def paired_tasks(ref: dict, new: dict, n_boot: int = DEFAULT_BOOT, seed: int = DEFAULT_SEED,
                 chance: dict | None = None) -> dict:
    """Paired statistics of ``new`` against ``ref``; both map task -> :func:`columns` output.

    Tasks in both are compared (in ``ref``'s order). Where the example counts differ, the first
    min(n) are compared (``--limit`` takes the first rows) and ``truncated`` says so; golds must
    agree on them, else the files hold different examples and this raises DietpruneError.
    Returns ``{"tasks": {task: stats}, "average": stats or None, "n_boot", "seed"}``.
    """
    if n_boot < 1:
        raise DietpruneError(f"bootstrap replicates must be at least 1, got {n_boot}")
    gen = torch.Generator().manual_seed(int(seed))
    tasks, boots, counts, chances = {}, {}, [], []
    for task, r in ref.items():
        if task not in new:
            continue
        a, b = r, new[task]
        n = min(len(a["gold"]), len(b["gold"]))
        if n == 0:
            continue
        if a["gold"][:n] != b["gold"][:n]:
            raise DietpruneError(f"task '{task}': the gold answers differ, so the two files hold different "
                                 "examples; a paired comparison needs the same data and --limit")
        cut = lambda x: {k: (v[:n] if isinstance(v, list) else v) for k, v in x.items()}  # noqa: E731
        a, b = cut(a), cut(b)
        ch = (chance or {}).get(task, chance_of(task, a))
        c = PairedCounts.of(a, b)
        st = summarize(c, ch)
        st["metric"] = a["metric"] if a["metric"] == b["metric"] else f"{a['metric']}/{b['metric']}"
        st["truncated"] = len(r["gold"]) != len(new[task]["gold"])
        ra = torch.tensor(a["correct"], dtype=torch.float64)
        nb = torch.tensor(b["correct"], dtype=torch.float64)
        br, bn = _bootstrap(ra, nb, n_boot, gen)
        st["ci"] = _interval(bn - br)
        boots[task] = (br, bn)
        tasks[task] = st
        counts.append(c)
        chances.append(ch)
    out = {"tasks": tasks, "average": None, "n_boot": n_boot, "seed": seed}
    if not tasks:
        return out
    T = len(tasks)
    per = list(tasks.values())
    ses = [s["se"] for s in per]
    pooled = sum(counts, PairedCounts())
    avg_ref = sum(s["ref_acc"] for s in per) / T
    avg_new = sum(s["acc"] for s in per) / T
    ch_avg = sum(chances) / T if all(x is not None for x in chances) else None
    br = torch.stack([x[0] for x in boots.values()]).mean(0)
    bn = torch.stack([x[1] for x in boots.values()]).mean(0)
    dlls = [s["dll"] for s in per]
    avg = {"n": pooled.n, "tasks": T, "ref_acc": avg_ref, "acc": avg_new, "diff": avg_new - avg_ref,
           "se": math.sqrt(sum(s * s for s in ses)) / T if all(s is not None for s in ses) else None,
           "ci": _interval(bn - br),
           "mcnemar": {"b": pooled.only_ref, "c": pooled.only_new, "p": mcnemar_p(pooled.only_ref, pooled.only_new)},
           "agreement": sum(s["agreement"] for s in per) / T,
           "dll": sum(dlls) / T if all(d is not None for d in dlls) else None,
           "dll_se": (math.sqrt(sum(s["dll_se"] ** 2 for s in per)) / T
                      if all(s["dll_se"] is not None for s in per) else None),
           "chance": ch_avg, "skill": skill_retained(avg_new, avg_ref, ch_avg), "skill_ci": None}
    if ch_avg is not None and avg_ref - ch_avg > 1e-12:
        ok = (br - ch_avg) > 1e-12  # replicates where the reference is above chance
        if bool(ok.any()):
            avg["skill_ci"] = _interval(((bn - ch_avg) / (br - ch_avg))[ok])
    out["average"] = avg
    return out


# ---- results files ------------------------------------------------------------------------------

def results_columns(data: dict, metric: str = "acc_norm") -> dict:
    """task -> :func:`columns` for every multiple-choice task with per-example records in a results
    dict (``dietprune eval`` JSON: ``samples``; a structured-study cell: ``records``)."""
    samples = data.get("samples") or data.get("records") or {}
    out = {}
    for task, recs in samples.items():
        # acc_norm only where the task reports it (as the aggregate table), else acc
        m = metric if (data.get("tasks", {}).get(task) or {}).get("acc_norm") is not None else "acc"
        if isinstance(recs, list) and recs and "gold" in recs[0]:
            out[task] = columns(recs, m)
        elif isinstance(recs, dict) and "gold" in recs:
            out[task] = columns(recs, m)
    return out


def aggregate_skill(scores: dict, ref_scores: dict, chance: dict | None = None) -> dict:
    """Skill retained from aggregate accuracies alone: per task and on average over the tasks both
    have (``scores``: task -> accuracy). Tasks without a known chance level are left out."""
    chance = {**CHANCE, **(chance or {})}
    common = [t for t in ref_scores if t in scores and t in chance
              and scores[t] is not None and ref_scores[t] is not None]
    per = {t: skill_retained(scores[t], ref_scores[t], chance[t]) for t in common}
    if not common:
        return {"tasks": per, "average": None, "n_tasks": 0}
    avg = sum(scores[t] for t in common) / len(common)
    ref = sum(ref_scores[t] for t in common) / len(common)
    ch = sum(chance[t] for t in common) / len(common)
    return {"tasks": per, "average": skill_retained(avg, ref, ch), "n_tasks": len(common)}
