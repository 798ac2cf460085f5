"""Layer streaming (--low-memory) gives the in-memory results: same scores, same checkpoint."""

import json

import pytest
import torch
from safetensors import safe_open

from dietprune.errors import DietpruneError
from dietprune.pipeline import profile, prune
from dietprune.engine import ActivationStore
from dietprune.streaming import Checkpoint
from tiny import ARCHS, tiny_model, tiny_tokenizer

TASKS = "boolq,arc_easy"
KW = dict(samples=6, batch_size=4, max_length=32)


def _save(tmp_path, arch, shard="40KB"):
    folder = tmp_path / arch
    tiny_model(arch).save_pretrained(folder, max_shard_size=shard)
    tiny_tokenizer().save_pretrained(folder)
    return folder


def _tensors(folder):
    ckpt = Checkpoint(folder)
    return {name: ckpt.get(name) for name in ckpt.weight_map}


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("tap", ["norm-out", "residual"])
def test_streamed_profile_equals_in_memory(arch, tap, tmp_path, data_dir):
    folder = _save(tmp_path, arch)
    a = profile(str(folder), TASKS, data_dir=data_dir, tap=tap, low_memory=False, gram=True, **KW)
    b = profile(str(folder), TASKS, data_dir=data_dir, tap=tap, low_memory=True, gram=True, offload="disk", **KW)
    assert a.meta["fingerprint"] == b.meta["fingerprint"]
    for task in a.tasks:
        assert a.tasks[task].count == b.tasks[task].count > 0
        torch.testing.assert_close(b.tasks[task].abs_sum, a.tasks[task].abs_sum, rtol=1e-6, atol=1e-6)
    for field in ("in_sq", "final_in_sq", "gram", "final_gram"):
        torch.testing.assert_close(getattr(b.norms, field), getattr(a.norms, field), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("repair", ["rms", "rms+ls", "rms+ls+energy"])
def test_streamed_checkpoint_equals_in_memory(arch, repair, tmp_path, data_dir, monkeypatch):
    from transformers import AutoModelForCausalLM

    monkeypatch.setattr("dietprune.streaming.ROW_BLOCK_BYTES", 1000)  # column cuts go in blocks of 3 rows

    folder = _save(tmp_path, arch)
    opts = dict(tasks=TASKS, sparsity=0.25, data_dir=data_dir, repair=repair, **KW)
    mem = prune(str(folder), output=tmp_path / "mem", low_memory=False, **opts)
    low = prune(str(folder), output=tmp_path / "low", low_memory=True, max_shard_size="20KB", **opts)
    assert torch.equal(mem.kept, low.kept)
    assert low.summary["params_after"] == mem.summary["params_after"] < mem.summary["params_before"]
    a, b = _tensors(tmp_path / "mem"), _tensors(tmp_path / "low")
    assert sorted(a) == sorted(b)
    for name in a:
        assert a[name].dtype == b[name].dtype and a[name].shape == b[name].shape, name
        torch.testing.assert_close(b[name], a[name], rtol=1e-6, atol=1e-6)
    assert len(json.loads((tmp_path / "low" / "model.safetensors.index.json").read_text())["weight_map"]) == len(b)
    assert len(list((tmp_path / "low").glob("model-*.safetensors"))) > 1  # really sharded
    ca = json.loads((tmp_path / "mem" / "config.json").read_text())
    cb = json.loads((tmp_path / "low" / "config.json").read_text())
    assert ca == cb
    ma = json.loads((tmp_path / "mem" / "dietprune.json").read_text())
    mb = json.loads((tmp_path / "low" / "dietprune.json").read_text())
    assert ma["kept_indices"] == mb["kept_indices"]
    assert ma["repair"]["rms_factors"] == pytest.approx(mb["repair"]["rms_factors"], rel=1e-9)
    # plain transformers loads the streamed checkpoint and computes what the in-memory cut computes
    ids = torch.randint(3, 128, (2, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = AutoModelForCausalLM.from_pretrained(tmp_path / "low").eval()(input_ids=ids).logits
    torch.testing.assert_close(logits, mem.model(input_ids=ids).logits, rtol=1e-5, atol=1e-5)


def test_streamed_bfloat16_output(tmp_path, data_dir):
    folder = _save(tmp_path, "llama")
    opts = dict(tasks=TASKS, sparsity=0.5, data_dir=data_dir, dtype="bfloat16", **KW)
    prune(str(folder), output=tmp_path / "mem", low_memory=False, **opts)
    prune(str(folder), output=tmp_path / "low", low_memory=True, **opts)
    a, b = _tensors(tmp_path / "mem"), _tensors(tmp_path / "low")
    assert all(torch.equal(a[n], b[n]) and b[n].dtype == torch.bfloat16 for n in a)


def test_low_memory_errors(tmp_path, data_dir):
    folder = _save(tmp_path, "qwen3")
    with pytest.raises(DietpruneError, match="in memory"):
        prune(str(folder), tasks=TASKS, sparsity=0.25, method="magnitude", repair="none", output=tmp_path / "o",
              low_memory=True, data_dir=data_dir, **KW)
    assert not (tmp_path / "o").exists()
    bare = tmp_path / "bare"  # config but no safetensors weights (a .bin checkpoint)
    bare.mkdir()
    (bare / "config.json").write_text((folder / "config.json").read_text())
    with pytest.raises(DietpruneError, match="safetensors"):
        profile(str(bare), TASKS, low_memory=True, data_dir=data_dir, **KW)
    with pytest.raises(DietpruneError, match="in-memory model"):
        profile(tiny_model("qwen3"), TASKS, tokenizer=tiny_tokenizer(), low_memory=True, data_dir=data_dir, **KW)


def test_activation_store_on_disk_round_trips():
    shapes = [(2, 3, 4), (1, 5, 4)]
    store = ActivationStore(len(shapes), directory=None), ActivationStore(len(shapes), directory="/tmp")
    values = [torch.randn(shapes[0]), torch.randn(shapes[1]).to(torch.bfloat16)]
    for st in store:
        for b, v in enumerate(values):
            st.put(b, v)
    for b, v in enumerate(values):
        assert torch.equal(store[0].get(b), v) and torch.equal(store[1].get(b), v)
        assert store[1].get(b).dtype == v.dtype
    path = store[1].path
    store[1].close()
    import os

    assert not os.path.exists(path)
