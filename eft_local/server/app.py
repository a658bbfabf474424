"""``eft-local serve``'s web side: an OpenAI-compatible HTTP API over Starlette (and
Ollama's under ``/api/``: :mod:`eft_local.server.ollama`).

Routes parse and check a request (:mod:`eft_local.server.protocol`), hand the work to the
engine's worker thread (:mod:`eft_local.server.worker`) and turn its events into OpenAI's
responses, or server-sent events ending in ``data: [DONE]``. Every failure is OpenAI's error
body (Ollama's under ``/api/``) with a 4xx/5xx status and one log line; no traceback ever
reaches a client.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import replace
from functools import partial
from typing import Any

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from eft_local.presets import Preset
from eft_local.remote.exact import MEDIA_TYPE, ROWS_PATH, VOCAB_PATH
from eft_local.server.chat_answers import ChatAnswers
from eft_local.server.exact import rows_work, vocab_work
from eft_local.server.guard import HostGuard, cors_settings, require_json
from eft_local.server.handlers import (
    chat_work,
    completion_work,
    detokenize_work,
    tokenize_work,
    tokenizer_info_work,
)
from eft_local.server.ollama import ollama_routes
from eft_local.server.options import ServerOptions
from eft_local.server.page import playground
from eft_local.server.protocol import (
    ApiError,
    ChatRequest,
    CompletionRequest,
    parse_chat,
    parse_completion,
    parse_model_name,
    parse_rows,
)
from eft_local.server.shapes import envelope, sse, usage
from eft_local.server.worker import Job, Worker


def error_response(exc: ApiError, path: str = "") -> JSONResponse:
    """The error body of a request for ``path`` (OpenAI's, Ollama's under ``/api/``) with
    ``exc``'s status (and Retry-After on a full queue)."""
    headers = {"Retry-After": "1"} if exc.code == "queue_full" else None
    return JSONResponse(exc.body(path), status_code=exc.status, headers=headers)


def event_stream(body: Any) -> StreamingResponse:
    """Server-sent events from the async iterator ``body``, never cached or buffered by
    proxies."""
    return StreamingResponse(body, media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


def _refuse_constant(name: str) -> None:
    raise ValueError(f"{name} is not JSON")


class Api(ChatAnswers):
    """The routes, bound to one :class:`Worker`."""

    def __init__(self, runner: Worker, options: ServerOptions,
                 log: Callable[[str], None]) -> None:
        self.runner, self.options, self.log = runner, options, log

    # -- plumbing -------------------------------------------------------------------------
    def route(self, handler: Callable[[Request], Awaitable[Response]], *, auth: bool = True
              ) -> Callable[[Request], Awaitable[Response]]:
        """Wrap a handler: API key, errors in the API's shape, one log line per failure."""

        async def endpoint(request: Request) -> Response:
            started = time.perf_counter()
            try:
                if auth:
                    self.check_key(request)
                return await handler(request)
            except ApiError as exc:
                self.log(f"{request.method} {request.url.path} {exc.status} {exc.message}")
                return error_response(exc, request.url.path)
            except RecursionError:  # a JSON value nested too deeply for a checker
                exc = ApiError(400, "the request body is nested too deeply")
                self.log(f"{request.method} {request.url.path} 400 {exc.message}")
                return error_response(exc, request.url.path)
            except Exception as exc:  # a bug: one line, no traceback to the client
                self.log(f"{request.method} {request.url.path} 500 internal error: "
                         f"{type(exc).__name__}: {exc} ({time.perf_counter() - started:.2f} s)")
                return error_response(ApiError(500, f"internal error ({type(exc).__name__})"),
                                      request.url.path)

        return endpoint

    def check_key(self, request: Request) -> None:
        """401 unless the request carries the server's key (when it has one)."""
        key = self.options.api_key
        if key is None:
            return
        given = request.headers.get("authorization", "")
        scheme, _, token = given.partition(" ")
        if scheme.lower() != "bearer" or not secrets.compare_digest(token.strip().encode(),
                                                                    key.encode()):
            raise ApiError(401, "Incorrect API key provided. Send it as 'Authorization: "
                           "Bearer KEY'.", code="invalid_api_key")

    async def body(self, request: Request) -> Any:
        """The JSON body, sent as ``application/json`` (else 415: what a web page can send
        to another origin without asking first is refused), within the size limit."""
        require_json(request.headers.get("content-type", ""))
        limit = self.options.max_body
        length = request.headers.get("content-length")
        if length and length.isdigit() and int(length) > limit:
            raise ApiError(413, f"the request body is {int(length)} bytes; the limit is "
                           f"{limit}", code="request_too_large")
        chunks: list[bytes] = []
        size = 0
        seconds = self.options.body_seconds

        async def receive() -> None:
            nonlocal size
            async for chunk in request.stream():
                size += len(chunk)
                if size > limit:
                    raise ApiError(413, f"the request body is over the limit of {limit} bytes",
                                   code="request_too_large")
                chunks.append(chunk)

        try:
            await asyncio.wait_for(receive(), seconds)
        except asyncio.TimeoutError:  # TimeoutError itself from Python 3.11 on
            raise ApiError(408, f"the request body did not arrive within {seconds:g} s",
                           code="request_timeout") from None
        except ClientDisconnect:
            raise ApiError(499, f"client gone during the upload (after {size} bytes)",
                           code="client_gone") from None
        try:
            return json.loads(b"".join(chunks), parse_constant=_refuse_constant)
        except RecursionError:
            raise ApiError(400, "We could not parse the JSON body of your request: it is "
                           "nested too deeply.") from None
        except (ValueError, UnicodeDecodeError) as exc:
            raise ApiError(400, f"We could not parse the JSON body of your request ({exc}). "
                           "Send valid JSON with 'Content-Type: application/json'.") from None

    async def start(self, job: Job, request: Request) -> asyncio.Task[None]:
        """Queue ``job`` with an event queue on this loop; the task returned cancels the job
        the moment its client disconnects (cancel the task when the response takes over)."""
        job.loop = asyncio.get_running_loop()
        job.events = asyncio.Queue()
        self.runner.submit(job)
        return asyncio.ensure_future(_cancel_when_gone(request, job))

    async def events(self, job: Job) -> AsyncIterator[tuple[str, Any]]:
        """The job's events up to ``end``."""
        assert job.events is not None
        while True:
            kind, data = await job.events.get()
            if kind == "end":
                return
            yield kind, data

    async def first(self, job: Job, stream: AsyncIterator[tuple[str, Any]]) -> Any:
        """The ``start`` event's data; an error before it is raised."""
        async for kind, data in stream:
            if kind == "error":
                raise data
            if kind in ("start", "result"):
                return data
        if job.cancelled.is_set():
            raise ApiError(499, "client gone before its request " + (
                "began (skipped in the queue)" if not job.started else "produced anything"),
                code="client_gone")
        raise ApiError(500, "the request ended early")

    def log_done(self, request: Request, job: Job, started: float, status: int = 200,
                 head: dict[str, Any] | None = None) -> None:
        """One line per finished generation; one whose client left says after how many tokens
        (a stream's usage is not final yet then: what was generated so far)."""
        info = job.info
        timings = info.get("timings", {})
        prompt = info.get("prompt_tokens", (head or {}).get("prompt_tokens", 0))
        line = f"{request.method} {request.url.path} {status} prompt={prompt}"
        if timings:
            line += (f" (evaluated {timings.get('prompt_n', 0)}, cached "
                     f"{timings.get('cache_n', 0)})")
        if info.get("dropped_messages"):
            line += (f" dropped the {info['dropped_messages']} oldest message(s) to fit the "
                     "context")
        if info.get("schema_violations"):
            line += f" reply breaks its schema: {'; '.join(info['schema_violations'])}"
        line += (f" completion={info.get('completion_tokens', job.generated)} "
                 f"{time.perf_counter() - started:.2f} s")
        if job.cancel_reason == "client":
            line += f" client gone: stopped after {job.generated_at_cancel} tokens"
        elif job.cancel_reason == "shutdown":
            line += " stopped: the server is shutting down"
        self.log(line)

    # -- simple routes --------------------------------------------------------------------
    async def health(self, _request: Request) -> Response:
        runner = self.runner
        if runner.state == "ready":
            return JSONResponse({"status": "ok", "model": runner.loaded, "slots": runner.slots,
                                 "requests": {"running": len(runner.running),
                                              "waiting": runner.waiting()}})
        message = "Loading model" if runner.state == "loading" else (
            f"model failed to load: {runner.error}")
        return JSONResponse({"status": runner.state, **ApiError(503, message).body()},
                            status_code=503)

    def model_card(self, preset: Preset, name: str | None = None,
                   params: Mapping[str, float] | None = None) -> dict[str, Any]:
        """One ``/v1/models`` entry: ``preset`` under ``name`` (default its own), its knobs
        at their defaults (the command line's for the initial preset) changed by ``params``;
        ``eft`` also carries the formula's base role and the server's sampling defaults."""
        runner = self.runner
        defaults = {**preset.params, **(runner.params if preset is runner.initial else {}),
                    **(params or {})}
        knobs = {k: v for k, v in defaults.items() if k in preset.formula.params}
        sampling = {key: getattr(runner.sampling, key) for key in (
            "temperature", "top_p", "top_k", "min_p", "conservative_top_p", "repeat_penalty",
            "repeat_last_n", "frequency_penalty", "presence_penalty")}
        meta = {"preset": preset.name, "formula": preset.formula.text,
                "description": preset.description, "roles": list(preset.models),
                "loaded": preset.name == runner.loaded, **knobs, "params": knobs,
                "base_role": preset.formula.base_role(), "sampling": sampling}
        return {"id": name or preset.name, "object": "model", "created": 0,
                "owned_by": "eft-local", "eft": meta}

    async def models(self, _request: Request) -> Response:
        cards = [self.model_card(p) for p in self.runner.available()]
        return JSONResponse({"object": "list", "data": cards})

    async def model(self, request: Request) -> Response:
        """Every name a chat request may give: a preset, with knobs (``PRESET@beta=1.5``)
        that its formula uses; else 404."""
        wanted = request.path_params["name"]
        try:
            name, params = parse_model_name(wanted)
        except ApiError as exc:
            raise ApiError(404, f"the model {wanted!r} does not exist: {exc.message}",
                           param="model", code="model_not_found") from None
        self.runner.check_model(name)
        preset = self.runner.presets()[name]
        unused = [k for k in params if k not in preset.formula.params]
        if unused:
            raise ApiError(404, f"the model {wanted!r} does not exist: the formula of "
                           f"{name!r} does not use {unused[0]}", param="model",
                           code="model_not_found")
        return JSONResponse(self.model_card(preset, wanted, params))

    async def _simple(self, request: Request, job: Job) -> Response:
        watcher = await self.start(job, request)
        try:
            return JSONResponse(await self.first(job, self.events(job)))
        finally:
            watcher.cancel()

    async def tokenize(self, request: Request) -> Response:
        return await self._tokenizer_job(request, tokenize_work)

    async def detokenize(self, request: Request) -> Response:
        return await self._tokenizer_job(request, detokenize_work)

    async def _tokenizer_job(self, request: Request, make_work: Any) -> Response:
        """Run ``make_work(body)`` for a JSON-object body on the queue."""
        body = await self.body(request)
        if not isinstance(body, dict):
            raise ApiError(400, "the request body must be a JSON object")
        return await self._simple(request, Job(work=make_work(body), preset=self._preset(body),
                                               needs_slot=False))

    async def tokenizer_info(self, request: Request) -> Response:
        return await self._simple(request, Job(work=tokenizer_info_work,
                                               preset=self._preset(dict(request.query_params)),
                                               needs_slot=False))

    def _preset(self, body: dict[str, Any]) -> str | None:
        model = body.get("model")
        if model is not None and not isinstance(model, str):
            raise ApiError(400, "'model' must be a string", param="model")
        return parse_model_name(model)[0] if model else None

    # -- the exact protocol (eft_local.remote.exact) --------------------------------------
    async def rows(self, request: Request) -> Response:
        req = parse_rows(await self.body(request))
        job = Job(work=rows_work(req, self._preset({"model": req.model})), switch=False)
        watcher = await self.start(job, request)
        try:
            data = await self.first(job, self.events(job))
        finally:
            watcher.cancel()
        return Response(content=data["body"], media_type=MEDIA_TYPE, headers=data["headers"])

    async def vocab(self, request: Request) -> Response:
        query = dict(request.query_params)
        return await self._simple(request, Job(work=vocab_work(query, self._preset(query)),
                                               needs_slot=False, switch=False))

    async def _generate(self, request: Request, job: Job, streaming: bool,
                        stream_answer: Callable[..., AsyncIterator[str]],
                        whole_answer: Callable[..., Awaitable[Response]],
                        started: float, respond: Callable[..., Response] = event_stream
                        ) -> Response:
        """Queue a generation job and answer it whole or streamed (``respond``: as
        server-sent events); errors found before any work are a 4xx either way."""
        watcher = await self.start(job, request)
        try:
            stream = self.events(job)
            head = await self.first(job, stream)
            if streaming:
                watcher.cancel()  # the streaming response listens for the client from here
                return respond(self._guarded(request, job, started, head,
                                             stream_answer(head, stream, started)))
            return await whole_answer(head, stream, started)
        except BaseException:
            job.cancel()
            raise
        finally:
            watcher.cancel()

    async def _guarded(self, request: Request, job: Job, started: float,
                       head: dict[str, Any], body: AsyncIterator[str]) -> AsyncIterator[str]:
        """A streamed answer's ``body`` as sent: its job is cancelled when the stream stops
        before ``body`` ends (the client left), and the request is logged once either way."""
        finished = False
        try:
            async for piece in body:
                yield piece
            finished = True
        finally:
            if not finished:
                job.cancel()
            await body.aclose()  # type: ignore[attr-defined]
            self.log_done(request, job, started, 200, head)

    # -- chat -----------------------------------------------------------------------------
    def chat_job(self, req: ChatRequest) -> Job:
        """The job of a chat request, with the command line's defaults."""
        opts = self.options
        knobs = req.common.knobs
        if knobs.context_overflow is None:
            knobs = replace(knobs, context_overflow=opts.context_overflow)
        return Job(work=chat_work(req, default_max=opts.max_tokens, system=opts.system,
                                  default_stop=opts.stop,
                                  reasoning_format=opts.reasoning_format),
                   preset=req.common.preset, knobs=knobs, sampling=req.common.sampling)

    async def chat(self, request: Request) -> Response:
        started = time.perf_counter()
        req = parse_chat(await self.body(request), self.runner.sampling, self.options.seed)
        job = self.chat_job(req)
        return await self._generate(request, job, req.common.stream,
                                    partial(self._chat_stream, request, req, job),
                                    partial(self._chat_whole, request, req, job), started)

    # -- completions ----------------------------------------------------------------------
    def completion_job(self, req: CompletionRequest, default_max: int) -> Job:
        """The job of a completion request (``default_max`` tokens unless it says)."""
        return Job(work=completion_work(req, default_max=default_max,
                                        default_stop=self.options.stop),
                   preset=req.common.preset, knobs=req.common.knobs,
                   sampling=req.common.sampling)

    async def completions(self, request: Request) -> Response:
        started = time.perf_counter()
        opts = self.options
        req = parse_completion(await self.body(request), self.runner.sampling, opts.seed,
                               max_logprobs=opts.max_logprobs)
        job = self.completion_job(req, opts.completion_max_tokens)
        return await self._generate(request, job, req.common.stream,
                                    partial(self._completion_stream, request, req, job),
                                    partial(self._completion_whole, request, req, job),
                                    started)

    async def _completion_whole(self, request: Request, req: CompletionRequest, job: Job,
                                head: dict[str, Any], stream: AsyncIterator[tuple[str, Any]],
                                started: float) -> Response:
        choices: dict[int, dict[str, Any]] = {}
        prompt_total = completion_total = cached_total = 0
        timings: list[dict[str, Any]] = []
        async for kind, data in stream:
            if kind == "error":
                raise data
            choice = choices.setdefault(data["index"], {
                "index": data["index"], "text": "", "finish_reason": None,
                "logprobs": _empty_legacy() if req.logprobs is not None else None,
                "diag": []})
            if kind == "chunk":
                choice["text"] += data["text"]
                if data.get("legacy_logprobs"):
                    for key, values in data["legacy_logprobs"].items():
                        choice["logprobs"][key] += values
                choice["diag"] += data.get("eft", [])
            elif kind == "done":
                choice["finish_reason"] = data["finish"]
                if data["index"] % req.common.n == 0:  # a prompt counts once, not per choice
                    prompt_total += data["prompt_tokens"]
                    cached_total += data.get("cached_tokens", 0)
                completion_total += data["completion_tokens"]
                timings.append(data["timings"])
        job.info.update(prompt_tokens=prompt_total, completion_tokens=completion_total,
                        timings=timings[0] if len(timings) == 1 else {})
        self.log_done(request, job, started, head=head)
        out = []
        for i in sorted(choices):
            c = choices[i]
            diag = c.pop("diag")
            if req.common.knobs.diagnostics:
                c["eft"] = {"tokens": diag}
            out.append(c)
        body: dict[str, Any] = {
            **envelope("cmpl", "text_completion", req.common.model, head), "choices": out,
            "usage": usage(prompt_total, completion_total, cached_total), "eft": head["eft"]}
        if len(timings) == 1:
            body["timings"] = timings[0]
        return JSONResponse(body)

    async def _completion_stream(self, request: Request, req: CompletionRequest, job: Job,
                                 head: dict[str, Any], stream: AsyncIterator[tuple[str, Any]],
                                 started: float) -> AsyncIterator[str]:
        base = envelope("cmpl", "text_completion", req.common.model, head)
        extra = {"usage": None} if req.common.include_usage else {}
        prompt_total = completion_total = cached_total = 0
        async for kind, data in stream:
            if kind == "error":
                yield sse(data.body())
                return
            if kind == "chunk" and (data["text"] or data.get("legacy_logprobs")
                                    or data.get("eft")):
                choice = {"index": data["index"], "text": data["text"],
                          "logprobs": data.get("legacy_logprobs"), "finish_reason": None}
                more = {"eft": {"tokens": data["eft"]}} if data.get("eft") else {}
                yield sse({**base, "choices": [choice], **extra, **more})
            elif kind == "done":
                if data["index"] % req.common.n == 0:  # a prompt counts once
                    prompt_total += data["prompt_tokens"]
                    cached_total += data.get("cached_tokens", 0)
                completion_total += data["completion_tokens"]
                job.info["timings"] = data["timings"]
                yield sse({**base, "choices": [{"index": data["index"], "text": "",
                                                "logprobs": None,
                                                "finish_reason": data["finish"]}],
                           **extra, "timings": data["timings"]})
        if req.common.include_usage:
            yield sse({**base, "choices": [], "usage": usage(prompt_total,
                                                             completion_total,
                                                             cached_total)})
        yield "data: [DONE]\n\n"


async def _cancel_when_gone(request: Request, job: Job) -> None:
    """Cancel ``job`` the moment its client disconnects (after the body was read, the
    server's next message is the disconnect)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass
    job.cancel()


def _empty_legacy() -> dict[str, list[Any]]:
    return {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}


async def _not_found(request: Request, exc: Exception) -> Response:
    status = getattr(exc, "status_code", 404)
    message = (f"no route {request.method} {request.url.path}" if status in (404, 405)
               else str(getattr(exc, "detail", exc)))
    return error_response(ApiError(status, message, code="not_found" if status == 404
                                   else None), request.url.path)


def create_app(runner: Worker, options: ServerOptions | None = None,
               log: Callable[[str], None] = print) -> Starlette:
    """The Starlette application serving ``runner``."""
    api = Api(runner, options or ServerOptions(), log)
    r = api.route
    routes: Sequence[Route] = [
        Route("/", r(playground, auth=False), methods=["GET"]),
        Route("/health", r(api.health, auth=False), methods=["GET"]),
        Route("/v1/health", r(api.health, auth=False), methods=["GET"]),
        Route("/v1/models", r(api.models), methods=["GET"]),
        Route("/v1/models/{name:path}", r(api.model), methods=["GET"]),
        Route("/v1/chat/completions", r(api.chat), methods=["POST"]),
        Route("/v1/completions", r(api.completions), methods=["POST"]),
        Route("/tokenize", r(api.tokenize), methods=["POST"]),
        Route("/detokenize", r(api.detokenize), methods=["POST"]),
        Route("/tokenizer_info", r(api.tokenizer_info), methods=["GET"]),
        Route(ROWS_PATH, r(api.rows), methods=["POST"]),
        Route(VOCAB_PATH, r(api.vocab), methods=["GET"]),
        *ollama_routes(api),
    ]
    cors = api.options.cors  # inside the guard: only origins it lets in get CORS answers
    middleware = [Middleware(HostGuard, policy=api.options.hosts, cors=cors, log=log)] + (
        [Middleware(CORSMiddleware, **cors_settings(cors))] if cors.enabled else [])
    app = Starlette(routes=list(routes), exception_handlers={HTTPException: _not_found},
                    middleware=middleware)
    # no redirect from /health/ to /health: Starlette builds its absolute URL from the Host
    # header, which a client chooses
    app.router.redirect_slashes = False
    return app
