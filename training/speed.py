"""Time one-token decodes of each GGUF in a folder through eft_local.backend (a dev tool).

    python -m training.speed eft_local/family --threads 1

Prints the best-of-N milliseconds per single-token decode after a 20-token prompt.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from eft_local.backend import LlamaModel


def ms_per_token(path: Path, *, threads: int, tokens: int = 40, repeats: int = 7) -> float:
    """Best mean time of `tokens` one-token decodes, over `repeats` runs, in ms."""
    model = LlamaModel(path, n_ctx=256, n_threads=threads)
    try:
        model.eval(list(range(4, 24)))
        best = float("inf")
        for _ in range(repeats):
            model.rewind(20)
            t0 = time.perf_counter()
            for i in range(tokens):
                model.eval([100 + i])
            best = min(best, (time.perf_counter() - t0) / tokens)
    finally:
        model.close()
    return best * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("folder", type=Path)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    for path in sorted(args.folder.glob("*.gguf")):
        print(f"{path.name:24s} {ms_per_token(path, threads=args.threads):.3f} ms/token")


if __name__ == "__main__":
    main()
