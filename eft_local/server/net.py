"""``eft-local serve``'s connections: uvicorn with the limits a local server needs, and a
clean stop.

uvicorn alone keeps a connection that never finishes its request head open forever (no
timeout before the first request), accepts any number of connections, takes a request with
both Content-Length and Transfer-Encoding, and answers malformed HTTP in plain text. Here
every connection must send a whole request head within :attr:`HttpLimits.head_seconds`
(each later request too, once the previous response is out), idle keep-alive connections
close after :attr:`HttpLimits.keep_alive_seconds`, more than
:attr:`HttpLimits.max_connections` at once get 503 (with Retry-After), and every refusal is
OpenAI's JSON error body, followed by a lingering close (what the client still sends is read
and dropped, so the close is never a reset that destroys the answer). On Ctrl-C or SIGTERM
the server stops taking requests, stops the running one at its next token (503 to its
client) and answers the waiting ones 503, then closes: no traceback, exit status 0.

:class:`Protocol` subclasses uvicorn's h11 protocol class, which is not a public API:
pyproject.toml pins the uvicorn versions it was tested with, and
``tests/test_guard.py::test_uvicorns_private_protocol_still_has_what_net_py_uses`` names
what changed when a newer uvicorn no longer fits.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import socket
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import h11
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from eft_local.server.protocol import ApiError
from eft_local.server.worker import Worker

Log = Callable[[str], None]


@dataclass(frozen=True)
class HttpLimits:
    """What one client may hold of the server."""

    head_seconds: float = 10.0
    """A request line and headers must arrive within this, from the connection (or the
    previous response) on: slow or idle sockets cannot pile up."""
    keep_alive_seconds: int = 5
    """An idle keep-alive connection closes after this."""
    max_head_bytes: int = 16 << 10
    """Largest request line plus headers (h11's limit on an incomplete event)."""
    max_connections: int = 64
    """Connections open at once; one more gets 503 and is closed."""
    graceful_seconds: float = 5.0
    """How long the stop waits for responses to end after it stopped the work."""
    linger_seconds: float = 2.0
    """After a refusal (503, 408, 400) the connection reads and drops what the client still
    sends until it closes, at most this long: a close with unread data would be a reset,
    which can destroy the answer before the client reads it."""


def _raw_response(status: int, error: ApiError) -> bytes:
    """A whole HTTP/1.1 response with ``error``'s JSON body, closing the connection (a 503
    says when to retry)."""
    body = json.dumps(error.body()).encode()
    reason = {400: "Bad Request", 408: "Request Timeout", 503: "Service Unavailable"}[status]
    retry = "retry-after: 1\r\n" if status == 503 else ""
    head = (f"HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\n"
            f"content-length: {len(body)}\r\n{retry}connection: close\r\n\r\n")
    return head.encode() + body


class _StrictConnection(h11.Connection):
    """h11's server side that also refuses a request carrying both Content-Length and
    Transfer-Encoding (a request-smuggling shape RFC 9112 lets a server refuse), and tells
    the protocol when a request head has arrived."""

    def __init__(self, *args: Any, on_head: Callable[[], None], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.on_head = on_head
        self.refusal = "malformed HTTP request"

    def next_event(self) -> Any:
        try:
            event = super().next_event()
        except h11.RemoteProtocolError as exc:
            self.refusal = f"malformed HTTP request ({exc})"
            raise
        if isinstance(event, h11.Request):
            names = {name for name, _value in event.headers}
            if b"content-length" in names and b"transfer-encoding" in names:
                self.refusal = "a request may not carry both Content-Length and " \
                               "Transfer-Encoding"
                raise h11.RemoteProtocolError(self.refusal, 400)
            self.on_head()
        return event


class Protocol(H11Protocol):
    """uvicorn's h11 protocol with :class:`HttpLimits`; :func:`protocol_class` binds the
    limits and the log."""

    limits = HttpLimits()
    log: Log = staticmethod(print)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.conn = _StrictConnection(h11.SERVER, self.limits.max_head_bytes,
                                      on_head=self._head_arrived)
        self._head_timer: asyncio.TimerHandle | None = None
        self._refused = False

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        if len(self.connections) > self.limits.max_connections:
            self._refuse(503, ApiError(503, f"the server is busy: {self.limits.max_connections}"
                                       " connections are open; retry later",
                                       code="too_many_connections"), log=False)
            return
        self._arm()

    def data_received(self, data: bytes) -> None:
        if self._refused:
            return  # read and dropped: see HttpLimits.linger_seconds
        if self._head_timer is None and (self.cycle is None or self.cycle.response_complete):
            self._arm()  # a new request begins: its head must arrive in time
        super().data_received(data)

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def send_400_response(self, msg: str) -> None:
        self._refuse(400, ApiError(400, self.conn.refusal, code="bad_http_request"))

    def _arm(self) -> None:
        self._disarm()
        self._head_timer = self.loop.call_later(self.limits.head_seconds, self._head_late)

    def _disarm(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_arrived(self) -> None:
        self._disarm()

    def _head_late(self) -> None:
        self._head_timer = None
        if not self.transport.is_closing():
            self._refuse(408, ApiError(408, "no complete request head within "
                                       f"{self.limits.head_seconds:g} s",
                                       code="request_timeout"))

    def _refuse(self, status: int, error: ApiError, *, log: bool = True) -> None:
        """Answer ``error`` in JSON and close, whatever state the HTTP exchange is in: our
        side at once, the connection when the client closes its side (what it sends until
        then is dropped) or after :attr:`HttpLimits.linger_seconds`."""
        if log:
            where = f"{self.client[0]}:{self.client[1]} " if self.client else ""
            type(self).log(f"{where}{status} {error.message}")
        self._disarm()
        self._refused = True
        if self.transport.is_closing():
            return
        self.transport.write(_raw_response(status, error))
        if not self.transport.can_write_eof():
            self.transport.close()
            return
        self.transport.write_eof()
        self._head_timer = self.loop.call_later(self.limits.linger_seconds,
                                                self.transport.close)

    def shutdown(self) -> None:
        if self._refused:  # answered already: no HTTP exchange is left to end
            self._disarm()
            self.transport.close()
            return
        super().shutdown()

    def eof_received(self) -> bool | None:
        if self._refused:
            self.transport.close()
            return None
        return super().eof_received()


def protocol_class(limits: HttpLimits, log: Log) -> type[Protocol]:
    """:class:`Protocol` bound to ``limits`` and ``log`` (uvicorn makes the instances)."""
    return type("EftProtocol", (Protocol,), {"limits": limits, "log": staticmethod(log)})


class Server(uvicorn.Server):
    """uvicorn's server that stops the worker's jobs first when it is told to stop, and
    takes Ctrl-C and SIGTERM as an ordinary end (uvicorn would raise the signal again)."""

    def __init__(self, config: uvicorn.Config, runner: Worker, log: Log) -> None:
        super().__init__(config)
        self.runner, self.log = runner, log
        self.stopping = False

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        self.stopping = True
        self.log("stopping: new requests get 503, the running one ends at its next token")
        self.runner.close()
        await super().shutdown(sockets)

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        previous = {sig: signal.signal(sig, self.handle_exit)
                    for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)


def _quiet_when_stopping(app: Any, server: Server) -> Any:
    """``app``, whose tasks uvicorn cancels at the end of a stop end without a traceback
    (a client that stopped reading cannot hold the stop)."""

    async def wrapped(scope: Any, receive: Any, send: Any) -> None:
        try:
            await app(scope, receive, send)
        except asyncio.CancelledError:
            if not server.stopping:
                raise

    return wrapped


def make_server(app: Any, runner: Worker, *, log: Log,
                limits: HttpLimits | None = None) -> Server:
    """The uvicorn server of ``eft-local serve`` for ``app`` (run it on a bound socket)."""
    limits = limits or HttpLimits()
    config = uvicorn.Config(None, log_level="error", access_log=False, lifespan="off",
                            http=protocol_class(limits, log),
                            timeout_keep_alive=limits.keep_alive_seconds,
                            limit_concurrency=limits.max_connections + 1,
                            h11_max_incomplete_event_size=limits.max_head_bytes,
                            timeout_graceful_shutdown=max(1, round(limits.graceful_seconds)))
    server = Server(config, runner, log)
    config.app = _quiet_when_stopping(app, server)
    return server
