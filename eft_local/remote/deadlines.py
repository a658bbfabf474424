"""Requests to remote engines that another thread can end: a deadline, an abort.

A socket timeout bounds one read, not an answer: an engine that sends a byte every few
seconds never trips it. So each request is a :class:`Call` with one deadline for its
connection and all its reads, and the connection it runs on: when the deadline passes (the
:class:`Watchdog`'s one daemon thread watches every call) or its caller gives up on it (an
abandoned step, Ctrl-C, a closed endpoint), the call's socket is shut down, and the read
blocked on it returns at once. The connections come from urllib3 pools whose connection
class tells the call it serves which connection it is on (:func:`make_pool`); a connection is
owned by its call from the moment it sends until it is back in the pool, so a late end
never touches a connection that another request has since picked up.
"""

from __future__ import annotations

import heapq
import itertools
import os
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from typing import Any

from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool

TIMEOUT = "timeout"
ABANDONED = "abandoned"
CLOSED = "closed"

_OWNERSHIP = threading.Lock()
"""Guards which call owns which connection, and each call's end."""
_local = threading.local()


class Call:
    """One request under way (see the module docstring)."""

    __slots__ = ("conn", "deadline", "done", "ended", "why")

    def __init__(self, deadline: float) -> None:
        self.deadline = deadline
        """On :func:`time.monotonic`'s clock."""
        self.conn: Any = None
        self.why: str | None = None
        """Why it was ended (:data:`TIMEOUT`, :data:`ABANDONED`, :data:`CLOSED`), or None."""
        self.done = False
        self.ended = threading.Event()
        """Set when it is ended: a retry's wait stops at once."""

    def end(self, why: str) -> None:
        """End the call (its connection is shut down); nothing once it is done or ended."""
        with _OWNERSHIP:
            if self.done or self.why is not None:
                return
            self.why = why
            conn = self.conn
            if conn is not None and getattr(conn, "eft_call", None) is self:
                _shut(conn)
        self.ended.set()

    def finish(self) -> None:
        """The request returned: a later end does nothing."""
        with _OWNERSHIP:
            self.done = True
            self.conn = None

    def remaining(self) -> float:
        """Seconds left before the deadline (<= 0: passed)."""
        return self.deadline - time.monotonic()


@contextmanager
def serving(call: Call) -> Iterator[None]:
    """Within the block, the connections this thread sends on serve ``call``."""
    _local.call = call
    try:
        yield
    finally:
        _local.call = None


def _claim(conn: Any) -> None:
    call = getattr(_local, "call", None)
    if call is None:
        return
    with _OWNERSHIP:
        conn.eft_call = call
        call.conn = conn
        if call.why is not None:  # ended before it had a connection
            _shut(conn)


def _disown(conn: Any) -> None:
    with _OWNERSHIP:
        conn.eft_call = None


def _shut(conn: Any) -> None:
    """Shut the connection's socket down for both directions: a read blocked on it returns
    (the socket class's own shutdown: an SSL socket's would drop its state under the
    reader's feet)."""
    sock = getattr(conn, "sock", None)
    if isinstance(sock, socket.socket):
        with suppress(OSError):
            socket.socket.shutdown(sock, socket.SHUT_RDWR)


class _Connection(HTTPConnection):
    eft_call: Call | None = None

    def connect(self) -> None:
        super().connect()
        _claim(self)

    def request(self, *args: Any, **kwargs: Any) -> None:  # type: ignore[override]
        _claim(self)
        super().request(*args, **kwargs)


class _SecureConnection(HTTPSConnection):
    eft_call: Call | None = None

    def connect(self) -> None:
        super().connect()
        _claim(self)

    def request(self, *args: Any, **kwargs: Any) -> None:  # type: ignore[override]
        _claim(self)
        super().request(*args, **kwargs)


class _PlainPool(HTTPConnectionPool):
    """``_put_conn`` is where urllib3 (1.26 to 2.x) takes a connection back: from then on
    it belongs to no call."""

    ConnectionCls = _Connection

    def _put_conn(self, conn: Any) -> None:
        if conn is not None:
            _disown(conn)
        super()._put_conn(conn)


class _SecurePool(HTTPSConnectionPool):
    ConnectionCls = _SecureConnection

    def _put_conn(self, conn: Any) -> None:
        if conn is not None:
            _disown(conn)
        super()._put_conn(conn)


def make_pool(scheme: str, host: str, port: int | None, *, maxsize: int
              ) -> HTTPConnectionPool:
    """A keep-alive pool of up to ``maxsize`` connections to one engine whose requests can
    be ended (see the module docstring); urllib3 retries nothing itself."""
    cls = _SecurePool if scheme == "https" else _PlainPool
    return cls(host, port, maxsize=maxsize, block=False, retries=False)


class Watchdog:
    """One daemon thread that ends each call whose deadline passed."""

    PRUNE_AT = 4096
    """Finished calls are dropped from the heap when it grows past this."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._heap: list[tuple[float, int, Call]] = []
        self._order = itertools.count()
        self._thread: threading.Thread | None = None
        self._prune_at = self.PRUNE_AT

    def watch(self, call: Call) -> None:
        """End ``call`` with :data:`TIMEOUT` at its deadline unless it finished first."""
        with self._cond:
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="eft-remote-watchdog",
                                                daemon=True)
                self._thread.start()
            heapq.heappush(self._heap, (call.deadline, next(self._order), call))
            if len(self._heap) > self._prune_at:
                self._heap = [e for e in self._heap if not e[2].done]
                heapq.heapify(self._heap)
                self._prune_at = max(self.PRUNE_AT, 2 * len(self._heap))
            if self._heap[0][2] is call:
                self._cond.notify()

    def _run(self) -> None:
        while True:
            with self._cond:
                due = self._next_due()
            due.end(TIMEOUT)

    def _next_due(self) -> Call:
        while True:
            heap = self._heap
            while heap and heap[0][2].done:
                heapq.heappop(heap)
            now = time.monotonic()
            if heap and heap[0][0] <= now:
                return heapq.heappop(heap)[2]
            self._cond.wait(heap[0][0] - now if heap else None)

    def _forget_thread(self) -> None:
        """In a forked child: the thread did not come along."""
        self._cond = threading.Condition()
        self._heap = []
        self._thread = None


WATCHDOG = Watchdog()
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=WATCHDOG._forget_thread)
