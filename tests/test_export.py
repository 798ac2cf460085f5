"""GGUF export, judged by the runtime: llama.cpp (llama-cpp-python) runs every exported file.

Tiny width-pruned models of all six architectures (hidden 64 -> 48 with 4 heads of 16, so the
head size is no longer hidden/heads) are exported as f32; llama.cpp's logits on a fixed prompt
must match transformers' logits of the same checkpoint (top-1 identical at every position, max
relative difference small) and 20 greedy tokens must be identical. The tiny checkpoints carry a
small SentencePiece tokenizer trained here, which llama.cpp's converter reads like any other.
Slow tests do the same for both pruned presets, plus q8_0 agreement on WikiText tokens.
"""

from __future__ import annotations

import io
import json
import os
import random
from functools import lru_cache

import numpy as np
import pytest
import torch

from dietprune.errors import DietpruneError
from dietprune.export import (
    check_gguf_output,
    converter_dir,
    export_gguf,
    gguf_align,
    llama_cpp_available,
    llama_cpp_greedy,
    llama_cpp_logits,
    llama_cpp_model,
)
from dietprune.surgery import prune_hidden_
from tiny import ARCHS, tiny_model


def _need(ok: bool, why: str):
    """Skip where the runtime is absent, but never silently in CI (scripts/setup.sh installs it)."""
    if ok:
        return
    if os.environ.get("CI"):
        pytest.fail(f"{why}; scripts/setup.sh should have installed it")
    pytest.skip(why)


def need_converter():
    try:
        converter_dir()
    except DietpruneError as exc:
        _need(False, str(exc))


def need_runtime():
    need_converter()
    _need(llama_cpp_available(), "llama-cpp-python is not installed (scripts/setup.sh builds it)")


@lru_cache(maxsize=1)
def spm_model() -> bytes:
    """A 128-piece SentencePiece BPE model (ids 0 pad, 1 bos, 2 eos, 3 unk), trained in milliseconds."""
    import sentencepiece as spm

    words = ("the a is of and to in yes no it was for on that with as be at by this are or an from not he she "
             "they we you question answer true false").split()
    rng = random.Random(0)
    sents = [" ".join(rng.choice(words) for _ in range(12)) for _ in range(400)]
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(sents), model_writer=buf, vocab_size=128,
                                   model_type="bpe", bos_id=1, eos_id=2, unk_id=3, pad_id=0,
                                   hard_vocab_limit=False, minloglevel=3)
    return buf.getvalue()


def tiny_overrides(arch: str) -> dict:
    # llama.cpp runs Gemma 3 with its fixed pattern of 5 sliding-window layers then 1 global one;
    # the tiny model has that pattern so that a 40-token prompt exercises both (window 16).
    if arch == "gemma3_text":
        return {"num_hidden_layers": 6, "layer_types": ["sliding_attention"] * 5 + ["full_attention"]}
    return {}


# llama.cpp (0.3.36) builds Qwen2's query projection as n_embd x n_embd, ignoring key_length: a cut Qwen2
# runs there only when heads x head size equals the new width (test_cut_qwen2_refused_with_the_reason)
RUNNABLE = {"qwen2": {"head_dim": 12}}


def pruned_tiny(folder, arch: str, width: int = 48, seed: int = 0, **overrides):
    """A tiny model of `arch` cut from hidden 64 to `width` at random dimensions, saved with a tokenizer."""
    model = tiny_model(arch, seed=seed, **{**tiny_overrides(arch), **overrides})
    kept = torch.randperm(64, generator=torch.Generator().manual_seed(seed + 1))[:width].sort().values
    prune_hidden_(model, kept)
    model.save_pretrained(folder)
    (folder / "tokenizer.model").write_bytes(spm_model())
    return model


PROMPT = [1] + [int(x) for x in np.random.default_rng(0).integers(4, 128, size=39)]


def hf_logits(model, ids) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float().numpy()


def hf_greedy(model, ids, n: int) -> list[int]:
    ids = list(ids)
    out = []
    with torch.no_grad():
        for _ in range(n):
            tok = int(model(torch.tensor([ids])).logits[0, -1].argmax())
            out.append(tok)
            ids.append(tok)
    return out


def agreement(ref: np.ndarray, got: np.ndarray) -> tuple[float, float]:
    """(max |difference| / max |reference logit|, fraction of positions with the same top-1)."""
    rel = float(np.abs(ref - got).max() / np.abs(ref).max())
    top1 = float((ref.argmax(-1) == got.argmax(-1)).mean())
    return rel, top1


def gguf_fields(path) -> dict:
    from gguf import GGUFReader

    r = GGUFReader(path)
    out = {}
    for k, f in r.fields.items():
        if not k.startswith("tokenizer.ggml.") or k.endswith(("model", "pre")):
            try:
                out[k] = f.contents()
            except (ValueError, IndexError):
                pass
    out["_types"] = {t.name: t.tensor_type.name for t in r.tensors}
    return out


@pytest.mark.parametrize("arch", ARCHS)
def test_f32_export_runs_in_llama_cpp_like_transformers(tmp_path, arch):
    need_runtime()
    ckpt = tmp_path / "ckpt"
    model = pruned_tiny(ckpt, arch, **RUNNABLE.get(arch, {}))
    res = export_gguf(ckpt, tmp_path / "m.gguf", "f32")
    fields = gguf_fields(res.path)
    a = res.architecture
    assert fields[f"{a}.embedding_length"] == 48
    head = model.config.head_dim
    assert fields[f"{a}.attention.key_length"] == fields[f"{a}.attention.value_length"] == head
    assert head == 12 or head != 48 // 4  # the head size is not hidden/heads after the cut
    assert set(fields["_types"].values()) == {"F32"}

    llm = llama_cpp_model(res.path, threads=1, n_ctx=128, f32_cache=True)
    ref, got = hf_logits(model, PROMPT), llama_cpp_logits(llm, PROMPT)
    rel, top1 = agreement(ref, got)
    print(f"{arch}: max relative logit difference {rel:.2e}, top-1 agreement {top1:.3f}")
    assert top1 == 1.0, (arch, rel)
    assert rel < 1e-3, (arch, rel)
    assert llama_cpp_greedy(llm, PROMPT[:8], 20) == hf_greedy(model, PROMPT[:8], 20)


def test_cut_qwen2_refused_with_the_reason(tmp_path):
    need_runtime()
    pruned_tiny(tmp_path / "ckpt", "qwen2")  # 4 heads of 16 on a width of 48
    with pytest.raises(DietpruneError, match="llama.cpp refuses.*attn_q.weight.*wrong shape"):
        export_gguf(tmp_path / "ckpt", tmp_path / "m.gguf", "f32")
    assert not any(p.name.endswith(".gguf") or p.name.startswith(".m.gguf") for p in tmp_path.iterdir())
    export_gguf(tmp_path / "ckpt", tmp_path / "m.gguf", "f32", check=False)  # still possible, unchecked


@pytest.mark.parametrize("arch", ARCHS)
def test_exported_gguf_loads_back_into_dietprune(tmp_path, arch, monkeypatch):
    need_converter()
    monkeypatch.setenv("DIETPRUNE_GGUF_CACHE", "0")
    from dietprune.models import load

    ckpt = tmp_path / "ckpt"
    model = pruned_tiny(ckpt, arch)
    # check=False: the cut Qwen2 is refused by llama.cpp (see above), not by transformers
    res = export_gguf(ckpt, tmp_path / "m.gguf", "f32", check=False)
    back = load(str(res.path))
    assert back.model.config.hidden_size == 48
    np.testing.assert_allclose(hf_logits(back.model, PROMPT), hf_logits(model, PROMPT), rtol=0, atol=1e-5)


def test_q8_0_rows_and_fallback(tmp_path):
    need_converter()
    # width 32: every weight row divides into q8_0 blocks of 32
    pruned_tiny(tmp_path / "w32", "llama", width=32)
    res = export_gguf(tmp_path / "w32", tmp_path / "w32.gguf", "q8_0")
    types = gguf_fields(res.path)["_types"]
    matrices = {n: t for n, t in types.items() if not n.endswith("norm.weight")}
    assert set(matrices.values()) == {"Q8_0"}, matrices
    assert not res.notes
    # width 48: rows of 48 values fall back to f16, said in one line
    pruned_tiny(tmp_path / "w48", "llama", width=48)
    res = export_gguf(tmp_path / "w48", tmp_path / "w48.gguf", "q8_0")
    types = gguf_fields(res.path)["_types"]
    assert types["blk.0.attn_q.weight"] == "F16" and types["blk.0.attn_output.weight"] == "Q8_0"
    (note,) = [n for n in res.notes if "do not divide" in n]
    assert "[48]" in note and "32" in note


def test_q8_0_runs_in_llama_cpp(tmp_path):
    need_runtime()
    model = pruned_tiny(tmp_path / "ckpt", "qwen3", width=32)
    res = export_gguf(tmp_path / "ckpt", tmp_path / "q8.gguf", "q8_0")
    got = llama_cpp_logits(llama_cpp_model(res.path, n_ctx=128), PROMPT)
    rel, _ = agreement(hf_logits(model, PROMPT), got)
    assert rel < 0.05, rel  # 8-bit weights: close, not equal


def test_q4_k_m_through_llama_cpp_quantizer(tmp_path):
    need_runtime()
    pruned_tiny(tmp_path / "ckpt", "llama", width=32)
    res = export_gguf(tmp_path / "ckpt", tmp_path / "q4.gguf", "q4_k_m")
    types = set(gguf_fields(res.path)["_types"].values())
    assert not types & {"Q4_K", "Q5_K", "Q6_K"}  # no row here is a multiple of 256
    assert any("do not divide by 256" in n for n in res.notes), res.notes
    llama_cpp_logits(llama_cpp_model(res.path, n_ctx=64), PROMPT[:10])  # and it runs


def test_bad_input_is_one_line_and_leaves_nothing(tmp_path, capsys):
    need_converter()
    from dietprune.cli import main

    pruned_tiny(tmp_path / "ckpt", "llama")
    assert main(["export", str(tmp_path / "nope"), "--gguf", str(tmp_path / "a.gguf")]) == 2
    assert main(["export", str(tmp_path / "ckpt"), "--gguf", str(tmp_path / "a.bin")]) == 2
    (tmp_path / "exists.gguf").write_text("user data")
    assert main(["export", str(tmp_path / "ckpt"), "--gguf", str(tmp_path / "exists.gguf")]) == 2
    assert (tmp_path / "exists.gguf").read_text() == "user data"
    # a tokenizer the converter does not know: its error in one line, no temporary file left
    from tiny import save_tiny

    save_tiny(tmp_path / "wordlevel", "llama")
    assert main(["export", str(tmp_path / "wordlevel"), "--gguf", str(tmp_path / "w.gguf")]) == 2
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip() and "it/s]" not in ln]  # no progress bars
    assert len(err) == 4 and all(line.startswith("dietprune: error: ") for line in err), err
    assert "converter failed" in err[-1]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt", "exists.gguf", "wordlevel"]
    with pytest.raises(DietpruneError, match="must be one of"):
        export_gguf(tmp_path / "ckpt", tmp_path / "x.gguf", "q3_k")
    with pytest.raises(DietpruneError, match="does not exist"):
        check_gguf_output(tmp_path / "missing" / "x.gguf")
    check_gguf_output(tmp_path / "missing" / "x.gguf", inside=tmp_path / "missing")  # prune creates it


def test_gguf_align_choice():
    from types import SimpleNamespace

    gemma = SimpleNamespace(model_type="gemma3_text", hidden_size=640, num_attention_heads=4)
    assert gguf_align(gemma, 0.2) == (32, None)
    smol = SimpleNamespace(model_type="llama", hidden_size=576, num_attention_heads=9)
    align, note = gguf_align(smol, 0.2)
    assert align == 1 and "288" in note  # 32 and 9 heads: only 288 or 576 would be possible
    # diet-width cuts MLP channels, which align freely; its grid keeps hidden at multiples of 288
    assert gguf_align(smol, 0.2, widths=True) == (32, None)


def test_prune_gguf_in_one_go(tmp_path, capsys):
    need_converter()
    from dietprune.cli import main

    from tiny import tiny_tokenizer

    src = tmp_path / "src"
    pruned_tiny(src, "gemma3_text", width=64)  # the uncut tiny model (64 kept of 64)
    # transformers reads tokenizer.json (a word-level one: converting SentencePiece needs protobuf); the
    # converter reads tokenizer.model, which save_pretrained does not keep: the export takes it from src
    tiny_tokenizer().save_pretrained(src)
    out = tmp_path / "out"
    rc = main(["prune", str(src), "--method", "magnitude", "--repair", "none", "--sparsity", "0.5",
               "--output", str(out), "--gguf", str(out / "model.gguf"), "--gguf-type", "q8_0"])
    assert rc == 0, capsys.readouterr().err
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["hidden_size"] == 32  # aligned to 32 (and to the 4 heads)
    fields = gguf_fields(out / "model.gguf")
    assert fields["gemma3.embedding_length"] == 32
    assert "Q8_0" in set(fields["_types"].values())
    printed = capsys.readouterr().out
    assert "gguf" in printed and "tokenizer.model: from the source folder" in printed


# ---- both pruned presets (slow) ------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.timeout(1800)
@pytest.mark.parametrize("preset", [pytest.param(p, marks=pytest.mark.xdist_group(p))
                                    for p in ("smollm2-135m", "gemma3-270m")])
def test_pruned_preset_in_llama_cpp(pruned_preset, tmp_path, preset):
    need_runtime()
    if not os.environ.get("DIETPRUNE_DATA_DIR"):
        pytest.skip("needs DIETPRUNE_DATA_DIR for calibration and WikiText")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from dietprune.data import load_rows
    from dietprune.tasks import get_task

    ckpt = pruned_preset(preset).output  # pruned at 20% on boolq,arc_easy (16 samples), shared with test_real_models
    model = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(ckpt)
    text = " ".join(r["text"] for r in load_rows(get_task("wikitext2"), "eval", os.environ["DIETPRUNE_DATA_DIR"])[:40])
    ids = ([tok.bos_token_id] if tok.bos_token_id is not None else []) + tok(text).input_ids
    ids = ids[:256]
    ref = hf_logits(model, ids)
    threads = max(1, torch.get_num_threads())  # torch's share of the cores (one per pytest-xdist worker)
    f32 = export_gguf(ckpt, tmp_path / "f32.gguf", "f32")
    llm = llama_cpp_model(f32.path, threads=threads, n_ctx=512, f32_cache=True)
    rel, top1 = agreement(ref, llama_cpp_logits(llm, ids))
    greedy_same = llama_cpp_greedy(llm, ids[:32], 20) == hf_greedy(model, ids[:32], 20)
    del llm
    q8 = export_gguf(ckpt, tmp_path / "q8.gguf", "q8_0")
    _, top1_q8 = agreement(ref, llama_cpp_logits(llama_cpp_model(q8.path, threads=threads, n_ctx=512), ids))
    print(f"{preset}: f32 max rel diff {rel:.2e}, top-1 {top1:.4f}, greedy-20 identical {greedy_same}; "
          f"q8_0 top-1 {top1_q8:.4f} on {len(ids)} WikiText tokens; notes {f32.notes + q8.notes}")
    assert top1 == 1.0 and rel < 1e-2
    assert greedy_same
    assert top1_q8 >= 0.95
