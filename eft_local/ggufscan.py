"""A bounded pure-Python look at a GGUF header, for files llama.cpp would abort on.

llama.cpp validates most of a GGUF file with clean errors, but some malformed files end in a
failed assertion (an abort, no error message). The fuzz test found two: a token list with two
identical tokens (``GGML_ASSERT(id_to_token.size() == token_to_id.size())``) and a block
count outside 1..512 (``GGML_ASSERT(hparams.n_layer_all > 0 && ... <= LLAMA_MAX_LAYERS)``).
This module reads the header's key/value pairs and reports both. Anything it cannot parse is
left to llama.cpp's own checks.
"""

from __future__ import annotations

import functools
import mmap
import struct
from dataclasses import dataclass
from pathlib import Path

from eft_local import limits

_FIXED = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
"""Byte sizes of GGUF's fixed-size value types (8 = string and 9 = array vary)."""
_INTEGERS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 10: "<Q", 11: "<q"}
_STRING, _ARRAY = 8, 9
_MAX_KV = 1 << 16


class _Unreadable(Exception):
    """The header is not what this scanner understands: leave it to llama.cpp."""


LLAMA_MAX_LAYERS = 512
"""llama.cpp asserts (aborts) on a block count outside 1..512."""


_SHAPE_KEYS = ("context_length", "embedding_length", "attention.head_count",
               "attention.head_count_kv", "attention.key_length", "attention.value_length")
"""Architecture keys whose integer values size the KV cache (:meth:`Header.kv_bytes`)."""


@dataclass(frozen=True)
class Header:
    """What the scan found: the architecture, its block count, a repeated token text, and
    the integer shape keys (:data:`_SHAPE_KEYS`, without the architecture prefix)."""

    arch: str | None = None
    block_count: int | None = None
    duplicate: tuple[int, int, bytes] | None = None
    shape: tuple[tuple[str, int], ...] = ()

    def kv_bytes(self, n_ctx: int | None = None) -> tuple[int, int] | None:
        """Estimated bytes of one sequence's KV cache (f16, every layer) and the context it
        is for (``n_ctx``, default the training context capped at 4096, as loading does);
        None when the header does not say."""
        s = dict(self.shape)
        heads, embd = s.get("attention.head_count"), s.get("embedding_length")
        if not (self.block_count and heads and embd):
            return None
        head = embd // heads
        n = n_ctx or min(4096, s.get("context_length") or 4096)
        return limits.kv_cache_bytes(n, n_layer=self.block_count,
                                     n_head_kv=s.get("attention.head_count_kv", heads),
                                     k_len=s.get("attention.key_length", head),
                                     v_len=s.get("attention.value_length", head)), n

    def problem(self) -> str | None:
        """Why llama.cpp would abort on this file, or None."""
        if self.block_count is not None and not 0 < self.block_count <= LLAMA_MAX_LAYERS:
            return (f"{self.arch}.block_count is {self.block_count}, outside 1..{LLAMA_MAX_LAYERS}"
                    " (a corrupt or unsupported file)")
        if self.duplicate:
            first, second, text = self.duplicate
            return (f"token {second} repeats the text of token {first} ({text!r}); llama.cpp "
                    "cannot load a vocabulary with duplicate tokens")
        return None


def scan(path: str | Path) -> Header:
    """The header facts of a GGUF file (empty when it cannot be parsed here).

    About 0.3 s for a 152k-token vocabulary; remembered per file (path, size, mtime).
    """
    try:
        stat = Path(path).stat()
    except OSError:
        return Header()
    return _scan_file(str(path), stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=32)
def _scan_file(path: str, _size: int, _mtime: int) -> Header:
    found: dict = {}
    try:
        with open(path, "rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as mm:
            _scan(mm, found)
    except (OSError, ValueError, _Unreadable, struct.error):
        pass
    return Header(**found)


def _scan(mm: mmap.mmap, found: dict) -> None:
    if mm[:4] != b"GGUF" or struct.unpack_from("<I", mm, 4)[0] not in (2, 3):
        raise _Unreadable
    n_kv = struct.unpack_from("<Q", mm, 16)[0]
    pos = 24
    for _ in range(min(n_kv, _MAX_KV)):
        key, pos = _string(mm, pos)
        (kind,), pos = struct.unpack_from("<I", mm, pos), pos + 4
        arch = found.get("arch")
        if key == b"general.architecture" and kind == _STRING:
            text, pos = _string(mm, pos)
            found["arch"] = text.decode("utf-8", "replace")
        elif arch and key == f"{arch}.block_count".encode() and kind in _INTEGERS:
            fmt = _INTEGERS[kind]
            found["block_count"] = struct.unpack_from(fmt, mm, pos)[0]
            pos += struct.calcsize(fmt)
        elif arch and kind in _INTEGERS and key.decode("utf-8", "replace") in {
                f"{arch}.{k}" for k in _SHAPE_KEYS}:
            fmt = _INTEGERS[kind]
            name = key.decode().removeprefix(f"{arch}.")
            found["shape"] = (*found.get("shape", ()), (name, struct.unpack_from(fmt, mm, pos)[0]))
            pos += struct.calcsize(fmt)
        elif key == b"tokenizer.ggml.tokens" and kind == _ARRAY:
            (elem, count), pos = struct.unpack_from("<IQ", mm, pos), pos + 12
            if elem != _STRING:
                return
            seen: dict[bytes, int] = {}
            for i in range(count):
                text, pos = _string(mm, pos)
                if text in seen:
                    found["duplicate"] = (seen[text], i, text)
                    return
                seen[text] = i
        else:
            pos = _skip(mm, pos, kind, depth=0)


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
