"""A chat reply read in the shape of the chat template's replies
(:mod:`eft_local.callshape`): its reasoning block, its text or tool call, and what its
schema's grammar could not hold, checked when it is finished."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from functools import partial
from typing import Any

from eft_local.callshape import END_THINK, THINK, CallShape, call_shape
from eft_local.schema_check import needs_check, violations
from eft_local.server.protocol import ChatRequest
from eft_local.server.worker import Job
from eft_local.session import Session
from eft_local.structured import ToolPlan, reply_grammar


def chat_reply(session: Session, job: Job, req: ChatRequest, reasoning_format: str
               ) -> tuple[str | None, Callable[[dict[str, Any]], dict[str, Any]] | None]:
    """A chat reply's grammar, in the shape of the template's replies, and what reads it
    back (None: plain text)."""
    shape = call_shape(session.template)
    plan = req.tools if req.tools is not None and req.tools.choice != "none" else None
    response = req.common.grammar
    if req.raw_grammar:
        grammar = response
    elif plan is not None:
        grammar = plan.grammar(shape, response)
    else:
        grammar = reply_grammar(shape, "response" if response else None, response)
    tool_checks = {t.name: partial(violations, t.parameters) for t in (
        plan.tools if plan else ()) if needs_check(t.parameters)}
    if plan is None and not shape.think and req.check is None:
        return grammar, None
    reply = ChatReply(shape, plan, raw=(req.reasoning_format or reasoning_format) == "none",
                      check=partial(violations, req.check) if req.check else None,
                      tool_checks=tool_checks)

    def convert(data: dict[str, Any]) -> dict[str, Any]:
        out = reply(data)
        if out.get("violations"):  # said in the response and the log line
            job.info["schema_violations"] = out["violations"]
        return out

    return grammar, convert


class ChatReply:
    """One chat generation's chunks read in the chat template's shape
    (:class:`~eft_local.callshape.CallShape`): a reasoning block first where the template
    has one, sent as ``reasoning`` (``reasoning_content``) as it comes, or left in the text
    with ``raw``; then text, streamed as it comes once it can no longer become a call, or a
    call, held back, parsed at the end and sent whole as ``tool_calls`` with the finish
    ``tool_calls`` (a call cut short goes out as text). At the end the reply is checked
    against what its schema's grammar could not hold (``check``: the text's violations;
    ``tool_checks``: each tool's), said as ``violations``."""

    def __init__(self, shape: CallShape, plan: ToolPlan | None, *, raw: bool = False,
                 check: Callable[[str], list[str]] | None = None,
                 tool_checks: Mapping[str, Callable[[str], list[str]]] | None = None) -> None:
        self.shape, self.plan, self.raw = shape, plan, raw
        self.check, self.tool_checks = check, tool_checks or {}
        self.all = ""
        self.think: int | None = 0 if shape.think_open else None  # where the reasoning starts
        self.body: int | None = None if shape.think else 0  # where the reply proper starts
        self.sent = 0  # how much of the reasoning (or, raw, of the text) went out
        self.held = 0  # where the body's unsent text starts
        self.text = plan is None or plan.choice == "none"  # the body streams as text

    def __call__(self, data: dict[str, Any]) -> dict[str, Any]:
        self.all += data["text"]
        final = bool(data["finish"])
        reasoning, text = self._reasoning(final), ""
        raw = self._raw()
        if self.body is not None:
            body = self.all[self.body:]
            if self.shape.think and not self.raw:  # no blank start after a block
                body = body.lstrip()
            if not self.text and not final:
                self.text = not (self.plan and self.plan.may_be_call(body, self.shape))
            if self.text and (body or final):
                text, self.held = body[self.held:], len(body)
            elif final:
                calls = self.plan.parse(body, self.shape) if self.plan else None
                if calls is not None:
                    return {**data, "text": raw, "reasoning": reasoning, "tool_calls": calls,
                            "finish": "tool_calls", "violations": self._violations(calls=calls)}
                text = body
        out = {**data, "text": raw + text, "reasoning": reasoning}
        if final:
            out["violations"] = self._violations(text=self.all[self.body or 0:])
        return out

    def _reasoning(self, final: bool) -> str:
        """The reasoning that can go out now (found where it starts and ends first): blanks
        at its start and end are left out, and what may start ``</think>`` waits."""
        if self.think is None:
            if self.body is not None:
                return ""
            head = self.all.lstrip()
            if head.startswith(THINK):
                self.think = len(self.all) - len(head) + len(THINK)
            elif THINK.startswith(head) and not final:
                return ""  # it may still become the tag
            else:
                self.body = 0
                return ""
        end = self.all.find(END_THINK, self.think)
        if end >= 0:
            self.body, stop = end + len(END_THINK), end
        elif final:
            self.body, stop = len(self.all), len(self.all)
        else:
            stop = len(self.all) - _partial(self.all, END_THINK)
        if self.raw:
            return ""  # _raw sends it as text
        start = max(self.sent, self.think)
        seg = self.all[start:stop]
        lead = len(seg) - len(seg.lstrip()) if self.sent <= self.think else 0
        piece = seg[lead:].rstrip()
        if piece:
            self.sent = start + lead + len(piece)
        return piece

    def _raw(self) -> str:
        """Under ``raw``: the reasoning block's text as it is, as text."""
        if not self.raw or self.think is None:
            return ""
        stop = self.body if self.body is not None else len(self.all)
        piece, self.sent = self.all[self.sent:stop], max(self.sent, stop)
        return piece

    def _violations(self, *, text: str = "", calls: list[dict[str, Any]] | None = None
                    ) -> list[str]:
        if calls is not None:
            out = []
            for call in calls:
                fn = call["function"]
                check = self.tool_checks.get(fn["name"])
                out += [f"{fn['name']}: {v}" for v in (check(fn["arguments"]) if check
                                                       else [])]
            return out
        return self.check(text) if self.check and text else []


def _partial(text: str, tag: str) -> int:
    """How many characters at the end of ``text`` may start ``tag`` (with the blanks
    before them)."""
    for n in range(min(len(tag) - 1, len(text)), 0, -1):
        if tag.startswith(text[-n:]):
            return n + len(text[:-n]) - len(text[:-n].rstrip())
    return len(text) - len(text.rstrip())


def chat_message(text: str, reasoning: str, calls: list[dict[str, Any]] | None
                 ) -> dict[str, Any]:
    """A whole chat reply's ``message``: its text (None beside calls, as OpenAI sends
    it), its ``tool_calls`` and its ``reasoning_content``, where it has them."""
    message: dict[str, Any] = {"role": "assistant", "content": text or (None if calls
                                                                        else "")}
    if calls:
        message["tool_calls"] = calls
    if reasoning:
        message["reasoning_content"] = reasoning
    return message


def eft_delta(data: Mapping[str, Any]) -> dict[str, Any]:
    """What a streamed chunk's ``eft`` object carries (nothing: no ``eft``): the tokens'
    diagnostics, and at the end what the reply breaks of its schema."""
    eft = {**({"tokens": data["eft"]} if data.get("eft") else {}),
           **({"schema_violations": data["violations"]} if data.get("violations") else {})}
    return {"eft": eft} if eft else {}
