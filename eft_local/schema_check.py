"""A finished reply checked against the keywords of its JSON schema that no grammar holds.

The grammar enforces most of a schema while the reply is written
(:func:`eft_local.schema.schema_grammar`); ``multipleOf``, ``uniqueItems``,
``minProperties``, ``maxProperties`` and the string formats of :data:`FORMATS` it cannot,
so without ``strict`` they are checked here on the finished value and each violation is
said (the server's ``eft.schema_violations`` and its log line, the CLI's ``note:`` line);
with ``strict`` they are refused before anything is generated.
"""

from __future__ import annotations

import ipaddress
import json
import re
from collections.abc import Iterator, Mapping
from decimal import Decimal, InvalidOperation
from typing import Any

CHECKED = frozenset({"multipleOf", "uniqueItems", "minProperties", "maxProperties"})
"""Keywords checked on the finished value."""

_HOST = re.compile(r"(?=.{1,253}$)([A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)"
                   r"(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*\.?")
_EMAIL = re.compile(r"[^@\s]+@[^@\s]+")
_URI = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*:[^\s]+")


def _ip(version: int, text: str) -> bool:
    try:
        return ipaddress.ip_address(text).version == version
    except ValueError:
        return False


FORMATS = {"email": _EMAIL.fullmatch, "hostname": _HOST.fullmatch, "uri": _URI.fullmatch,
           "ipv4": lambda t: _ip(4, t), "ipv6": lambda t: _ip(6, t)}
"""String formats checked on the finished value (a plain shape: an ``@`` between two
non-empty parts; a scheme and a colon; an IP address as Python's ``ipaddress`` reads it)."""

MAX_VIOLATIONS = 10
"""Violations said about one reply at most."""


def needs_check(schema: object) -> bool:
    """Whether ``schema`` uses a keyword that only the finished value can be checked for."""
    return any(k in CHECKED or k == "format" and v in FORMATS
               for node in _nodes(schema) for k, v in node.items())


def violations(schema: Mapping[str, Any], text: str) -> list[str]:
    """What in the reply ``text`` breaks the keywords of :data:`CHECKED` and
    :data:`FORMATS` of ``schema`` (a schema :func:`eft_local.schema.check_schema` passed),
    each as ``'multipleOf' at schema.properties.n: reply.n is 7, not a multiple of 5``;
    nothing for a reply that is not JSON (cut short: its finish says so)."""
    try:
        value = json.loads(text)
    except (ValueError, RecursionError):
        return []
    out: list[str] = []
    _check(schema, value, "schema", "reply", schema, out)
    return out[:MAX_VIOLATIONS]


def _check(schema: object, value: Any, where: str, place: str, root: Mapping[str, Any],
           out: list[str], depth: int = 0) -> None:
    if not isinstance(schema, Mapping) or depth > 200 or len(out) >= MAX_VIOLATIONS:
        return
    ref = schema.get("$ref")
    if isinstance(ref, str):
        target = _resolve(root, ref)
        if target is not None:
            _check(target, value, ref, place, root, out, depth + 1)
    for key in ("anyOf", "oneOf"):
        branches = schema.get(key)
        if isinstance(branches, list):
            fitting = [(i, b) for i, b in enumerate(branches) if _fits(b, value, root)]
            found: list[list[str]] = []
            for i, branch in fitting:
                mine: list[str] = []
                _check(branch, value, f"{where}.{key}[{i}]", place, root, mine, depth + 1)
                if not mine:
                    break
                found.append(mine)
            else:
                out.extend(found[0] if found else [])
    for i, branch in enumerate(schema.get("allOf") or []):
        _check(branch, value, f"{where}.allOf[{i}]", place, root, out, depth + 1)
    _own(schema, value, where, place, out)
    if isinstance(value, dict):
        props = schema.get("properties") if isinstance(schema.get("properties"), Mapping) else {}
        extra = schema.get("additionalProperties")
        for k, v in value.items():
            sub, at = (props[k], f"{where}.properties.{k}") if k in props else (
                extra, f"{where}.additionalProperties")
            _check(sub, v, at, f"{place}.{k}", root, out, depth + 1)
    elif isinstance(value, list):
        prefix = schema.get("prefixItems")
        items = schema.get("items")
        if isinstance(items, list):  # draft 4: one schema per place
            prefix, items = items, None
        prefix = prefix if isinstance(prefix, list) else []
        for i, v in enumerate(value):
            sub, at = (prefix[i], f"{where}.prefixItems[{i}]") if i < len(prefix) else (
                items, f"{where}.items")
            _check(sub, v, at, f"{place}[{i}]", root, out, depth + 1)


def _own(schema: Mapping[str, Any], value: Any, where: str, place: str,
         out: list[str]) -> None:
    """The checked keywords of ``schema`` itself."""
    def say(key: str, why: str) -> None:
        out.append(f"'{key}' at {where}: {place} is {_short(value)}, {why}")

    step = schema.get("multipleOf")
    if is_number(step) and is_number(value) and step > 0:
        try:
            if Decimal(repr(value)) % Decimal(repr(step)) != 0:
                say("multipleOf", f"not a multiple of {step}")
        except InvalidOperation:  # a quotient too large to hold: said as not a multiple
            say("multipleOf", f"not a multiple of {step}")
    if schema.get("uniqueItems") is True and isinstance(value, list):
        seen = [json.dumps(v, sort_keys=True) for v in value]
        twice = next((v for i, v in enumerate(seen) if v in seen[:i]), None)
        if twice is not None:
            say("uniqueItems", f"with {twice[:40]} twice")
    if isinstance(value, dict):
        for key, word, broken in (("minProperties", "fewer", lambda n, m: n < m),
                                  ("maxProperties", "more", lambda n, m: n > m)):
            limit = schema.get(key)
            if isinstance(limit, int) and not isinstance(limit, bool) and broken(len(value),
                                                                                 limit):
                say(key, f"with {word} than {limit} properties")
    fmt = schema.get("format")
    if isinstance(value, str) and fmt in FORMATS and not FORMATS[fmt](value):
        say("format", f"not {'an' if fmt[0] in 'aeiou' else 'a'} {fmt}")


def _fits(schema: object, value: Any, root: Mapping[str, Any], depth: int = 0) -> bool:
    """Whether ``value`` has a type, const or enum ``schema`` allows (what tells the
    branches of ``anyOf`` apart)."""
    if isinstance(schema, bool) or not isinstance(schema, Mapping):
        return bool(schema)
    ref = schema.get("$ref")
    if isinstance(ref, str) and depth < 50:
        target = _resolve(root, ref)
        return target is None or _fits(target, value, root, depth + 1)
    if "const" in schema and schema["const"] != value:
        return False
    if isinstance(schema.get("enum"), list) and value not in schema["enum"]:
        return False
    kinds = schema.get("type")
    if kinds is None:
        return True
    kinds = kinds if isinstance(kinds, list) else [kinds]
    return any(_is_type(k, value) for k in kinds)


def _is_type(kind: object, value: Any) -> bool:
    return {"null": value is None, "boolean": isinstance(value, bool),
            "string": isinstance(value, str), "array": isinstance(value, list),
            "object": isinstance(value, dict), "number": is_number(value),
            "integer": is_number(value) and float(value).is_integer()}.get(str(kind), True)


def is_number(value: object) -> bool:
    """A JSON number: an int or float, not a bool."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _resolve(root: Mapping[str, Any], ref: str) -> object:
    """A local reference (``#/$defs/Name``) in ``root``; None where it leads nowhere."""
    node: object = root
    for part in ref.removeprefix("#").strip("/").split("/") if ref != "#" else []:
        part = part.replace("~1", "/").replace("~0", "~")
        if not isinstance(node, Mapping) or part not in node:
            return None
        node = node[part]
    return node


def _nodes(schema: object) -> Iterator[Mapping[str, Any]]:
    """Every object inside ``schema`` (itself first), without recursion."""
    todo = [schema]
    while todo:
        node = todo.pop()
        if isinstance(node, Mapping):
            yield node
            todo.extend(v for k, v in node.items() if k not in ("enum", "const", "default",
                                                                "examples"))
        elif isinstance(node, list):
            todo.extend(node)


def _short(value: Any) -> str:
    text = json.dumps(value, ensure_ascii=False)
    return text if len(text) <= 60 else text[:57] + "..."
