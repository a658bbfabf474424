"""Models: loading GGUF files, evaluating token batches, rolling the KV cache back.

:class:`LlamaModel` holds one or several sequences (:mod:`~eft_local.backend.sequences`
evaluates them: logits only on the positions asked for, never ``n_ctx x vocab`` arrays;
rollback with ``llama_memory_seq_rm``; shifting after a chat dropped its oldest turns), checks
that their KV cache fits in memory, and turns tokens into bytes without the 32-byte
truncation of ``Llama.detokenize``; :func:`read_vocab` reads a vocabulary without the weights.
"""

from __future__ import annotations

import contextlib
import ctypes
from pathlib import Path

from eft_local import ggufscan, limits
from eft_local.backend import library
from eft_local.backend.library import (
    DEFAULT_N_CTX,
    L,
    _ensure_backend,
    _forget_errors,
    _last_error,
    _progress,
    fully_offloaded,
)
from eft_local.backend.sequences import Part, Sequences
from eft_local.errors import EftError
from eft_local.interrupts import interruptible
from eft_local.text import undecodable
from eft_local.vocab import VOCAB_TYPES, VocabInfo

__all__ = ["LlamaModel", "Part", "read_vocab"]


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


FLASH_ATTN = {"auto": -1, "off": 0, "on": 1}
"""llama.cpp's ``llama_flash_attn_type`` by name (``-fa`` of llama.cpp's tools)."""
CTX_PAD = 256
"""llama.cpp rounds a context up to a multiple of this (``llama-context.cpp``): each of
several sequences gets the context one sequence alone would get."""


class LlamaModel(Sequences):
    """One GGUF model with its own context and KV cache holding ``n_seq`` sequences, each
    of up to ``n_ctx`` tokens (a cache stream per sequence, or with ``kv_unified`` one cache
    for all: see :mod:`~eft_local.backend.sequences`).

    ``tokens`` is what the KV cache holds for sequence 0 (``seq_tokens(s)`` for the
    others); :meth:`eval` appends to it and :meth:`rewind` truncates it; :meth:`decode`
    evaluates several sequences in one ``llama_decode``. Not thread-safe: use one object per
    thread.
    """

    def __init__(self, path: str | Path, *, n_ctx: int | None = None, n_gpu_layers: int = 0,
                 n_threads: int = 1, n_batch: int = 512, n_seq: int = 1,
                 kv_unified: bool = False, flash_attn: str = "auto") -> None:
        self.path = Path(path)
        self._model = self._ctx = self._batch = None
        try:
            self._open(n_ctx, n_gpu_layers, n_threads, n_batch, n_seq, kv_unified, flash_attn)
        except BaseException:  # free what was made, once: close() is idempotent
            self.close()
            raise

    def _open(self, n_ctx: int | None, n_gpu_layers: int, n_threads: int, n_batch: int,
              n_seq: int, kv_unified: bool = False, flash_attn: str = "auto") -> None:
        if n_ctx is not None:
            limits.check_n_ctx(n_ctx, str(self.path))
        limits.check_n_seq(n_seq, str(self.path))
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
        self._check_memory(n_ctx, train_ctx, n_gpu_layers, n_seq)
        cparams.n_ctx = n_ctx if n_seq == 1 else -(-n_ctx // CTX_PAD) * CTX_PAD * n_seq
        cparams.n_seq_max = n_seq
        cparams.kv_unified = self.kv_unified = n_seq > 1 and kv_unified  # module doc
        if flash_attn not in FLASH_ATTN:
            raise EftError(f"{self.path}: flash_attn {flash_attn!r}: choose auto, on or off")
        cparams.flash_attn_type = FLASH_ATTN[flash_attn]
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
            seqs = f" and n_seq={n_seq}" if n_seq > 1 else ""
            raise EftError(f"{self.path}: could not create a context with n_ctx={n_ctx}{seqs}"
                           f" ({_last_error() or 'out of memory?'})")
        self._cells = int(L.llama_n_ctx(self._ctx))
        self.n_ctx = self._cells // n_seq
        """Tokens each sequence may hold."""
        self.n_ctx_train = train_ctx
        self.n_batch = int(cparams.n_batch)
        self.n_gpu_layers = n_gpu_layers if library.supports_gpu_offload() else 0
        """Layers offloaded to the GPU as asked (-1: all); 0 where llama.cpp cannot offload."""
        self.n_layer = int(L.llama_model_n_layer(self._model))
        self._batch = L.llama_batch_init(self.n_batch, 0, 1)
        self._mem = L.llama_get_memory(self._ctx)
        self._init_sequences(n_seq)
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
        self.kv_bytes_per_seq = self.kv_cache_bytes(self.n_ctx)
        """Estimated bytes of one sequence's KV cache (``n_seq`` of them are allocated)."""

    @property
    def offloaded(self) -> bool:
        """Every layer runs on the GPU: CPU threads hardly change its speed."""
        return self.n_gpu_layers != 0 and fully_offloaded(self.n_gpu_layers, self.n_layer)

    def kv_cache_bytes(self, n_ctx: int, n_seq: int = 1) -> int:
        """Estimated bytes of the KV cache for ``n_seq`` sequences of ``n_ctx`` positions
        (f16, every layer); 0 for models whose cache does not grow with the context
        (recurrent) or is windowed."""
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
                                     k_len=length("key_length"), v_len=length("value_length"),
                                     n_seq=n_seq)

    def _check_memory(self, n_ctx: int, train_ctx: int, n_gpu_layers: int, n_seq: int = 1
                      ) -> None:
        """Refuse a context whose KV cache cannot fit in memory (CPU caches only; llama.cpp
        refuses a GPU cache that does not fit when the context is made)."""
        if n_gpu_layers != 0:
            return  # the cache lives on the GPU: llama.cpp reports what does not fit
        need = self.kv_cache_bytes(n_ctx, n_seq)
        avail = limits.available_memory()
        if avail is None or need <= avail:
            return
        if n_seq == 1:
            raise EftError(
                f"{self.path}: n_ctx={n_ctx} needs about {limits.size_text(need)} for the KV "
                f"cache, more than the {limits.size_text(avail)} of memory available; lower "
                f"--n-ctx or n_ctx (this model was trained with {train_ctx})")
        one = limits.size_text(self.kv_cache_bytes(n_ctx))
        raise EftError(
            f"{self.path}: {n_seq} sequences of n_ctx={n_ctx} need about {n_seq} x {one} = "
            f"{limits.size_text(need)} for the KV cache, more than the "
            f"{limits.size_text(avail)} of memory available; lower n_seq or n_ctx (this "
            f"model was trained with {train_ctx})")

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
