"""dietprune's scorer as an lm-evaluation-harness model: ``--model dietprune``.

    python -m dietprune.harness --model dietprune --model_args pretrained=OUT --tasks arc_easy --limit 20
    # or in Python
    import lm_eval
    from dietprune.evaluate.lm_eval_backend import DietpruneLM
    lm_eval.simple_evaluate(model=DietpruneLM(pretrained="out/pruned"), tasks=["arc_easy"], limit=20)

lm-eval 0.4.13 finds models in its own table only (no entry points), so ``lm_eval --model
dietprune`` works once this module is imported: ``python -m dietprune.harness`` imports it and
then runs lm-eval's own command line, unchanged.

Requests, as the harness's ``hf`` model handles them:

- ``loglikelihood``: each (context, continuation) is split into tokens as the harness splits it
  (:func:`dietprune.encoding.encode_pair`; an empty context is conditioned on the prefix token,
  BOS or else EOS). The requests of one document (the choices of a multiple-choice question) are
  scored as one :class:`dietprune.evaluate.loglik.Request` sharing their longest common token
  prefix (:func:`dietprune.evaluate.requests.example_request`), the same requests and code path as
  ``dietprune eval``: packed rows, only continuation positions through ``lm_head``.
- ``loglikelihood_rolling``: the text's tokens (BOS first where ``add_bos_token``, as the harness's
  ``tok_encode``) in disjoint windows of ``max_length`` tokens (first conditioned on the prefix
  token, later ones on as much preceding text as fits), summed per document.
- ``generate_until``: greedy ``model.generate`` from the encoded context (left-truncated to
  ``max_length - max_gen_toks``), stopped at the ``until`` strings or EOS, and the text cut at the
  first stop string. Sampling arguments are refused: this backend is for deterministic scoring.

``add_bos_token`` defaults to :func:`dietprune.encoding.wants_bos` (Gemma: yes), ``max_length``
to min(2048, the model's context): pass the same to ``--model hf`` for an exact comparison.
"""

from __future__ import annotations

from collections import defaultdict

import torch

from ..encoding import encode, encode_pair, wants_bos
from ..errors import DietpruneError

try:
    from lm_eval.api.model import LM
    from lm_eval.api.registry import register_model
except ImportError as exc:  # pragma: no cover - exercised where lm-eval is absent
    raise DietpruneError("the lm-eval backend needs lm-eval: run `pip install lm-eval==0.4.13` "
                         "(or `pip install dietprune[eval]`)") from exc

from .loglik import Request, score_requests
from .requests import _pad_id, _prefix_token, example_request, model_window, rolling_requests

_FALSE = ("0", "false", "no", "off")


def _flag(x) -> bool | None:
    if x is None or isinstance(x, bool):
        return x
    return str(x).strip().lower() not in _FALSE


class _StopAt:
    """Stop once the generated text (special tokens kept, as the harness checks) holds a stop string."""

    def __init__(self, tokenizer, stops: list[str], start: int):
        self.tokenizer, self.stops, self.start = tokenizer, stops, start

    def __call__(self, input_ids, scores, **kwargs) -> torch.Tensor:
        text = self.tokenizer.decode(input_ids[0, self.start:].tolist(), skip_special_tokens=False)
        done = any(s in text for s in self.stops)
        return torch.full((input_ids.shape[0],), done, dtype=torch.bool, device=input_ids.device)


@register_model("dietprune")
class DietpruneLM(LM):
    """An lm-eval ``LM`` over a model dietprune can load (preset, .gguf, folder, hub id) or an
    in-memory ``model`` + ``tokenizer``."""

    def __init__(self, pretrained: str | None = None, model=None, tokenizer=None, batch_size=16,
                 max_length: int | None = None, add_bos_token=None, max_gen_toks: int = 256,
                 device: str | None = None, **_ignored) -> None:
        super().__init__()
        if model is None:
            if not pretrained:
                raise DietpruneError("the dietprune lm-eval model needs pretrained=MODEL (preset, .gguf, folder "
                                     "or hub id) or an in-memory model and tokenizer")
            from ..models import load

            lm = load(str(pretrained))
            model, tokenizer = lm.model, lm.tokenizer
        elif tokenizer is None:
            raise DietpruneError("an in-memory model needs its tokenizer")
        if device and str(device) not in ("cpu", str(next(model.parameters()).device)) and not (
                str(device).startswith("cuda") and not torch.cuda.is_available()):  # lm_eval's CLI says cuda
            model = model.to(device)
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.batch_size = int(batch_size) if str(batch_size).isdigit() else 16  # "auto" -> our default
        self.max_length = model_window(model, int(max_length) if max_length else None)
        bos = _flag(add_bos_token)
        self.add_bos = wants_bos(model) if bos is None else bos
        self.max_gen_toks = int(max_gen_toks)
        self.name = str(pretrained or getattr(model, "name_or_path", "") or type(model).__name__)

    @property
    def tokenizer_name(self) -> str:
        return str(getattr(self.tokenizer, "name_or_path", "dietprune")).replace("/", "__")

    # -- log-likelihoods --------------------------------------------------------------------------

    def _pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        if context:
            return encode_pair(self.tokenizer, context, continuation, self.add_bos)
        cont = encode(self.tokenizer, continuation, False)
        prefix = _prefix_token(self.tokenizer)
        if cont and cont[0] == prefix:  # as the harness: the prefix token is already there
            return cont[:1], cont[1:]
        return [prefix], cont

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        pairs = [self._pair(*req.args) for req in requests]
        for (c, k), req in zip(pairs, requests):
            if not k:
                raise DietpruneError(f"continuation {req.args[1]!r} encodes to no tokens")
        # the requests of one document (its choices) share one scoring request
        groups: dict = defaultdict(list)
        for i, req in enumerate(requests):
            doc = (getattr(req, "task_name", None), getattr(req, "doc_id", None))
            groups[doc if doc != (None, None) else ("ctx", tuple(pairs[i][0]))].append(i)
        reqs, where = [], [None] * len(requests)
        for members in groups.values():
            shared = example_request([pairs[i] for i in members])
            if shared is not None:
                for j, i in enumerate(members):
                    where[i] = (len(reqs), j)
                reqs.append(shared)
                continue
            for i in members:  # no common first token: one request each
                where[i] = (len(reqs), 0)
                reqs.append(Request(tuple(pairs[i][0]), (tuple(pairs[i][1]),)))
        scores = score_requests(self.model, reqs, batch_size=self.batch_size, pad_id=_pad_id(self.tokenizer),
                                desc="dietprune loglikelihood", show=not disable_tqdm, max_length=self.max_length)
        out = []
        for req, (r, j) in zip(requests, where):
            s = scores[r][j]
            out.append((s.loglik, s.greedy))
            self.cache_hook.add_partial("loglikelihood", req.args, (s.loglik, s.greedy))
        return out

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        prefix = _prefix_token(self.tokenizer)
        reqs, owner = [], []
        for d, req in enumerate(requests):
            (text,) = req.args
            toks = encode(self.tokenizer, text, self.add_bos)
            for r in rolling_requests(toks, prefix, self.max_length):
                reqs.append(r)
                owner.append(d)
        scores = score_requests(self.model, reqs, batch_size=max(1, min(self.batch_size, 4096 // self.max_length)),
                                pad_id=_pad_id(self.tokenizer), desc="dietprune rolling", show=not disable_tqdm)
        totals = [0.0] * len(requests)
        for d, s in zip(owner, scores):
            totals[d] += s[0].loglik
        for req, t in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, t)
        return totals

    # -- generation -------------------------------------------------------------------------------

    @torch.no_grad()
    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        from lm_eval.models.utils import handle_stop_sequences, normalize_gen_kwargs, postprocess_generated_text

        eos = self.tokenizer.eos_token_id
        eos_text = self.tokenizer.decode([eos]) if eos is not None else None
        dev = next(self.model.parameters()).device
        out = []
        for req in requests:
            context, gen_kwargs = req.args
            kw = normalize_gen_kwargs(dict(gen_kwargs or {}), self.max_gen_toks)
            if kw.get("do_sample"):
                raise DietpruneError("the dietprune lm-eval model generates greedily only (do_sample=True asked)")
            until = handle_stop_sequences(kw.get("until"), eos=eos_text)
            n_new = int(kw["max_gen_toks"])
            if n_new >= self.max_length:
                raise DietpruneError(f"max_gen_toks {n_new} does not fit the {self.max_length}-token window")
            ids = encode(self.tokenizer, context, self.add_bos)[-(self.max_length - n_new):]
            x = torch.tensor([ids], device=dev)
            stops = [s for s in until if s]
            gen = self.model.generate(input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=n_new,
                                      do_sample=False, pad_token_id=_pad_id(self.tokenizer),
                                      stopping_criteria=[_StopAt(self.tokenizer, stops, len(ids))] if stops else None)
            text = self.tokenizer.decode(gen[0, len(ids):].tolist(), skip_special_tokens=True)
            text = postprocess_generated_text(text, until, None)
            out.append(text)
            self.cache_hook.add_partial("generate_until", req.args, text)
        return out


# ---- harness tasks inside `dietprune eval` ----------------------------------------------------------

def _mentioned(names: list[str], include_path=None) -> set[str]:
    """The names that occur anywhere in the harness's task files (a fast scan, half a second):
    a name that occurs nowhere cannot be a task, without indexing (20 s on a busy 2-core box)."""
    import os

    import lm_eval

    roots = [os.path.join(os.path.dirname(lm_eval.__file__), "tasks")] + ([str(include_path)] if include_path else [])
    left, found = {n: n.encode() for n in names}, set()
    for root in roots:
        for folder, _, files in os.walk(root):
            for f in files:
                if not left or not f.endswith((".yaml", ".yml", ".py")):
                    continue
                try:
                    with open(os.path.join(folder, f), "rb") as fh:
                        text = fh.read()
                except OSError:
                    continue
                for n in [n for n, b in left.items() if b in text]:
                    found.add(n)
                    del left[n]
    return found


def task_manager(names: list[str], include_path=None):
    """lm-eval's TaskManager, after checking it knows every name (DietpruneError otherwise)."""
    import os

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    bad = [n for n in names if n not in _mentioned(names, include_path)]
    if not bad:
        from lm_eval.tasks import TaskManager

        manager = TaskManager(include_path=str(include_path) if include_path else None)
        known = set(manager.all_tasks)
        bad = [n for n in names if n not in known]
    if bad:
        from ..tasks import list_tasks

        raise DietpruneError(f"unknown task(s) {', '.join(repr(b) for b in bad)}: neither a dietprune task "
                             f"({', '.join(list_tasks())}, or name=path.jsonl) nor an lm-evaluation-harness "
                             "task" + (f" (with include path {include_path})" if include_path else ""))
    return manager


def _continuations(arguments) -> list[str]:
    """The continuation strings of a harness sample's ``arguments`` (dict or list form)."""
    items = list(arguments.values()) if isinstance(arguments, dict) else list(arguments or [])
    out = []
    for a in items:
        vals = list(a.values()) if isinstance(a, dict) else list(a) if isinstance(a, (list, tuple)) else []
        if len(vals) >= 2 and isinstance(vals[1], str):
            out.append(vals[1])
    return out


def _records(samples: list[dict]) -> list[dict]:
    """Harness samples of a multiple-choice task -> dietprune's per-example records (others: raw)."""
    out = []
    for s in sorted(samples, key=lambda s: s["doc_id"]):
        resps = s.get("filtered_resps") or []
        target = s.get("target")
        if resps and all(isinstance(r, (list, tuple)) and len(r) == 2 for r in resps) and isinstance(target, int):
            lls = [float(r[0]) for r in resps]
            rec = {"gold": target, "pred": max(range(len(lls)), key=lambda i: (lls[i], -i)), "loglik": lls,
                   "greedy": [bool(r[1]) for r in resps]}
            conts = _continuations(s.get("arguments"))
            if s.get("acc_norm") is not None and len(conts) == len(lls):  # loglik per character of the choice
                chars = [max(1, len(c) - 1 if c.startswith(" ") else len(c)) for c in conts]
                norm = [ll / c for ll, c in zip(lls, chars)]
                rec["pred_norm"] = max(range(len(norm)), key=lambda i: (norm[i], -i))
            out.append(rec)
        else:
            out.append({"doc_id": s["doc_id"], "resps": [str(r) for r in resps], "target": str(target)})
    return out


def run_harness_tasks(model, tokenizer, names: list[str], limit=None, batch_size: int = 16, include_path=None,
                      num_fewshot: int | None = None) -> tuple[dict, dict, dict]:
    """Harness tasks through :class:`DietpruneLM`: ({task: metrics}, {task: records}, {task: version})."""
    import lm_eval

    manager = task_manager(names, include_path)
    lm = DietpruneLM(model=model, tokenizer=tokenizer, batch_size=batch_size)
    res = lm_eval.simple_evaluate(model=lm, tasks=names, task_manager=manager, limit=limit, num_fewshot=num_fewshot,
                                  log_samples=True, bootstrap_iters=0, verbosity="ERROR")
    metrics, records, versions = {}, {}, {}
    for name, vals in res["results"].items():
        m = {k.split(",")[0]: v for k, v in vals.items() if "," in k and not isinstance(v, str)}
        m = {k: v for k, v in m.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        n = res.get("n-samples", {}).get(name, {})
        if n:
            m["n"] = n.get("effective")
        metrics[name] = m
        versions[name] = f"lm-eval {res.get('versions', {}).get(name)}"
    for name, samples in (res.get("samples") or {}).items():
        records[name] = _records(samples)
    return metrics, records, versions
