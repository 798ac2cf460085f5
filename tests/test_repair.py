import copy

import pytest
import torch

from dietprune.pipeline import prune
from dietprune.refit import capture_norm_outputs, reader_weights, refit_readers_, solve_refit, moments
from dietprune.repair import ls_map, rms_ratio
from dietprune.surgery import prune_hidden_
from tiny import tiny_model, tiny_tokenizer


def test_rms_ratio_restores_scale():
    in_sq = torch.tensor([4.0, 4.0, 1.0, 1.0], dtype=torch.float64)  # per-dim sums of squares
    kept = torch.tensor([0, 1])
    # kept mean square 4, overall 2.5: the pruned norm divides by sqrt(4) instead of sqrt(2.5)
    assert rms_ratio(in_sq, kept) == pytest.approx((4 / 2.5) ** 0.5)
    assert rms_ratio(in_sq, torch.arange(4)) == pytest.approx(1.0)


def test_ls_map_recovers_exact_linear_dependence():
    g = torch.Generator().manual_seed(0)
    yk = torch.randn(500, 6, generator=g, dtype=torch.float64)
    a = torch.randn(2, 6, generator=g, dtype=torch.float64)
    y = torch.cat([yk, yk @ a.T], dim=1)  # dims 6, 7 are linear in dims 0..5
    est = ls_map(y.T @ y, torch.arange(6), torch.tensor([6, 7]), ridge=1e-10)
    torch.testing.assert_close(est, a, rtol=1e-6, atol=1e-6)


def test_solve_refit_is_least_squares():
    g = torch.Generator().manual_seed(1)
    y = torch.randn(300, 8, generator=g)
    y_hat = y[:, :5] * 1.7 + 0.1 * torch.randn(300, 5, generator=g)
    w = torch.randn(3, 8, generator=g)
    gh, c, _ = moments(y, y_hat)
    w_new = solve_refit(w, gh, c, ridge=1e-12)
    ref = torch.linalg.lstsq(y_hat.double(), (y @ w.T).double()).solution.T
    torch.testing.assert_close(w_new.double(), ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("arch", ["gemma3_text", "llama", "qwen2"])
def test_refit_brings_pruned_model_closer_to_dense(arch):
    # weights large enough that the blocks are far from linear, so the fit has real work to do
    model = tiny_model(arch, initializer_range=0.3)
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(4, 128, (16, 24), generator=g)
    attn = torch.ones_like(ids)
    held_out = torch.randint(4, 128, (8, 24), generator=g)
    kept = torch.sort(torch.randperm(64, generator=g)[:48]).values
    plain = prune_hidden_(copy.deepcopy(model), kept)
    refit = prune_hidden_(copy.deepcopy(model), kept)
    report = refit_readers_(refit, reader_weights(model), capture_norm_outputs(model, ids, attn), ids, attn,
                            ridge=1e-4)
    assert len(report) == 2 * 5
    assert all(after < before for before, after in report.values())

    @torch.no_grad()
    def kl_to_dense(m):
        dense = model(input_ids=held_out).logits.log_softmax(-1)
        return torch.nn.functional.kl_div(m(input_ids=held_out).logits.log_softmax(-1), dense, log_target=True,
                                          reduction="batchmean").item()

    assert kl_to_dense(refit) < 0.9 * kl_to_dense(plain)


@pytest.mark.parametrize("arch", ["gemma3_text", "llama"])
def test_rms_then_refit_targets_the_dense_outputs(arch, data_dir):
    """The re-fit absorbs any rescaling of its input, so the first block's readers must give the same
    outputs with and without the RMS correction. Targets read after the correction would be the
    dense outputs times the correction factor, and these outputs would differ by that factor."""
    model, tok = tiny_model(arch), tiny_tokenizer()
    kw = dict(tokenizer=tok, tasks="boolq,arc_easy", sparsity=0.25, data_dir=data_dir, samples=6, batch_size=4,
              max_length=32, fit_samples=12, refit_ridge=1e-9)
    res = prune(model, repair="refit", **kw)
    plain = res.model
    with_rms = prune(model, repair="rms+refit", **kw).model
    factor = rms_ratio(res.profile.norms.in_sq[0, 0], res.kept)
    assert abs(factor - 1) > 0.02, "test needs a mask whose RMS correction is not the identity"
    ids = torch.randint(4, 128, (2, 9), generator=torch.Generator().manual_seed(0))

    def q_out(m):
        layer = m.model.layers[0]
        return layer.self_attn.q_proj(layer.input_layernorm(m.model.embed_tokens(ids)))

    a, b = q_out(with_rms), q_out(plain)
    rel = float((a - b).norm() / b.norm())
    assert rel < 0.2 * abs(factor - 1), (rel, factor)


@pytest.mark.parametrize("arch", ["llama", "gemma3_text"])
def test_ls_folds_into_an_untied_lm_head_only(arch):
    """Removed final-norm outputs that are linear in the kept ones are recovered exactly by an untied
    lm_head; a tied lm_head (it is the input embedding) is left alone."""
    from dietprune.adapters import adapter_for
    from dietprune.repair import ls_compensate_
    from dietprune.stats import NormStats

    model = tiny_model(arch)
    ad = adapter_for(model)
    d, n_layers = model.config.hidden_size, model.config.num_hidden_layers
    kept, removed = torch.arange(0, d, 2), torch.arange(1, d, 2)
    g = torch.Generator().manual_seed(3)
    yk = torch.randn(400, len(kept), generator=g, dtype=torch.float64)
    b = torch.randn(len(removed), len(kept), generator=g, dtype=torch.float64)
    y = torch.empty(400, d, dtype=torch.float64)
    y[:, kept], y[:, removed] = yk, yk @ b.T
    eye = torch.eye(d, dtype=torch.float64)
    norms = NormStats(torch.ones(n_layers, len(ad.residual_norms), d, dtype=torch.float64),
                      torch.ones(d, dtype=torch.float64), 400,
                      eye.expand(n_layers, len(ad.reader_norms()), d, d).clone(), y.T @ y)
    head = ad.output_head(model).weight.detach().clone()
    ls_compensate_(model, kept, norms, ridge=1e-12)
    new = ad.output_head(model).weight.detach()
    if ad.tied(model):
        assert torch.equal(new, head)
    else:
        torch.testing.assert_close(yk.float() @ new[:, kept].T, y.float() @ head.T, rtol=1e-3, atol=1e-3)
