"""Structured baselines (agnostic, wanda-sp, flap, shortgpt) on tiny random models of every architecture."""

import copy
import json

import pytest
import torch

from dietprune.adapters import adapter_for, get_module, param_count
from dietprune.baselines import scores as S
from dietprune.baselines.bias import add_to_bias_, enable_bias_
from dietprune.baselines.channels import prune_mlp_channels_
from dietprune.baselines.heads import group_rows, prune_kv_groups_
from dietprune.baselines.layers import drop_layers_
from dietprune.baselines.methods import global_attention_share, layers_to_remove
from dietprune.baselines.plan import budget_for, candidates, legal_group_counts
from dietprune.errors import DietpruneError, UnreachableSparsity
from dietprune.pipeline import prune
from tiny import ARCHS, random_ids as _ids, tiny_logits as _logits, tiny_model

STRUCTURED = ("wanda-sp", "flap", "shortgpt")
METHODS = ("agnostic",) + STRUCTURED
# More heads, KV groups and layers than the default tiny model, so budgets have some granularity.
WIDE = dict(num_attention_heads=8, num_key_value_heads=4, head_dim=8, num_hidden_layers=4)
RUN = dict(samples=4, max_length=32, batch_size=4, tasks="boolq")


def wide_model(arch, seed=0):
    extra = {"layer_types": ["sliding_attention", "full_attention"] * 2} if arch == "gemma3_text" else {}
    return tiny_model(arch, seed=seed, **WIDE, **extra)


@pytest.fixture(scope="module")
def tok():
    """A character-level fast tokenizer over printable ASCII (ids < 128), built offline."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<bos>": 1, "<eos>": 2, "<unk>": 3}
    for c in range(32, 127):
        vocab[chr(c)] = len(vocab)
    t = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    t.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    return PreTrainedTokenizerFast(tokenizer_object=t, bos_token="<bos>", eos_token="<eos>", unk_token="<unk>",
                                   pad_token="<pad>")


def _run(model, tok, data_dir, method, sparsity, **kw):
    return prune(model, tokenizer=tok, sparsity=sparsity, method=method, data_dir=data_dir, **{**RUN, **kw})


# ---- pure scores -------------------------------------------------------------------------


def test_block_influence_of_identity_block_is_zero():
    x = torch.randn(2, 5, 16)
    s, n = S.cosine_sum(x, x.clone())
    assert n == 10
    assert abs(float(S.block_influence(torch.tensor(s), n))) < 1e-12
    s, n = S.cosine_sum(x, -x)
    assert float(S.block_influence(torch.tensor(s), n)) == pytest.approx(2.0)


def test_cosine_sum_ignores_masked_tokens():
    x, y = torch.randn(1, 4, 8), torch.randn(1, 4, 8)
    y[0, 2:] = 1e6 * torch.randn(2, 8)  # garbage in padding positions
    mask = torch.tensor([[True, True, False, False]])
    s, n = S.cosine_sum(x, y, mask)
    s2, n2 = S.cosine_sum(x[:, :2], y[:, :2])
    assert n == n2 == 2 and s == pytest.approx(s2)


def test_wanda_group_with_zero_weights_scores_lowest():
    g, hd, d = 4, 3, 10
    q, k, v, o = torch.randn(g * 2 * hd, d), torch.randn(g * hd, d), torch.randn(g * hd, d), torch.randn(d, g * 2 * hd)
    q[2 * 2 * hd:3 * 2 * hd] = 0
    k[2 * hd:3 * hd] = v[2 * hd:3 * hd] = 0
    o[:, 2 * 2 * hd:3 * 2 * hd] = 0
    scores = S.wanda_group_scores(q, k, v, o, torch.rand(d) + 0.1, torch.rand(g * 2 * hd) + 0.1, g)
    assert scores[2] == 0 and (scores[[0, 1, 3]] > 0).all()
    assert 2 not in S.keep_top(scores, 3).tolist()


def test_wanda_group_scores_sum_the_groups_weights():
    g, hd, d = 3, 2, 5
    q, k, v, o = torch.randn(g * 2 * hd, d), torch.randn(g * hd, d), torch.randn(g * hd, d), torch.randn(d, g * 2 * hd)
    x, z = torch.rand(d), torch.rand(g * 2 * hd)
    scores = S.wanda_group_scores(q, k, v, o, x, z, g)
    for j in range(g):
        qr, kr = slice(j * 2 * hd, (j + 1) * 2 * hd), slice(j * hd, (j + 1) * hd)
        expected = (S.wanda(q, x)[qr].sum() + S.wanda(k, x)[kr].sum() + S.wanda(v, x)[kr].sum()
                    + S.wanda(o, z)[:, qr].sum())
        assert float(scores[j]) == pytest.approx(float(expected), rel=1e-5)


def test_wanda_channel_score_scales_with_input_norm():
    up, down = torch.ones(3, 4), torch.ones(4, 3)
    base = S.wanda_channel_scores([up], down, torch.ones(4), torch.ones(3))
    louder = S.wanda_channel_scores([up], down, torch.ones(4), torch.tensor([1.0, 5.0, 1.0]))
    assert torch.equal(base, torch.full((3,), 8.0, dtype=torch.float64))
    assert louder.argmax() == 1 and louder[0] == base[0]


def test_fluctuation_of_constant_feature_is_zero():
    x = torch.randn(50, 6, dtype=torch.float64)
    x[:, 4] = 3.0  # constant input: carries no fluctuation, only a mean (what compensation restores)
    var = S.variance_from_sums(x.sum(0), (x * x).sum(0), 50)
    torch.testing.assert_close(var, x.var(0, unbiased=False))
    fl = S.fluctuation(var, torch.randn(5, 6))
    assert fl[4] == pytest.approx(0.0, abs=1e-9) and (fl[[0, 1, 2, 3, 5]] > 0).all()


def test_standardize():
    z = S.standardize(torch.tensor([1.0, 2.0, 3.0, 10.0]))
    assert float(z.mean()) == pytest.approx(0.0, abs=1e-12) and float(z.std(unbiased=False)) == pytest.approx(1.0)
    assert torch.equal(S.standardize(torch.full((3,), 7.0)), torch.zeros(3, dtype=torch.float64))


def test_compensation_bias_restores_mean_output():
    w, x = torch.randn(5, 8, dtype=torch.float64), torch.randn(100, 8, dtype=torch.float64) + 2.0
    removed, kept = torch.tensor([1, 4, 6]), torch.tensor([0, 2, 3, 5, 7])
    delta = S.compensation_bias(w, x.mean(0), removed)
    full = (x @ w.T).mean(0)
    cut = (x[:, kept] @ w[:, kept].T).mean(0) + delta
    torch.testing.assert_close(cut, full)


def test_global_attention_share():
    attn_low, mlp_high = torch.full((2, 2), -1.0), torch.full((2, 6), 1.0)
    assert global_attention_share(attn_low, mlp_high, 10, 1, to_remove=20) == 1.0
    assert global_attention_share(-attn_low, -mlp_high, 10, 1, to_remove=6) == 0.0


def test_layers_to_remove_lowest_influence_nearest_count():
    influence = torch.tensor([0.5, 0.01, 0.3, 0.02, 0.9])
    assert layers_to_remove(influence, [10] * 5, 100, 0.2) == [1, 3]
    assert layers_to_remove(influence, [10] * 5, 100, 0.14) == [1]
    assert layers_to_remove(influence, [10] * 5, 100, 0.0) == []
    assert len(layers_to_remove(influence, [10] * 5, 50, 0.99)) == 4  # one layer always stays


def test_budget_counts_match_real_cuts():
    model = wide_model("llama")
    adapter = adapter_for(model)
    budget = budget_for(model, adapter)
    assert budget.params(budget.groups, budget.channels) == param_count(model)
    assert legal_group_counts(budget, adapter.heads_divide_hidden) == [1, 2, 4]  # 6 heads do not divide 64
    assert legal_group_counts(budget, False) == [1, 2, 3, 4]
    cut = copy.deepcopy(model)
    prune_kv_groups_(cut, adapter, [torch.tensor([0, 3])] * 4)
    prune_mlp_channels_(cut, adapter, [torch.arange(50)] * 4)
    assert param_count(cut) == budget.params(2, 50)
    with_bias = budget_for(model, adapter, attention_bias=True, mlp_bias=True)
    for kind in ("attention", "mlp"):
        enable_bias_(cut, adapter, kind)
    assert param_count(cut) == with_bias.params(2, 50)
    assert all(abs(c.sparsity - 0.3) <= 0.01 for c in candidates(budget, 0.3, [1, 2, 4]))


# ---- surgery equals masking ----------------------------------------------------------------


def _zero_inputs(model, adapter, name, removed_per_layer, fill=None):
    """Reference: the full model with some input features of one linear per layer replaced."""
    ref = copy.deepcopy(model)
    for block, removed in zip(adapter.blocks(ref), removed_per_layer):
        def pre(module, args, removed=removed):
            x = args[0].clone()
            x[..., removed] = 0.0 if fill is None else fill[removed].to(x.dtype)
            return (x,)

        get_module(block, name).register_forward_pre_hook(pre)
    return ref


def _complement(kept, n):
    mask = torch.ones(n, dtype=torch.bool)
    mask[kept] = False
    return mask.nonzero().flatten()


@pytest.mark.parametrize("arch", ARCHS)
def test_head_and_channel_cut_equals_masked_model(arch):
    model = wide_model(arch)
    adapter = adapter_for(model)
    ids = _ids()
    kept_g = [torch.tensor([0, 2]), torch.tensor([1, 3]), torch.tensor([0, 1]), torch.tensor([2, 3])]
    kept_c = [torch.randperm(96, generator=torch.Generator().manual_seed(i))[:40] for i in range(4)]
    rows = 2 * 8  # query heads per group * head_dim
    ref = _zero_inputs(model, adapter, adapter.o_proj, [_complement(group_rows(g, rows), 64) for g in kept_g])
    ref = _zero_inputs(ref, adapter_for(ref), adapter.mlp_out, [_complement(c, 96) for c in kept_c])
    cut = copy.deepcopy(model)
    prune_kv_groups_(cut, adapter, kept_g)
    prune_mlp_channels_(cut, adapter, kept_c)
    assert (cut.config.num_attention_heads, cut.config.num_key_value_heads, cut.config.intermediate_size) == (4, 2, 40)
    assert param_count(cut) < param_count(model)
    torch.testing.assert_close(_logits(cut, ids), _logits(ref, ids), rtol=1e-4, atol=1e-4)
    assert not torch.allclose(_logits(model, ids), _logits(ref, ids), atol=1e-3)


@pytest.mark.parametrize("arch", ARCHS)
def test_keeping_everything_is_identity(arch):
    model = wide_model(arch)
    adapter = adapter_for(model)
    ids = _ids()
    cut = copy.deepcopy(model)
    prune_kv_groups_(cut, adapter, [torch.arange(4)] * 4)
    prune_mlp_channels_(cut, adapter, [torch.arange(96)] * 4)
    drop_layers_(cut, adapter, [])
    for kind in ("attention", "mlp"):
        enable_bias_(cut, adapter, kind)  # zero biases change nothing
    torch.testing.assert_close(_logits(cut, ids), _logits(model, ids), rtol=0, atol=1e-6)


@pytest.mark.parametrize("arch", ARCHS)
def test_layer_drop_equals_skipping_blocks(arch):
    model = wide_model(arch)
    adapter = adapter_for(model)
    ids = _ids()
    ref = copy.deepcopy(model)
    for i in (0, 2):
        block = adapter.blocks(ref)[i]
        block.forward = lambda hidden_states, *a, **k: hidden_states
    cut = drop_layers_(copy.deepcopy(model), adapter, [0, 2])
    assert cut.config.num_hidden_layers == 2
    assert [b.self_attn.layer_idx for b in adapter.blocks(cut)] == [0, 1]
    if getattr(model.config, "layer_types", None) is not None:
        assert cut.config.layer_types == [model.config.layer_types[i] for i in (1, 3)]
    torch.testing.assert_close(_logits(cut, ids), _logits(ref, ids), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("arch", ["llama", "qwen3", "gemma3_text"])
def test_bias_compensation_equals_mean_substitution(arch):
    """Cut heads/channels and fold W[:, R]·μ_R into the output bias == feed μ_R for the removed inputs."""
    model = wide_model(arch)
    adapter = adapter_for(model)
    ids = _ids()
    kept_g = [torch.tensor([1, 2])] * 4
    kept_c = [torch.arange(0, 96, 2)] * 4
    mu_o, mu_d = torch.randn(64), torch.randn(96)
    rem_o, rem_d = _complement(group_rows(kept_g[0], 16), 64), _complement(kept_c[0], 96)
    mlp_bias = adapter.mlp_bias_key is not None
    ref = _zero_inputs(model, adapter, adapter.o_proj, [rem_o] * 4, fill=mu_o)
    if mlp_bias:
        ref = _zero_inputs(ref, adapter_for(ref), adapter.mlp_out, [rem_d] * 4, fill=mu_d)
    else:
        ref = _zero_inputs(ref, adapter_for(ref), adapter.mlp_out, [rem_d] * 4)
    deltas_o = [S.compensation_bias(get_module(b, adapter.o_proj).weight, mu_o, rem_o) for b in adapter.blocks(model)]
    deltas_d = [S.compensation_bias(get_module(b, adapter.mlp_out).weight, mu_d, rem_d) for b in adapter.blocks(model)]
    cut = copy.deepcopy(model)
    prune_kv_groups_(cut, adapter, kept_g)
    prune_mlp_channels_(cut, adapter, kept_c)
    assert enable_bias_(cut, adapter, "attention")
    assert enable_bias_(cut, adapter, "mlp") == mlp_bias
    for block, do, dd in zip(adapter.blocks(cut), deltas_o, deltas_d):
        add_to_bias_(get_module(block, adapter.o_proj), do)
        if mlp_bias:
            add_to_bias_(get_module(block, adapter.mlp_out), dd)
    torch.testing.assert_close(_logits(cut, ids), _logits(ref, ids), rtol=1e-4, atol=1e-4)


# ---- the registered methods through prune() -----------------------------------------------


def _check_target(method, model, res, sparsity):
    """Heads/channels/hidden: within 1% of the target; layers: the nearest whole number of layers."""
    before, after = param_count(model), param_count(res.model)
    assert after == res.summary["params_after"] < before
    achieved = 1 - after / before
    if method == "shortgpt":
        block = sum(p.numel() for p in adapter_for(model).blocks(model)[0].parameters())
        n_removed = 4 - res.model.config.num_hidden_layers
        assert n_removed == min(range(4), key=lambda n: abs(n * block / before - sparsity)) >= 1
        assert achieved == pytest.approx(n_removed * block / before)
    else:
        assert abs(achieved - sparsity) <= 0.01, (sparsity, achieved)
    if method in ("wanda-sp", "flap"):
        cfg = res.model.config
        assert cfg.intermediate_size < 96 or cfg.num_attention_heads < 8
        if adapter_for(model).heads_divide_hidden:
            assert 64 % cfg.num_attention_heads == 0


# Two sparsities per method: the first checked in memory, the second saved and reloaded.
SPARSITIES = {"agnostic": (0.5, 0.25), "wanda-sp": (0.1, 0.3), "flap": (0.1, 0.3), "shortgpt": (0.2, 0.5)}


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("method", METHODS)
def test_method_meets_target_and_reloads_with_stock_transformers(arch, method, tok, data_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    model = wide_model(arch)
    first, second = SPARSITIES[method]
    _check_target(method, model, _run(model, tok, data_dir, method, first), first)
    res = _run(model, tok, data_dir, method, second, output=tmp_path / "out")
    _check_target(method, model, res, second)
    ids = _ids()
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out", attn_implementation="eager").eval()
    assert param_count(reloaded) == param_count(res.model)
    torch.testing.assert_close(_logits(reloaded, ids), _logits(res.model, ids), rtol=1e-5, atol=1e-5)
    meta = json.loads((tmp_path / "out" / "dietprune.json").read_text())
    assert meta["method"] == method
    if method == "flap":
        comp = meta["selection"]["bias_compensation"]
        adapter = adapter_for(model)
        assert (comp["attention"] == "attention_bias") == (adapter.attention_bias_key is not None)
        assert (comp["mlp"] == "mlp_bias") == (adapter.mlp_bias_key is not None)
        saved = json.loads((tmp_path / "out" / "config.json").read_text())
        if adapter.attention_bias_key:
            assert saved["attention_bias"] is True


def test_agnostic_ignores_the_tasks(tok, data_dir):
    model = wide_model("gemma2")
    a = _run(model, tok, data_dir, "agnostic", 0.25, tasks="boolq")
    b = _run(model, tok, data_dir, "agnostic", 0.25, tasks="arc_easy")
    assert a.model.config.hidden_size == 48 and a.profile is None  # no task profile was run
    ids = _ids()
    torch.testing.assert_close(_logits(a.model, ids), _logits(b.model, ids), rtol=0, atol=0)
    diet = _run(model, tok, data_dir, "diet", 0.25, tasks="boolq")
    assert not torch.equal(_logits(diet.model, ids), _logits(a.model, ids))


def test_wanda_sp_prunes_a_dead_group_first(tok, data_dir):
    model = wide_model("mistral")
    adapter = adapter_for(model)
    block = adapter.blocks(model)[1]
    with torch.no_grad():
        for name in (adapter.q_proj, adapter.k_proj, adapter.v_proj):
            w = get_module(block, name).weight
            w[group_rows(torch.tensor([3]), w.shape[0] // 4)] = 0
        get_module(block, adapter.o_proj).weight[:, group_rows(torch.tensor([3]), 16)] = 0
    from dietprune.registry import METHODS, MethodContext, method_config

    cfg = method_config("wanda-sp", sparsity=0.3, **RUN)
    sel = METHODS["wanda-sp"].function()(model, cfg, MethodContext(tokenizer=tok, data_dir=data_dir))
    kept = sel.tensors["kept_groups"][1].tolist()
    assert len(kept) < 4 and 3 not in kept


def test_shortgpt_removes_a_block_that_does_nothing(tok, data_dir):
    model = wide_model("qwen3")
    adapter = adapter_for(model)
    with torch.no_grad():
        get_module(adapter.blocks(model)[2], adapter.o_proj).weight.zero_()
        get_module(adapter.blocks(model)[2], adapter.mlp_out).weight.zero_()
    res = _run(model, tok, data_dir, "shortgpt", 0.2)
    assert res.summary["param_reduction"] > 0
    meta_removed = res.model.config.num_hidden_layers
    assert meta_removed == 3
    ids = _ids()
    torch.testing.assert_close(_logits(res.model, ids), _logits(model, ids), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("method", METHODS)
def test_zero_sparsity_equals_original(method, tok, data_dir):
    model = wide_model("gemma3_text")
    res = _run(model, tok, data_dir, method, 0.0)
    assert param_count(res.model) == param_count(model)
    ids = _ids()
    torch.testing.assert_close(_logits(res.model, ids), _logits(model, ids), rtol=1e-5, atol=1e-5)


def test_unreachable_target_is_a_clear_error(tok, data_dir):
    with pytest.raises(UnreachableSparsity, match=r"cannot reach 95.0% .* allow 0.0%\.\.") as info:
        _run(wide_model("llama"), tok, data_dir, "wanda-sp", 0.95)
    assert isinstance(info.value, DietpruneError)  # the CLI's one-line error
    lo, hi = info.value.reachable
    assert lo == 0.0 and 0.0 < hi < 0.95 and info.value.method == "wanda-sp"
