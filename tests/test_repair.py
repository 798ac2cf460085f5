import copy

import pytest
import torch

from dietprune.pipeline import prune
from dietprune.refit import capture_norm_outputs, reader_weights, refit_readers_, solve_refit, moments
from dietprune.repair import ls_fold, ls_map, parse_repair, rms_ratio, uses_energy, uses_refit
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


def test_solve_refit_ridge_pulls_towards_the_prior():
    g = torch.Generator().manual_seed(2)
    y = torch.randn(200, 6, generator=g)
    y_hat = y[:, :4] + 0.3 * torch.randn(200, 4, generator=g)
    w, prior = torch.randn(2, 6, generator=g), torch.randn(2, 4, generator=g)
    gh, c, _ = moments(y, y_hat)
    lam = 0.5 * torch.diagonal(gh).mean()
    # closed form of argmin ‖W' Ŷ − W Y‖² + λ‖W' − W₀‖², from the normal equations
    ref = torch.linalg.solve(gh + lam * torch.eye(4, dtype=torch.float64), (w.double() @ c + lam * prior.double()).T).T
    torch.testing.assert_close(solve_refit(w, gh, c, ridge=0.5, prior=prior).double(), ref, rtol=1e-5, atol=1e-5)
    far = solve_refit(w, gh, c, ridge=1e6, prior=prior)  # a huge ridge returns the prior
    torch.testing.assert_close(far, prior, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(solve_refit(w, gh, c, ridge=1e6), prior, atol=1e-2)  # without a prior: towards 0


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


def test_energy_fold_matches_the_dense_output_energy():
    """ls_fold with the Gram matrix: each row's calibration energy equals the dense row's, and the
    rows keep the direction of the plain least-squares fold."""
    g = torch.Generator().manual_seed(3)
    y = torch.randn(400, 8, generator=g) @ torch.randn(8, 8, generator=g)
    gram = (y.T @ y).double()
    w = torch.randn(5, 8, generator=g)
    kept, removed = torch.tensor([0, 2, 3, 5, 6, 7]), torch.tensor([1, 4])
    a = ls_map(gram, kept, removed, ridge=1e-6)
    plain, scaled = ls_fold(w, a, kept, removed), ls_fold(w, a, kept, removed, gram)
    wd, pk, sk = w.double(), plain[:, kept].double(), scaled[:, kept].double()
    gkk = gram[kept][:, kept]
    dense_energy = ((wd @ gram) * wd).sum(1)
    torch.testing.assert_close(((sk @ gkk) * sk).sum(1), dense_energy, rtol=1e-5, atol=1e-5)
    plain_energy = ((pk @ gkk) * pk).sum(1)
    assert (plain_energy < dense_energy).all()  # the least-squares prediction shrinks the outputs
    ratio = sk / pk
    torch.testing.assert_close(ratio, ratio[:, :1].expand_as(ratio), rtol=1e-5, atol=1e-6)  # a per-row scale
    assert parse_repair("rms+ls+energy") == (True, True) and uses_energy("rms+ls+energy") and not uses_energy("rms+ls")


def test_refit_after_ls_is_anchored_at_the_ls_weights(data_dir):
    """rms+ls+refit: the least-squares fold runs before the cut, and the re-fit's ridge pulls towards the
    folded weights, so a huge re-fit ridge gives back the rms+ls model and a tiny one the plain re-fit."""
    assert parse_repair("rms+ls+refit") == (True, True) and uses_refit("rms+ls+refit")
    assert parse_repair("rms+refit") == (True, False)
    model, tok = tiny_model("llama"), tiny_tokenizer()
    kw = dict(tokenizer=tok, tasks="boolq,arc_easy", sparsity=0.25, data_dir=data_dir, samples=6, batch_size=4,
              max_length=32, fit_samples=12)
    ls = prune(model, repair="rms+ls", **kw).model
    far = prune(model, repair="rms+ls+refit", refit_ridge=1e8, **kw).model
    near = prune(model, repair="rms+ls+refit", refit_ridge=1e-9, **kw).model
    plain_refit = prune(model, repair="rms+refit", refit_ridge=1e-9, **kw).model
    q = [m.model.layers[1].self_attn.q_proj.weight for m in (ls, far, near, plain_refit)]
    def rel(a, b):
        return float((a - b).norm() / b.norm())

    assert rel(q[1], q[0]) < 1e-5
    assert rel(q[2], q[0]) > 1e-2  # the re-fit moved the weights...
    assert rel(q[2], q[3]) < 1e-3  # ...to the least-squares solution, whatever the starting point


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


def test_cli_offers_every_repair():
    from dietprune.cli import build_parser
    from dietprune.repair import REPAIRS

    parser, _ = build_parser()
    prune_parser = next(a for a in parser._subparsers._group_actions[0].choices.items() if a[0] == "prune")[1]
    choices = next(a.choices for a in prune_parser._actions if "--repair" in a.option_strings)
    assert list(choices) == list(REPAIRS)
