"""Ollama's API as data: its request bodies as the OpenAI requests the other routes parse
(:func:`chat_body`, :func:`generate_body`), errors renamed to the fields the request named
(:func:`renamed`), and the small pieces of its answers. No web framework here (the routes
are :mod:`eft_local.server.ollama`).

Options: ``temperature``, ``top_k``, ``top_p``, ``min_p``, ``seed`` (below 0: a new draw),
``num_predict`` (0 or below: up to the end of the context), ``stop``, ``presence_penalty``,
``frequency_penalty``, ``repeat_penalty`` and ``repeat_last_n`` set the same knobs as the
OpenAI routes' fields (unset, no penalty: Ollama's own default is ``repeat_penalty`` 1.1);
``eft`` (in ``options`` or the body) is the OpenAI routes' ``eft`` object; ``typical_p``,
``tfs_z`` and ``mirostat`` are taken at their neutral values only; the load options
(``num_ctx``, ``num_gpu``, ``num_thread``...) are accepted and not applied (``serve`` loads
the models once, with its own ``--n-ctx``...). ``format`` ``"json"`` or a schema is the
grammar ``response_format`` makes; ``truncate`` false is ``eft.context_overflow: error``;
``keep_alive`` and ``shift`` are accepted; ``think`` true puts a reply's ``<think>`` block
into ``thinking`` (unset or false, the text keeps it; levels are refused); images are
refused.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Mapping
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from eft_local.server.protocol import ApiError, bad

OLLAMA_VERSION = "0.13.5"
"""The Ollama release whose API shapes these routes follow (``/api/version``; clients
compare it with the version a feature needs)."""
TAG = ":latest"
UNLIMITED = 2**31
"""``num_predict`` 0 or less (Ollama: no limit): generate until the end of turn or of the
context."""
FOREVER = "9999-12-31T23:59:59Z"
"""``expires_at`` of the loaded preset: it stays until a request names another."""

APPLIED = {"temperature": "temperature", "top_k": "top_k", "top_p": "top_p", "min_p": "min_p",
           "seed": "seed", "num_predict": "max_tokens", "stop": "stop",
           "presence_penalty": "presence_penalty", "frequency_penalty": "frequency_penalty",
           "repeat_penalty": "repeat_penalty", "repeat_last_n": "repeat_last_n"}
"""Ollama's options that set a knob of the request: the OpenAI field each becomes."""
NEUTRAL = {"typical_p": 1.0, "tfs_z": 1.0, "mirostat": 0}
"""Options the sampler cannot apply: accepted at their neutral value only."""
NOT_APPLIED = frozenset({
    "num_ctx", "num_batch", "num_gpu", "main_gpu", "use_mmap", "use_mlock", "num_thread",
    "numa", "low_vram", "f16_kv", "vocab_only", "logits_all", "embedding_only",
    "draft_num_predict", "num_keep", "penalize_newline", "mirostat_tau",
    "mirostat_eta"})
"""Options accepted and not applied: how the models load (``serve`` sets that when it
starts: ``--n-ctx``, ``--threads``, ``--gpu-layers``), and the parameters of the
options above that stay neutral."""
_DURATION = re.compile(r"-?(?:\d+(?:\.\d*)?(?:ns|us|µs|ms|s|m|h))+|-?\d+(?:\.\d*)?")
"""A ``keep_alive`` string: Go's durations (``5m``, ``1h30m``) or a number of seconds."""
_THINK = ("high", "medium", "low", "max")


# -- requests ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class Translated:
    """An Ollama request as the OpenAI request body the other routes parse."""

    body: dict[str, Any]
    model: str | None
    """The model as the request named it (answers repeat it)."""
    stream: bool
    names: Mapping[str, str] = field(default_factory=dict)
    """OpenAI field -> the Ollama field it came from (for errors)."""
    logprobs: bool = False
    num_ctx: int | None = None


def served_name(given: str) -> str:
    """An Ollama model name as this server's: ``PRESET[:latest][@knobs][:latest]`` ->
    ``PRESET[@knobs]``; 404 for another tag."""
    preset, at, knobs = given.partition("@")
    preset, knobs = preset.removesuffix(TAG), knobs.removesuffix(TAG)
    if ":" in preset:
        raise ApiError(404, f"model {given!r} not found: this server's models are its presets, "
                       "named without a tag or with :latest (see /api/tags)", param="model",
                       code="model_not_found")
    return preset + at + knobs


def _flag(body: Mapping[str, Any], name: str, default: bool) -> bool:
    value = body.get(name)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise bad(f"'{name}' must be true or false, got {value!r}", name)
    return value


def _common(body: Any) -> tuple[dict[str, Any], dict[str, str], dict[str, Any]]:
    """What chat and generate requests share: the model, ``stream``, ``format``,
    ``options``, the ``eft`` object, ``keep_alive`` and ``think``, as OpenAI's fields, the
    names they came from, and the rest of a :class:`Translated`."""
    if not isinstance(body, dict):
        raise bad("the request body must be a JSON object")
    given = body.get("model")
    if given is not None and not isinstance(given, str):
        raise bad("'model' must be a string such as \"tiny-up\" (see /api/tags)", "model")
    out: dict[str, Any] = {"model": served_name(given) if given else None}
    names: dict[str, str] = {}
    fmt = body.get("format")
    if fmt == "json":
        out["response_format"] = {"type": "json_object"}
        names["response_format"] = names["response_format.schema"] = "format"
    elif isinstance(fmt, dict):
        out["json_schema"] = fmt
        names["json_schema"] = "format"
    elif fmt not in (None, ""):
        raise bad("'format' must be \"json\" or a JSON schema object", "format")
    keep = body.get("keep_alive")  # accepted: the preset stays until a request names another
    if keep is not None and (isinstance(keep, bool) or not isinstance(keep, (int, float, str))
                             or isinstance(keep, str) and not _DURATION.fullmatch(keep)):
        raise bad(f"'keep_alive' is {keep!r}; give a duration such as \"5m\" or seconds",
                  "keep_alive")
    think = body.get("think")
    if think in _THINK:
        raise bad(f"'think' is {think!r}: levels are not applied here; give true or false",
                  "think")
    if think not in (None, False, True):
        raise bad(f"'think' is {think!r}; give true or false", "think")
    out["reasoning_format"] = "deepseek" if think else "none"
    names["reasoning_format"] = "think"
    _flag(body, "shift", True)  # accepted: a reply stops at the end of the context
    options = body.get("options")
    eft = body.get("eft")
    if isinstance(options, dict) and options.get("eft") is not None:
        if eft is not None:
            raise bad("give the 'eft' object once: in the body or in 'options'", "options.eft")
        eft, names["eft"] = options["eft"], "options.eft"
    if eft is not None:
        out["eft"] = eft
    num_ctx = _options(options, out, names)
    for key in ("logprobs", "top_logprobs"):
        if body.get(key) is not None:
            out[key] = body[key]
    return out, names, {"model": given or None, "stream": _flag(body, "stream", True),
                        "logprobs": bool(body.get("logprobs")), "num_ctx": num_ctx}


def _options(options: Any, out: dict[str, Any], names: dict[str, str]) -> int | None:
    """Ollama's ``options`` as OpenAI's fields in ``out``; their ``num_ctx``, if any."""
    if options is None:
        return None
    if not isinstance(options, dict):
        raise bad("'options' must be an object such as {\"temperature\": 0.7, "
                  "\"num_predict\": 128}", "options")
    num_ctx = None
    for key, value in options.items():
        where = f"options.{key}"
        if key == "eft" or value is None:
            continue
        whole = isinstance(value, int) and not isinstance(value, bool)
        if key in APPLIED:
            if key == "seed" and whole and value < 0:
                continue  # Ollama's -1: a new draw each time
            if key == "num_predict" and whole and value <= 0:
                value = UNLIMITED
            out[APPLIED[key]] = value
            names[APPLIED[key]] = where
        elif key in NEUTRAL:
            if value != NEUTRAL[key]:
                raise bad(f"'{where}' is {value!r}; this server cannot apply it (only "
                          f"{NEUTRAL[key]:g}): leave it out", where)
        elif key == "num_ctx":
            if not whole or value < 1:
                raise bad(f"'{where}' must be a positive integer, got {value!r}", where)
            num_ctx = value
        elif key not in NOT_APPLIED:
            raise bad(f"'{where}' is not an option this server knows; it applies "
                      f"{', '.join(APPLIED)} and eft (and takes Ollama's load options)",
                      where)
    return num_ctx


def _messages(value: Any) -> Any:
    """Ollama's messages as OpenAI's: roles in lower case (as Ollama reads them), a tool
    result's ``tool_name`` as its ``name``, ``thinking`` dropped; images refused."""
    if not isinstance(value, list):
        return value
    out = []
    for i, message in enumerate(value):
        if isinstance(message, dict):
            if message.get("images"):
                raise bad(f"'messages[{i}].images': this server's models read text only; send "
                          "the message without images", f"messages[{i}].images")
            message = {k: v for k, v in message.items() if k not in ("images", "thinking")}
            if isinstance(message.get("role"), str):
                message["role"] = message["role"].lower()
            if message.get("role") == "tool" and "tool_name" in message:
                message.setdefault("name", message.pop("tool_name"))
        out.append(message)
    return out


def _overflow(body: Mapping[str, Any], out: dict[str, Any]) -> None:
    """Ollama's ``truncate`` (default true: drop the oldest turns of a chat longer than the
    context) as ``eft.context_overflow``, unless the ``eft`` object says."""
    if not _flag(body, "truncate", True) and isinstance(out.get("eft", {}), dict):
        out["eft"] = {"context_overflow": "error", **out.get("eft", {})}


def chat_body(body: Any) -> Translated:
    """An ``/api/chat`` body as a chat completions body."""
    out, names, rest = _common(body)
    out["messages"] = _messages(body.get("messages") or [])
    for key in ("tools", "tool_choice"):  # tool_choice: OpenAI's, which Ollama lacks
        if body.get(key) is not None:
            out[key] = body[key]
    _overflow(body, out)
    return Translated(body=out, names=names, **rest)


def generate_body(body: Any) -> tuple[Translated, bool]:
    """An ``/api/generate`` body as a chat completions body (the prompt a user turn), or
    with ``raw`` a completions body; and whether it is raw."""
    out, names, rest = _common(body)
    for key, why in (("suffix", "fill-in-the-middle is not supported"),
                     ("template", "the preset's chat template renders the prompt; give "
                      "'raw': true and a prompt you rendered"),
                     ("context", "send the conversation to /api/chat instead"),
                     ("images", "this server's models read text only")):
        if body.get(key):
            raise bad(f"'{key}': {why}", key)
    raw = _flag(body, "raw", False)
    prompt, system = body.get("prompt"), body.get("system")
    for key, value in (("prompt", prompt), ("system", system)):
        if value is not None and not isinstance(value, str):
            raise bad(f"'{key}' must be a string", key)
    if raw and system:
        raise bad("'system' does not apply with 'raw': true (the prompt goes to the model as "
                  "it is): put it into the prompt", "system")
    if raw and out.pop("reasoning_format") == "deepseek":
        raise bad("'think' does not apply with 'raw': true (the reply is the model's text as "
                  "it is): leave it out", "think")
    if raw:
        logprobs = out.pop("logprobs", None)
        top = out.pop("top_logprobs", None)
        if logprobs:
            out["logprobs"], names["logprobs"] = top or 0, "top_logprobs"
        out["prompt"] = prompt or ""
    else:
        turns = [{"role": "system", "content": system}] if system else []
        out["messages"] = [*turns, {"role": "user", "content": prompt}] if prompt else []
        names["messages"] = "prompt"
        _overflow(body, out)
    return Translated(body=out, names=names, **rest), raw


def renamed(exc: ApiError, names: Mapping[str, str]) -> ApiError:
    """``exc`` naming the Ollama field that its OpenAI field came from."""
    param = exc.param or ""
    new = names.get(param)
    if new is None and param.startswith("eft") and "eft" in names:
        new = names["eft"] + param[3:]
    if new is None:
        return exc
    return ApiError(exc.status, exc.message.replace(f"'{param}", f"'{new}"), param=new,
                    code=exc.code, kind=exc.kind)


@contextmanager
def fields(names: Mapping[str, str]) -> Iterator[None]:
    """Errors raised inside name the Ollama fields (:func:`renamed`)."""
    try:
        yield
    except ApiError as exc:
        raise renamed(exc, names) from None


# -- answers ----------------------------------------------------------------------------------
def stamp(seconds: float | None = None) -> str:
    """A time as Ollama writes it (RFC 3339, UTC); default now."""
    moment = (datetime.now(timezone.utc) if seconds is None
              else datetime.fromtimestamp(seconds, timezone.utc))
    return moment.isoformat(timespec="microseconds").replace("+00:00", "Z")


def nanoseconds(seconds: float) -> int:
    """A duration as Ollama's answers give it."""
    return max(0, int(seconds * 1e9))


def line(data: Mapping[str, Any]) -> str:
    """One NDJSON line (strict JSON)."""
    return json.dumps(data, ensure_ascii=False, allow_nan=False) + "\n"


def tool_calls(calls: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """OpenAI's tool calls (arguments as JSON text) in Ollama's shape (an object)."""
    out = []
    for i, call in enumerate(calls):
        fn = call["function"]
        arguments = fn["arguments"]
        if isinstance(arguments, str):
            with suppress(ValueError):  # the grammar wrote JSON; else it goes as written
                arguments = json.loads(arguments)
        out.append({"id": call.get("id"),
                    "function": {"index": i, "name": fn["name"], "arguments": arguments}})
    return out


def legacy_entries(legacy: Mapping[str, Any] | None) -> list[dict[str, Any]]:
    """A completion chunk's ``logprobs`` object as Ollama's entries."""
    if not legacy:
        return []
    return [{"token": token, "logprob": lp,
             "top_logprobs": [{"token": t, "logprob": v} for t, v in (top or {}).items()]}
            for token, lp, top in zip(legacy["tokens"], legacy["token_logprobs"],
                                      legacy["top_logprobs"], strict=True)]


def answer_text(key: str, text: str) -> dict[str, Any]:
    """An answer's text: a chat's ``message`` or a generation's ``response``."""
    if key == "message":
        return {"message": {"role": "assistant", "content": text}}
    return {"response": text}
