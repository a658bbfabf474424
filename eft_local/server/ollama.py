"""Ollama's API over the same engine, for the tools that speak only Ollama (its Python and
JavaScript clients, editor plugins, desktop chat apps, Open WebUI's Ollama connection):
``/api/chat``, ``/api/generate``, ``/api/tags``, ``/api/show``, ``/api/ps`` and
``/api/version``.

A request is translated into the OpenAI request the other routes take
(:mod:`eft_local.server.ollama_protocol`), parsed by :mod:`eft_local.server.protocol` (so
every knob means the same and is checked the same way) and run as the same job; the job's
events become Ollama's answers: NDJSON lines ``{"model", "created_at", "message" or
"response", "done": false}`` and a last one with ``done: true``, ``done_reason`` and the
durations in nanoseconds, or with ``"stream": false`` that last line alone, holding the
whole text. Ollama streams unless told not to. An error is Ollama's ``{"error": "..."}``
with its HTTP status (:meth:`~eft_local.server.protocol.ApiError.body`), naming the field as
the request named it (``options.temperature``, ``format``).

Names: the presets, listed as ``PRESET:latest`` (Ollama's clients and Open WebUI add the tag
to a name without one); ``PRESET@beta=1.5`` sets knobs as on ``/v1``, as does an ``eft``
object in the body or, for clients that send only Ollama's fields, in ``options``.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from functools import partial
from pathlib import Path
from typing import Any, Protocol

from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from eft_local import __version__, hub
from eft_local.loading import architecture
from eft_local.presets import Preset
from eft_local.server.ollama_protocol import (
    FOREVER,
    OLLAMA_VERSION,
    TAG,
    Translated,
    answer_text,
    chat_body,
    fields,
    generate_body,
    legacy_entries,
    line,
    nanoseconds,
    renamed,
    served_name,
    stamp,
    tool_calls,
)
from eft_local.server.options import ServerOptions
from eft_local.server.protocol import (
    OLLAMA_PREFIX,
    ApiError,
    ChatRequest,
    CompletionRequest,
    bad,
    parse_chat,
    parse_completion,
    parse_model_name,
)
from eft_local.server.worker import Job, Worker


def ndjson(body: AsyncIterator[str]) -> StreamingResponse:
    """Newline-delimited JSON from the async iterator ``body``, never cached or buffered."""
    return StreamingResponse(body, media_type="application/x-ndjson",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


class Serving(Protocol):
    """What the routes use of :class:`eft_local.server.app.Api`."""

    runner: Worker
    options: ServerOptions
    log: Callable[[str], None]

    def route(self, handler: Callable[[Request], Awaitable[Response]], *, auth: bool = True
              ) -> Callable[[Request], Awaitable[Response]]: ...

    async def body(self, request: Request) -> Any: ...

    async def start(self, job: Job, request: Request) -> asyncio.Task[None]: ...

    def events(self, job: Job) -> AsyncIterator[tuple[str, Any]]: ...

    async def first(self, job: Job, stream: AsyncIterator[tuple[str, Any]]) -> Any: ...

    def log_done(self, request: Request, job: Job, started: float, status: int = 200,
                 head: dict[str, Any] | None = None) -> None: ...

    def chat_job(self, req: ChatRequest) -> Job: ...

    def completion_job(self, req: CompletionRequest, default_max: int) -> Job: ...

    def model_card(self, preset: Preset, name: str | None = None,
                   params: Mapping[str, float] | None = None) -> dict[str, Any]: ...

    async def _generate(self, request: Request, job: Job, streaming: bool,
                        stream_answer: Callable[..., AsyncIterator[str]],
                        whole_answer: Callable[..., Awaitable[Response]],
                        started: float, respond: Callable[..., Response] = ...
                        ) -> Response: ...


class Ollama:
    """The routes, over the OpenAI routes' plumbing (``api``)."""

    def __init__(self, api: Serving) -> None:
        self.api = api

    # -- chat and generate ----------------------------------------------------------------
    async def chat(self, request: Request) -> Response:
        started = time.perf_counter()
        t = chat_body(await self.api.body(request))
        if not t.body["messages"]:
            return await self._load(request, t, "message")
        with fields(t.names):
            req = parse_chat(t.body, self.api.runner.sampling, self.api.options.seed)
            return await self._run(request, t, self.api.chat_job(req), "message", started)

    async def generate(self, request: Request) -> Response:
        started = time.perf_counter()
        t, raw = generate_body(await self.api.body(request))
        opts = self.api.options
        if not (t.body.get("prompt") if raw else t.body["messages"]):
            return await self._load(request, t, "response")
        with fields(t.names):
            if raw:
                job = self.api.completion_job(parse_completion(
                    t.body, self.api.runner.sampling, opts.seed), opts.max_tokens)
            else:
                job = self.api.chat_job(parse_chat(t.body, self.api.runner.sampling, opts.seed))
            return await self._run(request, t, job, "response", started)

    async def _run(self, request: Request, t: Translated, job: Job, key: str,
                   started: float) -> Response:
        session = self.api.runner.session
        if t.num_ctx and session is not None and t.num_ctx > session.n_ctx:
            self.api.log(f"{request.method} {request.url.path}: options.num_ctx {t.num_ctx} "
                         f"asks for more than this server's context ({session.n_ctx} tokens "
                         f"per slot); restart it with --n-ctx {t.num_ctx} to give more")
        return await self.api._generate(request, job, t.stream,
                                        partial(self._lines, request, job, t, key),
                                        partial(self._whole, request, job, t, key), started,
                                        respond=ndjson)

    async def _load(self, request: Request, t: Translated, key: str) -> Response:
        """Ollama's answer to a request with nothing to generate: its preset loaded."""
        preset = parse_model_name(t.body["model"])[0] if t.body.get("model") else None
        job = Job(work=lambda _session, job: job.emit("result", {}), preset=preset,
                  needs_slot=False)
        watcher = await self.api.start(job, request)
        try:
            await self.api.first(job, self.api.events(job))
        finally:
            watcher.cancel()
        name = t.model or self.api.runner.loaded or ""
        return JSONResponse({"model": name, "created_at": stamp(), **answer_text(key, ""),
                             "done": True, "done_reason": "load"})

    async def _parts(self, job: Job, t: Translated, key: str, head: dict[str, Any],
                     stream: AsyncIterator[tuple[str, Any]], started: float
                     ) -> AsyncIterator[dict[str, Any]]:
        """Ollama's objects for a job's events: one per chunk with something in it, then the
        last, ``done``; an error is raised, naming the Ollama field."""
        loaded = time.perf_counter()
        model = t.model or head["eft"]["model"]
        async for kind, data in stream:
            if kind == "error":
                raise renamed(data, t.names)
            if kind == "chunk":
                part: dict[str, Any] = {"model": model, "created_at": stamp(),
                                        **answer_text(key, data["text"]), "done": False}
                if data.get("reasoning"):  # think: true
                    (part["message"] if key == "message" else part)["thinking"] = \
                        data["reasoning"]
                if data.get("tool_calls"):
                    part["message"]["tool_calls"] = tool_calls(data["tool_calls"])
                entries = data.get("logprobs") or legacy_entries(data.get("legacy_logprobs"))
                if t.logprobs and entries:
                    part["logprobs"] = entries
                if data.get("eft"):
                    part["eft"] = {"tokens": data["eft"]}
                if (data["text"] or data.get("tool_calls") or data.get("reasoning")
                        or "logprobs" in part or "eft" in part):
                    yield part
            elif kind == "done":
                timings = job.info["timings"] = data.get("timings", {})
                yield {"model": model, "created_at": stamp(), **answer_text(key, ""), "done": True,
                       "done_reason": "length" if data["finish"] == "length" else "stop",
                       "total_duration": nanoseconds(time.perf_counter() - started),
                       "load_duration": nanoseconds(loaded - started),
                       "prompt_eval_count": data["prompt_tokens"],
                       "prompt_eval_duration": nanoseconds(timings.get("prompt_ms", 0) / 1e3),
                       "eval_count": data["completion_tokens"],
                       "eval_duration": nanoseconds(timings.get("predicted_ms", 0) / 1e3),
                       "eft": head["eft"]}

    async def _lines(self, request: Request, job: Job, t: Translated, key: str,
                     head: dict[str, Any], stream: AsyncIterator[tuple[str, Any]],
                     started: float) -> AsyncIterator[str]:
        try:
            async for part in self._parts(job, t, key, head, stream, started):
                yield line(part)
        except ApiError as exc:  # after the first line: Ollama's error line ends it
            yield line(exc.body(OLLAMA_PREFIX))
            self.api.log(f"{request.method} {request.url.path} stream error: "
                         f"{exc.message}")

    async def _whole(self, request: Request, job: Job, t: Translated, key: str,
                     head: dict[str, Any], stream: AsyncIterator[tuple[str, Any]],
                     started: float) -> Response:
        text: list[str] = []
        thought: list[str] = []
        calls: list[dict[str, Any]] = []
        entries: list[dict[str, Any]] = []
        tokens: list[dict[str, Any]] = []
        last: dict[str, Any] = {}
        async for part in self._parts(job, t, key, head, stream, started):
            text.append(part["message"]["content"] if key == "message" else part["response"])
            thought.append(part.get("message", part).get("thinking", ""))
            calls += part.get("message", {}).get("tool_calls", [])
            entries += part.get("logprobs", [])
            tokens += part.get("eft", {}).get("tokens", [])
            last = part
        self.api.log_done(request, job, started, head=head)
        if not last:
            raise ApiError(500, "the request ended early")
        answer = {**last, **answer_text(key, "".join(text))}
        if "".join(thought):
            (answer["message"] if key == "message" else answer)["thinking"] = "".join(thought)
        if calls:
            answer["message"]["tool_calls"] = calls
        if entries:
            answer["logprobs"] = entries
        if tokens:
            answer["eft"] = {**answer["eft"], "tokens": tokens}
        return JSONResponse(answer)

    # -- models ---------------------------------------------------------------------------
    async def version(self, _request: Request) -> Response:
        return JSONResponse({"version": OLLAMA_VERSION, "eft_local": __version__})

    async def tags(self, _request: Request) -> Response:
        def cards() -> list[dict[str, Any]]:
            return [self._card(p) for p in self.api.runner.available()]

        return JSONResponse({"models": await asyncio.to_thread(cards)})

    async def ps(self, _request: Request) -> Response:
        session = self.api.runner.session
        if session is None:
            return JSONResponse({"models": []})
        card = await asyncio.to_thread(self._card, session.preset)
        return JSONResponse({"models": [{
            **{k: card[k] for k in ("name", "model", "size", "digest", "details")},
            "expires_at": FOREVER, "size_vram": 0, "context_length": session.n_ctx}]})

    async def show(self, request: Request) -> Response:
        body = await self.api.body(request)
        given = (body.get("model") or body.get("name")) if isinstance(body, dict) else None
        if not isinstance(given, str) or not given:
            raise bad("'model' is required: the name of a preset (see /api/tags)", "model")
        name, params = parse_model_name(served_name(given))
        preset = self.api.runner.check_model(name)
        assert preset is not None
        unused = [k for k in params if k not in preset.formula.params]
        if unused:
            raise ApiError(404, f"model {given!r} not found: the formula of {name!r} does not "
                           f"use {unused[0]}", param="model", code="model_not_found")
        card = await asyncio.to_thread(self._card, preset)
        eft = self.api.model_card(preset, given, params)["eft"]
        session = self.api.runner.session
        loaded = session is not None and session.preset.name == name
        sampling = eft["sampling"]
        lines = [f"{k} {sampling[k]:g}" for k in ("temperature", "top_k", "top_p", "min_p")]
        lines += [f"stop {json.dumps(s)}" for s in self.api.options.stop]
        info: dict[str, Any] = {"general.architecture": card["details"]["family"],
                                "general.basename": name}
        if loaded:
            assert session is not None
            lines.append(f"num_ctx {session.n_ctx}")
            info[f"{card['details']['family'] or 'eft'}.context_length"] = session.n_ctx
        return JSONResponse({
            "modelfile": f"# eft-local preset {name}: {preset.formula.text}\n",
            "parameters": "\n".join(lines),
            "template": session.template if loaded and session is not None else "",
            "details": card["details"], "model_info": info,
            "capabilities": ["completion", "tools"], "modified_at": card["modified_at"],
            "eft": eft})

    def _card(self, preset: Preset) -> dict[str, Any]:
        """A preset as an ``/api/tags`` entry: its files' total size and newest time, a
        digest of its definition, the architectures of its models (read from the files'
        headers, remembered per file: off the event loop, the first time takes a while)."""
        files: list[Path] = []
        for spec in preset.models.values():
            path = None if spec.remote else spec.path or hub.cached_path(spec)
            if path is not None and path.is_file():
                files.append(path)
        stats = [f.stat() for f in files]
        families = [a for a in dict.fromkeys(architecture(f) for f in files) if a]
        base = preset.models.get(preset.formula.base_role() or "")
        base_file = None if base is None or base.remote else base.path or hub.cached_path(base)
        family = (architecture(base_file) if base_file and base_file.is_file() else None) or (
            families[0] if families else "")
        definition = json.dumps([preset.name, preset.formula.text, sorted(
            (role, str(spec.path or spec.url or f"{spec.hf_repo}/{spec.hf_file}"))
            for role, spec in preset.models.items())])
        return {"name": preset.name + TAG, "model": preset.name + TAG,
                "modified_at": stamp(max((s.st_mtime for s in stats), default=0)),
                "size": sum(s.st_size for s in stats),
                "digest": hashlib.sha256(definition.encode()).hexdigest(),
                "details": {"parent_model": "", "format": "gguf", "family": family,
                            "families": families, "parameter_size": "",
                            "quantization_level": ""}}


def ollama_routes(api: Serving) -> list[Route]:
    """Ollama's routes over ``api`` (``/api/version`` answers without the key, as
    ``/health`` does)."""
    o = Ollama(api)
    r = api.route
    return [Route("/api/version", r(o.version, auth=False), methods=["GET"]),
            Route("/api/tags", r(o.tags), methods=["GET"]),
            Route("/api/ps", r(o.ps), methods=["GET"]),
            Route("/api/show", r(o.show), methods=["POST"]),
            Route("/api/chat", r(o.chat), methods=["POST"]),
            Route("/api/generate", r(o.generate), methods=["POST"])]
