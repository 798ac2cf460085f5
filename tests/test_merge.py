import pytest
import torch

from dietprune.errors import DietpruneError
from dietprune.merge import keep_count, merge, order_by, ranks


def _scores(tasks=5, d=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(tasks, d, generator=g) + 0.01


@pytest.mark.parametrize("method", ["vote", "mean", "rank"])
@pytest.mark.parametrize("sparsity", [0.0, 0.1, 0.2, 0.5, 0.95])
def test_exact_k_and_sorted_unique(method, sparsity):
    res = merge(_scores(), sparsity, method)
    k = round(40 * (1 - sparsity))
    assert res.k == k == len(res.kept)
    assert torch.equal(res.kept, torch.unique(res.kept))


@pytest.mark.parametrize("method", ["vote", "mean", "rank"])
def test_deterministic_and_task_order_free(method):
    s = _scores()
    a = merge(s, 0.3, method)
    b = merge(s.clone(), 0.3, method)
    c = merge(s[torch.tensor([4, 2, 0, 1, 3])], 0.3, method)
    assert torch.equal(a.kept, b.kept) and torch.equal(a.kept, c.kept)


def test_unanimous_dimension_kept_and_unvoted_dropped():
    s = _scores(tasks=3, d=20, seed=3)
    s[:, 7] = 100.0  # every task's top dimension
    s[:, 11] = 1e-6  # no task keeps it
    res = merge(s, 0.5, "vote")
    assert 7 in res.kept.tolist()
    assert 11 not in res.kept.tolist()
    assert res.votes[7] == 3 and res.votes[11] == 0


def test_votes_decide_before_scores():
    # dim 0 has a huge score in one task only; dims 1, 2 are kept by two of three tasks
    s = torch.tensor([[100.0, 1.0, 1.0, 0.1], [0.1, 2.0, 2.0, 0.2], [0.1, 2.0, 2.0, 0.3]])
    assert merge(s, 0.5, "vote").kept.tolist() == [1, 2]
    assert merge(s, 0.5, "mean").kept.tolist() == [0, 1] or merge(s, 0.5, "mean").kept.tolist() == [0, 2]


def test_ties_broken_by_mean_score_then_index():
    s = torch.ones(2, 6)
    s[0, 5] = 1.5  # same votes as others after top-k? k=3: task0 keeps 5,0,1; task1 keeps 0,1,2
    res = merge(s, 0.5, "vote")
    assert res.kept.tolist() == [0, 1, 5]  # votes: 0,1 -> 2; 5 and 2 -> 1 each; 5 wins on score
    flat = merge(torch.ones(2, 6), 0.5, "vote")
    assert flat.kept.tolist() == [0, 1, 2]  # full tie: lowest indices


def test_single_task_reproduces_its_own_topk():
    s = _scores(tasks=1, d=30)
    res = merge(s, 0.4, "vote")
    assert res.kept.tolist() == sorted(torch.topk(s[0], 18).indices.tolist())


def test_align_and_bounds():
    assert keep_count(640, 0.2) == 512
    assert keep_count(576, 0.2, align=9) == 459
    assert keep_count(100, 0.2, align=64) == 64
    assert merge(_scores(d=100), 0.2, "vote", align=8).k == 80
    for bad in (-0.1, 1.0, 1.5, float("nan")):
        with pytest.raises(DietpruneError):
            keep_count(10, bad)
    with pytest.raises(DietpruneError):
        merge(_scores(), 0.2, "median")


def test_order_and_ranks_helpers():
    key = torch.tensor([1.0, 3.0, 3.0, 2.0])
    assert order_by(key).tolist() == [1, 2, 3, 0]
    assert ranks(key[None]).tolist() == [[3.0, 0.0, 1.0, 2.0]]


def test_non_finite_scores_rejected():
    s = _scores()
    s[1, 3] = float("nan")
    with pytest.raises(DietpruneError):
        merge(s, 0.2)


def test_jaccard_of_kept_dimensions():
    from dietprune.merge import jaccard

    assert jaccard(torch.tensor([0, 1, 2, 3]), [2, 3, 4, 5]) == pytest.approx(2 / 6)
    assert jaccard([1, 2], torch.tensor([2, 1])) == 1.0
    assert jaccard([], []) == 1.0
