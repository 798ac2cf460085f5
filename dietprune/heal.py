"""Healing: win back what the cut lost by distillation from the dense model.

The pruned model (the student) learns the dense model's (the teacher's) next-token
distribution on every token of some training text: the loss is the KL divergence
``KL(p_teacher || p_student)`` at temperature ``T`` (times ``T**2``), averaged over tokens. No
gold labels are read, so the student can only move towards the teacher.

* Memory: the two heads' logits are computed a chunk of rows at a time from the final hidden
  states (at most ``chunk_elements`` logits per chunk), so Gemma's 262k vocabulary never holds a
  [tokens x vocab] tensor for a whole batch. The gradient of the KL with respect to the student's
  logits is written directly, ``softmax(z_s) - p_t``, and pushed back through the student's head
  chunk by chunk; the decoder body then gets one backward pass. A student identical to its
  teacher therefore has exactly zero loss and zero gradient.
* What is trained (``mode``): ``full`` (every weight), ``lora`` (``peft`` LoRA adapters on every
  linear layer of the blocks, merged back before saving: the output is a plain checkpoint with
  the pruned shapes) or ``norms`` (the residual-path norm gains only, the cheapest).
* Data: the calibration split of each task (the query followed by its gold answer, as profiling
  reads it; never an evaluation row), the ``wikitext2`` calibration rows, and the user's files
  (``.jsonl``/``.csv`` with ``text`` or ``prompt``+``completion``, or ``.txt``). A user file that
  repeats evaluation items of a task (or is one of the evaluation files) is refused. Text is
  packed into fixed-length sequences in a seeded order that does not depend on the token budget,
  so with the default constant learning rate a run of N tokens is the prefix of a longer run.
* Long jobs: a progress bar with loss, tokens/s and ETA; a ``minutes`` budget; a resumable state
  saved every ``checkpoint_every`` steps, at the end of the budget and on Ctrl-C; the output is
  written through ``pipeline.save_checkpoint`` (temp folder + rename) only when training stops,
  and its ``dietprune.json`` records the recipe.
* Several processes (``torchrun`` / ``accelerate launch``; gloo on CPU, NCCL on GPU): each takes
  its share of every global batch, the loss is normalised by the global token count and the
  gradients are summed, so N processes equal one with the same global batch.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import math
import os
import random
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from .distill import TopKCache, chunked_kl, topk_kl, topk_teacher, windows_digest
from .errors import DietpruneError

MODES = ("full", "lora", "norms")
DEFAULT_LR = {"full": 1e-4, "lora": 1e-3, "norms": 1e-2}
STATE_FILE = "heal_state.pt"
SCHEMA = "dietprune-heal/1"


@dataclass
class HealConfig:
    tokens: int = 100_000  # training tokens (teacher-labelled positions) to see
    mode: str = "full"
    lora_rank: int = 16
    lora_alpha: float | None = None  # default 2 * rank
    lr: float | None = None  # default per mode (DEFAULT_LR)
    temperature: float = 1.0
    seq_len: int = 256
    batch_size: int = 4  # sequences per optimizer step, over all processes together
    micro_batch: int | None = None  # sequences per forward pass in one process (default: the whole share)
    warmup_steps: int = 5
    schedule: str = "constant"  # 'constant' (after warmup) or 'cosine' (to 10% of lr at the token budget)
    weight_decay: float = 0.0
    grad_clip: float | None = 1.0
    seed: int = 0
    tasks: tuple[str, ...] = ()
    general: tuple[str, ...] = ()
    files: tuple[str, ...] = ()
    samples: int | None = None  # calibration rows per task (default: all of them)
    minutes: float | None = None  # wall-clock budget of this call
    checkpoint_every: int = 100  # steps between saved states (0: only at the end / on Ctrl-C)
    chunk_elements: int = 1 << 22  # logits per head chunk (4M floats = 16 MiB)
    bf16: bool | None = None  # bfloat16 autocast of the decoder bodies and head matmuls (softmax/KL float32); None: GPU
    # 0: the teacher runs at every step, full-vocabulary KL. k > 0: its top-k log-probabilities of each
    # training window are cached on disk the first time the window is seen and read back in later epochs
    # (every epoch then reuses the first epoch's windows, reshuffled); the loss is the top-k KL + tail bucket
    teacher_topk: int = 0

    def __post_init__(self):
        self.tasks, self.general, self.files = tuple(self.tasks), tuple(self.general), tuple(self.files)
        if self.mode not in MODES:
            raise DietpruneError(f"heal mode must be one of {', '.join(MODES)}, got '{self.mode}'")
        if self.schedule not in ("constant", "cosine"):
            raise DietpruneError(f"schedule must be 'constant' or 'cosine', got '{self.schedule}'")
        if not isinstance(self.teacher_topk, int) or self.teacher_topk < 0:
            raise DietpruneError(f"teacher-topk must be 0 (off) or a positive integer, got {self.teacher_topk}")
        for name in ("tokens", "seq_len", "batch_size", "lora_rank", "chunk_elements"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) <= 0:
                raise DietpruneError(f"{name.replace('_', '-')} must be a positive integer, got {getattr(self, name)}")
        if self.seq_len < 2:
            raise DietpruneError("seq-len must be at least 2")
        if self.micro_batch is not None and self.micro_batch <= 0:
            raise DietpruneError(f"micro-batch must be positive, got {self.micro_batch}")
        if not self.temperature > 0:
            raise DietpruneError(f"temperature must be positive, got {self.temperature}")
        if self.lr is not None and not self.lr > 0:
            raise DietpruneError(f"lr must be positive, got {self.lr}")
        if self.minutes is not None and not self.minutes > 0:
            raise DietpruneError(f"minutes must be positive, got {self.minutes}")
        if self.checkpoint_every < 0 or self.warmup_steps < 0:
            raise DietpruneError("checkpoint-every and warmup-steps must not be negative")
        if not (self.tasks or self.general or self.files):
            raise DietpruneError("no training data: give tasks, general text (wikitext2) or files")

    @property
    def learning_rate(self) -> float:
        return self.lr if self.lr is not None else DEFAULT_LR[self.mode]

    @property
    def steps(self) -> int:
        return -(-self.tokens // (self.batch_size * self.seq_len))

    def recipe(self) -> dict:
        d = asdict(self)
        d["lr"] = self.learning_rate
        if self.mode == "lora":
            d["lora_alpha"] = self.lora_alpha or 2 * self.lora_rank
        return d

    def trajectory_key(self) -> dict:
        """What must match for a saved state to continue: everything that shapes the updates.

        The token budget, minutes and checkpoint interval are left out under the constant
        schedule (a longer run continues a shorter one); the cosine schedule depends on the budget.
        """
        d = self.recipe()
        for k in ("minutes", "checkpoint_every", "micro_batch", "chunk_elements"):
            d.pop(k)
        if not self.teacher_topk:
            d.pop("teacher_topk")  # states saved before the option existed stay valid
        if self.schedule == "constant":
            d.pop("tokens")
        return d


@dataclass
class HealResult:
    model: torch.nn.Module
    tokenizer: object
    config: HealConfig
    summary: dict
    history: list = field(default_factory=list)
    output: Path | None = None


# ---- the loss ---------------------------------------------------------------------------------

def _head_parts(model):
    from .evaluate.loglik import decoder_parts

    return decoder_parts(model)


def _rows_per_chunk(head, chunk_elements: int) -> int:
    return max(1, chunk_elements // head.weight.shape[0])


def _body_hidden(model, ids):
    body, _, _ = _head_parts(model)
    return body(input_ids=ids, use_cache=False).last_hidden_state


@torch.no_grad()
def kl_to_teacher(student, teacher, sequences, temperature: float = 1.0, batch_size: int = 4,
                  chunk_elements: int = 1 << 22) -> float:
    """Mean KL(p_teacher || p_student) per token over `sequences` (lists of token ids, equal length)."""
    _, head_s, cap_s = _head_parts(student)
    _, head_t, cap_t = _head_parts(teacher)
    dev = next(student.parameters()).device
    total, count = 0.0, 0
    for i in range(0, len(sequences), batch_size):
        ids = torch.tensor(sequences[i:i + batch_size], device=dev)
        hs = _body_hidden(student, ids).reshape(-1, student.config.hidden_size)
        ht = _body_hidden(teacher, ids).reshape(-1, teacher.config.hidden_size)
        s, n = chunked_kl(hs, ht, head_s, head_t, cap_s, cap_t, temperature, _rows_per_chunk(head_s, chunk_elements))
        total, count = total + s, count + n
    return total / max(count, 1)


# ---- data ---------------------------------------------------------------------------------------

def _task_texts(task, samples, seed, data_dir) -> list[str]:
    from .data import calibration_examples, load_rows

    if task.kind == "perplexity":  # running text (wikitext2): its calibration rows in order, as eval joins them
        rows = [r["text"] for r in load_rows(task, "calib", data_dir)]
        return ["\n\n".join(rows)]
    exs = calibration_examples(task, samples or 10**9, seed, data_dir)
    return ["".join(e.calibration_text) for e in exs]


def _file_texts(path: str) -> list[str]:
    from .userfiles import read_file_fields
    from .tasks import custom_task

    p = Path(path).expanduser()
    if p.suffix.lower() == ".txt":
        if not p.is_file():
            raise DietpruneError(f"training file not found: {p}")
        text = p.read_text(encoding="utf-8", errors="replace")
        if not text.strip():
            raise DietpruneError(f"training file {p} is empty")
        return [text]
    task = custom_task(p.stem, str(p), read_file_fields(p))
    from .data import load_rows

    texts = ["".join(task.format(r).calibration_text) for r in load_rows(task, "calib")]
    texts = [t for t in texts if t.strip()]
    if not texts:
        raise DietpruneError(f"training file {p} has only blank rows")
    return texts


def training_texts(tasks=(), general=(), files=(), samples=None, seed: int = 0, data_dir=None) -> dict[str, list[str]]:
    """Source name -> documents. Tasks give their calibration rows; never an evaluation row."""
    from .tasks import get_task, parse_tasks

    out: dict[str, list[str]] = {}
    if tasks:
        for t in parse_tasks(tasks):
            if t.kind == "perplexity":
                raise DietpruneError(f"'{t.name}' is running text: pass it as general text (--general {t.name})")
            out[t.name] = _task_texts(t, samples, seed, data_dir)
    for g in general:
        t = get_task(g)
        if t.kind != "perplexity" or t.path is not None:
            raise DietpruneError(f"general text must be a running-text corpus (wikitext2), got '{g}'; "
                                 "pass your own text with --files")
        out[t.name] = _task_texts(t, None, seed, data_dir)
    for f in files:
        texts = _file_texts(f)
        check_not_evaluation(f, texts, data_dir)
        out[f"file:{Path(f).name}"] = texts
    return out


NGRAM = 13


def _words(text: str) -> list[str]:
    import re

    return re.findall(r"\w+", text.lower())


def check_not_evaluation(path, texts: list[str], data_dir=None) -> None:
    """Refuse a training file that is, or repeats items of, an evaluation split.

    Checked: the path is not a task's evaluation file in the data folder; and (with a local
    data folder) no evaluation item of the seven tasks or WikiText-2's eval rows reappears in
    the file, judged by word 13-grams (an item counts when two of its non-overlapping 13-grams,
    or its only one, occur in the file).
    """
    from .data import data_dir as resolve_dir
    from .data import evaluation_rows
    from .tasks import DIET_TASKS, get_task

    root = resolve_dir(data_dir)
    p = Path(path).expanduser().resolve()
    if root is not None:
        for name in DIET_TASKS + ("wikitext2",):
            t = get_task(name)
            for fname in {t.local_files["eval"], "eval.jsonl", "test.jsonl"}:
                f = root / name / fname
                if f.is_file() and f.resolve() == p:
                    raise DietpruneError(f"training file {path} is the evaluation split of '{name}'; "
                                         "heal never trains on evaluation rows")
    if root is None:
        return
    grams: set[int] = set()
    for text in texts:
        w = _words(text)
        grams.update(hash(" ".join(w[i:i + NGRAM])) for i in range(len(w) - NGRAM + 1))
    if not grams:
        return
    for name in DIET_TASKS + ("wikitext2",):
        t = get_task(name)
        if not (root / name / "eval.jsonl").is_file():
            continue
        if t.kind == "perplexity":
            import datasets

            datasets.disable_progress_bars()
            items = [r["text"] for r in datasets.load_dataset("json", data_files=str(root / name / "eval.jsonl"),
                                                               split="train")]
        else:
            items = ["".join(t.format(r).calibration_text) for r in evaluation_rows(t, None, data_dir)]
        hits = []
        for item in items:
            w = _words(item)
            own = [hash(" ".join(w[i:i + NGRAM])) for i in range(0, len(w) - NGRAM + 1, NGRAM)]
            found = sum(g in grams for g in own)
            if own and found >= min(2, len(own)):
                hits.append(item)
        if hits:
            raise DietpruneError(f"training file {path} repeats {len(hits)} evaluation item(s) of '{name}' "
                                 f"(e.g. {hits[0][:60].strip()!r}...); heal never trains on evaluation rows")


class SequenceStream:
    """Fixed-length training sequences in a seeded order; sequence g is the same for any budget.

    Every document is tokenised (no BOS), cut into pieces of at most one window; each epoch
    shuffles the pieces (seed, epoch), joins them with EOS and cuts windows of ``seq_len``
    tokens (``seq_len - 1`` plus a leading BOS for models that read one). With ``fixed_windows``
    every later epoch is the first epoch's windows in a new seeded order (``window_id`` names the
    window, so a cache of the teacher's outputs per window stays valid).
    """

    def __init__(self, tokenizer, texts: dict[str, list[str]], seq_len: int, seed: int, add_bos: bool,
                 fixed_windows: bool = False):
        from .encoding import encode

        self.seq_len, self.seed, self.fixed_windows = seq_len, seed, fixed_windows
        self._orders: list[list[int]] = []
        self.bos = tokenizer.bos_token_id if add_bos and tokenizer.bos_token_id is not None else None
        self.eos = tokenizer.eos_token_id
        width = seq_len - (self.bos is not None)
        self.width = width
        self.pieces: list[list[int]] = []
        self.tokens_by_source: dict[str, int] = {}
        for source, docs in texts.items():
            n = 0
            for doc in docs:
                ids = encode(tokenizer, doc, False)
                n += len(ids)
                self.pieces += [ids[i:i + width] for i in range(0, len(ids), width)]
            self.tokens_by_source[source] = n
        self.pieces = [p for p in self.pieces if p]
        total = sum(len(p) + (self.eos is not None) for p in self.pieces)
        if total < width:
            raise DietpruneError(f"the training text has {total} tokens, less than one sequence of {seq_len}")
        self._epochs: list[list[list[int]]] = []

    def _epoch(self, e: int) -> list[list[int]]:
        while len(self._epochs) <= e:
            k = len(self._epochs)
            if self.fixed_windows and k > 0:
                order = list(range(len(self._epochs[0])))
                random.Random(self.seed * 1_000_003 + k).shuffle(order)
                self._orders.append(order)
                self._epochs.append([self._epochs[0][i] for i in order])
                continue
            if k == 0:
                self._orders.append([])  # epoch 0: the identity
            order = list(range(len(self.pieces)))
            random.Random(self.seed * 1_000_003 + k).shuffle(order)
            stream: list[int] = []
            for i in order:
                stream += self.pieces[i]
                if self.eos is not None:
                    stream.append(self.eos)
            w = self.width
            prefix = [self.bos] if self.bos is not None else []
            self._epochs.append([prefix + stream[j:j + w] for j in range(0, len(stream) - w + 1, w)])
        return self._epochs[e]

    def _locate(self, g: int) -> tuple[int, int]:
        e = 0
        while g >= len(self._epoch(e)):
            g -= len(self._epoch(e))
            e += 1
        return e, g

    def __getitem__(self, g: int) -> list[int]:
        e, j = self._locate(g)
        return self._epoch(e)[j]

    def window_id(self, g: int) -> int:
        """The first-epoch index of global sequence g (``fixed_windows`` only)."""
        if not self.fixed_windows:
            raise DietpruneError("window ids need fixed windows")
        e, j = self._locate(g)
        return j if e == 0 else self._orders[e][j]

    @property
    def sequences_per_epoch(self) -> int:
        return len(self._epoch(0))


# ---- training -----------------------------------------------------------------------------------

def _as_loaded(model, tokenizer=None, copy_module: bool = True):
    from .models import LoadedModel, load

    if isinstance(model, LoadedModel):
        return LoadedModel(copy.deepcopy(model.model) if copy_module else model.model, model.tokenizer,
                           model.spec, model.source)
    if isinstance(model, (str, os.PathLike)):
        return load(str(model))
    if isinstance(model, torch.nn.Module):
        if tokenizer is None:
            raise DietpruneError("pass a tokenizer together with an in-memory model")
        return LoadedModel(copy.deepcopy(model) if copy_module else model, tokenizer,
                           getattr(model, "name_or_path", "in-memory"), "memory")
    raise DietpruneError(f"cannot use {type(model).__name__} as a model")


def _setup_trainable(model, cfg: HealConfig):
    """Mark what trains; for LoRA wrap the model with peft (in place). Returns (model, peft wrapper or None)."""
    for p in model.parameters():
        p.requires_grad_(False)
    if cfg.mode == "full":
        for p in model.parameters():
            p.requires_grad_(True)
        return None
    if cfg.mode == "norms":
        from .adapters import adapter_for

        adapter = adapter_for(model)
        n = 0
        for name, p in model.named_parameters():
            if adapter.locate(name)[0] in ("norm", "final_norm"):
                p.requires_grad_(True)
                n += 1
        if not n:
            raise DietpruneError("this model has no residual norms to train (mode norms)")
        return None
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError as exc:
        raise DietpruneError("LoRA healing needs the package 'peft': run `pip install peft`") from exc
    torch.manual_seed(cfg.seed)
    lcfg = LoraConfig(r=cfg.lora_rank, lora_alpha=cfg.lora_alpha or 2 * cfg.lora_rank, lora_dropout=0.0,
                      target_modules="all-linear", bias="none")
    return get_peft_model(model, lcfg)


def _lr_at(step: int, cfg: HealConfig) -> float:
    lr = cfg.learning_rate
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return lr * (step + 1) / (cfg.warmup_steps + 1)
    if cfg.schedule == "cosine":
        span = max(1, cfg.steps - cfg.warmup_steps)
        t = min(1.0, (step - cfg.warmup_steps) / span)
        return lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t)))
    return lr


def _digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def default_state_dir(output) -> Path:
    out = Path(output).expanduser().absolute()
    return out.parent / f".{out.name}.heal-state"


def _save_state(state_dir: Path, payload: dict) -> None:
    state_dir.mkdir(parents=True, exist_ok=True)
    tmp = state_dir / f".{STATE_FILE}.tmp-{os.getpid()}"
    torch.save(payload, tmp)
    os.replace(tmp, state_dir / STATE_FILE)


def _remove_state(state_dir: Path) -> None:
    f = state_dir / STATE_FILE
    if f.is_file():
        f.unlink()
    try:
        state_dir.rmdir()  # only when nothing else is there: never a user's files
    except OSError:
        pass


def _all_reduce_grads(params) -> None:
    from . import distributed

    if distributed.world_size() == 1:
        return
    grads = [p.grad for p in params]
    flat = distributed.all_reduce(torch.cat([g.reshape(-1) for g in grads]))
    i = 0
    for g in grads:
        g.copy_(flat[i:i + g.numel()].view_as(g))
        i += g.numel()


def _all_reduce_float(x: float) -> float:
    from . import distributed

    return float(distributed.all_reduce(torch.tensor([x], dtype=torch.float64))[0])


def heal(student, teacher, output=None, *, config: HealConfig | None = None, tokenizer=None, data_dir=None,
         overwrite: bool = False, resume: bool = False, state_dir=None, dtype: str | None = None,
         device: str | None = None, progress: bool = True, keep_state: bool = False, **options) -> HealResult:
    """Distil `teacher` into `student` (a pruned model) and (if `output`) save a plain checkpoint.

    `student`/`teacher`: spec (folder, preset, .gguf, hub id), LoadedModel, or nn.Module (with
    `tokenizer=`; the caller's module is copied, never changed). Keyword options fill a
    HealConfig (tokens, mode, tasks, general, files, lr, temperature, seq_len, batch_size, seed,
    minutes, ...). `resume`: continue the saved state in `state_dir` (default: a hidden folder
    beside the output) if there is one. `keep_state`: keep the state after a finished run so a
    longer run can continue it.
    """
    from . import distributed
    from .encoding import wants_bos
    from .models import model_fingerprint
    from .outputs import check_output_dir, input_paths
    from .pipeline import save_checkpoint

    cfg = config or HealConfig(**options)
    if config is not None and options:
        raise DietpruneError("pass either config= or keyword options, not both")
    out = check_output_dir(output, overwrite, input_paths(student) + input_paths(teacher)) \
        if output is not None else None
    if state_dir is None and out is not None:
        state_dir = default_state_dir(out)
    state_dir = Path(state_dir) if state_dir is not None else None
    state_file = state_dir / STATE_FILE if state_dir is not None else None
    if state_file is not None and state_file.is_file() and not resume:
        raise DietpruneError(f"a saved heal state exists at {state_dir}: pass --resume to continue it, "
                             "or remove that folder to start afresh")
    if dtype not in (None, "float32", "bfloat16", "float16"):
        raise DietpruneError(f"dtype must be float32, bfloat16 or float16, got {dtype}")

    t_load = time.perf_counter()
    texts = training_texts(cfg.tasks, cfg.general, cfg.files, cfg.samples, cfg.seed, data_dir)
    stu = _as_loaded(student, tokenizer)
    tea = _as_loaded(teacher, tokenizer if not isinstance(teacher, (str, os.PathLike)) else None, copy_module=False)
    net, tnet = stu.model, tea.model
    if net.config.vocab_size != tnet.config.vocab_size:
        raise DietpruneError(f"student and teacher have different vocabularies ({net.config.vocab_size} vs "
                             f"{tnet.config.vocab_size})")
    device = device or distributed.device()  # under a multi-GPU launch: this process's own GPU
    dev = torch.device(device) if device else next(net.parameters()).device
    net.to(dev)
    tnet.to(dev).eval()
    for p in tnet.parameters():
        p.requires_grad_(False)
    student_meta = _read_meta(student)
    student_tensors = _read_mask(student)
    fp_student, fp_teacher = model_fingerprint(net), model_fingerprint(tnet)
    stream = SequenceStream(stu.tokenizer, texts, cfg.seq_len, cfg.seed, wants_bos(net),
                            fixed_windows=cfg.teacher_topk > 0)
    if cfg.teacher_topk > tnet.config.vocab_size:
        raise DietpruneError(f"teacher-topk {cfg.teacher_topk} exceeds the vocabulary ({tnet.config.vocab_size})")

    peft_model = _setup_trainable(net, cfg)
    params = [p for p in net.parameters() if p.requires_grad]
    names = [n for n, p in net.named_parameters() if p.requires_grad]
    # the fused kernel: the same update (to float rounding), 3-5x faster than the per-tensor loop on a CPU
    opt = torch.optim.AdamW(params, lr=cfg.learning_rate, betas=(0.9, 0.95), eps=1e-8,
                            weight_decay=cfg.weight_decay, fused=dev.type in ("cpu", "cuda"))
    key = {"trajectory": cfg.trajectory_key(), "student": fp_student, "teacher": fp_teacher,
           "world_batch": cfg.batch_size}
    key_digest = _digest(key)
    step, history, seconds_before = 0, [], 0.0
    if resume and state_file is not None and state_file.is_file():
        st = torch.load(state_file, map_location=dev, weights_only=False)
        if st.get("key") != key_digest:
            raise DietpruneError(f"the saved state in {state_dir} belongs to another recipe, student or teacher; "
                                 "remove it to start afresh")
        with torch.no_grad():
            for n, p in zip(names, params):
                p.copy_(st["params"][n])
        if st["step"] > cfg.steps:
            raise DietpruneError(f"the saved state in {state_dir} has trained {st['step'] * cfg.batch_size * cfg.seq_len:,} "
                                 f"tokens, more than --tokens {cfg.tokens:,}: give a larger budget, or remove that "
                                 "folder to start afresh")
        opt.load_state_dict(st["optimizer"])
        step, history, seconds_before = st["step"], st["history"], st["seconds"]

    start_step = step
    rank, world = distributed.rank(), distributed.world_size()
    if cfg.batch_size % world:
        raise DietpruneError(f"batch size {cfg.batch_size} does not split over {world} processes")
    share = cfg.batch_size // world
    micro = min(cfg.micro_batch or share, share)
    _, head_s, cap_s = _head_parts(net)
    _, head_t, cap_t = _head_parts(tnet)
    rows = _rows_per_chunk(head_s, cfg.chunk_elements)
    tokens_per_step = cfg.batch_size * cfg.seq_len
    scale = cfg.temperature ** 2 / tokens_per_step
    use_bf16 = cfg.bf16 if cfg.bf16 is not None else dev.type == "cuda"
    autocast = torch.autocast(dev.type, dtype=torch.bfloat16) if use_bf16 else _null()
    cache, cache_tmp = None, None
    if cfg.teacher_topk:
        import tempfile

        first = stream._epoch(0)
        ckey = {"teacher": fp_teacher, "windows": windows_digest(first), "temperature": cfg.temperature,
                "bf16": use_bf16, "cap": cap_t}
        if state_dir is None:  # private to this process (each fills only its own windows), removed at the end
            cache_tmp = Path(tempfile.mkdtemp(prefix="dietprune-topk-"))
        folder = (cache_tmp or state_dir) / f"teacher-top{cfg.teacher_topk}"
        if cache_tmp is not None or distributed.is_main():
            cache = TopKCache(folder, len(first), cfg.seq_len, cfg.teacher_topk, ckey, create=True)
        distributed.barrier()
        if cache is None:
            cache = TopKCache(folder, len(first), cfg.seq_len, cfg.teacher_topk, ckey, create=False)
    seconds_load = time.perf_counter() - t_load

    def state_payload():
        return {"key": key_digest, "key_detail": key, "step": step, "history": history,
                "seconds": seconds_before + (time.perf_counter() - t0),
                "params": {n: p.detach().cpu() for n, p in zip(names, params)},
                "optimizer": opt.state_dict()}

    def save_state():
        if cache is not None:
            cache.flush()
        if state_dir is not None and distributed.is_main():
            _save_state(state_dir, state_payload())
        distributed.barrier()

    from tqdm.auto import tqdm

    bar = tqdm(total=cfg.steps * tokens_per_step, initial=step * tokens_per_step, unit="tok", unit_scale=True,
               desc=f"heal ({cfg.mode})", dynamic_ncols=True, leave=False, mininterval=1.0,
               **({} if progress and distributed.is_main() else {"disable": True}))  # else tqdm's TQDM_DISABLE
    t0 = time.perf_counter()
    stopped = None
    net.eval()  # no dropout; the same forward as the teacher's
    try:
        while step < cfg.steps:
            if cfg.minutes is not None and time.perf_counter() - t0 >= 60 * cfg.minutes:
                stopped = "minutes"
                break
            for g in opt.param_groups:
                g["lr"] = _lr_at(step, cfg)
            opt.zero_grad(set_to_none=False)
            gs = [step * cfg.batch_size + j for j in range(rank, cfg.batch_size, world)]
            mine = [stream[g] for g in gs]
            loss = 0.0
            for i in range(0, len(mine), micro):
                ids = torch.tensor(mine[i:i + micro], device=dev)
                if cache is None:
                    with torch.no_grad(), autocast:
                        ht = _body_hidden(tnet, ids).reshape(-1, tnet.config.hidden_size)
                else:
                    wids = [stream.window_id(g) for g in gs[i:i + micro]]
                    miss = list(dict.fromkeys(cache.missing(wids)))
                    if miss:  # the teacher runs once per window
                        with torch.no_grad(), autocast:
                            ht = _body_hidden(tnet, ids[[wids.index(w) for w in miss]])
                        cache.put(miss, *topk_teacher(ht.reshape(-1, tnet.config.hidden_size), head_t,
                                                      cfg.teacher_topk, cap_t, cfg.temperature, rows, use_bf16))
                    ht = cache.get(wids)
                with autocast:
                    hs = _body_hidden(net, ids)
                leaf = hs.detach().requires_grad_(True)
                if cache is None:
                    s, _ = chunked_kl(leaf.reshape(-1, net.config.hidden_size), ht, head_s, head_t, cap_s, cap_t,
                                      cfg.temperature, rows, scale=scale, amp=use_bf16)
                else:
                    s, _ = topk_kl(leaf.reshape(-1, net.config.hidden_size), *ht, head_s, cap_s, cfg.temperature,
                                   rows, scale=scale, amp=use_bf16)
                hs.backward(leaf.grad)
                loss += s * scale
                del ht, hs, leaf
            _all_reduce_grads(params)
            loss = _all_reduce_float(loss)
            if not math.isfinite(loss):
                raise DietpruneError(f"the distillation loss became {loss} at step {step}; try a lower --lr")
            if cfg.grad_clip:
                torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
            opt.step()
            step += 1
            elapsed = seconds_before + time.perf_counter() - t0
            history.append({"step": step, "tokens": step * tokens_per_step, "loss": round(loss, 6),
                            "seconds": round(elapsed, 2)})
            bar.update(tokens_per_step)
            bar.set_postfix(loss=f"{loss:.4f}", refresh=False)
            if cfg.checkpoint_every and step % cfg.checkpoint_every == 0 and step < cfg.steps:
                save_state()
    except KeyboardInterrupt:
        bar.close()
        save_state()
        if distributed.is_main() and state_dir is not None:
            import sys

            print(f"dietprune: heal interrupted at step {step}/{cfg.steps}; state saved in {state_dir} "
                  "(rerun with --resume); no output written", file=sys.stderr)
        raise
    finally:
        topk_mass = cache.mass() if cache is not None else None
        if cache_tmp is not None:
            cache.remove()
            shutil.rmtree(cache_tmp, ignore_errors=True)
    bar.close()
    train_seconds = time.perf_counter() - t0
    if stopped and state_dir is not None:
        save_state()

    if peft_model is not None:
        net = peft_model.merge_and_unload()
    for p in net.parameters():
        p.requires_grad_(False)
    done_tokens = step * tokens_per_step
    this_call_steps = step - start_step
    summary = {
        "tokens_trained": done_tokens, "tokens_requested": cfg.tokens, "steps": step, "stopped": stopped or "done",
        "seconds_train_total": round(seconds_before + train_seconds, 2), "seconds_load": round(seconds_load, 2),
        "tokens_per_second": round(this_call_steps * tokens_per_step / train_seconds, 1) if train_seconds > 0 else None,
        "loss_first": history[0]["loss"] if history else None, "loss_last": history[-1]["loss"] if history else None,
        "world_size": world, "device": str(dev),
    }
    if cfg.teacher_topk:  # the teacher's mean probability inside its top k (1.0: the top-k loss is the full KL)
        summary["teacher_topk_mass"] = round(topk_mass, 6) if topk_mass is not None else None
    recipe = {"schema": SCHEMA, "teacher": tea.spec, "teacher_fingerprint": fp_teacher, "student": stu.spec,
              "student_fingerprint": fp_student, "data": {"sources": list(texts),
                                                          "tokens_by_source": stream.tokens_by_source,
                                                          "sequences_per_epoch": stream.sequences_per_epoch},
              "config": cfg.recipe(), "summary": summary, "loss_curve": history[:: max(1, len(history) // 50)]}
    result = HealResult(net, stu.tokenizer, cfg, summary, history)
    if out is not None and distributed.is_main():
        import transformers

        from . import __version__

        meta = dict(student_meta or {})
        meta.setdefault("dietprune_version", __version__)
        meta["heal"] = dict(recipe, versions={"torch": torch.__version__, "transformers": transformers.__version__})
        save_checkpoint(net, stu.tokenizer, out, meta, student_tensors, overwrite=overwrite, dtype=dtype)
        result.output = out
    distributed.barrier()
    if state_dir is not None and not stopped and not keep_state and distributed.is_main():
        if cache is not None and cache_tmp is None:
            cache.remove()
        _remove_state(state_dir)
    elif state_dir is not None and keep_state and not stopped:
        save_state()
    return result


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


def _read_meta(spec) -> dict | None:
    if isinstance(spec, (str, os.PathLike)):
        f = Path(spec).expanduser() / "dietprune.json"
        if f.is_file():
            return json.loads(f.read_text())
    return None


def _read_mask(spec) -> dict:
    if isinstance(spec, (str, os.PathLike)):
        f = Path(spec).expanduser() / "dietprune_mask.safetensors"
        if f.is_file():
            from safetensors.torch import load_file

            return load_file(str(f))
    return {}


# ---- command line -------------------------------------------------------------------------------

def add_heal_args(p, prefix: str = "") -> None:
    """Training options shared by `dietprune heal` and `dietprune prune --heal-tokens`."""
    p.add_argument(f"--{prefix}mode", default=None, choices=MODES,
                   help="what trains: full, lora (merged back) or norms (default full)")
    p.add_argument(f"--{prefix}lora", type=int, default=None, metavar="RANK", help="LoRA of this rank (mode lora)")
    p.add_argument(f"--{prefix}full", action="store_true", help="full fine-tuning (mode full, the default)")
    p.add_argument(f"--{prefix}general", default="wikitext2",
                   help="general text besides the tasks' calibration rows: wikitext2 or 'none' (default wikitext2)")
    p.add_argument(f"--{prefix}files", default=None, help="comma-separated training files (.jsonl/.csv/.txt)")
    p.add_argument(f"--{prefix}lr", type=float, default=None, help=f"learning rate (default {DEFAULT_LR})")
    p.add_argument(f"--{prefix}temperature", type=float, default=1.0)
    p.add_argument(f"--{prefix}seq-len", type=int, default=HealConfig.seq_len)
    p.add_argument(f"--{prefix}batch-size", type=int, default=HealConfig.batch_size,
                   help="sequences per step, over all processes")
    p.add_argument(f"--{prefix}minutes", type=float, default=None, help="stop after this many minutes")
    p.add_argument(f"--{prefix}checkpoint-every", type=int, default=HealConfig.checkpoint_every)
    p.add_argument(f"--{prefix}teacher-topk", type=int, default=0, metavar="K",
                   help="cache the teacher's top-K log-probabilities per training window on disk and read them "
                        "back in later epochs instead of running the teacher every step (loss: top-K KL + one "
                        "tail bucket; 0, the default: the teacher every step, full-vocabulary KL)")
    p.add_argument(f"--{prefix}bf16", action=argparse.BooleanOptionalAction, default=None,
                   help="bfloat16 autocast of the decoder bodies and head matmuls, softmax and KL in float32 "
                        "(default: on GPU only; ~1.5x faster a step on CPUs with native bf16)")


def heal_options(args, prefix: str = "") -> dict:
    g = lambda k: getattr(args, prefix + k)  # noqa: E731
    mode = g("mode") or ("lora" if g("lora") else "full")
    if (g("lora") and mode != "lora") or (g("full") and (mode != "full" or g("lora"))):
        raise DietpruneError("choose one of --full, --lora RANK and --mode")
    opts = dict(mode=mode, lr=g("lr"), temperature=g("temperature"), seq_len=g("seq_len"),
                batch_size=g("batch_size"), minutes=g("minutes"), checkpoint_every=g("checkpoint_every"),
                bf16=g("bf16"), teacher_topk=g("teacher_topk"),
                general=() if g("general") in (None, "", "none") else tuple(x for x in g("general").split(",") if x),
                files=tuple(x for x in (g("files") or "").split(",") if x))
    if g("lora"):
        opts["lora_rank"] = g("lora")
    return opts


def add_heal(sub):
    from .tasks import DIET_TASKS

    p = sub.add_parser("heal", help="distil the dense model back into a pruned one (KL on the teacher's logits)")
    p.add_argument("student", help="the pruned checkpoint folder (or any model spec)")
    p.add_argument("--teacher", required=True, help="the dense model (preset, folder, .gguf or hub id)")
    p.add_argument("--tasks", default=",".join(DIET_TASKS),
                   help="tasks whose calibration split is training text ('none' for none)")
    p.add_argument("--tokens", type=int, default=HealConfig.tokens, help="training tokens")
    add_heal_args(p)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--samples", type=int, default=None, help="calibration rows per task (default all)")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--output", required=True)
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--resume", action="store_true", help="continue the state saved by an interrupted run")
    p.add_argument("--state-dir", default=None, help="where the resumable state lives (default .OUTPUT.heal-state)")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"])
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: where the model loads)")
    p.add_argument("--json", action="store_true")

    def run(args) -> int:
        tasks = () if args.tasks in ("", "none") else tuple(t for t in args.tasks.split(",") if t)
        res = heal(args.student, args.teacher, args.output, tasks=tasks, tokens=args.tokens, seed=args.seed,
                   samples=args.samples, data_dir=args.data_dir, overwrite=args.overwrite, resume=args.resume,
                   state_dir=args.state_dir, dtype=args.dtype, device=args.device, **heal_options(args))
        from .distributed import is_main

        if is_main():
            print_summary(res, args.json)
        return 0

    return run


def print_summary(res: HealResult, as_json: bool) -> None:
    s = res.summary
    if as_json:
        print(json.dumps(s, indent=2))
        return
    print(f"healed ({res.config.mode}) {s['tokens_trained']:,} tokens in {s['steps']} steps, "
          f"{s['seconds_train_total']:.0f}s ({s['tokens_per_second']} tok/s); loss {s['loss_first']} -> "
          f"{s['loss_last']}" + (f"; stopped by the {s['stopped']} budget" if s["stopped"] != "done" else "")
          + (f" -> {res.output}" if res.output else ""))


def prune_then_heal(args, prune_kwargs: dict) -> int:
    """`dietprune prune ... --heal-tokens N`: prune into a scratch folder beside the output, heal into the output."""
    import tempfile

    from .distributed import is_main
    from .outputs import check_output_dir, input_paths
    from .pipeline import prune

    out = check_output_dir(args.output, args.overwrite, input_paths(args.model))
    scratch = Path(tempfile.mkdtemp(prefix=f".{out.name}.pruned-", dir=out.parent))
    try:
        res = prune(args.model, output=scratch / "pruned", **prune_kwargs)
        if is_main():
            from .pipeline import format_summary

            print(format_summary(res.summary, res.output))
        del res
        opts = heal_options(args, "heal_")
        healed = heal(scratch / "pruned", args.model, out, tasks=tuple(t for t in args.tasks.split(",") if t),
                      tokens=args.heal_tokens, seed=args.seed, data_dir=args.data_dir, overwrite=args.overwrite,
                      state_dir=default_state_dir(out), resume=True, dtype=args.dtype, **opts)
        if is_main():
            print_summary(healed, False)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return 0
