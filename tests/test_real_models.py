"""The real pretrained presets: prune at 20%, reload with stock transformers, generate, perplexity."""

import json
import math

import pytest
import torch

from dietprune.data import evaluation_rows
from dietprune.tasks import get_task

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("preset,hidden", [pytest.param(p, h, marks=pytest.mark.xdist_group(p))
                                           for p, h in (("smollm2-135m", 576), ("gemma3-270m", 640))])
def test_prune_real_preset(preset, hidden, pruned_preset, data_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    res = pruned_preset(preset)  # prune(preset, tasks="boolq,arc_easy", sparsity=0.2, samples=16), once a session
    out = res.output
    assert res.summary["hidden_size_before"] == hidden
    assert res.summary["param_reduction"] > 0.15
    ids = torch.tensor([[5, 17, 250, 1024, 33, 9]])
    tok = AutoTokenizer.from_pretrained(out)
    prompt = tok("The capital of France is", return_tensors="pt")
    with torch.no_grad():
        expected = res.model(input_ids=ids).logits
        expected_gen = res.model.generate(**prompt, max_new_tokens=10, do_sample=False)

    model = AutoModelForCausalLM.from_pretrained(out).eval()
    assert model.config.hidden_size == json.loads((out / "dietprune.json").read_text())["summary"]["hidden_size_after"]
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, expected, rtol=1e-4, atol=1e-4)
        gen = model.generate(**prompt, max_new_tokens=10, do_sample=False)
    # the reloaded checkpoint generates what the pruned model in memory generated (greedy; the saved generation
    # config may stop at EOS where the in-memory one did not, so the common prefix is compared)
    n = min(gen.shape[1], expected_gen.shape[1])
    assert n > prompt["input_ids"].shape[1] and torch.equal(gen[:, :n], expected_gen[:, :n])

    rows = [r["text"] for r in evaluation_rows(get_task("wikitext2"), limit=40, data_dir_=data_dir) if r["text"].strip()]
    enc = tok("\n\n".join(rows[:6]), return_tensors="pt").input_ids[:, :256]
    with torch.no_grad():
        loss = model(input_ids=enc, labels=enc).loss
    # far below a uniform guess over the vocabulary (perplexity = vocab size): the cut model still models text
    assert math.isfinite(loss.item()) and math.exp(loss.item()) < 0.05 * model.config.vocab_size
