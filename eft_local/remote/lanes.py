"""Remote roles beside the decode schedule: each evaluation in an I/O thread of its own.

A remote model's evaluation is a request and a wait, not CPU work: it takes no share of the
thread budget and no place among the schedule's lanes. :class:`RemoteLanes` sends the
requests of a step before the local models evaluate (or, without overlap, waits for their
answers first) and collects them afterwards; when the local part fails (Ctrl-C, an error),
the requests still under way are abandoned (:meth:`RemoteModel.abandon`), not waited for.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import numpy as np

from eft_local.remote.http import Traffic, metered


def is_remote(model: object) -> bool:
    """True for a model that a remote engine evaluates."""
    return bool(getattr(model, "remote", False))


class RemoteLanes:
    """I/O threads for the remote roles of one engine."""

    def __init__(self, n_roles: int) -> None:
        self.n_roles = max(1, n_roles)
        self.overlap = True
        """Requests run while the local models evaluate (False: answered before them)."""
        self._pool: ThreadPoolExecutor | None = None

    def start(self, calls: Mapping[str, Callable[[], np.ndarray]], models: Mapping[str, Any],
              traffic: dict[str, Traffic]) -> dict[str, Future]:
        """Run each role's evaluation in an I/O thread; what each model's network counters
        grow by is added to ``traffic[role]``."""
        if not calls:
            return {}
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self.n_roles, thread_name_prefix="eft-remote")
        pending = {role: self._pool.submit(_metered, call, models[role].traffic, traffic, role)
                   for role, call in calls.items()}
        if not self.overlap:
            for future in pending.values():
                future.exception()  # wait; a failure is raised by finish()
        return pending

    @staticmethod
    def finish(pending: Mapping[str, Future]) -> dict[str, np.ndarray]:
        """The rows of each role (a failed request raises its error)."""
        return {role: future.result() for role, future in pending.items()}

    @staticmethod
    def abandon(pending: Mapping[str, Future], models: Mapping[str, Any]) -> None:
        """Give up on the requests still under way: their results will not count."""
        for role, future in pending.items():
            if not future.done():
                models[role].abandon()

    def close(self) -> None:
        """Stop the threads (a request under way ends on its own timeout)."""
        if self._pool is not None:
            self._pool.shutdown(wait=False)
            self._pool = None


def _metered(call: Callable[[], np.ndarray], counters: Traffic, sink: dict[str, Traffic],
             role: str) -> np.ndarray:
    with metered(counters, sink, role):
        return call()
