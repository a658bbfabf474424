"""The llama.cpp adapter: the only module that imports ``llama_cpp``.

It loads GGUF files, evaluates token batches with logits on the positions asked for,
rolls the KV cache back, turns tokens into bytes without the 32-byte truncation of
``Llama.detokenize``, and reads vocabularies without loading weights.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import json
import os
import re
import tempfile
import threading
from collections import deque
from pathlib import Path

SPIN_COUNT = "1000"
"""GOMP_SPINCOUNT set before llama.cpp's OpenMP runtime loads, unless the environment sets
OMP_WAIT_POLICY or GOMP_SPINCOUNT. Workers of a multi-threaded decode wait for each other
after every operation; libgomp lets a waiting worker spin 300,000 times (about 3 ms) before
it sleeps: fastest on an idle machine, a crawl on a busy one (a spinner waits for a thread
that is not running), and a spinner steals the core that a concurrent lane needs. Sleeping at
once (``OMP_WAIT_POLICY=passive``) halves 2-thread speed even on an idle machine. 1,000
spins keep the idle speed and bound the busy-machine damage (``python
benchmarks/openmp_wait.py``; figures in README, Threads)."""
if "OMP_WAIT_POLICY" not in os.environ and "GOMP_SPINCOUNT" not in os.environ:
    os.environ["GOMP_SPINCOUNT"] = SPIN_COUNT

import llama_cpp as L  # noqa: E402
import numpy as np  # noqa: E402
from llama_cpp import llama_grammar  # noqa: E402

from eft_local import ggufscan, limits  # noqa: E402
from eft_local.errors import EftError  # noqa: E402
from eft_local.files import atomic_path  # noqa: E402
from eft_local.interrupts import Stop, current_stop, foreign_callback, interruptible  # noqa: E402
from eft_local.text import undecodable  # noqa: E402
from eft_local.vocab import ATTR_CONTROL, ATTR_UNKNOWN, ATTR_UNUSED, VocabInfo  # noqa: E402

VOCAB_TYPES = {0: "none", 1: "spm", 2: "bpe", 3: "wpm", 4: "ugm", 5: "rwkv", 6: "plamo2"}
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


def _check_file(path: Path) -> None:
    try:
        if path.is_dir():
            raise EftError(f"{path}: is a directory, not a GGUF model file")
        if not path.exists():
            raise EftError(f"{path}: model file not found")
        with path.open("rb") as fh:
            magic = fh.read(4)
    except OSError as exc:
        raise EftError(f"{path}: cannot read model file ({exc.strerror or exc})") from None
    if magic != b"GGUF":
        raise EftError(f"{path}: not a GGUF file (bad magic bytes)")
    problem = ggufscan.scan(path).problem()  # what llama.cpp would abort on
    if problem:
        raise EftError(f"{path}: {problem}")


def _load_model(path: Path, *, vocab_only: bool, n_gpu_layers: int):
    _check_file(path)
    _ensure_backend()
    params = L.llama_model_default_params()
    params.vocab_only = vocab_only
    params.n_gpu_layers = n_gpu_layers
    params.progress_callback = _progress
    _forget_errors()
    model = interruptible(lambda _stop: L.llama_model_load_from_file(str(path).encode(), params),
                          discard=_free_model, name="llama.cpp load")
    if not model:
        why = _last_error()
        raise EftError(f"{path}: llama.cpp could not load this GGUF file"
                       + (f" ({why})" if why else " (corrupt or unsupported)"))
    return model


def _free_model(model) -> None:
    if model:
        L.llama_model_free(model)


def _vocab_info(model, path: Path, pieces: bool = False) -> VocabInfo:
    vocab = L.llama_model_get_vocab(model)
    n = L.llama_vocab_n_tokens(vocab)
    texts = tuple(L.llama_vocab_get_text(vocab, i) or b"" for i in range(n))
    attrs = tuple(int(L.llama_vocab_get_attr(vocab, i)) for i in range(n))
    eog = frozenset(i for i in range(n) if L.llama_vocab_is_eog(vocab, i))
    return VocabInfo(
        path=str(path), vocab_type=VOCAB_TYPES.get(L.llama_vocab_type(vocab), "unknown"),
        n_tokens=n, bos=L.llama_vocab_bos(vocab), eos=L.llama_vocab_eos(vocab),
        eot=L.llama_vocab_eot(vocab), eog=eog, add_bos=bool(L.llama_vocab_get_add_bos(vocab)),
        add_eos=bool(L.llama_vocab_get_add_eos(vocab)), texts=texts, attrs=attrs,
        pieces=tuple(_piece(vocab, i, True) for i in range(n)) if pieces else None,
    )


def _piece(vocab, token: int, special: bool, size: int = 64) -> bytes:
    buf = ctypes.create_string_buffer(size)
    n = L.llama_token_to_piece(vocab, token, buf, size, 0, special)
    return buf.raw[:n] if n >= 0 else _piece(vocab, token, special, -n)


def read_vocab(path: str | Path, *, pieces: bool = False) -> VocabInfo:
    """Load only the vocabulary of a GGUF file (no weights) and describe it; ``pieces``
    adds what each id decodes to (control tokens as their text)."""
    path = Path(path)
    model = _load_model(path, vocab_only=True, n_gpu_layers=0)
    try:
        return _vocab_info(model, path, pieces)
    finally:
        L.llama_model_free(model)


class LlamaModel:
    """One GGUF model with its own context and KV cache (one sequence).

    ``tokens`` is what the KV cache holds; :meth:`eval` appends to it and :meth:`rewind`
    truncates it. Not thread-safe: use one object per thread.
    """

    def __init__(self, path: str | Path, *, n_ctx: int | None = None, n_gpu_layers: int = 0,
                 n_threads: int = 1, n_batch: int = 512) -> None:
        self.path = Path(path)
        self._model = self._ctx = self._batch = None
        try:
            self._open(n_ctx, n_gpu_layers, n_threads, n_batch)
        except BaseException:  # free what was made, once: close() is idempotent
            self.close()
            raise

    def _open(self, n_ctx: int | None, n_gpu_layers: int, n_threads: int, n_batch: int) -> None:
        if n_ctx is not None:
            limits.check_n_ctx(n_ctx, str(self.path))
        self._model = _load_model(self.path, vocab_only=False, n_gpu_layers=n_gpu_layers)
        self._vocab = L.llama_model_get_vocab(self._model)
        self.n_vocab = int(L.llama_vocab_n_tokens(self._vocab))
        train_ctx = int(L.llama_model_n_ctx_train(self._model))
        cparams = L.llama_context_default_params()
        if n_ctx is None:
            n_ctx = min(DEFAULT_N_CTX, train_ctx)
        n_ctx = n_ctx if n_ctx > 0 else train_ctx
        if not 0 < n_ctx <= limits.N_CTX_MAX:
            raise EftError(f"{self.path}: n_ctx {n_ctx} (the training context in its metadata)"
                           f" is outside [1, {limits.N_CTX_MAX}]; set n_ctx")
        self._check_memory(n_ctx, train_ctx, n_gpu_layers)
        cparams.n_ctx = n_ctx
        cparams.n_batch = cparams.n_ubatch = min(n_batch, cparams.n_ctx)
        cparams.n_threads = cparams.n_threads_batch = max(1, n_threads)
        self.threads = max(1, n_threads)
        """Threads used for decoding and prompts (:meth:`set_threads`)."""
        cparams.no_perf = True
        _forget_errors()
        self._ctx = interruptible(lambda _stop: L.llama_init_from_model(self._model, cparams),
                                  discard=lambda ctx: ctx and L.llama_free(ctx),
                                  name="llama.cpp context")
        if not self._ctx:
            raise EftError(f"{self.path}: could not create a context with n_ctx={n_ctx}"
                           f" ({_last_error() or 'out of memory?'})")
        self.n_ctx = int(L.llama_n_ctx(self._ctx))
        self.n_ctx_train = train_ctx
        self.n_batch = int(cparams.n_batch)
        self.n_gpu_layers = n_gpu_layers if supports_gpu_offload() else 0
        """Layers offloaded to the GPU as asked (-1: all); 0 where llama.cpp cannot offload."""
        self.n_layer = int(L.llama_model_n_layer(self._model))
        self._batch = L.llama_batch_init(self.n_batch, 0, 1)
        self._mem = L.llama_get_memory(self._ctx)
        self.tokens: list[int] = []
        self.partial_rewind = not (L.llama_model_is_recurrent(self._model)
                                   or L.llama_model_is_hybrid(self._model))
        """False for recurrent and hybrid models: a rollback clears the cache and evaluates
        the kept tokens again (see :meth:`rewind`)."""
        self.full_rewinds = 0
        """Rollbacks that had to clear the cache and evaluate the kept tokens again."""
        self.can_shift = self.partial_rewind and bool(L.llama_memory_can_shift(self._mem))
        """True when a span can be cut out of the cache and the later positions moved down
        (:meth:`cut`): llama.cpp re-rotates their keys (RoPE) instead of evaluating them."""
        self._piece_buf = ctypes.create_string_buffer(64)

    @property
    def offloaded(self) -> bool:
        """Every layer runs on the GPU: CPU threads hardly change its speed."""
        return self.n_gpu_layers != 0 and fully_offloaded(self.n_gpu_layers, self.n_layer)

    def kv_cache_bytes(self, n_ctx: int) -> int:
        """Estimated bytes of the KV cache for ``n_ctx`` positions (f16, every layer); 0 for
        models whose cache does not grow with the context (recurrent) or is windowed."""
        m = self._model
        if (L.llama_model_is_recurrent(m) or L.llama_model_is_hybrid(m)
                or L.llama_model_n_swa(m) > 0):
            return 0
        n_head = max(1, int(L.llama_model_n_head(m)))
        head = int(L.llama_model_n_embd(m)) // n_head
        arch = self.metadata("general.architecture") or ""

        def length(key: str) -> int:
            value = self.metadata(f"{arch}.attention.{key}")
            return int(value) if value and value.isdigit() else head

        return limits.kv_cache_bytes(n_ctx, n_layer=int(L.llama_model_n_layer(m)),
                                     n_head_kv=int(L.llama_model_n_head_kv(m)),
                                     k_len=length("key_length"), v_len=length("value_length"))

    def _check_memory(self, n_ctx: int, train_ctx: int, n_gpu_layers: int) -> None:
        """Refuse a context whose KV cache cannot fit in memory (CPU caches only)."""
        if n_gpu_layers != 0:
            return  # the cache lives on the GPU: llama.cpp reports what does not fit
        need = self.kv_cache_bytes(n_ctx)
        avail = limits.available_memory()
        if avail is not None and need > avail:
            raise EftError(
                f"{self.path}: n_ctx={n_ctx} needs about {limits.size_text(need)} for the KV "
                f"cache, more than the {limits.size_text(avail)} of memory available; lower "
                f"--n-ctx or n_ctx (this model was trained with {train_ctx})")

    # -- metadata -------------------------------------------------------------------------
    def metadata(self, key: str) -> str | None:
        """A GGUF metadata value as a string, or None."""
        size = 256
        while True:
            buf = ctypes.create_string_buffer(size)
            n = L.llama_model_meta_val_str(self._model, key.encode(), buf, size)
            if n < 0:
                return None
            if n < size:
                return buf.value.decode("utf-8", "replace")
            size = n + 1

    def chat_template(self) -> str | None:
        """The model's default chat template (tokenizer.chat_template), if any."""
        raw = L.llama_model_chat_template(self._model, None)
        return raw.decode("utf-8") if raw else None

    def vocab(self) -> VocabInfo:
        """This model's vocabulary description."""
        return _vocab_info(self._model, self.path)

    def is_eog(self, token: int) -> bool:
        """True for end-of-generation tokens (EOS, end-of-turn...)."""
        return bool(L.llama_vocab_is_eog(self._vocab, token))

    def file_size(self) -> int:
        """Bytes of the GGUF file."""
        return self.path.stat().st_size

    # -- text -----------------------------------------------------------------------------
    def tokenize(self, text: str, *, add_bos: bool, special: bool) -> list[int]:
        """Text to token ids; ``add_bos`` adds BOS only where the model's vocab asks for it."""
        try:
            data = text.encode("utf-8")
        except UnicodeEncodeError as exc:
            before = text[max(0, exc.start - 12):exc.start]
            raise EftError(f"the text is not valid UTF-8: {undecodable(text[exc.start])} "
                           f"after {before!r}") from None
        cap = len(data) + 8
        buf = (L.llama_token * cap)()
        n = L.llama_tokenize(self._vocab, data, len(data), buf, cap, add_bos, special)
        if n < 0:
            cap = -n
            buf = (L.llama_token * cap)()
            n = L.llama_tokenize(self._vocab, data, len(data), buf, cap, add_bos, special)
        return list(buf[:n])

    def piece(self, token: int, *, special: bool = False) -> bytes:
        """The bytes of one token (any length; control tokens empty unless ``special``)."""
        buf = self._piece_buf
        n = L.llama_token_to_piece(self._vocab, token, buf, len(buf), 0, special)
        if n < 0:
            self._piece_buf = buf = ctypes.create_string_buffer(-n)
            n = L.llama_token_to_piece(self._vocab, token, buf, len(buf), 0, special)
        return buf.raw[:n]

    # -- evaluation -----------------------------------------------------------------------
    def eval(self, tokens: list[int], *, all_logits: bool = False) -> np.ndarray:
        """Append ``tokens`` to the cache; return copied logit rows, shape (rows, n_vocab).

        Rows are for every new position when ``all_logits``, else for the last one only.
        """
        if not tokens:
            raise ValueError("eval needs at least one token")
        if len(self.tokens) + len(tokens) > self.n_ctx:
            raise EftError(f"{self.path.name}: context full ({len(self.tokens)} + "
                           f"{len(tokens)} tokens > n_ctx {self.n_ctx})")
        rows = []
        b = self._batch
        start_len = len(self.tokens)
        try:
            for start in range(0, len(tokens), self.n_batch):
                chunk = tokens[start:start + self.n_batch]
                last_chunk = start + len(chunk) == len(tokens)
                base = len(self.tokens)
                for i, tok in enumerate(chunk):
                    b.token[i] = tok
                    b.pos[i] = base + i
                    b.n_seq_id[i] = 1
                    b.seq_id[i][0] = 0
                    b.logits[i] = all_logits or (last_chunk and i == len(chunk) - 1)
                b.n_tokens = len(chunk)
                rc = L.llama_decode(self._ctx, b)
                if rc != 0:
                    raise EftError(f"{self.path.name}: llama_decode failed (code {rc})")
                self.tokens.extend(chunk)
                wanted = range(len(chunk)) if all_logits else (
                    [len(chunk) - 1] if last_chunk else [])
                for i in wanted:
                    ptr = L.llama_get_logits_ith(self._ctx, i)
                    rows.append(np.ctypeslib.as_array(ptr, shape=(self.n_vocab,)).copy())
        except BaseException:  # a failed decode or Ctrl-C: the cache keeps what it had
            self._drop_from(start_len)
            raise
        return np.stack(rows)

    def eval_into(self, tokens: list[int], out: np.ndarray) -> None:
        """Like :meth:`eval` for the last row only, copied into ``out`` (the first
        ``out.size`` logits): no allocation per step."""
        if len(tokens) > 1:
            out[:] = self.eval(tokens)[-1, : out.size]
            return
        if len(self.tokens) + 1 > self.n_ctx:
            raise EftError(f"{self.path.name}: context full ({len(self.tokens)} + 1 tokens > "
                           f"n_ctx {self.n_ctx})")
        b = self._batch
        b.token[0], b.pos[0], b.n_seq_id[0], b.seq_id[0][0], b.logits[0] = (
            tokens[0], len(self.tokens), 1, 0, True)
        b.n_tokens = 1
        start_len = len(self.tokens)
        try:
            rc = L.llama_decode(self._ctx, b)
            if rc != 0:
                raise EftError(f"{self.path.name}: llama_decode failed (code {rc})")
            self.tokens.append(tokens[0])
        except BaseException:  # a failed decode or Ctrl-C: the cache keeps what it had
            self._drop_from(start_len)
            raise
        ptr = L.llama_get_logits_ith(self._ctx, 0)
        out[:] = np.ctypeslib.as_array(ptr, shape=(self.n_vocab,))[: out.size]

    def rewind(self, n_past: int) -> None:
        """Drop cached positions from ``n_past`` on. Where the cache cannot drop part of a
        sequence (recurrent and hybrid models), it is cleared and the kept tokens are
        evaluated again from position 0, as llama-server does."""
        if n_past >= len(self.tokens):
            return
        keep = self.tokens[:n_past]
        if not self._drop_from(n_past) and keep:
            self.eval(keep)

    def cut(self, start: int, end: int) -> bool:
        """Remove cached positions ``start`` to ``end`` (exclusive) and move every later
        position down by ``end - start``: ``tokens`` becomes ``tokens[:start] +
        tokens[end:]``, each token at its new position. llama.cpp rotates the moved keys at
        the next decode (one pass over the whole cache); their values still carry what they
        attended to, so later logits differ slightly from a fresh evaluation. False, with
        nothing changed, when this model cannot shift (:attr:`can_shift`)."""
        if not 0 <= start < end <= len(self.tokens):
            raise ValueError(f"cut({start}, {end}) outside the {len(self.tokens)} cached tokens")
        if not self.can_shift or not L.llama_memory_seq_rm(self._mem, 0, start, end):
            return False
        L.llama_memory_seq_add(self._mem, 0, end, -1, start - end)
        del self.tokens[start:end]
        return True

    def _drop_from(self, n_past: int) -> bool:
        """Remove positions from ``n_past`` on; False when llama.cpp cannot remove part of
        the sequence: then the whole cache is cleared (``tokens`` becomes empty)."""
        if L.llama_memory_seq_rm(self._mem, 0, n_past, -1):
            del self.tokens[n_past:]
            return True
        L.llama_memory_clear(self._mem, True)
        self.tokens.clear()
        self.full_rewinds += 1
        return False

    def set_threads(self, n_threads: int) -> None:
        """Change the number of threads used for decoding (and prompts)."""
        n = max(1, n_threads)
        if n != self.threads:
            L.llama_set_n_threads(self._ctx, n, n)
            self.threads = n

    def close(self) -> None:
        """Free the context and weights (idempotent)."""
        if getattr(self, "_batch", None) is not None:
            L.llama_batch_free(self._batch)
            self._batch = None
        if getattr(self, "_ctx", None):
            L.llama_free(self._ctx)
            self._ctx = None
        if getattr(self, "_model", None):
            L.llama_model_free(self._model)
            self._model = None

    def __del__(self, _suppress: type[contextlib.suppress] = contextlib.suppress) -> None:
        with _suppress(Exception):  # bound early: at interpreter shutdown globals are None
            self.close()


# -- grammars: llama.cpp's own engine (GBNF) and llama-cpp-python's JSON-schema converter ----
JSON_CHAR = r'char ::= [^"\\\x7F\x00-\x1F] | [\\] (["\\/bfnrt] | "u" [0-9a-fA-F]{4})'
"""llama.cpp's own JSON string character (its C++ converter): no raw control characters."""


def _grammar_sampler(vocab, text: str) -> tuple[int | None, str]:
    """llama.cpp's grammar sampler for ``text``, or None and why (printed on fd 2)."""
    _ensure_backend()  # its log callback keeps the errors
    with _init_lock, tempfile.TemporaryFile() as err:  # one fd-2 swap at a time
        saved = os.dup(2)
        os.dup2(err.fileno(), 2)
        try:
            _forget_errors()
            handle = L.llama_sampler_init_grammar(vocab, text.encode("utf-8"), b"root")
        finally:
            os.dup2(saved, 2)
            os.close(saved)
        err.seek(0)
        found = re.search(rb"error parsing grammar: ([^\n]*)", err.read())
    why = found.group(1).decode("utf-8", "replace") if found else _last_error()
    return handle or None, (why or "not valid GBNF").strip().removesuffix(" at")


@functools.lru_cache(maxsize=64)
def check_grammar(text: str) -> str:
    """``text`` if llama.cpp parses it (once per text; token references need a model)."""
    handle, why = _grammar_sampler(None, text)
    if handle is None and "no vocab" not in why:
        raise EftError(f"invalid grammar: {why}")
    if handle is not None:
        L.llama_sampler_free(handle)
    return text


def json_schema_grammar(schema: object, name: str = "") -> str:
    """GBNF for a JSON schema (llama-cpp-python's converter); top rule ``name`` or root."""
    try:
        conv = llama_grammar.SchemaConverter(prop_order={}, allow_fetch=False, dotall=False,
                                             raw_pattern=False)
        conv.visit(conv.resolve_refs(json.loads(json.dumps(schema)), "schema"), name)
        return re.sub(r"(?m)^char ::= .*$", lambda _: JSON_CHAR, conv.format_grammar())
    except (RecursionError, Exception) as exc:  # the converter asserts, raises, recurses
        raise EftError(f"cannot turn the JSON schema into a grammar: {exc!s:.200}") from None


class Grammar:
    """llama.cpp's grammar sampler over a model's vocabulary: what may come next."""

    def __init__(self, model: LlamaModel, text: str, *, _handle: int | None = None) -> None:
        self.model, self.text = model, text  # the model owns the vocabulary: keep it alive
        self._handle, why = (_handle, "") if _handle else _grammar_sampler(model._vocab, text)
        if not self._handle:
            raise EftError(f"invalid grammar: {why}")

    def allowed(self, tokens: np.ndarray) -> np.ndarray:
        """Bool array: which of ``tokens`` (ids) the grammar allows next."""
        data = np.zeros(len(tokens), dtype=[("id", "i4"), ("logit", "f4"), ("p", "f4")])
        data["id"] = tokens
        array = L.llama_token_data_array(data=data.ctypes.data_as(L.llama_token_data_p),
                                         size=data.size, selected=-1, sorted=False)
        L.llama_sampler_apply(self._handle, ctypes.byref(array))
        return data["logit"] != -np.inf

    def accept(self, token: int) -> None:
        """Advance past ``token``, which must be allowed (llama.cpp aborts otherwise)."""
        if not self.allowed(np.array([token]))[0]:
            raise EftError(f"token {token} does not fit the grammar here")
        L.llama_sampler_accept(self._handle, token)

    def clone(self) -> Grammar:
        """An independent copy of this state."""
        return Grammar(self.model, self.text, _handle=L.llama_sampler_clone(self._handle))

    def __del__(self) -> None:
        if getattr(self, "_handle", None):
            L.llama_sampler_free(self._handle)


def raw_decode_seconds(path: str | Path, *, n_threads: int, n_tokens: int = 32,
                       context: int = 16, n_ctx: int = 256, n_gpu_layers: int = 0) -> float:
    """Median seconds per one-token decode of ``path`` driven by llama-cpp-python's
    low-level API with nothing else around it (greedy argmax of the logits row): the
    baseline that measures what eft-local's own per-step work costs."""
    return raw_speed(path, n_threads=n_threads, n_tokens=n_tokens, context=context,
                     n_ctx=n_ctx, n_gpu_layers=n_gpu_layers)[0]


def raw_speed(path: str | Path, *, n_threads: int, n_tokens: int = 32, context: int = 16,
              n_ctx: int = 256, prompt_tokens: int = 0, n_gpu_layers: int = 0
              ) -> tuple[float, float | None]:
    """llama.cpp alone, through the low-level API: median seconds per one-token decode
    (greedy argmax of each row) after a ``context``-token prompt, and with
    ``prompt_tokens`` the seconds to evaluate a prompt that long from an empty cache (one
    batch, logits of its last token) before that; else None. ``n_gpu_layers`` as for
    :class:`LlamaModel` (a baseline offloads what the runs it is compared with offload)."""
    import statistics
    import time

    _ensure_backend()
    model = _load_model(Path(path), vocab_only=False, n_gpu_layers=n_gpu_layers)
    cparams = L.llama_context_default_params()
    n_ctx = max(n_ctx, prompt_tokens + 1, context + n_tokens + 1)
    cparams.n_ctx = cparams.n_batch = cparams.n_ubatch = n_ctx
    cparams.n_threads = cparams.n_threads_batch = n_threads
    cparams.no_perf = True
    ctx = L.llama_init_from_model(model, cparams)
    batch = L.llama_batch_init(n_ctx, 0, 1)
    n_vocab = L.llama_vocab_n_tokens(L.llama_model_get_vocab(model))

    def fill(n: int) -> None:
        for i in range(n):
            batch.token[i], batch.pos[i], batch.n_seq_id[i] = (7 * i + 3) % 200 + 5, i, 1
            batch.seq_id[i][0], batch.logits[i] = 0, i == n - 1
        batch.n_tokens = n

    try:
        prefill = None
        if prompt_tokens:
            fill(min(8, prompt_tokens))  # warm up: the first decode sets buffers up
            L.llama_decode(ctx, batch)
            L.llama_memory_clear(L.llama_get_memory(ctx), True)
            fill(prompt_tokens)
            start = time.perf_counter()
            L.llama_decode(ctx, batch)
            np.ctypeslib.as_array(L.llama_get_logits_ith(ctx, -1), shape=(n_vocab,)).argmax()
            prefill = time.perf_counter() - start
            L.llama_memory_clear(L.llama_get_memory(ctx), True)
        fill(context)
        L.llama_decode(ctx, batch)
        token, times = 5, []
        for pos in range(context, context + n_tokens):
            start = time.perf_counter()
            batch.token[0], batch.pos[0], batch.n_seq_id[0] = token, pos, 1
            batch.seq_id[0][0], batch.logits[0] = 0, True
            batch.n_tokens = 1
            L.llama_decode(ctx, batch)
            row = np.ctypeslib.as_array(L.llama_get_logits_ith(ctx, 0), shape=(n_vocab,))
            token = int(np.argmax(row)) % 200 + 5  # stay on ordinary tokens
            times.append(time.perf_counter() - start)
        return statistics.median(times), prefill
    finally:
        L.llama_batch_free(batch)
        L.llama_free(ctx)
        L.llama_model_free(model)


def quantize_gguf(src: str | Path, dst: str | Path, kind: str = "q8_0",
                  n_threads: int = 0, *, allow_requantize: bool = False) -> Path:
    """Quantize a GGUF file with llama.cpp's quantizer into ``dst``, written atomically
    (a hidden temporary file beside it, renamed when complete; removed on any failure).

    ``kind`` is one of :data:`QUANT_TYPES` (any case). A source that is already quantized
    is refused unless ``allow_requantize``: its precision would be lost twice.
    """
    name = kind.strip().lower()
    if name not in QUANT_TYPES:
        raise EftError(f"unknown quantization type {kind!r} (choose from "
                       f"{', '.join(t.upper() if t[0] == 'q' else t for t in QUANT_TYPES)})")
    src, dst = Path(src), Path(dst)
    _check_file(src)
    if dst.is_dir():
        raise EftError(f"{dst}: is a directory; give the output file name")
    if not dst.parent.is_dir():
        raise EftError(f"{dst}: folder {dst.parent} does not exist")
    if dst.exists() and dst.resolve() == src.resolve():
        raise EftError(f"{dst}: is the input file; write the output to another file")
    _ensure_backend()
    params = L.llama_model_quantize_default_params()
    params.ftype = QUANT_TYPES[name]
    params.nthread = n_threads
    params.allow_requantize = allow_requantize
    _forget_errors()
    with atomic_path(dst) as tmp:

        def work(stop: Stop) -> int:
            stop.parkable = True  # it cannot return early: Ctrl-C parks it at a log line
            return L.llama_model_quantize(str(src).encode(), str(tmp).encode(),
                                          ctypes.byref(params))

        rc = interruptible(work, name="llama.cpp quantize")
        if rc != 0:
            why = _last_error()
            found = re.search(r"requantizing from type (\S+)", why)
            if found:
                raise EftError(f"{src}: already quantized ({found.group(1)}); "
                               "quantizing again loses precision twice: allow it with "
                               "--allow-requantize")
            raise EftError(f"{src}: quantization to {name} failed ({why or f'code {rc}'})")
    return dst
