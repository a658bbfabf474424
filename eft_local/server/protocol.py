"""OpenAI's API as data: request bodies validated into frozen requests (the answers' pieces
are :mod:`eft_local.server.shapes`). No web framework here (see :mod:`eft_local.server.app`);
every bad value is an :class:`ApiError` with OpenAI's error body and the right HTTP status.
"""

from __future__ import annotations

import json
import math
import re
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from eft_local.errors import EftError
from eft_local.settings import OVERFLOW, SamplerSettings
from eft_local.structured import (
    SchemaError,
    ToolPlan,
    response_grammar,
    response_schema,
    tool_plan,
)

MAX_TOP_LOGPROBS = 20
"""Most alternatives per token (OpenAI's limit for chat ``top_logprobs``)."""
MAX_STOPS = 16
"""Most stop strings per request."""
MAX_MESSAGES = 2048
"""Most messages in a chat request (OpenAI's limit): more are refused before any work."""
OLLAMA_PREFIX = "/api/"
"""Where Ollama's API is served (errors there have Ollama's shape)."""


class ApiError(Exception):
    """An error answered with OpenAI's body: ``{"error": {message, type, param, code}}``
    (under ``/api/``, Ollama's: ``{"error": message}``)."""

    def __init__(self, status: int, message: str, *, param: str | None = None,
                 code: str | None = None, kind: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.kind = kind or ("server_error" if status >= 500 else "invalid_request_error")

    def body(self, path: str = "") -> dict[str, Any]:
        """The JSON error body of a request for ``path``: Ollama's under ``/api/``
        (:mod:`eft_local.server.ollama`), else OpenAI's."""
        if path.startswith(OLLAMA_PREFIX):
            return {"error": self.message}
        return {"error": {"message": self.message, "type": self.kind, "param": self.param,
                          "code": self.code}}


def bad(message: str, param: str | None = None, code: str | None = None) -> ApiError:
    """A 400 error about ``param``."""
    return ApiError(400, message, param=param, code=code)


# -- field readers ----------------------------------------------------------------------------
def _number(body: Mapping[str, Any], name: str, low: float, high: float, *,
            integer: bool = False, where: str = "") -> float | int | None:
    value = body.get(name)
    if value is None:
        return None
    param = f"{where}{name}"
    kinds = (int,) if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kinds):
        raise bad(f"'{param}' must be {'an integer' if integer else 'a number'}, got "
                  f"{value!r}", param)
    if not (math.isfinite(value) and low <= value <= high):
        raise bad(f"'{param}' is {value!r}; it must be in [{low:g}, {high:g}]", param)
    return value


def _bool(body: Mapping[str, Any], name: str, default: bool = False, where: str = "") -> bool:
    value = body.get(name)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise bad(f"'{where}{name}' must be true or false, got {value!r}", f"{where}{name}")
    return value


def _stops(body: Mapping[str, Any]) -> tuple[str, ...] | None:
    value = body.get("stop")
    if value is None:
        return None
    stops = [value] if isinstance(value, str) else value
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
        raise bad("'stop' must be a string or a list of strings", "stop")
    if len(stops) > MAX_STOPS:
        raise bad(f"'stop' has {len(stops)} strings; at most {MAX_STOPS} are allowed", "stop")
    return tuple(s for s in stops if s)


@dataclass(frozen=True)
class Knobs:
    """EFT settings of one request: parameter values, formula, diagnostics, context
    policy."""

    params: Mapping[str, float] = field(default_factory=dict)
    formula: str | None = None
    diagnostics: bool = False
    context_overflow: str | None = None
    """``truncate`` or ``error`` (None: the server's default)."""
    sources: Mapping[str, str] = field(default_factory=dict)
    """Which request field set each parameter (``model``, ``eft.lambda``...)."""
    alternatives: int = 0
    """With diagnostics: each token's most likely alternatives under every model and the
    mix (how many)."""


_DECIMAL = re.compile(r"[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?")
"""A plain decimal number (no underscores, no inf or nan)."""


def parse_model_name(name: str) -> tuple[str, dict[str, float]]:
    """``PRESET@beta=1.5,lam=0.3`` -> (``PRESET``, {"beta": 1.5, "lam": 0.3}); a knob given
    twice, a number that is not plain decimal or no preset before ``@`` is refused."""
    preset, sep, rest = name.partition("@")
    params: dict[str, float] = {}
    if not sep:
        return preset, params
    if not preset.strip():
        raise bad(f"model {name!r}: name a preset before '@' (e.g. tiny-up@beta=1.5)",
                  "model")
    for part in rest.split(","):
        key, eq, text = part.partition("=")
        key = key.strip()
        key = "lam" if key == "lambda" else key
        if not eq or key not in ("beta", "lam"):
            raise bad(f"model {name!r}: after '@' give knobs as beta=X or lam=X "
                      "(comma-separated)", "model")
        if key in params:
            raise bad(f"model {name!r}: {key} is given twice", "model")
        if not _DECIMAL.fullmatch(text.strip()):
            raise bad(f"model {name!r}: {key} {text.strip()!r} is not a decimal number",
                      "model")
        value = float(text)
        if not math.isfinite(value):
            raise bad(f"model {name!r}: {key} must be a finite number", "model")
        params[key] = value
    return preset, params


def model_name(preset: str, params: Mapping[str, float]) -> str:
    """The name :func:`parse_model_name` reads back."""
    if not params:
        return preset
    return preset + "@" + ",".join(f"{k}={v:g}" for k, v in params.items())


_EFT_KEYS = ("beta", "lambda", "lam", "formula", "conservative_top_p", "diagnostics",
             "context_overflow", "alternatives")


def _knobs(body: Mapping[str, Any], name_params: Mapping[str, float]
           ) -> tuple[Knobs, float | None]:
    """The request's EFT knobs (model-name knobs, then the ``eft`` object, which wins) and
    its conservative top-p."""
    eft = body.get("eft")
    sources = dict.fromkeys(name_params, "model")
    if eft is None:
        return Knobs(params=dict(name_params), sources=sources), None
    if not isinstance(eft, dict):
        raise bad("'eft' must be an object: {beta, lambda, formula, conservative_top_p, "
                  "diagnostics, alternatives, context_overflow}", "eft")
    unknown = [k for k in eft if k not in _EFT_KEYS]
    if unknown:
        raise bad(f"'eft.{unknown[0]}' is not an EFT setting (known: beta, lambda, formula, "
                  "conservative_top_p, diagnostics, alternatives, context_overflow)",
                  f"eft.{unknown[0]}")
    params = dict(name_params)
    for key in ("beta", "lambda", "lam"):
        value = _number(eft, key, -1e30, 1e30, where="eft.")
        if value is not None:
            name = "lam" if key == "lambda" else key
            params[name], sources[name] = float(value), f"eft.{key}"
    overflow = eft.get("context_overflow")
    if overflow is not None and overflow not in OVERFLOW:
        raise bad(f"'eft.context_overflow' is {overflow!r}; it must be \"truncate\" (drop the "
                  "oldest turns of a chat longer than the context) or \"error\"",
                  "eft.context_overflow")
    formula = eft.get("formula")
    if formula is not None and (not isinstance(formula, str) or not formula.strip()):
        raise bad("'eft.formula' must be a formula text, e.g. 'up' or "
                  "'large_base + beta * (small_ft - small_base)'", "eft.formula")
    ctp = _number(eft, "conservative_top_p", 0, 1, where="eft.")
    if ctp is not None and ctp <= 0:
        raise bad("'eft.conservative_top_p' must be in (0, 1]", "eft.conservative_top_p")
    diagnostics = _bool(eft, "diagnostics", where="eft.")
    alternatives = _number(eft, "alternatives", 0, MAX_TOP_LOGPROBS, integer=True, where="eft.")
    if alternatives and not diagnostics:
        raise bad("'eft.alternatives' needs 'eft.diagnostics': true", "eft.alternatives")
    return Knobs(params=params, formula=formula, diagnostics=diagnostics,
                 alternatives=int(alternatives or 0), context_overflow=overflow,
                 sources=sources), (None if ctp is None else float(ctp))


def _sampling(body: Mapping[str, Any], base: SamplerSettings, conservative: float | None,
              default_seed: int | None) -> SamplerSettings:
    changes: dict[str, Any] = {}
    for name, low, high, integer in (("temperature", 0, 2, False), ("top_p", 0, 1, False),
                                     ("min_p", 0, 1, False), ("top_k", 0, 2**31, True)):
        value = _number(body, name, low, high, integer=integer)
        if value is not None:
            changes[name] = value
    if changes.get("top_p") == 0:
        changes["top_p"] = 1e-9  # OpenAI accepts 0: only the most likely token
    if changes.get("min_p") == 1:
        raise bad("'min_p' must be below 1", "min_p")
    seed = _number(body, "seed", -2**63, 2**64, integer=True)
    if seed is not None:
        changes["seed"] = int(seed) % 2**63
    elif default_seed is None:
        changes["seed"] = uuid.uuid4().int % 2**63  # OpenAI: no seed, a new draw each time
    if conservative is not None:
        changes["conservative_top_p"] = conservative
    changes.update(_penalties(body))
    try:
        return replace(base, **changes)
    except EftError as exc:
        named = re.match(r"invalid (\w+)", str(exc))
        raise bad(str(exc), named.group(1) if named else None) from None


_PENALTIES = (("frequency_penalty", -2, 2, False), ("presence_penalty", -2, 2, False),
              ("repeat_penalty", 0, 1e30, False), ("repeat_last_n", -1, 2**31 - 1, True),
              ("dry_multiplier", 0, 1e30, False), ("dry_base", 1, 1e30, False),
              ("dry_allowed_length", 0, 2**31 - 1, True),
              ("dry_penalty_last_n", -1, 2**31 - 1, True))
"""OpenAI's penalties and llama-server's: name, range, integer."""


def _penalties(body: Mapping[str, Any]) -> dict[str, Any]:
    """The penalty fields of a request (OpenAI's and llama-server's names)."""
    out: dict[str, Any] = {}
    for name, low, high, integer in _PENALTIES:
        value = _number(body, name, low, high, integer=integer)
        if value is not None:
            out[name] = value
    if out.get("repeat_penalty") == 0:
        raise bad("'repeat_penalty' is 0; it must be above 0 (1 = off)", "repeat_penalty")
    breakers = body.get("dry_sequence_breakers")
    if breakers is not None:
        out["dry_sequence_breakers"] = _breakers(breakers)
    bias = body.get("logit_bias")
    if bias is not None:
        out["logit_bias"] = _logit_bias(bias)
    return out


def _breakers(value: Any) -> tuple[str, ...]:
    """``dry_sequence_breakers``: a list of strings (llama-server), or text holding them as
    JSON strings (text-generation-webui: ``"\\n", ":"``, brackets optional)."""
    if isinstance(value, str):
        for text in (value, f"[{value}]"):
            try:
                loaded = json.loads(text)
            except ValueError:
                continue
            if isinstance(loaded, list):
                value = loaded
                break
    if not isinstance(value, list) or not all(isinstance(b, str) and b for b in value):
        raise bad("'dry_sequence_breakers' must be a list of non-empty strings, e.g. "
                  '["\\n", ":", "\\"", "*"]', "dry_sequence_breakers")
    return tuple(value)


def _logit_bias(value: Any) -> tuple[tuple[int, float], ...]:
    """``logit_bias``: OpenAI's object (token id as a string -> bias) or llama-server's list
    of [id, bias] pairs; a bias of ``false`` bans the token."""
    pairs = list(value.items()) if isinstance(value, dict) else value
    if not isinstance(pairs, list) or not all(
            isinstance(p, (list, tuple)) and len(p) == 2 for p in pairs):
        raise bad("'logit_bias' must map token ids to biases, e.g. {\"15043\": -100} (or "
                  "[[15043, -100]])", "logit_bias")
    out = []
    for token, bias in pairs:
        if isinstance(token, str) and re.fullmatch(r"\d{1,10}", token):
            token = int(token)
        if isinstance(token, bool) or not isinstance(token, int) or token < 0:
            raise bad(f"'logit_bias' key {token!r} is not a token id (find ids with POST "
                      "/tokenize)", "logit_bias")
        if bias is False:
            bias = -math.inf
        elif isinstance(bias, bool) or not isinstance(bias, (int, float)) or not (
                -100 <= bias <= 100):
            raise bad(f"'logit_bias' of token {token} is {bias!r}; it must be a number in "
                      "[-100, 100] (or false to ban the token)", "logit_bias")
        out.append((token, float(bias)))
    return tuple(out)


MAX_CHOICES = 16
"""Most choices one request may ask for (``n``, ``best_of``): each is a generation of its
own, and one request should not hold every slot for long."""


def _count(body: Mapping[str, Any], name: str) -> int:
    value = _number(body, name, 1, MAX_CHOICES, integer=True)
    return 1 if value is None else int(value)


@dataclass(frozen=True)
class Common:
    """What chat and completion requests share."""

    model: str | None
    preset: str | None
    knobs: Knobs
    sampling: SamplerSettings
    max_tokens: int | None
    stop: tuple[str, ...] | None
    stream: bool
    include_usage: bool
    grammar: str | None = None
    """GBNF from ``response_format``, ``json_schema`` or ``grammar``; None: free text."""
    n: int = 1
    """Choices to return: several generations of the prompt, each with its own seed (the
    request's seed, then +1, +2...), side by side in slots, the prompt read once."""


def _structured(call: Any, *args: Any, **kwargs: Any) -> Any:
    """``call(...)`` with a :class:`SchemaError` answered as a 400 about its field."""
    try:
        return call(*args, **kwargs)
    except SchemaError as exc:
        raise bad(str(exc), exc.param) from None


def _common(body: Mapping[str, Any], base: SamplerSettings, default_seed: int | None,
            max_key: str) -> Common:
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise bad("'model' must be a string", "model")
    preset, name_params = parse_model_name(model) if model else (None, {})
    knobs, conservative = _knobs(body, name_params)
    n = _count(body, "n")
    stream = _bool(body, "stream")
    options = body.get("stream_options")
    if options is not None and not isinstance(options, dict):
        raise bad("'stream_options' must be an object", "stream_options")
    if options and not stream:
        raise bad("'stream_options' is only allowed with 'stream': true", "stream_options")
    include_usage = _bool(options or {}, "include_usage", where="stream_options.")
    limit = None
    for key in (max_key, "max_tokens"):
        value = _number(body, key, 0 if max_key == "max_tokens" else 1, 2**31, integer=True)
        if value is not None:
            limit = int(value)
            break
    return Common(model=model, preset=preset or None, knobs=knobs,
                  sampling=_sampling(body, base, conservative, default_seed),
                  max_tokens=limit, stop=_stops(body), stream=stream,
                  include_usage=include_usage, n=n)


def _with_grammar(common: Common, body: Mapping[str, Any], name: str = "") -> Common:
    return replace(common, grammar=_structured(response_grammar, body, name=name))


@dataclass(frozen=True)
class ChatRequest:
    """A validated ``/v1/chat/completions`` body."""

    common: Common
    messages: list[dict[str, Any]]
    logprobs: bool
    top_logprobs: int
    tools: ToolPlan | None = None
    """The offered functions and ``tool_choice``."""
    raw_grammar: bool = False
    """``common.grammar`` is llama-server's ``grammar`` (GBNF from the reply's first token);
    otherwise it holds the rules of a structured reply, top rule ``response``."""
    check: Mapping[str, Any] | None = None
    """The schema the finished reply is checked against (:mod:`eft_local.schema_check`)."""
    reasoning_format: str | None = None
    """``none`` or ``deepseek`` (llama-server's ``reasoning_format``); None: the server's."""


REASONING_FORMATS = {"none": "none", "deepseek": "deepseek", "auto": "deepseek"}
"""llama-server's ``reasoning_format`` values: where a reply's ``<think>`` block goes
(``deepseek``: ``reasoning_content``; ``none``: it stays in the text)."""

ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant",
         "tool": "tool"}


def _tool_calls(value: Any, i: int) -> list[dict[str, Any]]:
    where = f"messages[{i}].tool_calls"
    ok = isinstance(value, list) and all(
        isinstance(c, dict) and isinstance(c.get("function"), dict)
        and isinstance(c["function"].get("name"), str)
        and isinstance(c["function"].get("arguments", ""), (str, dict)) for c in value)
    if not ok:
        raise bad(f"'{where}' must be a list of {{\"id\", \"type\": \"function\", "
                  "\"function\": {\"name\", \"arguments\"}}", where)
    return [{"id": str(c.get("id") or f"call_{j}"), "type": "function",
             "function": {"name": c["function"]["name"],
                          "arguments": c["function"].get("arguments", "")}}
            for j, c in enumerate(value)]


def _content(message: Mapping[str, Any], i: int) -> str:
    content = message.get("content")
    where = f"messages[{i}].content"
    if content is None and message.get("role") == "assistant":
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for j, part in enumerate(content):
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(
                    part.get("text"), str):
                kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                raise bad(f"'{where}[{j}]' is a {kind!r} part; only text parts "
                          "({\"type\": \"text\", \"text\": ...}) are supported", where)
            texts.append(part["text"])
        return "".join(texts)
    raise bad(f"'{where}' must be a string or a list of text parts", where)


def parse_chat(body: Any, base: SamplerSettings, default_seed: int | None) -> ChatRequest:
    """Validate a chat completions body."""
    if not isinstance(body, dict):
        raise bad("the request body must be a JSON object")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise bad("'messages' must be a non-empty list of {role, content} objects", "messages")
    if len(messages) > MAX_MESSAGES:
        raise bad(f"'messages' holds {len(messages)} messages; at most {MAX_MESSAGES} are "
                  "allowed", "messages")
    out = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise bad(f"'messages[{i}]' must be an object", f"messages[{i}]")
        role = message.get("role")
        if role not in ROLES:
            raise bad(f"'messages[{i}].role' is {role!r}; supported roles: system, developer, "
                      "user, assistant, tool", f"messages[{i}].role")
        entry: dict[str, Any] = {"role": ROLES[role], "content": _content(message, i)}
        if message.get("tool_calls") and role == "assistant":
            entry["tool_calls"] = _tool_calls(message["tool_calls"], i)
        if role == "tool":
            for key in ("tool_call_id", "name"):
                if isinstance(message.get(key), str):
                    entry[key] = message[key]
        out.append(entry)
    plan = _structured(tool_plan, body.get("tools"), body.get("tool_choice"))
    _bool(body, "parallel_tool_calls", True)  # accepted; a reply holds one call
    common = _common(body, base, default_seed, "max_completion_tokens")
    if body.get("best_of") is not None:
        raise bad("'best_of' applies to /v1/completions; chat takes 'n'", "best_of")
    calls = plan is not None and plan.choice != "none"
    raw = bool(body.get("grammar"))
    if calls and raw:
        raise bad("'grammar' and 'tools' exclude each other (the tools make the grammar)",
                  "grammar")
    common = _with_grammar(common, body, "" if raw else "response")
    thinking = body.get("reasoning_format")
    if thinking is not None and thinking not in REASONING_FORMATS:
        raise bad(f"'reasoning_format' is {thinking!r}; use none or deepseek (auto is "
                  "deepseek)", "reasoning_format")
    if common.max_tokens == 0:
        raise bad("'max_tokens' must be at least 1", "max_tokens")
    logprobs = _bool(body, "logprobs")
    top = _number(body, "top_logprobs", 0, MAX_TOP_LOGPROBS, integer=True)
    if top is not None and not logprobs:
        raise bad("'top_logprobs' needs 'logprobs': true", "top_logprobs")
    return ChatRequest(common=common, messages=out, logprobs=logprobs,
                       top_logprobs=int(top or 0), tools=plan, raw_grammar=raw,
                       check=None if raw else response_schema(body),
                       reasoning_format=REASONING_FORMATS.get(thinking))


@dataclass(frozen=True)
class CompletionRequest:
    """A validated ``/v1/completions`` body: one or more prompts (text or token ids)."""

    common: Common
    prompts: list[str | list[int]]
    echo: bool
    logprobs: int | None
    token_ids: bool = False
    """``return_tokens_as_token_ids`` (vLLM's field): log-prob entries name tokens
    ``token_id:N`` instead of by their text."""
    best_of: int = 1
    """Candidates generated per prompt, of which the ``n`` with the highest mean log-prob
    per token (under the mix) are returned."""


def _prompts(value: Any) -> list[str | list[int]]:
    def ids(x: Any) -> bool:
        return isinstance(x, list) and bool(x) and all(
            isinstance(t, int) and not isinstance(t, bool) for t in x)

    if isinstance(value, str):
        return [value]
    if ids(value):
        return [list(value)]
    if isinstance(value, list) and value and all(isinstance(p, str) or ids(p) for p in value):
        return [p if isinstance(p, str) else list(p) for p in value]
    raise bad("'prompt' must be a string, a list of token ids, or a non-empty list of "
              "those", "prompt")


def parse_completion(body: Any, base: SamplerSettings, default_seed: int | None, *,
                     max_logprobs: int = MAX_TOP_LOGPROBS) -> CompletionRequest:
    """Validate a (legacy) completions body (``logprobs`` up to ``max_logprobs``)."""
    if not isinstance(body, dict):
        raise bad("the request body must be a JSON object")
    if "prompt" not in body:
        raise bad("'prompt' is required", "prompt")
    prompts = _prompts(body["prompt"])
    if body.get("suffix"):
        raise bad("'suffix' is not supported", "suffix")
    common = _common(body, base, default_seed, "max_tokens")
    if common.knobs.context_overflow is not None:
        raise bad("'eft.context_overflow' applies to chat completions (a completion's prompt "
                  "is not made of turns)", "eft.context_overflow")
    echo = _bool(body, "echo")
    logprobs = _number(body, "logprobs", 0, max_logprobs, integer=True)
    token_ids = _bool(body, "return_tokens_as_token_ids")
    if common.max_tokens == 0 and not echo:
        raise bad("'max_tokens' 0 generates nothing; give 'echo': true to score the prompt",
                  "max_tokens")
    if common.max_tokens == 0 and common.stream:
        raise bad("'max_tokens' 0 (scoring only) cannot be streamed", "stream")
    common = _with_grammar(common, body)
    best_of = _count(body, "best_of") if body.get("best_of") is not None else common.n
    if best_of < common.n:
        raise bad(f"'best_of' ({best_of}) must be at least 'n' ({common.n})", "best_of")
    if best_of > common.n and common.stream:
        raise bad("'best_of' above 'n' cannot be streamed: the best are known at the end",
                  "best_of")
    if len(prompts) * best_of > MAX_CHOICES * 8:
        raise bad(f"{len(prompts)} prompts x {best_of} choices are too many generations for "
                  f"one request (at most {MAX_CHOICES * 8})", "prompt")
    return CompletionRequest(common=common, prompts=prompts, echo=echo,
                             logprobs=None if logprobs is None else int(logprobs),
                             token_ids=token_ids, best_of=best_of)


@dataclass(frozen=True)
class RowsRequest:
    """A validated ``POST /eft/rows`` body (see :mod:`eft_local.remote.exact`)."""

    model: str | None
    role: str | None
    tokens: list[int]
    n_past: int
    prefix: str | None
    first: int


def parse_rows(body: Any) -> RowsRequest:
    """Validate an exact-protocol request: ``tokens`` after ``n_past`` held ones (whose
    hash is ``prefix``), rows from position ``first`` on."""
    if not isinstance(body, dict):
        raise bad("the request body must be a JSON object")
    tokens = body.get("tokens")
    if not isinstance(tokens, list) or not tokens or not all(
            isinstance(t, int) and not isinstance(t, bool) for t in tokens):
        raise bad("'tokens' must be a non-empty list of token ids", "tokens")
    n_past = _number(body, "n_past", 0, 1 << 30, integer=True) or 0
    total = int(n_past) + len(tokens)
    first = _number(body, "first", 0, total - 1, integer=True)
    prefix = body.get("prefix")
    if n_past and not isinstance(prefix, str):
        raise bad("'prefix' (the hash of the n_past tokens held) is required with 'n_past'",
                  "prefix")
    for name in ("model", "role"):
        if body.get(name) is not None and not isinstance(body[name], str):
            raise bad(f"'{name}' must be a string", name)
    return RowsRequest(model=body.get("model"), role=body.get("role"), tokens=list(tokens),
                       n_past=int(n_past), prefix=prefix,
                       first=total - 1 if first is None else int(first))

