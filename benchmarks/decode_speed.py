"""Single-model decode speed through eft_local's backend (tokens/s), one line per run.

    python benchmarks/decode_speed.py MODEL.gguf --threads 2
    OMP_WAIT_POLICY=active python benchmarks/decode_speed.py MODEL.gguf --threads 2

The second form shows what spinning OpenMP workers cost when other processes share the cores
(eft_local sets OMP_WAIT_POLICY=passive unless the environment says otherwise).
"""

from __future__ import annotations

import argparse
import os
import time

from eft_local import backend


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=30)
    args = ap.parse_args()
    model = backend.LlamaModel(args.model, n_ctx=512, n_threads=args.threads)
    model.eval(list(range(100, 136)))
    start = time.perf_counter()
    for i in range(args.tokens):
        model.eval([200 + i])
    rate = args.tokens / (time.perf_counter() - start)
    load = os.getloadavg()[0]
    print(f"threads={args.threads} OMP_WAIT_POLICY={os.environ['OMP_WAIT_POLICY']} "
          f"{rate:.1f} tok/s (load average {load:.2f})")
    model.close()


if __name__ == "__main__":
    main()
