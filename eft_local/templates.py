"""Chat templates: the model's own Jinja template rendered in a sandbox, and tokenized.

Templates are the fine-tuned model's own Jinja template (GGUF ``tokenizer.chat_template``)
rendered in a sandbox with Hugging Face's settings, as llama.cpp front ends do, within a
deadline (a helper thread) and size limits; rendering probes tell whether a template shows
tools, tool calls and tool results; :func:`tokenize_messages` turns a rendered chat into
tokens, the template's own markup as control tokens and the messages' text as plain text.
"""

from __future__ import annotations

import ctypes
import functools
import json
import re
import threading
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Protocol

from jinja2 import Environment, TemplateError
from jinja2.nodes import EvalContext
from jinja2.runtime import Context
from jinja2.sandbox import ImmutableSandboxedEnvironment
from jinja2.utils import Namespace

from eft_local.errors import EftError
from eft_local.vocab import ATTR_CONTROL, ATTR_UNKNOWN, VocabInfo

FALLBACK_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] | capitalize }}: {{ m['content'] }}\n\n{% endfor %}"
    "{% if add_generation_prompt %}Assistant:{% endif %}"
)
"""Used only when neither the model nor the preset has a template."""

RENDER_SECONDS = 2.0
"""Longest a chat template may take to render."""

RENDER_CHARS = 1 << 22
"""Most characters a template may produce (4 Mi) beyond four times the messages' length;
also the largest string or list a single template expression may build."""

_INT_BITS = 1 << 16
"""Largest integer (in bits) template arithmetic may build."""


class _TemplateLimit(Exception):
    """A template went over a size or time limit."""


def _raise(message: str) -> None:
    raise TemplateError(message)


def _sized(value: object, limit: int) -> None:
    """Refuse a string, list or integer above the limits."""
    if isinstance(value, (str, bytes, list, tuple)) and len(value) > limit:
        raise _TemplateLimit(f"a value of more than {limit} items")
    if isinstance(value, int) and value.bit_length() > _INT_BITS:
        raise _TemplateLimit(f"an integer of more than {_INT_BITS} bits")


def _size(value: object) -> int:
    return len(value) if isinstance(value, (str, bytes, list, tuple)) else 1


class _BoundedNamespace(Namespace):
    """``namespace()`` whose attributes cannot hold oversized values."""

    limit = RENDER_CHARS

    def __setitem__(self, name: str, value: object) -> None:
        _sized(value, type(self).limit)
        super().__setitem__(name, value)


class _BoundedEnvironment(ImmutableSandboxedEnvironment):
    """Hugging Face's sandbox, with operators, methods and filters that could build huge
    values checked before they run (the time limit catches the rest)."""

    intercepted_binops = frozenset({"*", "**", "+", "%"})

    def __init__(self, limit: int) -> None:
        super().__init__(trim_blocks=True, lstrip_blocks=True)
        self.limit = limit
        self.globals["raise_exception"] = _raise
        self.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
        self.globals["namespace"] = type("namespace", (_BoundedNamespace,), {"limit": limit})
        for name in ("center", "indent", "format", "replace", "wordwrap", "truncate"):
            self.filters[name] = self._bounded(self.filters[name])
        self.filters["tojson"] = _tojson


    def _check(self, name: str, obj: object, args: tuple, kwargs: dict) -> None:
        """Refuse a method or filter call whose result could exceed the size limit: widths
        and counts above it, replacements that multiply the text, format widths."""
        for arg in (*args, *kwargs.values()):
            if isinstance(arg, int) and not isinstance(arg, bool) and abs(arg) > self.limit:
                raise _TemplateLimit(f"the number {arg} (above {self.limit})")
        if name == "replace" and len(args) >= 2 and isinstance(args[1], str):
            grown = _size(obj) * (len(args[1]) + 1)
            if grown > self.limit:
                raise _TemplateLimit(f"a replacement of up to {grown} characters")
        if name == "format" and isinstance(obj, str):
            self._format_widths(obj)

    def _format_widths(self, text: str) -> None:
        for width in re.findall(r"\d{7,}", text):
            if int(width) > self.limit:
                raise _TemplateLimit(f"a format width of {width}")

    def _bounded(self, func: Callable) -> Callable:
        name = func.__name__.removeprefix("do_")

        def bounded(*args: object, **kwargs: object) -> object:
            values = [a for a in args  # skip what @pass_environment & co. put first
                      if not isinstance(a, (Environment, EvalContext, Context))]
            if values:
                self._check(name, values[0], tuple(values[1:]), kwargs)
            return func(*args, **kwargs)

        if hasattr(func, "jinja_pass_arg"):  # keep @pass_environment / @pass_eval_context
            bounded.jinja_pass_arg = func.jinja_pass_arg  # type: ignore[attr-defined]
        return bounded

    def call(__self, __context, __obj, *args, **kwargs):  # noqa: N805 - jinja's signature
        method = getattr(__obj, "__wrapped__", __obj)  # the sandbox wraps str.format
        owner = getattr(method, "__self__", None)
        if isinstance(owner, (str, bytes, int, float)) or __obj in (str, list, tuple, int):
            __self._check(getattr(method, "__name__", ""), owner, args, kwargs)
        return super().call(__context, __obj, *args, **kwargs)

    def call_binop(self, context, operator, left, right):  # noqa: ANN001, ANN201
        if operator == "*":
            count, seq = (right, left) if isinstance(right, int) else (left, right)
            if (isinstance(count, int) and isinstance(seq, (str, bytes, list, tuple))
                    and len(seq) * max(count, 0) > self.limit):
                raise _TemplateLimit(f"a repetition of {len(seq) * count} items")
        elif operator == "**" and isinstance(left, int) and isinstance(right, int):
            if abs(left) > 1 and right * abs(left).bit_length() > _INT_BITS:
                raise _TemplateLimit(f"the power {left} ** {right}")
        elif (operator == "+" and isinstance(left, (str, list, tuple))
              and isinstance(right, (str, list, tuple)) and len(left) + len(right) > self.limit):
            raise _TemplateLimit(f"a value of more than {self.limit} items")
        elif operator == "%" and isinstance(left, str):
            self._format_widths(left)
        result = super().call_binop(context, operator, left, right)
        _sized(result, self.limit)
        return result


def _tojson(value: object, ensure_ascii: bool = False, indent: int | None = None,
            separators: tuple[str, str] | None = None, sort_keys: bool = False) -> str:
    """``tojson`` as Hugging Face's chat templates (and llama.cpp's) have it: keys in their
    order, text unescaped (Jinja's own sorts keys and escapes ``<``, ``>``, ``&``, ``'``)."""
    if indent is not None and not (isinstance(indent, int) and 0 <= indent <= 16):
        raise _TemplateLimit(f"an indent of {indent!r} (tojson takes 0 to 16)")
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                      sort_keys=sort_keys)


def render(template: str, messages: list[dict[str, Any]], *, bos_token: str = "",
           eos_token: str = "", add_generation_prompt: bool = True,
           seconds: float | None = None, tools: list[dict[str, Any]] | None = None) -> str:
    """Render ``messages`` (and ``tools``, OpenAI's function cards, for templates that
    render them) with a chat template in a sandbox, within a time limit and a size limit;
    every failure is an :class:`EftError` "chat template failed: ..."."""
    seconds = RENDER_SECONDS if seconds is None else seconds
    given = sum(len(str(m.get("content", ""))) + len(str(m.get("tool_calls") or ""))
                for m in messages) + len(str(tools or ""))
    limit = RENDER_CHARS + 4 * (given + len(bos_token) + len(eos_token))

    def work() -> str:
        env = _BoundedEnvironment(limit)
        chunks, size = [], 0
        extra = {"tools": tools} if tools else {}
        for chunk in env.from_string(template).generate(
                messages=messages, bos_token=bos_token, eos_token=eos_token,
                add_generation_prompt=add_generation_prompt, **extra):
            size += len(chunk)
            if size > limit:
                raise _TemplateLimit(f"more than {limit} characters of output")
            chunks.append(chunk)
        return "".join(chunks)

    try:
        return _with_deadline(work, seconds)
    except _TemplateLimit as exc:
        raise EftError(f"chat template failed: it would build {exc}") from None
    except TimeoutError:
        raise EftError(f"chat template failed: rendering took longer than {seconds:g} s"
                       ) from None
    except TemplateError as exc:
        raise EftError(f"chat template failed: {exc}") from None
    except Exception as exc:  # the template's own arithmetic, recursion, ...
        raise EftError(f"chat template failed: {type(exc).__name__}: {exc}") from None


def _with_deadline(work: Callable[[], str], seconds: float) -> str:
    """Run ``work`` in a helper thread; past ``seconds`` (or on Ctrl-C) it is stopped with an
    asynchronous exception and TimeoutError is raised here."""
    box: dict[str, object] = {}

    def target() -> None:
        try:
            box["value"] = work()
        except BaseException as exc:  # noqa: BLE001 - handed to the caller
            box["error"] = exc

    thread = threading.Thread(target=target, name="chat-template", daemon=True)
    thread.start()
    try:
        thread.join(seconds)
    finally:
        if thread.is_alive():
            ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(thread.ident),
                                                       ctypes.py_object(_Stopped))
            thread.join(0.5)
    if "error" in box:
        error = box["error"]
        if isinstance(error, _Stopped):
            raise TimeoutError
        raise error  # type: ignore[misc]
    if "value" not in box:
        raise TimeoutError
    return box["value"]  # type: ignore[return-value]


class _Stopped(Exception):
    """Raised inside a template thread that ran out of time."""


@dataclass(frozen=True)
class ToolSupport:
    """What a chat template renders: tool cards, assistant tool calls, tool results."""

    tools: bool
    calls: bool
    results: bool


_PROBE = "eft_probe_fn"


@functools.lru_cache(maxsize=16)
def tool_support(template: str) -> ToolSupport:
    """Render probes to find out what ``template`` does with tools (as llama.cpp does)."""
    card = {"type": "function", "function": {"name": _PROBE, "description": "",
                                             "parameters": {"type": "object",
                                                            "properties": {}}}}
    user = {"role": "user", "content": "hi"}
    call = {"role": "assistant", "content": "", "tool_calls": [  # nine letters and digits:
        {"id": "eftprobe1", "type": "function",  # Mistral's templates take no other id
         "function": {"name": _PROBE, "arguments": {}}}]}
    result = {"role": "tool", "tool_call_id": "eftprobe1", "name": _PROBE,
              "content": "eft_probe_result"}

    def shows(text: str, messages: list[dict[str, Any]], **kw: Any) -> bool:
        try:
            return text in render(template, messages, **kw)
        except EftError:
            return False

    return ToolSupport(tools=shows(_PROBE, [user], tools=[card]),
                       calls=shows(_PROBE, [user, call]),
                       results=shows("eft_probe_result", [user, call, result]))


class Tokenizer(Protocol):
    """What :func:`tokenize_messages` needs of a model."""

    def tokenize(self, text: str, *, add_bos: bool, special: bool) -> list[int]: ...
    def piece(self, token: int, *, special: bool = False) -> bytes: ...


def special_pattern(vocab: VocabInfo | None) -> re.Pattern[str] | None:
    """A regex matching the text of every control token of ``vocab`` (None: there is
    none)."""
    mask = ATTR_CONTROL | ATTR_UNKNOWN
    texts = sorted({t.decode("utf-8", "replace") for t, a in
                    zip(vocab.texts, vocab.attrs, strict=False) if a & mask and t}
                   if vocab else (), key=len, reverse=True)
    return re.compile("|".join(map(re.escape, texts))) if texts else None


def tokenize_messages(template: str, messages: list[dict[str, Any]], model: Tokenizer,
                      vocab: VocabInfo | None, *, specials: re.Pattern[str] | None,
                      tools: list[dict[str, Any]] | None = None) -> list[int]:
    """Render ``messages`` with ``template`` and tokenize the text: the template's own
    markup with special-token parsing, the messages' content without it wherever it holds
    text that ``specials`` matches (a control token's text typed in a message stays plain
    text and cannot fake a turn). ``specials`` None parses everything (trusted input)."""

    def text_of(token: int | None) -> str:
        if token is None or token < 0:
            return ""
        return model.piece(token, special=True).decode("utf-8", "replace")

    tokens: dict[str, Any] = {"bos_token": text_of(vocab and vocab.bos),
                              "eos_token": text_of(vocab and vocab.eos), "tools": tools}
    text = render(template, messages, **tokens)
    contents = [m.get("content") for m in messages]
    if specials is None or not any(isinstance(c, str) and specials.search(c)
                                   for c in contents):
        return model.tokenize(text, add_bos=False, special=True)
    # where each message's content lies in the rendered text: render again with marks
    marked = [{**m, "content": f"\ue000{i}\ue001"} if isinstance(m.get("content"), str)
              else m for i, m in enumerate(messages)]
    parts = re.split("\ue000(\\d+)\ue001", render(template, marked, **tokens))
    spans, pos = [], 0
    for i, part in enumerate(parts):
        piece = contents[int(part)] if i % 2 else part
        if i % 2:
            spans.append((pos, pos + len(piece)))
        pos += len(piece)
    if "".join(contents[int(p)] if i % 2 else p for i, p in enumerate(parts)) != text:
        raise EftError("a message holds special-token text and the chat template changes "
                       "messages, so it cannot be kept as plain text; remove it (or parse "
                       "it as control tokens with --parse-special)")
    out: list[int] = []
    start = 0
    for found in specials.finditer(text):  # plain text where a special overlaps content
        a, b = found.span()
        if any(a < end and b > begin for begin, end in spans):
            if a > start:
                out += model.tokenize(text[start:a], add_bos=False, special=True)
            out += model.tokenize(text[a:b], add_bos=False, special=False)
            start = b
    if start < len(text):
        out += model.tokenize(text[start:], add_bos=False, special=True)
    return out
