"""Does the decode schedule follow the machine? Idle, then busy, then idle again.

    python benchmarks/live_watch.py [--large 1b|360m] [--busy 1] [--tokens 150]

Loads the realistic 1B (or 360M) + 2 x 135M random-weight set that ``eft-local bench
--realistic`` writes into benchmarks/out, with the schedule chosen at load (``auto``), and
generates three times: on the machine as it is, while ``--busy`` processes spin on the CPU,
and after they stop (twice as many tokens). Prints each phase's median ms per token, the
schedules its steps used and the watch's probes and switches so far.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

from eft_local.sampler import SamplerSettings
from eft_local.session import LoadOptions, Session, load_session


def phase(s: Session, label: str, n: int) -> None:
    times, used = [], []
    last = time.perf_counter()
    for chunk in s.stream([5 + i for i in range(8)], max_tokens=n):
        if chunk.step is not None:
            now = time.perf_counter()
            times.append(now - last)
            last = now
            used.append(s.engine.schedule.name)
    w = s.engine.watch
    counts = ", ".join(f"{k} {used.count(k)}" for k in dict.fromkeys(used))
    print(f"{label}: {1e3 * statistics.median(times[1:]):.1f} ms/token; steps per schedule: "
          f"{counts}; watch so far: {w.probes if w else 0} probe(s), "
          f"{w.switches if w else 0} switch(es)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--large", choices=("1b", "360m"), default="1b")
    ap.add_argument("--busy", type=int, default=1)
    ap.add_argument("--tokens", type=int, default=150)
    ap.add_argument("--dir", type=Path, default=Path("benchmarks/out"))
    args = ap.parse_args()
    d = args.dir
    s = load_session(models=[f"large_base={d / f'large_{args.large}.q8_0.gguf'}",
                             f"small_ft={d / 'small_ft.q8_0.gguf'}",
                             f"small_base={d / 'small_base.q8_0.gguf'}"],
                     options=LoadOptions(n_ctx=1024, schedule="auto", speculative=False),
                     sampling=SamplerSettings(temperature=1.0, seed=1), progress=print)
    allowed = s.engine.allowed.copy()
    allowed[list(s.report.vocabs[s.preset.template_role].eog)] = False  # equal lengths
    s.engine.allowed = allowed
    try:
        phase(s, "as the machine is", args.tokens)
        hogs = [subprocess.Popen([sys.executable, "-c", "while True: pass"])
                for _ in range(args.busy)]
        try:
            phase(s, f"{args.busy} busy process(es)", args.tokens)
        finally:
            for h in hogs:
                h.kill()
        phase(s, "busy processes stopped", 2 * args.tokens)
    finally:
        s.close()


if __name__ == "__main__":
    main()
