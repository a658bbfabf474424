"""HTTP to remote engines: keep-alive connections, one deadline per request, a size cap per
answer, bounded retries, one-line errors.

urllib3 (already installed with eft-local: gguf needs requests, which is built on it) keeps
one pool of connections per engine, so a decoding step costs one round trip on an open
connection. Every request that eft-local makes of an engine is idempotent (it reads rows or
a vocabulary; the engine's cache only changes what it can re-use), so a broken connection,
a refused one or an engine answering 502/503 is tried again after a short backoff, a
bounded number of times. A request has one deadline for everything (connecting, sending,
every read, the retries): an engine that stalls, or that drips its answer a byte at a time,
is reported when it passes, never waited for twice (a 504 is not retried either). An
answer may be no larger than what it can hold (the caller's ``limit``: rows x width x 4
bytes for the exact protocol, a JSON bound from K, the positions and the vocabulary for
the others): a larger ``Content-Length`` is refused before reading, a chunked body as soon
as it passes the cap. A request whose caller gave up (an abandoned step, Ctrl-C) has its
connection shut down at once (:meth:`Endpoint.abort`, :mod:`eft_local.remote.deadlines`).
Errors are one line naming the role, the URL and what happened, and never show a key: the
key comes from an environment variable, is sent only in the ``Authorization`` header, and
it and anything shaped like a key are hidden in messages.
"""

from __future__ import annotations

import http.client
import json
import os
import threading
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, fields
from typing import Any
from urllib.parse import urlsplit

import urllib3
from urllib3.exceptions import (
    ConnectTimeoutError,
    HTTPError,
    ProtocolError,
    ReadTimeoutError,
)

from eft_local.errors import EftError
from eft_local.presets import HIDDEN, hide_keys, public_url
from eft_local.remote import deadlines
from eft_local.text import printable

CONNECT_SECONDS = 5.0
"""How long a connection may take to open."""
TIMEOUT_SECONDS = 60.0
"""How long a request may take, all of it, when the model's ``timeout`` does not say."""
RETRIES = 3
"""Further attempts after a refused or broken connection or a 502/503 answer."""
BACKOFF_SECONDS = 0.25
"""The first wait before a retry; each later wait doubles it."""
RETRY_STATUS = (502, 503)
"""Answers asked again (504 is a timeout: never waited for twice)."""
POOL_CONNECTIONS = 12
"""Keep-alive connections per engine: at least the threads that use one endpoint at once
(:data:`eft_local.remote.vocab.DETOKENIZE_THREADS` reading a vocabulary)."""
ANSWER_HEADROOM = 4 << 20
"""Bytes an answer may hold beyond its content (JSON around it, an error message)."""
SMALL_ANSWER = 16 << 20
"""The size cap of an answer that has no bound of its own (model lists, ``/props``)."""
READ_CHUNK = 1 << 16
"""Bytes per read of a body of unknown length."""


class RemoteError(EftError):
    """A remote engine failed: one line naming the role, the URL and what happened.
    ``status`` is what eft-local's own server answers its client (502, or 504 for a
    timeout)."""

    def __init__(self, message: str, *, status: int = 502) -> None:
        super().__init__(message)
        self.status = status


@dataclass
class Traffic:
    """What one remote model cost on the network, cumulative."""

    requests: int = 0
    """Round trips that got an answer."""
    sent: int = 0
    """Request body bytes."""
    received: int = 0
    """Response body bytes."""
    seconds: float = 0.0
    """Wall-clock time from sending a request to holding its whole answer."""
    server_seconds: float = 0.0
    """Compute time that the engine reported for those requests (where it reports one)."""
    retries: int = 0
    resent: int = 0
    """Exact protocol: prefixes sent again because the engine no longer held them."""

    def copy(self) -> Traffic:
        """A snapshot."""
        return Traffic(**{f.name: getattr(self, f.name) for f in fields(self)})

    def add(self, other: Traffic, sign: int = 1) -> None:
        """Add (or with ``sign`` -1, subtract) ``other``'s counters."""
        for f in fields(self):
            setattr(self, f.name, getattr(self, f.name) + sign * getattr(other, f.name))

    def to_dict(self) -> dict[str, float]:
        """JSON-ready form."""
        return {f.name: getattr(self, f.name) for f in fields(self)}


@contextmanager
def metered(traffic: Traffic | None, sink: dict[str, Traffic], role: str) -> Iterator[None]:
    """Add what ``traffic`` (a remote model's counters; None: a local model) grows by in
    the block to ``sink[role]``."""
    if traffic is None:
        yield
        return
    before = traffic.copy()
    try:
        yield
    finally:
        used = sink.setdefault(role, Traffic())
        used.add(traffic)
        used.add(before, -1)


def traffic_summary(traffic: Mapping[str, Traffic], generated: int) -> dict[str, Any]:
    """Per remote role: its counters, and per request the milliseconds waited
    (``ms_per_request``) and the part that was not the engine computing
    (``network_ms_per_request``, where the engine reports its time); per generated token
    the milliseconds waited and the bytes both ways; generated tokens per request
    (speculative decoding verifies a block in one)."""
    per_token = max(1, generated)
    return {role: {**t.to_dict(),
                   "ms_per_request": 1e3 * t.seconds / max(1, t.requests),
                   "network_ms_per_request": 1e3 * max(0.0, t.seconds - t.server_seconds)
                   / max(1, t.requests),
                   "ms_per_token": 1e3 * t.seconds / per_token,
                   "bytes_per_token": (t.sent + t.received) / per_token,
                   "tokens_per_request": generated / max(1, t.requests)}
            for role, t in traffic.items()}


@dataclass(frozen=True)
class Answer:
    """An engine's answer: status, headers (lower-case names) and body."""

    status: int
    headers: dict[str, str]
    data: bytes

    def json(self) -> Any:
        """The body as JSON (None when it is not JSON)."""
        try:
            return json.loads(self.data)
        except (ValueError, UnicodeDecodeError):
            return None


class Endpoint:
    """One engine's base URL with its pool of keep-alive connections."""

    def __init__(self, url: str, *, role: str, api_key_env: str | None = None,
                 timeout: float | None = None) -> None:
        self.base = url.rstrip("/")
        self.role = role
        self.shown = public_url(url)
        self.timeout = timeout or TIMEOUT_SECONDS
        self._headers = {"Accept": "application/json, application/octet-stream",
                         "Accept-Encoding": "identity", "User-Agent": "eft-local"}
        self._key = ""
        if api_key_env:
            key = os.environ.get(api_key_env, "")
            if not key:
                raise EftError(f"{role}: the environment variable {api_key_env} (the key of "
                               f"{self.shown}) is not set")
            self._key = key
            self._headers["Authorization"] = f"Bearer {key}"
        parts = urlsplit(self.base)
        self._prefix = parts.path.rstrip("/")
        self._pool = deadlines.make_pool(parts.scheme.lower(), parts.hostname or "", parts.port,
                                     maxsize=POOL_CONNECTIONS)
        self._active: set[deadlines.Call] = set()
        self._lock = threading.Lock()
        self._closed = False
        self.traffic = Traffic()

    def fail(self, what: str, status: int = 502) -> RemoteError:
        """The one-line error for this engine (nothing that looks like a key shown)."""
        text = printable(what)
        if self._key:
            text = text.replace(self._key, HIDDEN)
        return RemoteError(hide_keys(f"remote {self.role} ({self.shown}): {text}"),
                           status=status)

    def request(self, method: str, path: str, *, payload: Any = None,
                timeout: float | None = None, ok: tuple[int, ...] = (200,),
                limit: int | None = None) -> Answer:
        """Send one request (``payload`` as JSON) within one deadline (``timeout``, else
        the endpoint's), retrying what can be retried; an answer over ``limit`` bytes
        (default :data:`SMALL_ANSWER`) is refused; statuses outside ``ok`` raise a
        :class:`RemoteError` with the engine's message."""
        body = None if payload is None else json.dumps(payload).encode()
        headers = dict(self._headers)
        if body is not None:
            headers["Content-Type"] = "application/json"
        wait = timeout or self.timeout
        call = deadlines.Call(time.monotonic() + wait)
        with self._lock:
            if self._closed:
                raise self.fail("the connection was closed")
            self._active.add(call)
        deadlines.WATCHDOG.watch(call)
        try:
            return self._attempts(call, method, path, body, headers, wait, ok,
                                  SMALL_ANSWER if limit is None else limit)
        finally:
            call.finish()
            with self._lock:
                self._active.discard(call)

    def _attempts(self, call: deadlines.Call, method: str, path: str, body: bytes | None,
                  headers: dict[str, str], wait: float, ok: tuple[int, ...], limit: int
                  ) -> Answer:
        for attempt in range(RETRIES + 1):
            started = time.perf_counter()
            try:
                answer = self._exchange(call, method, path, body, headers, wait, limit)
            except _Broken as broken:
                if attempt < RETRIES and self._backoff(call, attempt):
                    continue
                if call.why is not None:
                    raise self._ended(call, wait) from None
                tries = f"after {attempt + 1} attempt{'s' if attempt else ''}"
                raise self.fail(f"{_connection_problem(broken.cause)} ({tries})") from None
            self.traffic.requests += 1
            self.traffic.sent += len(body or b"")
            self.traffic.received += len(answer.data)
            self.traffic.seconds += time.perf_counter() - started
            if answer.status in ok:
                return answer
            if answer.status in RETRY_STATUS and attempt < RETRIES and self._backoff(
                    call, attempt, answer.headers.get("retry-after")):
                continue
            if call.why is not None:
                raise self._ended(call, wait)
            raise self.fail(_status_problem(answer), status=504 if answer.status == 504
                            else 502)
        raise AssertionError("unreachable")

    def _exchange(self, call: deadlines.Call, method: str, path: str, body: bytes | None,
                  headers: dict[str, str], wait: float, limit: int) -> Answer:
        """One attempt: the answer, or :class:`_Broken` (worth another attempt); a timeout,
        an abort or an oversized answer raise their :class:`RemoteError`."""
        left = call.remaining()
        if call.why is not None or left <= 0:
            call.end(deadlines.TIMEOUT)
            raise self._ended(call, wait)
        try:
            with deadlines.serving(call):
                resp = self._pool.urlopen(
                    method, self._prefix + path, body=body, headers=headers, redirect=False,
                    retries=False, preload_content=False, decode_content=False,
                    timeout=urllib3.Timeout(connect=min(CONNECT_SECONDS, left), read=left))
        except ReadTimeoutError:
            raise self._ended(call, wait) from None
        except (HTTPError, http.client.HTTPException, OSError, ValueError) as exc:
            if call.why is not None:
                raise self._ended(call, wait) from None
            raise _Broken(exc) from None
        try:
            data = self._body(resp, path, limit)
        except RemoteError:
            _discard(resp)
            raise
        except (HTTPError, http.client.HTTPException, OSError, ValueError) as exc:
            _discard(resp)
            if call.why is not None or isinstance(exc, ReadTimeoutError):
                raise self._ended(call, wait) from None
            raise _Broken(exc) from None
        resp.release_conn()
        return Answer(resp.status, {k.lower(): v for k, v in resp.headers.items()}, data)

    def _body(self, resp: Any, path: str, limit: int) -> bytes:
        """The whole body, at most ``limit`` bytes (checked on ``Content-Length`` before
        reading, and while reading one of unknown length)."""
        coding = str(resp.headers.get("content-encoding", "identity")).strip().lower()
        if coding not in ("", "identity"):
            raise self.fail(f"{path} answered a compressed body (Content-Encoding: "
                            f"{coding[:40]}), which was not asked for")
        length = resp.headers.get("content-length")
        if length is not None and length.strip().isdigit():
            if int(length) > limit:
                raise self.fail(f"{path} answered {int(length)} bytes (Content-Length), more "
                                f"than the {limit} its answer can hold")
            return resp.read()
        parts, size = [], 0
        while chunk := resp.read(READ_CHUNK):
            size += len(chunk)
            if size > limit:
                raise self.fail(f"{path} answered more than the {limit} bytes its answer can "
                                "hold")
            parts.append(chunk)
        return b"".join(parts)

    def _ended(self, call: deadlines.Call, wait: float) -> RemoteError:
        """The error of a call that its deadline or its caller ended."""
        if call.why == deadlines.ABANDONED:
            return self.fail("the request was abandoned")
        if call.why == deadlines.CLOSED:
            return self.fail("the connection was closed")
        return self.fail(f"no answer within {wait:g} s (timeout; raise it with timeout = "
                         "SECONDS, or #timeout=SECONDS after the URL)", status=504)

    def json(self, method: str, path: str, payload: Any = None, *,
             timeout: float | None = None, limit: int | None = None) -> Any:
        """A request whose answer must be a JSON object or list."""
        answer = self.request(method, path, payload=payload, timeout=timeout, limit=limit)
        data = answer.json()
        if not isinstance(data, (dict, list)):
            raise self.fail(f"{path} answered something that is not JSON "
                            f"({_snippet(answer.data)})")
        return data

    def _backoff(self, call: deadlines.Call, attempt: int, retry_after: str | None = None
                 ) -> bool:
        """Wait before another attempt; False (no wait) when the deadline would pass
        first or the call was ended."""
        wait = BACKOFF_SECONDS * 2 ** attempt
        if retry_after and retry_after.strip().isdigit():
            wait = max(wait, min(float(retry_after), 4 * BACKOFF_SECONDS * 2 ** RETRIES))
        if call.why is not None or wait >= call.remaining():
            return False
        self.traffic.retries += 1
        return not call.ended.wait(wait)

    def abort(self) -> None:
        """End the requests under way (their caller gave up on them): their connections
        are shut down, their threads return at once with an error nobody reads."""
        with self._lock:
            calls = list(self._active)
        for call in calls:
            call.end(deadlines.ABANDONED)

    def close(self) -> None:
        """End the requests under way and close the pooled connections; later requests
        fail at once."""
        with self._lock:
            self._closed = True
            calls = list(self._active)
        for call in calls:
            call.end(deadlines.CLOSED)
        self._pool.close()


def _discard(resp: Any) -> None:
    """Close an answer's connection (its body was not read to the end) and return it to
    the pool, which opens it again when next used."""
    resp.close()
    resp.release_conn()


class _Broken(Exception):
    """An attempt that broke before a whole answer came (worth another)."""

    def __init__(self, cause: BaseException) -> None:
        super().__init__(str(cause))
        self.cause = cause


def _connection_problem(exc: BaseException) -> str:
    reason = getattr(exc, "reason", None) or exc
    text = str(reason)
    if "refused" in text.lower():  # before timeouts: NewConnectionError is one of them
        return "connection refused (is the engine running?)"
    if isinstance(reason, ConnectTimeoutError) or "timed out" in text:
        return f"could not connect within {CONNECT_SECONDS:g} s"
    if isinstance(reason, ProtocolError) or "reset" in text.lower() or "aborted" in text:
        return "the connection broke before an answer came"
    if "Name or service not known" in text or "nodename" in text or "resolution" in text:
        return "the host name does not resolve"
    return f"the connection failed ({type(reason).__name__})"


def _status_problem(answer: Answer) -> str:
    data = answer.json()
    message = None
    if isinstance(data, dict):
        err = data.get("error", data.get("detail"))
        if isinstance(err, dict):
            message = err.get("message")
        elif isinstance(err, str):
            message = err
        message = message or data.get("message")
    message = str(message) if message else _snippet(answer.data)
    hint = " (the key: set the environment variable named by api_key_env)" if (
        answer.status in (401, 403)) else ""
    return f"answered HTTP {answer.status}: {message[:300]}{hint}"


def _snippet(data: bytes) -> str:
    text = " ".join(data[:200].decode("utf-8", "replace").split())
    return text or "an empty body"
