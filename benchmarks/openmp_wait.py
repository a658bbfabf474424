"""llama.cpp's decode speed under each OpenMP wait setting, on an idle and a busy machine.

    python benchmarks/openmp_wait.py MODEL.gguf [--busy 0 1 2] [--tokens 12]

Each cell is one process running llama.cpp alone through its low-level API
(``backend.raw_speed``: one-token decodes, median ms per token) while ``--busy`` other
processes spin on the CPU. Settings: ``passive`` (a waiting worker sleeps at once),
``GOMP_SPINCOUNT=1000`` (what eft-local sets unless told otherwise), libgomp's default
(300,000 spins) and ``active`` (spin without end). A run slower than ``--timeout`` seconds
prints ``>``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

SETTINGS = {"passive": {"OMP_WAIT_POLICY": "passive"},
            "GOMP_SPINCOUNT=1000 (eft-local)": {"GOMP_SPINCOUNT": "1000"},
            "libgomp default (300000 spins)": {"GOMP_SPINCOUNT": "300000"},
            "active": {"OMP_WAIT_POLICY": "active"}}
CODE = ("import json, sys\n"
        "from eft_local.backend import raw_speed\n"
        "print(json.dumps(raw_speed(sys.argv[1], n_threads=int(sys.argv[2]), "
        "n_tokens=int(sys.argv[3]))[0]))\n")


def run(model: str, threads: int, tokens: int, env: dict[str, str], timeout: float) -> str:
    base = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    try:
        out = subprocess.run([sys.executable, "-c", CODE, model, str(threads), str(tokens)],
                             env=base | env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return f"> {timeout:.0f} s"
    if out.returncode != 0:
        return "failed"
    return f"{1e3 * json.loads(out.stdout.strip().splitlines()[-1]):.1f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model")
    ap.add_argument("--busy", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--tokens", type=int, default=12)
    ap.add_argument("--timeout", type=float, default=60.0)
    args = ap.parse_args()
    print(f"{os.path.basename(args.model)}, {os.cpu_count()} CPUs, load average "
          f"{os.getloadavg()[0]:.2f}; ms per token (median of {args.tokens})")
    print(f"{'setting':34} {'threads':>7} " + " ".join(f"{f'{b} busy':>10}" for b in args.busy))
    rows = [(name, env, t) for name, env in SETTINGS.items() for t in (1, 2)]
    cells: dict[tuple[str, int], list[str]] = {(n, t): [] for n, _, t in rows}
    for busy in args.busy:
        hogs = [subprocess.Popen([sys.executable, "-c", "while True: pass"])
                for _ in range(busy)]
        try:
            for name, env, t in rows:
                cells[(name, t)].append(run(args.model, t, args.tokens, env, args.timeout))
        finally:
            for h in hogs:
                h.kill()
    for name, _env, t in rows:
        print(f"{name:34} {t:7d} " + " ".join(f"{c:>10}" for c in cells[(name, t)]))


if __name__ == "__main__":
    main()
