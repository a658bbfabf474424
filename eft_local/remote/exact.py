"""eft-local to eft-local: whole rows of a model's logits, exactly, in one request.

``POST /eft/rows`` (served by ``eft-local serve``) takes a JSON body::

    {"model": preset (optional), "role": ROLE (optional with one model),
     "tokens": [ids after the held prefix], "n_past": N, "prefix": prefix_hash(first N ids),
     "first": P}

and answers the logit rows of positions ``P .. n_past + len(tokens) - 1`` (the row of
position i predicts token i + 1) as a binary body: float32, little-endian, row after row;
the headers ``X-Eft-Rows`` and ``X-Eft-Width`` give the shape. The engine re-uses the longest
prefix its KV cache holds. ``n_past``/``prefix`` let a client send only the tokens the
engine does not hold yet: when the engine's cache no longer starts with those ``N`` ids (it
restarted, or served someone else), it answers 409 ``prefix_mismatch`` and the client sends
the whole sequence again (``n_past`` 0). ``GET /eft/vocab`` describes a role's vocabulary
exactly as a local GGUF file gives it (:mod:`eft_local.remote.vocab`).
"""

from __future__ import annotations

import base64
import hashlib
from collections.abc import Sequence
from typing import Any

import numpy as np

from eft_local.kvshift import common_prefix
from eft_local.remote.http import ANSWER_HEADROOM, Endpoint

ROWS_PATH = "/eft/rows"
VOCAB_PATH = "/eft/vocab"
MEDIA_TYPE = "application/octet-stream"
H_ROWS = "X-Eft-Rows"
H_WIDTH = "X-Eft-Width"
H_EVAL_MS = "X-Eft-Eval-Ms"
"""Milliseconds the engine spent evaluating (the rest of a round trip is the network)."""
PREFIX_MISMATCH = "prefix_mismatch"


def prefix_hash(tokens: Sequence[int]) -> str:
    """A short hash of a token sequence (int32 little-endian, BLAKE2b-128)."""
    data = np.asarray(tokens, dtype="<i4").tobytes()
    return hashlib.blake2b(data, digest_size=16).hexdigest()


def encode_rows(rows: np.ndarray) -> bytes:
    """Rows as the body: float32 little-endian, C order."""
    return np.ascontiguousarray(rows, dtype="<f4").tobytes()


def decode_rows(data: bytes, n_rows: int, width: int) -> np.ndarray | None:
    """The rows of a body, or None when its size does not match the shape."""
    if n_rows < 0 or width < 1 or len(data) != 4 * n_rows * width:
        return None
    return np.frombuffer(data, dtype="<f4").reshape(n_rows, width).astype(np.float32)



def pack_bytes(items: Sequence[bytes]) -> dict[str, Any]:
    """Byte strings as the protocol sends them: base64 of them all, and their lengths."""
    return {"data": base64.b64encode(b"".join(items)).decode("ascii"),
            "lengths": [len(b) for b in items]}


def unpack_bytes(packed: Any, n: int, what: str) -> tuple[bytes, ...]:
    """The ``n`` byte strings in :func:`pack_bytes` form (ValueError naming ``what``)."""
    data = base64.b64decode(packed["data"], validate=True)
    lengths = packed["lengths"]
    if len(lengths) != n or sum(lengths) != len(data):
        raise ValueError(f"{what}: {len(lengths)} lengths for {n} tokens")
    out, at = [], 0
    for length in lengths:
        out.append(data[at:at + length])
        at += length
    return tuple(out)



class ExactClient:
    """Rows of one remote role over ``/eft/rows``; remembers what the engine holds so that
    each step sends only its new tokens."""

    def __init__(self, endpoint: Endpoint, *, role: str | None, model: str | None,
                 width: int) -> None:
        self.endpoint = endpoint
        self.role = role
        self.model = model
        self.width = width
        self.held: list[int] = []
        """The sequence the engine held after this client's last request (as far as we
        know: another client may have replaced it since)."""

    def rows(self, done: Sequence[int], new: Sequence[int], all_rows: bool) -> np.ndarray:
        """Rows after each of ``new`` (or after its last one) given ``done`` before it."""
        seq = [*done, *new]
        first = len(done) if all_rows else len(seq) - 1
        n_past = min(common_prefix(self.held, seq), len(done))
        try:
            out = self._ask(seq, n_past, first)
        except _Mismatch:
            self.endpoint.traffic.resent += 1
            self.held = []
            out = self._ask(seq, 0, first)
        self.held = seq
        return out

    def _ask(self, seq: list[int], n_past: int, first: int) -> np.ndarray:
        body: dict[str, Any] = {"tokens": seq[n_past:], "n_past": n_past, "first": first}
        if n_past:
            body["prefix"] = prefix_hash(seq[:n_past])
        if self.role:
            body["role"] = self.role
        if self.model:
            body["model"] = self.model
        ep = self.endpoint
        limit = 4 * (len(seq) - first) * self.width + ANSWER_HEADROOM
        answer = ep.request("POST", ROWS_PATH, payload=body, ok=(200, 409), limit=limit)
        if answer.status == 409:
            data = answer.json()
            code = data.get("error", {}).get("code") if isinstance(data, dict) else None
            if code == PREFIX_MISMATCH and n_past:
                raise _Mismatch
            raise ep.fail(f"{ROWS_PATH} answered HTTP 409 ({code or 'conflict'})")
        try:
            n_rows = int(answer.headers.get(H_ROWS.lower(), "-1"))
            width = int(answer.headers.get(H_WIDTH.lower(), "0"))
            ep.traffic.server_seconds += float(answer.headers.get(H_EVAL_MS.lower(), 0)) / 1e3
        except ValueError:
            n_rows, width = -1, 0
        rows = decode_rows(answer.data, n_rows, width)
        want = len(seq) - first
        if rows is None or n_rows != want:
            raise ep.fail(f"{ROWS_PATH} answered {len(answer.data)} bytes for {n_rows} x "
                          f"{width} rows; {want} row(s) were asked for")
        if width != self.width:
            raise ep.fail(f"{ROWS_PATH} answered rows of {width} logits; its vocabulary has "
                          f"{self.width} tokens")
        if not np.isfinite(rows).all():  # -inf too: a negative weight would make it +inf
            raise ep.fail(f"{ROWS_PATH} answered logits that are NaN or infinite (a model's "
                          "logits are finite)")
        return rows


class _Mismatch(Exception):
    """The engine no longer holds the prefix this client thought it held."""
