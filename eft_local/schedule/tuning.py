"""The decode schedule chosen by measurement, once per machine and model set (cached).

:func:`tune` times each model's one-token decode at the thread counts the named schedules
use (:func:`eft_local.schedule.shapes.thread_counts`) and its blocks with every thread,
predicts each named schedule's cost per step, then times them as real decoding steps and
keeps the fastest. The result, with the cost of the largest model alone at its best of those
thread counts (the baseline of the speed ratios in /stats), is cached in
``$XDG_CACHE_HOME/eft-local/schedules.json`` under a key made of everything the costs depend
on (:func:`cache_key`). A choice within :data:`CLEAR_MARGIN` of the runner-up is within the
noise of one measurement: it is measured again at the next loads, each schedule keeping its
fastest time over the measurements, until the margin is clear or :data:`MEASUREMENTS` have
been made (:meth:`Tuning.settled`). Where every model is offloaded to the GPU
(:func:`offloaded`) none of this runs: the session decodes the models one after another.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import statistics
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from eft_local import backend
from eft_local.engine import Engine, Model, file_size
from eft_local.errors import EftError
from eft_local.files import atomic_write, cache_dir
from eft_local.sampler import SamplerSettings
from eft_local.schedule import shapes as schedules
from eft_local.schedule.shapes import Schedule
from eft_local.schedule.watch import Watch

BLOCKS = (2, 4, 8)
"""Block lengths timed per model with every thread (speculative verification's costs)."""
ROUNDS = 3
"""Interleaved rounds of trial steps: the median step of a round, the fastest round
(preemption by other processes only ever adds time)."""
CLEAR_MARGIN = 0.10
"""A cached choice is final when the runner-up's measured step is at least this much slower.
Runs of the realistic sets in docs/benchmarks.md put the two fastest 0-9% apart (at 1B,
``large-first`` 68.4 ms, ``sequential`` 69.1), and the same models chose either from one
build to the next."""
MEASUREMENTS = 3
"""At most this many measurements (at successive loads) of a choice without a clear margin;
then the fastest over all of them is kept for good."""


@dataclass(frozen=True)
class Tuning:
    """A chosen schedule with what it was chosen from; seconds are per decoding step."""

    schedule: Schedule
    predicted: float
    measured: float
    alone: float  # the largest model alone at its best thread count
    alone_threads: int
    costs: Mapping[str, Mapping[int, float]]  # role -> threads -> one-token decode seconds
    blocks: Mapping[str, Mapping[int, float]]  # role -> block length -> seconds, all threads
    trials: Mapping[str, tuple[float, float]]  # schedule text -> (predicted, measured)
    cached: bool = False
    measurements: int = 1  # loads that measured these schedules (see :meth:`settled`)

    def ratios(self) -> tuple[float, float]:
        """Speed relative to the largest model alone at its best: (predicted, measured)."""
        return self.alone / self.predicted, self.alone / self.measured

    def margin(self) -> float:
        """How much slower the runner-up's measured step is than the chosen one's (0.1: 10%
        slower; infinite when nothing else was timed)."""
        chosen = self.schedule.describe()
        others = [m for k, (_p, m) in self.trials.items() if k != chosen]
        if not others or self.measured <= 0:
            return float("inf")
        return min(others) / self.measured - 1

    def settled(self) -> bool:
        """Final: a clear margin (:data:`CLEAR_MARGIN`), or :data:`MEASUREMENTS` made."""
        return self.margin() >= CLEAR_MARGIN or self.measurements >= MEASUREMENTS

    def verify_costs(self, drafter: str) -> dict[int, float]:
        """Predicted seconds to verify a block of each timed length: every other model
        evaluates the block, the drafter its last token only (with every thread, in turn)."""
        n_max = max(self.costs[drafter])
        lengths = sorted({n for c in self.blocks.values() for n in c})
        return {n: self.costs[drafter][n_max] + sum(c[n] for r, c in self.blocks.items()
                                                    if r != drafter and n in c)
                for n in lengths}

    def summary(self) -> str:
        """One line for people."""
        pred, meas = self.ratios()
        return (f"schedule {self.schedule.name} ({self.schedule.describe()}): predicted "
                f"{1e3 * self.predicted:.1f} ms/step, measured {1e3 * self.measured:.1f}; "
                f"x{pred:.2f} predicted, x{meas:.2f} measured against the largest model alone "
                f"({1e3 * self.alone:.1f} ms at {self.alone_threads} thread(s))"
                + (f"; {self.measurements} measurements" if self.measurements > 1 else "")
                + (" [cached]" if self.cached else ""))


def machine() -> str:
    """One line naming the CPU, its count, the OS and Python."""
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{name}, {os.cpu_count()} CPUs, {platform.system()}, Python {platform.python_version()}"


def can_tune(models: Mapping[str, Model], n_threads: int) -> bool:
    """Worth measuring: several models, several threads, and thread counts that can be set."""
    return (len(models) > 1 and n_threads > 1
            and all(hasattr(m, "set_threads") for m in models.values()))


def offloaded(models: Mapping[str, Model]) -> bool:
    """True when every model runs wholly on the GPU (its ``offloaded``): CPU threads hardly
    change a step's cost, so there is no thread split to measure or watch."""
    return bool(models) and all(getattr(m, "offloaded", False) for m in models.values())


def decode_costs(models: Mapping[str, Model], n_threads: int, *, repeats: int = 3,
                 context: int = 8) -> tuple[dict[str, dict[int, float]],
                                            dict[str, dict[int, float]]]:
    """Fastest seconds of each model's one-token decode at the thread counts the named
    schedules run it at (:func:`~eft_local.schedule.shapes.thread_counts`), and of its
    blocks of :data:`BLOCKS` tokens with every thread (how speculative decoding verifies:
    each model in turn with every thread). On 2 CPU cores blocks are far cheaper per token
    than single tokens, except 2-token blocks (docs/benchmarks.md). Leaves every cache
    empty."""
    prefix = [(7 * i + 3) % 200 + 5 for i in range(context)]
    costs: dict[str, dict[int, float]] = {}
    blocks: dict[str, dict[int, float]] = {}
    for role, model in models.items():
        model.rewind(0)
        model.eval(prefix)
        costs[role], blocks[role] = {}, {}
        for threads in schedules.thread_counts(len(models), n_threads):
            model.set_threads(threads)  # type: ignore[attr-defined]
            lengths = (1, *BLOCKS) if threads == n_threads else (1,)
            times: dict[int, list[float]] = {n: [] for n in lengths}
            for r in range(repeats + 1):
                for n in lengths:
                    model.rewind(context)
                    start = time.perf_counter()
                    model.eval([(11 * j + r) % 200 + 5 for j in range(n)], all_logits=n > 1)
                    if r:  # the first round warms up
                        times[n].append(time.perf_counter() - start)
            costs[role][threads] = min(times[1])
            if threads == n_threads:
                blocks[role] = {n: min(times[n]) for n in BLOCKS}
        model.rewind(0)
    return costs, blocks


def step_seconds(engine: Engine, schedule: Schedule, *, steps: int = 6, context: int = 8
                 ) -> float:
    """Median seconds of a whole decoding step of every model of ``engine`` under
    ``schedule``: evaluation, thread hand-offs and the sampler at temperature 1, as in
    a plain step of :mod:`eft_local.batch` (the engine's own schedule is restored; caches are left
    empty)."""
    old = engine.schedule
    engine.set_schedule(schedule)
    settings = SamplerSettings(temperature=1.0, seed=0)
    weights = np.ones(len(engine.roles), dtype=np.float32)
    try:
        prefix = [(5 * i + 1) % 200 + 5 for i in range(context)]
        rows = engine.row_buffer[:, 0]
        engine.evaluate_each(0, prefix, prefill=True, out=rows)
        times = []
        for r in range(steps + 1):
            start = time.perf_counter()
            engine.evaluate_each(context + r, [(13 * r) % 200 + 5], out=rows)
            engine.choose(rows, weights, settings, context + r)
            if r:  # the first step sets the schedule's threads up
                times.append(time.perf_counter() - start)
        return statistics.median(times)
    finally:
        engine.set_schedule(old)
        for model in engine.models.values():
            model.rewind(0)


def tune(engine: Engine, *, say: Callable[[str], None] = lambda _m: None) -> Tuning:
    """Measure and choose the decode schedule for ``engine``'s models (not cached): each
    named schedule timed as real steps in :data:`ROUNDS` interleaved rounds, the fastest
    round of each; the fastest schedule wins."""
    n = engine.n_threads
    say(f"note: measuring decode schedules on {n} threads (a few seconds; kept for these "
        "models on this machine)")
    costs, blocks = decode_costs(engine.models, n)
    sizes = {r: c[n] for r, c in costs.items()}
    trial = schedules.candidates(sizes, n)
    trials: dict[str, tuple[float, float]] = {}
    for _ in range(ROUNDS):  # interleaved rounds: each schedule's fastest counts
        for s in trial:
            t = step_seconds(engine, s)
            old = trials.get(s.describe())
            trials[s.describe()] = (schedules.predict(s, costs, n),
                                    t if old is None else min(old[1], t))
    best = min(trial, key=lambda s: trials[s.describe()][1])
    large = max(sizes, key=lambda r: sizes[r])
    threads, alone = min(costs[large].items(), key=lambda kv: kv[1])
    return Tuning(schedule=best, predicted=trials[best.describe()][0],
                  measured=trials[best.describe()][1], alone=alone, alone_threads=threads,
                  costs=costs, blocks=blocks, trials=trials)


def combined(old: Tuning, new: Tuning) -> Tuning:
    """Two measurements of the same models as one: each schedule's and each model's fastest
    time in either (load on the machine only ever adds time); the fastest schedule wins."""
    trials = dict(old.trials)
    for key, (predicted, measured) in new.trials.items():
        trials[key] = (predicted, min(measured, old.trials.get(key, (0.0, measured))[1]))
    best = min((new.schedule, old.schedule), key=lambda s: trials[s.describe()][1])

    def fastest(a: Mapping[str, Mapping[int, float]], b: Mapping[str, Mapping[int, float]]
                ) -> dict[str, dict[int, float]]:
        return {r: {n: min(v, a.get(r, {}).get(n, v)) for n, v in c.items()}
                for r, c in b.items()}

    alone, threads = min((old.alone, old.alone_threads), (new.alone, new.alone_threads))
    return Tuning(schedule=best, predicted=trials[best.describe()][0],
                  measured=trials[best.describe()][1], alone=alone, alone_threads=threads,
                  costs=fastest(old.costs, new.costs), blocks=fastest(old.blocks, new.blocks),
                  trials=trials, measurements=old.measurements + 1)


def watch(engine: Engine, tuning: Tuning) -> Watch:
    """A :class:`~eft_local.schedule.watch.Watch` over the named schedules timed at load,
    starting from the chosen one with the step times measured then."""
    n = engine.n_threads
    sizes = {r: c.get(n, min(c.values())) for r, c in tuning.costs.items()}
    chosen = tuning.schedule.describe()
    others = [s for s in schedules.candidates(sizes, n) if s.describe() != chosen]
    return Watch([tuning.schedule, *others],
                 {k: measured for k, (_p, measured) in tuning.trials.items()})


# -- the cache -----------------------------------------------------------------------------
def cache_path() -> Path:
    """$XDG_CACHE_HOME/eft-local/schedules.json (~/.cache by default)."""
    return cache_dir("schedules.json")


def cache_key(models: Mapping[str, Model], n_threads: int) -> str:
    """What measured costs depend on: the CPU, the thread budget, llama.cpp's version and
    build features (:func:`eft_local.backend.build_info`), and each model's file (path,
    size, modification time), GPU layers, context and batch size."""
    parts = [machine(), str(n_threads), backend.build_info()]
    for role in sorted(models):
        m = models[role]
        path = Path(m.path)
        load = (f"n_gpu_layers={getattr(m, 'n_gpu_layers', 0)} n_ctx={m.n_ctx} "
                f"n_batch={getattr(m, 'n_batch', None)}")
        try:
            st = path.stat()
            parts.append(f"{role}={path.resolve()}:{st.st_size}:{st.st_mtime_ns} {load}")
        except OSError:
            parts.append(f"{role}={path} {load}")
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:32]


def _read_cache() -> dict:
    try:
        data = json.loads(cache_path().read_text())
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def load_cached(engine: Engine) -> Tuning | None:
    """The cached tuning for these models on this machine, if any (and still valid)."""
    entry = _read_cache().get(cache_key(engine.models, engine.n_threads))
    try:
        s = Schedule(entry["name"], tuple(tuple(tuple(lane) for lane in stage)
                                          for stage in entry["stages"]))
        if sorted(s.roles()) != sorted(engine.roles):
            return None
        return Tuning(schedule=s, predicted=entry["predicted"], measured=entry["measured"],
                      alone=entry["alone"], alone_threads=entry["alone_threads"],
                      costs={r: {int(t): v for t, v in c.items()}
                             for r, c in entry["costs"].items()},
                      blocks={r: {int(n): v for n, v in c.items()}
                              for r, c in entry["blocks"].items()},
                      trials={k: tuple(v) for k, v in entry["trials"].items()},  # type: ignore[misc]
                      cached=True, measurements=int(entry.get("measurements", 1)))
    except (TypeError, KeyError, ValueError, AttributeError):
        return None


def save(engine: Engine, tuning: Tuning) -> None:
    """Store ``tuning`` for these models on this machine (best effort)."""
    data = _read_cache()
    data[cache_key(engine.models, engine.n_threads)] = {
        "name": tuning.schedule.name, "stages": tuning.schedule.stages,
        "predicted": tuning.predicted, "measured": tuning.measured, "alone": tuning.alone,
        "alone_threads": tuning.alone_threads, "costs": tuning.costs,
        "blocks": tuning.blocks, "trials": tuning.trials,
        "measurements": tuning.measurements}
    path = cache_path()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, json.dumps(data, indent=1), what="the schedule cache")
    except (OSError, EftError):
        pass


def tuned(engine: Engine, *, say: Callable[[str], None] = lambda _m: None,
          retune: bool = False) -> Tuning:
    """The cached tuning when it is settled (:meth:`Tuning.settled`); else a new one, combined
    with the unsettled cached one (:func:`combined`), then cached."""
    found = None if retune else load_cached(engine)
    if found is not None and found.settled():
        return found
    if found is None:
        fresh = tune(engine, say=say)
    else:
        say(f"note: measuring decode schedules again ({found.measurements + 1} of at most "
            f"{MEASUREMENTS}): {found.schedule.name} was {100 * found.margin():.0f}% faster "
            f"than the next, within the {100 * CLEAR_MARGIN:.0f}% of noise")
        fresh = combined(found, tune(engine))
    save(engine, fresh)
    return fresh


def choose(engine: Engine, name: str, *, parallel: bool,
           say: Callable[[str], None] = lambda _m: None) -> tuple[Tuning | None, str]:
    """Set ``engine``'s decode schedule for the schedule ``name`` (``auto`` or a named one):
    measured (cached per machine and model set) and watched, or named; returns the tuning
    (None: not measured) and why, in words."""
    eng = engine
    sizes = {r: float(file_size(eng.models[r])) for r in eng.local_roles}
    eng.remote.overlap = name != "sequential"
    if eng.remote_roles and name == "auto":  # tuning and the watch time local models
        name = "lanes" if parallel else "sequential"
    if name == "auto" and offloaded(eng.models):
        eng.set_schedule(schedules.named("sequential", sizes, eng.n_threads))
        reason = ("every model is offloaded to the GPU: one after another, CPU threads not "
                  "measured or watched")
        say(f"schedule sequential: {reason}")
        return None, reason
    if name == "auto" and can_tune(eng.models, eng.n_threads):
        found = tuned(eng, say=say)
        eng.set_schedule(found.schedule)
        eng.watch = watch(eng, found)
        say(found.summary())
        return found, ("measured at load" + (" (cached)" if found.cached else "")
                       + ", watched while decoding")
    if name != "auto":
        eng.set_schedule(schedules.named(name, sizes, eng.n_threads))
        return None, f"named ({name})"
    return None, "nothing to measure (one model, one thread, or fixed threads)"


def schedule_stats(engine: Engine, found: Tuning | None, reason: str) -> dict[str, object]:
    """The decode schedule, why, the watch's probes and switches, and, when it was measured,
    its predicted and measured speed against the largest model alone at its best."""
    out: dict[str, object] = {"schedule": engine.schedule.name,
                              "schedule_stages": engine.schedule.describe(),
                              "schedule_reason": reason, "threads": engine.n_threads}
    w = engine.watch
    if w is not None:
        out.update(schedule_probes=w.probes, schedule_switches=w.switches)
    if found is not None:
        predicted, measured = found.ratios()
        out.update(schedule_predicted_ratio=predicted, schedule_measured_ratio=measured,
                   schedule_step_ms=1e3 * found.measured, large_alone_ms=1e3 * found.alone,
                   large_alone_threads=found.alone_threads)
    return out
