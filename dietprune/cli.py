"""Command line: a thin layer that turns flags into API calls.

Every :class:`DietpruneError` becomes one line on stderr and exit code 2. Subcommands are
registered in ``COMMANDS`` as ``name -> "module:function"``; each function adds its parser and
returns the handler, and its module is imported only when that command runs (or for --help).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from importlib import import_module

from .errors import DietpruneError

COMMANDS = {
    "prune": "dietprune.cli:add_prune",
    "profile": "dietprune.cli:add_profile",
    "ls": "dietprune.cli:add_ls",
    "eval": "dietprune.evaluate.cli:add_eval",
    "compare": "dietprune.evaluate.cli:add_compare",
    "sparsify": "dietprune.sparsify.cli:add_sparsify",
}


def _common_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="preset (gemma3-270m, smollm2-135m), .gguf file, local folder or hub id")
    p.add_argument("--tasks", default=",".join(_diet_tasks()),
                   help="comma-separated task names or name=path.jsonl|csv (default: the seven DIET tasks)")
    p.add_argument("--samples", type=int, default=100, help="calibration samples per task (default 100)")
    p.add_argument("--seed", type=int, default=0, help="seed of the calibration sample")
    p.add_argument("--data-dir", default=None, help="local task data (else $DIETPRUNE_DATA_DIR, else the hub)")
    p.add_argument("--tap", default=None, choices=["residual", "norm-out", "write"],
                   help="where activations are read (default norm-out, see docs/method.md)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-length", type=int, default=512, help="calibration tokens per sample at most")
    p.add_argument("--skip-bos", action="store_true", help="leave the BOS token out of the statistics")
    p.add_argument("--low-memory", action=argparse.BooleanOptionalAction, default=None,
                   help="stream one decoder block at a time from a safetensors folder (default: only when the "
                        "model would not fit in the available RAM)")
    p.add_argument("--offload", default="auto", choices=["auto", "memory", "disk"],
                   help="with --low-memory: keep the activations between blocks in memory or in a scratch file")
    p.add_argument("--device-map", default=None, choices=["auto"],
                   help="spread a model larger than one GPU over all GPUs (accelerate big-model loading)")


def _diet_tasks():
    from .tasks import DIET_TASKS

    return DIET_TASKS


def add_prune(sub):
    p = sub.add_parser("prune", help="profile, merge, cut and save a smaller checkpoint")
    _common_model_args(p)
    p.add_argument("--sparsity", type=float, default=0.2, help="fraction removed, in [0, 1): of hidden dimensions "
                   "for diet (and the other hidden-dimension methods), of parameters for diet-width and the "
                   "head/channel/layer baselines")
    p.add_argument("--output", required=True, help="folder for the pruned checkpoint")
    p.add_argument("--method", default="diet", help="structured method (see `dietprune ls`)")
    p.add_argument("--scores", default=None, help="reuse a scores file written by `dietprune profile`")
    p.add_argument("--merge", default="vote", choices=["vote", "mean", "rank"])
    p.add_argument("--align", type=int, default=1, help="keep a multiple of this many dimensions (e.g. 8, 64)")
    p.add_argument("--repair", default=None,
                   choices=["none", "rms", "ls", "rms+ls", "rms+ls+energy", "refit", "rms+refit", "rms+ls+refit"],
                   help="training-free repair after the cut (default: see docs/method.md)")
    p.add_argument("--ridge", type=float, default=1e-2, help="ridge of the least-squares repair")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"], help="saved dtype")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty output folder")
    p.add_argument("--max-shard-size", default="2GB", help="largest output shard with --low-memory (e.g. 500MB)")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")

    def run(args) -> int:
        from .pipeline import prune

        res = prune(args.model, tasks=args.tasks, sparsity=args.sparsity, output=args.output,
                    scores=args.scores, data_dir=args.data_dir, overwrite=args.overwrite, dtype=args.dtype,
                    method=args.method, samples=args.samples, seed=args.seed, merge=args.merge,
                    align=args.align, ridge=args.ridge, skip_bos=args.skip_bos,
                    low_memory=args.low_memory, offload=args.offload, device_map=args.device_map,
                    max_shard_size=args.max_shard_size,
                    batch_size=args.batch_size, max_length=args.max_length,
                    **({"tap": args.tap} if args.tap else {}), **({"repair": args.repair} if args.repair else {}))
        from .distributed import is_main

        if is_main():
            print(json.dumps(res.summary, indent=2) if args.json else format_summary(res.summary, res.output))
        return 0

    return run


def format_summary(s: dict, output) -> str:
    def mb(n):
        return f"{n / 2**20:,.1f} MiB"

    lines = [
        f"model          {s['model']}  ({s['method']})",
        f"hidden size    {s['hidden_size_before']} -> {s['hidden_size_after']}",
        *(["shape          " + ", ".join(f"{k} {a} -> {b}" for k, (a, b) in s["shape_changes"].items())]
          if set(s.get("shape_changes", {})) - {"hidden_size"} else []),
        f"parameters     {s['params_before']:,} -> {s['params_after']:,}  (-{100 * s['param_reduction']:.1f}%)",
    ]
    if "size_on_disk_bytes" in s:
        lines.append(f"size on disk   {mb(s['size_on_disk_bytes'])}  at {output}")
    secs = s.get("seconds", {})
    lines.append("time           " + ", ".join(f"{k} {v:.1f}s" for k, v in secs.items())
                 + f"  (total {sum(secs.values()):.1f}s)")
    return "\n".join(lines)


def add_profile(sub):
    p = sub.add_parser("profile", help="per-task DIET importance of every hidden dimension")
    _common_model_args(p)
    p.add_argument("--output", required=True, help="scores file (.safetensors)")
    p.add_argument("--gram", action="store_true", help="also store Gram matrices for the least-squares repair")
    p.add_argument("--widths", action="store_true",
                   help="also store MLP-channel and attention-head statistics (for --method diet-width)")

    def run(args) -> int:
        from .pipeline import profile

        prof = profile(args.model, args.tasks, samples=args.samples, seed=args.seed, tap=args.tap,
                       data_dir=args.data_dir, output=args.output, batch_size=args.batch_size,
                       max_length=args.max_length, skip_bos=args.skip_bos, gram=args.gram,
                       **({"widths": True} if args.widths else {}), low_memory=args.low_memory, offload=args.offload, device_map=args.device_map)
        tokens = prof.meta["tokens"]
        from .distributed import is_main, world_size

        if not is_main():
            return 0
        if world_size() > 1:
            print(f"{world_size()} processes, statistics summed across them")
        print(f"profiled {len(prof.tasks)} task(s), {sum(tokens.values()):,} tokens, tap {prof.meta['tap']} "
              f"-> {args.output}")
        return 0

    return run


def add_ls(sub):
    sub.add_parser("ls", help="list presets, tasks, methods and architectures")

    def run(args) -> int:
        from .adapters import supported_model_types
        from .methods import METHODS
        from .models import PRESETS
        from .tasks import list_tasks

        print("presets:       " + ", ".join(f"{k} ({v.description})" for k, v in PRESETS.items()))
        print("tasks:         " + ", ".join(list_tasks()))
        print("methods:       " + ", ".join(sorted(METHODS)))
        print("architectures: " + ", ".join(supported_model_types()))
        return 0

    return run


def build_parser() -> tuple[argparse.ArgumentParser, dict]:
    from . import __version__

    parser = argparse.ArgumentParser(prog="dietprune", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"dietprune {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    handlers = {}
    for name, target in COMMANDS.items():
        module, fn = target.split(":")
        handlers[name] = getattr(import_module(module), fn)(sub)
    return parser, handlers


def main(argv: list[str] | None = None) -> int:
    parser, handlers = build_parser()
    args = parser.parse_args(argv)
    try:
        return handlers[args.command](args) or 0
    except DietpruneError as exc:
        print(f"dietprune: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("dietprune: interrupted", file=sys.stderr)
        return 130
    finally:
        _leave_process_group()


def _leave_process_group() -> None:
    """Under torchrun / accelerate launch: leave the process group cleanly."""
    dist = sys.modules.get("torch.distributed")
    if dist is not None and dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
