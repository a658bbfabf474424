"""What ``eft-local serve``'s command line sets for every request of its server."""

from __future__ import annotations

from dataclasses import dataclass

from eft_local.server.guard import CorsPolicy, HostPolicy
from eft_local.server.protocol import MAX_TOP_LOGPROBS


@dataclass(frozen=True)
class ServerOptions:
    """What the command line sets for every request."""

    api_key: str | None = None
    max_body: int = 8 << 20
    max_tokens: int = 512
    completion_max_tokens: int = 16
    system: str | None = None
    stop: tuple[str, ...] = ()
    seed: int | None = None
    context_overflow: str = "truncate"
    """A chat longer than the context, unless the request's ``eft.context_overflow`` says:
    drop its oldest turns (``truncate``) or answer 400 (``error``)."""
    body_seconds: float = 60.0
    """Longest a request body may take to arrive (a slow upload holds a connection)."""
    max_logprobs: int = MAX_TOP_LOGPROBS
    """Most alternatives per position a completions request may ask for."""
    hosts: HostPolicy = HostPolicy()
    """Which Host headers are answered (:mod:`eft_local.server.guard`; by default
    loopback names and IP addresses)."""
    cors: CorsPolicy = CorsPolicy()
    """Which other origins' web pages may call the server (``--cors``; none by default)."""
    reasoning_format: str = "deepseek"
    """Where a chat reply's ``<think>`` block goes unless the request says: ``deepseek``,
    ``reasoning_content``; ``none``, it stays in the text."""
