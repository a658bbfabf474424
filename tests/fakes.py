"""An in-memory model for fast engine tests: logits are a pure function of the prefix.

Each row is ``scale * (shared(prefix) + noise * own(prefix))``: ``shared`` is common to
every fake built with the same ``family`` and ``own`` is specific to the model's ``seed``, so
``noise`` sets how close two fakes are (0 = identical distributions). Rows never depend on
how tokens were batched, nor on what the other sequences hold, so speculative and plain
decoding, and one sequence or many, must agree exactly.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

from eft_local.backend.sequences import ROWS, Part
from eft_local.batch import Batch, Plan
from eft_local.engine import Engine, Step
from eft_local.errors import EftError
from eft_local.sampler import SamplerSettings
from eft_local.speculative import Speculator
from eft_local.utf8 import Constraint

EOG = 1
_MOD = (1 << 61) - 1


class FakeModel:
    """Implements :class:`eft_local.engine.Model` without llama.cpp."""

    def __init__(self, *, seed: int, noise: float = 0.3, n_vocab: int = 48, n_ctx: int = 256,
                 family: int = 7, scale: float = 2.5, eog_bias: float = -1.5,
                 size: int = 1, n_seq: int = 1) -> None:
        self.path = Path(f"fake-{seed}.gguf")
        self.n_vocab = n_vocab
        self.n_ctx = n_ctx
        self.n_seq = n_seq
        self._seqs: list[list[int]] = [[] for _ in range(n_seq)]
        self._hashes: list[list[int]] = [[12345] for _ in range(n_seq)]  # one per prefix
        self.tokens = self._seqs[0]  # the same list: never rebound
        self.seed, self.noise, self.family, self.scale = seed, noise, family, scale
        self.eog_bias = eog_bias
        self.size = size
        self.eval_calls = 0

    def _row(self, h: int) -> np.ndarray:
        shared = np.random.default_rng((self.family, h)).standard_normal(self.n_vocab)
        own = np.random.default_rng((self.family, self.seed, h)).standard_normal(self.n_vocab)
        row = self.scale * (shared + self.noise * own)
        row[EOG] += self.eog_bias * self.scale
        return row.astype(np.float32)

    def seq_tokens(self, seq: int) -> list[int]:
        """What sequence ``seq`` holds (the live list)."""
        return self._seqs[self._check_seq(seq)]

    def _check_seq(self, seq: int) -> int:
        if not 0 <= seq < self.n_seq:
            raise ValueError(f"sequence {seq!r} outside [0, {self.n_seq})")
        return seq

    def _append(self, seq: int, tokens: Sequence[int]) -> list[np.ndarray]:
        rows = []
        for tok in tokens:
            self._seqs[seq].append(tok)
            hashes = self._hashes[seq]
            hashes.append((hashes[-1] * 1_000_003 + tok + 1) % _MOD)
            rows.append(self._row(hashes[-1]))
        return rows

    def eval(self, tokens: list[int], *, all_logits: bool = False, seq: int = 0
             ) -> np.ndarray:
        """Append ``tokens`` to sequence ``seq``; rows for every new position, or the last."""
        if not tokens:
            raise ValueError("eval needs at least one token")
        have = self._seqs[self._check_seq(seq)]
        if len(have) + len(tokens) > self.n_ctx:
            raise EftError(f"fake: context full ({len(have)} + {len(tokens)} tokens)")
        self.eval_calls += 1
        rows = self._append(seq, tokens)
        return np.stack(rows if all_logits else rows[-1:])

    def rewind(self, n_past: int, seq: int = 0) -> None:
        """Forget sequence ``seq``'s positions from ``n_past`` on."""
        del self._seqs[self._check_seq(seq)][n_past:]
        del self._hashes[seq][n_past + 1:]

    def clear(self, seq: int) -> None:
        """Empty sequence ``seq``."""
        self.rewind(0, seq)

    def copy_prefix(self, src: int, dst: int, n: int) -> None:
        """Make sequence ``dst`` hold the first ``n`` tokens of ``src``."""
        have = self._seqs[self._check_seq(src)]
        self._check_seq(dst)
        if not 0 <= n <= len(have):
            raise ValueError(f"copy_prefix: {n} tokens, sequence {src} holds {len(have)}")
        self._seqs[dst][:] = have[:n]
        self._hashes[dst][:] = self._hashes[src][:n + 1]

    def decode(self, parts: Sequence[Part], out: np.ndarray | None = None
               ) -> list[np.ndarray | None]:
        """:meth:`eft_local.backend.LlamaModel.decode`: every part checked before any
        sequence changes; one call counted."""
        seen = set()
        for p in parts:
            have = self._seqs[self._check_seq(p.seq)]
            if p.seq in seen or not p.tokens or not 0 <= p.keep <= len(have) or (
                    p.rows not in ROWS):
                raise ValueError(f"bad part {p}")
            seen.add(p.seq)
            if p.keep + len(p.tokens) > self.n_ctx:
                raise EftError(f"fake: context full ({p.keep} + {len(p.tokens)} tokens)")
        if out is not None and (out.ndim != 2 or out.shape[0] != len(parts)):
            raise ValueError(f"out has shape {out.shape}")
        self.eval_calls += 1
        results: list[np.ndarray | None] = []
        for i, p in enumerate(parts):
            self.rewind(p.keep, p.seq)
            rows = self._append(p.seq, p.tokens)
            if p.rows == "none":
                results.append(None)
            elif p.rows == "all":
                results.append(np.stack(rows))
            elif out is not None:
                out[i] = rows[-1][: out.shape[1]]
                results.append(out[i:i + 1])
            else:
                results.append(rows[-1][None, :])
        return results

    def file_size(self) -> int:
        """The pretended size of the model file (what drafting cost is judged by)."""
        return self.size

    def is_eog(self, token: int) -> bool:
        """Token 1 ends generation."""
        return token == EOG

    def piece(self, token: int, *, special: bool = False) -> bytes:
        """One letter per token id."""
        return b"" if token == EOG and not special else bytes([97 + token % 26])

    def tokenize(self, text: str, *, add_bos: bool, special: bool) -> list[int]:
        """One token per byte, never the end token."""
        return [2 + b % (self.n_vocab - 2) for b in text.encode()]


def decode(engine: Engine, prompt: list[int], weights: np.ndarray, sampling: SamplerSettings,
           **kwargs: object) -> list[Step]:
    """:func:`decoding`, collected."""
    return list(decoding(engine, prompt, weights, sampling, **kwargs))  # type: ignore[arg-type]


def decoding(engine: Engine, prompt: list[int], weights: np.ndarray, sampling: SamplerSettings,
             *, max_tokens: int, draft_k: int | None | str = "plain",
             draft_role: str | None = None, speculator: Speculator | None = None,
             diagnostics: bool = False, top_n: int | None = None,
             conservative: str | None = None, grammar: Constraint | None = None
             ) -> Iterator[Step]:
    """One generation on ``engine`` alone in a batch: plain decoding (``draft_k="plain"``)
    or speculative with that block size (or ``speculator``), the drafter ``draft_role`` or
    the cheapest model with weight."""
    conservative = conservative or engine.conservative_role
    speculative = speculator is not None or draft_k != "plain"
    drafter = (draft_role or engine.cheapest_role(weights, prefer=conservative)
               if speculative else None)
    if speculative and speculator is None:
        speculator = Speculator(engine, draft_k=draft_k)  # type: ignore[arg-type]
    plan = Plan(tuple(prompt), tuple(float(w) for w in np.asarray(weights)), sampling,
                max_tokens, conservative, drafter=drafter, diagnostics=diagnostics,
                top_n=top_n, grammar=grammar.clone if grammar is not None else None)
    return generate(Batch(engine, speculator), plan)


def generate(batch: Batch, plan: Plan, *, slot: int | None = None) -> Iterator[Step]:
    """Run ``plan`` to its end as the only sequence it steps (others in the batch step too,
    but only this one's tokens are yielded): the tokens until an end-of-generation token,
    ``max_tokens`` or a full context; the last step's :attr:`Step.finish` says which."""
    seq = batch.add(plan, slot=slot)
    try:
        while seq.finish is None:
            for owner, step in batch.step():
                if owner is seq:
                    if step is None:
                        raise seq.error  # type: ignore[misc]
                    yield step
    finally:
        batch.remove(seq)
