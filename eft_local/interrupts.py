"""Ctrl-C and SIGTERM that always reach the program, even during a long llama.cpp call.

Python runs signal handlers in the main thread, between two bytecodes. While the main
thread is inside a C function the handler waits; when that function calls back into Python
(llama.cpp's log callback), the handler runs inside the callback, and an exception raised
there is printed by ctypes as "Exception ignored" and dropped: the Ctrl-C is lost. Hence:

- :func:`interruptible` runs a long call in a helper thread while the main thread waits,
  where an interrupt can always be raised; the call is asked to stop (:class:`Stop`) and the
  main thread waits until it has returned or parked (it will never touch a file again)
  before the interrupt goes on, so cleanups see a quiet call;
- :func:`handled` (the CLI) turns SIGTERM into :class:`Terminated` in the main thread, and
  never raises inside a function marked :func:`foreign_callback`: a signal that arrives
  there is delivered again a moment later.
"""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from types import CodeType, FrameType
from typing import Any, TypeVar

from eft_local.errors import Cancelled

T = TypeVar("T")

REDELIVER_SECONDS = 0.02
"""How soon a signal that arrived inside a callback from C is delivered again."""


class Terminated(BaseException):
    """SIGTERM arrived: clean up and end (the CLI exits with status 143)."""


STOPS: tuple[type[BaseException], ...] = (KeyboardInterrupt, Terminated)
"""What an interrupt raises."""

_callback_codes: set[CodeType] = set()


def foreign_callback(func: Callable[..., T]) -> Callable[..., T]:
    """Mark ``func`` as one that C code calls (a ctypes callback): no interrupt is ever
    raised inside it; :func:`handled` delivers it again after the callback returned."""
    _callback_codes.add(func.__code__)
    return func


def _inside_callback(frame: FrameType | None) -> bool:
    while frame is not None:
        if frame.f_code in _callback_codes:
            return True
        frame = frame.f_back
    return False


def _handler(signum: int, frame: FrameType | None) -> None:
    if _inside_callback(frame):
        timer = threading.Timer(REDELIVER_SECONDS, os.kill, (os.getpid(), signum))
        timer.daemon = True
        timer.start()
        return
    if signum == signal.SIGTERM:
        raise Terminated
    raise KeyboardInterrupt


@contextmanager
def handled() -> Iterator[None]:
    """Within the block (main thread only; elsewhere it does nothing): Ctrl-C raises
    KeyboardInterrupt and SIGTERM :class:`Terminated`, never inside a callback from C. The
    previous handlers come back afterwards."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.signal(sig, _handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


class Stop:
    """What a long call checks to stop early: :attr:`requested` is set when an interrupt
    arrived. A call that cannot return early sets :attr:`parkable`; then a point of it that
    may stay forever (llama.cpp's log callback) calls :meth:`park` once stop is requested."""

    def __init__(self) -> None:
        self.requested = threading.Event()
        self.parkable = False
        self.settled = threading.Event()
        """Set when the call returned or parked: it will do nothing more."""

    def park(self) -> None:
        """Stay here for good (the process is ending, or the caller gave up on this call)."""
        self.settled.set()
        threading.Event().wait()


_calls = threading.local()


def current_stop() -> Stop | None:
    """The :class:`Stop` of the interruptible call this thread runs (None outside one)."""
    return getattr(_calls, "stop", None)


def interruptible(work: Callable[[Stop], T], *, discard: Callable[[T], Any] | None = None,
                  name: str = "llama.cpp") -> T:
    """``work(stop)``, run so that Ctrl-C and SIGTERM reach the caller during it.

    In the main thread, ``work`` runs in a helper thread while this one waits; on an
    interrupt, ``stop.requested`` is set, this thread waits (through further interrupts)
    until ``work`` returned or parked, frees a result it still made with ``discard``, and
    raises the interrupt (SIGTERM wins over Ctrl-C). Elsewhere ``work`` runs in this thread
    (signals reach only the main thread)."""
    stop = Stop()
    if threading.current_thread() is not threading.main_thread():
        return work(stop)
    box: dict[str, Any] = {}

    def target() -> None:
        _calls.stop = stop
        try:
            box["value"] = work(stop)
        except BaseException as exc:  # noqa: BLE001 - handed to the waiting thread
            box["error"] = exc
        finally:
            _calls.stop = None
            stop.settled.set()

    thread = threading.Thread(target=target, name=name, daemon=True)
    thread.start()
    try:
        stop.settled.wait()
    except BaseException as first:
        stop.requested.set()
        later = _wait_through_interrupts(stop.settled)
        if "value" in box and discard is not None:
            discard(box.pop("value"))
        if isinstance(later, Terminated) and not isinstance(first, Terminated):
            raise later from None
        raise
    if "error" in box:
        raise box.pop("error")
    return box.pop("value")


def _wait_through_interrupts(event: threading.Event) -> BaseException | None:
    """Wait for ``event`` through further interrupts; the strongest one that came."""
    later: BaseException | None = None
    while True:
        try:
            event.wait()
            return later
        except STOPS as exc:
            if later is None or isinstance(exc, Terminated):
                later = exc


_cancels = threading.local()


@contextmanager
def cancel_on(event: threading.Event) -> Iterator[None]:
    """Within the block, long work in this thread that calls :func:`check_cancelled` (a
    grammar asked about many tokens) stops with :class:`~eft_local.errors.Cancelled` once
    ``event`` is set: the server's worker runs each job so."""
    saved = getattr(_cancels, "event", None)
    _cancels.event = event
    try:
        yield
    finally:
        _cancels.event = saved


def check_cancelled() -> None:
    """Raise :class:`~eft_local.errors.Cancelled` when this thread's work was cancelled."""
    event = getattr(_cancels, "event", None)
    if event is not None and event.is_set():
        raise Cancelled("stopped: the request was cancelled")
