"""Valid UTF-8 as a constraint on the next token, to go with a grammar.

llama.cpp's grammar engine matches code points, decoding each token's bytes leniently: an
overlong form (``C1 81`` for ``A``), a lead byte that UTF-8 never uses (``F5``-``FF``), a
surrogate or a value past U+10FFFF all pass as code points. Random-weight models write such
bytes; a JSON string holding them is no longer UTF-8 (RFC 8259), and decoded with
replacement characters it breaks the schema's ``maxLength``. :class:`Utf8Guard` allows only
tokens whose bytes continue the text as well-formed UTF-8 (the table of Unicode's section
3.9), and :class:`Guarded` puts it in front of a grammar.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import numpy as np

State = tuple[int, int, int]
"""Continuation bytes still needed, and the range the next one must be in."""
START: State = (0, 0x80, 0xBF)


def _lead(byte: int) -> State | None:
    """What a first byte asks of the bytes after it (None: it cannot start a character)."""
    if byte < 0x80:
        return START
    if 0xC2 <= byte <= 0xDF:
        return (1, 0x80, 0xBF)
    if 0xE0 <= byte <= 0xEF:
        return (2, 0xA0 if byte == 0xE0 else 0x80, 0x9F if byte == 0xED else 0xBF)
    if 0xF0 <= byte <= 0xF4:
        return (3, 0x90 if byte == 0xF0 else 0x80, 0x8F if byte == 0xF4 else 0xBF)
    return None


def scan(data: bytes, state: State = START) -> State | None:
    """The state after ``data`` from ``state``, or None where it breaks UTF-8."""
    need, low, high = state
    for byte in data:
        if need:
            if not low <= byte <= high:
                return None
            need, low, high = need - 1, 0x80, 0xBF
        else:
            lead = _lead(byte)
            if lead is None:
                return None
            need, low, high = lead
    return (need, low, high)


class Pieces:
    """A vocabulary's token bytes: which tokens may follow complete text, and which start
    with a continuation byte (the only ones that may follow part of a character)."""

    def __init__(self, pieces: Sequence[bytes], eog: Sequence[int]) -> None:
        self.pieces = list(pieces)
        self.eog = np.zeros(len(self.pieces), dtype=bool)
        self.eog[list(eog)] = True
        self.fresh = np.array([scan(p) is not None for p in self.pieces]) | self.eog
        self.cont = np.array([bool(p) and 0x80 <= p[0] <= 0xBF for p in self.pieces])


class Utf8Guard:
    """Which tokens keep the text well-formed UTF-8 after what was accepted so far."""

    def __init__(self, pieces: Pieces, state: State = START) -> None:
        self.table, self.state = pieces, state

    def allowed(self, tokens: np.ndarray) -> np.ndarray:
        ids = np.asarray(tokens)
        t = self.table
        if self.state == START:
            return t.fresh[ids]
        ok = np.zeros(len(ids), dtype=bool)
        for i in np.flatnonzero(t.cont[ids]):  # inside a character: continuation bytes only
            ok[i] = scan(t.pieces[ids[i]], self.state) is not None
        return ok

    def accept(self, token: int) -> None:
        if not self.table.eog[token]:
            self.state = scan(self.table.pieces[token], self.state) or START

    def clone(self) -> Utf8Guard:
        return Utf8Guard(self.table, self.state)


class Constraint(Protocol):
    """What :class:`Guarded` wraps (a grammar's state)."""

    def allowed(self, tokens: np.ndarray) -> np.ndarray: ...
    def accept(self, token: int) -> None: ...
    def clone(self) -> Constraint: ...


class Guarded:
    """``inner`` (a grammar), asked only about the tokens that keep the text UTF-8."""

    def __init__(self, inner: Constraint, guard: Utf8Guard) -> None:
        self.inner, self.guard = inner, guard

    def allowed(self, tokens: np.ndarray) -> np.ndarray:
        ids = np.asarray(tokens)
        ok = self.guard.allowed(ids)
        if ok.any():
            ok[ok] = self.inner.allowed(ids[ok])
        return ok

    def accept(self, token: int) -> None:
        self.inner.accept(token)
        self.guard.accept(token)

    def clone(self) -> Guarded:
        return Guarded(self.inner.clone(), self.guard.clone())
