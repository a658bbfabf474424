"""Structured output and tool calls as grammars: OpenAI's ``response_format`` and ``tools``.

A JSON schema becomes GBNF as everywhere else (:func:`eft_local.schema.schema_grammar`:
bounded, converted, checked); this module chooses what to constrain and reads the result
back:

- ``response_format`` ``json_object`` (any JSON object) or ``json_schema`` (OpenAI's shape;
  with ``strict`` a schema that uses a keyword the grammar cannot enforce is refused rather
  than half-kept);
- ``tools``: a call is written in the shape the chat template renders calls
  (:mod:`eft_local.callshape`: ``{"name": ..., "arguments": {...}}`` in ``<tool_call>`` tags
  for Hermes and Qwen, bare with ``"parameters"`` for Llama 3.1, ``[TOOL_CALLS][...]`` with
  an ``id`` for Mistral), one per reply; ``tool_choice`` ``required`` or a named function
  allows only a call, ``auto`` a call or text;
- a reasoning block ``<think>...</think>`` first, where the template uses one.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from eft_local import backend
from eft_local.callshape import (
    END_THINK,
    THINK,
    CallShape,
    call_shape,
    read_calls,
    reply_ids,
    short_id,
)
from eft_local.callshape import may_be_call as _may_be_call
from eft_local.errors import EftError
from eft_local.schema import (  # noqa: F401  (the keyword sets, re-exported)
    ANNOTATIONS,
    ENFORCED,
    FORMATS,
    schema_grammar,
    unenforced,
)
from eft_local.schema_check import needs_check
from eft_local.templates import tool_support


class SchemaError(EftError):
    """A request's schema, tool or format is wrong; ``param`` says where."""

    def __init__(self, message: str, param: str) -> None:
        super().__init__(message)
        self.param = param


ANY_OBJECT = {"type": "object"}
"""The schema of ``json_object``: any JSON object."""

def _schema(schema: object, param: str, *, strict: bool = False, name: str = "") -> str:
    """:func:`eft_local.schema.schema_grammar` for a request's schema: not JSON text (it
    came as JSON already); errors are :class:`SchemaError` about ``param``."""
    if not isinstance(schema, Mapping):
        raise SchemaError(f"'{param}' must be a JSON schema object", param)
    try:
        return schema_grammar(schema, strict=strict, name=name)
    except EftError as exc:
        raise SchemaError(f"'{param}': {exc}", param) from None


def response_grammar(body: Mapping[str, Any], name: str = "") -> str | None:
    """The grammar a request's ``response_format`` (OpenAI), ``json_schema`` or ``grammar``
    (llama-server) asks for; None for free text. ``name`` names the top rule of a schema's
    grammar (default ``root``)."""
    given = [k for k in ("response_format", "json_schema", "grammar") if body.get(k)
             and not (k == "response_format" and isinstance(body[k], Mapping)
                      and body[k].get("type") == "text")]
    if len(given) > 1:
        raise SchemaError(f"give one of 'response_format', 'json_schema' and 'grammar', not "
                          f"{' and '.join(repr(k) for k in given)}", given[1])
    if not given:
        return None
    key = given[0]
    value = body[key]
    if key == "grammar":
        if not isinstance(value, str):
            raise SchemaError("'grammar' must be GBNF text", "grammar")
        try:
            return backend.check_grammar(value)
        except EftError as exc:
            raise SchemaError(str(exc), "grammar") from None
    if key == "json_schema":
        return _schema(value, "json_schema", name=name)
    if not isinstance(value, Mapping):
        raise SchemaError("'response_format' must be an object such as {\"type\": "
                          "\"json_object\"}", key)
    kind = value.get("type")
    if kind == "json_object":  # llama-server also reads a schema here
        return _schema(value.get("schema") or ANY_OBJECT, "response_format.schema",
                              name=name)
    if kind != "json_schema":
        raise SchemaError(f"'response_format.type' is {kind!r}; use text, json_object or "
                          "json_schema", "response_format.type")
    spec = value.get("json_schema")
    if not isinstance(spec, Mapping) or "schema" not in spec:
        raise SchemaError("'response_format.json_schema' must be {\"name\": ..., \"schema\": "
                          "{...}, \"strict\": true|false}", "response_format.json_schema")
    strict = spec.get("strict")
    if strict is not None and not isinstance(strict, bool):
        raise SchemaError("'response_format.json_schema.strict' must be true or false",
                          "response_format.json_schema.strict")
    return _schema(spec["schema"], "response_format.json_schema.schema",
                          strict=bool(strict), name=name)


def response_schema(body: Mapping[str, Any]) -> Mapping[str, Any] | None:
    """The schema of a request's ``response_format`` or ``json_schema`` whose finished reply
    must be checked (:mod:`eft_local.schema_check`: it uses a keyword the grammar cannot
    hold, and it is not strict, which would have refused it); None otherwise. Call it on a
    body :func:`response_grammar` passed."""
    value = body.get("json_schema")
    fmt = body.get("response_format")
    if not value and isinstance(fmt, Mapping):
        spec = fmt.get("json_schema")
        value = fmt.get("schema") if fmt.get("type") == "json_object" else (
            spec.get("schema") if isinstance(spec, Mapping) and fmt.get("type") ==
            "json_schema" else None)
    return value if isinstance(value, Mapping) and needs_check(value) else None


# -- tools -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Tool:
    """One function a request offers."""

    name: str
    description: str
    parameters: Mapping[str, Any]
    strict: bool = False

    def card(self) -> dict[str, Any]:
        """OpenAI's shape, as chat templates expect it."""
        return {"type": "function", "function": {"name": self.name,
                                                 "description": self.description,
                                                 "parameters": dict(self.parameters)}}


@dataclass(frozen=True)
class ToolPlan:
    """A request's tools and ``tool_choice``: ``none``, ``auto``, ``required`` or a name."""

    tools: tuple[Tool, ...]
    choice: str
    chosen: tuple[Tool, ...] = ()
    """The tools a call may name (all, or the one ``tool_choice`` names)."""

    def calls(self, shape: CallShape) -> str:
        """GBNF rules whose ``tool-call`` rule is one call object of the allowed tools,
        with the keys of ``shape``."""
        return _call_rules(json.dumps([[t.name, t.parameters] for t in self.chosen]),
                           shape.arguments, shape.ids)

    def grammar(self, shape: CallShape, response: str | None = None) -> str | None:
        """The grammar of a reply (None for ``none``): a call in ``shape``, or with
        ``auto`` a call or text (or the rules of ``response``, whose top rule is
        ``response``: a structured reply); after a reasoning block where the shape has
        one."""
        if self.choice == "none":
            return None
        call = '"[" space tool-call "]" space' if shape.listed else "tool-call"
        block = " eft-ws ".join(x for x in (_literal(shape.prefix), call,
                                             _literal(shape.suffix)) if x)
        body = block
        if self.choice == "auto":
            avoid = [shape.prefix, "{", "[" if shape.listed else ""]  # nothing like a call
            body += " | response" if response else f" | {_not_starting(avoid, shape)}"
        return reply_grammar(shape, body, self.calls(shape), response)

    def parse(self, text: str, shape: CallShape) -> list[dict[str, Any]] | None:
        """The reply's tool calls (``text``: after any reasoning) in OpenAI's shape, or
        None when it is text (or a call cut short by the token limit)."""
        if self.choice == "none":
            return None
        calls = read_calls(text, shape)
        names = {t.name for t in self.tools}
        if calls is None or any(c["name"] not in names for c in calls):
            return None
        return [{"id": i, "type": "function",
                 "function": {"name": c["name"],
                              "arguments": json.dumps(c["arguments"], ensure_ascii=False)}}
                for i, c in zip(reply_ids(calls, shape), calls, strict=True)]

    def may_be_call(self, text: str, shape: CallShape) -> bool:
        """Whether a reply (after any reasoning) that starts with ``text`` can still become
        a call."""
        return self.choice != "none" and _may_be_call(text, shape)


@functools.lru_cache(maxsize=32)
def _call_rules(tools: str, arguments: str, ids: bool) -> str:
    """The ``tool-call`` rules of ``tools`` (JSON: ``[[name, parameters], ...]``)."""
    schemas = []
    for name, parameters in json.loads(tools):
        props = {"name": {"const": name}, arguments: parameters}
        if ids:
            props["id"] = {"type": "string", "pattern": "^[a-zA-Z0-9]{9}$"}
        schemas.append({"type": "object", "properties": props, "required": list(props)})
    return _schema(schemas[0] if len(schemas) == 1 else {"anyOf": schemas}, "tools",
                   name="tool-call")


def reply_grammar(shape: CallShape, body: str | None, *rules: str | None) -> str | None:
    """A chat reply's grammar: ``body`` (a GBNF expression; None: any text) after the
    reasoning block of ``shape`` (where it has one), with ``rules`` (rule sets the body
    names). None where nothing constrains the reply."""
    if body is None:
        return None
    if shape.think_open:
        root = f'root ::= eft-think-0 {_literal(END_THINK)} eft-ws ({body})'
    elif shape.think:
        root = f"root ::= eft-think? ({body})"
    else:
        root = f"root ::= {body}"
    think = _THINK_RULES if shape.think else ""
    return "\n".join(x for x in (root, *rules, think, 'eft-ws ::= [ \\t\\n]{0,4}',
                                  r'eft-rest ::= [^\x00]*') if x)


def _think_rules() -> str:
    """Rules of a reasoning block: ``eft-think-K`` is the text that does not hold
    ``</think>``, once its first K characters have just been seen."""
    end = END_THINK
    lines = [f"eft-think ::= {_literal(THINK)} eft-think-0 {_literal(end)} eft-ws",
             "eft-think-0 ::= ( [^<] eft-think-0 | \"<\" eft-think-1 )?"]
    for k in range(1, len(end)):
        nxt = end[k]
        go = f" | {_literal(nxt)} eft-think-{k + 1}" if k + 1 < len(end) else ""
        lines.append(f"eft-think-{k} ::= ( [^{_class(nxt)}<] eft-think-0 | \"<\" eft-think-1"
                     f"{go} )?")
    return "\n".join(lines)


def _literal(text: str) -> str:
    """``text`` as a GBNF string literal ("" for nothing)."""
    if not text:
        return ""
    return '"' + "".join(c if c.isalnum() or c in " <>/_[]|-.:=" else _escape(c)
                         for c in text) + '"'


def _class(chars: str) -> str:
    """Characters for a GBNF character class, each escaped."""
    return "".join(c if c.isalnum() else _escape(c) for c in chars)


def _escape(c: str) -> str:
    return f"\\x{ord(c):02X}" if ord(c) < 0x100 else f"\\u{ord(c):04X}" if ord(
        c) < 0x10000 else f"\\U{ord(c):08X}"


def _not_starting(prefixes: Sequence[str], shape: CallShape) -> str:
    """A GBNF expression for text (one character at least) that does not start with any of
    ``prefixes`` (nor with the reasoning block's tag, where the shape has one)."""
    words = {p for p in prefixes if p} | ({THINK} if shape.think else set())

    def node(done: str) -> str:
        nxt = sorted({w[len(done)] for w in words if w.startswith(done) and len(w) > len(done)})
        alts = [f"[^{_class(''.join(nxt))}] eft-rest"]
        for c in nxt:
            if done + c in words:
                continue  # a whole prefix: not text
            alts.append(f"{_literal(c)} ({node(done + c)})?")
        return " | ".join(alts)

    return f"({node('')})"


_THINK_RULES = _think_rules()


def tool_plan(tools: object, choice: object) -> ToolPlan | None:
    """Validate a request's ``tools`` and ``tool_choice`` (None: no tools)."""
    if tools is None or tools == []:
        if choice not in (None, "none", "auto"):
            raise SchemaError("'tool_choice' needs 'tools'", "tool_choice")
        return None
    if not isinstance(tools, list):
        raise SchemaError("'tools' must be a list of {\"type\": \"function\", \"function\": "
                          "{...}}", "tools")
    parsed = [_tool(t, i) for i, t in enumerate(tools)]
    names = [t.name for t in parsed]
    if len(set(names)) < len(names):
        raise SchemaError("'tools' names a function twice", "tools")
    chosen = parsed
    if choice is None or choice in ("auto", "required", "none"):
        mode = choice or "auto"
    elif (isinstance(choice, Mapping) and choice.get("type") == "function"
          and isinstance(choice.get("function"), Mapping)
          and isinstance(choice["function"].get("name"), str)):
        mode = choice["function"]["name"]
        chosen = [t for t in parsed if t.name == mode]
        if not chosen:
            raise SchemaError(f"'tool_choice' names {mode!r}, which is not among the tools "
                              f"({', '.join(names)})", "tool_choice")
    else:
        raise SchemaError("'tool_choice' must be none, auto, required or {\"type\": "
                          "\"function\", \"function\": {\"name\": ...}}", "tool_choice")
    for i, t in enumerate(parsed):  # each tool's own message, where it is wrong
        if t in chosen:
            _schema(t.parameters, f"tools[{i}].function.parameters", strict=t.strict)
    plan = ToolPlan(tools=tuple(parsed), choice=mode, chosen=tuple(chosen))
    plan.calls(CallShape())  # a tool whose call cannot be a grammar: said before any work
    return plan


def _tool(value: object, i: int) -> Tool:
    where = f"tools[{i}]"
    fn = value.get("function") if isinstance(value, Mapping) else None
    if not isinstance(value, Mapping) or value.get("type") != "function" or not isinstance(
            fn, Mapping):
        raise SchemaError(f"'{where}' must be {{\"type\": \"function\", \"function\": "
                          "{\"name\": ..., \"parameters\": {...}}}", where)
    name = fn.get("name")
    if not isinstance(name, str) or not name or len(name) > 64 or not all(
            c.isalnum() or c in "_-" for c in name):
        raise SchemaError(f"'{where}.function.name' must be 1-64 letters, digits, _ or -",
                          f"{where}.function.name")
    params = fn.get("parameters")
    if params is None:
        params = {"type": "object", "properties": {}}
    if not isinstance(params, Mapping):
        raise SchemaError(f"'{where}.function.parameters' must be a JSON schema object",
                          f"{where}.function.parameters")
    description = fn.get("description") or ""
    strict = fn.get("strict")
    if not isinstance(description, str) or not isinstance(strict, (bool, type(None))):
        raise SchemaError(f"'{where}.function' has a description that is not text or a strict "
                          "that is not true or false", f"{where}.function")
    return Tool(name=name, description=description, parameters=params, strict=bool(strict))


def tool_call_text(calls: Sequence[Mapping[str, Any]], shape: CallShape) -> str:
    """Assistant tool calls (OpenAI's shape) as the text a model writes for them."""
    return "\n".join(shape.call_text((c.get("function") or {}).get("name"), _arguments(
        (c.get("function") or {}).get("arguments")), str(c.get("id") or "")) for c in calls)


# -- tools in the chat history ---------------------------------------------------------------
TOOLS_PROMPT = ("Functions you can call:\n{functions}\nTo call one, reply with only "
                "{{\"name\": NAME, \"arguments\": {{...}}}}.")
"""Written into the system message where the chat template does not render tools."""


def tool_messages(template: str, messages: Sequence[Mapping[str, Any]],
                  tools: Sequence[Mapping[str, Any]] | None
                  ) -> tuple[list[dict[str, Any]], list[dict[str, Any]] | None]:
    """Messages and ``tools`` for rendering with ``template``: as they are where the
    template renders tool cards, assistant tool calls and tool results; otherwise the cards
    go into the system message (:data:`TOOLS_PROMPT`), a call becomes the text a model
    writes for it (:func:`tool_call_text`) and a result a user message ``Result of NAME:
    CONTENT``. Call ids become nine letters and digits where the template takes no other
    (Mistral's)."""
    can = tool_support(template)
    shape = call_shape(template)
    names: dict[str, str] = {}
    out: list[dict[str, Any]] = []
    for m in messages:
        m = dict(m)
        calls = m.pop("tool_calls", None) or []
        for c in calls:
            names[str(c.get("id"))] = (c.get("function") or {}).get("name", "")
        if calls and can.calls:
            m["tool_calls"] = [{**c, "function": {**c["function"], "arguments": _arguments(
                c["function"].get("arguments"))}} for c in calls]
            if shape.short_ids:
                m["tool_calls"] = [{**c, "id": short_id(str(c.get("id") or ""))}
                                   for c in m["tool_calls"]]
            m["content"] = m.get("content") or ""
        elif calls:
            m["content"] = "\n".join(x for x in (m.get("content"), tool_call_text(calls, shape))
                                     if x)
        if m.get("role") == "tool":
            name = m.get("name") or names.get(str(m.get("tool_call_id")), "the function")
            m = ({**m, "name": name} if can.results else
                 {"role": "user", "content": f"Result of {name}: {m.get('content', '')}"})
            if can.results and shape.short_ids:
                m["tool_call_id"] = short_id(str(m.get("tool_call_id") or ""))
        out.append(m)
    if not tools or can.tools:
        return out, list(tools) if tools else None
    text = TOOLS_PROMPT.format(functions="\n".join(json.dumps(
        {k: v for k, v in t["function"].items() if v or k == "name"}, ensure_ascii=False,
        separators=(",", ":")) for t in tools))
    if out and out[0].get("role") == "system":
        out[0] = {**out[0], "content": f"{out[0].get('content') or ''}\n\n{text}".lstrip()}
    else:
        out.insert(0, {"role": "system", "content": text})
    return out, None


def _arguments(value: object) -> object:
    """Arguments as a mapping where they are JSON text (templates write them with tojson)."""
    if isinstance(value, str):
        try:
            return json.loads(value)
        except ValueError:
            return value
    return value
