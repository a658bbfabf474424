"""The server's engine room: one worker thread, one loaded model set, a FIFO of jobs.

Every request becomes a :class:`Job` run by the worker thread, one at a time and in arrival
order, so the models' KV caches carry over from one request to the next (a resent chat pays
only for its new suffix). A job reports back through events that the web side reads from an
asyncio queue; setting :attr:`Job.cancelled` stops a generation before its next token. Each
job's knobs (beta, lam, formula, sampler settings) are applied when it starts and the
server's defaults restored when it ends, so nothing leaks into the next request. No web
framework is imported here (see :mod:`eft_local.server.app`).
"""

from __future__ import annotations

import asyncio
import codecs
import queue
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from eft_local import hub
from eft_local.config import Config, Preset
from eft_local.errors import EftError
from eft_local.formula import parse_formula
from eft_local.sampler import SamplerSettings
from eft_local.server.protocol import (
    ApiError,
    ChatRequest,
    CompletionRequest,
    Knobs,
    chat_logprob,
    finish_reason,
    model_name,
)
from eft_local.session import LoadOptions, Session

Log = Callable[[str], None]
Event = tuple[str, Any]
"""What a job reports: ("start", info), ("chunk", dict), ("done", info), ("result", dict),
("error", ApiError), and always last ("end", None)."""


@dataclass
class Job:
    """One request's work, run by the worker thread; its events go to an asyncio queue."""

    work: Callable[[Session, Job], None]
    preset: str | None = None
    knobs: Knobs = field(default_factory=Knobs)
    settings: SamplerSettings | None = None
    loop: asyncio.AbstractEventLoop | None = None
    events: asyncio.Queue[Event] | None = None
    cancelled: threading.Event = field(default_factory=threading.Event)
    generated: int = 0
    generated_at_cancel: int | None = None
    info: dict[str, Any] = field(default_factory=dict)

    def emit(self, kind: str, data: Any = None) -> None:
        """Hand one event to the web side (thread-safe)."""
        if self.loop is not None and self.events is not None:
            self.loop.call_soon_threadsafe(self.events.put_nowait, (kind, data))

    def cancel(self) -> None:
        """Stop before the next token (the client went away)."""
        if not self.cancelled.is_set():
            self.generated_at_cancel = self.generated
            self.cancelled.set()


class Runner:
    """Owns the loaded session and the worker thread that runs jobs in FIFO order."""

    def __init__(self, config: Config | None, preset: Preset, *, pinned: bool,
                 params: Mapping[str, float] | None = None,
                 settings: SamplerSettings | None = None, options: LoadOptions | None = None,
                 max_queue: int = 16, log: Log = print) -> None:
        self.config = config
        self.initial = preset
        self.pinned = pinned
        self.params = dict(params or {})
        self.settings = settings or SamplerSettings()
        self.options = options or LoadOptions()
        self.max_queue = max_queue
        self.log = log
        self.session: Session | None = None
        self.state = "loading"
        self.error: str | None = None
        self.history: list[Job] = []
        """Finished jobs, most recent last (kept short; for tests and statistics)."""
        self._queue: queue.Queue[Job | None] = queue.Queue()
        self._waiting = 0
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._loop, name="eft-engine", daemon=True)
        self._base: tuple[dict[str, float], Any, SamplerSettings] | None = None
        self.current: Job | None = None
        """The job the worker runs now."""

    # -- lifecycle ------------------------------------------------------------------------
    def start(self) -> None:
        """Start the worker; it loads the initial preset first unless one was adopted."""
        self._thread.start()
        if self.session is None:
            self._queue.put(Job(work=lambda _s, _j: None, preset=self.initial.name))

    def adopt(self, session: Session) -> None:
        """Serve an already loaded session (before :meth:`start`)."""
        self.session, self.state = session, "ready"
        self._base = (dict(session.params), session.formula, session.settings)

    def stop(self) -> None:
        """Cancel the running and waiting jobs, stop the worker and free the models."""
        if self._thread.is_alive():
            while True:
                try:
                    job = self._queue.get_nowait()
                except queue.Empty:
                    break
                if job is not None:
                    job.cancel()
                    job.emit("error", ApiError(503, "the server is shutting down",
                                               code="shutting_down"))
                    job.emit("end")
            if self.current is not None:
                self.current.cancel()
            self._queue.put(None)
            self._thread.join(timeout=60)
        if self.session is not None:
            self.session.close()
            self.session = None

    @property
    def loaded(self) -> str | None:
        """The name of the loaded preset (None while none is)."""
        return self.session.preset.name if self.session is not None else None

    def presets(self) -> dict[str, Preset]:
        """Presets a request may name: the pinned one, or every configured one."""
        if self.pinned or self.config is None:
            return {self.initial.name: self.initial}
        return {**self.config.presets, self.initial.name: self.initial}

    def available(self) -> list[Preset]:
        """Presets whose model files are all present (and the loaded one)."""
        out = []
        for name, preset in self.presets().items():
            present = all(hub.cached_path(spec) is not None for spec in preset.models.values())
            if present or name == self.loaded:
                out.append(preset)
        return out

    def check_model(self, name: str | None) -> None:
        """404 unless ``name`` (a preset name, knobs removed) may be served."""
        if name is None:
            return
        known = self.presets()
        if name not in known:
            hint = (f"this server is pinned to {self.initial.name!r}" if self.pinned else
                    "known: " + ", ".join(sorted(known)))
            raise ApiError(404, f"the model {name!r} does not exist ({hint})", param="model",
                           code="model_not_found")

    def waiting(self) -> int:
        """Jobs queued and not started."""
        return self._waiting

    def submit(self, job: Job) -> None:
        """Queue ``job`` (FIFO); 503 when :attr:`max_queue` jobs already wait."""
        self.check_model(job.preset)
        with self._lock:
            if self._waiting >= self.max_queue:
                raise ApiError(503, f"the server is busy: {self._waiting} requests are "
                               "waiting; retry later", code="queue_full")
            self._waiting += 1
        self._queue.put(job)

    # -- the worker -----------------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            job = self._queue.get()
            if job is None:
                return
            with self._lock:
                self._waiting = max(0, self._waiting - 1)
            self.current = job
            try:
                self._run(job)
            finally:
                self.current = None

    def _run(self, job: Job) -> None:
        session = None
        try:
            if job.cancelled.is_set():
                return
            session = self._session_for(job.preset)
            self._apply(session, job)
            job.work(session, job)
        except ApiError as exc:
            job.emit("error", exc)
        except EftError as exc:
            job.emit("error", ApiError(400, str(exc)))
        except Exception as exc:  # a bug: one log line, a 500 without a traceback
            self.log(f"internal error: {type(exc).__name__}: {exc}")
            job.emit("error", ApiError(500, f"internal error: {type(exc).__name__}"))
        finally:
            if session is not None:
                self._restore(session)
            job.emit("end")
            self.history = [*self.history[-31:], job]

    def _session_for(self, name: str | None) -> Session:
        name = name or (self.loaded or self.initial.name)
        if self.session is not None and self.session.preset.name == name:
            return self.session
        preset = self.presets().get(name)
        if preset is None:
            self.check_model(name)
        assert preset is not None
        if self.session is not None:
            self.log(f"unloading preset {self.session.preset.name!r}")
            self.session.close()
            self.session = None
        self.state, self.error = "loading", None
        self.log(f"loading preset {name!r}")
        started = time.perf_counter()
        try:
            params = self.params if preset is self.initial else {}
            self.session = Session(preset, params=params, settings=self.settings,
                                   options=self.options, progress=self.log)
        except EftError as exc:
            self.state, self.error = "error", str(exc)
            self.log(f"loading {name!r} failed: {exc}")
            raise ApiError(503, f"could not load {name!r}: {exc}", param="model",
                           code="model_load_failed") from None
        self.state = "ready"
        self.log(f"preset {name!r} ready in {time.perf_counter() - started:.1f} s")
        session = self.session
        self._base = (dict(session.params), session.formula, session.settings)
        return session

    def _apply(self, session: Session, job: Job) -> None:
        params, formula, settings = self._base  # type: ignore[misc]
        session.params, session.formula = dict(params), formula
        session.settings = job.settings or settings
        session.stop = ()
        if job.knobs.formula is not None:
            try:
                session.formula = parse_formula(job.knobs.formula, roles=tuple(session.models))
            except EftError as exc:
                raise ApiError(400, str(exc), param="eft.formula") from None
        for name, value in job.knobs.params.items():
            try:
                session.set_param(name, value)
            except EftError as exc:
                raise ApiError(400, str(exc), param=f"eft.{name}") from None
        try:
            session.weights()
        except EftError as exc:
            raise ApiError(400, str(exc), param="eft") from None

    def _restore(self, session: Session) -> None:
        if self._base is not None and session is self.session:
            params, formula, settings = self._base
            session.params, session.formula, session.settings = dict(params), formula, settings
            session.stop = ()


# -- the work of each endpoint ----------------------------------------------------------------
def describe(session: Session) -> dict[str, Any]:
    """The ``eft`` object of a response: what the request was served with."""
    return {"preset": session.preset.name, "formula": session.describe(),
            "params": {k: session.params[k] for k in session.formula.params},
            "model": model_name(session.preset.name,
                                {k: session.params[k] for k in session.formula.params})}


def token_bytes(session: Session, token: int) -> bytes:
    """A token's bytes (control tokens as their text)."""
    return session.token_text(token).encode("utf-8") if session.engine.is_eog(token) else \
        session.models[session.preset.template_role].piece(token, special=True)


def _text(data: bytes) -> str:
    return data.decode("utf-8", "replace")


def check_tokens(session: Session, tokens: Sequence[int], param: str) -> None:
    """400 unless every id is in the vocabulary."""
    n = session.engine.width
    bad = next((t for t in tokens if not 0 <= t < n), None)
    if bad is not None:
        raise ApiError(400, f"token id {bad} is outside the vocabulary (0..{n - 1})",
                       param=param)


def generate(session: Session, job: Job, tokens: list[int], *, max_tokens: int,
             stop: Sequence[str], top_n: int | None, index: int = 0,
             prompt_param: str = "messages",
             convert: Callable[[dict[str, Any]], dict[str, Any]] | None = None) -> None:
    """Stream one generation after ``tokens`` as ``chunk`` events; a ``done`` event carries
    usage and llama-server style ``timings`` (tokens evaluated vs. re-used from the cache)."""
    n_ctx = session.engine.n_ctx
    if len(tokens) >= n_ctx:
        raise ApiError(400, f"this model's context holds {n_ctx} tokens; the prompt is "
                       f"{len(tokens)} tokens", param=prompt_param,
                       code="context_length_exceeded")
    stats = session.engine.stats
    before = stats.prefilled
    started = time.perf_counter()
    first = None
    count = 0
    diagnostics = job.knobs.diagnostics
    stream = session.stream(tokens, max_tokens=max(1, min(max_tokens, n_ctx - len(tokens))),
                            stop=tuple(stop), diagnostics=diagnostics, top_n=top_n)
    pending: list[dict[str, Any]] = []
    eft_pending: list[dict[str, Any]] = []
    finish = None
    try:
        for chunk in stream:
            if chunk.step is not None:
                step = chunk.step
                if first is None:
                    first = time.perf_counter()
                count += 1
                job.generated += 1
                if top_n is not None and not session.engine.is_eog(step.token):
                    pending.append(chat_logprob(
                        session.token_text(step.token), token_bytes(session, step.token),
                        step.logprob if step.logprob is not None else float("nan"),
                        [(session.token_text(t), token_bytes(session, t), lp)
                         for t, lp in (step.top or ())]))
                if diagnostics:
                    from eft_local.records import step_record

                    eft_pending.append(step_record(session, step))
            if chunk.finish:
                finish = chunk.finish
            if chunk.text or chunk.finish:
                data = {"index": index, "text": chunk.text, "logprobs": pending,
                        "eft": eft_pending,
                        "finish": finish_reason(chunk.finish) if chunk.finish else None}
                job.emit("chunk", convert(data) if convert else data)
                pending, eft_pending = [], []
            if job.cancelled.is_set():
                break
    finally:
        stream.close()
    ended = time.perf_counter()
    evaluated = stats.prefilled - before
    first = first or ended
    job.info = {"prompt_tokens": len(tokens), "completion_tokens": count,
                "cancelled": job.cancelled.is_set()}
    timings = {"cache_n": len(tokens) - evaluated, "prompt_n": evaluated,
               "prompt_ms": 1e3 * (first - started),
               "prompt_per_second": evaluated / max(first - started, 1e-9),
               "predicted_n": count, "predicted_ms": 1e3 * (ended - first),
               "predicted_per_second": (count - 1) / (ended - first) if count > 1 and
               ended > first else 0.0}
    job.emit("done", {"index": index, "prompt_tokens": len(tokens), "completion_tokens": count,
                      "finish": finish_reason(finish) if finish else "length",
                      "timings": timings})


def chat_work(req: ChatRequest, *, default_max: int, system: str | None,
              default_stop: Sequence[str]) -> Callable[[Session, Job], None]:
    """The job of one chat completion."""

    def work(session: Session, job: Job) -> None:
        messages = req.messages
        if system and not any(m["role"] == "system" for m in messages):
            messages = [{"role": "system", "content": system}, *messages]
        tokens = session.chat_tokens(messages)
        job.emit("start", {"eft": describe(session), "prompt_tokens": len(tokens)})
        generate(session, job, tokens, max_tokens=req.common.max_tokens or default_max,
                 stop=default_stop if req.common.stop is None else req.common.stop,
                 top_n=req.top_logprobs if req.logprobs else None)

    return work


def _offsets(pieces: Sequence[bytes], skip_first: bool, start: int = 0) -> list[int]:
    """Character offset of each token in the text its pieces decode to."""
    decoder = codecs.getincrementaldecoder("utf-8")("replace")
    out, pos = [], start
    for i, piece in enumerate(pieces):
        out.append(pos)
        if not (skip_first and i == 0):
            pos += len(decoder.decode(piece))
    return out


def completion_work(req: CompletionRequest, *, default_max: int,
                    default_stop: Sequence[str]) -> Callable[[Session, Job], None]:
    """The job of one (legacy) completion request: each prompt in turn, one choice each."""

    def work(session: Session, job: Job) -> None:
        prompts = []
        for i, prompt in enumerate(req.prompts):
            param = "prompt" if len(req.prompts) == 1 else f"prompt[{i}]"
            if isinstance(prompt, str):
                if not prompt:
                    raise ApiError(400, "the prompt is empty", param=param)
                tokens = session.tokenize(prompt, add_bos=True, parse_special=True)
                added_bos = len(tokens) > len(session.tokenize(prompt, add_bos=False,
                                                                parse_special=True))
                text = prompt
            else:
                check_tokens(session, prompt, param)
                tokens, added_bos, text = list(prompt), False, session.detokenize(prompt)
            prompts.append((tokens, added_bos, text, param))
        job.emit("start", {"eft": describe(session),
                           "prompt_tokens": sum(len(p[0]) for p in prompts)})
        max_tokens = default_max if req.common.max_tokens is None else req.common.max_tokens
        for index, (tokens, added_bos, text, param) in enumerate(prompts):
            if job.cancelled.is_set():
                return
            _one_completion(session, job, req, index, tokens, added_bos, text, param,
                            max_tokens, default_stop)

    return work


def _one_completion(session: Session, job: Job, req: CompletionRequest, index: int,
                    tokens: list[int], added_bos: bool, text: str, param: str,
                    max_tokens: int, default_stop: Sequence[str]) -> None:
    top_n = req.logprobs
    echo_lp: dict[str, Any] | None = None
    if req.echo:
        record: dict[str, Any] = {"index": index, "text": text, "echo": True}
        if top_n is not None:
            if len(tokens) >= session.engine.n_ctx:
                raise ApiError(400, f"this model's context holds {session.engine.n_ctx} "
                               f"tokens; the prompt is {len(tokens)} tokens", param=param,
                               code="context_length_exceeded")
            scored = session.score(tokens, top_n=top_n)
            pieces = [token_bytes(session, t) for t in tokens]
            echo_lp = {
                "tokens": [_text(p) for p in pieces],
                "token_logprobs": [t.logprob for t in scored.tokens],
                "top_logprobs": [None if t.logprob is None else
                                 {session.token_text(i): lp for i, lp in t.top}
                                 for t in scored.tokens],
                "text_offset": _offsets(pieces, added_bos)}
            record["legacy_logprobs"] = echo_lp
        job.emit("chunk", record)
    if max_tokens == 0:
        job.info = {"prompt_tokens": len(tokens), "completion_tokens": 0, "cancelled": False}
        job.emit("done", {"index": index, "prompt_tokens": len(tokens), "completion_tokens": 0,
                          "finish": "length", "timings": {}})
        return
    generate(session, job, tokens, max_tokens=max_tokens,
             stop=default_stop if req.common.stop is None else req.common.stop,
             top_n=top_n, index=index, prompt_param=param, convert=_legacy(len(text), top_n))


def _legacy(offset: int, top_n: int | None) -> Callable[[dict[str, Any]], dict[str, Any]]:
    """Turn the chat-style logprob entries of one generation's chunks into completions'
    ``logprobs`` object, with text offsets continuing from ``offset``."""
    decoder = codecs.getincrementaldecoder("utf-8")("replace")
    pos = offset

    def convert(data: dict[str, Any]) -> dict[str, Any]:
        nonlocal pos
        entries = data.pop("logprobs")
        if top_n is None:
            return data
        offsets = []
        for entry in entries:
            offsets.append(pos)
            pos += len(decoder.decode(bytes(entry["bytes"])))
        data["legacy_logprobs"] = {
            "tokens": [e["token"] for e in entries],
            "token_logprobs": [e["logprob"] for e in entries],
            "top_logprobs": [{t["token"]: t["logprob"] for t in e["top_logprobs"]}
                             for e in entries],
            "text_offset": offsets}
        return data

    return convert


def tokenize_work(body: Mapping[str, Any]) -> Callable[[Session, Job], None]:
    """``/tokenize``: ``{"prompt" (or "content"), "add_special_tokens"}`` or
    ``{"messages"}`` (rendered with the chat template) -> ``{"tokens", "count",
    "max_model_len"}``."""
    messages = body.get("messages")
    prompt = body.get("prompt", body.get("content"))
    add_special = body.get("add_special_tokens", body.get("add_special", True))
    if not isinstance(add_special, bool):
        raise ApiError(400, "'add_special_tokens' must be true or false",
                       param="add_special_tokens")
    if messages is None and not isinstance(prompt, str):
        raise ApiError(400, "'prompt' must be a string (or give 'messages')", param="prompt")

    def work(session: Session, job: Job) -> None:
        if messages is not None:
            from eft_local.server.protocol import parse_chat

            chat = parse_chat({"messages": messages}, SamplerSettings(), 0)
            tokens = session.chat_tokens(chat.messages)
        else:
            tokens = session.tokenize(prompt, add_bos=add_special, parse_special=True)
        job.emit("result", {"tokens": tokens, "count": len(tokens),
                            "max_model_len": session.engine.n_ctx})

    return work


def detokenize_work(body: Mapping[str, Any]) -> Callable[[Session, Job], None]:
    """``/detokenize``: ``{"tokens"}`` -> ``{"prompt"}``."""
    tokens = body.get("tokens")
    if not isinstance(tokens, list) or not all(
            isinstance(t, int) and not isinstance(t, bool) for t in tokens):
        raise ApiError(400, "'tokens' must be a list of token ids", param="tokens")

    def work(session: Session, job: Job) -> None:
        check_tokens(session, tokens, "tokens")
        job.emit("result", {"prompt": session.detokenize(tokens)})

    return work


def tokenizer_info_work(session: Session, job: Job) -> None:
    """``/tokenizer_info``: the template model's special tokens and chat template."""
    vocab = session.report.vocabs.get(session.preset.template_role)

    def text(token: int | None) -> str | None:
        return session.token_text(token) if token is not None and token >= 0 else None

    job.emit("result", {
        "model": session.preset.name, "tokenizer_class": "llama.cpp",
        "vocab_type": vocab.vocab_type if vocab else None,
        "vocab_size": session.engine.width,
        "bos_token": text(vocab.bos if vocab else None),
        "eos_token": text(vocab.eos if vocab else None),
        "eot_token": text(vocab.eot if vocab else None), "pad_token": None,
        "bos_token_id": vocab.bos if vocab else None,
        "eos_token_id": vocab.eos if vocab else None,
        "add_bos_token": bool(vocab and vocab.add_bos),
        "add_eos_token": bool(vocab and vocab.add_eos),
        "model_max_length": session.engine.n_ctx,
        "chat_template": session.template})

