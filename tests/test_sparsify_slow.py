"""Sparsify a real pretrained model (smollm2-135m) with a few calibration samples."""

import pytest
import torch

from dietprune.adapters import adapter_for, get_module
from dietprune.sparsify.metrics import nm_holds


@pytest.mark.slow
def test_smollm2_wanda_fused_2of4(data_dir):
    from dietprune.encoding import encode
    from dietprune.models import load
    from dietprune.sparsify import sparsify

    lm = load("smollm2-135m")
    text = ("The tower is 324 metres tall, about the same height as an 81-storey building, and the tallest "
            "structure in Paris. Its base is square, measuring 125 metres on each side.")
    ids = torch.tensor([encode(lm.tokenizer, text, False)])

    def loss(model):
        with torch.no_grad():
            return float(model(input_ids=ids, labels=ids).loss)

    dense = loss(lm.model)
    first = adapter_for(lm.model).blocks(lm.model)[0]
    q_before = get_module(first, "self_attn.q_proj").weight.clone()
    res = sparsify(lm.model, tokenizer=lm.tokenizer, method="wanda", pattern="2:4", tasks="boolq,arc_easy",
                   fuse=True, samples=8, seqlen=128, task_samples=4, data_dir=data_dir)
    assert res.report.nm_ok is True
    assert len(res.report.layers) == 7 * lm.model.config.num_hidden_layers
    for name, mod in res.model.named_modules():
        if isinstance(mod, torch.nn.Linear) and ".layers." in name:
            assert nm_holds(mod.weight, 2, 4), name
    fractions = [r["exclusive_fraction"] for r in res.report.layers.values()]
    assert max(fractions) < 0.5 and sum(fractions) > 0
    sparse = loss(res.model)
    assert dense < sparse < dense + 3.0  # 2:4 hurts, but the model must still model text
    assert torch.equal(get_module(first, "self_attn.q_proj").weight, q_before)  # the caller's model is untouched
