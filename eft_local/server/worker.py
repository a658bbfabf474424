"""The server's engine room: one worker thread, one loaded model set, slots and a queue.

Every request becomes a :class:`Job`. The worker thread owns the session: it starts queued
jobs in arrival order, each job's generations (:class:`Task`) in free slots (llama-server's
``-np``: one KV sequence of every model each), and runs one batched step of every running
generation at a time, so a request that arrives while others stream joins at the next step
and its first token waits for its own prompt only. A slot keeps its cache after a request,
and a new prompt takes the free slot that shares the longest prefix with it
(:meth:`eft_local.batch.Batch.choose_slot`): a chat client that resends the whole history
pays only for its new suffix, even after other requests in between. Jobs that need no slot
(tokenizing, the vocabulary) run between steps. A job reports back through events that the
web side reads from an asyncio queue; cancelling it (its client left, Ctrl-C) frees its
slots at the next step, and a queued job leaves the queue at once. Each job's knobs become
one :class:`~eft_local.settings.Settings` value for its calls: the session's own defaults
are never touched. No web framework is imported here (see :mod:`eft_local.server.app`); the
work of each endpoint is in :mod:`eft_local.server.handlers`.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from eft_local import hub
from eft_local.errors import Cancelled, EftError
from eft_local.formula import parse_formula
from eft_local.interrupts import cancel_on
from eft_local.presets import Config, Preset
from eft_local.server.protocol import ApiError, Knobs
from eft_local.session import (
    Chunk,
    Generation,
    LoadOptions,
    Request,
    SamplerSettings,
    Session,
    Settings,
)

Log = Callable[[str], None]
Event = tuple[str, Any]
"""What a job reports: ("start", info), ("chunk", dict), ("done", info), ("result", dict),
("error", ApiError), and always last ("end", None)."""


@dataclass
class Task:
    """One generation of a job, run in a slot: ``feed`` sees each of its chunks, ``done``
    runs after the last one."""

    request: Request
    feed: Callable[[Chunk], None]
    done: Callable[[], None]
    generation: Generation | None = None
    started: float = 0.0
    """When it got its slot (``time.perf_counter``)."""
    share: Task | None = None
    """Another task of the job with the same prompt (a choice of ``n``): once that one has
    read the prompt, this one copies its cache instead of reading it again."""


Work = Callable[[Session, "Job"], "list[Task] | None"]
"""A job's work: runs in the worker thread when the job starts (validating, tokenizing,
emitting ``start`` or ``result``) and returns the generations to run, if any."""


@dataclass
class Job:
    """One request's work, run by the worker thread; its events go to an asyncio queue."""

    work: Work
    preset: str | None = None
    knobs: Knobs = field(default_factory=Knobs)
    sampling: SamplerSettings | None = None
    needs_slot: bool = True
    """Its work uses a model's cache (generations, scoring, rows): it starts only when a
    slot is free. Tokenizing and the vocabulary need none."""
    switch: bool = True
    """It may load its preset in place of the loaded one (the exact protocol's requests
    serve the loaded preset and never switch it)."""
    settings: Settings | None = None
    """What the job's calls are made with: set by the worker when the job starts."""
    loop: asyncio.AbstractEventLoop | None = None
    events: asyncio.Queue[Event] | None = None
    cancelled: threading.Event = field(default_factory=threading.Event)
    cancel_reason: str | None = None
    """Why the job was cancelled: ``client`` (it went away) or ``shutdown``."""
    started: bool = False
    """Set by the worker when the job's work begins (a job cancelled before is skipped)."""
    generated: int = 0
    generated_at_cancel: int | None = None
    info: dict[str, Any] = field(default_factory=dict)
    tasks: list[Task] = field(default_factory=list)
    """Its generations not finished yet."""
    worker: Worker | None = None

    def emit(self, kind: str, data: Any = None) -> None:
        """Hand one event to the web side (thread-safe; dropped once its loop closed)."""
        loop, events = self.loop, self.events
        if loop is None or events is None or loop.is_closed():
            return
        with contextlib.suppress(RuntimeError):  # the loop closed in between (it stopped)
            loop.call_soon_threadsafe(events.put_nowait, (kind, data))

    def cancel(self, reason: str = "client") -> None:
        """Stop before the next token (the client went away, or the server stops); a job
        still queued leaves the queue at once."""
        if not self.cancelled.is_set():
            self.generated_at_cancel = self.generated
            self.cancel_reason = reason
            self.cancelled.set()
            if self.worker is not None:
                self.worker.wake()

    def check(self) -> None:
        """Raise 503 when the server is stopping this job (a gone client needs no answer)."""
        if self.cancel_reason == "shutdown":
            raise ApiError(503, "the server is shutting down", code="shutting_down")


class Worker:
    """Owns the loaded session and the worker thread that runs jobs (see the module
    docstring)."""

    def __init__(self, config: Config | None, preset: Preset, *, pinned: bool,
                 params: Mapping[str, float] | None = None,
                 sampling: SamplerSettings | None = None, options: LoadOptions | None = None,
                 max_queue: int = 16, log: Log = print) -> None:
        """``options.download`` says whether a preset whose hub files are missing may be
        downloaded (``serve --allow-download``); without it only presets whose files are
        present are listed and loaded; ``options.n_seq`` is the number of slots."""
        self.config = config
        self.initial = preset
        self.pinned = pinned
        self.params = dict(params or {})
        """Knob defaults of the initial preset (from the command line)."""
        self.sampling = sampling or SamplerSettings()
        """Sampler defaults of every request (from the command line)."""
        self.options = options or LoadOptions()
        self.max_queue = max_queue
        self.log = log
        self.session: Session | None = None
        self.state = "loading"
        self.error: str | None = None
        self.history: list[Job] = []
        """Finished jobs, most recent last (kept short; for tests and statistics)."""
        self.queue: deque[Job] = deque()
        """Jobs waiting to start, in arrival order."""
        self.running: list[Job] = []
        """Jobs started and not finished, in the order they started."""
        self._cond = threading.Condition()
        self._thread = threading.Thread(target=self._loop, name="eft-engine", daemon=True)
        self._stop = False
        self.closing = False
        """Set by :meth:`close`: new jobs get 503."""

    # -- lifecycle ------------------------------------------------------------------------
    def start(self) -> None:
        """Start the worker; it loads the initial preset first unless one was adopted."""
        if self.session is None:
            self.queue.append(Job(work=lambda _s, _j: None, preset=self.initial.name,
                                  needs_slot=False))
        self._thread.start()

    def adopt(self, session: Session) -> None:
        """Serve an already loaded session (before :meth:`start`)."""
        self.session, self.state = session, "ready"

    def wake(self) -> None:
        """Something changed (a job came or was cancelled): the worker looks again."""
        with self._cond:
            self._cond.notify_all()

    def close(self) -> None:
        """Begin to stop (thread-safe): refuse new jobs, answer the waiting ones 503 and stop
        the running ones before their next token (503 to their clients)."""
        self.closing = True
        with self._cond:
            waiting = list(self.queue)
            self.queue.clear()
            running = list(self.running)
            self._cond.notify_all()
        for job in waiting:
            job.cancel("shutdown")
            job.emit("error", ApiError(503, "the server is shutting down", code="shutting_down"))
            job.emit("end")
        for job in running:
            job.cancel("shutdown")

    def stop(self) -> None:
        """Close, let the worker finish, and free the models."""
        self.close()
        if self._thread.is_alive():
            with self._cond:
                self._stop = True
                self._cond.notify_all()
            self._thread.join(timeout=60)
        if self.session is not None:
            self.session.close()
            self.session = None

    @property
    def loaded(self) -> str | None:
        """The name of the loaded preset (None while none is)."""
        return self.session.preset.name if self.session is not None else None

    @property
    def current(self) -> Job | None:
        """The job that started first among those running (None when idle)."""
        running = self.running
        return running[0] if running else None

    @property
    def slots(self) -> int:
        """How many generations run at once."""
        return self.options.n_seq

    def presets(self) -> dict[str, Preset]:
        """Presets a request may name: the pinned one, or every configured one."""
        if self.pinned or self.config is None:
            return {self.initial.name: self.initial}
        return {**self.config.presets, self.initial.name: self.initial}

    def available(self) -> list[Preset]:
        """The presets this server lists and loads: the loaded one, those whose model files
        are all present, and with ``options.download`` every configured one."""
        out = []
        for name, preset in self.presets().items():
            if name == self.loaded or self.options.download or all(
                    spec.remote or hub.cached_path(spec) is not None
                    for spec in preset.models.values()):
                out.append(preset)
        return out

    def check_model(self, name: str | None) -> Preset | None:
        """The preset ``name`` (knobs removed) names; 404 unless it is :meth:`available`."""
        if name is None:
            return None
        available = {p.name: p for p in self.available()}
        if name not in available:
            absent = "" if name not in self.presets() else (
                "; its model files are not downloaded (run `eft-local pull " + name + "`)")
            hint = (f"this server is pinned to {self.initial.name!r}" if self.pinned else
                    "available: " + ", ".join(sorted(available)))
            raise ApiError(404, f"the model {name!r} does not exist ({hint}){absent}",
                           param="model", code="model_not_found")
        return available[name]

    def waiting(self) -> int:
        """Jobs queued and not started (a cancelled one no longer counts)."""
        return sum(1 for job in list(self.queue) if not job.cancelled.is_set())

    def submit(self, job: Job) -> None:
        """Queue ``job``; 503 when :attr:`max_queue` jobs already wait or the server is
        stopping."""
        if self.closing:
            raise ApiError(503, "the server is shutting down", code="shutting_down")
        self.check_model(job.preset)
        with self._cond:
            waiting = self.waiting()
            if waiting >= self.max_queue:
                raise ApiError(503, f"the server is busy: {waiting} requests are waiting; "
                               "retry later", code="queue_full")
            job.worker = self
            self.queue.append(job)
            self._cond.notify_all()

    # -- the worker -----------------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._stop and not self.running and not self.queue:
                    self._cond.wait()
                if self._stop and not self.running:
                    return
            self._reap()
            self._admit()
            self._start_tasks()
            if any(t.generation is not None for job in self.running for t in job.tasks):
                self._step()
            self._reap()

    def _admit(self) -> None:
        """Start queued jobs in order: one needing a slot when one is free (no later job
        needing one passes it); one needing none at once. A job for another preset waits
        until nothing runs, then the preset loads."""
        blocked = False
        for job in list(self.queue):
            if job.cancelled.is_set():  # its client left while it waited: skip it
                self._drop(job)
                self._end_cancelled(job)
                continue
            if self._switching(job):
                if self.running:
                    return  # the running ones finish first; nothing passes this job
                if not self._load(job):
                    continue
            if job.needs_slot and (blocked or not self._free_slot()):
                blocked = True
                continue
            self._drop(job)
            self._begin(job)

    def _switching(self, job: Job) -> bool:
        if self.session is None:
            return True
        return job.switch and self.session.preset.name != (job.preset or self.initial.name)

    def _load(self, job: Job) -> bool:
        """Load the job's preset (False: it failed, the job got its error and ended)."""
        try:
            self._session_for(job.preset)
            return True
        except ApiError as exc:
            self._drop(job)
            job.emit("error", exc)
            self._finish(job)
            return False

    def _free_slot(self) -> bool:
        session = self.session
        if session is None:
            return False
        pending = sum(1 for j in self.running for t in j.tasks if t.generation is None)
        return len(session.batch.free_slots()) > pending

    def _drop(self, job: Job) -> None:
        with self._cond, contextlib.suppress(ValueError):
            self.queue.remove(job)

    def _begin(self, job: Job) -> None:
        """Run a job's work (validating, tokenizing, anything synchronous); its generations
        wait for slots."""
        session = self.session
        assert session is not None
        job.started = True
        self.running.append(job)
        try:
            job.settings = request_settings(session, job)
            with cancel_on(job.cancelled):  # long grammar work stops within one call
                job.tasks = list(job.work(session, job) or [])
        except BaseException as exc:  # noqa: BLE001 - reported to the client, never raised
            self._fail(job, exc)
            return
        if not job.tasks:
            self._finish(job)

    def _start_tasks(self) -> None:
        session = self.session
        if session is None:
            return
        for job in list(self.running):
            for task in job.tasks:
                if task.generation is not None:
                    continue
                if not session.batch.free_slots():
                    return
                share = task.share.generation if task.share is not None else None
                try:
                    task.generation = session.start(task.request, cancelled=job.cancelled,
                                                    share=share)
                except EftError as exc:
                    self._fail(job, exc)
                    break
                task.generation.owner = task
                task.started = time.perf_counter()

    def _step(self) -> None:
        session = self.session
        assert session is not None
        try:
            stepped = session.step()
        except BaseException as exc:  # noqa: BLE001 - a failed step fails what ran in it
            for job in [j for j in self.running if any(t.generation for t in j.tasks)]:
                self._fail(job, exc)
            return
        for gen, chunks in stepped:
            task = gen.owner
            job = next((j for j in self.running if task in j.tasks), None)
            if job is None:
                continue
            if gen.error is not None:  # its own step failed (its grammar): it alone fails
                self._fail(job, gen.error)
                continue
            try:
                for chunk in chunks:
                    if job.cancelled.is_set():  # a block's later tokens: not for a gone client
                        break
                    task.feed(chunk)
                if gen.finish is not None and not job.cancelled.is_set():
                    job.tasks.remove(task)
                    task.done()
            except BaseException as exc:  # noqa: BLE001
                self._fail(job, exc)
                continue
            if not job.tasks:
                self._finish(job)

    def _reap(self) -> None:
        """Cancelled jobs end now: their generations leave their slots; queued ones leave
        the queue."""
        for job in [j for j in list(self.queue) if j.cancelled.is_set()]:
            self._drop(job)
            self._end_cancelled(job)
        for job in [j for j in self.running if j.cancelled.is_set()]:
            for task in job.tasks:
                if task.generation is not None:
                    task.generation.cancel()
            job.tasks.clear()
            self._end_cancelled(job)

    def _end_cancelled(self, job: Job) -> None:
        job.info.setdefault("completion_tokens", job.generated)
        job.info["cancelled"] = True
        try:
            job.check()  # stopped by a shutdown: the client gets 503, not a cut answer
        except ApiError as exc:
            job.emit("error", exc)
        self._finish(job)

    def _fail(self, job: Job, exc: BaseException) -> None:
        for task in job.tasks:
            if task.generation is not None:
                task.generation.cancel()
        job.tasks.clear()
        if isinstance(exc, Cancelled):  # a client that left needs no answer
            self._end_cancelled(job)
            return
        if isinstance(exc, ApiError):
            job.emit("error", exc)
        elif isinstance(exc, EftError):  # a remote role's engine failing is 502 (504: timeout)
            status = getattr(exc, "status", 400)
            job.emit("error", ApiError(status, str(exc),
                                       code="remote_failed" if status >= 500 else None))
        elif isinstance(exc, Exception):  # a bug: one log line, a 500 without a traceback
            self.log(f"internal error: {type(exc).__name__}: {exc}")
            job.emit("error", ApiError(500, f"internal error: {type(exc).__name__}"))
        else:  # KeyboardInterrupt or SystemExit in the worker thread: the server stops
            job.emit("error", ApiError(503, "the server is shutting down",
                                       code="shutting_down"))
        self._finish(job)

    def _finish(self, job: Job) -> None:
        if job in self.running:
            self.running.remove(job)
        job.emit("end")
        self.history = [*self.history[-31:], job]

    def _session_for(self, name: str | None) -> Session:
        """The session of preset ``name`` (no name: the server's default preset). Another
        preset than the loaded one loads beside it and replaces it only once loaded: a failed
        load leaves the old one serving."""
        name = name or self.initial.name
        if self.session is not None and self.session.preset.name == name:
            return self.session
        preset = self.check_model(name)
        assert preset is not None
        old = self.session
        if old is None:
            self.state, self.error = "loading", None
        self.log(f"loading preset {name!r}" + (f" beside {old.preset.name!r}" if old else ""))
        started = time.perf_counter()
        try:
            params = self.params if preset is self.initial else {}
            new = Session(preset, params=params, sampling=self.sampling, options=self.options,
                          progress=self.log)
        except EftError as exc:
            self.log(f"loading {name!r} failed: {exc}"
                     + (f"; still serving {old.preset.name!r}" if old else ""))
            if old is None:
                self.state, self.error = "error", str(exc)
            raise ApiError(503, f"could not load {name!r}: {exc}", param="model",
                           code="model_load_failed") from None
        self.session, self.state, self.error = new, "ready", None
        if old is not None:
            old.close()
            self.log(f"unloaded preset {old.preset.name!r}")
        self.log(f"preset {name!r} ready in {time.perf_counter() - started:.1f} s")
        return new


def request_settings(session: Session, job: Job) -> Settings:
    """The settings of ``job``'s calls: the session's defaults with the request's formula,
    knobs and sampler settings (stop strings are the handlers' business); 400 naming the
    field that is wrong."""
    s = session.defaults.replace(stop=())
    if job.knobs.formula is not None:
        try:
            s = s.replace(formula=parse_formula(job.knobs.formula, roles=tuple(session.models)))
        except EftError as exc:
            raise ApiError(400, str(exc), param="eft.formula") from None
    for name, value in job.knobs.params.items():
        where = job.knobs.sources.get(name, f"eft.{name}")
        if name not in s.formula.params:
            used = ", ".join(s.formula.params) or "no knob"
            raise ApiError(400, f"'{where}' sets {name}, which the formula {s.formula.text!r} "
                           f"does not use (it uses {used})", param=where)
        try:
            s = s.replace(params={name: value})
        except EftError as exc:
            raise ApiError(400, str(exc), param=where) from None
    s = s.replace(context_overflow=job.knobs.context_overflow)
    if job.sampling is None:
        return s
    try:
        session.check_sampling(job.sampling)
    except EftError as exc:  # the only check that needs the vocabulary
        raise ApiError(400, str(exc), param="logit_bias") from None
    return s.replace(sampling=job.sampling)
