"""The block-sequential engine, the typed registry, and device-correct repairs (CPU-only checks)."""

import subprocess
import sys

import pytest
import torch

from dietprune import engine
from dietprune.adapters import adapter_for, get_module
from dietprune.errors import DietpruneError
from dietprune.profile import DietObserver
from tiny import tiny_model, tiny_tokenizer


@pytest.fixture
def data_dir(tiny_task_dir):
    """These tests need well-formed rows, not real ones: the committed tiny task set."""
    return tiny_task_dir


def _seqs(n=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(4, 128, (int(torch.randint(3, 14, (1,), generator=g)),), generator=g).tolist()
            for _ in range(n)]


class _Record(engine.Observer):
    """Keeps every block's input, per batch."""

    def __init__(self):
        self.inputs = {}

    def attach(self, block, index, run):
        return [block.register_forward_pre_hook(
            lambda m, args: self.inputs.setdefault(index, []).append(args[0].clone()))]


class _ZeroMlp(engine.Observer):
    """Changes block `at` once its statistics pass is over (as a pruning observer does)."""

    sequential = True

    def __init__(self, at):
        self.at = at

    def finish_block(self, block, index, run):
        if index != self.at:
            return False
        get_module(block, "mlp.down_proj").weight.zero_()
        return True


@pytest.mark.parametrize("arch", ["gemma3_text", "llama"])
def test_changed_block_is_rerun_before_the_next_block(arch):
    model, tok = tiny_model(arch), tiny_tokenizer()
    batches = engine.make_batches(_seqs(), 2, tok)
    rec = _Record()
    engine.run(model, batches, [_ZeroMlp(0), rec])
    # after the run the model holds the changed block 0: a plain forward of it feeds block 1 what the engine fed
    seen = []
    h = adapter_for(model).blocks(model)[1].register_forward_pre_hook(lambda m, a: seen.append(a[0].clone()))
    with torch.no_grad():
        for b in batches:
            model(input_ids=b.ids, attention_mask=b.attn, use_cache=False)
    h.remove()
    for a, b, batch in zip(rec.inputs[1], seen, batches):
        torch.testing.assert_close(a[batch.mask], b[batch.mask], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("arch", ["gemma3_text", "qwen2"])
def test_both_schedules_and_disk_activations_give_the_same_statistics(arch):
    """Whole-model forward with all hooks (resident, watching only) == block by block with activations on disk."""
    model, tok = tiny_model(arch), tiny_tokenizer()
    adapter = adapter_for(model)
    batches = engine.make_batches(_seqs(7), 3, tok, tag="t")
    stats = []
    for offload in ("memory", "disk"):
        obs = DietObserver(adapter, model.config, "norm-out", ["t"], gram=True)
        report = engine.run(model, batches, [obs], offload=offload)
        assert report.activations_on_disk == (offload == "disk")
        assert bool(report.block_seconds) == (offload == "disk")  # the block-by-block schedule ran
        stats.append(obs)
    assert torch.equal(stats[0].abs["t"], stats[1].abs["t"])
    assert torch.equal(stats[0].gram, stats[1].gram) and torch.equal(stats[0].final_in_sq, stats[1].final_in_sq)


def test_engine_refuses_empty_plan_and_bad_offload():
    model, tok = tiny_model("llama"), tiny_tokenizer()
    with pytest.raises(DietpruneError, match="no calibration"):
        engine.run(model, [], [])
    with pytest.raises(DietpruneError, match="offload"):
        engine.run(model, engine.make_batches(_seqs(2), 2, tok), [], offload="tape")


# ---- devices: every repair is computed on the weight's device --------------------------------------

class _SameDevice(torch.overrides.TorchFunctionMode):
    """Fails any torch operation that mixes tensors of two devices (0-dim CPU scalars aside)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        devices = set()

        def visit(x):
            if isinstance(x, torch.Tensor) and not (x.dim() == 0 and x.device.type == "cpu"):
                devices.add(x.device.type)
            elif isinstance(x, (list, tuple)):
                for y in x:
                    visit(y)

        for a in list(args) + list(kwargs.values()):
            visit(a)
        name = getattr(func, "__name__", "")
        if len(devices) > 1 and name not in ("to", "copy_", "__get__"):
            raise AssertionError(f"{name} mixes devices {sorted(devices)}")
        return func(*args, **kwargs)


def _norms(model):
    from dietprune.stats import NormStats

    L, d = model.config.num_hidden_layers, model.config.hidden_size
    adapter = adapter_for(model)
    g = torch.randn(L, len(adapter.reader_norms()), d, 2 * d, dtype=torch.float64)
    gram = g @ g.transpose(-1, -2)
    fg = torch.randn(d, 2 * d, dtype=torch.float64)
    return NormStats(torch.rand(L, len(adapter.residual_norms), d, dtype=torch.float64) + 0.1,
                     torch.rand(d, dtype=torch.float64) + 0.1, 10, gram, fg @ fg.T)


@pytest.mark.parametrize("energy", [False, True])
def test_cut_plan_follows_the_weights_device(energy):
    """Statistics stay on the CPU; the weights live on another device ('meta' stands in for a GPU)."""
    from dietprune.repair import CutPlan

    model = tiny_model("llama")  # untied lm_head: the head fold runs too
    kept = torch.arange(0, 64, 2)
    plan = CutPlan(model, kept, _norms(model), rms=True, ls=True, energy=energy)
    touched = 0
    with _SameDevice():
        for name, p in model.named_parameters():
            out = plan.transform(name, p.detach().to("meta"))
            assert out.device.type == "meta" and out.shape == p.shape and out.dtype == p.dtype, name
            touched += out is not p
    assert touched


def test_refit_solve_and_flap_bias_follow_the_weights_device():
    from dietprune.baselines.scores import compensation_bias
    from dietprune.refit import solve_refit

    w = torch.randn(6, 8, device="meta")
    gram_hat = torch.randn(5, 5, dtype=torch.float64, device="meta")
    cross = torch.randn(8, 5, dtype=torch.float64, device="meta")
    with _SameDevice():
        assert solve_refit(w, gram_hat, cross, 1e-3).device.type == "meta"
    with _SameDevice():
        out = compensation_bias(torch.randn(6, 8), torch.randn(8, dtype=torch.float64), torch.tensor([1, 3]))
    assert out.shape == (6,)


def test_prune_on_a_device_moves_the_copy_not_the_callers_model(data_dir):
    from dietprune.pipeline import prune

    model, tok = tiny_model("qwen3").to(torch.bfloat16), tiny_tokenizer()
    res = prune(model, tokenizer=tok, tasks="boolq", sparsity=0.25, samples=4, batch_size=4, max_length=32,
                data_dir=data_dir, repair="rms", device="cpu")
    assert next(model.parameters()).dtype == torch.bfloat16 and model.config.hidden_size == 64
    assert res.model.config.hidden_size == 48 and next(res.model.parameters()).dtype == torch.bfloat16


# ---- the registry -------------------------------------------------------------------------------------

def test_registry_imports_no_implementation():
    code = ("import sys, dietprune.registry as r; r.METHODS['diet'].config(); "
            "bad = [m for m in sys.modules if m.startswith(('dietprune.methods', 'dietprune.baselines', "
            "'dietprune.profile', 'torch'))]; assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_each_method_takes_only_its_own_options():
    from dietprune.registry import METHODS, method_config

    short = method_config("shortgpt", sparsity=0.1)
    assert "repair" not in short.to_dict() and "merge" not in short.to_dict()
    with pytest.raises(DietpruneError, match="has no option repair"):
        method_config("shortgpt", repair="rms")
    with pytest.raises(DietpruneError, match="unknown merge"):
        method_config("diet", merge="median")
    assert method_config("diet").repair == "rms+ls"
    from dietprune.registry import DietConfig, PruneConfig, UnitConfig

    assert type(PruneConfig(method="diet", repair="rms")) is DietConfig  # the base class builds the method's own
    assert type(PruneConfig(method="shortgpt")) is UnitConfig and type(PruneConfig()) is DietConfig
    assert PruneConfig.from_dict(short.to_dict()) == short
    for name, spec in METHODS.items():  # every declared implementation resolves
        assert callable(spec.function()), name


def test_cli_flags_come_from_the_configs():
    from dataclasses import fields

    from dietprune.cli import build_parser
    from dietprune.registry import METHODS

    parser, _ = build_parser()
    prune_parser = parser._subparsers._group_actions[0].choices["prune"]
    flags = {s for a in prune_parser._actions for s in a.option_strings}
    for spec in METHODS.values():
        for f in fields(spec.config):
            if f.metadata.get("cli"):
                assert "--" + f.name.replace("_", "-") in flags


def test_register_adds_a_plugin_method(data_dir):
    from dietprune.pipeline import prune
    from dietprune.registry import METHODS, Selection, register

    @register("first-half", needs_profile=False)
    def first_half(model, config, ctx):
        return Selection(torch.arange(model.config.hidden_size // 2))

    try:
        needs_profile, fn = METHODS["first-half"]  # the table's entries still unpack as before
        assert fn is first_half and not needs_profile
        res = prune(tiny_model("qwen3"), tokenizer=tiny_tokenizer(), tasks="boolq", method="first-half",
                    sparsity=0.5, repair="none", samples=4, data_dir=data_dir)
        assert res.model.config.hidden_size == 32 and res.kept.tolist() == list(range(32))
    finally:
        METHODS.pop("first-half")


# ---- one unit for `sparsity`: the fraction of parameters removed, for every structured method ----
def _hidden_cut_params(model, k):
    """Parameters after actually cutting a copy to its first k hidden dimensions (independent of the counting)."""
    import copy

    from dietprune.adapters import param_count
    from dietprune.surgery import prune_hidden_

    net = copy.deepcopy(model)
    prune_hidden_(net, torch.arange(k), adapter_for(net))
    return param_count(net)


@pytest.mark.parametrize("arch", ["qwen2", "llama"])
def test_hidden_methods_take_sparsity_as_the_parameter_fraction(arch):
    """random / magnitude keep the width whose cut removes the parameter fraction nearest `sparsity`;
    at 3.2% the hidden-dimension rounding (keep_count) kept all 64 dimensions, removing nothing."""
    from dietprune.adapters import param_count
    from dietprune.merge import keep_count
    from dietprune.pipeline import prune

    model, tok = tiny_model(arch), tiny_tokenizer()
    total = param_count(model)
    reachable = {k: 1 - _hidden_cut_params(model, k) / total for k in range(4, 65, 4)}  # 4 heads: multiples of 4
    for s in (0.032, 0.3044, 0.5):
        best = min(abs(r - s) for r in reachable.values())
        for method in ("random", "magnitude"):
            res = prune(model, tokenizer=tok, sparsity=s, method=method, repair="none")
            assert abs(res.summary["param_reduction"] - s) <= best + 1e-12, (method, s)
    assert keep_count(64, 0.032, 4) == 64  # what the hidden-dimension unit would have kept
    res = prune(model, tokenizer=tok, sparsity=0.032, method="random", repair="none")
    assert res.summary["hidden_size_after"] == 60 and res.config.version == "2"


def test_hidden_sparsity_keeps_the_hidden_dimension_unit(tmp_path, capsys):
    from dietprune.cli import main
    from dietprune.merge import keep_count
    from dietprune.pipeline import prune
    from dietprune.registry import PruneConfig, method_config
    from tiny import save_tiny

    model, tok = tiny_model("qwen2"), tiny_tokenizer()
    for hs in (0.032, 0.3044):
        res = prune(model, tokenizer=tok, method="magnitude", hidden_sparsity=hs, repair="none")
        assert res.summary["hidden_size_after"] == keep_count(64, hs, 4)
        assert res.config.hidden_sparsity == hs
    with pytest.raises(DietpruneError, match="does not apply to diet-width"):
        method_config("diet-width", hidden_sparsity=0.2)
    with pytest.raises(DietpruneError, match="hidden_sparsity must be in"):
        method_config("diet", hidden_sparsity=1.5)
    with pytest.raises(DietpruneError, match="has no option hidden_sparsity"):
        method_config("wanda-sp", hidden_sparsity=0.2)
    # a config saved before version 2 meant hidden dimensions: it reads back as --hidden-sparsity
    old = {**method_config("diet", sparsity=0.3).to_dict(), "version": "1"}
    old.pop("hidden_sparsity")
    back = PruneConfig.from_dict(old)
    assert back.hidden_sparsity == 0.3 and back.version == "2"
    width_v1 = {**method_config("shortgpt", sparsity=0.3).to_dict(), "version": "1"}
    assert PruneConfig.from_dict(width_v1).sparsity == 0.3  # parameters already
    folder = save_tiny(tmp_path / "m", "qwen2")
    out = tmp_path / "o"
    assert main(["prune", str(folder), "--method", "random", "--repair", "none", "--sparsity", "0.2",
                 "--hidden-sparsity", "0.2", "--output", str(out)]) == 2
    assert "not both" in capsys.readouterr().err and not out.exists()
    assert main(["prune", str(folder), "--method", "random", "--repair", "none", "--hidden-sparsity", "0.032",
                 "--output", str(out)]) == 0
    import json

    assert json.loads((out / "config.json").read_text())["hidden_size"] == 64


# ---- files are written through a unique temporary name (outputs.atomic_file) ----
def test_scores_and_results_never_touch_a_users_tmp_file(tmp_path, monkeypatch):
    """`PATH.tmp` beside the target is a user's file: saving neither overwrites nor deletes it, and an
    interrupt mid-write leaves no temporary file and the old target intact."""
    import safetensors.torch

    from dietprune.evaluate.results import save_results
    from dietprune.stats import Profile, TaskStats

    prof = Profile({"boolq": TaskStats(torch.rand(3, 8, dtype=torch.float64), 17, 4)}, {"tap": "norm-out"})
    for path, write in ((tmp_path / "s.safetensors", prof.save), (tmp_path / "r.json",
                                                                   lambda p: save_results({"a": 1}, p))):
        mine = path.with_name(path.name + ".tmp")
        mine.write_text("mine")
        write(path)
        assert mine.read_text() == "mine" and path.is_file()
        assert sorted(f.name for f in tmp_path.iterdir() if f.name.startswith(".")) == []
    before = (tmp_path / "s.safetensors").read_bytes()

    def interrupted(tensors, filename, metadata=None):
        open(filename, "wb").write(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(safetensors.torch, "save_file", interrupted)
    with pytest.raises(KeyboardInterrupt):
        prof.save(tmp_path / "s.safetensors")
    assert (tmp_path / "s.safetensors").read_bytes() == before
    assert sorted(f.name for f in tmp_path.iterdir()) == ["r.json", "r.json.tmp", "s.safetensors",
                                                          "s.safetensors.tmp"]


@pytest.mark.parametrize("env, disabled", [({}, False), ({"TQDM_DISABLE": "1"}, True),
                                           ({"DIETPRUNE_PROGRESS": "0"}, True)])
def test_progress_follows_tqdms_own_switch(env, disabled):
    """dietprune's bars obey TQDM_DISABLE (tqdm's switch); DIETPRUNE_PROGRESS=0 sets it, so the
    bars of the hub (a tqdm subclass) go quiet too."""
    import json
    import os

    code = ("import json, dietprune; from dietprune.progress import progress; "
            "from huggingface_hub.utils import tqdm as hub_tqdm; "
            "print(json.dumps([progress(range(2)).disable, hub_tqdm(range(2)).disable]))")
    base = {k: v for k, v in os.environ.items() if k not in ("TQDM_DISABLE", "DIETPRUNE_PROGRESS")}
    out = subprocess.run([sys.executable, "-c", code], env={**base, **env}, capture_output=True, text=True,
                         check=True)
    assert json.loads(out.stdout.strip().splitlines()[-1]) == [disabled, disabled]


def test_shard_writer_plans_with_huggingface_hub(tmp_path):
    """One file when everything fits (model.safetensors, no index, as save_pretrained writes);
    hub-named shards and an index otherwise; the tensors read back exactly."""
    import json

    from safetensors.torch import load_file

    from dietprune.streaming import ShardWriter

    tensors = {f"w{i}": torch.randn(8, 16) for i in range(4)}
    plan = [(n, tuple(t.shape), t.dtype) for n, t in tensors.items()]
    for folder, max_bytes in ((tmp_path / "one", 10**6), (tmp_path / "many", 1200)):
        folder.mkdir()
        writer = ShardWriter(folder, plan, max_bytes)
        for n, t in tensors.items():
            writer.write(n, t)
        writer.close()
        files = sorted(f.name for f in folder.iterdir())
        back = {k: v for f in folder.glob("*.safetensors") for k, v in load_file(f).items()}
        assert sorted(back) == sorted(tensors) and all(torch.equal(back[n], tensors[n]) for n in tensors)
        if max_bytes > 1200:
            assert files == ["model.safetensors"]
        else:
            assert "model.safetensors.index.json" in files and "model-00001-of-00002.safetensors" in files
            assert len(json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"]) == 4
