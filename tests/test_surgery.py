import copy
import json
import subprocess
import sys
import types

import pytest
import torch

from dietprune.adapters import adapter_for, get_module, param_count
from dietprune.errors import DietpruneError
from dietprune.pipeline import save_checkpoint
from dietprune.surgery import prune_hidden_
from tiny import ARCHS, tiny_model


def _ids(vocab=128, batch=2, length=12, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (batch, length), generator=g)


def _kept(d, k, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.sort(torch.randperm(d, generator=g)[:k]).values


@torch.no_grad()
def _logits(model, ids):
    return model(input_ids=ids).logits


def _masked_norm_forward(mask, offset, k):
    def forward(self, x):
        eps = getattr(self, "variance_epsilon", getattr(self, "eps", 1e-6))
        xf = x.float() * mask
        rms = torch.rsqrt(xf.pow(2).sum(-1, keepdim=True) / k + eps)
        return (xf * rms * (offset + self.weight.float()) * mask).type_as(x)

    return forward


@torch.no_grad()
def reference_model(model, kept):
    """Full width; pruned dims zeroed everywhere; every residual RMS norm over kept dims only."""
    ref = copy.deepcopy(model)
    adapter = adapter_for(ref)
    d = ref.config.hidden_size
    mask = torch.zeros(d)
    mask[kept] = 1.0
    if not adapter.tied(ref):
        adapter.output_head(ref).weight.mul_(mask)
    adapter.embedding(ref).weight.mul_(mask)
    norms = [adapter.norm(ref)]
    for block in adapter.blocks(ref):
        for name in adapter.writers:
            lin = get_module(block, name)
            lin.weight.mul_(mask[:, None])
            if lin.bias is not None:
                lin.bias.mul_(mask)
        norms += [get_module(block, n) for n in adapter.residual_norms]
    for norm in norms:
        norm.forward = types.MethodType(_masked_norm_forward(mask, adapter.norm_offset, len(kept)), norm)
    return ref


@pytest.mark.parametrize("arch", ARCHS)
def test_sparsity_zero_is_identity(arch, tmp_path):
    model = tiny_model(arch)
    ids = _ids()
    before = _logits(model, ids)
    pruned = prune_hidden_(copy.deepcopy(model), torch.arange(model.config.hidden_size))
    assert torch.equal(_logits(pruned, ids), before)
    save_checkpoint(pruned, None, tmp_path / "out", {}, {})
    from transformers import AutoModelForCausalLM

    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out", attn_implementation="eager").eval()
    torch.testing.assert_close(_logits(reloaded, ids), before, rtol=0, atol=1e-5)


@pytest.mark.parametrize("arch", ARCHS)
def test_sliced_equals_masked_reference(arch):
    model = tiny_model(arch)
    ids = _ids()
    kept = _kept(64, 44)  # 44 = 4 heads * 11
    ref = reference_model(model, kept)
    pruned = prune_hidden_(copy.deepcopy(model), kept)
    assert pruned.config.hidden_size == 44
    torch.testing.assert_close(_logits(pruned, ids), _logits(ref, ids), rtol=1e-4, atol=1e-4)
    # the cut must really change the model: the reference is not the dense model
    assert not torch.allclose(_logits(model, ids), _logits(ref, ids), atol=1e-3)


@pytest.mark.parametrize("arch", ARCHS)
def test_really_smaller(arch):
    model = tiny_model(arch)
    before = param_count(model)
    pruned = prune_hidden_(copy.deepcopy(model), _kept(64, 32))
    adapter = adapter_for(pruned)
    for block in adapter.blocks(pruned):
        for name in adapter.readers:
            assert get_module(block, name).weight.shape[1] == 32
        for name in adapter.writers:
            assert get_module(block, name).weight.shape[0] == 32
    assert adapter.embedding(pruned).weight.shape[1] == 32
    assert param_count(pruned) < before


def test_input_model_untouched():
    model = tiny_model("gemma3_text")
    snapshot = {k: v.clone() for k, v in model.state_dict().items()}
    from dietprune.pipeline import prune

    prune(model, tokenizer=object(), sparsity=0.25, method="random", repair="none", tasks="boolq")
    for k, v in model.state_dict().items():
        assert torch.equal(v, snapshot[k]), k
    assert model.config.hidden_size == 64


@pytest.mark.parametrize("bad", [[], [0, 0, 1], [70]])
def test_bad_kept_indices(bad):
    with pytest.raises(DietpruneError):
        prune_hidden_(tiny_model("llama"), torch.tensor(bad, dtype=torch.long))


RELOAD_SCRIPT = r"""
import json, sys, torch
assert "dietprune" not in sys.modules
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], attn_implementation="eager").eval()
ids = torch.tensor(json.loads(sys.argv[2]))
with torch.no_grad():
    print(json.dumps(model(input_ids=ids).logits.tolist()))
assert "dietprune" not in sys.modules
"""


@pytest.mark.parametrize("arch", ["gemma3_text", "gemma2", "llama", "qwen3"])
def test_reload_in_fresh_process_without_dietprune(arch, tmp_path):
    model = tiny_model(arch)
    pruned = prune_hidden_(copy.deepcopy(model), _kept(64, 40))
    ids = _ids()
    expected = _logits(pruned, ids)
    out = tmp_path / "ckpt"
    save_checkpoint(pruned, None, out, {"method": "test"}, {"kept": _kept(64, 40)})
    assert json.loads((out / "config.json").read_text())["hidden_size"] == 40
    proc = subprocess.run([sys.executable, "-c", RELOAD_SCRIPT, str(out), json.dumps(ids.tolist())],
                          capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    got = torch.tensor(json.loads(proc.stdout.strip().splitlines()[-1]))
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_loaded_model_passed_in_is_not_modified():
    from dietprune.models import LoadedModel
    from dietprune.pipeline import prune
    from tiny import tiny_tokenizer

    lm = LoadedModel(tiny_model("llama"), tiny_tokenizer(), "tiny", "local")
    before = {k: v.clone() for k, v in lm.model.state_dict().items()}
    res = prune(lm, sparsity=0.25, method="random", repair="none", tasks="boolq")
    assert res.model.config.hidden_size == 48 and lm.model.config.hidden_size == 64
    assert all(torch.equal(v, before[k]) for k, v in lm.model.state_dict().items())
