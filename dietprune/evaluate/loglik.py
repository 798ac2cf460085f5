"""Log-likelihood engine: score continuation tokens without full-vocabulary logits everywhere.

A request is one context (token ids) with one or more continuations. Two ways to run the
decoder body over a batch, with the same numbers:

* packed (several continuations, the whole row within the attention window): one row per
  request holds the context followed by every continuation, and a 4-D attention mask lets each
  continuation see the context and its own earlier tokens only (position ids restart after the
  context for each one). One pass, no padding between choices, no copied cache.
* two passes (otherwise): the contexts of a batch (left-padded, explicit position ids), then
  the continuations on a KV cache copied once per continuation.

Only the hidden states that predict a continuation token go through ``lm_head`` (plus Gemma-2's
final logit soft-capping) and a log-softmax over the vocabulary. The numbers are those of a plain
``log_softmax(model(ctx + cont).logits)`` read at the same positions, which is what
lm-evaluation-harness computes.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch

from ..errors import DietpruneError
from ..progress import progress

#: Logits computed at once (rows x vocabulary; 2**27 float32 = 512 MiB, 512 rows of Gemma's 262k
#: vocabulary). Bigger chunks keep the lm_head matmul efficient; this bounds the memory.
HEAD_CHUNK_ELEMENTS = 2**27


@dataclass(frozen=True)
class Request:
    """``context`` ids (never empty) followed by each of ``continuations`` (never empty).

    ``scored[i]`` (default: all) is how many trailing tokens of continuation i are scored; the
    others are more context that only that continuation sees. This lets choices whose contexts
    differ after a common prefix (WinoGrande's partial scoring) share the prefix's pass.
    """

    context: tuple[int, ...]
    continuations: tuple[tuple[int, ...], ...]
    scored: tuple[int, ...] | None = None

    def n_scored(self, i: int) -> int:
        return len(self.continuations[i]) if self.scored is None else self.scored[i]


@dataclass(frozen=True)
class Score:
    loglik: float
    greedy: bool  # every continuation token is the argmax of its distribution
    n_tokens: int


def decoder_parts(model):
    """(decoder body, lm_head, soft-cap or None) of a causal LM."""
    body = model.get_decoder() if hasattr(model, "get_decoder") else None
    if body is None:
        body = getattr(model, "model", None)
    head = model.get_output_embeddings()
    if body is None or head is None:
        raise DietpruneError(f"{type(model).__name__}: cannot find the decoder body and lm_head to score tokens")
    cap = getattr(model.config, "final_logit_softcapping", None)
    return body, head, cap


def head_logprobs(model, hidden: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probability of ``targets`` and whether each is the argmax, from final hidden states.

    ``hidden``: (N, d) after the final norm; ``targets``: (N,). Works in chunks of at most
    HEAD_CHUNK_ELEMENTS logits.
    """
    _, head, cap = decoder_parts(model)
    step = max(1, HEAD_CHUNK_ELEMENTS // head.weight.shape[0])
    lps, greedy = [], []
    for start in range(0, hidden.shape[0], step):
        logits = head(hidden[start : start + step]).float()
        if cap:
            logits = torch.tanh(logits / cap) * cap
        tgt = targets[start : start + step].to(logits.device)
        picked = logits.gather(1, tgt[:, None])[:, 0]
        top = logits.max(-1).values
        # the target is the argmax when it reaches the maximum and no earlier index does too
        is_max = picked >= top
        if bool(is_max.any()):
            rows = is_max.nonzero()[:, 0]
            is_max[rows] = logits[rows].argmax(-1) == tgt[rows]
        # log-softmax at the target only: x_t - (max + log sum exp(x - max)), the same formula
        # torch's log_softmax evaluates, without writing a second vocabulary-sized tensor
        lse = top + logits.sub_(top[:, None]).exp_().sum(-1).log()
        lps.append(picked - lse)
        greedy.append(is_max)
    if not lps:
        return torch.zeros(0), torch.zeros(0, dtype=torch.bool)
    return torch.cat(lps).cpu(), torch.cat(greedy).cpu()


def _cache_arg(body) -> str:
    """transformers 5 renamed ``past_key_values`` to ``cache``; accept both."""
    params = inspect.signature(body.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def _device(model):
    return next(model.parameters()).device


def _pad(seqs, pad_id, left: bool):
    """(ids, attention mask) with every sequence padded to the longest, on the left or the right."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        if s:
            span = slice(width - len(s), width) if left else slice(0, len(s))
            ids[i, span] = torch.tensor(s, dtype=torch.long)
            mask[i, span] = 1
    return ids, mask



@torch.no_grad()
def _score_batch(model, requests: list[Request], pad_id: int) -> list[list[Score]]:
    """One batch: a pass over the contexts, then one over every continuation with a copied KV cache.

    Token j of continuation c is predicted by the context's last hidden state (j = 0) or by the
    second pass at position j - 1; only the scored (trailing) tokens go through lm_head.
    """
    body, _, _ = decoder_parts(model)
    dev = _device(model)
    ctx_ids, ctx_mask = _pad([list(r.context) for r in requests], pad_id, left=True)
    ctx_len = ctx_mask.sum(1)
    pos = (ctx_mask.cumsum(1) - 1).clamp(min=0)
    out = body(input_ids=ctx_ids.to(dev), attention_mask=ctx_mask.to(dev), position_ids=pos.to(dev),
               use_cache=True)
    last = out.last_hidden_state[:, -1]  # predicts the first token of every continuation

    # one row per (request, continuation); the cache is copied to match
    owner = [i for i, r in enumerate(requests) for _ in r.continuations]
    conts = [list(c) for r in requests for c in r.continuations]
    first = [len(c) - r.n_scored(j) for r in requests for j, c in enumerate(r.continuations)]  # first scored j
    from_ctx = [row for row, f in enumerate(first) if f == 0]
    hidden = [last[[owner[row] for row in from_ctx]]]
    targets = [torch.tensor([conts[row][0] for row in from_ctx], dtype=torch.long)]
    rest = [c[:-1] for c in conts]  # inputs of the second pass: every token but the last
    if max(len(s) for s in rest) > 0:
        cache = out.get("cache", None) or out.get("past_key_values", None)
        cache.reorder_cache(torch.tensor(owner, device=dev))
        ids, mask = _pad(rest, pad_id, left=False)
        full_mask = torch.cat([ctx_mask[owner], mask], dim=1)
        cpos = ctx_len[owner][:, None] + torch.arange(ids.shape[1])[None, :]
        out2 = body(input_ids=ids.to(dev), attention_mask=full_mask.to(dev), position_ids=cpos.to(dev),
                    use_cache=True, **{_cache_arg(body): cache})
        sel = torch.zeros_like(mask, dtype=torch.bool)  # position j - 1 predicts token j
        for row, (c, f) in enumerate(zip(conts, first)):
            sel[row, max(f, 1) - 1 : len(c) - 1] = True
        hidden.append(out2.last_hidden_state[sel.to(dev)])
        targets.append(torch.tensor([t for c, f in zip(conts, first) for t in c[max(f, 1):]], dtype=torch.long))
    del out
    lp, gr = head_logprobs(model, torch.cat(hidden), torch.cat(targets))

    # regroup: the first block holds rows scored from the context pass, the second the rest in row order
    head_of = {row: k for k, row in enumerate(from_ctx)}
    results: list[list[Score]] = [[] for _ in requests]
    offset = len(from_ctx)
    for row, (c, f) in enumerate(zip(conts, first)):
        k = len(c) - max(f, 1)
        total, greedy = lp[offset : offset + k].sum(), bool(gr[offset : offset + k].all())
        if row in head_of:
            total = lp[head_of[row]] + total
            greedy = greedy and bool(gr[head_of[row]])
        offset += k
        results[owner[row]].append(Score(float(total), greedy, len(c) - f))
    return results


def _packed_width(r: Request) -> int:
    """Length of a request's packed row: the context, then every continuation but its last token."""
    return len(r.context) + sum(len(c) - 1 for c in r.continuations)


def _packs(model, r: Request) -> bool:
    """Whether ``r`` takes the packed path: two or more continuations longer than one token (else
    the two-pass path copies nothing, and its plain causal mask is faster), an attention
    implementation that reads a 4-D mask as given, and a row no longer than the sliding window
    (if any), so the one mask is right for every layer."""
    if sum(len(c) > 1 for c in r.continuations) < 2:
        return False
    if getattr(model.config, "_attn_implementation", None) not in ("eager", "sdpa"):
        return False
    window = getattr(model.config, "sliding_window", None)
    return not window or _packed_width(r) <= window


@torch.no_grad()
def _score_packed(model, requests: list[Request], pad_id: int) -> list[list[Score]]:
    """One pass over packed rows (see the module docstring); right-padded to the longest row."""
    body, _, _ = decoder_parts(model)
    dev = _device(model)
    width = max(_packed_width(r) for r in requests)
    ids = torch.full((len(requests), width), pad_id, dtype=torch.long)
    pos = torch.zeros((len(requests), width), dtype=torch.long)
    seg = torch.full((len(requests), width), -1, dtype=torch.long)  # 0: context, i + 1: continuation i, -1: pad
    rows, cols, targets = [], [], []  # where each scored token is predicted, and the token
    for b, r in enumerate(requests):
        n = len(r.context)
        ids[b, :n] = torch.tensor(r.context)
        pos[b, :n] = torch.arange(n)
        seg[b, :n] = 0
        start = n
        for i, c in enumerate(r.continuations):
            k = len(c) - 1
            if k:
                ids[b, start : start + k] = torch.tensor(c[:-1])
                pos[b, start : start + k] = torch.arange(n, n + k)
                seg[b, start : start + k] = i + 1
            for j in range(len(c) - r.n_scored(i), len(c)):  # token j is predicted at token j - 1
                rows.append(b)
                cols.append(n - 1 if j == 0 else start + j - 1)
                targets.append(c[j])
            start += k
    q = torch.arange(width)
    allowed = (q[None, :, None] >= q[None, None, :]) & (seg[:, None, :] >= 0) & (
        (seg[:, None, :] == 0) | (seg[:, :, None] == seg[:, None, :]))
    allowed |= torch.eye(width, dtype=torch.bool)  # a pad query sees itself: no empty softmax row
    dtype = next(model.parameters()).dtype
    mask = torch.zeros(allowed.shape, dtype=dtype).masked_fill_(~allowed, torch.finfo(dtype).min)[:, None]
    out = body(input_ids=ids.to(dev), attention_mask=mask.to(dev), position_ids=pos.to(dev), use_cache=False)
    hidden = out.last_hidden_state[torch.tensor(rows, device=dev), torch.tensor(cols, device=dev)]
    lp, gr = head_logprobs(model, hidden, torch.tensor(targets, dtype=torch.long))
    results, offset = [], 0
    for r in requests:
        scores = []
        for i in range(len(r.continuations)):
            k = r.n_scored(i)
            scores.append(Score(float(lp[offset : offset + k].sum()), bool(gr[offset : offset + k].all()), k))
            offset += k
        results.append(scores)
    return results


def _batches(order: list[int], cost: list[int], batch_size: int) -> list[list[int]]:
    """Consecutive runs of ``order`` with at most ``batch_size`` items and ``batch_size * 512`` cost."""
    batches, cur, cur_tokens = [], [], 0
    for i in order:
        if cur and (len(cur) >= batch_size or cur_tokens + cost[i] > batch_size * 512):
            batches.append(cur)
            cur, cur_tokens = [], 0
        cur.append(i)
        cur_tokens += cost[i]
    if cur:
        batches.append(cur)
    return batches


def score_requests(model, requests: list[Request], batch_size: int = 16, pad_id: int = 0,
                   desc: str = "", show: bool = True, max_length: int | None = None) -> list[list[Score]]:
    """Scores of every continuation of every request, in input order.

    Requests are batched by length (longest first, so an out-of-memory error shows at once),
    packed ones apart from the others; a batch holds at most ``batch_size`` requests and about
    ``batch_size * 512`` tokens.
    Contexts longer than ``max_length`` minus the longest continuation are left-truncated, as
    the harness does.
    """
    if batch_size < 1:
        raise DietpruneError(f"batch size must be at least 1, got {batch_size}")
    fixed = []
    for r in requests:
        if not r.context or not r.continuations or any(not c for c in r.continuations):
            raise DietpruneError("internal: a scoring request needs a context and non-empty continuations")
        if r.scored is not None and (len(r.scored) != len(r.continuations) or any(
                not 1 <= n <= len(c) for n, c in zip(r.scored, r.continuations))):
            raise DietpruneError("internal: each continuation must score between 1 and all of its tokens")
        if max_length:
            keep = max_length + 1 - max(len(c) for c in r.continuations)
            if keep < 1:
                raise DietpruneError(f"a continuation is longer than the model's {max_length}-token window")
            if len(r.context) > keep:
                r = Request(r.context[-keep:], r.continuations, r.scored)
        fixed.append(r)
    packed = [_packs(model, r) for r in fixed]
    size = [_packed_width(r) if p else len(r.context) + max(len(c) for c in r.continuations)
            for r, p in zip(fixed, packed)]
    cost = [s if p else s * len(r.continuations) for s, r, p in zip(size, fixed, packed)]
    batches = []
    for kind in (True, False):
        order = sorted((i for i in range(len(fixed)) if packed[i] == kind), key=lambda i: (-size[i], fixed[i].context))
        batches += [(kind, b) for b in _batches(order, cost, batch_size)]
    out: list[list[Score] | None] = [None] * len(fixed)
    bar = progress(batches, total=len(batches), desc=desc) if show else batches
    for kind, idx in bar:
        run = _score_packed if kind else _score_batch
        for i, scores in zip(idx, run(model, [fixed[i] for i in idx], pad_id)):
            out[i] = scores
    return out  # type: ignore[return-value]


@torch.no_grad()
def full_logprobs_reference(model, context: list[int], continuation: list[int]) -> tuple[float, bool]:
    """The harness's way, for tests: full logits over ctx+cont, log-softmax everywhere."""
    ids = torch.tensor([context + continuation[:-1]], device=_device(model))
    logits = model(input_ids=ids).logits[0].float()
    logp = torch.log_softmax(logits, -1)[-len(continuation) :]
    tgt = torch.tensor(continuation, device=logp.device)
    return float(logp.gather(1, tgt[:, None]).sum()), bool((logp.argmax(-1) == tgt).all())
