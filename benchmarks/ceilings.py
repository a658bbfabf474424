"""What two cores allow: single-model costs that bound plain EFT and time to first token.

    python benchmarks/ceilings.py [--dir benchmarks/out] [--prompt 500]

For each model of the realistic sets (written by ``eft-local bench --realistic``): llama.cpp
alone through its low-level API (``backend.raw_speed``), one-token decode (median ms) and a
prompt (seconds) at 1 and 2 threads. Then, for large + 2 x small, the bounds these costs
set on 2 cores (nothing else running):

- decode, lanes: the large model on one core while the small ones share the other, so a step
  costs at least the large model's 1-thread decode;
- decode, large-first: the large model's 2-thread decode plus one small model's 1-thread
  decode (the two run at once);
- decode, all work spread: the total work of a step spread perfectly over both cores, each
  model at its most efficient thread count. A lower bound on a step's cost that one stream
  cannot reach when one model's one-thread decode outlasts the rest (llama.cpp cannot split
  one token's decode between one-thread and two-thread parts);
- first token: the prompt's total work spread over both cores, and each model with every
  thread in turn (what eft-local does).

Each bound is printed as a speed ratio against the large model alone at its best.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from eft_local.backend import raw_speed

SETS = {"1B + 2 x 135M": "large_1b", "360M + 2 x 135M": "large_360m"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dir", type=Path, default=Path("benchmarks/out"))
    ap.add_argument("--prompt", type=int, default=500)
    args = ap.parse_args()
    cost: dict[str, dict[int, tuple[float, float]]] = {}
    for name in ("large_1b", "large_360m", "small_ft"):
        cost[name] = {}
        for t in (1, 2):
            d, p = raw_speed(args.dir / f"{name}.q8_0.gguf", n_threads=t, n_tokens=24,
                             prompt_tokens=args.prompt)
            cost[name][t] = (d, p or 0.0)
            print(f"{name}, {t} thread(s): {1e3 * d:.2f} ms/token, {args.prompt}-token "
                  f"prompt {p:.2f} s")
    s = cost["small_ft"]
    for title, large in SETS.items():
        c = cost[large]
        alone_d, alone_p = min(c[1][0], c[2][0]), min(c[1][1], c[2][1])
        lanes = max(c[1][0], 2 * s[1][0])
        first = c[2][0] + s[1][0]
        work_d = max(min(c[1][0], 2 * c[2][0]) + 2 * min(s[1][0], 2 * s[2][0]), 0.0) / 2
        work_p = (min(c[1][1], 2 * c[2][1]) + 2 * min(s[1][1], 2 * s[2][1])) / 2
        print(f"{title}: decode bounds, x the large model alone: lanes {alone_d / lanes:.2f}, "
              f"large-first {alone_d / first:.2f}, all work spread {alone_d / work_d:.2f}; "
              f"first token at least {work_p / alone_p:.2f}x the large model alone "
              f"(each model with every thread in turn: "
              f"{(c[2][1] + 2 * s[2][1]) / alone_p:.2f}x)")


if __name__ == "__main__":
    main()
