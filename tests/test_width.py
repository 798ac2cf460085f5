"""diet-width: statistics, vote, surgery, least-squares fold and budget on tiny models of every architecture."""

import copy
import json
import subprocess
import sys

import pytest
import torch

from dietprune import width as W
from dietprune.adapters import adapter_for, get_module, param_count
from dietprune.errors import DietpruneError
from dietprune.merge import merge, merge_heads, merge_k
from dietprune.pipeline import profile, prune
from dietprune.stats import Profile
from dietprune.widthstats import WidthObserver
from test_baselines import tok, wide_model  # noqa: F401  (tok is a fixture)
from tiny import ARCHS, random_ids as _ids, tiny_logits as _logits, tiny_model

RUN = dict(samples=4, max_length=32, batch_size=4, tasks="boolq,arc_easy")


@torch.no_grad()
def _observe(model, ids, tasks=("t",)):
    """Width statistics of `model` on `ids` (all tokens counted) from one engine pass, as a one-task
    WidthProfile."""
    from dietprune import engine

    batches = [engine.Batch(ids, torch.ones_like(ids), torch.ones(ids.shape, dtype=torch.bool), tasks[0])]
    obs = WidthObserver(adapter_for(model), model.config, list(tasks))
    engine.run(model, batches, [obs])
    return obs.finish(batches)


# ---- pure parts -----------------------------------------------------------------------------

def test_merge_k_is_merge_with_the_count_given():
    g = torch.Generator().manual_seed(0)
    scores = torch.rand(3, 40, generator=g) + 0.1
    for method in ("vote", "mean", "rank"):
        assert torch.equal(merge_k(scores, 30, method).kept, merge(scores, 0.25, method).kept)
    with pytest.raises(DietpruneError):
        merge_k(scores, 0)


def test_merge_heads_votes_groups_then_heads_inside_them():
    # 2 tasks, 3 KV groups of 2 query heads; group 1 is weakest for both tasks
    scores = torch.tensor([[5.0, 1.0, 0.1, 0.2, 3.0, 4.0],
                           [4.0, 2.0, 0.2, 0.1, 2.0, 5.0]])
    groups, heads = merge_heads(scores, 2, 1, 3)
    assert groups.tolist() == [0, 2]
    assert heads.tolist() == [0, 5]  # inside group 0 head 0, inside group 2 head 5 (votes 2 each)
    groups, heads = merge_heads(scores, 3, 2, 3)
    assert heads.tolist() == list(range(6))
    with pytest.raises(DietpruneError):
        merge_heads(scores, 4, 1, 3)


@pytest.mark.parametrize("arch", ARCHS)
def test_param_count_formula_matches_the_cut(arch, tmp_path):
    model = wide_model(arch)
    adapter = adapter_for(model)
    ids = _ids()
    widths = _observe(model, ids)
    full = W.full_shape(model, adapter)
    assert W.count_params(model, adapter, full) == param_count(model)
    g = torch.Generator().manual_seed(3)
    for shape in (W.Shape(48, 2, 2, 50), W.Shape(64, 4, 1, 96), W.Shape(32, 1, 2, 7)):
        hidden = torch.sort(torch.randperm(full.hidden, generator=g)[:shape.hidden]).values
        prof = type("P", (), {"widths": widths, "score_matrix": lambda self, h=hidden: _onehot(h, full.hidden)})()
        sel = W.select(prof, shape, full)
        cut = W.cut_(copy.deepcopy(model), adapter, sel)
        assert param_count(cut) == W.count_params(model, adapter, shape)
        assert cut.config.num_attention_heads == shape.heads and cut.config.num_key_value_heads == shape.groups
        assert cut.config.intermediate_size == shape.channels and cut.config.hidden_size == shape.hidden
        assert torch.isfinite(_logits(cut, ids)).all()
    # the last cut (every axis changed) saves as a stock checkpoint that reloads to the same logits
    from transformers import AutoModelForCausalLM

    cut.save_pretrained(tmp_path / "cut")
    back = AutoModelForCausalLM.from_pretrained(tmp_path / "cut", attn_implementation="eager").eval()
    torch.testing.assert_close(_logits(back, ids), _logits(cut, ids), rtol=1e-5, atol=1e-5)


def _onehot(kept, d):
    s = torch.full((1, d), 0.1)
    s[0, kept] = 1.0
    return s


@pytest.mark.parametrize("sparsity", [0.1, 0.2, 0.3])
def test_candidate_shapes_meet_the_target_within_one_percent(sparsity):
    model = wide_model("llama")
    adapter = adapter_for(model)
    shapes = W.candidate_shapes(model, adapter, sparsity)
    assert 1 <= len(shapes) <= W.MAX_CANDIDATES
    total = param_count(model)
    for s in shapes:
        assert abs(1 - W.count_params(model, adapter, s) / total - sparsity) <= 0.01
        assert s.hidden % s.heads == 0  # Llama's config checks hidden % heads
    if sparsity >= 0.2:  # (at 10% the tiny model's coarse widths leave one split within 1%)
        assert len(shapes) > 1 and len({s.heads for s in shapes}) > 1  # a real grid


def test_align_applies_to_mlp_channels_too():
    """--align (which `prune --gguf` sets to 32 for q8_0 blocks) holds for the MLP channels of every
    candidate as well as for the hidden width, and the parameter target still holds."""
    model = wide_model("llama")
    adapter = adapter_for(model)
    total = param_count(model)
    full = W.full_shape(model, adapter)
    shapes = W.candidate_shapes(model, adapter, 0.2, align=8)
    assert shapes
    for s in shapes:
        assert s.channels % 8 == 0 or s.channels == full.channels
        assert s.hidden % 8 == 0 and s.hidden % s.heads == 0
        assert abs(1 - W.count_params(model, adapter, s) / total - 0.2) <= W.TOLERANCE
    assert any(s.channels != W.solve_channels(model, adapter, s.hidden, s.groups, s.per_group,
                                              0.8 * total).channels for s in shapes)  # alignment moved some


# ---- surgery and repair -------------------------------------------------------------------

@pytest.mark.parametrize("arch", ARCHS)
def test_a_cut_that_keeps_everything_is_the_identity(arch):
    model = wide_model(arch)
    adapter = adapter_for(model)
    ids = _ids()
    widths = _observe(model, ids)
    full = W.full_shape(model, adapter)
    prof = type("P", (), {"widths": widths, "norms": None,
                          "score_matrix": lambda self: torch.rand(2, full.hidden) + 0.1})()
    sel = W.select(prof, full, full)
    net = copy.deepcopy(model)
    W.fold_widths_(net, adapter, sel, widths, 1e-2)
    W.cut_(net, adapter, sel)
    torch.testing.assert_close(_logits(net, ids), _logits(model, ids), rtol=0, atol=0)


def _duplicate_mlp_channel_(model, layer, src, dst):
    adapter = adapter_for(model)
    block = adapter.blocks(model)[layer]
    with torch.no_grad():
        for name in adapter.mlp_in:
            lin = get_module(block, name)
            lin.weight[dst] = lin.weight[src]
            if lin.bias is not None:
                lin.bias[dst] = lin.bias[src]


@pytest.mark.parametrize("arch,extra", [("llama", {}), ("gemma3_text", {}), ("qwen2", {}),
                                        ("llama", {"mlp_bias": True})])
def test_mlp_fold_recovers_an_exactly_predictable_channel(arch, extra):
    """Channel 5 of layer 0 equals channel 2 (same gate/up rows): removing it and folding its
    down_proj column into channel 2's loses nothing; without the fold the output changes."""
    model = tiny_model(arch, **extra)
    adapter = adapter_for(model)
    _duplicate_mlp_channel_(model, 0, 2, 5)
    ids = _ids(16, 16)  # more tokens than channels: the kept channels' Gram matrix has full rank
    widths = _observe(model, ids)
    full = W.full_shape(model, adapter)
    kept = [torch.tensor([c for c in range(full.channels) if c != 5]), torch.arange(full.channels - 1)]
    heads = [torch.arange(full.heads)] * 2
    sel = W.WidthSelection(torch.arange(full.hidden), [torch.arange(full.groups)] * 2, heads, kept)
    expected = _logits(model, ids)
    plain = W.cut_(copy.deepcopy(model), adapter, sel)
    folded = copy.deepcopy(model)
    # layer 1 drops its last channel too (not predictable): compare layer 0's down_proj output only
    W.fold_widths_(folded, adapter, sel, widths, 1e-9)
    W.cut_(folded, adapter, sel)
    x = torch.randn(3, full.channels, dtype=torch.float64).float()
    x[:, 5] = x[:, 2]
    down0 = get_module(adapter.blocks(model)[0], adapter.mlp_out)
    got = get_module(adapter.blocks(folded)[0], adapter.mlp_out)(x[:, kept[0]])
    torch.testing.assert_close(got, down0(x), rtol=1e-4, atol=1e-4)
    assert not torch.allclose(get_module(adapter.blocks(plain)[0], adapter.mlp_out)(x[:, kept[0]]), down0(x),
                              atol=1e-3)
    assert (_logits(folded, ids) - expected).abs().max() < (_logits(plain, ids) - expected).abs().max()


def _err(a, b):
    return float((a - b).abs().max())


@pytest.mark.parametrize("arch,extra", [("llama", {}), ("gemma3_text", {}), ("qwen3", {}),
                                        ("llama", {"attention_bias": True})])
def test_head_fold_recovers_an_exactly_predictable_head(arch, extra):
    """With one KV head, query head 3 a copy of query head 0 writes the same o_proj input: removing
    it and folding its o_proj columns into head 0's gives the dense logits."""
    model = tiny_model(arch, num_key_value_heads=1, **extra)
    adapter = adapter_for(model)
    heads, kv, hd = adapter.head_layout(model)
    with torch.no_grad():
        for block in adapter.blocks(model):
            q = get_module(block, adapter.q_proj)
            q.weight[3 * hd:4 * hd] = q.weight[0:hd]
            if q.bias is not None:
                q.bias[3 * hd:4 * hd] = q.bias[0:hd]
    ids = _ids(8, 16)
    widths = _observe(model, ids)
    full = W.full_shape(model, adapter)
    keep_heads = [torch.tensor([0, 1, 2])] * 2
    sel = W.WidthSelection(torch.arange(full.hidden), [torch.tensor([0])] * 2, keep_heads,
                           [torch.arange(full.channels)] * 2)
    expected = _logits(model, ids)
    folded = copy.deepcopy(model)
    W.fold_widths_(folded, adapter, sel, widths, 1e-9)
    W.cut_(folded, adapter, sel)
    assert folded.config.num_attention_heads == 3
    plain = W.cut_(copy.deepcopy(model), adapter, sel)
    torch.testing.assert_close(_logits(folded, ids), expected, rtol=1e-3, atol=1e-3)
    assert _err(_logits(folded, ids), expected) < _err(_logits(plain, ids), expected) / 10


def test_bad_head_selection_is_refused():
    model = tiny_model("llama")
    adapter = adapter_for(model)
    with pytest.raises(DietpruneError):  # query head 2 belongs to group 1, which is not kept
        W.prune_heads_(model, adapter, [torch.tensor([0])] * 2, [torch.tensor([0, 2])] * 2)


# ---- statistics ---------------------------------------------------------------------------

def test_width_statistics_are_sums_that_add_up():
    model = tiny_model("qwen2")
    ids = _ids(4, 10)
    whole = _observe(model, ids)
    a, b = _observe(model, ids[:2]), _observe(model, ids[2:])
    both = a + b
    assert both.tasks["t"].count == whole.tasks["t"].count == 40
    torch.testing.assert_close(both.tasks["t"].mlp_abs, whole.tasks["t"].mlp_abs)
    torch.testing.assert_close(both.tasks["t"].head_norm, whole.tasks["t"].head_norm)
    torch.testing.assert_close(both.mlp.gram, whole.mlp.gram)
    torch.testing.assert_close(both.attn.s, whole.attn.s)
    # the head score is the mean norm of that head's slice of the o_proj input
    adapter = adapter_for(model)
    seen = {}
    h = get_module(adapter.blocks(model)[1], adapter.o_proj).register_forward_pre_hook(
        lambda m, args: seen.setdefault("x", args[0]))
    with torch.no_grad():
        model(input_ids=ids)
    h.remove()
    x = seen["x"].reshape(40, 4, -1)
    torch.testing.assert_close(whole.tasks["t"].head_scores()[1], x.norm(dim=-1).mean(0).double(), rtol=1e-5,
                               atol=1e-6)


# ---- the method through prune() ---------------------------------------------------------------

RELOAD = r"""
import json, sys, torch
assert "dietprune" not in sys.modules
from transformers import AutoModelForCausalLM
ids = torch.tensor(json.loads(sys.argv[1]))
out = []
for folder in sys.argv[2:]:
    model = AutoModelForCausalLM.from_pretrained(folder, attn_implementation="eager").eval()
    with torch.no_grad():
        out.append(model(input_ids=ids).logits.tolist())
assert "dietprune" not in sys.modules
print(json.dumps(out))
"""


def test_diet_width_meets_the_target_and_reloads_without_dietprune(tok, data_dir, tmp_path):  # noqa: F811
    ids = _ids()
    folders, expected = [], []
    for arch in ARCHS:
        model = wide_model(arch)
        out = tmp_path / arch
        res = prune(model, tokenizer=tok, sparsity=0.2, method="diet-width", data_dir=data_dir, output=out, **RUN)
        achieved = 1 - param_count(res.model) / param_count(model)
        assert abs(achieved - 0.2) <= 0.01, (arch, achieved)
        assert res.summary["params_after"] == param_count(res.model)
        meta = json.loads((out / "dietprune.json").read_text())
        sel = meta["selection"]
        assert 2 <= len(sel["candidates"]) <= 12
        kls = [c["kl"] for c in sel["candidates"]]
        assert all(k >= -1e-3 for k in kls) and sel["candidates"][sel["chosen"]]["kl"] == min(kls)
        assert sel["shape_after"]["channels"] == res.model.config.intermediate_size
        assert sum(sel["kl_probe"]["sequences"].values()) > 0
        folders.append(str(out))
        expected.append(_logits(res.model, ids))
    proc = subprocess.run([sys.executable, "-c", RELOAD, json.dumps(ids.tolist()), *folders],
                          capture_output=True, text=True, cwd=tmp_path, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    for arch, g, e in zip(ARCHS, got, expected):
        torch.testing.assert_close(torch.tensor(g), e, rtol=1e-5, atol=1e-5, msg=arch)


def test_scores_file_holds_every_axis_and_prune_reuses_it(tok, data_dir, tmp_path):  # noqa: F811
    model = wide_model("gemma3_text")
    path = tmp_path / "scores.safetensors"
    prof = profile(model, RUN["tasks"], samples=4, data_dir=data_dir, output=path, tokenizer=tok, gram=True,
                   widths=True, max_length=32, batch_size=4)
    loaded = Profile.load(path)
    assert loaded.widths is not None and set(loaded.widths.tasks) == {"boolq", "arc_easy"}
    torch.testing.assert_close(loaded.widths.mlp_matrix(), prof.widths.mlp_matrix())
    torch.testing.assert_close(loaded.widths.attn.gram, prof.widths.attn.gram)
    a = prune(model, tokenizer=tok, sparsity=0.2, method="diet-width", data_dir=data_dir, **RUN)
    b = prune(model, tokenizer=tok, sparsity=0.2, method="diet-width", data_dir=data_dir, scores=path, **RUN)
    torch.testing.assert_close(_logits(a.model, _ids()), _logits(b.model, _ids()))
    plain = tmp_path / "plain.safetensors"
    profile(model, RUN["tasks"], samples=4, data_dir=data_dir, output=plain, tokenizer=tok, gram=True,
            max_length=32, batch_size=4)
    with pytest.raises(DietpruneError, match="width statistics"):
        prune(model, tokenizer=tok, sparsity=0.2, method="diet-width", data_dir=data_dir, scores=plain, **RUN)


def test_sparsity_zero_keeps_the_model(tok, data_dir):  # noqa: F811
    model = wide_model("qwen3")
    res = prune(model, tokenizer=tok, sparsity=0.0, method="diet-width", data_dir=data_dir, **RUN)
    assert res.summary["params_after"] == param_count(model)
    torch.testing.assert_close(_logits(res.model, _ids()), _logits(model, _ids()), rtol=0, atol=0)
    assert len(res.selection["candidates"]) == 1
