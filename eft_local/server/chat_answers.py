"""Chat completions' answers: a whole response, or server-sent events, for one or several
choices (``n``), from a chat job's events (:mod:`eft_local.server.handlers`).

:class:`ChatAnswers` is part of :class:`eft_local.server.app.Api`. Events carry the index of
their choice; a whole response lists the choices in index order, a stream sends each
choice's deltas as they come (OpenAI's shape: every chunk names its choice's ``index``), a
finish chunk per choice and, after every choice is done, the usage.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from eft_local.server.protocol import ChatRequest
from eft_local.server.replies import chat_message, eft_delta
from eft_local.server.shapes import envelope, sse, usage
from eft_local.server.worker import Job


@dataclass
class Choice:
    """One choice's parts, gathered from its events."""

    text: list[str] = field(default_factory=list)
    thought: list[str] = field(default_factory=list)
    entries: list[dict[str, Any]] = field(default_factory=list)
    diag: list[dict[str, Any]] = field(default_factory=list)
    broken: list[Any] = field(default_factory=list)
    calls: list[dict[str, Any]] | None = None
    done: dict[str, Any] = field(default_factory=dict)

    def add(self, data: dict[str, Any]) -> None:
        """One ``chunk`` event of this choice."""
        self.text.append(data["text"])
        self.thought.append(data.get("reasoning") or "")
        self.entries += data["logprobs"]
        self.diag += data["eft"]
        self.calls = data.get("tool_calls") or self.calls
        self.broken += data.get("violations") or []


def totals(choices: list[Choice], prompt_tokens: int) -> dict[str, Any]:
    """OpenAI's usage over every choice: the prompt once (the choices share it), their
    completion tokens added up."""
    first = choices[0].done if choices else {}
    return usage(first.get("prompt_tokens", prompt_tokens),
                 sum(c.done.get("completion_tokens", 0) for c in choices),
                 first.get("cached_tokens", 0))


class ChatAnswers:
    """Whole and streamed chat answers (see the module docstring)."""

    log: Callable[[str], None]
    log_done: Callable[..., None]

    async def _chat_whole(self, request: Request, req: ChatRequest, job: Job,
                          head: dict[str, Any], stream: AsyncIterator[tuple[str, Any]],
                          started: float) -> Response:
        gathered: dict[int, Choice] = {}
        async for kind, data in stream:
            if kind == "error":
                raise data
            if kind in ("chunk", "done"):
                choice = gathered.setdefault(data.get("index", 0), Choice())
                if kind == "chunk":
                    choice.add(data)
                else:
                    choice.done = data
        choices = [gathered[i] for i in sorted(gathered)]
        first = choices[0] if choices else Choice()
        job.info["timings"] = first.done.get("timings", {})
        self.log_done(request, job, started, head=head)
        diagnostics = req.common.knobs.diagnostics
        broken = [b for c in choices for b in c.broken]
        eft = {**head["eft"], **({"tokens": first.diag} if diagnostics else {}),
               **({"schema_violations": broken} if broken else {})}
        listed = []
        for i, c in enumerate(choices):
            entry = {"index": i, "message": chat_message("".join(c.text), "".join(c.thought),
                                                         c.calls),
                     "logprobs": {"content": c.entries} if req.logprobs else None,
                     "finish_reason": c.done.get("finish", "length")}
            if diagnostics and len(choices) > 1:
                entry["eft"] = {"tokens": c.diag}
            listed.append(entry)
        return JSONResponse({
            **envelope("chatcmpl", "chat.completion", req.common.model, head),
            "choices": listed, "usage": totals(choices, head["prompt_tokens"]),
            "timings": first.done.get("timings", {}), "eft": eft})

    async def _chat_stream(self, request: Request, req: ChatRequest, job: Job,
                           head: dict[str, Any], stream: AsyncIterator[tuple[str, Any]],
                           started: float) -> AsyncIterator[str]:
        base = envelope("chatcmpl", "chat.completion.chunk", req.common.model, head)
        extra = {"usage": None} if req.common.include_usage else {}

        def chunk(index: int, delta: dict[str, Any], finish: str | None = None,
                  logprobs: list[dict[str, Any]] | None = None, **more: Any) -> str:
            choice = {"index": index, "delta": delta,
                      "logprobs": {"content": logprobs} if logprobs is not None else None,
                      "finish_reason": finish}
            return sse({**base, "choices": [choice], **extra, **more})

        done: dict[int, Choice] = {}
        for i in range(req.common.n):
            more = {"eft": head["eft"]} if i == 0 else {}
            yield chunk(i, {"role": "assistant", "content": ""}, **more)
        async for kind, data in stream:
            if kind == "error":
                yield sse(data.body())
                self.log(f"{request.method} {request.url.path} stream error: "
                         f"{data.message}")
                return
            index = data.get("index", 0) if isinstance(data, dict) else 0
            if kind == "chunk":
                if data.get("reasoning"):
                    yield chunk(index, {"reasoning_content": data["reasoning"]})
                more = eft_delta(data)
                if data["text"] or data["logprobs"] or more:
                    yield chunk(index, {"content": data["text"]},
                                logprobs=data["logprobs"] if req.logprobs else None, **more)
                if data.get("tool_calls"):
                    yield chunk(index, {"tool_calls": [{"index": i, **call} for i, call in
                                                       enumerate(data["tool_calls"])]})
            elif kind == "done":
                done[index] = Choice(done=data)
                if index == 0:
                    job.info["timings"] = data["timings"]
                yield chunk(index, {}, data["finish"], timings=data["timings"])
        if req.common.include_usage:
            yield sse({**base, "choices": [],
                       "usage": totals([done[i] for i in sorted(done)],
                                       head["prompt_tokens"])})
        yield "data: [DONE]\n\n"
