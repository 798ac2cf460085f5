"""Task registry: where each task's data lives and how a row becomes a prompt.

One formatter per task, shared by calibration (the gold continuation appended to the query)
and evaluation (every choice scored). Prompts follow lm-evaluation-harness task definitions
of the same names (v0.4.x): query text, ``target_delimiter`` " " before each choice, and the
harness's choice lists. Tasks are registered explicitly in this module; nothing is scanned
at import time.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Callable

from .errors import DietpruneError
from .userfiles import read_file_fields


@dataclass(frozen=True)
class Example:
    """One scored item.

    ``contexts[i] + continuations[i]`` is choice i as the model reads it. Most tasks share
    one context; WinoGrande (partial scoring) has one context per option and a shared
    continuation. ``gold`` is the index of the right choice; -1 for plain text.
    """

    contexts: tuple[str, ...]
    continuations: tuple[str, ...]
    gold: int

    @property
    def calibration_text(self) -> tuple[str, str]:
        g = max(self.gold, 0)
        return self.contexts[g], self.continuations[g]


@dataclass(frozen=True)
class Task:
    name: str
    kind: str  # 'multiple_choice', 'partial' (WinoGrande), 'perplexity', 'text'
    hub_path: str | None
    hub_name: str | None
    hub_splits: dict[str, str]  # role ('calib'/'eval') -> hub split
    fields: tuple[str, ...]  # fields a row must have
    formatter: Callable[[dict], Example]
    metrics: tuple[str, ...] = ("acc", "acc_norm")
    version: str = "1"
    local_files: dict[str, str] = field(default_factory=lambda: {"calib": "calib.jsonl", "eval": "eval.jsonl"})
    path: str | None = None  # custom tasks: a JSONL/CSV file

    def format(self, row: dict) -> Example:
        missing = [f for f in self.fields if f not in row]
        if missing:
            raise DietpruneError(f"task '{self.name}': row lacks field(s) {', '.join(missing)}")
        try:
            return self.formatter(row)
        except DietpruneError:
            raise
        except (KeyError, ValueError, IndexError, TypeError) as exc:
            raise DietpruneError(f"task '{self.name}': malformed row ({type(exc).__name__}: {exc})") from exc


def _mc(context: str, choices: list[str], gold: int, delimiter: str = " ") -> Example:
    if not 0 <= gold < len(choices):
        raise ValueError(f"gold index {gold} outside {len(choices)} choices")
    return Example(tuple([context] * len(choices)), tuple(delimiter + c for c in choices), gold)


def _boolq(doc: dict) -> Example:
    return _mc(f"{doc['passage']}\nQuestion: {doc['question']}?\nAnswer:", ["no", "yes"], int(doc["label"]))


def _rte(doc: dict) -> Example:
    # super_glue rte: label 0 = entailment -> "True"
    return _mc(
        f"{doc['premise']}\nQuestion: {doc['hypothesis']} True or False?\nAnswer:", ["True", "False"], int(doc["label"])
    )


def _hellaswag_clean(text: str) -> str:
    text = text.strip()
    text = text.replace(" [title]", ". ")
    text = re.sub("\\[.*?\\]", "", text)
    return text.replace("  ", " ")


def _hellaswag(doc: dict) -> Example:
    if "ctx_a" in doc and "ctx_b" in doc:  # hub schema
        ctx = doc["ctx_a"] + " " + doc["ctx_b"].capitalize()
    else:  # local copy: ctx already joined (see benchdata README)
        ctx = doc["ctx"]
    query = _hellaswag_clean(doc["activity_label"] + ": " + ctx)
    return _mc(query, [_hellaswag_clean(e) for e in doc["endings"]], int(doc["label"]))


def _winogrande(doc: dict) -> Example:
    sentence = doc["sentence"]
    idx = sentence.index("_")
    suffix = " " + sentence[idx + 1 :].strip()
    contexts = (sentence[:idx] + doc["option1"], sentence[:idx] + doc["option2"])
    gold = {"1": 0, "2": 1}[str(doc["answer"])]
    return Example(contexts, (suffix, suffix), gold)


def _arc(doc: dict) -> Example:
    labels = list(doc["choices"]["label"])
    return _mc(f"Question: {doc['question']}\nAnswer:", list(doc["choices"]["text"]), labels.index(doc["answerKey"]))


def _openbookqa(doc: dict) -> Example:
    labels = list(doc["choices"]["label"])
    return _mc(doc["question_stem"], list(doc["choices"]["text"]), labels.index(doc["answerKey"].strip()))


def _piqa(doc: dict) -> Example:
    return _mc(f"Question: {doc['goal']}\nAnswer:", [doc["sol1"], doc["sol2"]], int(doc["label"]))


def _text(doc: dict) -> Example:
    text = doc["text"]
    if not isinstance(text, str):
        raise ValueError("'text' is not a string")
    return Example(("",), (text,), -1)


def _prompt_completion(doc: dict) -> Example:
    prompt, completion = doc["prompt"], doc["completion"]
    if not isinstance(prompt, str) or not isinstance(completion, str):
        raise ValueError("'prompt' and 'completion' must be strings")
    return Example((prompt,), (completion,), 0)


_REGISTRY: dict[str, Task] = {}


def register(task: Task) -> Task:
    _REGISTRY[task.name] = task
    return task


register(Task("boolq", "multiple_choice", "super_glue", "boolq", {"calib": "train", "eval": "validation"},
              ("passage", "question", "label"), _boolq, metrics=("acc",)))
register(Task("rte", "multiple_choice", "super_glue", "rte", {"calib": "train", "eval": "validation"},
              ("premise", "hypothesis", "label"), _rte, metrics=("acc",)))
register(Task("hellaswag", "multiple_choice", "hellaswag", None, {"calib": "train", "eval": "validation"},
              ("activity_label", "endings", "label"), _hellaswag))
register(Task("winogrande", "partial", "winogrande", "winogrande_xl", {"calib": "train", "eval": "validation"},
              ("sentence", "option1", "option2", "answer"), _winogrande, metrics=("acc",)))
register(Task("arc_easy", "multiple_choice", "allenai/ai2_arc", "ARC-Easy", {"calib": "validation", "eval": "test"},
              ("question", "choices", "answerKey"), _arc))
register(Task("arc_challenge", "multiple_choice", "allenai/ai2_arc", "ARC-Challenge",
              {"calib": "validation", "eval": "test"}, ("question", "choices", "answerKey"), _arc))
register(Task("openbookqa", "multiple_choice", "allenai/openbookqa", "main", {"calib": "validation", "eval": "test"},
              ("question_stem", "choices", "answerKey"), _openbookqa))
register(Task("piqa", "multiple_choice", "baber/piqa", None, {"calib": "train", "eval": "validation"},
              ("goal", "sol1", "sol2", "label"), _piqa))
register(Task("wikitext2", "perplexity", "wikitext", "wikitext-2-raw-v1",
              {"calib": "train", "eval": "test"}, ("text",), _text,
              metrics=("word_perplexity", "byte_perplexity", "token_perplexity"),
              local_files={"calib": "calib.jsonl", "eval": "test.jsonl"}))

DIET_TASKS = ("boolq", "rte", "hellaswag", "winogrande", "arc_easy", "arc_challenge", "openbookqa")


def list_tasks() -> list[str]:
    return sorted(_REGISTRY)


def custom_task(name: str, path: str, fields: list[str]) -> Task:
    """A user task from a JSONL/CSV file with a `text` field or `prompt`+`completion` fields."""
    if "text" in fields:
        return Task(name, "text", None, None, {}, ("text",), _text, metrics=("token_perplexity",), path=path)
    if "prompt" in fields and "completion" in fields:
        return Task(name, "text", None, None, {}, ("prompt", "completion"), _prompt_completion,
                    metrics=("token_perplexity",), path=path)
    raise DietpruneError(
        f"task file {path} has fields {sorted(fields)}; it needs a 'text' field or 'prompt' and 'completion'"
    )


def get_task(spec: str) -> Task:
    """`name` from the registry, or `name=path.jsonl|csv` for a custom task."""
    if "=" in spec:
        name, path = spec.split("=", 1)
        if not name or not path:
            raise DietpruneError(f"custom task '{spec}' must look like name=path.jsonl")
        return custom_task(name, path, read_file_fields(path))
    if spec not in _REGISTRY:
        raise DietpruneError(f"unknown task '{spec}'; known tasks: {', '.join(list_tasks())} (or name=path.jsonl)")
    return _REGISTRY[spec]


def _listed(specs) -> list | None:
    if isinstance(specs, (str, bytes, dict)):
        return None
    try:
        return list(specs)
    except TypeError:
        return None


def task_tuple(specs) -> tuple[str, ...]:
    """'a,b' or an iterable of names -> a tuple of stripped, non-empty names (configs store this)."""
    if isinstance(specs, str):
        specs = specs.split(",")
    given, specs = specs, _listed(specs)
    if specs is None or not all(isinstance(s, str) for s in specs):
        raise DietpruneError(f"tasks must be names ('a,b' or a list of strings), got {given!r}")
    return tuple(s.strip() for s in specs if s.strip())


def parse_tasks(specs) -> list[Task]:
    """Tasks from 'a,b,name=file.jsonl', a list of such names, or Task objects."""
    if isinstance(specs, str):
        specs = [s.strip() for s in specs.split(",") if s.strip()]
    if not specs:
        raise DietpruneError("no tasks given")
    given, specs = specs, _listed(specs)
    if specs is None or not all(isinstance(s, (str, Task)) for s in specs):
        raise DietpruneError(f"tasks must be names ('a,b', a list of strings) or Task objects, got {given!r}")
    tasks = [s if isinstance(s, Task) else get_task(s) for s in specs]
    names = [t.name for t in tasks]
    if len(set(names)) != len(names):
        raise DietpruneError(f"task names repeat: {names}")
    return tasks
