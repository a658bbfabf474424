"""Does any split of the models into stages and lanes beat the three named schedules?

    python benchmarks/custom_splits.py [--dir benchmarks/out] [--rounds 5] [--threads N]

eft-local chooses among the named schedules only (``lanes``, ``large-first``, ``sequential``;
:mod:`eft_local.schedule.shapes`). Until issue 18 it also enumerated every other split of the
models into stages of at most N concurrent lanes and timed those predicted to win; no run
ever chose one. This script keeps that enumeration as evidence: for each realistic set
(written by ``eft-local bench --realistic``) it times every split as whole decoding steps
(evaluation, thread hand-offs and the sampler: :func:`eft_local.schedule.tuning.step_seconds`)
in ``--rounds`` interleaved rounds and prints each split's fastest round, the named ones
marked, the fastest first.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Iterator, Sequence
from pathlib import Path

from eft_local.schedule import shapes
from eft_local.schedule.tuning import machine, step_seconds
from eft_local.session import LoadOptions, load_session

SETS = {"1B + 2 x 135M": "large_1b", "360M + 2 x 135M": "large_360m"}


def partitions(items: list[str]) -> Iterator[list[list[str]]]:
    """Every partition of ``items`` into non-empty groups."""
    if not items:
        yield []
        return
    first, rest = items[0], items[1:]
    for part in partitions(rest):
        for i in range(len(part)):
            yield part[:i] + [[first, *part[i]]] + part[i + 1:]
        yield [[first], *part]


def splits(roles: Sequence[str], n_threads: int) -> list[shapes.Schedule]:
    """Every split into stages (stage order does not change the cost) of at most
    ``n_threads`` concurrent lanes each; one lane of several models is the same as those
    models in stages of their own, so each lane of a multi-model stage is kept apart."""
    found, seen = [], set()
    for stages in partitions(list(roles)):
        per_stage = [[lanes for lanes in partitions(st)
                      if len(lanes) <= n_threads and (len(lanes) > 1 or len(st) == 1)]
                     for st in stages]
        combos: list[list[list[list[str]]]] = [[]]
        for options in per_stage:
            combos = [c + [o] for c in combos for o in options]
        for combo in combos:
            s = shapes.Schedule("split", tuple(tuple(tuple(lane) for lane in lanes)
                                               for lanes in combo))
            if key(s) not in seen:
                seen.add(key(s))
                found.append(s)
    return found


def key(s: shapes.Schedule) -> tuple:
    """The same split whatever the order of stages, lanes and models."""
    return tuple(sorted(tuple(sorted(tuple(sorted(lane)) for lane in stage))
                        for stage in s.stages))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dir", type=Path, default=Path("benchmarks/out"))
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    args = ap.parse_args()
    n = args.threads
    print(f"machine: {machine()}; thread budget {n}; load average "
          f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    for title, large in SETS.items():
        d = args.dir
        s = load_session(models=[f"large_base={d / f'{large}.q8_0.gguf'}",
                                 f"small_ft={d / 'small_ft.q8_0.gguf'}",
                                 f"small_base={d / 'small_base.q8_0.gguf'}"],
                         options=LoadOptions(n_ctx=256, n_threads=n, schedule="sequential",
                                             speculative=False))
        try:
            sizes = {r: float(Path(m.path).stat().st_size) for r, m in s.models.items()}
            named = {key(shapes.named(x, sizes, n)): x for x in shapes.NAMES}
            found = splits(sorted(sizes, key=lambda r: -sizes[r]), n)
            best: dict[str, float] = {}
            for _ in range(args.rounds):
                for sched in found:
                    t = step_seconds(s.engine, sched)
                    best[sched.describe()] = min(best.get(sched.describe(), t), t)
            print(f"\n{title}: {len(found)} splits on {n} thread(s), fastest of "
                  f"{args.rounds} interleaved rounds (median step of a round), ms per step")
            for sched in sorted(found, key=lambda x: best[x.describe()]):
                mark = named.get(key(sched), "")
                print(f"  {1e3 * best[sched.describe()]:7.1f}  {sched.describe():40} {mark}")
        finally:
            s.close()
    print(f"\nload average now {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
