"""Remote roles beside the decode schedule: each evaluation in an I/O thread of its own.

A remote model's evaluation is a request and a wait, not CPU work: it takes no share of the
thread budget and no place among the schedule's lanes. :class:`RemoteIO` sends the
requests of a step before the local models evaluate (or, without overlap, waits for their
answers first) and collects them afterwards. When the local part fails (Ctrl-C, SIGTERM, an
error), the requests still under way are abandoned (:meth:`RemoteModel.abandon` shuts their
connections down) and their threads retired: the next step gets fresh threads at once,
never waits for an abandoned request. The threads are daemons: a process that is ending
never waits for one either.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Mapping
from concurrent.futures import Future
from typing import Any

import numpy as np

from eft_local.remote.http import Traffic, metered


def is_remote(model: object) -> bool:
    """True for a model that a remote engine evaluates."""
    return bool(getattr(model, "remote", False))


class RemoteIO:
    """I/O threads for the remote roles of one engine: one per role, replaced when its
    request is abandoned."""

    def __init__(self, n_roles: int) -> None:
        self.n_roles = max(1, n_roles)
        self.overlap = True
        """Requests run while the local models evaluate (False: answered before them)."""
        self._workers: dict[str, _Worker] = {}

    def start(self, calls: Mapping[str, Callable[[], np.ndarray]], models: Mapping[str, Any],
              traffic: dict[str, Traffic]) -> dict[str, Future]:
        """Run each role's evaluation in its I/O thread; what each model's network counters
        grow by is added to ``traffic[role]``."""
        pending = {}
        for role, call in calls.items():
            worker = self._workers.get(role)
            if worker is None:
                worker = self._workers[role] = _Worker(f"eft-remote-{role}")
            pending[role] = worker.submit(_metered, call, models[role].traffic, traffic, role)
        if not self.overlap:
            for future in pending.values():
                future.exception()  # wait; a failure is raised by finish()
        return pending

    @staticmethod
    def finish(pending: Mapping[str, Future]) -> dict[str, np.ndarray]:
        """The rows of each role (a failed request raises its error)."""
        return {role: future.result() for role, future in pending.items()}

    def abandon(self, pending: Mapping[str, Future], models: Mapping[str, Any]) -> None:
        """Give up on the requests still under way: their results will not count, their
        connections are shut down, and their threads are retired (the next step gets new
        ones)."""
        for role, future in pending.items():
            if future.done() or future.cancel():  # a request not started never will be
                continue
            models[role].abandon()
            worker = self._workers.pop(role, None)
            if worker is not None:
                worker.retire()

    def close(self) -> None:
        """Retire the threads (each ends when its request under way has)."""
        for worker in self._workers.values():
            worker.retire()
        self._workers.clear()


class _Worker:
    """One daemon thread running what it is given, in order."""

    def __init__(self, name: str) -> None:
        self._jobs: queue.SimpleQueue[tuple[Future, Callable[..., Any], tuple] | None] = (
            queue.SimpleQueue())
        threading.Thread(target=self._run, name=name, daemon=True).start()

    def submit(self, fn: Callable[..., Any], *args: Any) -> Future:
        future: Future = Future()
        self._jobs.put((future, fn, args))
        return future

    def retire(self) -> None:
        """End the thread after what it is doing."""
        self._jobs.put(None)

    def _run(self) -> None:
        while (job := self._jobs.get()) is not None:
            future, fn, args = job
            if not future.set_running_or_notify_cancel():
                continue
            try:
                future.set_result(fn(*args))
            except BaseException as exc:  # noqa: BLE001 - handed to whoever waits
                future.set_exception(exc)


def _metered(call: Callable[[], np.ndarray], counters: Traffic, sink: dict[str, Traffic],
             role: str) -> np.ndarray:
    with metered(counters, sink, role):
        return call()
