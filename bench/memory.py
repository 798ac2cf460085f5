"""Peak memory and wall time of `dietprune prune`: in memory vs layer streaming (--low-memory).

Every run is a child process (`python -m dietprune prune ...`); its peak resident set size is
the child's own VmHWM (printed as it exits; the kernel's ru_maxrss from os.wait4 is kept too, but
it can carry this parent's peak across fork + exec) and, as a cross-check, psutil polling every 50 ms. Cases:

- the two presets (GGUF files), converted once to safetensors folders (load + save_pretrained,
  float32) under the bench directory, since streaming reads safetensors only;
- a synthetic Llama-architecture checkpoint with random weights written here tensor by tensor
  (float32, sharded safetensors, a small vocabulary so the embeddings stay small), streamed;
- a 2-block copy of the same architecture, pruned both ways, outputs compared tensor by tensor.

The streamed synthetic output is then loaded with plain transformers in a fresh process.
Writes bench/results/memory.json.

    python bench/memory.py                     # everything (about 15 min on 2 CPU cores)
    python bench/memory.py --skip-presets
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import torch

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results" / "memory.json"


# ---- measuring a child process -----------------------------------------------------------------
def measured(cmd: list[str], env: dict | None = None) -> dict:
    """Run `cmd`; wall time, peak RSS (kernel ru_maxrss via wait4, and psutil polling), stdout."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=dict(os.environ, **(env or {})))
    polled = [0]
    done = threading.Event()

    def poll():
        try:
            ps = psutil.Process(proc.pid)
            while not done.is_set():
                try:
                    rss = ps.memory_info().rss + sum(c.memory_info().rss for c in ps.children(recursive=True))
                    polled[0] = max(polled[0], rss)
                except psutil.Error:
                    pass
                time.sleep(0.05)
        except psutil.Error:
            pass

    watcher = threading.Thread(target=poll, daemon=True)
    watcher.start()
    out_chunks, err_chunks = [], []
    readers = [threading.Thread(target=lambda s, b: b.append(s.read()), args=(proc.stdout, out_chunks)),
               threading.Thread(target=lambda s, b: b.append(s.read()), args=(proc.stderr, err_chunks))]
    for r in readers:
        r.start()
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    done.set()
    for r in readers:
        r.join()
    proc.returncode = os.waitstatus_to_exitcode(status)
    stdout, stderr = "".join(out_chunks), "".join(err_chunks)
    if proc.returncode != 0:
        raise SystemExit(f"failed ({proc.returncode}): {' '.join(cmd)}\n{stderr[-3000:]}")
    # the child's own VmHWM when it reports one (ru_maxrss can carry this parent's peak across fork + exec)
    hwm = [int(ln.split()[1]) * 1024 for ln in stderr.splitlines() if ln.startswith("VmHWM:")]
    return {"wall_s": round(wall, 2), "peak_rss_bytes": hwm[-1] if hwm else usage.ru_maxrss * 1024,
            "peak_rss_source": "VmHWM" if hwm else "ru_maxrss", "ru_maxrss_bytes": usage.ru_maxrss * 1024,
            "peak_rss_polled_bytes": polled[0], "stdout": stdout}


def folder_size(path: Path) -> int:
    return sum(f.stat().st_size for f in Path(path).glob("*.safetensors"))


def gib(n: int) -> float:
    return round(n / 2**30, 3)


# ---- inputs -------------------------------------------------------------------------------------
CONVERT = r"""
import sys
from dietprune.models import load
lm = load(sys.argv[1])
lm.model.save_pretrained(sys.argv[2], max_shard_size="500MB")
lm.tokenizer.save_pretrained(sys.argv[2])
"""


def convert_preset(name: str, root: Path) -> Path:
    folder = root / f"{name}-safetensors"
    if not (folder / "config.json").is_file():
        tmp = root / f".{name}-tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        subprocess.run([sys.executable, "-c", CONVERT, name, str(tmp)], check=True)
        tmp.rename(folder)
    return folder


def bench_tokenizer(vocab_size: int, data_dir: str):
    """A byte-level BPE tokenizer trained on the calibration texts (the synthetic model's vocabulary)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    texts = []
    for f in sorted(Path(data_dir).glob("*/calib.jsonl")):
        for line in f.read_text().splitlines()[:2000]:
            texts += [v for v in json.loads(line).values() if isinstance(v, str)]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<pad>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>")


def write_synthetic(folder: Path, layers: int, hidden: int, intermediate: int, vocab: int, data_dir: str,
                    seed: int = 0) -> Path:
    """A random-weight Llama checkpoint, written one tensor at a time (never whole in memory)."""
    from transformers import AutoConfig

    from dietprune.streaming import ShardWriter, skeleton

    if (folder / "config.json").is_file():
        return folder
    tmp = folder.with_name(f".{folder.name}-tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    config = AutoConfig.for_model("llama", vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate,
                                  num_hidden_layers=layers, num_attention_heads=hidden // 128,
                                  num_key_value_heads=max(1, hidden // 512), head_dim=128,
                                  max_position_embeddings=4096, tie_word_embeddings=False, bos_token_id=1,
                                  eos_token_id=2, pad_token_id=0)
    config.save_pretrained(tmp)
    model = skeleton(tmp)
    plan = [(n, tuple(p.shape), torch.float32) for n, p in model.named_parameters()]
    writer = ShardWriter(tmp, plan, 500 * 2**20)
    g = torch.Generator().manual_seed(seed)
    for name, shape, _ in plan:
        if len(shape) == 1:  # norm gains
            t = 1.0 + 0.1 * torch.randn(shape, generator=g)
        else:
            t = torch.randn(shape, generator=g) * (0.5 / shape[1] ** 0.5 if "embed" not in name else 1.0)
        writer.write(name, t)
    writer.close()
    bench_tokenizer(vocab, data_dir).save_pretrained(tmp)
    tmp.rename(folder)
    return folder


# ---- one prune ----------------------------------------------------------------------------------
def prune_run(model: Path, out: Path, low_memory: bool, args) -> dict:
    cmd = [sys.executable, "-c", PEAK, "prune", str(model), "--tasks", args.tasks, "--samples",
           str(args.samples), "--max-length", str(args.max_length), "--batch-size", str(args.batch_size),
           "--sparsity", str(args.sparsity), "--output", str(out), "--overwrite", "--json",
           "--low-memory" if low_memory else "--no-low-memory", "--max-shard-size", args.max_shard_size]
    r = measured(cmd, env={"DIETPRUNE_PROGRESS": "0", "TOKENIZERS_PARALLELISM": "false"})
    summary = json.loads(r.pop("stdout"))
    meta = json.loads((out / "dietprune.json").read_text())
    prof = meta["profile"]
    tokens = sum(prof["tokens"].values())
    layers = json.loads((model / "config.json").read_text())["num_hidden_layers"]
    disk = folder_size(model)
    res = {"mode": "streaming" if low_memory else "in-memory", **r,
           "peak_rss_gib": gib(r["peak_rss_bytes"]), "checkpoint_bytes": disk, "checkpoint_gib": gib(disk),
           "peak_rss_over_checkpoint": round(r["peak_rss_bytes"] / disk, 3),
           "calibration_tokens": tokens, "blocks": layers, "seconds": summary["seconds"],
           "hidden_size": [summary["hidden_size_before"], summary["hidden_size_after"]],
           "output_bytes": summary["size_on_disk_bytes"]}
    if low_memory:
        block_s = prof["engine"]["block_seconds"]
        res["block_seconds_mean"] = round(sum(block_s) / len(block_s), 3)
        # reading the blocks' weights from the shards, inside block_seconds
        res["block_read_seconds_mean"] = round(prof["engine"]["seconds"]["onload"] / len(block_s), 3)
        res["padded_tokens"] = prof["engine"]["tokens_with_padding"]
        res["s_per_1k_tokens_per_block"] = round(res["block_seconds_mean"] / (tokens / 1000), 4)
    else:  # the whole forward pass divided evenly over the blocks
        res["s_per_1k_tokens_per_block"] = round(summary["seconds"]["profile"] / layers / (tokens / 1000), 4)
    return res


COMPARE = r"""
import json, sys, torch
from dietprune.streaming import Checkpoint
a, b = Checkpoint(sys.argv[1]), Checkpoint(sys.argv[2])
assert sorted(a.weight_map) == sorted(b.weight_map), "different tensor names"
worst = 0.0
for name in a.weight_map:
    x, y = a.get(name), b.get(name)
    assert x.shape == y.shape and x.dtype == y.dtype, name
    worst = max(worst, float((x.double() - y.double()).abs().max()))
print(json.dumps({"tensors": len(a.weight_map), "max_abs_diff": worst}))
"""

HWM = "print(next(ln for ln in open('/proc/self/status') if ln.startswith('VmHWM:')).strip(), file=sys.stderr)"
PEAK = f"""
import sys
from dietprune.cli import main
rc = main(sys.argv[1:])
{HWM}
sys.exit(rc)
"""

FIXED = f"""
import sys
import dietprune.cli, dietprune.pipeline  # noqa: F401
from transformers import AutoTokenizer
AutoTokenizer.from_pretrained(sys.argv[1])
{HWM}
"""

RELOAD = r"""
import json, sys, torch
assert "dietprune" not in sys.modules
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained(sys.argv[1]).eval()
ids = torch.randint(3, model.config.vocab_size, (1, 32), generator=torch.Generator().manual_seed(0))
with torch.no_grad():
    logits = model(input_ids=ids).logits
print(json.dumps({"hidden_size": model.config.hidden_size, "logits_finite": bool(torch.isfinite(logits).all()),
                  "params": sum(p.numel() for p in model.parameters())}))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dir", default=os.environ.get("DIETPRUNE_BENCH_DIR", "/tmp/dietprune-bench"))
    ap.add_argument("--data-dir", default=os.environ.get("DIETPRUNE_DATA_DIR", "/work/shared/benchdata"))
    ap.add_argument("--tasks", default="boolq,arc_easy,hellaswag")
    ap.add_argument("--samples", type=int, default=8)
    ap.add_argument("--max-length", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--sparsity", type=float, default=0.25)
    ap.add_argument("--max-shard-size", default="500MB")
    ap.add_argument("--layers", type=int, default=20, help="blocks of the synthetic checkpoint")
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--intermediate", type=int, default=5632)
    ap.add_argument("--vocab", type=int, default=2048)
    ap.add_argument("--skip-presets", action="store_true")
    ap.add_argument("--presets", default="gemma3-270m,smollm2-135m")
    ap.add_argument("--skip-synthetic", action="store_true")
    ap.add_argument("--fresh", action="store_true", help="drop earlier cases from the results file")
    ap.add_argument("--output", default=str(RESULTS))
    args = ap.parse_args()
    os.environ["DIETPRUNE_DATA_DIR"] = args.data_dir
    root = Path(args.dir)
    root.mkdir(parents=True, exist_ok=True)
    results = {"machine": {"cpus": os.cpu_count(), "ram_gib": gib(psutil.virtual_memory().total),
                           "python": platform.python_version(), "torch": torch.__version__,
                           "load_average_1m_at_start": round(os.getloadavg()[0], 2),
                           "note": "shared machine: other jobs ran at the same time; wall times are noisy"},
               "settings": {k: v for k, v in vars(args).items() if k not in ("output", "dir", "data_dir")},
               "cases": {}}
    if not args.fresh and Path(args.output).is_file():  # keep the cases this run does not redo
        results["cases"] = json.loads(Path(args.output).read_text()).get("cases", {})

    def save():
        results["machine"]["load_average_1m_at_save"] = round(os.getloadavg()[0], 2)
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(json.dumps(results, indent=2) + "\n")

    def show(case, r):
        print(f"{case:28s} {r['mode']:10s} peak RSS {r['peak_rss_gib']:6.2f} GiB  "
              f"ckpt {r['checkpoint_gib']:6.2f} GiB  ratio {r['peak_rss_over_checkpoint']:.2f}  "
              f"wall {r['wall_s']:7.1f} s  {r['s_per_1k_tokens_per_block']:.4f} s/1k tok/block", flush=True)

    cases = []
    if not args.skip_presets:
        for preset in args.presets.split(","):
            cases.append((preset, convert_preset(preset, root), True))
    if not args.skip_synthetic:
        small = write_synthetic(root / "synth-llama-2blocks", 2, args.hidden, args.intermediate, args.vocab,
                                args.data_dir)
        cases.append(("synthetic-llama-2blocks", small, True))
        big = write_synthetic(root / f"synth-llama-{args.layers}blocks", args.layers, args.hidden,
                              args.intermediate, args.vocab, args.data_dir)
        cases.append((f"synthetic-llama-{args.layers}blocks", big, False))

    for case, folder, both in cases:
        runs = {}
        # the fixed cost: Python, torch, transformers and dietprune imported and the model's tokenizer loaded
        fixed = measured([sys.executable, "-c", FIXED, str(folder)])
        runs["fixed_cost"] = {"peak_rss_gib": gib(fixed["peak_rss_bytes"]),
                              "peak_rss_polled_gib": gib(fixed["peak_rss_polled_bytes"]),
                              "what": "python -c: import dietprune.cli, dietprune.pipeline, transformers; "
                                      "AutoTokenizer.from_pretrained(folder)"}
        print(f"{case:28s} fixed cost (imports + tokenizer) {runs['fixed_cost']['peak_rss_gib']:.2f} GiB", flush=True)
        for low in ((False, True) if both else (True,)):
            out = root / f"out-{case}-{'low' if low else 'mem'}"
            runs["streaming" if low else "in-memory"] = r = prune_run(folder, out, low, args)
            show(case, r)
            results["cases"][case] = runs
            save()
        if both:
            cmp = subprocess.run([sys.executable, "-c", COMPARE, str(root / f"out-{case}-mem"),
                                  str(root / f"out-{case}-low")], capture_output=True, text=True, check=True)
            runs["streaming_vs_in_memory"] = json.loads(cmp.stdout.strip().splitlines()[-1])
            print(f"{case:28s} streamed checkpoint vs in-memory: {runs['streaming_vs_in_memory']}", flush=True)
        else:
            reload = measured([sys.executable, "-c", RELOAD, str(root / f"out-{case}-low")])
            runs["plain_transformers_reload"] = {**json.loads(reload["stdout"].strip().splitlines()[-1]),
                                                 "peak_rss_gib": gib(reload["peak_rss_bytes"])}
            print(f"{case:28s} reload with plain transformers: {runs['plain_transformers_reload']}", flush=True)
        results["cases"][case] = runs
        save()
        for low in ("mem", "low"):
            shutil.rmtree(root / f"out-{case}-{low}", ignore_errors=True)
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
