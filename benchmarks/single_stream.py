"""One stream alone, this tree against another checkout of eft-local (issue 23: the engine
over many sequences must not slow a lone stream down).

Each round runs, in a child process per tree and alternating which goes first, the same
generation through the public API: the 1B + 2 x 135M random-weight Q8_0 shapes
(benchmarks/out/, written by ``eft_local.synthetic``), 2 threads, up-scaling, temperature 1,
a 64-token prompt, ``--tokens`` tokens, after one warm-up generation; plain decoding and the
default (adaptive speculative) decoding. Prints ms per generated token per run, then the
median and range per tree and the ratio of medians.

    git worktree add /tmp/eft-old <commit>    # the checkout to compare with
    python benchmarks/single_stream.py --other /tmp/eft-old [--rounds 5] [--tokens 48]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent.parent
OUT = HERE / "benchmarks" / "out"
CHILD = r"""
import json, sys, time
from eft_local.session import LoadOptions, load_session
out, tokens = sys.argv[1], int(sys.argv[2])
models = [f"large_base={out}/large_1b.q8_0.gguf", f"small_ft={out}/small_ft.q8_0.gguf",
          f"small_base={out}/small_base.q8_0.gguf"]
prompt = [(31 * k) % 40000 + 100 for k in range(64)]
result = {}
for name, speculative in (("plain", False), ("default", True)):
    with load_session(models=models, options=LoadOptions(n_threads=2, n_ctx=512,
                                                         speculative=speculative)) as s:
        list(s.stream(prompt, max_tokens=8, temperature=1.0, seed=1))  # warm up
        start = time.perf_counter()
        n = sum(c.step is not None for c in s.stream(prompt, max_tokens=tokens,
                                                      temperature=1.0, seed=2))
        result[name] = 1e3 * (time.perf_counter() - start) / n
print(json.dumps(result))
"""


def run(tree: Path, tokens: int) -> dict[str, float]:
    env = {**os.environ, "PYTHONPATH": str(tree), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-c", CHILD, str(OUT), str(tokens)], env=env,
                          capture_output=True, text=True, cwd=tree, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"{tree}: {proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--other", type=Path, required=True, help="another eft-local checkout")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--tokens", type=int, default=48)
    args = ap.parse_args()
    from eft_local.synthetic import realistic_paths

    realistic_paths(OUT, names=("large_1b", "small_ft", "small_base"))
    trees = {"this": HERE, "other": args.other.resolve()}
    runs: dict[str, list[dict[str, float]]] = {"this": [], "other": []}
    for r in range(args.rounds):
        order = ("this", "other") if r % 2 == 0 else ("other", "this")
        for name in order:
            runs[name].append(run(trees[name], args.tokens))
            print(f"round {r + 1} {name}: {runs[name][-1]}", flush=True)
    for mode in ("plain", "default"):
        med = {}
        for name, values in runs.items():
            ms = [v[mode] for v in values]
            med[name] = statistics.median(ms)
            print(f"{mode} {name}: median {med[name]:.1f} ms/token "
                  f"(range {min(ms):.1f}-{max(ms):.1f}, {len(ms)} runs)")
        print(f"{mode}: this / other = {med['this'] / med['other']:.3f} (time per token)")


if __name__ == "__main__":
    main()
