"""Command line: a thin layer that turns flags into API calls.

Every :class:`DietpruneError` (and every flag argparse refuses) becomes one line on stderr and
exit code 2; any other exception is a bug and keeps its traceback. SIGTERM and SIGHUP end a
run like Ctrl-C, with the same clean-up (exit 128 + the signal number). Subcommands are
registered in ``COMMANDS`` as ``name -> "module:function"``; each function adds its parser and
returns the handler, and its module is imported only when that command runs (or for --help).
"""

from __future__ import annotations

import argparse
import dataclasses
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
    "report": "dietprune.evaluate.report:add_report",
    "sparsify": "dietprune.sparsify.cli:add_sparsify",
    "heal": "dietprune.heal:add_heal",
    "export": "dietprune.export:add_export",
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
    p.add_argument("--device", default=None, help="run profiling, repair and the cut there (e.g. cuda, cuda:1, cpu)")
    p.add_argument("--allow-incomplete", action="store_true",
                   help="load a checkpoint whose tensors do not match its config (missing ones random)")


def _diet_tasks():
    from .tasks import DIET_TASKS

    return DIET_TASKS


def add_prune(sub):
    p = sub.add_parser("prune", help="profile, merge, cut and save a smaller checkpoint")
    _common_model_args(p)
    p.add_argument("--sparsity", type=float, default=None, help="fraction of the parameters removed, in [0, 1), "
                   "for every method (default 0.2; --hidden-sparsity gives hidden-dimension methods a fraction of "
                   "hidden dimensions instead)")
    p.add_argument("--output", required=True, help="folder for the pruned checkpoint")
    p.add_argument("--method", default="diet", help="structured method (see `dietprune ls`)")
    p.add_argument("--scores", default=None, help="reuse a scores file written by `dietprune profile`")
    method_options = _config_flags(p)
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"], help="saved dtype")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty output folder")
    p.add_argument("--max-shard-size", default="2GB", help="largest output shard with --low-memory (e.g. 500MB)")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.add_argument("--heal-tokens", type=int, default=None,
                   help="then heal: distil the input model into the pruned one on this many tokens (see `heal`)")
    from .heal import add_heal_args

    add_heal_args(p.add_argument_group("healing (with --heal-tokens)"), prefix="heal-")
    p.add_argument("--gguf", default=None, help="also write the result as this GGUF file for llama.cpp")
    p.add_argument("--gguf-type", default="f16", help="GGUF weight type: f32, f16, bf16, q8_0, q4_k_m (default f16)")

    def run(args) -> int:
        from .pipeline import format_summary, prune

        gguf_note = None
        if args.sparsity is not None and args.hidden_sparsity is not None:
            raise DietpruneError("give --sparsity (parameters) or --hidden-sparsity (hidden dimensions), not both")
        if args.sparsity is None:
            args.sparsity = 0.2
        if args.gguf is not None:
            if args.heal_tokens:
                raise DietpruneError("--gguf with --heal-tokens: heal first, then `dietprune export` the healed folder")
            from .export import prepare_gguf
            from .registry import spec

            hidden = args.sparsity if args.hidden_sparsity is None else args.hidden_sparsity
            args.gguf, align, gguf_note = prepare_gguf(args.model, args.output, args.gguf, args.gguf_type,
                                                       hidden, args.align, args.overwrite,
                                                       widths=spec(args.method).widths)
            if "align" in {f.name for f in dataclasses.fields(spec(args.method).config)}:
                args.align = align
        kwargs = dict(tasks=args.tasks, sparsity=args.sparsity,
                      scores=args.scores, data_dir=args.data_dir, overwrite=args.overwrite,
                      method=args.method, samples=args.samples, seed=args.seed, skip_bos=args.skip_bos,
                      low_memory=args.low_memory, offload=args.offload, device_map=args.device_map,
                      device=args.device, max_shard_size=args.max_shard_size, batch_size=args.batch_size,
                      max_length=args.max_length,
                      **{k: getattr(args, k) for k in ("tap", *method_options) if getattr(args, k) is not None})
        if args.heal_tokens:
            from .heal import prune_then_heal

            return prune_then_heal(args, kwargs)
        res = prune(args.model, output=args.output, dtype=args.dtype, **kwargs)
        from .distributed import is_main

        if not is_main():
            return 0
        exported = None
        if args.gguf is not None:
            from .export import export_gguf

            exported = export_gguf(res.output, args.gguf, args.gguf_type, overwrite=True)
            res.summary["gguf"] = {"path": str(exported.path), "type": exported.gguf_type,
                                   "size_bytes": exported.size_bytes, "notes": [gguf_note] * bool(gguf_note)
                                   + exported.notes}
        print(json.dumps(res.summary, indent=2) if args.json else format_summary(res.summary, res.output))
        if exported is not None and not args.json:
            print(exported.summary() + (f"\n               {gguf_note}" if gguf_note else ""))
        return 0

    return run


def _config_flags(p: argparse.ArgumentParser) -> list[str]:
    """One flag per option of the registered method configs (dietprune.registry); default None = the
    method's own default, and an option the chosen method does not have is refused by its config."""
    from .registry import cli_options

    names = []
    for name, kind, default, meta in cli_options():
        extra = {"choices": list(meta["choices"])} if "choices" in meta else {"type": kind}
        p.add_argument("--" + name.replace("_", "-"), default=None, help=f"{meta['help']} (default {default})",
                       **extra)
        names.append(name)
    return names


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
                       **({"widths": True} if args.widths else {}), low_memory=args.low_memory,
                       offload=args.offload, device_map=args.device_map, device=args.device)
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
        from .models import PRESETS
        from .registry import METHODS
        from .tasks import list_tasks

        print("presets:       " + ", ".join(f"{k} ({v.description})" for k, v in PRESETS.items()))
        print("tasks:         " + ", ".join(list_tasks()))
        print("methods:       " + ", ".join(f"{n} ({m.config.__name__})" for n, m in sorted(METHODS.items())))
        print("architectures: " + ", ".join(supported_model_types()))
        return 0

    return run


class OneLineParser(argparse.ArgumentParser):
    """argparse, with a refused flag as one line (the usage is one --help away)."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> tuple[argparse.ArgumentParser, dict]:
    from . import __version__

    parser = OneLineParser(prog="dietprune", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"dietprune {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    handlers = {}
    for name, target in COMMANDS.items():
        module, fn = target.split(":")
        handlers[name] = getattr(import_module(module), fn)(sub)
    return parser, handlers


def main(argv: list[str] | None = None) -> int:
    from .models import allow_incomplete
    from .signals import terminate_as_interrupt

    parser, handlers = build_parser()
    args = parser.parse_args(argv)
    if os.environ.get("TQDM_DISABLE"):  # tqdm's switch (DIETPRUNE_PROGRESS=0 sets it): transformers' bars too
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    try:
        with terminate_as_interrupt(), allow_incomplete(getattr(args, "allow_incomplete", False)):
            return handlers[args.command](args) or 0
    except DietpruneError as exc:
        print(f"dietprune: error: {one_line(exc)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as exc:
        import signal

        signum = getattr(exc, "signum", signal.SIGINT)
        print(f"dietprune: interrupted ({signal.Signals(signum).name})", file=sys.stderr)
        return 128 + signum
    finally:
        _leave_process_group()


def one_line(exc: BaseException) -> str:
    """An error message on one line (a message quoting a multi-line library error is joined)."""
    return " ".join(part.strip() for part in str(exc).splitlines() if part.strip()) or type(exc).__name__


def _leave_process_group() -> None:
    """Under torchrun / accelerate launch: leave the process group cleanly."""
    dist = sys.modules.get("torch.distributed")
    if dist is not None and dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
