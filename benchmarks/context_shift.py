"""Cutting the oldest turns out of a KV cache: shift the kept tokens or evaluate them again?

    python benchmarks/context_shift.py [--runs 5] [--threads 2] [--realistic] [--n-ctx N]
      [--only NAME]

A chat that outgrows the context drops its oldest turns: the cache holds ``prefix + dropped
+ kept + old reply`` and the next prompt is ``prefix + kept + new message``. Two ways to get
there, per model, with the model's whole context allocated (its default ``n_ctx``):

- re-evaluate: roll back to the prefix and evaluate ``kept + new`` (what a plain common-prefix
  cache does);
- shift: drop the reply, cut the dropped span out (``LlamaModel.cut``: llama.cpp moves the
  kept positions down and rotates their keys, one pass over the whole cache, at the next
  decode) and evaluate only ``new``.

Each line: the model, its context, the kept length, then median and spread (min-max) in ms of
``--runs`` runs of each way, and how many times faster the shift was. The bundled family
always; ``--realistic`` adds the 135M/360M/1B-shaped random-weight models that ``eft-local
bench --realistic`` writes into benchmarks/out (written here too if missing), at their
training context (2048) or ``--n-ctx``; ``--only`` measures the models whose names contain
it. Figures and the rule they gave: docs/long-chats.md.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from pathlib import Path

from eft_local import backend
from eft_local.synthetic import realistic_paths

FAMILY = Path(__file__).resolve().parent.parent / "eft_local" / "family"
PREFIX = 16
"""Tokens before the dropped span (the system prompt's)."""
DROPPED = 16
NEW = 24
"""Tokens of the new message (both ways evaluate them)."""
REPLY = 16
"""Tokens of the old reply after the kept span (both ways drop them)."""


def ids(n: int, start: int, vocab: int) -> list[int]:
    """``n`` ordinary token ids (no control tokens)."""
    return [10 + (start + 7 * i) % (min(vocab, 1000) - 10) for i in range(n)]


def timed(model: backend.LlamaModel, cached: list[int], step: Callable[[], None],
          runs: int) -> list[float]:
    """Seconds of ``step`` after the cache was brought back to ``cached`` (not timed)."""
    out = []
    for _ in range(runs):
        model.rewind(0)
        model.eval(cached)
        start = time.perf_counter()
        step()
        out.append(time.perf_counter() - start)
    return out


def measure(path: Path, kept: int, *, runs: int, threads: int, n_ctx: int | None
            ) -> tuple[int, list[float], list[float]]:
    model = backend.LlamaModel(path, n_ctx=n_ctx, n_threads=threads)
    try:
        v = model.n_vocab
        prefix, dropped = ids(PREFIX, 1, v), ids(DROPPED, 2, v)
        keep, reply, new = ids(kept, 3, v), ids(REPLY, 4, v), ids(NEW, 5, v)
        cached = prefix + dropped + keep + reply
        assert len(cached) + NEW <= model.n_ctx, "the context is too small for this length"
        model.eval(cached)  # the first decode sets buffers up

        def again() -> None:
            model.rewind(PREFIX)
            model.eval(keep + new)

        def shift() -> None:
            model.rewind(PREFIX + DROPPED + kept)
            assert model.cut(PREFIX, PREFIX + DROPPED)
            model.eval(new)

        # interleaved, so that a busy moment hurts both ways alike
        a, b = [], []
        for _ in range(runs):
            a += timed(model, cached, again, 1)
            b += timed(model, cached, shift, 1)
        return model.n_ctx, a, b
    finally:
        model.close()


def text(times: list[float]) -> str:
    ms = [1e3 * t for t in times]
    return f"{statistics.median(ms):8.1f} ({min(ms):.1f}-{max(ms):.1f})"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--realistic", action="store_true")
    ap.add_argument("--n-ctx", type=int, help="Context of the realistic models.")
    ap.add_argument("--only", default="", help="Only models whose names contain this.")
    ap.add_argument("--dir", type=Path, default=Path("benchmarks/out"))
    args = ap.parse_args()
    models: list[tuple[str, Path, list[int], int | None]] = [
        ("family small_base", FAMILY / "small_base.gguf", [8, 32, 64, 128, 176], None),
        ("family large_base", FAMILY / "large_base.gguf", [8, 32, 64, 128, 176], None)]
    if args.realistic:
        paths = realistic_paths(args.dir, ("small_ft", "large_360m", "large_1b"))
        models += [("135M-shaped", paths["small_ft"], [8, 32, 128, 512, 1536], args.n_ctx),
                   ("360M-shaped", paths["large_360m"], [8, 32, 128, 512], args.n_ctx),
                   ("1B-shaped", paths["large_1b"], [8, 32, 128], args.n_ctx)]
    models = [m for m in models if args.only in m[0]]
    print(f"{'model':<18} {'n_ctx':>5} {'kept':>5}  {'re-evaluate ms':>24}  "
          f"{'shift ms':>24}  speed-up   ({args.runs} runs, {args.threads} threads)")
    for name, path, lengths, n_ctx in models:
        for kept in lengths:
            ctx, a, b = measure(path, kept, runs=args.runs, threads=args.threads, n_ctx=n_ctx)
            print(f"{name:<18} {ctx:>5} {kept:>5}  {text(a):>24}  {text(b):>24}  "
                  f"x{statistics.median(a) / statistics.median(b):.2f}", flush=True)


if __name__ == "__main__":
    main()
