"""HTTP to remote engines: keep-alive connections, timeouts, bounded retries, one-line errors.

urllib3 (already installed with eft-local: gguf needs requests, which is built on it) keeps
one pool of connections per engine, so a decoding step costs one round trip on an open
connection. Every request that eft-local makes of an engine is idempotent (it reads rows or
a vocabulary; the engine's cache only changes what it can re-use), so a broken connection,
a refused one or an engine answering 502/503/504 is tried again after a short backoff, a
bounded number of times. A read timeout is not retried: a stalled engine is reported, not
waited for twice. Errors are one line naming the role, the URL (never a user name,
password or key) and what happened. Keys come from an environment variable and are sent
only in the ``Authorization`` header.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, fields
from typing import Any

import urllib3
from urllib3.exceptions import (
    ConnectTimeoutError,
    HTTPError,
    MaxRetryError,
    NewConnectionError,
    ProtocolError,
    ReadTimeoutError,
)

from eft_local.config import public_url
from eft_local.errors import EftError
from eft_local.text import printable

CONNECT_SECONDS = 5.0
"""How long a connection may take to open."""
TIMEOUT_SECONDS = 60.0
"""How long an answer may take when the model's ``timeout`` does not say."""
RETRIES = 3
"""Further attempts after a refused or broken connection or a 502/503/504 answer."""
BACKOFF_SECONDS = 0.25
"""The first wait before a retry; each later wait doubles it."""
RETRY_STATUS = (502, 503, 504)


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
                         "User-Agent": "eft-local"}
        if api_key_env:
            key = os.environ.get(api_key_env, "")
            if not key:
                raise EftError(f"{role}: the environment variable {api_key_env} (the key of "
                               f"{self.shown}) is not set")
            self._headers["Authorization"] = f"Bearer {key}"
        self._pool = urllib3.PoolManager(num_pools=2, maxsize=4, block=False, retries=False)
        self.traffic = Traffic()

    def fail(self, what: str, status: int = 502) -> RemoteError:
        """The one-line error for this engine."""
        return RemoteError(f"remote {self.role} ({self.shown}): {printable(what)}",
                           status=status)

    def request(self, method: str, path: str, *, payload: Any = None,
                timeout: float | None = None, ok: tuple[int, ...] = (200,)) -> Answer:
        """Send one request (``payload`` as JSON), retrying what can be retried; statuses
        outside ``ok`` raise a :class:`RemoteError` with the engine's message."""
        body = None if payload is None else json.dumps(payload).encode()
        headers = dict(self._headers)
        if body is not None:
            headers["Content-Type"] = "application/json"
        wait = timeout or self.timeout
        for attempt in range(RETRIES + 1):
            started = time.perf_counter()
            try:
                resp = self._pool.request(
                    method, self.base + path, body=body, headers=headers, redirect=False,
                    timeout=urllib3.Timeout(connect=min(CONNECT_SECONDS, wait), read=wait),
                    preload_content=True)
            except ReadTimeoutError:
                raise self.fail(f"no answer within {wait:g} s (timeout; raise it with "
                                "timeout = SECONDS, or #timeout=SECONDS after the URL)",
                                status=504) from None
            except (NewConnectionError, ConnectTimeoutError, ProtocolError, MaxRetryError,
                    HTTPError, OSError) as exc:
                if attempt < RETRIES:
                    self._backoff(attempt)
                    continue
                raise self.fail(f"{_connection_problem(exc)} (after {RETRIES + 1} "
                                "attempts)") from None
            data = resp.data or b""
            self.traffic.requests += 1
            self.traffic.sent += len(body or b"")
            self.traffic.received += len(data)
            self.traffic.seconds += time.perf_counter() - started
            answer = Answer(resp.status, {k.lower(): v for k, v in resp.headers.items()}, data)
            if answer.status in ok:
                return answer
            if answer.status in RETRY_STATUS and attempt < RETRIES:
                self._backoff(attempt, answer.headers.get("retry-after"))
                continue
            raise self.fail(_status_problem(answer))
        raise AssertionError("unreachable")

    def json(self, method: str, path: str, payload: Any = None, *,
             timeout: float | None = None) -> Any:
        """A request whose answer must be a JSON object or list."""
        answer = self.request(method, path, payload=payload, timeout=timeout)
        data = answer.json()
        if not isinstance(data, (dict, list)):
            raise self.fail(f"{path} answered something that is not JSON "
                            f"({_snippet(answer.data)})")
        return data

    def _backoff(self, attempt: int, retry_after: str | None = None) -> None:
        self.traffic.retries += 1
        wait = BACKOFF_SECONDS * 2 ** attempt
        if retry_after and retry_after.strip().isdigit():
            wait = max(wait, min(float(retry_after), 4 * BACKOFF_SECONDS * 2 ** RETRIES))
        time.sleep(wait)

    def close(self) -> None:
        """Close the pooled connections."""
        self._pool.clear()


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
