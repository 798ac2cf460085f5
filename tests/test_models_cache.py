"""The dequantized-GGUF cache: a cached load gives the same weights and tokenizer as the GGUF file."""

import pytest
import torch

from dietprune import models
from dietprune.encoding import encode
from tiny import tiny_model

TEXTS = ["The capital of France is", " yes", "Question: is it?\nAnswer:", "  two  spaces\n\nand Ünïcode ✓"]


def test_cache_switch(monkeypatch, tmp_path):
    monkeypatch.setenv("DIETPRUNE_GGUF_CACHE", "0")
    assert models.gguf_cache_root() is None
    monkeypatch.setenv("DIETPRUNE_GGUF_CACHE", str(tmp_path / "c"))
    assert models.gguf_cache_root() == tmp_path / "c"
    monkeypatch.delenv("DIETPRUNE_GGUF_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "x"))
    assert models.gguf_cache_root() == tmp_path / "x" / "dietprune" / "gguf"


def test_cache_key_follows_the_file(monkeypatch, tmp_path):
    monkeypatch.setenv("DIETPRUNE_GGUF_CACHE", str(tmp_path / "c"))
    f = tmp_path / "m.gguf"
    f.write_bytes(b"a")
    first = models.gguf_cache_entry(f, torch.float32)
    assert first == models.gguf_cache_entry(f, torch.float32)
    assert first != models.gguf_cache_entry(f, torch.bfloat16)
    f.write_bytes(b"ab")  # another file under the same name gets another entry
    assert first != models.gguf_cache_entry(f, torch.float32)


def test_unwritable_cache_only_warns(tmp_path):
    model = tiny_model("llama")
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")

    class Tok:
        def save_pretrained(self, path):
            pass

    with pytest.warns(UserWarning, match="not caching"):
        models._save_gguf_cache(blocker / "entry", model, Tok())
    assert blocker.read_text() == "not a folder"


@pytest.mark.slow
def test_cached_preset_is_identical(monkeypatch, tmp_path, data_dir):
    monkeypatch.setenv("DIETPRUNE_GGUF_CACHE", str(tmp_path / "cache"))
    first = models.load("smollm2-135m")  # from the GGUF file; writes the cache
    entries = list((tmp_path / "cache").iterdir())
    assert len(entries) == 1 and (entries[0] / models._CACHE_DONE).is_file()
    second = models.load("smollm2-135m")
    assert second.model.name_or_path == str(entries[0])  # really read from the cache
    assert getattr(second.model.config, "quantization_config", None) is None
    a, b = first.model.state_dict(), second.model.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert first.fingerprint == second.fingerprint
    for text in TEXTS:
        for bos in (False, True):
            assert encode(first.tokenizer, text, bos) == encode(second.tokenizer, text, bos)
    for attr in ("bos_token_id", "eos_token_id", "pad_token_id"):
        assert getattr(first.tokenizer, attr) == getattr(second.tokenizer, attr)
