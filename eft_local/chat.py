"""Chat templates and conversation history.

Templates are the fine-tuned model's own Jinja template (GGUF ``tokenizer.chat_template``)
rendered in a sandbox, as llama.cpp front ends do. History keeps the system prompt and
drops the oldest turns when the context is full.
"""

from __future__ import annotations

import ctypes
import functools
import json
import re
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Protocol

from jinja2 import Environment, TemplateError
from jinja2.nodes import EvalContext
from jinja2.runtime import Context
from jinja2.sandbox import ImmutableSandboxedEnvironment
from jinja2.utils import Namespace

from eft_local.errors import ContextFull, EftError
from eft_local.files import atomic_write, read_user_text
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


def fit_messages(messages: list[dict[str, str]],
                 count_tokens: Callable[[list[dict[str, str]]], int], budget: int, *,
                 limit: int | None = None) -> tuple[list[dict[str, str]], int]:
    """Drop the oldest whole turns of ``messages`` until they take at most ``budget``
    tokens; returns the messages kept and how many were dropped.

    A turn is a user message and what follows it up to the next user message (a reply
    before the first user message is a turn of its own). System messages and the newest
    message always stay, and the messages kept alternate as before. When even the shortest
    history is over ``budget`` it is returned if it fits ``limit`` (default ``budget``:
    the room left for a reply shrinks); else :class:`ContextFull` says how many tokens the
    newest message needs and how many are allowed, and nothing is dropped.
    """
    need = count_tokens(messages)
    if need <= budget:
        return list(messages), 0
    others = [i for i, m in enumerate(messages) if m.get("role") != "system"]
    cuts = [q for q in range(1, len(others)) if messages[others[q]].get("role") == "user"]

    def without(q: int) -> list[dict[str, str]]:
        gone = set(others[:q])
        return [m for i, m in enumerate(messages) if i not in gone]

    shortest = cuts[-1] if cuts else 0
    if shortest:
        need = count_tokens(without(shortest))
    allowed = budget if limit is None else limit
    if need > allowed:
        raise ContextFull(f"the message needs {need} tokens (with the system prompt and chat "
                          f"template) but {allowed} are allowed; shorten it or raise the "
                          "context size (n_ctx)")
    if need > budget:
        return without(shortest), shortest
    low, high = 0, len(cuts) - 1  # the fewest turns to drop (fewer turns, fewer tokens)
    while low < high:
        mid = (low + high) // 2
        if count_tokens(without(cuts[mid])) <= budget:
            high = mid
        else:
            low = mid + 1
    return without(cuts[low]), cuts[low]


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
    call = {"role": "assistant", "content": "", "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": _PROBE, "arguments": {}}}]}
    result = {"role": "tool", "tool_call_id": "call_1", "name": _PROBE,
              "content": "eft_probe_result"}

    def shows(text: str, messages: list[dict[str, Any]], **kw: Any) -> bool:
        try:
            return text in render(template, messages, **kw)
        except EftError:
            return False

    return ToolSupport(tools=shows(_PROBE, [user], tools=[card]),
                       calls=shows(_PROBE, [user, call]),
                       results=shows("eft_probe_result", [user, call, result]))


@dataclass
class Conversation:
    """A system prompt and alternating user/assistant turns."""

    system: str | None = None
    turns: list[dict[str, str]] = field(default_factory=list)
    dropped: int = 0
    """Turns dropped so far to fit the context (:meth:`drop`)."""

    def messages(self) -> list[dict[str, str]]:
        """The message list a chat template expects."""
        head = [{"role": "system", "content": self.system}] if self.system else []
        return head + list(self.turns)

    def add(self, role: str, content: str) -> None:
        """Append one turn."""
        self.turns.append({"role": role, "content": content})

    def drop(self, n: int) -> int:
        """Drop the ``n`` oldest turns; returns how many user turns (exchanges) went."""
        exchanges = sum(t["role"] == "user" for t in self.turns[:n])
        del self.turns[:n]
        self.dropped += n
        return exchanges

    def save(self, path: str | Path, extra: dict | None = None) -> None:
        """Write the transcript as JSON (atomically)."""
        path = Path(path)
        data = {"system": self.system, "turns": self.turns, **(extra or {})}
        atomic_write(path, json.dumps(data, indent=2, ensure_ascii=False) + "\n",
                     what="transcript")

    @classmethod
    def load(cls, path: str | Path) -> Conversation:
        """Read a transcript written by :meth:`save`."""
        path = Path(path)
        text = read_user_text(path, what="transcript")
        try:
            data = json.loads(text)
        except RecursionError:
            raise EftError(f"{path}: not a readable JSON transcript (nested too deeply)"
                           ) from None
        except ValueError as exc:
            raise EftError(f"{path}: not a readable JSON transcript ({exc})") from None
        turns = data.get("turns") if isinstance(data, dict) else None
        ok = isinstance(turns, list) and all(
            isinstance(t, dict) and t.get("role") in ("user", "assistant")
            and isinstance(t.get("content"), str) for t in turns)
        if not ok:
            raise EftError(f"{path}: transcript needs 'turns': a list of "
                           "{role: user|assistant, content: text}")
        for i, turn in enumerate(turns):
            want = "user" if i % 2 == 0 else "assistant"
            if turn["role"] != want:
                raise EftError(f"{path}: turn {i + 1} is a {turn['role']} turn where a {want} "
                               "turn belongs (turns alternate, starting with the user)")
        if len(turns) % 2:
            raise EftError(f"{path}: the last turn is the user's, with no reply (a transcript "
                           "ends with an assistant turn)")
        system = data.get("system")
        return cls(system=system if isinstance(system, str) else None,
                   turns=[{"role": t["role"], "content": t["content"]} for t in turns])


# -- tokenizing a rendered chat -----------------------------------------------------------------
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
