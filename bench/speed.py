"""Speed and size of dense vs DIET-pruned presets in transformers and in llama.cpp.

    python bench/speed.py                      # prepare, measure the missing cells, write JSON and docs/speed.md
    python bench/speed.py --variants diet-20   # only these variants (dense is always measured)
    python bench/speed.py --render-only        # rebuild bench/results/speed.json and docs/speed.md from the cells

Checkpoints: the dense model is the preset dequantized to float32; variant ``diet-P`` is
``dietprune.prune(preset, <the seven DIET tasks>, samples=100, sparsity=P/100)`` with the study's
defaults (bench/structured.py), and ``width-P`` the same with ``method="diet-width", align=32``
(MLP channels and hidden width multiples of 32, as ``prune --gguf`` picks, so q8_0 rows divide),
each from one profile per preset (with Gram, and width statistics for ``width-P``) computed once
and reused for every sparsity. Where the structured study has a diet-width cell at P% (seed 0),
``width-P`` keeps the hidden share of the split that cell's grid chose (by KL) and searches only
the head options around it, instead of rerunning the whole grid. Each checkpoint is exported with ``dietprune.export.export_gguf``
as f32, f16, q8_0 and q4_k_m.

A cell is (preset, variant, runtime); runtimes are ``hf-f32`` (transformers, float32, CPU) and
``llama-f16`` / ``llama-q8_0`` / ``llama-q4_k_m`` (llama-cpp-python). Each measurement runs in a
fresh subprocess with ``--threads`` threads (default 2): prefill of a 512-token WikiText prompt
(one forward / one llama_decode of the whole prompt), then 128 greedy decode steps (argmax, KV
cache), and that process's peak RSS. Repeats are interleaved: round r measures every cell once
before round r + 1 starts, so load changes on the shared machine hit dense and pruned alike.
Finished repeats are cached per cell under ``--cells-dir`` (resumable; committed).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SCHEMA = "dietprune-speed/1"
PRESETS = ("smollm2-135m", "gemma3-270m")
RUNTIMES = ("hf-f32", "llama-f16", "llama-q8_0", "llama-q4_k_m")
PROMPT_TOKENS = 512
NEW_TOKENS = 128


VARIANT_METHODS = {"diet": ("diet", 1), "width": ("diet-width", 32)}  # name prefix -> (method, align)


def parse_variant(name: str) -> tuple[str, float]:
    """'dense' -> ('dense', 0.0); 'width-20' -> ('width', 0.2)."""
    if name == "dense":
        return "dense", 0.0
    kind, _, pct = name.rpartition("-")
    if kind not in VARIANT_METHODS or not pct.isdigit() or not 0 < int(pct) < 100:
        raise SystemExit(f"speed.py: unknown variant {name!r} (dense, diet-P or width-P with P in 1..99)")
    return kind, int(pct) / 100


# ---- preparation (checkpoints, GGUF files, the prompt) --------------------------------------

def work_dir(args) -> Path:
    return Path(args.work).expanduser()


def checkpoint(args, preset: str, variant: str) -> Path:
    """The checkpoint folder of one variant, made once."""
    from dietprune.models import gguf_cache_entry, load, resolve

    kind, sparsity = parse_variant(variant)
    if sparsity == 0:
        path, kwargs, _ = resolve(preset)
        entry = gguf_cache_entry(Path(path) / kwargs["gguf_file"], __import__("torch").float32)
        if entry is None or not (entry / ".dietprune-complete").is_file():
            load(preset)  # writes the dequantized cache
        return entry
    out = work_dir(args) / preset / variant
    if (out / "config.json").is_file():
        return out
    from dietprune.pipeline import profile, prune
    from dietprune.tasks import DIET_TASKS

    method, align = VARIANT_METHODS[kind]
    widths = method == "diet-width"
    scores = work_dir(args) / preset / f"profile-diet7-s100{'-widths' if widths else ''}.safetensors"
    if not scores.is_file():
        scores.parent.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        profile(preset, list(DIET_TASKS), samples=100, seed=0, gram=True, widths=widths, output=str(scores),
                data_dir=args.data_dir)
        print(f"[speed] profiled {preset} in {time.perf_counter() - t0:.0f}s", flush=True)
    extra = {}
    if widths:
        frac = study_hidden_fraction(preset, sparsity)
        if frac is not None:
            # the hidden share of the split the study's grid chose (KL on held-out tokens); the grid here
            # is then only that hidden width (times the head options), cut with align 32
            extra = {"fractions": [frac]}
            print(f"[speed] {preset} {variant}: the study's split, hidden fraction {frac:.4f}", flush=True)
    res = prune(preset, tasks=list(DIET_TASKS), sparsity=sparsity, samples=100, seed=0, scores=str(scores),
                output=str(out), data_dir=args.data_dir, method=method, align=align, extra=extra)
    print(f"[speed] pruned {preset} {variant}: hidden {res.summary['hidden_size_after']}", flush=True)
    return out


STUDY_CELLS = ROOT / "bench" / "results" / "structured" / "cells"


def study_width(preset: str, sparsity: float) -> tuple[Path, dict] | None:
    """(file, its "width" block: shapes before/after, split, candidates) of the structured study's
    diet-width cell at this sparsity (seed 0), or None when the study has no such cell."""
    f = STUDY_CELLS / f"{preset}__diet-width__{sparsity:.2f}__0__default.json"
    return (f, json.loads(f.read_text()).get("width", {})) if f.is_file() else None


def study_hidden_fraction(preset: str, sparsity: float) -> float | None:
    """Hidden dimensions removed (as a fraction) by the study's diet-width cell at this sparsity."""
    got = study_width(preset, sparsity)
    if got is None:
        return None
    before, after = got[1].get("shape_before", {}).get("hidden"), got[1].get("shape_after", {}).get("hidden")
    return None if not before or after is None else 1.0 - after / before


def gguf_file(args, preset: str, variant: str, gguf_type: str) -> Path:
    from dietprune.export import export_gguf

    out = work_dir(args) / preset / f"{variant}.{gguf_type}.gguf"
    if not out.is_file():
        out.parent.mkdir(parents=True, exist_ok=True)
        # the dense checkpoint (the dequantized cache) has no dietprune.json: name the preset's GGUF for its tokenizer
        from dietprune.models import PRESETS

        tok = "auto" if variant != "dense" else str(PRESETS[preset].gguf_path())
        res = export_gguf(checkpoint(args, preset, variant), out, gguf_type, tokenizer=tok)
        for note in res.notes:
            print(f"[speed] {out.name}: {note}", flush=True)
    return out


def prompt_ids(args, preset: str) -> list[int]:
    """512 tokens of WikiText-2 eval text, tokenized once by the dense checkpoint's tokenizer."""
    path = work_dir(args) / preset / "prompt.json"
    if path.is_file():
        return json.loads(path.read_text())
    from transformers import AutoTokenizer

    from dietprune.data import load_rows
    from dietprune.tasks import get_task

    tok = AutoTokenizer.from_pretrained(checkpoint(args, preset, "dense"))
    rows = [r["text"] for r in load_rows(get_task("wikitext2"), "eval", args.data_dir)]
    ids = [tok.bos_token_id] if tok.bos_token_id is not None else []
    for text in rows:
        ids += tok(text, add_special_tokens=False).input_ids
        if len(ids) >= PROMPT_TOKENS:
            break
    ids = ids[:PROMPT_TOKENS]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(ids))
    return ids


def describe(args, preset: str, variant: str) -> dict:
    """Parameters and shapes of a checkpoint (read from its safetensors headers, no weights loaded)."""
    from safetensors import safe_open

    ckpt = checkpoint(args, preset, variant)
    cfg = json.loads((ckpt / "config.json").read_text())
    n = 0
    embed = 0
    for f in sorted(ckpt.glob("*.safetensors")):
        with safe_open(f, "pt") as st:
            for k in st.keys():
                shape = st.get_slice(k).get_shape()
                count = 1
                for s in shape:
                    count *= s
                n += count
                if k.endswith("embed_tokens.weight") or k.endswith("lm_head.weight"):
                    embed += count
    return {"params": n, "embedding_params": embed, "hidden_size": cfg["hidden_size"],
            "intermediate_size": cfg.get("intermediate_size"),
            "vocab_size": cfg["vocab_size"], "tied": bool(cfg.get("tie_word_embeddings", False))}


# ---- one measurement (a subprocess) --------------------------------------------------------

def worker(args) -> dict:
    ids = json.loads(Path(args.prompt).read_text())
    threads = args.threads
    if args.runtime == "hf-f32":
        import torch
        from transformers import AutoModelForCausalLM

        torch.set_num_threads(threads)
        model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
        x = torch.tensor([ids])
        with torch.inference_mode():
            model(x[:, :16])  # warm-up (allocations, kernels)
            t0 = time.perf_counter()
            out = model(x, use_cache=True)
            t1 = time.perf_counter()
            past, tok = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
            t2 = time.perf_counter()
            for _ in range(NEW_TOKENS):
                out = model(tok, past_key_values=past, use_cache=True)
                past, tok = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
            t3 = time.perf_counter()
    else:
        from dietprune.export import llama_cpp_model

        llm = llama_cpp_model(args.model, threads=threads, n_ctx=PROMPT_TOKENS + NEW_TOKENS + 16, logits_all=False)
        llm.reset()
        llm.eval(ids[:16])  # warm-up
        llm.reset()
        t0 = time.perf_counter()
        llm.eval(ids)
        t1 = time.perf_counter()
        import numpy as np

        t2 = time.perf_counter()
        tok = int(np.argmax(np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(llm.n_vocab(),))))
        for _ in range(NEW_TOKENS):
            llm.eval([tok])
            tok = int(np.argmax(np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(llm.n_vocab(),))))
        t3 = time.perf_counter()
    # VmHWM: this process image's peak (ru_maxrss would carry the parent's peak across fork + exec)
    rss = next(int(ln.split()[1]) * 1024 for ln in open("/proc/self/status") if ln.startswith("VmHWM:"))
    return {"prefill_tok_s": len(ids) / (t1 - t0), "decode_tok_s": NEW_TOKENS / (t3 - t2), "peak_rss_bytes": rss,
            "rss": "VmHWM"}


def cpu_busy(seconds: float = 0.5) -> float:
    """Share of the machine's CPU time (all cores) that was not idle during `seconds` (from /proc/stat)."""
    def sample():
        with open("/proc/stat") as f:
            vals = [int(x) for x in f.readline().split()[1:]]
        return sum(vals), vals[3] + vals[4]  # total, idle + iowait

    t0, i0 = sample()
    time.sleep(seconds)
    t1, i1 = sample()
    return 1.0 - (i1 - i0) / max(1, t1 - t0)


def measure(args, preset: str, variant: str, runtime: str) -> dict:
    if runtime == "hf-f32":
        model = checkpoint(args, preset, variant)
    else:
        model = gguf_file(args, preset, variant, runtime.split("-", 1)[1])
    cmd = [sys.executable, __file__, "--worker", "--runtime", runtime, "--model", str(model),
           "--prompt", str(work_dir(args) / preset / "prompt.json"), "--threads", str(args.threads)]
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), PYTHONPATH=str(ROOT), TOKENIZERS_PARALLELISM="false")
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"{preset} {variant} {runtime}: {proc.stderr.strip().splitlines()[-1:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ---- the cells -----------------------------------------------------------------------------

def cell_path(args, preset, variant, runtime) -> Path:
    return Path(args.cells_dir) / f"{preset}__{variant}__{runtime}.json"


def load_cell(args, preset, variant, runtime) -> dict:
    p = cell_path(args, preset, variant, runtime)
    if p.is_file():
        cell = json.loads(p.read_text())
        if cell.get("settings") == settings(args):
            return cell
    return {"preset": preset, "variant": variant, "sparsity": parse_variant(variant)[1], "runtime": runtime,
            "settings": settings(args), "repeats": []}


def save_cell(args, cell) -> None:
    p = cell_path(args, cell["preset"], cell["variant"], cell["runtime"])
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_suffix(".tmp")
    tmp.write_text(json.dumps(cell, indent=1))
    os.replace(tmp, p)


def settings(args) -> dict:
    return {"threads": args.threads, "prompt_tokens": PROMPT_TOKENS, "new_tokens": NEW_TOKENS}


def plan(args) -> list[tuple[str, str, str]]:
    # the dense references first, then the variants in the order given
    cells = []
    for v in ["dense"] + [v for v in args.variants if v != "dense"]:
        for preset in args.presets:
            for runtime in args.runtimes:
                cells.append((preset, v, runtime))
    return cells


def run(args) -> None:
    cells = plan(args)
    for preset in args.presets:
        for v in ["dense"] + list(args.variants):
            checkpoint(args, preset, v)
            for runtime in args.runtimes:
                if runtime != "hf-f32":
                    gguf_file(args, preset, v, runtime.split("-", 1)[1])
        prompt_ids(args, preset)
    for rep in range(args.repeats):
        for preset, v, runtime in cells:
            cell = load_cell(args, preset, v, runtime)
            if len(cell["repeats"]) > rep:
                continue
            busy = cpu_busy()  # how busy the machine was just before, with none of this bench's processes running
            m = measure(args, preset, v, runtime)
            m["cpu_busy_before"] = round(busy, 3)
            m["finished"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
            cell["repeats"].append(m)
            if "intermediate_size" not in cell.get("model", {}):
                cell["model"] = describe(args, preset, v)
                if runtime != "hf-f32":
                    cell["file_bytes"] = gguf_file(args, preset, v, runtime.split("-", 1)[1]).stat().st_size
                else:
                    weights = checkpoint(args, preset, v).glob("*.safetensors")
                    cell["file_bytes"] = sum(f.stat().st_size for f in weights)
            save_cell(args, cell)
            print(f"[speed] round {rep + 1}: {preset} {v} {runtime}: prefill {m['prefill_tok_s']:.0f} "
                  f"tok/s, decode {m['decode_tok_s']:.1f} tok/s, rss {m['peak_rss_bytes'] / 2**20:.0f} MiB", flush=True)


# ---- agreement of llama.cpp with transformers on the same checkpoint -------------------------

def wikitext_windows(args, preset: str, n_windows: int) -> list[list[int]]:
    from transformers import AutoTokenizer

    from dietprune.data import load_rows
    from dietprune.tasks import get_task

    tok = AutoTokenizer.from_pretrained(checkpoint(args, preset, "dense"))
    ids: list[int] = []
    for text in (r["text"] for r in load_rows(get_task("wikitext2"), "eval", args.data_dir)):
        ids += tok(text, add_special_tokens=False).input_ids
        if len(ids) >= (n_windows + 1) * PROMPT_TOKENS:
            break
    bos = [tok.bos_token_id] if tok.bos_token_id is not None else []
    # skip the first window: it is the speed prompt
    return [bos + ids[i * PROMPT_TOKENS:(i + 1) * PROMPT_TOKENS - len(bos)] for i in range(1, n_windows + 1)]


def _nll(logits, ids) -> float:
    """Summed next-token negative log-likelihood of `ids` under `logits` (positions x vocab)."""
    import numpy as np

    x = logits[:-1].astype(np.float64)
    x = x - x.max(-1, keepdims=True)
    logz = np.log(np.exp(x).sum(-1))
    return float((logz - x[np.arange(len(ids) - 1), ids[1:]]).sum())


def agreement(args, preset: str, variant: str) -> dict:
    """GGUF files in llama.cpp vs the checkpoint in transformers (float32), on WikiText windows.

    Per type: max |logit difference| / max |logit|, top-1 agreement, 20 greedy tokens, and the
    perplexity of the same tokens (so the cost of q8_0 / q4_k_m is measured, not assumed).
    """
    path = Path(args.cells_dir) / f"{preset}__{variant}__agreement.json"
    if path.is_file():
        return json.loads(path.read_text())
    import math

    import numpy as np
    import torch
    from transformers import AutoModelForCausalLM

    from dietprune.export import llama_cpp_greedy, llama_cpp_logits, llama_cpp_model

    torch.set_num_threads(args.threads)
    model = AutoModelForCausalLM.from_pretrained(checkpoint(args, preset, variant), dtype=torch.float32).eval()
    windows = wikitext_windows(args, preset, args.agreement_windows)
    types = ("f32", "q8_0", "q4_k_m")
    llms = {t: llama_cpp_model(gguf_file(args, preset, variant, t), threads=args.threads, n_ctx=PROMPT_TOKENS,
                               f32_cache=t == "f32") for t in types}
    acc = {t: {"rel": 0.0, "same": 0, "nll": 0.0} for t in ("hf-f32",) + types}
    n_pred = 0
    for w in windows:
        with torch.inference_mode():
            ref = model(torch.tensor([w])).logits[0].numpy()
        acc["hf-f32"]["nll"] += _nll(ref, w)
        for t in types:
            got = llama_cpp_logits(llms[t], w)
            acc[t]["rel"] = max(acc[t]["rel"], float(np.abs(ref - got).max() / np.abs(ref).max()))
            acc[t]["same"] += int((ref.argmax(-1) == got.argmax(-1)).sum())
            acc[t]["nll"] += _nll(got, w)
            del got
        n_pred += len(w) - 1
        del ref
    prompt = list(windows[0][:32])
    hf_greedy: list[int] = []
    with torch.inference_mode():
        for _ in range(20):
            hf_greedy.append(int(model(torch.tensor([prompt + hf_greedy])).logits[0, -1].argmax()))
    n_tok = sum(map(len, windows))
    out = {"preset": preset, "variant": variant, "tokens": n_tok,
           "hf-f32": {"ppl": math.exp(acc["hf-f32"]["nll"] / n_pred)}}
    for t in types:
        out[t] = {"max_rel_diff": acc[t]["rel"], "top1_agreement": acc[t]["same"] / n_tok,
                  "greedy20_identical": llama_cpp_greedy(llms[t], prompt, 20) == hf_greedy,
                  "ppl": math.exp(acc[t]["nll"] / n_pred)}
    del llms
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=1))
    print(f"[speed] agreement {preset} {variant}: {out}", flush=True)
    return out


# ---- results and the document --------------------------------------------------------------

def stats(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}


def collect(args) -> dict:
    cells = {}
    for p in sorted(Path(args.cells_dir).glob("*.json")):
        c = json.loads(p.read_text())
        if p.name.endswith("__agreement.json") or not c.get("repeats"):
            continue
        c["prefill"] = stats([r["prefill_tok_s"] for r in c["repeats"]])
        c["decode"] = stats([r["decode_tok_s"] for r in c["repeats"]])
        good = [r["peak_rss_bytes"] for r in c["repeats"] if r.get("rss") == "VmHWM"]
        c["peak_rss_bytes"] = max(good) if good else None  # early repeats recorded the parent's ru_maxrss
        cells[(c["preset"], c["variant"], c["runtime"])] = c
    agree = [json.loads(p.read_text()) for p in sorted(Path(args.cells_dir).glob("*__agreement.json"))]
    rows = []
    for (preset, variant, runtime), c in sorted(cells.items()):
        dense = cells.get((preset, "dense", runtime))
        row = {k: c[k] for k in ("preset", "variant", "sparsity", "runtime", "prefill", "decode", "peak_rss_bytes",
                                 "file_bytes", "model")}
        row["cpu_busy"] = [r["cpu_busy_before"] for r in c["repeats"] if "cpu_busy_before" in r]
        if dense is not None and variant != "dense":
            param_ratio = dense["model"]["params"] / c["model"]["params"]
            byte_ratio = dense["file_bytes"] / c["file_bytes"]
            # per-repeat ratios: repeat r of both cells ran in the same round, side by side
            pairs = list(zip(c["repeats"], dense["repeats"]))
            pre = [a["prefill_tok_s"] / b["prefill_tok_s"] for a, b in pairs]
            dec = [a["decode_tok_s"] / b["decode_tok_s"] for a, b in pairs]
            row.update({
                "param_ratio": param_ratio, "byte_ratio": byte_ratio,
                "prefill_speedup": stats(pre), "decode_speedup": stats(dec),
                "P3_prefill": statistics.median(pre) / param_ratio,
                "P3_decode": statistics.median(dec) / param_ratio,
                "decode_vs_bytes": statistics.median(dec) / byte_ratio,
            })
        rows.append(row)
    return {"schema": SCHEMA, "settings": settings(args), "machine": machine(), "rows": rows,
            "agreement": agree, "study": study_figures()}


def machine() -> dict:
    import torch

    info = {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(), "torch": torch.__version__}
    try:
        import llama_cpp

        info["llama_cpp_python"] = llama_cpp.__version__
    except ImportError:
        pass
    try:
        info["cpu"] = next(ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return info


def study_figures() -> dict:
    """Skill retained and perplexity of dense and DIET cells from the structured study (float32 checkpoints)."""
    path = ROOT / "bench" / "results" / "structured.json"
    out = {}
    if not path.is_file():
        return out
    data = json.loads(path.read_text())
    cells_dir = STUDY_CELLS
    for preset in PRESETS:
        dense = cells_dir / f"{preset}__dense__0.00__0__default.json"
        if not dense.is_file():
            continue
        d = json.loads(dense.read_text())
        chance = chance_of(d)
        for s in (0.1, 0.2, 0.3):
            for kind, (method, _) in VARIANT_METHODS.items():
                f = cells_dir / f"{preset}__{method}__{s:.2f}__0__default.json"
                if f.is_file():
                    c = json.loads(f.read_text())
                    out[f"{preset}/{kind}-{round(s * 100)}"] = {
                        "avg": c["avg"], "ppl": c["ppl"], "skill_retained": (c["avg"] - chance) / (d["avg"] - chance),
                        "hidden": c["summary"]["hidden_size_after"], "kept": c.get("kept"),
                        "align": (c.get("config") or {}).get("align", 1)}
        out[f"{preset}/dense"] = {"avg": d["avg"], "ppl": d["ppl"], "skill_retained": 1.0}
    del data
    return out


def chance_of(cell) -> float:
    """Mean chance accuracy over the cell's tasks (50 for boolq/rte/winogrande, 25 for the others)."""
    tasks = cell.get("tasks") or {}
    names = list(tasks) if isinstance(tasks, dict) else []
    if not names:
        names = ["boolq", "rte", "hellaswag", "winogrande", "arc_easy", "arc_challenge", "openbookqa"]
    return statistics.mean(0.5 if t in ("boolq", "rte", "winogrande") else 0.25 for t in names)


def render(results: dict) -> str:
    rows = results["rows"]
    mib = 2**20

    def fmt(st, digits=0):
        return f"{st['median']:.{digits}f} ({st['min']:.{digits}f}–{st['max']:.{digits}f})"

    lines = [
        "# Speed and size: dense vs pruned (DIET, diet-width), transformers vs llama.cpp",
        "",
        "Generated by `bench/speed.py` from `bench/results/speed.json` (cells in `bench/results/speed/`); do not edit.",
        "",
        f"Machine: {results['machine'].get('cpu')}, {results['machine'].get('cores')} cores, torch "
        f"{results['machine'].get('torch')}, llama-cpp-python {results['machine'].get('llama_cpp_python', '?')}; "
        f"{results['settings']['threads']} threads per measurement. {busy_text(rows)} Ratios come from repeats "
        "measured side by side in the same round (each round measures every cell once, in a fresh process). Figures: "
        "median (min–max) over the repeats. Peak RSS shows – where the repeats predate the VmHWM measurement (the "
        "first ones read ru_maxrss, which carries the parent process's peak across fork and exec, and were "
        "discarded).",
        "",
        f"Prefill: one forward of a {PROMPT_TOKENS}-token WikiText-2 prompt. Decode: {NEW_TOKENS} greedy steps with "
        "the KV cache after that prompt. Peak RSS: the measuring process (Python + runtime + model). Size: the "
        "safetensors weights (transformers) or the GGUF file. P3 = (pruned tok/s / dense tok/s) / (dense params / "
        "pruned params); decode, which is bound by memory bandwidth, is also given against the file-size ratio.",
        "",
    ]
    if results.get("agreement"):
        lines += ["## llama.cpp agrees with transformers", "",
                  "Each checkpoint exported by `dietprune export` and run in llama.cpp, against the same checkpoint in "
                  "transformers (float32), on WikiText-2 eval windows of 512 tokens: max |logit difference| / max "
                  "|logit|, share of positions with the same top-1 token, whether 20 greedy tokens after a 32-token "
                  "prompt are identical, and the perplexity of the same tokens (f32 runs with an f32 KV cache, the "
                  "quantized files with llama.cpp's default f16 cache).", "",
                  "| preset | variant | file | tokens | max rel diff | top-1 same | greedy-20 | ppl (transformers: ppl) |",
                  "|---|---|---|---|---|---|---|---|"]
        for a in results["agreement"]:
            for t in ("f32", "q8_0", "q4_k_m"):
                if t not in a:
                    continue
                f = a[t]
                lines.append(f"| {a['preset']} | {a['variant']} | {t} | {a['tokens']} | {f['max_rel_diff']:.1e} | "
                             f"{f['top1_agreement']:.2%} | {'same' if f['greedy20_identical'] else 'differs'} | "
                             f"{f['ppl']:.2f} ({a['hf-f32']['ppl']:.2f}) |")
        lines.append("")
    for preset in PRESETS:
        prs = [r for r in rows if r["preset"] == preset]
        if not prs:
            continue
        lines += [f"## {preset}", "",
                  "| variant | runtime | hidden | MLP | params | size MiB | prefill tok/s | decode tok/s | peak RSS MiB | "
                  "prefill × | P3 prefill | decode × | decode × / bytes × |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]

        def order(v):
            kind, sp = parse_variant(v)
            return (sp > 0, kind, sp)

        for r in sorted(prs, key=lambda r: (RUNTIMES.index(r["runtime"]), order(r["variant"]))):
            extra = ["", "", "", ""]
            if "P3_prefill" in r:
                extra = [f"{r['prefill_speedup']['median']:.2f}", f"{r['P3_prefill']:.2f}",
                         f"{r['decode_speedup']['median']:.2f}", f"{r['decode_vs_bytes']:.2f}"]
            lines.append(f"| {r['variant']} | {r['runtime']} | {r['model']['hidden_size']} | "
                         f"{r['model'].get('intermediate_size') or '–'} | "
                         f"{r['model']['params'] / 1e6:.1f}M | {r['file_bytes'] / mib:.0f} | {fmt(r['prefill'])} | "
                         f"{fmt(r['decode'], 1)} | {rss_text(r)} | " + " | ".join(extra) + " |")
        emb = prs[0]["model"]
        lines += ["", f"Embedding{' (tied with the output head)' if emb['tied'] else ''}: vocabulary "
                  f"{emb['vocab_size']:,} × hidden — {emb['embedding_params'] / emb['params']:.0%} of the dense "
                  "parameters. A hidden-dimension cut shrinks it in proportion, but the output head's matrix-vector "
                  "product over the whole vocabulary stays the largest single cost of each decode step, which bounds "
                  "the decode gain.", ""]
        lines += p3_summary(prs)
        lines += width_note(preset, {r["variant"] for r in prs})
        lines += decision_table(results, preset)
    return "\n".join(lines) + "\n"


def p3_summary(prs) -> list[str]:
    """Which pruned cells reach the goal P3 prefill >= 0.9, and which do not."""
    cells = [r for r in prs if "P3_prefill" in r]
    if not cells:
        return []
    low = [f"{r['variant']} {r['runtime']} ({r['P3_prefill']:.2f})" for r in cells if r["P3_prefill"] < 0.9]
    out = f"P3 prefill at least 0.9 (the goal): {len(cells) - len(low)} of {len(cells)} pruned cells"
    odd = sorted({r["model"]["hidden_size"] for r in cells if r["runtime"] != "hf-f32" and r["P3_prefill"] < 0.9
                  and r["model"]["hidden_size"] % 32})
    lines = [out + (f"; below it: {', '.join(low)}." if low else ".")]
    if odd:
        lines.append(f"In llama.cpp, hidden sizes {', '.join(map(str, odd))} are not multiples of 32: those rows do not "
                     "divide into q8_0 / K-quant blocks (the files keep them f16, which is why they are larger than "
                     "dense q8_0), and even the f16 files run prefill at about half the dense speed. `prune --gguf` "
                     "aligns the hidden size to 32 where the head count allows; on this model it does not (see "
                     "`dietprune.export.gguf_align`), and `diet-width`, whose MLP cut aligns freely, is the cut to "
                     "export.")
    return lines + [""]


def width_note(preset: str, variants: set) -> list[str]:
    """Where the study's diet-width grid chose DIET's own cut, width-P is diet-P (same shapes): say so."""
    out = []
    for pct in (10, 20, 30):
        if f"width-{pct}" in variants:
            continue
        got = study_width(preset, pct / 100)
        if got is None:
            continue
        f, w = got
        before, after = w.get("shape_before", {}), w.get("shape_after", {})
        if after and after.get("channels") == before.get("channels") and after.get("heads") == before.get("heads"):
            out += [f"width-{pct} is not measured separately: at {pct}% the study's diet-width grid chose DIET's own "
                    f"cut on this model (hidden {before.get('hidden')} → {after.get('hidden')}, MLP and heads "
                    f"uncut; `{f.relative_to(ROOT)}`), so its shapes, size and speed are diet-{pct}'s.", ""]
    return out


def busy_text(rows) -> str:
    """How busy the machine was: the non-idle CPU share in the half second before each measurement."""
    busy = [x for r in rows for x in r.get("cpu_busy", [])]
    if not busy:
        return ("**The machine was shared with other agents' jobs while these repeats ran** (its load was not "
                "recorded), so absolute figures are noisy.")
    return (f"Before each of the {len(busy)} measurements the bench read how busy the CPUs were for half a second, "
            f"with none of its own processes running: median {statistics.median(busy):.0%}, max {max(busy):.0%} "
            "of all cores' time.")


def rss_text(r) -> str:
    return "–" if r["peak_rss_bytes"] is None else f"{r['peak_rss_bytes'] / 2**20:.0f}"


def decision_table(results, preset) -> list[str]:
    rows = {(r["variant"], r["runtime"]): r for r in results["rows"] if r["preset"] == preset}
    study = results.get("study", {})
    picks = [p for p in [("dense", "llama-q8_0"), ("diet-20", "llama-q8_0"), ("width-20", "llama-q8_0"),
                         ("dense", "llama-q4_k_m")] if p in rows]
    if len(picks) < 3:
        return []
    agree = {(a["preset"], a["variant"]): a for a in results.get("agreement", [])}
    out = ["### Which file to ship", "",
           "| file | size MiB | prefill tok/s | decode tok/s | 7-task skill retained (float32, study) | "
           "WikiText-2 ppl (float32, study) | ppl of this file in llama.cpp |",
           "|---|---|---|---|---|---|---|"]
    for variant, runtime in picks:
        r = rows[(variant, runtime)]
        s = study.get(f"{preset}/{variant}", {})
        t = runtime.split("-", 1)[1]
        a = agree.get((preset, variant), {}).get(t)
        skill = f"{s['skill_retained']:.1%}" if s else "–"
        ppl = f"{s['ppl']:.2f}" if s else "–"
        here = f"{a['ppl']:.2f}" if a else "–"
        out.append(f"| {variant} {t} | {r['file_bytes'] / 2**20:.0f} | {r['prefill']['median']:.0f} | "
                   f"{r['decode']['median']:.1f} | {skill} | {ppl} | {here} |")
    out += ["", "Skill retained and the study's perplexity are float32 figures from the structured study "
            "(docs/results.md, bench/results/structured.json: the dense model and its 20% DIET checkpoint, same "
            "settings as here; for width-20 the study's diet-width cell, cut without alignment, so its MLP width "
            "differs from this file's by less than 32 channels); quantization's effect on the seven tasks was not "
            "evaluated, its effect on perplexity is the last column (the agreement section's WikiText windows, "
            "shorter than the study's).", ""]
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--presets", default=",".join(PRESETS))
    ap.add_argument("--variants", default="diet-20,width-20,diet-10,diet-30,width-10,width-30",
                    help="dense is always measured; diet-P: DIET at P%% of parameters; width-P: diet-width, align 32")
    ap.add_argument("--runtimes", default=",".join(RUNTIMES))
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--data-dir", default=os.environ.get("DIETPRUNE_DATA_DIR"))
    ap.add_argument("--work", default="~/.cache/dietprune/speed", help="checkpoints, GGUF files, prompts")
    ap.add_argument("--cells-dir", default=str(ROOT / "bench" / "results" / "speed"))
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "speed.json"))
    ap.add_argument("--doc", default=str(ROOT / "docs" / "speed.md"))
    ap.add_argument("--render-only", action="store_true")
    ap.add_argument("--agreement", action="store_true",
                    help="instead of timing: llama.cpp (f32, q8_0, q4_k_m) vs transformers on the --variants checkpoints")
    ap.add_argument("--agreement-windows", type=int, default=4, help="WikiText windows of 512 tokens")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--runtime", help=argparse.SUPPRESS)
    ap.add_argument("--model", help=argparse.SUPPRESS)
    ap.add_argument("--prompt", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args)))
        return 0
    args.presets = [p for p in args.presets.split(",") if p]
    args.variants = [v for v in args.variants.split(",") if v]
    for v in args.variants:
        parse_variant(v)
    args.runtimes = [r for r in args.runtimes.split(",") if r]
    if args.agreement:
        for preset in args.presets:
            for v in args.variants:
                agreement(args, preset, v)
    elif not args.render_only:
        run(args)
    results = collect(args)
    Path(args.out).write_text(json.dumps(results, indent=1))
    Path(args.doc).write_text(render(results))
    print(f"[speed] wrote {args.out} and {args.doc}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
