"""What lets a decode step run models in concurrent lanes safely.

The engine runs a stage's lanes in worker threads (ctypes releases the GIL around
llama.cpp). When one lane fails or Ctrl-C arrives, the caller must not roll caches back while
another lane is still inside a model's decode: :class:`Gate` lets decodes start until it is
closed, and closing waits for those inside.
"""

from __future__ import annotations

import threading

from eft_local.interrupts import STOPS, Terminated


class LaneStopped(Exception):
    """A lane skipped its remaining models because another lane failed or was interrupted."""


class Gate:
    """Lets lane workers into a model's decode until it is closed; :meth:`close` then waits
    until no worker is inside one, so the caller may roll back caches."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._inside = 0
        self._closed = False

    def enter(self) -> bool:
        """Start a decode (False once closed: the lane stops)."""
        with self._cond:
            if self._closed:
                return False
            self._inside += 1
            return True

    def leave(self) -> None:
        """A decode has finished."""
        with self._cond:
            self._inside -= 1
            self._cond.notify_all()

    def close(self) -> None:
        """Let no more decodes start and wait for those inside, even through further Ctrl-C
        presses or SIGTERM (each lane is inside at most one decode, so this is short)."""
        term: Terminated | None = None
        while True:
            try:
                with self._cond:
                    self._closed = True
                    while self._inside:
                        self._cond.wait()
                break
            except STOPS as exc:  # a SIGTERM meanwhile wins over the Ctrl-C being handled
                term = exc if isinstance(exc, Terminated) else term
        if term is not None:
            raise term
