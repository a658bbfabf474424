"""A bounded pure-Python look at a GGUF header, for files llama.cpp would abort on.

llama.cpp validates most of a GGUF file with clean errors, but some malformed vocabularies
end in a failed assertion (an abort, no error message): a token list with two identical
tokens is one (``GGML_ASSERT(id_to_token.size() == token_to_id.size())``). This module
reads the header's key/value pairs up to ``tokenizer.ggml.tokens`` and reports such a
duplicate. Anything it cannot parse is left to llama.cpp's own checks.
"""

from __future__ import annotations

import functools
import mmap
import struct
from pathlib import Path

_FIXED = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
"""Byte sizes of GGUF's fixed-size value types (8 = string and 9 = array vary)."""
_STRING, _ARRAY = 8, 9
_MAX_KV = 1 << 16


class _Unreadable(Exception):
    """The header is not what this scanner understands: leave it to llama.cpp."""


def duplicate_token(path: str | Path) -> tuple[int, int, bytes] | None:
    """``(first_id, second_id, text)`` of the first repeated token text, else None.

    About 0.3 s for a 152k-token vocabulary; remembered per file (path, size, mtime).
    """
    try:
        stat = Path(path).stat()
    except OSError:
        return None
    return _duplicate_token(str(path), stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=32)
def _duplicate_token(path: str, _size: int, _mtime: int) -> tuple[int, int, bytes] | None:
    try:
        with open(path, "rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as mm:
            return _scan(mm)
    except (OSError, ValueError, _Unreadable, struct.error):
        return None


def _scan(mm: mmap.mmap) -> tuple[int, int, bytes] | None:
    if mm[:4] != b"GGUF" or struct.unpack_from("<I", mm, 4)[0] not in (2, 3):
        raise _Unreadable
    n_kv = struct.unpack_from("<Q", mm, 16)[0]
    pos = 24
    for _ in range(min(n_kv, _MAX_KV)):
        key, pos = _string(mm, pos)
        (kind,), pos = struct.unpack_from("<I", mm, pos), pos + 4
        if key == b"tokenizer.ggml.tokens" and kind == _ARRAY:
            (elem, count), pos = struct.unpack_from("<IQ", mm, pos), pos + 12
            if elem != _STRING:
                return None
            seen: dict[bytes, int] = {}
            for i in range(count):
                text, pos = _string(mm, pos)
                if text in seen:
                    return seen[text], i, text
                seen[text] = i
            return None
        pos = _skip(mm, pos, kind, depth=0)
    return None


def _string(mm: mmap.mmap, pos: int) -> tuple[bytes, int]:
    (n,) = struct.unpack_from("<Q", mm, pos)
    end = pos + 8 + n
    if end > len(mm):
        raise _Unreadable
    return mm[pos + 8:end], end


def _skip(mm: mmap.mmap, pos: int, kind: int, depth: int) -> int:
    if kind in _FIXED:
        return pos + _FIXED[kind]
    if kind == _STRING:
        return _string(mm, pos)[1]
    if kind != _ARRAY or depth > 2:
        raise _Unreadable
    (elem, count), pos = struct.unpack_from("<IQ", mm, pos), pos + 12
    if elem in _FIXED:
        pos += _FIXED[elem] * count
        if pos > len(mm):
            raise _Unreadable
        return pos
    if count > len(mm):  # every element takes at least one byte
        raise _Unreadable
    for _ in range(count):
        pos = _skip(mm, pos, elem, depth + 1)
    return pos
