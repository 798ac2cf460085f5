"""The public workflow: profile → select → repair → cut → save, with timings.

``prune()`` never touches the caller's model or files: a model passed in memory is copied,
a model named by spec is loaded fresh, and the output is written to a temporary folder beside
the target and renamed into place only when complete.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import __version__, validate
from .adapters import adapter_for, param_count
from .errors import DietpruneError
from .registry import HiddenConfig, MethodContext, PruneConfig, method_config, spec
from .models import LoadedModel, load, model_fingerprint
from .outputs import check_output_dir, check_output_file, check_replaceable, input_paths
from .profile import ProfileConfig, load_calibration
from .profile import profile as run_profile
from .engine import RESIDENT
from .repair import CutPlan, parse_repair, uses_energy, uses_refit
from .stats import Profile
from .surgery import prune_hidden_
from .tasks import parse_tasks


@dataclass
class PruneResult:
    model: torch.nn.Module
    tokenizer: object
    kept: torch.Tensor
    config: PruneConfig
    summary: dict
    output: Path | None = None
    profile: Profile | None = None
    timings: dict = field(default_factory=dict)
    selection: dict = field(default_factory=dict)  # what the method decided (dietprune.json "selection")


def _as_loaded(model, tokenizer=None) -> LoadedModel:
    if isinstance(model, LoadedModel):
        return model
    if isinstance(model, (str, os.PathLike)):
        return load(str(model))
    if not isinstance(model, torch.nn.Module):
        raise DietpruneError(f"model must be a spec (preset, .gguf, folder, hub id), a LoadedModel or a "
                             f"torch module, got {type(model).__name__}")
    if tokenizer is None:
        raise DietpruneError("pass a tokenizer together with an in-memory model")
    return LoadedModel(model=model, tokenizer=tokenizer, spec=getattr(model, "name_or_path", "in-memory"),
                       source="memory")


def profile(model, tasks, samples: int = 100, seed: int = 0, tap: str | None = None, data_dir=None,
            output=None, tokenizer=None, low_memory: bool | None = None, device_map: str | None = None,
            offload: str = "auto", device: str | None = None, **kwargs) -> Profile:
    """Profile per-task DIET importance; optionally save it as safetensors.

    `low_memory`: stream one block at a time from a safetensors folder (None: only when the
    model would not fit in the available RAM). Under torchrun / accelerate launch every process
    profiles its share of the samples, the sums are all-reduced and rank 0 writes `output`.
    `device`: where a model named by spec is loaded (or a streamed model's blocks are read) to run.
    """
    from . import distributed

    device = device or distributed.device()
    parse_tasks(tasks)  # fail on bad task names before loading a model
    validate.known_options(kwargs, ProfileConfig, "profile")
    cfg = ProfileConfig(samples=samples, seed=seed, tap=tap or ProfileConfig.tap, **kwargs)
    validate.run_options(low_memory, offload, device_map)
    if output is not None:
        from .outputs import is_scores_file

        check_output_file(output, "scores", replaceable=is_scores_file)
    examples = load_calibration(tasks, cfg, data_dir)
    folder = _streaming_folder(model, low_memory, device_map)
    if folder is not None and cfg.widths:
        raise DietpruneError("width statistics (--widths) need the model in memory (not yet with --low-memory)")
    lm, net, source = _open(model, tokenizer, folder, device, device_map, private=False)
    prof = run_profile(net, tokenizer or lm.tokenizer, tasks, cfg, data_dir=data_dir, model_spec=lm.spec,
                       examples=examples, source=source, offload=offload,
                       fingerprint=source.fingerprint(net) if source.streamed else None)
    if output is not None and distributed.is_main():
        prof.save(output)
    distributed.barrier()
    return prof


def _open(model, tokenizer, folder, device, device_map, private: bool):
    """(LoadedModel, the network to work on, its engine.WeightSource): a skeleton streamed from
    `folder`, or the model in memory on `device`; with `private`, a model passed in is copied first."""
    if folder is not None:  # a skeleton whose blocks the engine reads from the shards one at a time
        from .streaming import open_streamed

        lm, source = open_streamed(folder, str(model), device or "cpu")
        return lm, lm.model, source
    owned = isinstance(model, (str, os.PathLike))  # loaded here: ours to cut; anything else is copied
    lm = load(str(model), device=device, device_map=device_map) if owned else _as_loaded(model, tokenizer)
    net = copy.deepcopy(lm.model) if private and not owned else lm.model
    if private and device is not None and device_map is None:
        net.to(device)
    return lm, net, RESIDENT


def _streaming_folder(model, low_memory: bool | None, device_map: str | None) -> str | None:
    """The safetensors folder to stream from, or None for the in-memory path."""
    if not isinstance(model, (str, os.PathLike)):
        if low_memory:
            raise DietpruneError("--low-memory streams from a checkpoint folder, not an in-memory model")
        return None
    if low_memory is False:
        return None
    from .models import resolve
    from .streaming import fits_in_memory, is_safetensors_folder

    path, _, source = resolve(str(model))
    streamable = source == "local" and is_safetensors_folder(path)
    if low_memory:
        if device_map is not None:
            raise DietpruneError("choose either --low-memory (CPU streaming) or --device-map")
        if not streamable:
            raise DietpruneError(f"--low-memory streams safetensors checkpoint folders; '{model}' is a {source} "
                                 "model (convert it once: load it and save_pretrained to a folder)")
        return path
    if streamable and device_map is None and not fits_in_memory(path):
        return path
    return None


# ---- checks of a prune's inputs that read statistics or sizes (validate.py is a leaf module) ----
def shard_size(value) -> int:
    """--max-shard-size as a positive number of bytes: an integer or e.g. '500MB', '2GB', '1GiB'."""
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise DietpruneError(f"max_shard_size must be a size like 500MB or 2GB, got {value!r}")
    from .streaming import parse_size

    try:
        size = parse_size(value)
    except (OverflowError, ValueError) as exc:  # 'infGB', '1e999MB'
        raise DietpruneError(f"cannot read size '{value}' (use e.g. 500MB, 2GB)") from exc
    if size < 1:
        raise DietpruneError(f"max_shard_size must be positive, got {value!r}")
    return size


def profile_shapes(prof, model_config, adapter, source="the scores file") -> None:
    """Every tensor of a Profile has the shape this model's statistics have (a scores file
    edited, truncated or written for another width is refused before it is used)."""
    from .profile import block_tap_names

    d, n_layers = int(model_config.hidden_size), int(model_config.num_hidden_layers)
    hidden = prof.meta.get("hidden_size")
    if hidden is not None and hidden != d:
        raise DietpruneError(f"{source} is for hidden size {hidden}, this model has {d}")
    tap = prof.meta.get("tap")
    if not isinstance(tap, str):
        raise DietpruneError(f"{source} does not say which tap it read (meta 'tap' missing)")
    points = n_layers * len(block_tap_names(adapter, tap))

    def expect(name, tensor, shape):
        import torch

        if tuple(tensor.shape) != shape:
            raise DietpruneError(f"{source}: {name} has shape {tuple(tensor.shape)}, this model needs {shape}")
        if not tensor.is_floating_point() or not torch.isfinite(tensor).all():
            raise DietpruneError(f"{source}: {name} holds non-finite or non-float values")

    for task, st in prof.tasks.items():
        expect(f"task/{task}/abs_sum", st.abs_sum, (points, d))
        if not isinstance(st.count, int) or st.count <= 0:
            raise DietpruneError(f"{source}: task {task} counts {st.count!r} tokens")
    norms = prof.norms
    if norms is not None:
        expect("norms/in_sq", norms.in_sq, (n_layers, len(adapter.residual_norms), d))
        expect("norms/final_in_sq", norms.final_in_sq, (d,))
        if (norms.gram is None) != (norms.final_gram is None):
            raise DietpruneError(f"{source} has only one of norms/gram and norms/final_gram")
        if norms.gram is not None:
            expect("norms/gram", norms.gram, (n_layers, len(adapter.reader_norms()), d, d))
            expect("norms/final_gram", norms.final_gram, (d, d))


def load_scores(path):
    """A scores file as a Profile; anything unreadable in it (header, metadata) is one line."""
    from .stats import Profile

    if not isinstance(path, (str, os.PathLike)) or not str(path).strip():
        raise DietpruneError(f"scores must be a scores file path or a Profile, got {path!r}")
    try:
        prof = Profile.load(path)
    except (KeyError, ValueError, TypeError) as exc:
        raise DietpruneError(f"{path} is not a readable dietprune scores file ({type(exc).__name__}: {exc})") from exc
    if not isinstance(prof.meta, dict):
        raise DietpruneError(f"{path} is not a readable dietprune scores file (its metadata is not an object)")
    return prof


def load_checked_scores(scores, model, config: PruneConfig, fingerprint: str, use_rms: bool,
                        use_ls: bool) -> Profile:
    """A scores file (or Profile) for this model, tasks and repairs, or a one-line error."""
    prof = scores if isinstance(scores, Profile) else load_scores(scores)
    _check_scores(prof, model, config, fingerprint)
    profile_shapes(prof, model.config, adapter_for(model))
    if use_ls and (prof.norms is None or prof.norms.gram is None):
        raise DietpruneError("the scores file has no Gram statistics, which --repair ls needs: "
                             "profile with --gram, or prune with --repair rms")
    if use_rms and prof.norms is None:
        raise DietpruneError("the scores file has no norm statistics needed by --repair rms")
    if spec(config.method).widths and (prof.widths is None or (use_ls and prof.widths.mlp is None)):
        raise DietpruneError(f"the scores file has no width statistics, which --method {config.method} needs: "
                             "profile with --widths (and --gram for the least-squares repair)")
    return prof


SHAPE_KEYS = ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "intermediate_size")


def config_shape(config) -> dict:
    return {k: getattr(config, k, None) for k in SHAPE_KEYS}


def _check_scores(prof: Profile, model, config: PruneConfig, fingerprint: str) -> None:
    if prof.meta.get("fingerprint") != fingerprint:
        raise DietpruneError(
            f"scores belong to another model (fingerprint {prof.meta.get('fingerprint')}, this model {fingerprint})"
        )
    _check_tasks(prof, config)


def _check_tasks(prof: Profile, config: PruneConfig) -> None:
    wanted = [t.name for t in parse_tasks(config.tasks)]
    if sorted(prof.tasks) != sorted(wanted):
        raise DietpruneError(f"scores cover tasks {sorted(prof.tasks)}, asked for {sorted(wanted)}")


def prune(model, tasks=None, sparsity: float = 0.2, output=None, *, config: PruneConfig | None = None,
          scores=None, data_dir=None, overwrite: bool = False, tokenizer=None, dtype: str | None = None,
          low_memory: bool | None = None, device_map: str | None = None, max_shard_size="2GB",
          offload: str = "auto", device: str | None = None, **options) -> PruneResult:
    """Prune hidden dimensions of `model` and (if `output`) save a standard checkpoint.

    `model` is a spec (preset, .gguf, folder, hub id), a LoadedModel, or an nn.Module with
    `tokenizer=`. Extra keyword options fill a PruneConfig (method, samples, merge, tap, repair...).
    `device` (e.g. "cuda"): where profiling, repair and the cut run (the copy or the loaded model is
    moved there; a streamed model's blocks are read onto it); None leaves the model where it is.
    """
    if config is not None and not isinstance(config, PruneConfig):
        raise DietpruneError(f"config must be a PruneConfig, got {type(config).__name__}")
    if config is None:
        if tasks is not None:
            options["tasks"] = tasks
        config = method_config(options.pop("method", "diet"), sparsity=sparsity, **options)
    task_list = parse_tasks(config.tasks)
    validate.run_options(low_memory, offload, device_map, dtype, overwrite)
    shard_size(max_shard_size)
    out = check_output_dir(output, overwrite, input_paths(model)) if output is not None else None
    if dtype not in (None, "float32", "bfloat16", "float16"):
        raise DietpruneError(f"dtype must be float32, bfloat16 or float16, got {dtype}")
    if scores is not None and not isinstance(scores, Profile):
        scores = load_scores(scores)  # a missing or damaged scores file fails before any loading
    if scores is not None:
        _check_tasks(scores, config)
    method = spec(config.method)
    repair = config.repair if isinstance(config, HiddenConfig) else "none"
    use_rms, use_ls = parse_repair(repair)
    use_refit = uses_refit(repair)
    timings: dict[str, float] = {}
    if device is None and device_map is None:
        from . import distributed

        device = distributed.device()
    pcfg = ProfileConfig.of(config, gram=use_ls, widths=method.widths)
    examples = None
    if use_refit or (scores is None and (method.needs_profile or ((use_rms or use_ls)
                                                                    and not method.self_calibrated))):
        t0 = time.perf_counter()
        examples = load_calibration(task_list, pcfg, data_dir)  # data errors before the model loads
        timings["data"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    folder = _streaming_folder(model, low_memory, device_map)
    if folder is not None and use_refit and dtype not in (None, "float32"):
        raise DietpruneError("--repair refit with --low-memory re-fits the float32 shards it writes: "
                             "save as float32 (no --dtype), or prune in memory")
    if folder is not None and method.widths:
        raise DietpruneError(f"--method {config.method} needs the model in memory (not yet with --low-memory)")
    lm, net, source = _open(model, tokenizer, folder, device, device_map, private=True)
    fingerprint = source.fingerprint(net) if source.streamed else model_fingerprint(net)
    adapter = adapter_for(net)
    timings["load"] = time.perf_counter() - t0
    d = net.config.hidden_size
    params_before = param_count(net)
    shape_before = config_shape(net.config)
    if isinstance(config, HiddenConfig):
        from .methods import width_align

        width_align(net, config)  # an --align the width cannot hold fails before profiling

    t0 = time.perf_counter()
    prof: Profile | None = None
    if scores is not None:
        prof = load_checked_scores(scores, net, config, fingerprint, use_rms, use_ls)
        config = scores_config(config, prof, use_refit)
    elif examples is not None:
        prof = run_profile(net, lm.tokenizer, task_list, pcfg, data_dir=data_dir, fingerprint=fingerprint,
                           model_spec=lm.spec, examples=examples, source=source, offload=offload)
    timings["profile"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    selection = _select(method.function(), net, config, MethodContext(profile=prof, tokenizer=lm.tokenizer,
                                                                      data_dir=data_dir, source=source), source)
    kept = selection.kept
    timings["select"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    repair_info, plan = {}, None
    if selection.apply is not None:
        if not source.streamed:  # a streamed model is cut while its checkpoint is written
            selection.apply(net)
    else:
        repair_prof = selection.repair_profile if selection.repair_profile is not None else prof
        plan = CutPlan(net, kept, None if repair_prof is None else repair_prof.norms, rms=use_rms, ls=use_ls,
                       ridge=config.ridge, energy=uses_energy(repair), adapter=adapter)
        if use_rms:
            repair_info["rms_factors"] = plan.rms_factors()
        if not source.streamed:
            repair_info.update(cut_resident(net, lm.tokenizer, plan, config, examples, use_refit))
        elif use_refit:  # the dense targets, streamed now; the re-fit runs on the shards once they are written
            from .refit import capture_norm_outputs, fit_batch

            fit = fit_batch(net, lm.tokenizer, examples, config.fit_samples, config.fit_max_length, config.seed,
                            device=source.device(net))
            targets = capture_norm_outputs(net, *fit, adapter=adapter, source=source)
    timings["cut"] = time.perf_counter() - t0

    summary = {"model": lm.spec, "method": config.method, "hidden_size_before": d,
               "hidden_size_after": len(kept) if source.streamed and kept is not None else net.config.hidden_size,
               "params_before": params_before}
    if source.streamed:
        summary["low_memory"] = True
    else:
        summary["params_after"] = param_count(net)
        summary["param_reduction"] = 1 - summary["params_after"] / summary["params_before"]
        summary["shape_changes"] = {k: [v, config_shape(net.config)[k]] for k, v in shape_before.items()
                                    if config_shape(net.config)[k] != v}
    result = PruneResult(None if source.streamed else net, lm.tokenizer, kept, config, summary, profile=prof,
                         timings=timings, selection=selection.info)
    from . import distributed

    if out is not None and distributed.is_main():
        check_finite(net)
        t0 = time.perf_counter()
        tensors = dict(selection.tensors)
        if kept is not None:
            tensors["kept"] = kept.to(torch.int64)
        write_model = None
        if source.streamed:
            from .streaming import parse_size, stream_apply, stream_checkpoint

            def write_model(tmp: Path) -> None:
                size = parse_size(max_shard_size)
                written = stream_checkpoint(net, source.ckpt, plan, tmp, dtype=dtype, max_shard_bytes=size) \
                    if plan is not None else stream_apply(net, source.ckpt, selection.apply, tmp, dtype, size)
                if use_refit and plan is not None:
                    from .refit import refit_streamed_

                    repair_info["refit_relative_error"] = _refit_summary(
                        refit_streamed_(tmp, source.ckpt, targets, *fit, ridge=config.refit_ridge))
                summary["params_after"] = written["params_after"]
                summary["param_reduction"] = 1 - summary["params_after"] / summary["params_before"]

        def meta():
            return _metadata(lm, config, kept, summary, fingerprint, prof, selection, repair_info)

        save_checkpoint(net, lm.tokenizer, out, meta, tensors, overwrite=overwrite, dtype=dtype,
                        write_model=write_model)
        timings["save"] = time.perf_counter() - t0
        result.output = out
        summary["size_on_disk_bytes"] = dir_size(out)
    summary["seconds"] = {k: round(v, 2) for k, v in timings.items()}
    return result


def _select(method_fn, net, config: PruneConfig, ctx: MethodContext, source):
    """Run the method; on a streamed skeleton any read of a (meta) weight is a one-line error."""
    if not source.streamed:
        return method_fn(net, config, ctx)
    from .streaming import NoWeights, WeightsNeeded

    refuse = f"method '{config.method}' needs the weights in memory; run it without --low-memory"
    try:
        with NoWeights():
            selection = method_fn(net, config, ctx)
    except WeightsNeeded as exc:
        raise DietpruneError(refuse) from exc
    if selection.apply is None and (selection.kept is None or selection.kept.device.type == "meta"):
        raise DietpruneError(refuse)
    return selection


def cut_resident(net, tokenizer, plan: CutPlan, config: PruneConfig, examples, use_refit: bool) -> dict:
    """Repair and cut a resident model in place (then the re-fit, when asked); returns repair records."""
    info = {}
    if use_refit:
        # the targets are the dense model's norm outputs, so they are read before the RMS correction
        # rescales the norm gains (afterwards they would be the dense outputs times that factor)
        from .refit import capture_norm_outputs, fit_batch, reader_weights

        fit = fit_batch(net, tokenizer, examples, config.fit_samples, config.fit_max_length, config.seed)
        targets, dense_weights = capture_norm_outputs(net, *fit, adapter=plan.adapter), reader_weights(net,
                                                                                                        plan.adapter)
    plan.repair_(net)
    prune_hidden_(net, plan.kept, plan.adapter)
    if use_refit:
        from .refit import refit_readers_

        errors = refit_readers_(net, dense_weights, targets, *fit, ridge=config.refit_ridge, adapter=plan.adapter)
        info["refit_relative_error"] = _refit_summary(errors)
    return info


def scores_config(config: PruneConfig, prof: Profile, use_refit: bool) -> PruneConfig:
    """The config as run with a scores file: its profiling options are the file's, not the
    (unused) ones given, so dietprune.json records what was done. A re-fit still draws its own
    calibration sample with the given samples and seed."""
    import dataclasses

    meta = prof.meta
    used = {k: meta[k] for k in ("tap", "skip_bos", "max_length") if k in meta}
    if not use_refit:
        used.update({k: v for k, v in (("samples", meta.get("requested_samples")), ("seed", meta.get("seed")))
                     if v is not None})
    names = {f.name for f in dataclasses.fields(config)}  # a head/layer method's config has no tap
    return dataclasses.replace(config, **{k: v for k, v in used.items() if k in names})


def check_finite(model) -> None:
    """No checkpoint with NaN/inf weights is written (e.g. a repair fed degenerate statistics)."""
    for name, p in model.named_parameters():
        if p.is_meta:  # a streamed skeleton: its tensors are checked as the shard writer computes them
            continue
        if not torch.isfinite(p).all():
            raise DietpruneError(f"the pruned weights are not finite ({name}); nothing was written "
                                 "(try another --repair or a larger --ridge)")


def _refit_summary(errors: dict) -> dict:
    return {"before": sum(b for b, _ in errors.values()) / len(errors),
            "after": sum(a for _, a in errors.values()) / len(errors)}


def format_summary(s: dict, output) -> str:
    """The human-readable lines of a PruneResult.summary (what `dietprune prune` prints)."""
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


def _metadata(lm, config, kept, summary, fingerprint, prof, selection, repair_info) -> dict:
    import transformers

    meta = {
        "dietprune_version": __version__,
        "method": config.method,
        "config": config.to_dict(),
        "source_model": lm.spec,
        "source_fingerprint": fingerprint,
        "kept_indices": None if kept is None else kept.tolist(),
        "summary": {k: v for k, v in summary.items() if k != "seconds"},
        "selection": selection.info,
        "repair": repair_info,
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
    }
    if prof is not None:
        meta["profile"] = prof.meta
    return meta


def dir_size(path: Path) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def save_checkpoint(model, tokenizer, output: Path, meta, tensors: dict, overwrite: bool = False,
                    dtype: str | None = None, write_model=None) -> Path:
    """Write model + tokenizer + dietprune.json into a temp folder, then rename it into place.

    `write_model(folder)` replaces ``model.save_pretrained`` (the streaming writer); `meta` may be
    a function, called once the weights are written.
    """
    from safetensors.torch import save_file

    from . import signals
    from .outputs import publish_mode

    output = Path(output)
    # a symlinked output: the folder it points at is replaced, and the link keeps pointing at it
    dest = output.resolve() if output.is_symlink() else output
    tmp = old = None
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-", dir=dest.parent))
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it private; a checkpoint folder is not
        if write_model is not None:
            write_model(tmp)
        else:
            if dtype and dtype != "float32":
                model = copy.deepcopy(model).to(getattr(torch, dtype))
            model.save_pretrained(tmp, safe_serialization=True)
        if callable(meta):
            meta = meta()
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        (tmp / "dietprune.json").write_text(json.dumps(meta, indent=2))
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp / "dietprune_mask.safetensors"))
        for f in tmp.iterdir():
            publish_mode(f)  # safetensors writes 0600; every file of a checkpoint gets the same mode
        if dest.exists():
            if any(dest.iterdir()):
                if not overwrite:
                    raise DietpruneError(f"output folder {output} appeared while pruning and is not empty")
                check_replaceable(dest)  # again: the folder may have changed since the start
            old = dest.with_name(f".{dest.name}.old-{os.getpid()}")
        with signals.deferred():  # no signal between moving the old folder away and the new one in
            if old is not None:
                dest.rename(old)
                try:
                    tmp.rename(dest)
                except OSError:
                    old.rename(dest)
                    raise
            else:
                tmp.rename(dest)
            tmp = None
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except OSError as exc:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        raise DietpruneError(f"cannot write checkpoint to {output}: {exc.strerror or exc}") from exc
    except BaseException:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        elif old is not None:  # interrupted right after the swap: the replaced folder goes too
            shutil.rmtree(old, ignore_errors=True)
        raise
    return output
