"""Bounds on what users may ask for: context size, threads, memory, formula weights.

Checked before anything reaches llama.cpp, so that a typo gives a one-line error instead of
a wrapped integer, a memory runaway or a crash.
"""

from __future__ import annotations

import os
from pathlib import Path

try:
    import resource
except ImportError:  # pragma: no cover - Windows
    resource = None  # type: ignore[assignment]

from eft_local.errors import EftError

N_CTX_MAX = 1 << 24
"""Largest context accepted (16,777,216 tokens; llama.cpp keeps n_ctx in a uint32)."""

N_GPU_LAYERS_MAX = 1 << 16
"""More layers than any model has (llama.cpp keeps the count in an int32)."""

N_SEQ_MAX = 256
"""Most sequences one model's context may hold: the sequence ids llama.cpp knows
(``LLAMA_MAX_SEQ``)."""

THREADS_PER_CORE = 4
"""--threads may be at most this many times the number of cores."""

PARAM_LIMIT = 1e6
"""|beta| and |lam| above this make the float32 mix overflow or collapse onto one token."""

TEMPERATURE_RANGE = (1e-6, 1e6)
"""Non-zero temperatures outside this range overflow float32 (0 means greedy)."""


def max_threads() -> int:
    """The largest thread count accepted: a few times the cores of this machine."""
    return THREADS_PER_CORE * max(1, os.cpu_count() or 1)


def check_n_ctx(n_ctx: int, where: str) -> None:
    """Refuse a context size outside [0, N_CTX_MAX] (0: the model's training context)."""
    if isinstance(n_ctx, bool) or not isinstance(n_ctx, int) or not 0 <= n_ctx <= N_CTX_MAX:
        raise EftError(f"{where}: n_ctx must be an integer in [0, {N_CTX_MAX}], got {n_ctx!r}")


def check_n_seq(n_seq: int, where: str) -> None:
    """Refuse a sequence count outside [1, N_SEQ_MAX]."""
    if isinstance(n_seq, bool) or not isinstance(n_seq, int) or not 1 <= n_seq <= N_SEQ_MAX:
        raise EftError(f"{where}: n_seq must be an integer in [1, {N_SEQ_MAX}], got {n_seq!r}")


def check_threads(n_threads: int, where: str) -> None:
    """Refuse a thread count below 1 or above :func:`max_threads`."""
    cap = max_threads()
    if isinstance(n_threads, bool) or not isinstance(n_threads, int) or not 1 <= n_threads <= cap:
        raise EftError(f"{where}: threads must be an integer in [1, {cap}] "
                       f"({THREADS_PER_CORE} per core), got {n_threads!r}")


def kv_cache_bytes(n_ctx: int, *, n_layer: int, n_head_kv: int, k_len: int, v_len: int,
                   bytes_per_value: int = 2, n_seq: int = 1) -> int:
    """Bytes of a llama.cpp KV cache holding ``n_seq`` sequences of ``n_ctx`` positions
    (f16 keys and values for every layer and position)."""
    return n_seq * n_ctx * n_layer * n_head_kv * (k_len + v_len) * bytes_per_value


def available_memory() -> int | None:
    """Bytes this process may still allocate: free RAM, bounded by an address-space limit
    (``ulimit -v``); None when it cannot be told."""
    avail = _meminfo_available()
    limit = resource.getrlimit(resource.RLIMIT_AS)[0] if resource else -1
    if limit >= 0 and limit != getattr(resource, "RLIM_INFINITY", -1):
        used = _vm_size()
        room = max(0, limit - used) if used is not None else limit
        avail = room if avail is None else min(avail, room)
    return avail


def _meminfo_available() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def _vm_size() -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmSize:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def size_text(n_bytes: float) -> str:
    """A size for people: 12.3 MiB, 4.1 GiB."""
    for unit, scale in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n_bytes >= scale:
            return f"{n_bytes / scale:.1f} {unit}"
    return f"{int(n_bytes)} B"
