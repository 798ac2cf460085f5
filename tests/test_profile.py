import pytest
import torch

from dietprune.errors import DietpruneError
from dietprune.profile import DietObserver, ProfileConfig, collect, tap_points
from dietprune import engine
from dietprune.adapters import adapter_for
from dietprune.stats import NormStats, Profile, TaskStats
from tiny import ARCHS, tiny_model, tiny_tokenizer


def _seqs(n=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(4, 128, (int(torch.randint(3, 14, (1,), generator=g)),), generator=g).tolist()
            for _ in range(n)]


@pytest.mark.parametrize("tap", ["residual", "norm-out", "write"])
def test_shards_merge_exactly(tap):
    model, tok = tiny_model("gemma3_text"), tiny_tokenizer()
    # batch size 1: every sequence runs alone in both cases, so the only difference is how the float64
    # sums are grouped (a float32 forward is not batch-invariant: other padding moves results by ~1e-7)
    cfg = ProfileConfig(tap=tap, batch_size=1)
    seqs = _seqs(7)
    whole = collect(model, tok, seqs, cfg)
    parts = collect(model, tok, seqs[:3], cfg) + collect(model, tok, seqs[3:], cfg)
    assert whole.count == parts.count == sum(len(s) for s in seqs)
    torch.testing.assert_close(whole.abs_sum, parts.abs_sum, rtol=1e-9, atol=1e-9)


def test_padding_does_not_count():
    model, tok = tiny_model("llama"), tiny_tokenizer()
    seqs = _seqs(5)
    a = collect(model, tok, seqs, ProfileConfig(batch_size=1))
    b = collect(model, tok, seqs, ProfileConfig(batch_size=5))  # padded batches
    torch.testing.assert_close(a.abs_sum, b.abs_sum, rtol=1e-5, atol=1e-6)


def test_scores_are_mean_abs_over_points_then_tokens():
    model, tok = tiny_model("qwen3"), tiny_tokenizer()
    seq = _seqs(1)[0]
    captured = []
    adapter = adapter_for(model)
    points = tap_points(model, adapter, "norm-out")
    hs = [m.register_forward_hook(lambda mod, a, out: captured.append(out.detach().abs()[0])) for _, m in points]
    stats = collect(model, tok, [seq], ProfileConfig(tap="norm-out"))
    for h in hs:
        h.remove()
    expected = torch.stack(captured).mean(0).mean(0).double()  # [points, T, d] -> [d]
    torch.testing.assert_close(stats.scores(), expected, rtol=1e-5, atol=1e-7)


def test_nan_activations_are_an_error():
    model, tok = tiny_model("llama"), tiny_tokenizer()
    with torch.no_grad():
        model.model.layers[0].mlp.down_proj.weight[0, 0] = float("nan")
    with pytest.raises(DietpruneError, match="non-finite"):
        collect(model, tok, _seqs(2), ProfileConfig(tap="residual"))


def test_profile_save_load_roundtrip(tmp_path):
    st = TaskStats(torch.rand(3, 8, dtype=torch.float64), 17, 4)
    norms = NormStats(torch.rand(2, 2, 8, dtype=torch.float64), torch.rand(8, dtype=torch.float64), 17,
                      torch.rand(2, 2, 8, 8, dtype=torch.float64), torch.rand(8, 8, dtype=torch.float64))
    prof = Profile({"boolq": st, "rte": st + st}, {"fingerprint": "abc", "tap": "norm-out"}, norms)
    path = prof.save(tmp_path / "s.safetensors")
    back = Profile.load(path)
    assert list(back.tasks) == ["boolq", "rte"] and back.tasks["rte"].count == 34
    torch.testing.assert_close(back.score_matrix(), prof.score_matrix())
    torch.testing.assert_close(back.norms.gram, norms.gram)
    assert back.meta["fingerprint"] == "abc"
    (tmp_path / "junk.safetensors").write_bytes(b"not a file")
    with pytest.raises(DietpruneError):
        Profile.load(tmp_path / "junk.safetensors")


@pytest.mark.parametrize("arch", ARCHS)
def test_norm_stats_shapes(arch):
    model, tok = tiny_model(arch), tiny_tokenizer()
    adapter = adapter_for(model)
    acc = DietObserver(adapter, model.config, "norm-out", [""], gram=True)
    engine.run(model, engine.make_batches(_seqs(3), 8, tok), [acc])
    assert acc.in_sq.shape == (2, len(adapter.residual_norms), 64) and (acc.in_sq > 0).all()
    assert acc.gram.shape == (2, len(adapter.reader_norms()), 64, 64)
    # a Gram matrix is symmetric positive semi-definite
    g = acc.gram[1, 0]
    torch.testing.assert_close(g, g.T)
    assert torch.linalg.eigvalsh(g).min() > -1e-6 * g.diagonal().max()
