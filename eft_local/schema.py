"""JSON schemas as grammars: the one way every entry point turns a schema into GBNF.

``generate --json-schema``, a batch record's ``json_schema``, the REPL's ``/grammar
FILE.json``, ``Settings.replace(json_schema=...)`` and the server's ``response_format``,
``json_schema`` and ``tools`` all call :func:`schema_grammar`, so one schema is treated the
same everywhere: bounded before llama-cpp-python's converter sees it (:func:`check_schema`),
converted, and the grammar checked (:func:`eft_local.gbnf.check_gbnf`, then llama.cpp's
parser). Each keyword is one of four kinds: enforced by the grammar (:data:`ENFORCED`,
number ranges included: :mod:`eft_local.ranges`), checked on the finished value
(:mod:`eft_local.schema_check`), an annotation (:data:`ANNOTATIONS`), or neither. A strict
caller gets only what the grammar enforces: every other keyword is refused
(:func:`unenforced`); otherwise a keyword that is neither enforced nor checked
(:func:`unchecked`) is reported through ``note``.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Collection, Iterator, Mapping
from typing import Any

from eft_local import backend, ranges
from eft_local.errors import EftError
from eft_local.gbnf import check_gbnf
from eft_local.schema_check import CHECKED
from eft_local.schema_check import FORMATS as CHECKED_FORMATS

MAX_CHARS = 1 << 18
"""Characters of the schema as compact JSON (256 KiB, as for a grammar's text)."""
MAX_DEPTH = 64
"""Objects and arrays inside one another anywhere in the schema: llama-cpp-python's
converter recurses in Python two to three calls per level (496 nested objects already
exceeded Python's recursion limit)."""
MAX_COUNT = 1000
"""``minLength``, ``maxLength``, ``minItems``, ``maxItems`` and a pattern's ``{m,n}``: the
converter writes one grammar item per unit (``maxLength`` N: N nested groups), and
llama.cpp refuses ``maxLength`` above 1,000 anyway; ``minItems`` 40,000,000 (a 152-byte
request) took 51 s and 3.5 GiB before."""
MAX_TOTAL_COUNT = 20_000
"""Those numbers added up over the whole schema: a 246 kB schema of 3,500 arrays with
``minItems`` 1,000 made the converter write 53 MB of grammar (1 s, 200 MB) that the grammar
limit then refused."""
MAX_ENUM = 1000
"""``enum`` values in the whole schema (OpenAI's structured outputs allow as many): each
value is an alternative that llama.cpp's grammar engine follows at every step; 100,000 took
155 s for three tokens."""
MAX_OPTIONAL = 256
"""Optional properties of one object: the converter recurses once per optional property
(about 990 reached Python's recursion limit)."""

ENFORCED = {"type", "properties", "required", "additionalProperties", "items", "prefixItems",
            "minItems", "maxItems", "enum", "const", "anyOf", "oneOf", "allOf", "$ref", "$defs",
            "definitions", "pattern", "minLength", "maxLength", "format", *ranges.KEYWORDS}
"""Keywords the converter turns into grammar rules (``oneOf`` as ``anyOf``; the ranges on
integers and numbers)."""
ANNOTATIONS = {"title", "description", "default", "examples", "$schema", "$id", "$comment",
               "deprecated", "readOnly", "writeOnly", "strict", "discriminator",
               "contentEncoding", "contentMediaType"}
"""Keywords that do not constrain a value (``discriminator``, OpenAPI's and pydantic's, names
the property that tells the branches of a ``oneOf`` apart, which the grammar holds)."""
FORMATS = {"date", "time", "date-time", "uuid", "uuid1", "uuid2", "uuid3", "uuid4", "uuid5"}
"""String formats the converter enforces."""
COUNTS = ("minLength", "maxLength", "minItems", "maxItems")
"""Keywords whose number the converter writes out item by item (:data:`MAX_COUNT`)."""
_QUANTIFIER = re.compile(r"\{\s*(\d*)\s*(?:,\s*(\d*)\s*)?\}")


def schema_grammar(schema: object, *, strict: bool = False, name: str = "",
                   note: Callable[[str], None] | None = None) -> str:
    """The GBNF grammar of a JSON schema (a mapping, or JSON text), top rule ``name``
    (default ``root``). Bounded first (:func:`check_schema`); ``strict`` refuses a keyword
    the grammar cannot enforce, else ``note`` (when given) is told about it. Errors are one
    line (:class:`EftError`)."""
    if isinstance(schema, (str, bytes)):
        try:
            schema = json.loads(schema)
        except ValueError as exc:
            raise EftError(f"the JSON schema is not valid JSON ({exc})") from None
        except RecursionError:
            raise EftError(f"the JSON schema nests deeper than the limit, {MAX_DEPTH}"
                           ) from None
    if not isinstance(schema, Mapping):
        raise EftError(f"a JSON schema must be an object, got {type(schema).__name__}")
    copy = check_schema(schema)
    found = unenforced(copy)
    if found and strict:
        loose = unchecked(copy)
        after = "" if loose == found else (" (without strict, the finished reply is checked "
                                           "against it)")
        raise EftError(f"the JSON schema is strict but uses {found}, which constrained "
                       f"decoding cannot enforce; drop it or set strict to false{after}")
    found = found and unchecked(copy)
    if found and note is not None:
        note(f"the JSON schema uses {found}, which constrained decoding can neither enforce "
             "nor check: the reply may not follow it")
    text = backend.json_schema_grammar(copy, name)
    try:
        check_gbnf(text)
    except EftError as exc:
        raise EftError(f"the JSON schema's grammar is too large: {exc}") from None
    return text if name else backend.check_grammar(text)  # (llama.cpp starts at root)


def check_schema(schema: Mapping[str, Any]) -> dict[str, Any]:
    """Refuse what would crash, stall or reach the network in the converter (each limit
    above, and a ``$ref`` that is not local: one that does not start with ``#``); a plain
    JSON copy of ``schema`` otherwise."""
    _check_tree(schema)
    try:
        text = json.dumps(schema, allow_nan=False, ensure_ascii=False, separators=(",", ":"))
    except (TypeError, ValueError) as exc:
        raise EftError(f"the JSON schema is not plain JSON ({exc})") from None
    if len(text) > MAX_CHARS:
        raise EftError(f"the JSON schema is {len(text):,} characters long as JSON; the limit "
                       f"is {MAX_CHARS:,}")
    copy = json.loads(text)
    enums = total = 0
    for where, node in _subschemas(copy):
        for key in COUNTS:
            value = node.get(key)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int)
                                      or not 0 <= value <= MAX_COUNT):
                raise EftError(f"'{key}' at {where} is {value!r}; it must be a whole number "
                               f"from 0 to {MAX_COUNT} (the limit)")
            total += value or 0
        pattern = node.get("pattern")
        if isinstance(pattern, str):
            for low, high in _QUANTIFIER.findall(pattern):
                if max(len(low), len(high)) > 4 or max(int(low or 0), int(high or 0)
                                                       ) > MAX_COUNT:
                    raise EftError(f"'pattern' at {where} repeats {{{low},{high}}} times; "
                                   f"the limit is {MAX_COUNT}")
                total += max(int(low or 0), int(high or 0))
        if total > MAX_TOTAL_COUNT:
            raise EftError(f"the JSON schema's {', '.join(COUNTS)} and pattern counts add up "
                           f"to more than {MAX_TOTAL_COUNT:,} (the limit; passed at {where})")
        if isinstance(node.get("enum"), list):
            enums += len(node["enum"])
            if enums > MAX_ENUM:
                raise EftError(f"the JSON schema has more than {MAX_ENUM} 'enum' values "
                               f"(the limit; the one that passes it is at {where})")
        kinds = node.get("type") if isinstance(node.get("type"), list) else [node.get("type")]
        for kind in {"integer", "number"} & set(k for k in kinds if isinstance(k, str)):
            if ranges.has_range(node):  # the bounds are numbers, the range holds a value
                ranges.range_rule(node, integer=kind == "integer", where=where)
        props, required = node.get("properties"), node.get("required")
        if isinstance(props, Mapping):
            named = set(required) if isinstance(required, list) and all(
                isinstance(r, str) for r in required) else set()
            optional = sum(1 for k in props if k not in named)
            if optional > MAX_OPTIONAL:
                raise EftError(f"the object at {where} has {optional} optional properties; "
                               f"the limit is {MAX_OPTIONAL} (list more in 'required')")
    return copy


def _check_tree(schema: object) -> None:
    """Depth and ``$ref`` everywhere in the tree, without recursion (as llama-cpp-python's
    ``resolve_refs`` looks: in every object, inside ``enum`` and ``const`` values too)."""
    todo: list[tuple[object, int, str]] = [(schema, 1, "schema")]
    while todo:
        node, depth, where = todo.pop()
        if depth > MAX_DEPTH:
            raise EftError(f"the JSON schema nests objects and arrays more than {MAX_DEPTH} "
                           f"deep (the limit) at {where}")
        if isinstance(node, Mapping):
            ref = node.get("$ref")
            if ref is not None and not (isinstance(ref, str) and ref.startswith("#")):
                raise EftError(f"'$ref' at {where} is {str(ref)[:100]!r}: only references "
                               "inside the schema (starting with '#') are followed; nothing "
                               "is fetched")
            todo.extend((v, depth + 1, f"{where}.{k}") for k, v in node.items())
        elif isinstance(node, (list, tuple)):
            todo.extend((v, depth + 1, f"{where}[{i}]") for i, v in enumerate(node))


def _subschemas(schema: Mapping[str, Any], where: str = "schema"
                ) -> Iterator[tuple[str, Mapping[str, Any]]]:
    """Every schema inside ``schema`` (itself first) where the converter reads keywords,
    with its place (``schema.properties.a.items``)."""
    todo: list[tuple[str, object]] = [(where, schema)]
    while todo:
        at, node = todo.pop()
        if not isinstance(node, Mapping):
            continue
        yield at, node
        todo.extend(reversed(_children(at, node)))


def _children(where: str, schema: Mapping[str, Any]) -> list[tuple[str, object]]:
    subs: list[tuple[str, object]] = []
    for key, value in schema.items():
        if key in ("properties", "$defs", "definitions") and isinstance(value, Mapping):
            subs += [(f"{where}.{key}.{k}", v) for k, v in value.items()]
        elif key in ("anyOf", "oneOf", "allOf", "prefixItems", "items") and isinstance(
                value, list):
            subs += [(f"{where}.{key}[{i}]", v) for i, v in enumerate(value)]
        elif key in ("items", "additionalProperties") and isinstance(value, Mapping):
            subs.append((f"{where}.{key}", value))
    return subs


def unenforced(schema: object, where: str = "schema") -> str | None:
    """The first place where ``schema`` uses a keyword the grammar would not enforce, as
    ``"'multipleOf' at schema.properties.age"``; None when every keyword is enforced. (It
    recurses once per level: call it on a schema :func:`check_schema` passed.)"""
    return _first(schema, where, set(), {})


def unchecked(schema: object, where: str = "schema") -> str | None:
    """As :func:`unenforced`, for the keywords that are not checked on the finished value
    either (:mod:`eft_local.schema_check`)."""
    return _first(schema, where, CHECKED, CHECKED_FORMATS)


def _first(schema: object, where: str, checked: Collection[str],
           formats: Mapping[str, object]) -> str | None:
    if not isinstance(schema, Mapping):
        return None if isinstance(schema, bool) else f"a {type(schema).__name__} at {where}"
    for key, value in schema.items():
        if key in ANNOTATIONS or key in checked or key == "format" and value in formats:
            continue
        if key not in ENFORCED or (key == "format" and value not in FORMATS):
            return f"{key!r}{f' {value!r}' if key == 'format' else ''} at {where}"
        subs: list[tuple[str, object]] = []
        if key in ("properties", "$defs", "definitions") and isinstance(value, Mapping):
            subs = [(f"{where}.{key}.{k}", v) for k, v in value.items()]
        elif key in ("anyOf", "oneOf", "allOf", "prefixItems") and isinstance(value, list):
            subs = [(f"{where}.{key}[{i}]", v) for i, v in enumerate(value)]
        elif key in ("items", "additionalProperties") and isinstance(value, Mapping):
            subs = [(f"{where}.{key}", value)]
        for sub_where, sub in subs:
            found = _first(sub, sub_where, checked, formats)
            if found:
                return found
    return None
