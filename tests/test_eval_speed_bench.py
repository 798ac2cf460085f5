"""bench/eval_speed.py's multiply-add count, checked against a hand count on a tiny model."""

import pytest
from benchload import load_bench
from tiny import tiny_model, tiny_tokenizer


@pytest.fixture(scope="module")
def es():
    return load_bench("eval_speed")


@pytest.mark.parametrize("task_name", ["boolq", "arc_easy"])
def test_work_estimate_matches_a_hand_count(es, data_dir, task_name):
    from dietprune.data import evaluation_rows
    from dietprune.evaluate.runner import encode_choices
    from dietprune.tasks import get_task

    model, tok = tiny_model("llama"), tiny_tokenizer()
    body = 2 * (64 * 64 * 2 + 64 * 32 * 2 + 3 * 64 * 96)  # 2 layers: q, o; k, v (2 kv heads x 16); mlp
    head = 128 * 64
    ours = theirs = 0
    task = get_task(task_name)
    for row in evaluation_rows(task, 6, data_dir):
        pairs = encode_choices(tok, task.format(row), add_bos=False)
        ctx = pairs[0][0]
        assert all(c == ctx for c, _ in pairs)  # these tasks share one context per example
        # the harness: one sequence per distinct context + continuation[:-1], lm_head everywhere
        seqs = {tuple(c + k[:-1]) for c, k in pairs}
        theirs += sum(len(s) for s in seqs) * (body + head)
        # dietprune: the context once, each continuation but its last token once, lm_head per scored token
        ours += (len(ctx) + sum(len(k) - 1 for _, k in pairs)) * body + sum(len(k) for _, k in pairs) * head
    got = es.work_estimate(model, tok, task_name, 6, data_dir)
    assert (got["dietprune_macs"], got["harness_macs"]) == (ours, theirs)
    assert got["harness_macs"] > got["dietprune_macs"]
