"""Keeping the fastest decode schedule while decoding.

The schedule chosen at load (:mod:`eft_local.schedule.tuning`) is measured once, in a few
steps, under the load of that moment. :class:`Watch` times every plain decoding step
(evaluation, thread hand-offs and the sampler) under the current schedule; when the median
of a window is clearly slower than another candidate's last measured time, or after
:attr:`Watch.every` steps anyway, it tries each other candidate for a few steps and keeps
the fastest. A probe that changes nothing doubles the steps until the next one (up to
:attr:`Watch.most`): a machine that stays as it is pays less and less for the checks. A
step's text never depends on the schedule, only its speed does.
"""

from __future__ import annotations

import statistics
from collections.abc import Mapping, Sequence

from eft_local.schedule.shapes import Schedule


class Watch:
    """Chooses among ``options`` (the first is in use) by the step times it is shown.

    ``expected`` holds each option's seconds per step as measured at load (by its
    :meth:`Schedule.describe` text); steps are keyed by the set of evaluated models too,
    since a schedule's cost depends on which models run.
    """

    def __init__(self, options: Sequence[Schedule], expected: Mapping[str, float], *,
                 window: int = 32, probe: int = 6, slack: float = 1.2, every: int = 128,
                 most: int = 2048, margin: float = 0.05) -> None:
        if not options:
            raise ValueError("a watch needs at least one schedule")
        self.options = list(options)
        self.current = self.options[0]
        self.window, self.probe, self.slack, self.every, self.most, self.margin = (
            window, probe, slack, every, most, margin)
        self._interval = every
        self._full = tuple(sorted(self.current.roles()))
        self._expected: dict[tuple, float] = {(self._full, k): v for k, v in expected.items()}
        self._active = self._full
        self._times: list[float] = []
        self._queue: list[Schedule] = []
        self._since = 0
        self._probing = False
        self._home: Schedule | None = None
        self.switches = 0
        """Times a probe ended on another schedule than the one it left."""
        self.probes = 0

    def expected(self, schedule: Schedule) -> float | None:
        """Last measured seconds per step of ``schedule`` for the current models."""
        return self._expected.get((self._active, schedule.describe()))

    def models(self, active: Sequence[str]) -> None:
        """The evaluated models changed: steps from now on are not comparable with before."""
        key = tuple(sorted(active))
        if key != self._active:
            self._active, self._times = key, []

    def observe(self, seconds: float) -> Schedule | None:
        """Record one decoding step under :attr:`current`; returns the schedule to use from
        the next step on when it changes, else None."""
        self._times.append(seconds)
        if self._probing:
            if len(self._times) < self.probe:
                return None
            self._record(self._times[1:])  # the first step after a switch sets threads up
            return self._next_probe()
        if len(self._times) < self.window:
            return None
        self._since += len(self._times)
        now = self._record(self._times)
        others = [self.expected(s) for s in self.options if s is not self.current]
        slower = any(t is None or now > self.slack * t for t in others)
        if len(self.options) > 1 and (slower or self._since >= self._interval):
            self._since, self.probes = 0, self.probes + 1
            self._home = self.current
            self._queue = [s for s in self.options if s is not self.current]
            self._probing = True
            return self._next_probe()
        return None

    def settle(self) -> Schedule:
        """Leave a probe unfinished (decoding goes elsewhere for a while, to speculative
        blocks say): back to the schedule it left; returns the schedule to use."""
        if self._probing:
            self._probing, self._queue, self._times = False, [], []
            self.current = self._home or self.current
        return self.current

    def _record(self, times: Sequence[float]) -> float:
        median = statistics.median(times)
        self._expected[(self._active, self.current.describe())] = median
        self._times = []
        return median

    def _next_probe(self) -> Schedule | None:
        if self._queue:
            self.current = self._queue.pop(0)
            return self.current
        self._probing = False
        home = self._home or self.current
        best = min(self.options, key=lambda s: self.expected(s) or float("inf"))
        home_t, best_t = self.expected(home), self.expected(best)
        if best is not home and home_t is not None and best_t is not None and (
                best_t > (1.0 - self.margin) * home_t):
            best = home  # a change must pay clearly, not by noise
        if best is not home:
            self.switches += 1
            self._interval = self.every
        else:
            self._interval = min(self.most, 2 * self._interval)
        self.current = best
        return best
