"""Several sequences in one llama_decode: how fast, and how far from each decoded alone?

    python benchmarks/batched_decode.py [--model PATH] [--threads 2] [--runs 9]
      [--context 64] [--batches 1,2,4,8] [--dir benchmarks/out] [--kv-unified]
      [--flash-attn auto|on|off] [--agreement-only]

One model holding B sequences (``LlamaModel(n_seq=B)``), each with its own ``--context``
-token prompt. Per B, interleaved run by run so that a busy moment hurts both ways alike:

- batched: one :meth:`~eft_local.backend.LlamaModel.decode` of B parts, one token each,
  the rows written into one (B, n_vocab) array (the serving hot path);
- separate: B one-token :meth:`~eft_local.backend.LlamaModel.eval_into` calls, one per
  sequence, in the same model (each way first in every other run).

Each line: B, median and spread (min-max) in ms of a whole step each way, and the batched
step's throughput over the separate steps'. Then the agreement: every sequence's row from the
batched step against the same steps (the prompt, then the token) in a one-sequence model
(``n_seq=1``): the largest absolute logit difference, the largest logit, how many greedy
choices agree, and how close the two best logits were where they do not.

Without ``--model``: the 1B-shaped random-weight Q8_0 model that ``eft-local bench
--realistic`` writes into ``--dir`` (written here if missing). Figures: issue 23 and
docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import numpy as np

from eft_local import backend
from eft_local.synthetic import realistic_paths


def ids(n: int, start: int, vocab: int) -> list[int]:
    """``n`` ordinary token ids (no control tokens), different for each ``start``."""
    return [10 + (start * 131 + 7 * i) % (min(vocab, 1000) - 10) for i in range(n)]


def measure(model: backend.LlamaModel, b: int, runs: int, context: int
            ) -> tuple[list[float], list[float]]:
    """Seconds per batched step and per B separate steps (``runs`` of each)."""
    v = model.n_vocab
    for s in range(model.n_seq):
        model.rewind(0, s)
    for s in range(b):
        model.eval(ids(context, s, v), seq=s)
    nxt = [ids(1, 100 + s, v)[0] for s in range(b)]
    parts = [backend.Part(s, context, (nxt[s],)) for s in range(b)]
    out = np.empty((b, v), dtype=np.float32)
    model.decode(parts, out)  # the first decode of this shape sets buffers up
    batched, separate = [], []

    def one_batched() -> None:
        start = time.perf_counter()
        model.decode(parts, out)
        batched.append(time.perf_counter() - start)
        for s in range(b):
            model.rewind(context, s)

    def one_separate() -> None:
        start = time.perf_counter()
        for s in range(b):
            model.eval_into([nxt[s]], out[s], seq=s)
        separate.append(time.perf_counter() - start)
        for s in range(b):
            model.rewind(context, s)

    for run in range(runs):  # each way first in every other run
        for step in (one_batched, one_separate) if run % 2 == 0 else (one_separate,
                                                                       one_batched):
            step()
    return batched, separate


def agreement(path: Path, model: backend.LlamaModel, b: int, context: int, threads: int,
              flash_attn: str = "auto") -> tuple[float, float, int, float]:
    """Largest |batched - alone| logit, largest |logit|, greedy choices that agree, and
    the widest gap between the two best logits (alone) where they do not."""
    v = model.n_vocab
    for s in range(b):
        model.rewind(0, s)
        model.eval(ids(context, s, v), seq=s)
    nxt = [ids(1, 100 + s, v)[0] for s in range(b)]
    rows = model.decode([backend.Part(s, context, (nxt[s],)) for s in range(b)])
    one = backend.LlamaModel(path, n_ctx=model.n_ctx, n_threads=threads, flash_attn=flash_attn)
    diff = top = gap = 0.0
    same = 0
    try:
        for s in range(b):
            one.rewind(0)
            one.eval(ids(context, s, v))  # stepped as the batched model was
            alone = one.eval([nxt[s]])[-1]
            got = rows[s][-1]  # type: ignore[index]
            diff = max(diff, float(np.abs(got - alone).max()))
            top = max(top, float(np.abs(alone).max()))
            if got.argmax() == alone.argmax():
                same += 1
            else:
                best = np.sort(alone)[-2:]
                gap = max(gap, float(best[1] - best[0]))
    finally:
        one.close()
    return diff, top, same, gap


def text(times: list[float]) -> str:
    ms = [1e3 * t for t in times]
    return f"{statistics.median(ms):8.1f} ({min(ms):.1f}-{max(ms):.1f})"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, help="A GGUF file (default: the 1B-shaped one).")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--runs", type=int, default=9)
    ap.add_argument("--context", type=int, default=64, help="Prompt tokens per sequence.")
    ap.add_argument("--batches", default="1,2,4,8", help="Sequence counts B to measure.")
    ap.add_argument("--n-ctx", type=int, default=512, help="Context of each sequence.")
    ap.add_argument("--dir", type=Path, default=Path("benchmarks/out"))
    ap.add_argument("--kv-unified", action="store_true",
                    help="One KV cache for every sequence (default: a stream each).")
    ap.add_argument("--flash-attn", choices=("auto", "on", "off"), default="auto",
                    help="llama.cpp's flash attention, in both models.")
    ap.add_argument("--agreement-only", action="store_true", help="Skip the timings.")
    args = ap.parse_args()
    path = args.model or realistic_paths(args.dir, ("large_1b",))["large_1b"]
    sizes = [int(x) for x in args.batches.split(",")]
    model = backend.LlamaModel(path, n_ctx=args.n_ctx, n_threads=args.threads,
                               n_seq=max(sizes), kv_unified=args.kv_unified,
                               flash_attn=args.flash_attn)
    try:
        print(f"{path.name}: {args.threads} threads, {args.context}-token prompts, n_ctx "
              f"{model.n_ctx} per sequence, KV {model.kv_bytes_per_seq / 2**20:.1f} MiB per "
              f"sequence, {'one unified cache' if args.kv_unified else 'a stream each'}, "
              f"flash attention {args.flash_attn}, "
              f"{args.runs} runs")
        print(f"{'B':>3}  {'batched ms':>22}  {'B separate ms':>22}  throughput")
        for b in [] if args.agreement_only else sizes:
            batched, separate = measure(model, b, args.runs, args.context)
            print(f"{b:>3}  {text(batched):>22}  {text(separate):>22}  "
                  f"x{statistics.median(separate) / statistics.median(batched):.2f}",
                  flush=True)
        print("\nbatched rows against a one-sequence model")
        for b in sizes:
            diff, top, same, gap = agreement(path, model, b, args.context, args.threads,
                                             args.flash_attn)
            print(f"B={b}: max |difference| {diff:.4f} (largest logit {top:.2f}), "
                  f"greedy choice equal {same}/{b}"
                  + (f" (the two best within {gap:.4f} where not)" if same < b else ""),
                  flush=True)
    finally:
        model.close()


if __name__ == "__main__":
    main()
