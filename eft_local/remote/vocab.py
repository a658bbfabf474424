"""A remote model's vocabulary, read through its engine's own endpoints, and cached.

- eft-local (``GET /eft/vocab``): exactly what a local GGUF file gives (stored token texts,
  attributes, end-of-generation ids, BOS/EOS, ``add_bos``) plus each id's piece, the context
  size and the chat template; a hash of the vocabulary comes first, so the whole of it is
  downloaded only when the cache does not hold it.
- llama-server: ``/v1/models`` (vocabulary type and size, context), ``/props`` (BOS and EOS
  text, chat template, model path) and ``POST /tokenize`` with the ids themselves as the
  content and ``with_pieces`` (every id's piece in one request).
- OpenAI-compatible servers: ``/tokenizer_info`` for the size where there is one (vLLM's
  needs ``--enable-tokenizer-info-endpoint`` and tells no size: the local models' is taken),
  and one ``/detokenize`` (vLLM's shape; ``/extras/detokenize`` for llama-cpp-python's
  server) per id, several at a time. They tell no vocabulary type (compared without one)
  and spell pieces as text: a token that is not whole UTF-8 characters reads as U+FFFD
  (:attr:`eft_local.vocab.VocabInfo.lossy`: such ids are compared as text only). vLLM's
  ``/tokenize`` (with and without special tokens) tells whether a BOS is added, and which.

The last two show only what each id decodes to, so the alignment check compares every
model by those pieces when such an engine is among them (:func:`eft_local.vocab.comparable`).
Vocabularies are cached in ``$XDG_CACHE_HOME/eft-local/remote/`` under the URL, the model
name and what identifies the tokenizer: eft-local's vocabulary hash; llama-server's model
metadata and path; for the others the model card's name fields, ``/tokenizer_info`` and the
tokens of a probe text (:func:`tokenizer_fingerprint`), never what changes between calls
(vLLM's card has a new ``created`` and permission id every time).
"""

from __future__ import annotations

import base64
import hashlib
import json
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from eft_local.errors import EftError
from eft_local.files import atomic_write, cache_dir
from eft_local.limits import N_CTX_MAX
from eft_local.presets import ModelSpec
from eft_local.remote.exact import VOCAB_PATH, pack_bytes, unpack_bytes
from eft_local.remote.http import ANSWER_HEADROOM, Endpoint
from eft_local.remote.topk import DEFAULT_TOP_K
from eft_local.vocab import ATTR_CONTROL, UNKNOWN_TYPE, VOCAB_TYPES, VocabInfo

CACHE_VERSION = 1
TOKENIZE_CHUNK = 8192
"""Ids per ``/tokenize`` request when llama-server spells its vocabulary."""
DETOKENIZE_THREADS = 8
VOCAB_MAX = 1 << 20
"""The most tokens a remote vocabulary may claim (1,048,576; the largest real ones have
about 262,000): checked before anything is read token by token."""
VOCAB_RATIO_MAX = 2
"""A remote vocabulary may be at most this many times the local models' (a family's
sizes differ by padding, a few percent)."""
VOCAB_BYTES_PER_TOKEN = 512
"""JSON bytes per token that a vocabulary answer may take (its text and piece in base64
or escaped, attributes, lengths: a real vocabulary averages under 40)."""


@dataclass(frozen=True)
class RemoteInfo:
    """What a remote model is: how to reach it and its vocabulary."""

    api: str
    model: str | None
    """The name the engine serves it under (OpenAI ``model``; eft-local's preset)."""
    role: str | None
    """eft-local: the role of the served preset that this model is."""
    vocab: VocabInfo
    n_ctx: int
    chat_template: str | None = None
    plain: Mapping[int, bytes] = field(default_factory=dict)
    """Ids whose piece without special tokens differs from :attr:`VocabInfo.pieces`
    (control tokens decode to nothing in generated text)."""


# -- eft-local's payload (the server builds it, the client reads it) ----------------------------
def vocab_from_payload(body: Mapping[str, Any], where: str
                       ) -> tuple[VocabInfo, dict[int, bytes]]:
    """The vocabulary (and the plain pieces that differ) of an ``/eft/vocab`` payload."""
    try:
        n = int(body["n_tokens"])
        texts = unpack_bytes(body["texts"], n, "texts")
        pieces = unpack_bytes(body["pieces"], n, "pieces")
        attrs = tuple(int(a) for a in body["attrs"])
        if len(attrs) != n:
            raise ValueError(f"{len(attrs)} attributes for {n} tokens")
        plain = {int(i): base64.b64decode(b) for i, b in body.get("plain", {}).items()}
        vocab = VocabInfo(path=where, vocab_type=str(body["vocab_type"]), n_tokens=n,
                          bos=int(body["bos"]), eos=int(body["eos"]), eot=int(body["eot"]),
                          eog=frozenset(int(i) for i in body["eog"]),
                          add_bos=bool(body["add_bos"]), add_eos=bool(body["add_eos"]),
                          texts=texts, attrs=attrs, pieces=pieces)
    except (KeyError, TypeError, ValueError) as exc:
        raise EftError(f"{where}: the vocabulary it sent is malformed ({exc})") from None
    return vocab, plain


# -- reading ------------------------------------------------------------------------------------
def detect_api(ep: Endpoint) -> str:
    """eft-local (``/eft/vocab`` answers), llama-server (``/props`` names its build) or
    openai."""
    answer = ep.request("GET", VOCAB_PATH + "?hash_only=1", ok=(200, 400, 404, 405))
    if answer.status in (200, 400):  # 400: a preset of several models, no role named
        return "eft-local"
    answer = ep.request("GET", "/props", ok=(200, 401, 403, 404, 405))
    data = answer.json() if answer.status == 200 else None
    if isinstance(data, dict) and "build_info" in data:
        return "llama-server"
    return "openai"


def read_info(ep: Endpoint, spec: ModelSpec, *, expected: int | None = None,
              say: Any = None) -> RemoteInfo:
    """The remote model of ``spec`` through ``ep`` (the API detected when not given);
    ``expected``: the vocabulary size to read from an engine that does not tell its own."""
    api = spec.api or detect_api(ep)
    if api == "eft-local" or (api == "openai" and _has_eft_vocab(ep)):
        info = _read_eft(ep, spec, api, expected)
        if api == "openai":  # eft-local serve's /v1/completions: its --max-logprobs
            _probe_token_prompts(ep, info.model or "",
                                 min(spec.top_k or DEFAULT_TOP_K, info.vocab.n_tokens))
        return info
    if api == "llama-server":
        return _read_llama_server(ep, spec, expected)
    return _read_openai(ep, spec, expected, say)


def check_size(ep: Endpoint, n: Any, expected: int | None, where: str) -> int:
    """The vocabulary size ``n`` that the engine claims (at ``where``), checked before any
    of it is read: a whole number in [1, :data:`VOCAB_MAX`], and at most
    :data:`VOCAB_RATIO_MAX` times ``expected`` (the local models' size) where known."""
    if isinstance(n, bool) or not isinstance(n, (int, str)) or (
            isinstance(n, str) and not n.strip().isdigit()):
        raise ep.fail(f"{where} gave no vocabulary size (a whole number)")
    size = int(n)
    if not 1 <= size <= VOCAB_MAX:
        raise ep.fail(f"{where} claims a vocabulary of {size} tokens, outside [1, {VOCAB_MAX}] "
                      "(nothing was read)")
    if expected and size > VOCAB_RATIO_MAX * expected:
        raise ep.fail(f"{where} claims a vocabulary of {size} tokens, more than "
                      f"{VOCAB_RATIO_MAX} times the local models' {expected}: not a model of "
                      "their family (nothing was read)")
    return size


def _vocab_limit(n: int) -> int:
    """The size cap of an answer spelling ``n`` tokens."""
    return ANSWER_HEADROOM + n * VOCAB_BYTES_PER_TOKEN


def _has_eft_vocab(ep: Endpoint) -> bool:
    return ep.request("GET", VOCAB_PATH + "?hash_only=1", ok=(200, 400, 404, 405)
                      ).status in (200, 400)


def _query(spec: ModelSpec, role: str | None, **more: str) -> str:
    params = {"model": spec.model, "role": role, **more}
    text = "&".join(f"{k}={v}" for k, v in params.items() if v)
    return f"{VOCAB_PATH}?{text}" if text else VOCAB_PATH


def _read_eft(ep: Endpoint, spec: ModelSpec, api: str, expected: int | None) -> RemoteInfo:
    role = None
    head = ep.request("GET", _query(spec, None, hash_only="1"), ok=(200, 400))
    if head.status == 400:  # several models: the one named like this role
        role = spec.role
        head = ep.request("GET", _query(spec, role, hash_only="1"))
    info = head.json()
    if not isinstance(info, dict) or "hash" not in info:
        raise ep.fail(f"{VOCAB_PATH} answered something that is not a vocabulary description")
    n = check_size(ep, info.get("n_tokens"), expected, VOCAB_PATH)
    key = _cache_key(ep, api, spec.model, role or "", str(info["hash"]))
    body = _cache_load(key)
    try:
        if body is None or body.get("hash") != info["hash"]:
            raise EftError("not cached")
        vocab, plain = vocab_from_payload(body, spec.describe())
    except EftError:  # not cached, or a damaged cache file
        body = ep.json("GET", _query(spec, role), limit=_vocab_limit(n))
        if not isinstance(body, dict) or body.get("hash") != info["hash"]:
            raise ep.fail(f"{VOCAB_PATH} sent a vocabulary whose hash is not the one it "
                          "named") from None
        vocab, plain = vocab_from_payload(body, spec.describe())
        _cache_save(key, body)
    if vocab.n_tokens != n:
        raise ep.fail(f"{VOCAB_PATH} sent {vocab.n_tokens} tokens; it named {n}")
    return RemoteInfo(api=api, model=spec.model or info.get("preset"),
                      role=role or info.get("role"), vocab=vocab,
                      n_ctx=int(info.get("n_ctx") or N_CTX_MAX),
                      chat_template=info.get("chat_template"), plain=plain)


def _read_llama_server(ep: Endpoint, spec: ModelSpec, expected: int | None) -> RemoteInfo:
    models = ep.json("GET", "/v1/models")
    props = ep.json("GET", "/props")
    try:
        card = models["data"][0]
        meta = card["meta"]
        n_vocab = meta["n_vocab"]
        n_ctx = int(meta.get("n_ctx") or props["default_generation_settings"]["n_ctx"])
    except (KeyError, IndexError, TypeError, ValueError, AttributeError):
        raise ep.fail("/v1/models gave no vocabulary size (n_vocab)") from None
    n = check_size(ep, n_vocab, expected, "/v1/models")
    fingerprint = json.dumps([meta, props.get("model_path")], sort_keys=True, default=str)
    key = _cache_key(ep, "llama-server", spec.model, "", fingerprint)
    body = _cache_load(key)
    pieces_t = _cached_pieces(body, n)
    if pieces_t is None:
        pieces: list[bytes] = []
        for lo in range(0, n, TOKENIZE_CHUNK):
            ids = list(range(lo, min(n, lo + TOKENIZE_CHUNK)))
            got = ep.json("POST", "/tokenize", {"content": ids, "with_pieces": True,
                                                "add_special": False},
                          limit=_vocab_limit(len(ids)))
            try:
                entries = got["tokens"]
                if [e["id"] for e in entries] != ids:
                    raise ValueError("ids out of order")
                pieces += [_piece_bytes(e["piece"]) for e in entries]
            except (KeyError, TypeError, ValueError) as exc:
                raise ep.fail(f"/tokenize did not spell its vocabulary ({exc})") from None
        with_bos = ep.json("POST", "/tokenize", {"content": "a", "add_special": True})
        without = ep.json("POST", "/tokenize", {"content": "a", "add_special": False})
        body = {"pieces": pack_bytes(pieces), "n_tokens": n,
                "add_bos": len(with_bos.get("tokens", [])) > len(without.get("tokens", []))}
        _cache_save(key, body)
        pieces_t = tuple(pieces)
    assert body is not None
    index = {p: i for i, p in reversed(list(enumerate(pieces_t)))}  # the lowest id wins
    bos = index.get(str(props.get("bos_token", "")).encode(), -1)
    eos = index.get(str(props.get("eos_token", "")).encode(), -1)
    vocab = VocabInfo(path=spec.describe(),
                      vocab_type=VOCAB_TYPES.get(int(meta.get("vocab_type", -1)), UNKNOWN_TYPE),
                      n_tokens=n, bos=bos, eos=eos, eot=-1,
                      eog=frozenset({eos} if eos >= 0 else ()), add_bos=bool(body.get("add_bos")),
                      add_eos=False, texts=pieces_t, attrs=(0,) * n, pieces=pieces_t,
                      text_kind="piece")
    return RemoteInfo(api="llama-server", model=spec.model or card.get("id"), role=None,
                      vocab=vocab, n_ctx=n_ctx, chat_template=props.get("chat_template"))


def _read_openai(ep: Endpoint, spec: ModelSpec, expected: int | None, say: Any
                 ) -> RemoteInfo:
    models = ep.json("GET", "/v1/models")
    try:
        names = [str(m["id"]) for m in models["data"]]
    except (KeyError, TypeError):
        raise ep.fail("/v1/models did not list its models") from None
    model = spec.model or (names[0] if names else None)
    if model is None:
        raise ep.fail("/v1/models lists no model")
    size_answer = ep.request("GET", "/tokenizer_info", ok=(200, 404, 405, 501))
    info = size_answer.json() if size_answer.status == 200 else None
    info = info if isinstance(info, dict) else None
    told = info.get("vocab_size") if info else None
    if told is None and not expected:
        raise ep.fail("tells no vocabulary size (no /tokenizer_info) and there is no local "
                      "model to compare it with")
    n = check_size(ep, told if told is not None else expected, expected, "/tokenizer_info")
    _probe_token_prompts(ep, model, min(spec.top_k or DEFAULT_TOP_K, n))
    card = next((m for m in models["data"] if str(m.get("id")) == model), {})
    probe = probe_tokenizer(ep, model)
    key = _cache_key(ep, "openai", model, "", tokenizer_fingerprint(card, info, n, probe))
    pieces_t = _cached_pieces(_cache_load(key), n)
    if pieces_t is None:
        if say is not None:
            say(f"note: {spec.role}: reading the {n} tokens of {ep.shown} one request each "
                "(once; then cached)")
        pieces_t = tuple(_detokenize_all(ep, model, n))
        _cache_save(key, {"pieces": pack_bytes(pieces_t), "n_tokens": n})
    # ids that decode to nothing are control tokens (llama-cpp-python's server hides them)
    attrs = tuple(ATTR_CONTROL if not p else 0 for p in pieces_t)
    bos = _bos(probe, n)
    vocab = VocabInfo(path=spec.describe(), vocab_type=UNKNOWN_TYPE, n_tokens=n, bos=bos,
                      eos=-1, eot=-1, eog=frozenset(), add_bos=bos >= 0, add_eos=False,
                      texts=pieces_t, attrs=attrs, pieces=pieces_t, text_kind="piece",
                      lossy=True)
    n_ctx = int(card.get("max_model_len") or (info or {}).get("model_max_length") or N_CTX_MAX)
    return RemoteInfo(api="openai", model=model, role=None, vocab=vocab, n_ctx=n_ctx,
                      chat_template=(info or {}).get("chat_template"))


CARD_KEYS = ("id", "root", "parent", "owned_by")
"""The fields of an OpenAI model card that name what is served (vLLM's ``root`` is the
model's path or hub name); ``created`` and the permission ids change on every call."""
PROBE_TEXT = "eft-local probe: Hello, world! 1234 \u00bfQu\u00e9? \u6771\u4eac \U0001f642\n\t"
"""A text whose tokens tell tokenizers apart (ASCII, digits, accents, CJK, an emoji)."""


def probe_tokenizer(ep: Endpoint, model: str) -> list[Any]:
    """:data:`PROBE_TEXT` through the engine's ``/tokenize`` with special tokens and
    without: ``[tokens, token strings, tokens without]`` (each None where the engine did
    not answer: ``/tokenize`` is vLLM's and eft-local's, not the OpenAI API's)."""
    out: list[Any] = []
    for special in (True, False):
        answer = ep.request("POST", "/tokenize", ok=(200, 400, 404, 405, 422, 500, 501),
                            payload={"model": model, "prompt": PROBE_TEXT,
                                     "add_special_tokens": special,
                                     "return_token_strs": special})
        data = answer.json() if answer.status == 200 else None
        data = data if isinstance(data, dict) else {}
        out += [data.get("tokens"), data.get("token_strs")] if special else [data.get("tokens")]
    return out


def tokenizer_fingerprint(card: Mapping[str, Any], info: Mapping[str, Any] | None, n: int,
                          probe: list[Any]) -> str:
    """What identifies an OpenAI engine's tokenizer, for the vocabulary cache: the model
    card's name fields (:data:`CARD_KEYS`), ``/tokenizer_info`` where there is one, the
    vocabulary size and :func:`probe_tokenizer`'s answers. Nothing that changes between two
    calls to the same engine (vLLM's ``created``, its random permission ids)."""
    named = {k: card.get(k) for k in CARD_KEYS}
    return json.dumps([named, info, n, probe], sort_keys=True, default=str)


def _bos(probe: list[Any], n: int) -> int:
    """The BOS id that the engine adds to a text (the probe's first token, where it comes
    only with special tokens), or -1 (none added, or not told)."""
    with_special, _strs, without = probe
    ok = all(isinstance(t, list) and all(isinstance(i, int) for i in t)
             for t in (with_special, without))
    if ok and len(with_special) == len(without) + 1 and with_special[1:] == without:
        return with_special[0] if 0 <= with_special[0] < n else -1
    return -1


def _probe_token_prompts(ep: Endpoint, model: str, top_k: int) -> None:
    """Refuse an engine that does not take token-id prompts with log-probs (llama-cpp-
    python's server takes text only: conditioning on a re-tokenized text is not
    conditioning on the same tokens), or not ``top_k`` of them (vLLM's ``--max-logprobs``,
    20 by default), with the engine's own words."""
    answer = _ask_logprobs(ep, model, top_k)
    if _has_logprobs(answer):
        return
    if top_k > 1 and _has_logprobs(_ask_logprobs(ep, model, 1)):
        raise ep.fail(f"/v1/completions refused top_k {top_k} log-probs "
                      f"({_engine_words(answer)}): raise the engine's limit (vLLM's "
                      "--max-logprobs, eft-local serve --max-logprobs) or lower top_k")
    raise ep.fail(f"/v1/completions does not take a token-id prompt with logprobs "
                  f"(HTTP {answer.status}); llama-cpp-python's server takes text only. "
                  "Serve the model with llama-server or eft-local serve")


def _ask_logprobs(ep: Endpoint, model: str, k: int) -> Any:
    return ep.request("POST", "/v1/completions", ok=(200, 400, 404, 405, 415, 422, 500),
                      payload={"model": model, "prompt": [0, 0], "max_tokens": 1,
                               "logprobs": k, "temperature": 0})


def _has_logprobs(answer: Any) -> bool:
    data = answer.json()
    try:
        return bool(answer.status == 200 and data["choices"][0]["logprobs"]["top_logprobs"])
    except (KeyError, IndexError, TypeError):
        return False


def _engine_words(answer: Any) -> str:
    """The message of an engine's error answer, short."""
    data = answer.json()
    err = data.get("error") if isinstance(data, dict) else None
    message = err.get("message") if isinstance(err, dict) else err
    return f"HTTP {answer.status}: {str(message)[:200]}" if message else f"HTTP {answer.status}"


def _detokenize_all(ep: Endpoint, model: str, n: int) -> list[bytes]:
    """Each id's text through ``/detokenize`` (vLLM, eft-local) or ``/extras/detokenize``
    (llama-cpp-python's server), several requests at a time."""
    probe = ep.request("POST", "/detokenize", payload={"model": model, "tokens": [0]},
                       ok=(200, 404, 405))
    path, field_name = ("/detokenize", "prompt") if probe.status == 200 else (
        "/extras/detokenize", "text")

    def one(i: int) -> bytes:
        got = ep.json("POST", path, {"model": model, "tokens": [i]})
        text = got.get(field_name) if isinstance(got, dict) else None
        if not isinstance(text, str):
            raise ep.fail(f"{path} answered no text for token {i}")
        return text.encode("utf-8", "surrogatepass")

    pool = ThreadPoolExecutor(DETOKENIZE_THREADS, thread_name_prefix="eft-detokenize")
    try:
        return list(pool.map(one, range(n)))
    except BaseException:  # a failure, Ctrl-C, SIGTERM: end the requests under way now
        ep.close()
        raise
    finally:
        pool.shutdown(wait=False, cancel_futures=True)


def _piece_bytes(piece: Any) -> bytes:
    """llama-server's piece: a string, or a list of byte values when not valid UTF-8."""
    if isinstance(piece, str):
        return piece.encode("utf-8")
    if isinstance(piece, list) and all(isinstance(b, int) and 0 <= b < 256 for b in piece):
        return bytes(piece)
    raise ValueError(f"piece {piece!r} is neither text nor bytes")


# -- the cache ----------------------------------------------------------------------------------
def _cached_pieces(body: Mapping[str, Any] | None, n: int) -> tuple[bytes, ...] | None:
    """The pieces of a cache entry, or None (absent or damaged)."""
    try:
        return None if body is None else unpack_bytes(body["pieces"], n, "pieces")
    except (KeyError, TypeError, ValueError):
        return None


def _cache_key(ep: Endpoint, api: str, model: str | None, role: str, fingerprint: str) -> str:
    parts = [str(CACHE_VERSION), ep.shown, api, model or "", role, fingerprint]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:32]


def _cache_load(key: str) -> dict[str, Any] | None:
    try:
        data = json.loads(cache_dir("remote", f"{key}.json").read_text())
        return data if isinstance(data, dict) else None
    except (OSError, ValueError):
        return None


def _cache_save(key: str, body: Mapping[str, Any]) -> None:
    path = cache_dir("remote", f"{key}.json")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, json.dumps(body), what="the remote vocabulary cache")
    except (OSError, EftError):
        pass
