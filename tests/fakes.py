"""An in-memory model for fast engine tests: logits are a pure function of the prefix.

Each row is ``scale * (shared(prefix) + noise * own(prefix))``: ``shared`` is common to
every fake built with the same ``family`` and ``own`` is specific to the model's ``seed``, so
``noise`` sets how close two fakes are (0 = identical distributions). Rows never depend on
how tokens were batched, so speculative and plain decoding must agree exactly.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np

from eft_local.batch import Batch, Plan, generate
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
                 size: int = 1) -> None:
        self.path = Path(f"fake-{seed}.gguf")
        self.n_vocab = n_vocab
        self.n_ctx = n_ctx
        self.tokens: list[int] = []
        self.seed, self.noise, self.family, self.scale = seed, noise, family, scale
        self.eog_bias = eog_bias
        self.size = size
        self.eval_calls = 0
        self._hashes = [12345]

    def _row(self, h: int) -> np.ndarray:
        shared = np.random.default_rng((self.family, h)).standard_normal(self.n_vocab)
        own = np.random.default_rng((self.family, self.seed, h)).standard_normal(self.n_vocab)
        row = self.scale * (shared + self.noise * own)
        row[EOG] += self.eog_bias * self.scale
        return row.astype(np.float32)

    def eval(self, tokens: list[int], *, all_logits: bool = False) -> np.ndarray:
        """Append ``tokens``; rows for every new position, or the last one."""
        if not tokens:
            raise ValueError("eval needs at least one token")
        if len(self.tokens) + len(tokens) > self.n_ctx:
            raise EftError(f"fake: context full ({len(self.tokens)} + {len(tokens)} tokens)")
        self.eval_calls += 1
        rows = []
        for tok in tokens:
            self.tokens.append(tok)
            self._hashes.append((self._hashes[-1] * 1_000_003 + tok + 1) % _MOD)
            rows.append(self._row(self._hashes[-1]))
        return np.stack(rows if all_logits else rows[-1:])

    def seq_tokens(self, seq: int = 0) -> list[int]:
        """What the cache holds."""
        assert seq == 0
        return self.tokens

    def rewind(self, n_past: int, seq: int = 0) -> None:
        """Forget positions from ``n_past`` on."""
        del self.tokens[n_past:]
        del self._hashes[n_past + 1:]

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
