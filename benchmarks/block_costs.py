"""Print what a verification block of n tokens costs for each GGUF file given.

    python benchmarks/block_costs.py benchmarks/out/*.f16.gguf --threads 1

Each model evaluates 64 context tokens, then blocks of n tokens with a logit row for every
position (as speculative verification does); the best of ``--repeats`` times is printed,
with its ratio to one token. A figure to read, not a test.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from eft_local.backend import LlamaModel
from eft_local.bench import block_costs, machine

SIZES = (1, 2, 3, 5, 9, 17)


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
            costs = block_costs({path.name: model}, SIZES, context=64, repeats=args.repeats)
        finally:
            model.close()
        for name, c in costs.items():
            print(f"{name:28} " + "  ".join(f"n={n}: {1e3 * s:7.1f} ({s / c[1]:4.1f}x)"
                                            for n, s in c.items()))


if __name__ == "__main__":
    main()
