"""Streaming text from token bytes: UTF-8 safe across token boundaries, with stop strings."""

from __future__ import annotations

import codecs
from collections.abc import Sequence


class TextStream:
    """Turn token bytes into text as it becomes final, holding back partial stop strings.

    The text ends before the earliest stop string in text order, whichever stop it is; while
    a longer stop that starts earlier could still complete, a later match waits for more
    text (or for :meth:`flush`).
    """

    def __init__(self, stops: Sequence[str] = ()) -> None:
        self._decoder = codecs.getincrementaldecoder("utf-8")("replace")
        self._stops = [s for s in stops if s]
        self._longest = max((len(s) for s in self._stops), default=0)
        self._pending = ""
        self.text = ""
        self.stopped = False

    def push(self, data: bytes) -> str:
        """Feed one token's bytes; return the text that is now safe to show."""
        if self.stopped:
            return ""
        self._pending += self._decoder.decode(data)
        return self._scan(final=False)

    def flush(self) -> str:
        """Everything still held back (call when generation ends), cut at a stop string
        that was waiting for an earlier, longer one; less an incomplete UTF-8 character at
        the very end (a reply cut by max-tokens). Sets :attr:`stopped` if a stop applied."""
        if self.stopped:
            return ""
        self._decoder.reset()  # drops the bytes of a character that never completed
        return self._scan(final=True)

    def _scan(self, *, final: bool) -> str:
        pending = self._pending
        found = [i for i in (pending.find(s) for s in self._stops) if i >= 0]
        first = min(found) if found else -1
        partial = None if final else self._partial_start()
        if first >= 0 and (partial is None or partial > first):
            self.stopped = True
            return self._emit(pending[:first])
        safe = len(pending) if partial is None else partial
        return self._emit(pending[:safe], keep=len(pending) - safe)

    def _partial_start(self) -> int | None:
        """Where the earliest stop string that may still complete starts: the smallest
        ``j`` whose ``pending[j:]`` is a proper prefix of some stop (None: none)."""
        pending = self._pending
        for j in range(max(0, len(pending) - self._longest + 1), len(pending)):
            tail = pending[j:]
            if any(len(s) > len(tail) and s.startswith(tail) for s in self._stops):
                return j
        return None

    def _emit(self, out: str, keep: int = 0) -> str:
        self._pending = self._pending[len(self._pending) - keep:] if keep else ""
        self.text += out
        return out


def printable(text: str) -> str:
    """``text`` safe to echo to a terminal: control and format characters (escape
    sequences, bidi overrides, newlines) written as Python escapes, e.g. ``\\x1b``."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() or c == " " else ascii(c)[1:-1] for c in text)


def undecodable(char: str) -> str:
    """Name what a surrogate stands for: an undecodable byte (surrogateescape) or itself."""
    code = ord(char)
    return f"byte 0x{code - 0xDC00:02x}" if 0xDC80 <= code <= 0xDCFF else (
        f"lone surrogate \\u{code:04x}")
