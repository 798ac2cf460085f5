"""sparsify(): load, prune every decoder-block linear to a sparsity pattern, save a standard checkpoint."""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from .. import __version__
from ..outputs import check_output_dir, input_paths
from ..pipeline import _as_loaded, save_checkpoint
from ..tasks import parse_tasks
from .config import SparsifyConfig
from .loop import SparsifyReport, sparsify_model


@dataclass
class SparsifyResult:
    model: torch.nn.Module
    tokenizer: object
    config: SparsifyConfig
    report: SparsifyReport
    output: Path | None = None


def sparsify(model, config: SparsifyConfig | None = None, output=None, *, data_dir=None, overwrite: bool = False,
             tokenizer=None, record_error: bool = False, **options) -> SparsifyResult:
    """Sparsify `model` (spec, LoadedModel, or nn.Module with `tokenizer=`); zeros stay in place.

    Extra keyword options fill a SparsifyConfig. A model passed in memory is copied first.
    """
    config = config or SparsifyConfig(**options)
    if config.tasks:
        parse_tasks(config.tasks)  # fail on a bad task name before loading a model
    parse_tasks([config.general])
    out = check_output_dir(output, overwrite, input_paths(model)) if output is not None else None
    t0 = time.perf_counter()
    lm = _as_loaded(model, tokenizer)
    net = lm.model if lm.source != "memory" else copy.deepcopy(lm.model)
    load_s = time.perf_counter() - t0
    report = sparsify_model(net, lm.tokenizer, config, data_dir=data_dir, record_error=record_error)
    report.seconds = {"load": round(load_s, 2), **report.seconds}
    result = SparsifyResult(net, lm.tokenizer, config, report)
    if out is not None:
        import transformers

        meta = {
            "dietprune_version": __version__,
            "kind": "sparsify",
            "source_model": lm.spec,
            "config": config.to_dict(),
            "report": report.to_dict(),
            "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
        }
        t0 = time.perf_counter()
        save_checkpoint(net, lm.tokenizer, out, meta, {}, overwrite=overwrite)
        report.seconds["save"] = round(time.perf_counter() - t0, 2)
        result.output = out
    return result
