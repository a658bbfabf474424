"""Decode schedules: which models evaluate one after another, which at once, on how many threads.

A schedule is a sequence of stages run one after another; a stage is a set of lanes run at
once, each lane a list of models evaluated in turn; the thread budget is split evenly
between the lanes of a stage that have work. Three named shapes and every other one are
enumerated by :func:`candidates`; :func:`predict` gives a schedule's cost per token from the
models' measured one-token decode times at each thread count, and the session picks the
cheapest after measuring (:mod:`eft_local.schedule.tuning`).
"""

from __future__ import annotations

import itertools
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
    """The named schedules, then every other split of the models into stages of at most
    ``n_threads`` concurrent lanes (up to 5 models: small enough to enumerate)."""
    out = [named(n, sizes, n_threads) for n in NAMES]
    seen = {_key(s) for s in out}
    roles = sorted(sizes, key=lambda r: -sizes[r])
    if len(roles) > 5:
        return out
    for stages in _stage_splits(roles, n_threads):
        s = Schedule("custom", stages)
        if _key(s) not in seen:
            seen.add(_key(s))
            out.append(s)
    return out


def _key(s: Schedule) -> tuple:
    return tuple(sorted(tuple(sorted(tuple(sorted(lane)) for lane in stage))
                        for stage in s.stages))


def _stage_splits(roles: Sequence[str], n_threads: int
                  ) -> Iterator[tuple[tuple[tuple[str, ...], ...], ...]]:
    """Unordered splits into stages (stage order does not change the cost), each stage
    split into at most ``n_threads`` lanes."""
    for stages in _partitions(list(roles)):
        # one lane of several models is the same as those models in stages of their own
        per_stage = [[lanes_ for lanes_ in _partitions(st)
                      if len(lanes_) <= n_threads and (len(lanes_) > 1 or len(st) == 1)]
                     for st in stages]
        for combo in itertools.product(*per_stage):
            yield tuple(tuple(tuple(lane) for lane in lanes_) for lanes_ in combo)


def _partitions(items: list[str]) -> Iterator[list[list[str]]]:
    if not items:
        yield []
        return
    first, rest = items[0], items[1:]
    for part in _partitions(rest):
        for i in range(len(part)):
            yield part[:i] + [[first, *part[i]]] + part[i + 1:]
        yield [[first], *part]
