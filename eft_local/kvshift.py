"""Re-using a KV cache after a chat dropped its oldest turns: where to cut, and whether a
shift pays.

The cache holds ``prefix + dropped + kept + ...`` and the new prompt is ``prefix + kept +
...``. :func:`best_cut` finds the span to cut out; :func:`worth_shifting` says whether
moving the kept tokens down (llama.cpp's K-shift: RoPE over every cell of every layer) is
faster than evaluating them again. The rule comes from ``python
benchmarks/context_shift.py`` (figures in docs/long-chats.md).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

SHIFT_MIN_BYTES = 64 << 20
"""Models whose files are smaller evaluate kept tokens again instead of shifting them: at
the bundled family's sizes (0.6 and 5.7 MB) a decode call costs about the same few
milliseconds for 8 or 176 tokens and the K-shift is one more graph (x0.65 to x1.45, no
steady gain); at 135M parameters (174 MB) and above, shifting 32 kept tokens or more was 1.5
to 24 times faster."""
SHIFT_MIN_TOKENS = 32
"""Fewest kept tokens worth a shift: at n_ctx 2048 the K-shift cost about as much as
evaluating 8 tokens (x0.95 and x0.96 at 8 kept tokens, x1.5 to x2.0 at 32)."""
SHIFT_CTX_SHARE = 64
"""...and at least ``n_ctx / SHIFT_CTX_SHARE`` of them: the K-shift rotates the whole
cache, so its cost grows with the context (at n_ctx 8192: x0.91 at 32 kept tokens, x2.3 at
128)."""


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """Length of the longest common prefix of two token sequences."""
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def worth_shifting(kept: int, *, n_ctx: int, file_bytes: int) -> bool:
    """True when moving ``kept`` cached tokens down in a cache of ``n_ctx`` cells of a
    model whose file has ``file_bytes`` is faster than evaluating them again (the measured
    rule above)."""
    return (file_bytes >= SHIFT_MIN_BYTES
            and kept >= max(SHIFT_MIN_TOKENS, n_ctx // SHIFT_CTX_SHARE))


def best_cut(cached: Sequence[int], tokens: Sequence[int], start: int) -> tuple[int, int]:
    """How to re-use a cache that holds ``cached`` for ``tokens``, which share its first
    ``start`` tokens, by cutting ``cached[start:end]`` out: ``(end, kept)`` with
    ``cached[end:end + kept] == tokens[start:start + kept]``, ``kept`` the longest
    (the nearest ``end`` of equals); ``kept`` is 0 when no cut helps."""
    c = np.asarray(cached[start + 1:], dtype=np.int64)
    t = np.asarray(tokens[start:], dtype=np.int64)
    if not c.size or not t.size:
        return start, 0
    found = np.flatnonzero(c == t[0])
    if not found.size:
        return start, 0
    w = min(16, t.size)  # first the candidates' first w tokens, all at once
    padded = np.concatenate([c, np.full(w, -1, dtype=np.int64)])
    same = padded[found[:, None] + np.arange(w)] == t[:w]
    lengths = np.where(same.all(axis=1), w, same.argmin(axis=1))
    best = found[lengths == lengths.max()]
    if lengths.max() == w:  # then the full lengths of the best ones
        full = [_matching(c[j:], t) for j in best[:64]]
        return start + 1 + int(best[int(np.argmax(full))]), max(full)
    return start + 1 + int(best[0]), int(lengths.max())


def _matching(a: np.ndarray, b: np.ndarray) -> int:
    """Length of the common prefix of two arrays."""
    n = min(a.size, b.size)
    same = a[:n] == b[:n]
    return n if same.all() else int(same.argmin())
