"""Decode schedules: which models evaluate one after another, which at once, on how many threads.

A schedule is a sequence of stages run one after another; a stage is a set of lanes run at
once, each lane a list of models evaluated in turn; the thread budget is split evenly
between the lanes of a stage that have work. Three named shapes (:data:`NAMES`) are the
only :func:`candidates`: every run on record chose one of them, and every other split timed
lost to the best of them (``python benchmarks/custom_splits.py``; docs/benchmarks.md).
:func:`predict` gives a schedule's cost per step from the models' measured one-token decode
times at the thread counts the schedules use (:func:`thread_counts`); the session times
each candidate as real steps and keeps the fastest (:mod:`eft_local.schedule.tuning`).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

from eft_local.errors import EftError

NAMES = ("lanes", "large-first", "sequential")
"""Named schedules accepted by ``--schedule`` (besides ``auto``)."""


@dataclass(frozen=True)
class Schedule:
    """Stages of lanes of roles; see the module docstring."""

    name: str
    stages: tuple[tuple[tuple[str, ...], ...], ...]

    def describe(self) -> str:
        """E.g. ``large_base | small_ft + small_base`` (``|`` between stages, ``+`` between
        concurrent lanes, ``,`` between models of a lane)."""
        return " | ".join(" + ".join(",".join(lane) for lane in stage) for stage in self.stages)

    def roles(self) -> tuple[str, ...]:
        """Every role, in schedule order."""
        return tuple(r for stage in self.stages for lane in stage for r in lane)

    def threads(self, n_threads: int, active: Sequence[str] | None = None
                ) -> Iterator[tuple[tuple[tuple[str, ...], ...], int]]:
        """Each stage's non-empty lanes (only ``active`` roles) and the threads per lane."""
        for stage in self.stages:
            lanes = tuple(tuple(r for r in lane if active is None or r in active)
                          for lane in stage)
            lanes = tuple(lane for lane in lanes if lane)
            if lanes:
                yield lanes, max(1, n_threads // len(lanes))


def sequential(roles: Sequence[str]) -> Schedule:
    """Every model with the whole budget, one after another."""
    return Schedule("sequential", tuple(((r,),) for r in roles))


def lanes(sizes: Mapping[str, float], n_threads: int) -> Schedule:
    """Up to ``n_threads`` concurrent lanes balanced by cost (largest model first)."""
    n_lanes = max(1, min(n_threads, len(sizes)))
    groups: list[list[str]] = [[] for _ in range(n_lanes)]
    load = [0.0] * n_lanes
    for role in sorted(sizes, key=lambda r: -sizes[r]):
        i = load.index(min(load))
        groups[i].append(role)
        load[i] += max(sizes[role], 1e-12)
    return Schedule("lanes", (tuple(tuple(g) for g in groups if g),))


def large_first(sizes: Mapping[str, float], n_threads: int) -> Schedule:
    """The largest model with the whole budget, then the others in concurrent lanes."""
    large = max(sizes, key=lambda r: sizes[r])
    rest = {r: s for r, s in sizes.items() if r != large}
    stages = (((large,),),) + (lanes(rest, n_threads).stages if rest else ())
    return Schedule("large-first", stages)


def named(name: str, sizes: Mapping[str, float], n_threads: int) -> Schedule:
    """A schedule by name (``lanes``, ``large-first`` or ``sequential``)."""
    if name == "lanes":
        return lanes(sizes, n_threads)
    if name == "large-first":
        return large_first(sizes, n_threads)
    if name == "sequential":
        return sequential(sorted(sizes, key=lambda r: -sizes[r]))
    raise EftError(f"unknown schedule {name!r} (known: auto, {', '.join(NAMES)})")


def predict(schedule: Schedule, cost: Mapping[str, Mapping[int, float]], n_threads: int
            ) -> float:
    """Predicted seconds per decoding step: per stage, the slowest lane's sum of one-token
    decode times at its thread count (``cost[role][threads]``, nearest measured count)."""
    total = 0.0
    for stage_lanes, threads in schedule.threads(n_threads):
        total += max(sum(_at(cost[r], threads) for r in lane) for lane in stage_lanes)
    return total


def _at(c: Mapping[int, float], threads: int) -> float:
    lower = [t for t in c if t <= threads]
    return c[max(lower)] if lower else c[min(c)]


def candidates(sizes: Mapping[str, float], n_threads: int) -> list[Schedule]:
    """The named schedules, in :data:`NAMES` order."""
    return [named(n, sizes, n_threads) for n in NAMES]


def thread_counts(n_models: int, n_threads: int) -> list[int]:
    """The thread counts at which a named schedule runs a model: the whole budget, or its
    share when 2..``n_models`` lanes run at once; highest first."""
    return sorted({max(1, n_threads // k) for k in range(1, max(1, min(n_threads, n_models))
                                                          + 1)}, reverse=True)
