"""Evaluation engine and metrics on tiny random models (fast; no downloads)."""

import json
import math
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dietprune.errors import DietpruneError
from dietprune.evaluate import evaluate, perplexity
from dietprune.evaluate.compare import build_comparison, format_comparison, plot_comparison
from dietprune.evaluate.loglik import Request, full_logprobs_reference, head_logprobs, score_requests
from dietprune.evaluate.metrics import (choice_predictions, mean_stderr, summarize_choices, wikitext_detokenize,
                                        wikitext_documents)
from dietprune.evaluate.results import load_results, save_results
from dietprune.evaluate.runner import _choice_chars, encode_choices, rolling_requests
from dietprune.tasks import get_task
from tiny import ARCHS, tiny_model


def _word_tokenizer():
    """Word-level fast tokenizer over 128 ids: 0 pad, 1 bos, 2 eos, 3 unk, then punctuation and words."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = ["<pad>", "<bos>", "<eos>", "<unk>"] + list("!\"#$%&'()*+,-./:;<=>?@[]_")
    vocab += "yes no True False Question Answer the a is of to and in it was he she they Dennis Hunter".split()
    vocab += [f"w{i}" for i in range(128 - len(vocab))]
    tok = Tokenizer(models.WordLevel(vocab={w: i for i, w in enumerate(vocab)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", unk_token="<unk>",
                                   pad_token="<pad>")


def _random_requests(n, seed, vocab=128):
    g = torch.Generator().manual_seed(seed)

    def draw(lo, hi):
        return int(torch.randint(lo, hi, (1,), generator=g))

    reqs = []
    for _ in range(n):
        ctx = torch.randint(3, vocab, (draw(1, 30),), generator=g).tolist()
        conts = [tuple(torch.randint(3, vocab, (draw(1, 6),), generator=g).tolist()) for _ in range(draw(1, 5))]
        reqs.append(Request(tuple(ctx), tuple(conts)))
    return reqs


@pytest.mark.parametrize("arch", ARCHS)
def test_gathered_scores_equal_full_logits(arch):
    """Context pass + cached continuation pass + lm_head at scored positions only == full log_softmax."""
    model = tiny_model(arch)
    reqs = _random_requests(9, seed=3)
    for batch_size in (1, 4):
        got = score_requests(model, reqs, batch_size=batch_size, show=False)
        for req, scores in zip(reqs, got):
            assert len(scores) == len(req.continuations)
            for cont, s in zip(req.continuations, scores):
                ref, greedy = full_logprobs_reference(model, list(req.context), list(cont))
                assert s.loglik == pytest.approx(ref, abs=1e-4)
                assert s.greedy == greedy
                assert s.n_tokens == len(cont)


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("arch", ["gemma3_text", "llama", "qwen2"])
def test_packed_rows_equal_full_logits(arch, attn):
    """Every choice in one row behind a 4-D mask == each choice scored on its own; rows wider than
    the sliding window take the two-pass path instead."""
    from dietprune.evaluate.loglik import _packed_width, _packs

    model = tiny_model(arch, sliding_window=48) if arch == "gemma3_text" else tiny_model(arch)
    model.set_attn_implementation(attn)
    reqs = [r for r in _random_requests(12, seed=11) if sum(len(c) > 1 for c in r.continuations) > 1]
    assert len(reqs) >= 4
    wide = Request(tuple(range(3, 60)), ((5, 6), (7, 8)))
    packed = [_packs(model, r) for r in reqs + [wide]]
    assert all(packed[:-1]) and packed[-1] == (arch != "gemma3_text") and _packed_width(wide) == 59
    for batch_size in (1, 5):
        got = score_requests(model, reqs + [wide], batch_size=batch_size, show=False)
        for req, scores in zip(reqs + [wide], got):
            for cont, s in zip(req.continuations, scores):
                ref, greedy = full_logprobs_reference(model, list(req.context), list(cont))
                assert s.loglik == pytest.approx(ref, abs=1e-4)
                assert s.greedy == greedy


@pytest.mark.parametrize("arch", ["llama", "gemma3_text"])
def test_scored_tails_equal_full_logits(arch):
    """A shared prefix with per-continuation extra context (WinoGrande's layout) scores only the tails."""
    model = tiny_model(arch)
    g = torch.Generator().manual_seed(5)
    reqs = []
    for _ in range(6):
        prefix = tuple(torch.randint(3, 128, (int(torch.randint(1, 12, (1,), generator=g)),), generator=g).tolist())
        conts, scored = [], []
        for _ in range(int(torch.randint(1, 4, (1,), generator=g))):
            extra = torch.randint(3, 128, (int(torch.randint(0, 5, (1,), generator=g)),), generator=g).tolist()
            tail = torch.randint(3, 128, (int(torch.randint(1, 4, (1,), generator=g)),), generator=g).tolist()
            conts.append(tuple(extra + tail))
            scored.append(len(tail))
        reqs.append(Request(prefix, tuple(conts), tuple(scored)))
    for batch_size in (1, 3):
        got = score_requests(model, reqs, batch_size=batch_size, show=False)
        for req, scores in zip(reqs, got):
            for cont, n, s in zip(req.continuations, req.scored, scores):
                ref, greedy = full_logprobs_reference(model, list(req.context) + list(cont[:-n]), list(cont[-n:]))
                assert s.loglik == pytest.approx(ref, abs=1e-4)
                assert s.greedy == greedy
                assert s.n_tokens == n


def test_example_request_shares_the_common_prefix():
    from dietprune.evaluate.runner import example_request

    same = example_request([([1, 5, 6], [7]), ([1, 5, 6], [8, 9])])
    assert same == Request((1, 5, 6), ((7,), (8, 9)), (1, 2))
    wino = example_request([([1, 5, 6, 10], [20, 21]), ([1, 5, 6, 11, 12], [20, 21])])
    assert wino == Request((1, 5, 6), ((10, 20, 21), (11, 12, 20, 21)), (2, 2))
    # the prefix never reaches into a continuation, even when one context is a prefix of another
    nested = example_request([([1, 5], [6, 7]), ([1, 5, 6], [7])])
    assert nested == Request((1, 5), ((6, 7), (6, 7)), (2, 1))
    assert example_request([([2, 5], [7]), ([3, 5], [7])]) is None


def test_softcapping_applied():
    model = tiny_model("gemma2", final_logit_softcapping=0.5)  # a small cap makes a difference visible
    hidden = torch.randn(5, model.config.hidden_size)
    tgt = torch.tensor([3, 4, 5, 6, 7])
    lp, _ = head_logprobs(model, hidden, tgt)
    logits = torch.tanh(model.lm_head(hidden) / 0.5) * 0.5
    ref = torch.log_softmax(logits, -1).gather(1, tgt[:, None])[:, 0]
    assert torch.allclose(lp, ref, atol=1e-5)
    plain = torch.log_softmax(model.lm_head(hidden), -1).gather(1, tgt[:, None])[:, 0]
    assert not torch.allclose(lp, plain, atol=1e-3)


def test_head_chunks_do_not_change_scores(monkeypatch):
    import dietprune.evaluate.loglik as loglik

    model = tiny_model("llama")
    hidden, tgt = torch.randn(10, model.config.hidden_size), torch.randint(0, 128, (10,))
    whole = head_logprobs(model, hidden, tgt)
    monkeypatch.setattr(loglik, "HEAD_CHUNK_ELEMENTS", 3 * 128)  # chunks of 3 rows: 3 + 3 + 3 + 1
    chunked = head_logprobs(model, hidden, tgt)
    assert torch.allclose(whole[0], chunked[0], atol=1e-6) and torch.equal(whole[1], chunked[1])
    ref = torch.log_softmax(model.lm_head(hidden), -1).gather(1, tgt[:, None])[:, 0]
    assert torch.allclose(chunked[0], ref, atol=1e-5)


def test_long_context_left_truncated():
    model = tiny_model("llama")
    req = Request(tuple(range(3, 103)), ((7, 8),))
    (s,), = score_requests(model, [req], max_length=40, show=False)
    ref, _ = full_logprobs_reference(model, list(range(3, 103))[-39:], [7, 8])
    assert s.loglik == pytest.approx(ref, abs=1e-4)


def test_acc_norm_divides_by_choice_characters():
    # raw log-likelihood prefers choice 0; per character choice 1 wins
    lls, chars = [-4.0, -6.0], [2, 12]
    assert choice_predictions(lls, chars) == (0, 1)
    recs = [{"gold": 1, "pred": 0, "pred_norm": 1}, {"gold": 0, "pred": 0, "pred_norm": 1}]
    m = summarize_choices(recs, ("acc", "acc_norm"))
    assert (m["acc"], m["acc_norm"], m["n"]) == (0.5, 0.5, 2)


def test_choice_length_excludes_target_delimiter():
    task = get_task("arc_easy")
    ex = task.format({"question": "Q?", "choices": {"text": ["red", "green"], "label": ["A", "B"]}, "answerKey": "B"})
    assert [_choice_chars(task, ex, i) for i in range(2)] == [3, 5]


def test_stderr_is_sample_std_over_sqrt_n():
    xs = [1.0, 0.0, 1.0, 1.0, 0.0]
    assert mean_stderr(xs) == pytest.approx(statistics.stdev(xs) / math.sqrt(len(xs)))
    assert math.isnan(mean_stderr([1.0]))


def test_encode_choices_moves_trailing_space_and_shares_context():
    tok = _word_tokenizer()
    ex = get_task("boolq").format({"passage": "the a", "question": "is it", "label": 1})
    pairs = encode_choices(tok, ex, add_bos=True)
    assert pairs[0][0] == pairs[1][0] and pairs[0][0][0] == tok.bos_token_id
    assert [tok.convert_ids_to_tokens(k) for _, k in pairs] == [["no"], ["yes"]]


def test_rolling_windows_score_every_token_once():
    toks = list(range(10, 33))  # 23 tokens, window 8
    reqs = rolling_requests(toks, prefix=1, window=8)
    scored = [t for r in reqs for t in r.continuations[0]]
    assert scored == toks
    assert reqs[0].context == (1,)
    for r in reqs:
        assert len(r.context) + len(r.continuations[0]) - 1 <= 8  # one pass of at most `window` inputs
        assert len(r.context) + len(r.continuations[0]) - 1 == 8 or r is reqs[0]


def test_rolling_windows_match_harness():
    utils = pytest.importorskip("lm_eval.utils")
    toks = list(range(10, 40))
    for window in (4, 8, 30, 64):
        ours = [(list(r.context), list(r.continuations[0])) for r in rolling_requests(toks, 1, window)]
        theirs = [utils.make_disjoint_window(w) for w in utils.get_rolling_token_windows(toks, 1, window, 1)]
        assert ours == [(list(a), list(b)) for a, b in theirs]


def test_wikitext_documents_and_detokenizer(data_dir):
    rows = [json.loads(line)["text"] for line in open(Path(data_dir) / "wikitext2" / "test.jsonl", encoding="utf-8")]
    docs = wikitext_documents(rows)
    assert len(docs) == 62  # the articles of the wikitext-2 test split
    assert docs[0].startswith(" = Robert Boulter = \n\n Robert Boulter is")
    assert sum(len(d) for d in docs) == sum(len(r) or 1 for r in rows[1:])
    lm_eval = pytest.importorskip("lm_eval")
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "pw", Path(lm_eval.__file__).parent / "tasks" / "wikitext" / "preprocess_wikitext.py")
    pw = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(pw)
    for doc in docs:
        assert wikitext_detokenize(doc) == pw.wikitext_detokenizer({"page": doc})


def test_evaluate_tiny_model_end_to_end(tmp_path):
    rows = [{"passage": "the a is", "question": "is it", "label": i % 2} for i in range(6)]
    (tmp_path / "boolq").mkdir()
    (tmp_path / "boolq" / "eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "winogrande").mkdir()
    wrows = [{"sentence": "Dennis and Hunter : _ was the a .", "option1": "Dennis", "option2": "Hunter",
              "answer": str(1 + i % 2)} for i in range(4)]
    (tmp_path / "winogrande" / "eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in wrows))
    model, tok = tiny_model("gemma3_text"), _word_tokenizer()
    res = evaluate(model, tok, "boolq,winogrande", limit=5, data_dir=tmp_path, batch_size=2, progress=False,
                   log_samples=True)
    assert res["tasks"]["boolq"]["n"] == 5 and res["tasks"]["winogrande"]["n"] == 4
    assert res["meta"]["bos"] is True and len(res["meta"]["fingerprint"]) == 16
    # every example has the same prompt: one prediction for all, so acc counts the golds it matches
    (pred,) = {r["pred"] for r in res["samples"]["boolq"]}
    assert res["tasks"]["boolq"]["acc"] == pytest.approx(sum(r["label"] == pred for r in rows[:5]) / 5)
    # winogrande: scores are of the shared suffix after each filled-in option
    rec = res["samples"]["winogrande"][0]
    ids = tok("Dennis and Hunter : Dennis", add_special_tokens=False)["input_ids"]
    ref, _ = full_logprobs_reference(model, [tok.bos_token_id] + ids,
                                     tok(" was the a .", add_special_tokens=False)["input_ids"])
    assert rec["loglik"][0] == pytest.approx(ref, abs=1e-4)
    save_results(res, tmp_path / "r.json")
    assert load_results(tmp_path / "r.json")["tasks"]["boolq"]["n"] == 5


def test_evaluate_errors(tmp_path):
    model, tok = tiny_model("llama"), _word_tokenizer()
    with pytest.raises(DietpruneError, match="unknown task"):
        evaluate(model, tok, "nosuchtask")
    with pytest.raises(DietpruneError, match="piqa.*no local evaluation data"):
        evaluate(model, tok, "piqa", data_dir=tmp_path)
    with pytest.raises(DietpruneError, match="limit"):
        evaluate(model, tok, "boolq", limit=0, data_dir=tmp_path)


def test_perplexity_tiny(tmp_path):
    (tmp_path / "wikitext2").mkdir()
    rows = [{"text": ""}, {"text": " = the a = \n"}] + [{"text": " the a is of to and in it . \n"}] * 20
    (tmp_path / "wikitext2" / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    model, tok = tiny_model("qwen2"), _word_tokenizer()
    ppl = perplexity(model, tok, data_dir=tmp_path, max_tokens=64, window=16)
    ids = tok("\n\n".join(r["text"] for r in rows), add_special_tokens=False)["input_ids"][:64]
    x = torch.tensor(ids).view(4, 16)
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=x).logits[:, :-1], -1)
    ref = math.exp(-float(logp.gather(2, x[:, 1:, None]).mean()))
    assert ppl == pytest.approx(ref, rel=1e-4)
    res = evaluate(model, tok, "wikitext2", limit=1, data_dir=tmp_path, progress=False, window=16)
    m = res["tasks"]["wikitext2"]
    assert m["n"] == 1 and m["word_perplexity"] > 1 and m["byte_perplexity"] > 1 and m["tokens"] == 15


def _results(path, accs, model, ppl=None, limit=100):
    tasks = {t: {"acc": a, "acc_stderr": 0.01, "n": limit} for t, a in accs.items()}
    tasks["hellaswag"]["acc_norm"] = accs["hellaswag"] + 0.1
    if ppl:
        tasks["wikitext2"] = {"word_perplexity": ppl, "n": 3}
    save_results({"tasks": tasks, "meta": {"model": model, "limit": limit}}, path)
    return path


def test_compare_table_and_plot(tmp_path):
    a = _results(tmp_path / "dense.json", {"boolq": 0.6, "hellaswag": 0.4}, "smollm2-135m", ppl=20.0)
    b = _results(tmp_path / "pruned.json", {"boolq": 0.5, "hellaswag": 0.3}, "out/pruned", ppl=30.0)
    cmp = build_comparison([a, b])
    assert cmp["columns"] == ["boolq", "hellaswag"]
    assert cmp["rows"][0]["average"] == pytest.approx((0.6 + 0.5) / 2)  # hellaswag reports acc_norm
    text = format_comparison(cmp)
    assert "-10.0" in text and "+10.00" in text and "hellaswag*" in text
    png = plot_comparison(cmp, tmp_path / "cmp.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert build_comparison([a, b], metric="acc")["rows"][1]["average"] == pytest.approx(0.4)


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "dietprune", *args], capture_output=True, text=True, timeout=120)


def test_cli_errors_are_one_line(tmp_path, capsys):
    # one in its own process: the whole of stderr is the one line (no warning or traceback at start-up)
    r = _cli("eval", "smollm2-135m", "--tasks", "nosuchtask")
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "unknown task" in r.stderr
    # the others in this process (the same main(); a process each would add only start-up time)
    from dietprune.cli import main

    for args, needle in ((["compare", str(tmp_path / "missing.json")], "not found"),
                         (["eval", "smollm2-135m", "--output", str(tmp_path / "no" / "r.json")], "does not exist")):
        assert main(args) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("dietprune: error: ") and needle in err, (args, err)


def test_cli_compare(tmp_path):
    a = _results(tmp_path / "dense.json", {"boolq": 0.6, "hellaswag": 0.4}, "d")
    b = _results(tmp_path / "pruned.json", {"boolq": 0.7, "hellaswag": 0.4}, "p", limit=50)
    r = _cli("compare", str(a), str(b), "--plot", str(tmp_path / "c.png"))
    assert r.returncode == 0, r.stderr
    assert "+10.0" in r.stdout and "different --limit" in r.stdout and (tmp_path / "c.png").is_file()
