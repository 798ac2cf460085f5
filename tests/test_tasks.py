import json

import pytest

from dietprune.data import calibration_examples, evaluation_rows
from dietprune.errors import DietpruneError
from dietprune.tasks import DIET_TASKS, get_task, parse_tasks


def test_formatters_match_harness_prompts():
    ex = get_task("boolq").format({"passage": "P", "question": "is it", "label": 1})
    assert ex.contexts[0] == "P\nQuestion: is it?\nAnswer:" and ex.continuations == (" no", " yes") and ex.gold == 1
    ex = get_task("rte").format({"premise": "A", "hypothesis": "B", "label": 0})
    assert ex.contexts[0] == "A\nQuestion: B True or False?\nAnswer:" and ex.continuations[ex.gold] == " True"
    ex = get_task("arc_easy").format({"question": "Q?", "choices": {"text": ["x", "y", "z"], "label": ["1", "2", "3"]},
                                      "answerKey": "2"})
    assert ex.contexts[0] == "Question: Q?\nAnswer:" and ex.gold == 1 and len(ex.continuations) == 3
    ex = get_task("winogrande").format({"sentence": "Tom hit Bob because _ was angry.", "option1": "Tom",
                                        "option2": "Bob", "answer": "2"})
    assert ex.contexts == ("Tom hit Bob because Tom", "Tom hit Bob because Bob")
    assert ex.continuations == (" was angry.", " was angry.") and ex.gold == 1
    ex = get_task("hellaswag").format({"activity_label": "Cooking", "ctx": "A man [header] cuts.",
                                       "endings": ["a [step] b", "c"], "label": "1"})
    assert ex.contexts[0] == "Cooking: A man cuts." and ex.continuations == (" a b", " c") and ex.gold == 1
    ex = get_task("openbookqa").format({"question_stem": "Sun is", "choices": {"text": ["hot", "cold"],
                                        "label": ["A", "B"]}, "answerKey": "A"})
    assert ex.calibration_text == ("Sun is", " hot")


def test_every_local_diet_task_formats(data_dir):
    for name in DIET_TASKS:
        task = get_task(name)
        rows = evaluation_rows(task, limit=25, data_dir_=data_dir)
        assert len(rows) == 25
        for row in rows:
            ex = task.format(row)
            assert 0 <= ex.gold < len(ex.continuations)


def test_calibration_sampling_is_seeded(data_dir):
    task = get_task("boolq")
    a = calibration_examples(task, 10, seed=1, data_dir_=data_dir)
    b = calibration_examples(task, 10, seed=1, data_dir_=data_dir)
    c = calibration_examples(task, 10, seed=2, data_dir_=data_dir)
    assert a == b and a != c and len(a) == 10
    wiki = calibration_examples(get_task("wikitext2"), 5, data_dir_=data_dir)
    assert all(e.continuations[0].strip() for e in wiki)


def test_unknown_and_malformed_tasks(tmp_path):
    with pytest.raises(DietpruneError, match="unknown task 'nope'"):
        parse_tasks("boolq,nope")
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(DietpruneError, match="empty"):
        parse_tasks(f"mine={empty}")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{not json\n')
    with pytest.raises(DietpruneError, match="line 2"):
        calibration_examples(parse_tasks(f"mine={bad}")[0], 5)
    nofield = tmp_path / "nofield.csv"
    nofield.write_text("question,answer\nq,a\n")
    with pytest.raises(DietpruneError, match="needs a 'text' field"):
        parse_tasks(f"mine={nofield}")
    with pytest.raises(DietpruneError, match="lacks field"):
        get_task("boolq").format({"question": "q"})


def test_custom_tasks_jsonl_and_csv(tmp_path):
    p = tmp_path / "pc.jsonl"
    p.write_text("\n".join(json.dumps({"prompt": f"Q{i}:", "completion": f" A{i}"}) for i in range(4)))
    ex = calibration_examples(parse_tasks(f"mine={p}")[0], 2, seed=0)
    assert len(ex) == 2 and ex[0].calibration_text[0].startswith("Q")
    c = tmp_path / "t.csv"
    c.write_text('text\n"hello world"\n"second row"\n')
    ex = calibration_examples(parse_tasks(f"other={c}")[0], 5)
    assert [e.continuations[0] for e in ex] == ["hello world", "second row"]


def test_missing_local_task_and_hub_error(tmp_path, monkeypatch):
    with pytest.raises(DietpruneError, match="no local calib data"):
        calibration_examples(get_task("piqa"), 5, data_dir_=tmp_path)
    monkeypatch.delenv("DIETPRUNE_DATA_DIR", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    with pytest.raises(DietpruneError, match="DIETPRUNE_DATA_DIR"):
        calibration_examples(get_task("rte"), 5)
