"""SIGTERM and SIGHUP end a run the way Ctrl-C does, so the same clean-up runs.

``timeout``, job schedulers and a closed terminal send SIGTERM or SIGHUP, whose default action
kills the process on the spot: a half-written temporary checkpoint folder would stay behind.
Within :func:`terminate_as_interrupt` these signals raise :class:`Terminated`, a
``KeyboardInterrupt``, so every ``finally`` / ``except BaseException`` clean-up that handles
Ctrl-C (temporary folders, scratch files, partial files) handles them too. Further signals are
ignored while that clean-up runs. :func:`deferred` holds signals back over a few steps that
must not be split (renaming a finished checkpoint into place).
"""

from __future__ import annotations

import contextlib
import signal
import threading

TERMINATING = tuple(s for s in (getattr(signal, "SIGTERM", None), getattr(signal, "SIGHUP", None)) if s)


class Terminated(KeyboardInterrupt):
    """The process received SIGTERM or SIGHUP; `signum` says which."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def _main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


@contextlib.contextmanager
def terminate_as_interrupt(signals=TERMINATING):
    """Turn `signals` into :class:`Terminated` for the duration of the block (main thread only)."""
    if not _main_thread():
        yield
        return
    raised = []

    def handler(signum, frame):
        if raised:  # already ending: let the clean-up finish
            return
        raised.append(signum)
        raise Terminated(signum)

    previous = {}
    try:
        for s in signals:
            previous[s] = signal.signal(s, handler)
        yield
    finally:
        for s, old in previous.items():
            signal.signal(s, old)


@contextlib.contextmanager
def deferred(signals=(signal.SIGINT,) + TERMINATING):
    """Hold `signals` back until the block ends, then deliver them to the handlers in place before.

    Python runs signal handlers in the main thread whichever thread the kernel picked, so the
    handlers are swapped for ones that only take note (a thread signal mask would not do: any
    other thread, e.g. a tokenizer's, could still take the signal).
    """
    if not _main_thread():
        yield
        return
    pending: list[int] = []

    def note(signum, frame):
        if signum not in pending:
            pending.append(signum)

    previous = {}
    try:
        for s in signals:
            previous[s] = signal.signal(s, note)
        yield
    finally:
        for s, old in previous.items():
            signal.signal(s, old)
        for s in pending:
            signal.raise_signal(s)
