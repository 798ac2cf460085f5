"""``python -m dietprune.harness ...``: lm-evaluation-harness's own command line, with ``--model dietprune``.

    python -m dietprune.harness --model dietprune --model_args pretrained=out/pruned --tasks arc_easy --limit 20
    python -m dietprune.harness --model hf --model_args pretrained=out/pruned,add_bos_token=False ...  # same CLI

lm-eval 0.4.13 looks models up in its own table and reads no entry points, so its ``lm_eval``
command cannot see a third-party model. This module registers dietprune's backend
(:mod:`dietprune.evaluate.lm_eval_backend`) and hands every argument to lm-eval's CLI unchanged.
"""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> None:
    from .errors import DietpruneError

    try:
        from .evaluate import lm_eval_backend  # noqa: F401  - registers "dietprune"
    except DietpruneError as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    from lm_eval.__main__ import cli_evaluate

    if argv is not None:
        sys.argv = [sys.argv[0], *argv]
    cli_evaluate()


if __name__ == "__main__":
    main()
