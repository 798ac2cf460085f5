"""The distillation losses of ``dietprune heal``, and the teacher's top-k cache.

* ``chunked_kl``: KL(p_teacher || p_student) over the full vocabulary from the two models' final
  hidden states, a chunk of rows at a time (Gemma's 262k vocabulary never holds a
  [tokens x vocab] float32 tensor for a whole batch); its gradient with respect to the student's
  logits is written directly, ``softmax(z_s) - p_t``.
* ``topk_teacher`` + ``topk_kl``: the same loss from the teacher's ``k`` most likely tokens per
  position, the rest of its probability mass kept as one "tail" bucket:
  ``sum_K p_i log(p_i / q_i) + p_tail log(p_tail / q_tail)``. Its gradient is ``q - r``, where the
  target ``r`` is the teacher's ``p`` on the top k and the teacher's tail mass spread over the other
  tokens in proportion to the student's own probabilities. A student identical to its teacher has
  exactly zero loss and zero gradient in both.
* ``TopKCache``: the top-k log-probabilities of every training window, written the first time the
  window is seen and read back in later epochs, so the teacher runs once per window instead of once
  per step (numpy memory maps in a folder of the heal state; safe across resumes and processes on
  one machine: each process fills its own windows).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import torch

CACHE_FILES = ("meta.json", "logp.npy", "index.npy", "filled.npy")


def logits(head, hidden, cap, temperature, amp: bool = False) -> torch.Tensor:
    """Float32 logits of `head` on `hidden`, soft-capped (`cap`) and divided by the temperature."""
    if amp:  # the head's matmul in bfloat16 (float32 accumulation); softmax and KL stay float32
        with torch.autocast(hidden.device.type, dtype=torch.bfloat16):
            z = head(hidden)
        z = z.float()
    else:
        z = head(hidden).float()
    if cap:
        z = torch.tanh(z / cap) * cap
    return z / temperature if temperature != 1.0 else z


def chunked_kl(student_hidden, teacher_hidden, student_head, teacher_head, cap_s=None, cap_t=None,
               temperature: float = 1.0, chunk_rows: int = 1024, scale: float | None = None,
               amp: bool = False) -> tuple[float, int]:
    """Sum over rows of KL(p_teacher || p_student) from final hidden states ([N, d_s], [N, d_t]).

    With ``scale`` (a float), the gradient of ``scale * sum`` is accumulated into
    ``student_hidden.grad`` (it must be a leaf that requires grad) and into the student head's
    parameters, one chunk of rows at a time. ``amp``: the heads' matmuls under bfloat16 autocast.
    Returns (sum of KL, rows).
    """
    total = 0.0
    n = student_hidden.shape[0]
    for start in range(0, n, chunk_rows):
        hs = student_hidden[start:start + chunk_rows]
        with torch.no_grad():
            lt = logits(teacher_head, teacher_hidden[start:start + chunk_rows], cap_t, temperature, amp).log_softmax(-1)
        with torch.enable_grad() if scale is not None else torch.no_grad():
            zs = logits(student_head, hs, cap_s, temperature, amp)
        with torch.no_grad():
            ls = zs.detach().log_softmax(-1)
            pt = lt.exp()
            total += float((pt * (lt - ls)).sum(dtype=torch.float64))
            if scale is not None:
                grad = ls.exp_().sub_(pt).mul_(scale)  # d KL / d z_s = softmax(z_s) - p_t
        if scale is not None:
            zs.backward(grad)
        del lt, zs, ls, pt
    return total, n


@torch.no_grad()
def topk_teacher(teacher_hidden, teacher_head, k: int, cap_t=None, temperature: float = 1.0,
                 chunk_rows: int = 1024, amp: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """The teacher's k largest log-probabilities per row ([N, k] float32) and their token ids ([N, k] int64)."""
    vals, idx = [], []
    for start in range(0, teacher_hidden.shape[0], chunk_rows):
        lt = logits(teacher_head, teacher_hidden[start:start + chunk_rows], cap_t, temperature, amp).log_softmax(-1)
        v, i = lt.topk(k, dim=-1)
        vals.append(v)
        idx.append(i)
        del lt
    return torch.cat(vals), torch.cat(idx)


def topk_kl(student_hidden, teacher_logp, teacher_index, student_head, cap_s=None, temperature: float = 1.0,
            chunk_rows: int = 1024, scale: float | None = None, amp: bool = False) -> tuple[float, int]:
    """Sum over rows of the top-k KL (teacher's top k + one tail bucket) against the student.

    `teacher_logp` / `teacher_index`: [N, k] from ``topk_teacher`` (at the same temperature).
    Gradient as in ``chunked_kl`` (``scale``). Returns (sum of KL, rows)."""
    total = 0.0
    n = student_hidden.shape[0]
    tiny = torch.finfo(torch.float32).tiny
    for start in range(0, n, chunk_rows):
        hs = student_hidden[start:start + chunk_rows]
        lp = teacher_logp[start:start + chunk_rows].to(hs.device, torch.float32)
        ix = teacher_index[start:start + chunk_rows].to(hs.device, torch.long)
        with torch.enable_grad() if scale is not None else torch.no_grad():
            zs = logits(student_head, hs, cap_s, temperature, amp)
        with torch.no_grad():
            ls = zs.detach().log_softmax(-1)
            lq = ls.gather(1, ix)
            p = lp.exp()
            p_tail = (1.0 - p.sum(-1)).clamp_min(0.0)
            q = ls.exp_()  # ls is not needed past here
            q_k = q.gather(1, ix)
            q_tail = (1.0 - q_k.sum(-1)).clamp_min(tiny)
            tail = torch.where(p_tail > 0, p_tail * (torch.log(p_tail.clamp_min(tiny)) - torch.log(q_tail)),
                               torch.zeros_like(p_tail))
            total += float((p * (lp - lq)).sum(dtype=torch.float64) + tail.sum(dtype=torch.float64))
            if scale is not None:
                # q - r: r = p on the top k, p_tail * q / q_tail elsewhere
                grad = q.mul_((1.0 - p_tail / q_tail)[:, None])
                grad.scatter_(1, ix, q_k - p)
                grad.mul_(scale)
        if scale is not None:
            zs.backward(grad)
        del zs, q
    return total, n


def windows_digest(windows: list[list[int]]) -> str:
    h = hashlib.sha256()
    for w in windows:
        h.update(np.asarray(w, dtype=np.int64).tobytes())
        h.update(b"|")
    return h.hexdigest()[:16]


class TopKCache:
    """The teacher's top-k log-probabilities for `windows` windows of `seq_len` positions.

    ``key``: what the cached numbers depend on (teacher, windows, k, temperature, precision); a
    folder holding another key is rebuilt. ``create`` (the main process only): make or rebuild the
    files; the other processes open them after a barrier."""

    def __init__(self, folder, windows: int, seq_len: int, k: int, key: dict, create: bool):
        self.folder = Path(folder)
        self.k, self.seq_len, self.windows = k, seq_len, windows
        meta = {"key": key, "windows": windows, "seq_len": seq_len, "k": k}
        if create:
            old = self._read_meta()
            if old != meta:
                self.remove()
                self.folder.mkdir(parents=True, exist_ok=True)
                from numpy.lib.format import open_memmap

                open_memmap(self.folder / "logp.npy", "w+", np.float32, (windows, seq_len, k)).flush()
                open_memmap(self.folder / "index.npy", "w+", np.int32, (windows, seq_len, k)).flush()
                open_memmap(self.folder / "filled.npy", "w+", np.uint8, (windows,)).flush()
                tmp = self.folder / f".meta.json.tmp-{os.getpid()}"
                tmp.write_text(json.dumps(meta, sort_keys=True))
                os.replace(tmp, self.folder / "meta.json")
        self._meta = meta
        self._open()

    def _read_meta(self):
        try:
            return json.loads((self.folder / "meta.json").read_text())
        except (OSError, ValueError):
            return None

    def _open(self):
        self.logp = np.load(self.folder / "logp.npy", mmap_mode="r+")
        self.index = np.load(self.folder / "index.npy", mmap_mode="r+")
        self.filled = np.load(self.folder / "filled.npy", mmap_mode="r+")

    def missing(self, ids: list[int]) -> list[int]:
        return [i for i in ids if not self.filled[i]]

    def put(self, ids: list[int], logp: torch.Tensor, index: torch.Tensor) -> None:
        """Store [len(ids) * seq_len, k] rows (window by window, in the order of `ids`)."""
        lp = logp.detach().float().cpu().reshape(len(ids), self.seq_len, self.k).numpy()
        ix = index.detach().cpu().to(torch.int32).reshape(len(ids), self.seq_len, self.k).numpy()
        for j, w in enumerate(ids):
            self.logp[w] = lp[j]
            self.index[w] = ix[j]
            self.filled[w] = 1  # after the data: a window marked filled is complete

    def get(self, ids: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """[len(ids) * seq_len, k] log-probabilities and token ids of filled windows."""
        lp = torch.from_numpy(np.stack([self.logp[w] for w in ids])).reshape(-1, self.k)
        ix = torch.from_numpy(np.stack([self.index[w] for w in ids]).astype(np.int64)).reshape(-1, self.k)
        return lp, ix

    def mass(self) -> float | None:
        """Mean teacher probability inside the top k over the filled windows (1.0: the cache is exact)."""
        done = np.flatnonzero(self.filled)
        if len(done) == 0:
            return None
        tot = 0.0
        for w in done:
            tot += float(np.exp(self.logp[w].astype(np.float64)).sum(-1).mean())
        return tot / len(done)

    def flush(self) -> None:
        for a in (self.logp, self.index, self.filled):
            a.flush()

    def remove(self) -> None:
        """Delete the cache's own files, then the folder if nothing else is in it."""
        for name in CACHE_FILES:
            f = self.folder / name
            if f.is_file():
                f.unlink()
        try:
            self.folder.rmdir()
        except OSError:
            pass
