"""Streaming text from token bytes: UTF-8 safe across token boundaries, with stop strings."""

from __future__ import annotations

import codecs
from collections.abc import Sequence


class TextStream:
    """Turn token bytes into text as it becomes final, holding back partial stop strings."""

    def __init__(self, stops: Sequence[str] = ()) -> None:
        self._decoder = codecs.getincrementaldecoder("utf-8")("replace")
        self._stops = [s for s in stops if s]
        self._pending = ""
        self.text = ""
        self.stopped = False

    def push(self, data: bytes) -> str:
        """Feed one token's bytes; return the text that is now safe to show."""
        if self.stopped:
            return ""
        self._pending += self._decoder.decode(data)
        for stop in self._stops:
            idx = self._pending.find(stop)
            if idx >= 0:
                self.stopped = True
                return self._emit(self._pending[:idx])
        hold = max((_overlap(self._pending, s) for s in self._stops), default=0)
        return self._emit(self._pending[: len(self._pending) - hold], keep=hold)

    def flush(self) -> str:
        """Everything still held back (call when generation ends without a stop string),
        less an incomplete UTF-8 character at the very end (a reply cut by max-tokens)."""
        if self.stopped:
            return ""
        self._decoder.reset()  # drops the bytes of a character that never completed
        return self._emit(self._pending)

    def _emit(self, out: str, keep: int = 0) -> str:
        self._pending = self._pending[len(self._pending) - keep:] if keep else ""
        self.text += out
        return out


def _overlap(text: str, stop: str) -> int:
    """Length of the longest suffix of ``text`` that is a proper prefix of ``stop``."""
    for n in range(min(len(text), len(stop) - 1), 0, -1):
        if text.endswith(stop[:n]):
            return n
    return 0


def printable(text: str) -> str:
    """``text`` safe to echo to a terminal: control and format characters (escape
    sequences, bidi overrides, newlines) written as Python escapes, e.g. ``\\x1b``."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() or c == " " else ascii(c)[1:-1] for c in text)
