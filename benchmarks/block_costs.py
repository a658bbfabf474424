"""Print what a verification block of n tokens costs for each GGUF file given.

    python benchmarks/block_costs.py benchmarks/out/*.f16.gguf --threads 1

Each model evaluates 64 context tokens, then blocks of n tokens with a logit row for every
position (as speculative verification does); the best of ``--repeats`` times is printed,
with its ratio to one token. A figure to read, not a test.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

from eft_local.backend import LlamaModel
from eft_local.schedule.tuning import machine

SIZES = (1, 2, 3, 5, 9, 17)


def block_costs(model: LlamaModel, sizes: tuple[int, ...], *, context: int, repeats: int
                ) -> dict[int, float]:
    """Median seconds to evaluate a block of n tokens (every row) after ``context`` tokens."""
    model.eval([(7 * i + 3) % 200 + 5 for i in range(context)])
    out = {}
    for n in sizes:
        times = []
        for r in range(repeats + 1):
            model.rewind(context)
            start = time.perf_counter()
            model.eval([(11 * j + r) % 200 + 5 for j in range(n)], all_logits=True)
            times.append(time.perf_counter() - start)
        out[n] = statistics.median(times[1:])
    return out


def main() -> None:
    """Parse arguments, load each model in turn, print its block costs."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="+", type=Path)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    print(f"machine: {machine()}; load average {os.getloadavg()[0]:.1f}; "
          f"{args.threads} thread(s); ms for n tokens (x one token)")
    for path in args.models:
        model = LlamaModel(path, n_ctx=512, n_threads=args.threads)
        try:
            c = block_costs(model, SIZES, context=64, repeats=args.repeats)
        finally:
            model.close()
        print(f"{path.name:28} " + "  ".join(f"n={n}: {1e3 * s:7.1f} ({s / c[1]:4.1f}x)"
                                             for n, s in c.items()))


if __name__ == "__main__":
    main()
