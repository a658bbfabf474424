"""The pieces OpenAI's answers are made of: the envelope every response and chunk starts
with, a server-sent event, ids, usage, finish reasons and a chat log-prob entry."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Sequence
from typing import Any

from eft_local import __version__
from eft_local.records import finite

FINGERPRINT = f"eft-local-{__version__}"


def envelope(prefix: str, kind: str, model: str | None, head: dict[str, Any]) -> dict[str, Any]:
    """The fields every OpenAI response and chunk starts with."""
    return {"id": new_id(prefix), "object": kind, "created": now(),
            "model": model or head["eft"]["preset"], "system_fingerprint": FINGERPRINT}


def sse(data: Any) -> str:
    """One server-sent event (strict JSON: no NaN or Infinity, as JSONResponse)."""
    return f"data: {json.dumps(data, ensure_ascii=False, allow_nan=False)}\n\n"


def new_id(prefix: str) -> str:
    """An id like ``chatcmpl-3f2a...``."""
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def now() -> int:
    """Seconds since the epoch (``created``)."""
    return int(time.time())


def usage(prompt: int, completion: int, cached: int = 0) -> dict[str, Any]:
    """OpenAI's usage object; ``cached``: prompt tokens re-used from a slot's cache."""
    return {"prompt_tokens": prompt, "completion_tokens": completion,
            "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": cached}}


def finish_reason(finish: str | None) -> str:
    """Engine finish reasons in OpenAI's words: end of turn or stop string -> ``stop``;
    ``max_tokens`` or a full context -> ``length``."""
    return "stop" if finish in ("stop", "eog") else "length"


def chat_logprob(text: str, data: bytes, logprob: float,
                 top: Sequence[tuple[str, bytes, float]]) -> dict[str, Any]:
    """One entry of a chat choice's ``logprobs.content``."""
    return {"token": text, "logprob": finite(logprob), "bytes": list(data),
            "top_logprobs": [{"token": t, "logprob": finite(lp), "bytes": list(b)}
                             for t, b, lp in top]}
