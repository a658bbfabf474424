"""What else eft-local asks of llama.cpp: grammars, the quantizer, and llama.cpp alone as
the speed baseline.

:class:`Grammar` wraps llama.cpp's grammar sampler (GBNF; JSON schemas converted by the
converter llama-cpp-python ships); :func:`quantize_gguf` writes a quantized copy through an
atomic temporary; :func:`raw_speed` decodes with the low-level API and nothing around it.
"""

from __future__ import annotations

import ctypes
import functools
import json
import os
import re
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from eft_local import ranges
from eft_local.backend import model as models
from eft_local.backend.library import (
    QUANT_TYPES,
    L,
    _ensure_backend,
    _forget_errors,
    _init_lock,
    _last_error,
    llama_grammar,
)
from eft_local.backend.model import LlamaModel, _check_file
from eft_local.errors import EftError
from eft_local.files import atomic_path
from eft_local.gbnf import MAX_STEP_SECONDS, check_gbnf
from eft_local.interrupts import Stop, check_cancelled, interruptible

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
    """``text`` if it is within the bounds of :func:`eft_local.gbnf.check_gbnf` and
    llama.cpp parses it (once per text; token references need a model)."""
    check_gbnf(text)
    handle, why = _grammar_sampler(None, text)
    if handle is None and "no vocab" not in why:
        raise EftError(f"invalid grammar: {why}")
    if handle is not None:
        L.llama_sampler_free(handle)
    return text


def json_schema_grammar(schema: object, name: str = "") -> str:
    """GBNF for a JSON schema (llama-cpp-python's converter); top rule ``name`` or root.
    A ``$ref`` that is not local (``#...``) is refused here, before the converter, which
    would fetch a URL where ``python -O`` drops its ``assert``. Bound the schema first
    (:func:`eft_local.schema.schema_grammar` does)."""
    remote = _remote_ref(schema)
    if remote is not None:
        raise EftError(f"'$ref' {remote[:100]!r}: only references inside the schema "
                       "(starting with '#') are followed; nothing is fetched")
    conv = _Converter(prop_order={}, allow_fetch=False, dotall=False, raw_pattern=False)
    try:
        conv.visit(conv.resolve_refs(json.loads(json.dumps(schema)), "schema"), name)
        return re.sub(r"(?m)^char ::= .*$", lambda _: JSON_CHAR, conv.format_grammar())
    except _TooMuch:
        raise EftError(f"the JSON schema makes the converter visit more than {MAX_VISITS:,} "
                       "schemas (the limit; each 'allOf' copies the properties of what its "
                       "'$ref's name)") from None
    except (RecursionError, Exception) as exc:  # the converter asserts, raises, recurses
        raise EftError(f"cannot turn the JSON schema into a grammar: {exc!s:.200}") from None


MAX_VISITS = 10_000
"""Schemas llama-cpp-python's converter may visit for one schema. It visits each once,
except what ``allOf`` copies: the properties of each ``$ref`` it lists, again every time
(5,000 references to one 200-property object, a 114 kB schema, took 21 s; an object of
5,000 properties is 5,001 visits)."""


class _TooMuch(Exception):
    pass


class _Converter(llama_grammar.SchemaConverter):
    """llama-cpp-python's converter, counting the schemas it visits (:data:`MAX_VISITS`),
    with number ranges (:mod:`eft_local.ranges`: its own converter leaves them out) and
    ``"type": [...]`` keeping the schema's other keywords in each type's branch (its own
    converter drops them)."""

    visits = 0

    def visit(self, schema, name):  # noqa: ANN001, ANN201 - the converter's own signature
        self.visits += 1
        if self.visits > MAX_VISITS:
            raise _TooMuch
        if not isinstance(schema, dict) or any(k in schema for k in _FIRST):
            return super().visit(schema, name)
        kind = schema.get("type")
        if isinstance(kind, list) and len(schema) > 1:
            rest = {k: v for k, v in schema.items() if k != "type"}
            return super().visit({"anyOf": [{**rest, "type": t} for t in kind]}, name)
        if kind in ("integer", "number") and ranges.has_range(schema):
            rule = ranges.range_rule(schema, integer=kind == "integer")
            shared = self._add_rule(f"{kind}-range", f"({rule}) space")
            reserved = name in llama_grammar.RESERVED_NAMES
            return self._add_rule(f"{name}-" if reserved else name or "root", shared)
        return super().visit(schema, name)


_FIRST = ("$ref", "oneOf", "anyOf", "const", "enum")
"""Keywords the converter reads before a schema's type: a schema with one of them is its
converter's alone."""


def _remote_ref(schema: object) -> str | None:
    """The first ``$ref`` anywhere in ``schema`` that does not start with ``#`` (as text),
    looked for where the converter's ``resolve_refs`` looks: in every object and list."""
    todo = [schema]
    while todo:
        node = todo.pop()
        if isinstance(node, Mapping):
            ref = node.get("$ref")
            if ref is not None and not (isinstance(ref, str) and ref.startswith("#")):
                return str(ref)
            todo.extend(node.values())
        elif isinstance(node, (list, tuple)):
            todo.extend(node)
    return None


CHUNK = 4096
"""Tokens per llama.cpp call when a grammar is asked about many: between two calls a
cancelled job stops (:func:`eft_local.interrupts.check_cancelled`), Ctrl-C reaches the CLI,
and the time limit of one token (:data:`eft_local.gbnf.MAX_STEP_SECONDS`) is checked."""


class Grammar:
    """llama.cpp's grammar sampler over a model's vocabulary: what may come next.

    The grammar's work for one token (its checks and the accept) may take at most
    :data:`~eft_local.gbnf.MAX_STEP_SECONDS`: llama.cpp follows every alternative that may
    come next, and a grammar whose alternatives multiply with the text can take minutes
    per token; it is stopped with a one-line error instead."""

    def __init__(self, model: LlamaModel, text: str, *, _handle: int | None = None) -> None:
        self.model, self.text = model, text  # the model owns the vocabulary: keep it alive
        if not _handle:
            check_grammar(text)
        self._handle, why = (_handle, "") if _handle else _grammar_sampler(model._vocab, text)
        if not self._handle:
            raise EftError(f"invalid grammar: {why}")
        self._spent = 0.0  # seconds of grammar work since the last accepted token

    def allowed(self, tokens: np.ndarray) -> np.ndarray:
        """Bool array: which of ``tokens`` (ids) the grammar allows next."""
        data = np.zeros(len(tokens), dtype=[("id", "i4"), ("logit", "f4"), ("p", "f4")])
        data["id"] = tokens
        for start in range(0, data.size, CHUNK):
            check_cancelled()
            part = data[start:start + CHUNK]
            array = L.llama_token_data_array(data=part.ctypes.data_as(L.llama_token_data_p),
                                             size=part.size, selected=-1, sorted=False)
            began = time.perf_counter()
            L.llama_sampler_apply(self._handle, ctypes.byref(array))
            self._spend(time.perf_counter() - began)
        return data["logit"] != -np.inf

    def accept(self, token: int) -> None:
        """Advance past ``token``, which must be allowed (llama.cpp aborts otherwise)."""
        if not self.allowed(np.array([token]))[0]:
            raise EftError(f"token {token} does not fit the grammar here")
        began = time.perf_counter()
        L.llama_sampler_accept(self._handle, token)
        self._spend(time.perf_counter() - began)
        self._spent = 0.0

    def clone(self) -> Grammar:
        """An independent copy of this state."""
        return Grammar(self.model, self.text, _handle=L.llama_sampler_clone(self._handle))

    def _spend(self, seconds: float) -> None:
        self._spent += seconds
        if self._spent > MAX_STEP_SECONDS:
            raise EftError(f"the grammar took more than {MAX_STEP_SECONDS:g} s for one token "
                           "(the limit): its alternatives multiply as the text grows; "
                           "simplify it")

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

    _ensure_backend()
    model = models._load_model(Path(path), vocab_only=False, n_gpu_layers=n_gpu_layers)
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
