"""`dietprune sparsify`: unstructured / N:M pruning with optional general + task fusion."""

from __future__ import annotations

import json

from .config import CRITERIA, METHODS, SparsifyConfig


def add_sparsify(sub):
    d = SparsifyConfig.__dataclass_fields__
    p = sub.add_parser("sparsify", help="unstructured or N:M weight pruning (magnitude, wanda, sparsegpt), zeros in place")
    p.add_argument("model", help="preset (gemma3-270m, smollm2-135m), .gguf file, local folder or hub id")
    p.add_argument("--method", default="wanda", help=f"one of {', '.join(METHODS)} (default wanda)")
    p.add_argument("--pattern", default="unstructured", help="'unstructured' or N:M (N kept in every M), e.g. 2:4")
    p.add_argument("--sparsity", type=float, default=None,
                   help="fraction of weights removed per layer; for N:M it is 1 - N/M and may be left out")
    p.add_argument("--general", default="wikitext2", help="general calibration data (default wikitext2)")
    p.add_argument("--tasks", default="", help="comma-separated task names or name=path.jsonl (needed by --fuse)")
    p.add_argument("--fuse", action="store_true", help="fuse general and task statistics (docs/unstructured.md)")
    p.add_argument("--criterion", default=d["criterion"].default, choices=CRITERIA,
                   help="task-exclusive channels: 'ratio' (t/g > tau) or 'top' (largest rho fraction of t/g)")
    p.add_argument("--tau", type=float, default=d["tau"].default, help="ratio threshold (default %(default)s)")
    p.add_argument("--rho", type=float, default=d["rho"].default, help="fraction for criterion 'top'")
    p.add_argument("--task-weight", type=float, default=d["task_weight"].default,
                   help="weight of task data in the shared channels' norm (default %(default)s)")
    p.add_argument("--boost", type=float, default=d["boost"].default,
                   help="multiplier of exclusive channels' task norm (default %(default)s)")
    p.add_argument("--samples", type=int, default=d["samples"].default, help="general windows (default %(default)s)")
    p.add_argument("--seqlen", type=int, default=d["seqlen"].default, help="tokens per general window")
    p.add_argument("--task-samples", type=int, default=d["task_samples"].default, help="examples per task")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=d["batch_size"].default)
    p.add_argument("--max-length", type=int, default=d["max_length"].default, help="tokens per task example at most")
    p.add_argument("--blocksize", type=int, default=d["blocksize"].default, help="SparseGPT columns per block")
    p.add_argument("--percdamp", type=float, default=d["percdamp"].default, help="SparseGPT dampening")
    p.add_argument("--data-dir", default=None, help="local task data (else $DIETPRUNE_DATA_DIR, else the hub)")
    p.add_argument("--output", default=None, help="folder for the sparse checkpoint (omit for a dry run)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty output folder")
    p.add_argument("--record-error", action="store_true",
                   help="also collect X X^T and report each layer's relative reconstruction error")
    p.add_argument("--json", action="store_true", help="print the report as JSON")

    def run(args) -> int:
        from .api import sparsify

        config = SparsifyConfig(method=args.method, pattern=args.pattern, sparsity=args.sparsity, general=args.general,
                                tasks=args.tasks, fuse=args.fuse, criterion=args.criterion, tau=args.tau,
                                rho=args.rho, task_weight=args.task_weight, boost=args.boost, samples=args.samples,
                                seqlen=args.seqlen, task_samples=args.task_samples, seed=args.seed,
                                batch_size=args.batch_size, max_length=args.max_length, blocksize=args.blocksize,
                                percdamp=args.percdamp)
        res = sparsify(args.model, config, output=args.output, data_dir=args.data_dir, overwrite=args.overwrite,
                       record_error=args.record_error)
        if args.json:
            print(json.dumps(res.report.to_dict(), indent=2))
        else:
            print(format_report(res))
        return 0

    return run


def format_report(res) -> str:
    rep, cfg = res.report, res.config
    lines = [f"{cfg.method} {cfg.pattern} sparsity {cfg.sparsity:g}" + (" + fusion" if cfg.fuse else "")]
    by_block: dict[str, list[str]] = {}
    for name, rec in rep.layers.items():
        block, _, linear = name.rpartition(".")
        block = block.rsplit(".", 1)[0] if block.endswith(("self_attn", "mlp")) else block
        cell = f"{linear.replace('_proj', '')} {rec['sparsity']:.3f}"
        if "exclusive_fraction" in rec:
            cell += f" (excl {rec['exclusive_fraction']:.2f})"
        by_block.setdefault(block, []).append(cell)
    for block, cells in by_block.items():
        lines.append(f"  {block:<18} " + "  ".join(cells))
    lines.append(f"overall sparsity of pruned linears: {rep.overall_sparsity:.4f}")
    if rep.nm_ok is not None:
        lines.append(f"{cfg.pattern} pattern holds in every layer: {rep.nm_ok}")
    if rep.tokens:
        lines.append("calibration tokens: " + ", ".join(f"{k} {v:,}" for k, v in rep.tokens.items()))
    lines.append("time: " + ", ".join(f"{k} {v:.1f}s" for k, v in rep.seconds.items()))
    if res.output is not None:
        lines.append(f"saved to {res.output}")
    return "\n".join(lines)
