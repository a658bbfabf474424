"""llama.cpp itself: the one module that imports ``llama_cpp``.

It sets OpenMP's spin count before llama.cpp loads, keeps llama.cpp's log quiet (remembering
its error lines for one-line messages), lets Ctrl-C and SIGTERM stop a model load, and says
what this build can do. The other modules of :mod:`eft_local.backend` use llama.cpp through
the names defined here.
"""

from __future__ import annotations

import ctypes
import os
import re
import threading
from collections import deque

SPIN_COUNT = "1000"
"""GOMP_SPINCOUNT set before llama.cpp's OpenMP runtime loads, unless the environment sets
OMP_WAIT_POLICY or GOMP_SPINCOUNT. Workers of a multi-threaded decode wait for each other
after every operation; libgomp lets a waiting worker spin 300,000 times (about 3 ms) before
it sleeps: fastest on an idle machine, a crawl on a busy one (a spinner waits for a thread
that is not running), and a spinner steals the core that a concurrent lane needs. Sleeping at
once (``OMP_WAIT_POLICY=passive``) halves 2-thread speed even on an idle machine. 1,000
spins keep the idle speed and bound the busy-machine damage (``python
benchmarks/openmp_wait.py``; figures in docs/threads-and-gpus.md)."""
if "OMP_WAIT_POLICY" not in os.environ and "GOMP_SPINCOUNT" not in os.environ:
    os.environ["GOMP_SPINCOUNT"] = SPIN_COUNT

import llama_cpp as L  # noqa: E402
from llama_cpp import llama_grammar  # noqa: E402, F401  (the JSON-schema converter)

from eft_local.interrupts import current_stop, foreign_callback  # noqa: E402
from eft_local.vocab import ATTR_CONTROL, ATTR_UNKNOWN, ATTR_UNUSED  # noqa: E402

if (ATTR_UNKNOWN, ATTR_UNUSED, ATTR_CONTROL) != (
        L.LLAMA_TOKEN_ATTR_UNKNOWN, L.LLAMA_TOKEN_ATTR_UNUSED, L.LLAMA_TOKEN_ATTR_CONTROL):
    raise ImportError("llama_cpp's token attribute bits differ from eft_local.vocab's")
QUANT_TYPES = {name: getattr(L, f"LLAMA_FTYPE_MOSTLY_{name.upper()}") for name in (
    "f16", "bf16", "q8_0", "q6_k", "q5_k_m", "q5_k_s", "q5_1", "q5_0", "q4_k_m", "q4_k_s",
    "q4_1", "q4_0", "q3_k_l", "q3_k_m", "q3_k_s", "q2_k")} | {"f32": L.LLAMA_FTYPE_ALL_F32}
"""Output types of :func:`quantize_gguf` (llama-quantize's names, lower case)."""

DEFAULT_N_CTX = 4096
"""Context size when none is set: this, or the model's training context if smaller."""

_init_lock = threading.Lock()
_initialised = False
_recent_errors: deque[str] = deque(maxlen=50)
_LOG_ERROR = 4  # GGML_LOG_LEVEL_ERROR
_GENERIC = re.compile(r"failed to (load model|read header)|unable to load model")


@L.llama_log_callback
@foreign_callback
def _log(level: int, text: bytes, _user: ctypes.c_void_p) -> None:
    """Keep llama.cpp's log quiet unless EFT_LOCAL_VERBOSE is set; remember error lines. An
    interrupted call that cannot return early (quantizing) stays here for good."""
    stop = current_stop()
    if stop is not None and stop.parkable and stop.requested.is_set():
        stop.park()
    if level == _LOG_ERROR:
        _recent_errors.append(text.decode("utf-8", "replace"))
    if os.environ.get("EFT_LOCAL_VERBOSE"):
        os.write(2, text)


@L.llama_progress_callback
@foreign_callback
def _progress(_fraction: float, _user: ctypes.c_void_p) -> bool:
    """Model loading goes on unless Ctrl-C or SIGTERM asked the load to stop (llama.cpp
    then gives the load up); no progress dots."""
    stop = current_stop()
    return not (stop is not None and stop.requested.is_set())


def _ensure_backend() -> None:
    global _initialised
    with _init_lock:
        if not _initialised:
            L.llama_log_set(_log, ctypes.c_void_p(0))
            L.llama_backend_init()
            _initialised = True


def _reason(line: str) -> str:
    """A log line without its ``function: `` and ``error loading model: `` prefixes."""
    text = " ".join(line.split())
    while True:
        head, sep, rest = text.partition(": ")
        if not sep or not (head.replace("_", "").isalnum() or head == "error loading model"):
            return text
        text = rest


def _last_error() -> str:
    """The most specific llama.cpp error logged since the last :func:`_forget_errors`: the
    first one that is not a generic "failed to load model"."""
    reasons = [_reason(line) for line in _recent_errors]
    specific = [r for r in reasons if r and not _GENERIC.match(r)]
    return specific[0] if specific else (reasons[-1] if reasons else "")


def _forget_errors() -> None:
    _recent_errors.clear()


def supports_gpu_offload() -> bool:
    """True when this llama.cpp build can offload layers (Metal, CUDA, Vulkan...)."""
    _ensure_backend()
    return bool(L.llama_supports_gpu_offload())


def build_info() -> str:
    """llama-cpp-python's version and llama.cpp's build features (CPU instruction sets,
    GPU backends...): what a measured speed depends on besides the machine."""
    _ensure_backend()
    info = L.llama_print_system_info()
    info = info.decode("utf-8", "replace") if isinstance(info, bytes) else str(info)
    return f"llama-cpp-python {L.__version__}; gpu offload {supports_gpu_offload()}; " + (
        " ".join(info.split()))


def fully_offloaded(n_gpu_layers: int, n_layer: int) -> bool:
    """True when ``n_gpu_layers`` puts every layer of an ``n_layer``-layer model on the GPU:
    -1 (all), or more than ``n_layer``, since llama.cpp counts the output layer as one more
    and keeps it on the CPU at exactly ``n_layer`` (``llama-model.cpp``, ``load_tensors``)."""
    return n_gpu_layers < 0 or n_gpu_layers > n_layer
