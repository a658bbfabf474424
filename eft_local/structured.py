"""Structured output and tool calls as grammars: OpenAI's ``response_format`` and ``tools``.

A JSON schema becomes GBNF as everywhere else (:func:`eft_local.schema.schema_grammar`:
bounded, converted, checked); this module chooses what to constrain and reads the result
back:

- ``response_format`` ``json_object`` (any JSON object) or ``json_schema`` (OpenAI's shape;
  with ``strict`` a schema that uses a keyword the grammar cannot enforce is refused rather
  than half-kept);
- ``tools``: a call is the JSON object ``{"name": ..., "arguments": {...}}`` (inside
  ``<tool_call>`` tags where the chat template uses them, as Hermes and Qwen models are
  trained to), one per reply; ``tool_choice`` ``required`` or a named function allows only a
  call, ``auto`` a call or text.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from eft_local import backend
from eft_local.errors import EftError
from eft_local.schema import (  # noqa: F401  (the keyword sets, re-exported)
    ANNOTATIONS,
    ENFORCED,
    FORMATS,
    schema_grammar,
    unenforced,
)
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
    calls: str
    """GBNF rules whose ``tool-call`` rule is one call object of the allowed tools."""

    def grammar(self, tagged: bool, response: str | None = None) -> str | None:
        """The grammar of a reply (None for ``none``): a call (in ``<tool_call>`` tags
        when ``tagged``), or with ``auto`` a call or text (or the rules of ``response``, whose
        top rule is ``response``: a structured reply)."""
        if self.choice == "none":
            return None
        call = r'"<tool_call>\n" tool-call "\n</tool_call>"' if tagged else "tool-call"
        text = "response" if response else (r'[^<] [^\x00]*' if tagged else r'[^{] [^\x00]*')
        root = f"root ::= {call}" + (f" | {text}" if self.choice == "auto" else "")
        return "\n".join(x for x in (root, self.calls, response) if x)

    def parse(self, text: str, tagged: bool) -> list[dict[str, Any]] | None:
        """The reply's tool calls in OpenAI's shape, or None when it is text (or a call cut
        short by the token limit)."""
        if self.choice == "none":
            return None
        body = text.strip()
        if tagged:
            if not (body.startswith("<tool_call>") and body.endswith("</tool_call>")):
                return None
            body = body[len("<tool_call>"):-len("</tool_call>")].strip()
        try:
            call = json.loads(body)
        except ValueError:
            return None
        names = {t.name for t in self.tools}
        if not (isinstance(call, dict) and call.get("name") in names
                and isinstance(call.get("arguments"), dict)):
            return None
        return [{"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
                 "function": {"name": call["name"],
                              "arguments": json.dumps(call["arguments"], ensure_ascii=False)}}]

    def may_be_call(self, text: str, tagged: bool) -> bool:
        """Whether a reply that starts with ``text`` can still become a call."""
        head = text.lstrip()
        start = "<tool_call>" if tagged else "{"
        return self.choice != "none" and (head.startswith(start) or start.startswith(head))


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
    schemas = [{"type": "object", "properties": {"name": {"const": t.name},
                                                 "arguments": t.parameters},
                "required": ["name", "arguments"]} for t in chosen]
    for i, t in enumerate(parsed):  # each tool's own message, where it is wrong
        if t in chosen:
            _schema(t.parameters, f"tools[{i}].function.parameters", strict=t.strict)
    calls = _schema(schemas[0] if len(schemas) == 1 else {"anyOf": schemas}, "tools",
                    name="tool-call")
    return ToolPlan(tools=tuple(parsed), choice=mode, calls=calls)


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


def tool_call_text(calls: Sequence[Mapping[str, Any]], tagged: bool) -> str:
    """Assistant tool calls (OpenAI's shape) as the text a model writes for them."""
    out = []
    for call in calls:
        fn = call.get("function") or {}
        text = json.dumps({"name": fn.get("name"), "arguments": _arguments(fn.get("arguments"))},
                          ensure_ascii=False)
        out.append(f"<tool_call>\n{text}\n</tool_call>" if tagged else text)
    return "\n".join(out)


# -- tools in the chat history ---------------------------------------------------------------
TOOLS_PROMPT = ("Functions you can call:\n{functions}\nTo call one, reply with only "
                "{{\"name\": NAME, \"arguments\": {{...}}}}.")
"""Written into the system message where the chat template does not render tools."""


def tagged(template: str) -> bool:
    """Whether the template's models write calls in ``<tool_call>`` tags (Hermes, Qwen)."""
    return "<tool_call>" in template


def tool_messages(template: str, messages: Sequence[Mapping[str, Any]],
                  tools: Sequence[Mapping[str, Any]] | None
                  ) -> tuple[list[dict[str, Any]], list[dict[str, Any]] | None]:
    """Messages and ``tools`` for rendering with ``template``: as they are where the
    template renders tool cards, assistant tool calls and tool results; otherwise the cards
    go into the system message (:data:`TOOLS_PROMPT`), a call becomes the text a model
    writes for it (:func:`tool_call_text`) and a result a user message ``Result of NAME:
    CONTENT``."""
    can = tool_support(template)
    tag = tagged(template)
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
            m["content"] = m.get("content") or ""
        elif calls:
            m["content"] = "\n".join(x for x in (m.get("content"), tool_call_text(calls, tag))
                                     if x)
        if m.get("role") == "tool":
            name = m.get("name") or names.get(str(m.get("tool_call_id")), "the function")
            m = ({**m, "name": name} if can.results else
                 {"role": "user", "content": f"Result of {name}: {m.get('content', '')}"})
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
