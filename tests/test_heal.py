"""`dietprune heal`: distillation from the dense model, on tiny random models (seconds)."""

from __future__ import annotations

import copy
import json
import math
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tiny import save_tiny, tiny_model, tiny_tokenizer

import dietprune
from dietprune import heal as heal_module
from dietprune.errors import DietpruneError
from dietprune.heal import HealConfig, SequenceStream, chunked_kl, heal, kl_to_teacher
from dietprune.surgery import prune_hidden_

REPO = Path(__file__).resolve().parents[1]
WORDS = ["the", "a", "is", "of", "and", "to", "in", "yes", "no", "it", "was", "for", "on", "that", "with",
         "as", "be", "at", "by", "this", "are", "or", "an", "from", "not", "he", "she", "they", "we", "you"]


@pytest.fixture(autouse=True)
def _no_env_data(monkeypatch):
    monkeypatch.delenv("DIETPRUNE_DATA_DIR", raising=False)  # user files only: no evaluation scan
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)  # not left at 1 for the test files after this one


def _text(seed: int, n: int = 3000) -> str:
    rng = random.Random(seed)
    out, w = [], "the"
    for _ in range(n):  # a simple Markov chain, so there is something to learn
        w = WORDS[(WORDS.index(w) * 7 + rng.choice((1, 2, 3))) % len(WORDS)]
        out.append(w)
    return " ".join(out)


@pytest.fixture
def train_file(tmp_path):
    f = tmp_path / "train.txt"
    f.write_text(_text(0))
    return f


@pytest.fixture
def heldout():
    tok = tiny_tokenizer()
    ids = tok(_text(1, 600), add_special_tokens=False)["input_ids"]
    return [ids[i:i + 32] for i in range(0, len(ids) - 32, 32)][:8]


def teacher_and_student(arch: str = "llama", keep: int = 48):
    teacher = tiny_model(arch, seed=0)
    student = copy.deepcopy(teacher)
    prune_hidden_(student, torch.arange(keep))
    return teacher, student


OPTS = dict(tokens=32 * 4 * 12, seq_len=32, batch_size=4, warmup_steps=2, progress=False)


def test_loss_decreases_and_heldout_kl_drops(train_file, heldout):
    teacher, student = teacher_and_student()
    before = kl_to_teacher(student, teacher, heldout)
    res = heal(student, teacher, tokenizer=tiny_tokenizer(), files=(str(train_file),), lr=3e-3, **OPTS)
    losses = [h["loss"] for h in res.history]
    assert len(losses) == 12
    assert sum(losses[-3:]) / 3 < 0.8 * sum(losses[:3]) / 3
    after = kl_to_teacher(res.model, teacher, heldout)
    assert after < 0.8 * before
    # the caller's student was copied, never trained
    assert kl_to_teacher(student, teacher, heldout) == pytest.approx(before)
    assert res.model.config.hidden_size == 48


def test_chunked_kl_matches_direct_and_its_gradient():
    torch.manual_seed(0)
    hs = torch.randn(10, 6, requires_grad=True)
    ht = torch.randn(10, 5)
    head_s, head_t = torch.nn.Linear(6, 50, bias=False), torch.nn.Linear(5, 50, bias=False)
    T = 2.0
    direct = torch.nn.functional.kl_div((head_s(hs) / T).log_softmax(-1), (head_t(ht) / T).log_softmax(-1),
                                        log_target=True, reduction="sum")
    direct.backward()
    g_direct, gw_direct = hs.grad.clone(), head_s.weight.grad.clone()
    hs.grad, head_s.weight.grad = None, None
    leaf = hs.detach().requires_grad_(True)
    total, n = chunked_kl(leaf, ht, head_s, head_t, temperature=T, chunk_rows=3, scale=1.0)
    assert n == 10 and total == pytest.approx(float(direct), rel=1e-5)
    torch.testing.assert_close(leaf.grad, g_direct, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(head_s.weight.grad, gw_direct, rtol=1e-4, atol=1e-6)


def test_chunked_kl_bf16_heads_stay_close_and_identical_heads_give_zero():
    torch.manual_seed(0)
    h = torch.randn(12, 16)
    head_s, head_t = torch.nn.Linear(16, 300, bias=False), torch.nn.Linear(16, 300, bias=False)
    ref, _ = chunked_kl(h, h, head_s, head_t, chunk_rows=5)
    leaf = h.clone().requires_grad_(True)
    got, _ = chunked_kl(leaf, h, head_s, head_t, chunk_rows=5, scale=1.0, amp=True)
    assert got == pytest.approx(ref, rel=2e-2) and got != ref  # bfloat16 matmuls: close, not the same numbers
    assert leaf.grad is not None and head_s.weight.grad.dtype == torch.float32
    same, _ = chunked_kl(h, h, head_t, head_t, chunk_rows=5, amp=True)
    assert same == 0.0


def test_student_identical_to_teacher_has_zero_loss_and_keeps_its_weights(train_file):
    teacher = tiny_model("gemma3_text", seed=0)  # soft-capped logits and a BOS-reading family
    res = heal(copy.deepcopy(teacher), teacher, tokenizer=tiny_tokenizer(), files=(str(train_file),),
               **dict(OPTS, tokens=32 * 4 * 3))
    assert [h["loss"] for h in res.history] == [0.0, 0.0, 0.0]
    for (n, a), (_, b) in zip(res.model.state_dict().items(), teacher.state_dict().items()):
        assert torch.equal(a, b), n


def test_lora_output_is_the_merged_model(train_file, tmp_path):
    from peft import LoraConfig, get_peft_model

    teacher, student = teacher_and_student("qwen2")
    state = tmp_path / "state"
    res = heal(student, teacher, tokenizer=tiny_tokenizer(), files=(str(train_file),), mode="lora", lora_rank=4,
               state_dir=state, keep_state=True, **dict(OPTS, tokens=32 * 4 * 4))
    saved = torch.load(state / heal_module.STATE_FILE, weights_only=False)["params"]
    assert saved and all("lora_" in n for n in saved)
    assert any(float(v.abs().sum()) > 0 for n, v in saved.items() if "lora_B" in n)  # it trained
    # rebuild the unmerged LoRA model from the saved adapters; its logits equal the merged checkpoint's
    ref = get_peft_model(copy.deepcopy(student), LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0,
                                                            target_modules="all-linear", bias="none"))
    with torch.no_grad():
        for n, p in ref.base_model.model.named_parameters():
            if n in saved:
                p.copy_(saved[n])
    ids = torch.tensor([[1, 5, 9, 40, 41, 42, 7, 3]])
    with torch.no_grad():
        torch.testing.assert_close(res.model(ids).logits, ref(ids).logits, rtol=1e-5, atol=1e-5)
    assert not any("lora" in n for n, _ in res.model.named_parameters())
    assert res.model.config.hidden_size == 48


def test_norms_mode_trains_only_norm_gains(train_file):
    teacher, student = teacher_and_student()
    res = heal(student, teacher, tokenizer=tiny_tokenizer(), files=(str(train_file),), mode="norms",
               **dict(OPTS, tokens=32 * 4 * 3))
    changed = {n for (n, a), (_, b) in zip(res.model.state_dict().items(), student.state_dict().items())
               if not torch.equal(a, b)}
    assert changed and all("norm" in n for n in changed)


def test_resume_after_ctrl_c_equals_an_uninterrupted_run(train_file, tmp_path, monkeypatch):
    teacher = tiny_model("llama", seed=0)
    student_dir = save_tiny(tmp_path / "student", "llama", seed=0, hidden_size=64)
    teacher_dir = save_tiny(tmp_path / "teacher", "llama", seed=3)
    del teacher
    opts = dict(files=(str(train_file),), checkpoint_every=2, lr=3e-3, **OPTS)
    full = heal(student_dir, teacher_dir, tmp_path / "a", **opts)

    real = heal_module._lr_at

    def interrupt_at_7(step, cfg):
        if step == 7:
            raise KeyboardInterrupt
        return real(step, cfg)

    monkeypatch.setattr(heal_module, "_lr_at", interrupt_at_7)
    with pytest.raises(KeyboardInterrupt):
        heal(student_dir, teacher_dir, tmp_path / "b", **opts)
    assert not (tmp_path / "b").exists()  # nothing half-written
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".b.tmp")]
    state = heal_module.default_state_dir(tmp_path / "b")
    assert torch.load(state / heal_module.STATE_FILE, weights_only=False)["step"] == 7
    monkeypatch.setattr(heal_module, "_lr_at", real)
    with pytest.raises(DietpruneError, match="--resume"):
        heal(student_dir, teacher_dir, tmp_path / "b", **opts)
    resumed = heal(student_dir, teacher_dir, tmp_path / "b", resume=True, **opts)
    assert not state.exists()  # a finished run removes its state
    for (n, a), (_, b) in zip(full.model.state_dict().items(), resumed.model.state_dict().items()):
        assert torch.equal(a, b), n
    assert [h["loss"] for h in full.history] == [h["loss"] for h in resumed.history]
    meta = json.loads((tmp_path / "b" / "dietprune.json").read_text())["heal"]
    assert meta["config"]["mode"] == "full" and meta["config"]["tokens"] == OPTS["tokens"]
    assert meta["teacher"] == str(teacher_dir) and meta["summary"]["tokens_trained"] == OPTS["tokens"]


def test_a_shorter_run_is_the_prefix_of_a_longer_one(train_file, tmp_path):
    teacher, student = teacher_and_student()
    tok = tiny_tokenizer()
    opts = dict(tokenizer=tok, files=(str(train_file),), **{k: v for k, v in OPTS.items() if k != "tokens"})
    long = heal(student, teacher, tokens=32 * 4 * 6, **opts)
    state = tmp_path / "s"
    heal(student, teacher, tokens=32 * 4 * 3, state_dir=state, keep_state=True, **opts)
    cont = heal(student, teacher, tokens=32 * 4 * 6, state_dir=state, resume=True, keep_state=True, **opts)
    for (n, a), (_, b) in zip(long.model.state_dict().items(), cont.model.state_dict().items()):
        assert torch.equal(a, b), n
    with pytest.raises(DietpruneError, match="more than --tokens"):  # never a longer run passed off as a shorter one
        heal(student, teacher, tokens=32 * 4 * 3, state_dir=state, resume=True, **opts)


def test_sequence_stream_is_seeded_packed_and_budget_independent():
    tok = tiny_tokenizer()
    texts = {"a": [_text(2, 100), _text(3, 50)], "b": [_text(4, 300)]}
    s1, s2 = SequenceStream(tok, texts, 16, 0, add_bos=True), SequenceStream(tok, texts, 16, 0, add_bos=True)
    assert all(len(s1[g]) == 16 and s1[g][0] == tok.bos_token_id for g in range(60))
    assert [s1[g] for g in range(60)] == [s2[g] for g in range(60)]
    assert [s1[g] for g in range(5)] != [SequenceStream(tok, texts, 16, 1, add_bos=True)[g] for g in range(5)]
    assert s1.sequences_per_epoch < 60  # several epochs, each reshuffled
    assert s1.tokens_by_source["b"] == 300


def test_bad_input_is_one_line_errors(train_file, tmp_path):
    teacher, student = teacher_and_student()
    tok = tiny_tokenizer()
    with pytest.raises(DietpruneError, match="no training data"):
        heal(student, teacher, tokenizer=tok, tokens=100)
    with pytest.raises(DietpruneError, match="mode"):
        heal(student, teacher, tokenizer=tok, files=(str(train_file),), mode="bias")
    with pytest.raises(DietpruneError, match="not found"):
        heal(student, teacher, tokenizer=tok, files=(str(tmp_path / "missing.txt"),))
    other = tiny_model("llama", seed=0, vocab_size=96)
    with pytest.raises(DietpruneError, match="vocabular"):
        heal(other, teacher, tokenizer=tok, files=(str(train_file),), tokens=100)


def test_a_file_repeating_evaluation_rows_is_refused(data_dir, tmp_path):
    rows = [json.loads(line) for line in (Path(data_dir) / "wikitext2" / "eval.jsonl").open()][:400]
    leak = tmp_path / "leak.jsonl"
    leak.write_text("".join(json.dumps({"text": r["text"]}) + "\n" for r in rows))
    with pytest.raises(DietpruneError, match="evaluation item"):
        heal_module.training_texts(files=(str(leak),), data_dir=data_dir)
    with pytest.raises(DietpruneError, match="evaluation split"):
        heal_module.training_texts(files=(str(Path(data_dir) / "wikitext2" / "test.jsonl"),), data_dir=data_dir)
    calib = tmp_path / "calib.jsonl"  # the calibration rows are fine
    calib.write_text((Path(data_dir) / "wikitext2" / "calib.jsonl").read_text())
    assert heal_module.training_texts(files=(str(calib),), data_dir=data_dir)


def test_task_calibration_rows_are_training_text(data_dir):
    texts = heal_module.training_texts(tasks=("rte", "arc_easy"), general=("wikitext2",), data_dir=data_dir)
    assert len(texts["rte"]) == 100 and len(texts["arc_easy"]) == 570 and len(texts["wikitext2"]) == 1
    with pytest.raises(DietpruneError, match="running text"):
        heal_module.training_texts(tasks=("wikitext2",), data_dir=data_dir)


def test_api_name_is_the_function():
    assert callable(dietprune.heal) and dietprune.HealConfig is HealConfig


def _cli(*args, env=None):
    return subprocess.run([sys.executable, "-m", "dietprune.cli", *args], capture_output=True, text=True,
                          cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1",
                                         "DIETPRUNE_PROGRESS": "0", **(env or {})}, timeout=300)


def test_cli_heal_writes_a_plain_checkpoint(train_file, tmp_path):
    student = save_tiny(tmp_path / "student", "llama", seed=1)
    teacher = save_tiny(tmp_path / "teacher", "llama", seed=0)
    r = _cli("heal", str(student), "--teacher", str(teacher), "--tasks", "none", "--general", "none", "--files",
             str(train_file), "--tokens", "256", "--seq-len", "32", "--lora", "4", "--teacher-topk", "16",
             "--output", str(tmp_path / "out"))
    assert r.returncode == 0, r.stderr
    assert "healed (lora) 256 tokens" in r.stdout
    meta = json.loads((tmp_path / "out" / "dietprune.json").read_text())
    assert meta["heal"]["config"]["mode"] == "lora" and meta["heal"]["data"]["sources"] == ["file:train.txt"]
    assert meta["heal"]["config"]["teacher_topk"] == 16 and 0 < meta["heal"]["summary"]["teacher_topk_mass"] < 1
    assert not heal_module.default_state_dir(tmp_path / "out").exists()  # state and teacher cache removed
    loaded = dietprune.load(str(tmp_path / "out"))
    assert not any("lora" in n for n, _ in loaded.model.named_parameters())
    r = _cli("heal", str(student), "--teacher", str(teacher), "--tasks", "none", "--general", "none", "--files",
             str(train_file), "--tokens", "256", "--output", str(tmp_path / "out"))
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "not empty" in r.stderr


WORKER = """
import sys, torch
sys.path.insert(0, {tests!r})
from dietprune.heal import heal
from dietprune import distributed
torch.set_num_threads(1)
res = heal({student!r}, {teacher!r}, files=({train!r},), tokens=32 * 4 * 4, seq_len=32, batch_size=4,
           micro_batch={micro}, lr=3e-3, progress=False{extra})
if distributed.is_main():
    torch.save(res.model.state_dict(), {out!r})
"""


def test_two_gloo_processes_equal_one(train_file, tmp_path):
    student = save_tiny(tmp_path / "student", "llama", seed=1)
    teacher = save_tiny(tmp_path / "teacher", "llama", seed=0)
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "DIETPRUNE_PROGRESS": "0",
           "DIETPRUNE_DEVICE": "cpu"}
    env.pop("DIETPRUNE_DATA_DIR", None)
    # with the teacher's top-k cache too: in a shared state folder the main process makes the files
    topk = f", teacher_topk=8, state_dir={str(tmp_path / 'state')!r}"
    for name, n, micro, extra in (("one", 1, 1, ""), ("two", 2, 2, ""), ("one_k", 1, 1, ", teacher_topk=8"),
                                  ("two_k", 2, 2, topk)):
        script = tmp_path / f"{name}.py"
        script.write_text(WORKER.format(tests=str(REPO / "tests"), student=str(student), teacher=str(teacher),
                                        train=str(train_file), micro=micro, out=str(tmp_path / f"{name}.pt"),
                                        extra=extra))
        port = str(31000 + 2 * (os.getpid() % 1000) + n)
        r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(n),
                            "--master_port", port, str(script)], capture_output=True, text=True, env=env, timeout=240)
        assert r.returncode == 0, r.stderr[-3000:]
    one, two = torch.load(tmp_path / "one.pt"), torch.load(tmp_path / "two.pt")
    start = dietprune.load(str(student)).model.state_dict()
    assert any(not torch.equal(one[k], start[k]) for k in one)
    for k in one:
        torch.testing.assert_close(one[k], two[k], rtol=1e-4, atol=1e-5)
    one_k, two_k = torch.load(tmp_path / "one_k.pt"), torch.load(tmp_path / "two_k.pt")
    assert any(not torch.equal(one[k], one_k[k]) for k in one)  # another loss
    for k in one_k:
        torch.testing.assert_close(one_k[k], two_k[k], rtol=1e-4, atol=1e-5)
    assert not (tmp_path / "state").exists()


def test_prune_with_heal_tokens_prunes_then_heals(tmp_path, data_dir, capsys):
    from dietprune.cli import main

    model = save_tiny(tmp_path / "tiny", "gemma3_text")
    out = tmp_path / "out"
    code = main(["prune", str(model), "--tasks", "boolq,rte", "--samples", "4", "--sparsity", "0.25", "--data-dir",
                 data_dir, "--output", str(out), "--heal-tokens", "256", "--heal-seq-len", "32",
                 "--heal-general", "none"])
    assert code == 0, capsys.readouterr().err
    text = capsys.readouterr().out
    assert "hidden size    64 -> 48" in text and "healed (full) 256 tokens" in text
    meta = json.loads((out / "dietprune.json").read_text())
    assert len(meta["kept_indices"]) == 48 and meta["heal"]["data"]["sources"] == ["boolq", "rte"]
    assert meta["heal"]["teacher"] == str(model)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "tiny"]  # no scratch or state left
    healed = dietprune.load(str(out)).model
    assert healed.config.hidden_size == 48


def test_bf16_autocast_of_the_bodies_trains(train_file):
    teacher, student = teacher_and_student()
    res = heal(student, teacher, tokenizer=tiny_tokenizer(), files=(str(train_file),), lr=3e-3, bf16=True,
               **dict(OPTS, tokens=32 * 4 * 6))
    losses = [h["loss"] for h in res.history]
    assert all(math.isfinite(x) for x in losses) and losses[-1] < losses[0]
    assert next(res.model.parameters()).dtype == torch.float32 and res.config.recipe()["bf16"] is True


def test_minutes_budget_stops_saves_state_and_resumes(train_file, tmp_path):
    teacher, student = teacher_and_student()
    tok = tiny_tokenizer()
    state = tmp_path / "s"
    opts = dict(tokenizer=tok, files=(str(train_file),), state_dir=state, **OPTS)
    first = heal(student, teacher, minutes=1e-9, **opts)
    assert first.summary["stopped"] == "minutes" and first.summary["tokens_trained"] == 0
    assert (state / heal_module.STATE_FILE).is_file()
    done = heal(student, teacher, resume=True, **opts)
    assert done.summary["stopped"] == "done" and done.summary["tokens_trained"] == OPTS["tokens"]
    assert not state.exists()


# ---- the teacher's top-k cache ------------------------------------------------------------------

def _topk_reference(hs, lp, ix, head_s, T):
    """The top-k KL written with autograd: teacher top k + one tail bucket."""
    ls = (head_s(hs) / T).log_softmax(-1)
    p = lp.exp()
    lq = ls.gather(1, ix)
    p_tail = 1 - p.sum(-1)
    q_tail = 1 - lq.exp().sum(-1)
    return (p * (lp - lq)).sum() + (p_tail * (p_tail.log() - q_tail.log())).sum()


def test_topk_kl_matches_autograd_and_with_the_whole_vocabulary_is_the_full_kl():
    from dietprune.distill import topk_kl

    torch.manual_seed(0)
    hs = torch.randn(10, 6, requires_grad=True)
    ht = torch.randn(10, 5)
    head_s, head_t = torch.nn.Linear(6, 50, bias=False), torch.nn.Linear(5, 50, bias=False)
    T = 2.0
    for k in (7, 50):
        lp, ix = heal_module.topk_teacher(ht, head_t, k, temperature=T, chunk_rows=4)
        assert lp.shape == (10, k) and torch.all(lp[:, :-1] >= lp[:, 1:])
        ref = _topk_reference(hs, lp, ix, head_s, T) if k < 50 else torch.nn.functional.kl_div(
            (head_s(hs) / T).log_softmax(-1), (head_t(ht) / T).log_softmax(-1), log_target=True, reduction="sum")
        ref.backward()
        g_ref, gw_ref = hs.grad.clone(), head_s.weight.grad.clone()
        hs.grad, head_s.weight.grad = None, None
        leaf = hs.detach().requires_grad_(True)
        total, n = topk_kl(leaf, lp, ix, head_s, temperature=T, chunk_rows=3, scale=1.0)
        assert n == 10 and total == pytest.approx(float(ref.detach()), rel=1e-4, abs=1e-5)
        torch.testing.assert_close(leaf.grad, g_ref, rtol=1e-3, atol=1e-5)
        torch.testing.assert_close(head_s.weight.grad, gw_ref, rtol=1e-3, atol=1e-5)
        head_s.weight.grad = None
    # a smaller k keeps less of the teacher's mass: the loss can only be smaller (it merges tokens into the tail)
    lp2, ix2 = heal_module.topk_teacher(ht, head_t, 2, temperature=T)
    small, _ = topk_kl(hs.detach(), lp2, ix2, head_s, temperature=T)
    assert 0 <= small < float(ref.detach())


def test_teacher_topk_runs_the_teacher_once_per_window_and_trains(tmp_path, heldout):
    import glob
    import tempfile

    f = tmp_path / "small.txt"
    f.write_text(_text(5, 320))
    teacher, student = teacher_and_student()
    tok = tiny_tokenizer()
    windows = SequenceStream(tok, {"f": [f.read_text()]}, 32, 0, add_bos=False, fixed_windows=True)
    per_epoch = windows.sequences_per_epoch
    assert 4 <= per_epoch <= 12
    epoch0 = [windows[g] for g in range(per_epoch)]
    later = [windows[g] for g in range(per_epoch, 3 * per_epoch)]
    assert sorted(map(tuple, later[:per_epoch])) == sorted(map(tuple, epoch0)) and later[:per_epoch] != epoch0
    assert {windows.window_id(g) for g in range(per_epoch, 2 * per_epoch)} == set(range(per_epoch))
    before = kl_to_teacher(student, teacher, heldout)
    calls = []
    hook = teacher.model.register_forward_hook(
        lambda mod, args, kwargs, out: calls.append(kwargs["input_ids"].shape[0]), with_kwargs=True)
    temps = set(glob.glob(os.path.join(tempfile.gettempdir(), "dietprune-topk-*")))
    steps = 3 * per_epoch  # batch 4: four epochs of windows
    res = heal(student, teacher, tokenizer=tok, files=(str(f),), teacher_topk=64, lr=3e-3,
               **dict(OPTS, tokens=32 * 4 * steps))
    hook.remove()
    assert sum(calls) == per_epoch  # each window once, however many epochs
    assert set(glob.glob(os.path.join(tempfile.gettempdir(), "dietprune-topk-*"))) == temps  # no debris
    assert 0.0 < res.summary["teacher_topk_mass"] < 1.0
    assert kl_to_teacher(res.model, teacher, heldout) < 0.9 * before
    losses = [h["loss"] for h in res.history]
    assert sum(losses[-3:]) < 0.8 * sum(losses[:3])


def test_teacher_topk_identity_student_and_resume(tmp_path, train_file):
    teacher = tiny_model("gemma3_text", seed=0)  # soft-capped logits
    res = heal(copy.deepcopy(teacher), teacher, tokenizer=tiny_tokenizer(), files=(str(train_file),),
               teacher_topk=5, **dict(OPTS, tokens=32 * 4 * 3))
    assert [h["loss"] for h in res.history] == [0.0, 0.0, 0.0]
    for (n, a), (_, b) in zip(res.model.state_dict().items(), teacher.state_dict().items()):
        assert torch.equal(a, b), n
    # a run continued from its saved state (and its cache) equals an uninterrupted one
    teacher, student = teacher_and_student()
    f = tmp_path / "small.txt"
    f.write_text(_text(6, 320))
    opts = dict(tokenizer=tiny_tokenizer(), files=(str(f),), teacher_topk=6,
                **{k: v for k, v in OPTS.items() if k != "tokens"})
    long = heal(student, teacher, tokens=32 * 4 * 8, **opts)
    state = tmp_path / "s"
    heal(student, teacher, tokens=32 * 4 * 4, state_dir=state, keep_state=True, **opts)
    assert (state / "teacher-top6" / "filled.npy").is_file()
    cont = heal(student, teacher, tokens=32 * 4 * 8, state_dir=state, resume=True, **opts)
    for (n, a), (_, b) in zip(long.model.state_dict().items(), cont.model.state_dict().items()):
        assert torch.equal(a, b), n
    assert not state.exists()  # the finished run removed its state and its cache
    with pytest.raises(DietpruneError, match="teacher-topk"):
        heal(student, teacher, tokens=128, teacher_topk=-1, **{k: v for k, v in opts.items() if k != "teacher_topk"})
