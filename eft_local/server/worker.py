"""The server's engine room: one worker thread, one loaded model set, a FIFO of jobs.

Every request becomes a :class:`Job` run by the worker thread, one at a time and in arrival
order, so the models' KV caches carry over from one request to the next (a resent chat pays
only for its new suffix). A job reports back through events that the web side reads from an
asyncio queue; setting :attr:`Job.cancelled` stops a generation before its next token. Each
job's knobs (beta, lam, formula, sampler settings) become one
:class:`~eft_local.settings.Settings` value for its calls: the session's own defaults are
never touched, so nothing can leak into the next request. No web framework is imported here
(see :mod:`eft_local.server.app`); the work of each endpoint is in
:mod:`eft_local.server.handlers`.
"""

from __future__ import annotations

import asyncio
import contextlib
import queue
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from eft_local import hub
from eft_local.config import Config, Preset
from eft_local.errors import Cancelled, EftError
from eft_local.formula import parse_formula
from eft_local.interrupts import cancel_on
from eft_local.server.protocol import ApiError, Knobs
from eft_local.session import LoadOptions, SamplerSettings, Session, Settings

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
    sampling: SamplerSettings | None = None
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

    def emit(self, kind: str, data: Any = None) -> None:
        """Hand one event to the web side (thread-safe; dropped once its loop closed)."""
        loop, events = self.loop, self.events
        if loop is None or events is None or loop.is_closed():
            return
        with contextlib.suppress(RuntimeError):  # the loop closed in between (it stopped)
            loop.call_soon_threadsafe(events.put_nowait, (kind, data))

    def cancel(self, reason: str = "client") -> None:
        """Stop before the next token (the client went away, or the server stops)."""
        if not self.cancelled.is_set():
            self.generated_at_cancel = self.generated
            self.cancel_reason = reason
            self.cancelled.set()

    def check(self) -> None:
        """Raise 503 when the server is stopping this job (a gone client needs no answer)."""
        if self.cancel_reason == "shutdown":
            raise ApiError(503, "the server is shutting down", code="shutting_down")


class Worker:
    """Owns the loaded session and the worker thread that runs jobs in FIFO order."""

    def __init__(self, config: Config | None, preset: Preset, *, pinned: bool,
                 params: Mapping[str, float] | None = None,
                 sampling: SamplerSettings | None = None, options: LoadOptions | None = None,
                 max_queue: int = 16, log: Log = print) -> None:
        """``options.download`` says whether a preset whose hub files are missing may be
        downloaded (``serve --allow-download``); without it only presets whose files are
        present are listed and loaded."""
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
        self._queue: queue.Queue[Job | None] = queue.Queue()
        self._waiting = 0
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._loop, name="eft-engine", daemon=True)
        self.current: Job | None = None
        """The job the worker runs now."""
        self.closing = False
        """Set by :meth:`close`: new jobs get 503."""

    # -- lifecycle ------------------------------------------------------------------------
    def start(self) -> None:
        """Start the worker; it loads the initial preset first unless one was adopted."""
        self._thread.start()
        if self.session is None:
            self._queue.put(Job(work=lambda _s, _j: None, preset=self.initial.name))

    def adopt(self, session: Session) -> None:
        """Serve an already loaded session (before :meth:`start`)."""
        self.session, self.state = session, "ready"

    def close(self) -> None:
        """Begin to stop (thread-safe): refuse new jobs, answer the waiting ones 503 and stop
        the running one before its next token (503 to its client)."""
        self.closing = True
        while True:
            try:
                job = self._queue.get_nowait()
            except queue.Empty:
                break
            if job is not None:
                self._refuse(job)
        current = self.current
        if current is not None:
            current.cancel("shutdown")

    def _refuse(self, job: Job) -> None:
        with self._lock:
            self._waiting = max(0, self._waiting - 1)
        job.cancel("shutdown")
        job.emit("error", ApiError(503, "the server is shutting down", code="shutting_down"))
        job.emit("end")

    def stop(self) -> None:
        """Close, let the worker finish, and free the models."""
        self.close()
        if self._thread.is_alive():
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
        """Jobs queued and not started."""
        return self._waiting

    def submit(self, job: Job) -> None:
        """Queue ``job`` (FIFO); 503 when :attr:`max_queue` jobs already wait or the server
        is stopping."""
        if self.closing:
            raise ApiError(503, "the server is shutting down", code="shutting_down")
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
            if self.closing:
                self._refuse(job)
                continue
            with self._lock:
                self._waiting = max(0, self._waiting - 1)
            self.current = job
            try:
                self._run(job)
            finally:
                self.current = None

    def _run(self, job: Job) -> None:
        try:
            if job.cancelled.is_set():  # its client left while it waited: skip it
                job.check()
                return
            job.started = True
            session = self._session_for(job.preset)
            job.settings = request_settings(session, job)
            with cancel_on(job.cancelled):  # long grammar work stops within one call
                job.work(session, job)
        except Cancelled:  # a client that left needs no answer; a shutdown answers 503
            if job.cancel_reason == "shutdown":
                job.emit("error", ApiError(503, "the server is shutting down",
                                           code="shutting_down"))
        except ApiError as exc:
            job.emit("error", exc)
        except EftError as exc:  # a remote role's engine failing is 502 (504: timeout)
            status = getattr(exc, "status", 400)
            job.emit("error", ApiError(status, str(exc),
                                       code="remote_failed" if status >= 500 else None))
        except Exception as exc:  # a bug: one log line, a 500 without a traceback
            self.log(f"internal error: {type(exc).__name__}: {exc}")
            job.emit("error", ApiError(500, f"internal error: {type(exc).__name__}"))
        finally:
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
    return s.replace(sampling=job.sampling) if job.sampling is not None else s
