"""How a chat template writes an assistant's tool calls, and whether its replies think first.

Found as llama.cpp's chat code finds it: by rendering probes and comparing them. The
template renders one assistant message holding a tool call and one holding plain text;
where the two part is where a call begins, the JSON object that names the probe function is
the call (the key that holds its arguments: ``arguments`` or Llama 3.1's ``parameters``;
inside a JSON list, as Mistral's ``[TOOL_CALLS][...]``; with an ``id``), the text between
is the call's prefix (``<tool_call>`` of Hermes and Qwen) and the text after it, before
what both messages end with, its suffix. A template that renders no call gets the fallback:
a bare ``{"name": ..., "arguments": {...}}`` (or ``<tool_call>`` tags where the template
mentions them). A template that mentions ``</think>`` (DeepSeek R1, QwQ, Qwen 3) lets a
reply start with a ``<think>...</think>`` block; one whose generation prompt ends with
``<think>`` starts the reply inside it.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import re
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from eft_local.errors import EftError
from eft_local.templates import render

THINK, END_THINK = "<think>", "</think>"
"""The reasoning block's tags (DeepSeek R1's, which QwQ and Qwen 3 share)."""

_PROBE = "eft_probe_fn"
_ARGS = {"eft_probe_arg": "eft_probe_value"}
_ID = "eftprobe1"  # nine letters and digits: Mistral's templates take no other id
_TEXT = "Qx_probe_text"
_ID_CHARS = re.compile(r"[A-Za-z0-9]{9}")


@dataclass(frozen=True)
class CallShape:
    """How replies write tool calls and reasoning under one chat template."""

    prefix: str = ""
    """Before the call (whitespace around it aside): ``<tool_call>``, ``[TOOL_CALLS]``..."""
    suffix: str = ""
    """After the call: ``</tool_call>``..."""
    arguments: str = "arguments"
    """The key of a call's arguments (Llama 3.1: ``parameters``)."""
    listed: bool = False
    """The calls are a JSON list (Mistral)."""
    ids: bool = False
    """Each call carries an ``id`` of nine letters and digits (Mistral)."""
    short_ids: bool = False
    """The template renders only such ids: ids in the history are shortened to them."""
    rendered: bool = False
    """The template renders calls (found by the probes); else the fallback shape."""
    think: bool = False
    """A reply may start with a ``<think>...</think>`` block."""
    think_open: bool = False
    """The generation prompt opens the block: the reply starts inside it."""

    @property
    def name(self) -> str:
        """A short name for logs and docs."""
        if not self.rendered:
            return "json" if not self.prefix else "tagged"
        if self.listed:
            return "listed"
        return "tagged" if self.prefix else "json" if self.arguments == "arguments" else (
            f"json-{self.arguments}")

    def call_text(self, name: str, arguments: object, call_id: str | None = None) -> str:
        """One call as the text a model writes for it."""
        call: dict[str, Any] = {"name": name, self.arguments: arguments}
        if self.ids:
            call["id"] = short_id(call_id or "")
        text = json.dumps([call] if self.listed else call, ensure_ascii=False)
        parts = [self.prefix, text, self.suffix]
        sep = "\n" if self.prefix.startswith("<") else ""
        return sep.join(p for p in parts if p)


FALLBACK = CallShape()
"""The shape of a template that renders no call: what :data:`structured.TOOLS_PROMPT`
asks for."""


def short_id(call_id: str) -> str:
    """A call id of nine letters and digits (as Mistral's templates demand): the id itself
    where it is one, else one made from it (the same for the same id)."""
    if _ID_CHARS.fullmatch(call_id):
        return call_id
    if not call_id:
        return uuid.uuid4().hex[:9]
    return hashlib.sha256(call_id.encode("utf-8")).hexdigest()[:9]


@functools.lru_cache(maxsize=16)
def call_shape(template: str) -> CallShape:
    """The shape of tool calls and reasoning under ``template`` (see the module doc)."""
    think = END_THINK in template
    user = {"role": "user", "content": "hi"}
    card = {"type": "function", "function": {"name": _PROBE, "description": "",
                                             "parameters": {"type": "object", "properties": {
                                                 "eft_probe_arg": {"type": "string"}}}}}
    opening = _render(template, [user], add_generation_prompt=True) or ""
    think_open = think and opening.rstrip().endswith(THINK)
    tagged = "<tool_call>" in template
    base = CallShape(prefix="<tool_call>" if tagged else "", suffix="</tool_call>" if tagged
                     else "", think=think, think_open=think_open)
    found = None
    for call_id in (_ID, "call_eft_probe_1"):
        call = {"role": "assistant", "content": "", "tool_calls": [
            {"id": call_id, "type": "function",
             "function": {"name": _PROBE, "arguments": dict(_ARGS)}}]}
        with_call = _render(template, [user, call], tools=[card])
        if with_call is not None and _PROBE in with_call:
            found = found or with_call
        elif found is not None:  # the short id renders, the long one does not
            return _shape(found, template, card, user, base, short_ids=True)
    return base if found is None else _shape(found, template, card, user, base,
                                             short_ids=False)


def _shape(with_call: str, template: str, card: dict[str, Any], user: dict[str, Any],
           base: CallShape, *, short_ids: bool) -> CallShape:
    with_text = _render(template, [user, {"role": "assistant", "content": _TEXT}],
                        tools=[card]) or ""
    located = _locate(with_call)
    if located is None:
        return base
    start, end, key, listed, has_id = located
    same = len(os.path.commonprefix([with_call, with_text]))
    tail = len(os.path.commonprefix([with_call[end:][::-1], with_text[::-1]]))
    if same > start or with_text[same:same + len(_TEXT)] != _TEXT:
        return base  # the text message is not where the call is: keep the fallback
    return CallShape(prefix=with_call[same:start].strip(),
                     suffix=with_call[end:len(with_call) - tail].strip(), arguments=key,
                     listed=listed, ids=has_id, short_ids=short_ids or has_id,
                     rendered=True, think=base.think, think_open=base.think_open)


def _locate(text: str) -> tuple[int, int, str, bool, bool] | None:
    """Where the probe call's JSON lies in ``text`` (start, end; a list's when the call is
    in one), the key of its arguments, whether it is listed and carries an ``id``."""
    decoder = json.JSONDecoder()
    at = text.find(f'"{_PROBE}"')
    while at >= 0:
        for start in (i for i in range(at, -1, -1) if text[i] == "{"):
            try:
                value, end = decoder.raw_decode(text, start)
            except ValueError:
                continue
            if not isinstance(value, dict) or _PROBE not in value.values():
                continue
            key = next((k for k, v in value.items() if v == _ARGS or v == json.dumps(_ARGS)
                        or _loads(v) == _ARGS), None)
            if key is None:
                break
            has_id = "id" in value
            before = text[:start].rstrip()
            if before.endswith("["):
                try:
                    items, list_end = decoder.raw_decode(text, len(before) - 1)
                except ValueError:
                    items = None
                if isinstance(items, list) and items and items[0] == value:
                    return len(before) - 1, list_end, key, True, has_id
            return start, end, key, False, has_id
        at = text.find(f'"{_PROBE}"', at + 1)
    return None


def _loads(value: object) -> object:
    try:
        return json.loads(value) if isinstance(value, str) else None
    except ValueError:
        return None


def _render(template: str, messages: list[dict[str, Any]], **kw: Any) -> str | None:
    try:
        return render(template, messages, add_generation_prompt=kw.pop(
            "add_generation_prompt", False), **kw)
    except EftError:
        return None


# -- replies read back -------------------------------------------------------------------------
def split_reasoning(text: str, shape: CallShape) -> tuple[str | None, str]:
    """A reply's reasoning block (None: it has none) and the rest, under ``shape``; a
    block cut short by the token limit is all reasoning."""
    if not shape.think:
        return None, text
    body = text
    if not shape.think_open:
        head = text.lstrip()
        if not head.startswith(THINK):
            return None, text
        body = head[len(THINK):]
    inside, closed, rest = body.partition(END_THINK)
    return inside.strip(), rest.lstrip() if closed else ""


def read_calls(text: str, shape: CallShape) -> list[dict[str, Any]] | None:
    """The calls in the reply ``text`` (after any reasoning) as ``{"name", "arguments",
    "id"}`` objects, or None when it is not a whole call of ``shape``. Where the template
    renders calls, their prefix and suffix may be missing: a control token's text
    (Mistral's ``[TOOL_CALLS]``) is not part of a reply's text."""
    body = text.strip()
    if shape.prefix and body.startswith(shape.prefix):
        body = body[len(shape.prefix):].strip()
        if shape.suffix and not body.endswith(shape.suffix):
            return None
    elif shape.prefix and not shape.rendered:
        return None
    if shape.suffix and body.endswith(shape.suffix):
        body = body[:-len(shape.suffix)].strip()
    try:
        value = json.loads(body)
    except (ValueError, RecursionError):
        return None
    items = value if shape.listed and isinstance(value, list) else [value]
    calls = []
    for item in items:
        if not isinstance(item, dict) or not isinstance(item.get("name"), str) or not (
                isinstance(item.get(shape.arguments), dict)):
            return None
        calls.append({"name": item["name"], "arguments": item[shape.arguments],
                      "id": item.get("id") if isinstance(item.get("id"), str) else None})
    return calls or None


def may_be_call(text: str, shape: CallShape) -> bool:
    """Whether a reply (after any reasoning) that starts with ``text`` can still become a
    call of ``shape``."""
    head = text.lstrip()
    starts = [shape.prefix] if shape.prefix else []
    if shape.rendered or not shape.prefix:  # the prefix may be a control token's
        starts.append("[" if shape.listed else "{")
    return any(head.startswith(s) or s.startswith(head) for s in starts)


def reply_ids(calls: Sequence[Mapping[str, Any]], shape: CallShape) -> list[str]:
    """OpenAI ids for parsed calls: the model's own where the shape carries one."""
    out = []
    for call in calls:
        given = call.get("id")
        if shape.ids and isinstance(given, str) and _ID_CHARS.fullmatch(given):
            out.append(given)
        else:
            out.append(short_id("") if shape.short_ids else f"call_{uuid.uuid4().hex[:24]}")
    return out
