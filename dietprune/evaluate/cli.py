"""`dietprune eval` and `dietprune compare` subcommands (registered in dietprune.cli.COMMANDS)."""

from __future__ import annotations

EVAL_TASKS = "boolq,rte,hellaswag,winogrande,arc_easy,arc_challenge,openbookqa"


def add_eval(sub):
    p = sub.add_parser("eval", help="zero-shot accuracy and perplexity, as lm-evaluation-harness defines them")
    p.add_argument("model", help="preset, .gguf file, local folder (e.g. a pruned output) or hub id")
    p.add_argument("--tasks", default=EVAL_TASKS,
                   help=f"comma-separated tasks, e.g. {EVAL_TASKS},piqa,wikitext2 (default: the seven DIET tasks); "
                        "other names (or harness:NAME) run as lm-evaluation-harness tasks through dietprune's scorer")
    p.add_argument("--include-path", default=None, help="folder of extra lm-evaluation-harness task YAMLs")
    p.add_argument("--limit", type=int, default=None,
                   help="first N examples per task (wikitext2: N articles and N*2048 tokens)")
    p.add_argument("--data-dir", default=None, help="local task data (else $DIETPRUNE_DATA_DIR, else the hub)")
    p.add_argument("--output", default=None, help="write the results as JSON here")
    p.add_argument("--batch-size", type=int, default=16, help="requests per forward pass (default 16)")
    p.add_argument("--log-samples", dest="log_samples", action="store_true", default=True,
                   help="store per-example log-likelihoods and predictions in the JSON (the default; "
                        "`dietprune compare` needs them for paired statistics)")
    p.add_argument("--no-log-samples", dest="log_samples", action="store_false",
                   help="store the aggregate metrics only")
    p.add_argument("--json", action="store_true", help="print the results as JSON")

    def run(args) -> int:
        import json

        from .. import validate
        from .results import format_table, save_results
        from .runner import evaluate_spec

        if args.limit is not None:
            validate.integer("--limit", args.limit, 1)
        validate.integer("--batch-size", args.batch_size, 1)
        if args.output is not None:  # fail before the long run, not after
            from ..outputs import check_output_file, is_results_file

            check_output_file(args.output, "results", replaceable=is_results_file)
        res = evaluate_spec(args.model, args.tasks, limit=args.limit, data_dir=args.data_dir,
                            batch_size=args.batch_size, log_samples=args.log_samples,
                            include_path=args.include_path)
        import shlex
        import sys

        res["meta"]["command"] = shlex.join(["dietprune", *sys.argv[1:]])
        if args.output is not None:
            save_results(res, args.output)
        if args.json:
            print(json.dumps({"tasks": res["tasks"], "meta": res["meta"]}, indent=2))
        else:
            print(format_table(res))
            secs = res["meta"]["seconds"]
            print(f"\nmodel {args.model} ({res['meta']['fingerprint']}), limit {args.limit}, "
                  f"{sum(secs.values()):.1f}s" + (f" -> {args.output}" if args.output else ""))
        return 0

    return run


def add_compare(sub):
    p = sub.add_parser("compare", help="table (and bar plot) of several `dietprune eval` results files, with "
                                       "paired statistics against the first")
    p.add_argument("results", nargs="+", help="results JSON files; deltas are against the first (the reference)")
    p.add_argument("--json", action="store_true", help="print the comparison (aggregate and paired) as JSON")
    p.add_argument("--boot", type=int, default=2000, help="paired bootstrap replicates (default 2000)")
    p.add_argument("--seed", type=int, default=0, help="bootstrap seed (default 0)")
    p.add_argument("--plot", default=None, help="write a bar plot PNG here")
    p.add_argument("--metric", default="acc_norm", choices=["acc", "acc_norm"],
                   help="acc_norm (default: where a task reports it, else acc) or acc everywhere")

    def run(args) -> int:
        import json

        from .compare import (build_comparison, build_paired, format_comparison, format_paired, plot_comparison,
                              plot_path)

        if args.plot is not None:
            plot_path(args.plot)  # fail before reading the results
        cmp = build_comparison(args.results, metric=args.metric)
        paired = build_paired(args.results, metric=args.metric, n_boot=args.boot, seed=args.seed) \
            if len(args.results) > 1 else None
        if args.json:
            print(json.dumps({"aggregate": cmp, "paired": paired}, indent=2))
        else:
            print(format_comparison(cmp))
            if paired:
                print("\n" + format_paired(paired))
        if args.plot is not None:
            import sys

            print(f"plot -> {plot_comparison(cmp, args.plot)}", file=sys.stderr if args.json else sys.stdout)
        return 0

    return run
