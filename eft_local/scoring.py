"""Scoring a given text under the mix: every token's log-prob, from batched evaluations.

Each model evaluates the whole text (or a window of it) in batches with logits on every
position; the mix at each position is :meth:`Engine.distribution` at temperature 1 without
filters, the same definition generation samples from, so the sum of a text's log-probs is
what generation assigns it. Texts longer than the context are scored in overlapping windows:
each window after the first is conditioned on the half-context of tokens before it.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from eft_local.engine import Engine
from eft_local.errors import EftError
from eft_local.sampler import SamplerSettings, top_logprobs

CHUNK = 256
"""Positions evaluated per batch while scoring (bounds memory: rows x vocab per model)."""


@dataclass(frozen=True)
class TokenScore:
    """One token of a scored text."""

    position: int
    token: int
    logprob: float | None
    """Log-prob under the mix given the tokens before it (None for the first token)."""
    top: tuple[tuple[int, float], ...] = ()
    """The most likely tokens at this position under the mix: (id, log-prob), best first."""
    model_logprobs: Mapping[str, float] | None = None
    """The token's log-prob under each model alone (when asked for)."""


@dataclass(frozen=True)
class Score:
    """A scored text: per-token records and how it was cut into windows."""

    tokens: list[TokenScore]
    windows: int = 1
    context: int = 0
    """Tokens of context each window after the first is conditioned on (0: one window)."""
    formula: str = ""
    notes: list[str] = field(default_factory=list)

    @property
    def logprob(self) -> float:
        """Sum of the scored tokens' log-probs."""
        return float(sum(t.logprob for t in self.tokens if t.logprob is not None))

    @property
    def count(self) -> int:
        """How many tokens have a log-prob (all but the first)."""
        return sum(1 for t in self.tokens if t.logprob is not None)

    @property
    def perplexity(self) -> float:
        """exp(-mean log-prob) over the scored tokens (nan when none is scored)."""
        n = self.count
        return math.exp(-self.logprob / n) if n else math.nan


def window_spans(n_tokens: int, n_ctx: int) -> list[tuple[int, int, int]]:
    """How to score ``n_tokens`` with a context of ``n_ctx``: ``(start, first, end)`` per
    window, evaluating ``tokens[start:end]`` and keeping scores for positions ``first..end-1``.
    One window when the text fits; else each later window starts ``(n_ctx - 1) // 2`` tokens
    before the first position it scores."""
    size = n_ctx - 1  # a full window would leave no room; keep one slot as generation does
    if size < 2:
        raise EftError(f"the context ({n_ctx} tokens) is too small to score anything")
    if n_tokens <= size:
        return [(0, 1, n_tokens)]
    keep = size // 2
    out = [(0, 1, size)]
    first = size
    while first < n_tokens:
        start = first - keep
        end = min(n_tokens, start + size)
        out.append((start, first, end))
        first = end
    return out


def logit_rows(engine: Engine, tokens: Sequence[int], *, piece: int = CHUNK,
               through_last: bool = True) -> Iterator[tuple[np.ndarray, range]]:
    """Every model's logit rows over ``tokens`` evaluated from position 0, ``piece`` tokens
    per batch, each model with every thread in turn: per piece, the rows
    ``(models, n, width)`` and the positions of ``tokens`` they predict (``rows[:, i]``
    predicts ``tokens[positions[i]]``; over the pieces, 1 .. len(tokens) - 1 in order).
    ``through_last``: evaluate the last token too (its row predicts nothing and is dropped),
    so that the caches hold all of ``tokens`` afterwards."""
    if piece < 1:
        raise EftError(f"invalid piece {piece}: must be >= 1")
    end = len(tokens) if through_last else len(tokens) - 1
    for lo in range(0, end, piece):
        hi = min(end, lo + piece)
        rows = np.stack(engine.evaluate_each(lo, list(tokens[lo:hi]), all_logits=True,
                                             prefill=True))
        n = min(hi, len(tokens) - 1) - lo  # the last token's row predicts nothing
        if n > 0:
            yield rows[:, :n], range(lo + 1, lo + 1 + n)


def score_tokens(engine: Engine, tokens: Sequence[int], weights: np.ndarray,
                 settings: SamplerSettings, *, top_n: int = 0, per_model: bool = False,
                 conservative: str | None = None, chunk: int = CHUNK) -> Score:
    """Score ``tokens`` under the mix of ``engine`` with ``weights`` (see module doc).

    Only ``settings.conservative_top_p`` matters: the mix is taken at temperature 1 with no
    top-k/top-p/min-p filter. The models' caches hold the (last window's) tokens afterwards,
    so a generation that continues the text re-uses them.
    """
    tokens = [int(t) for t in tokens]
    if not tokens:
        raise EftError("nothing to score: the text has no tokens")
    width = engine.width
    n_vocab = min(m.n_vocab for m in engine.models.values())
    bad = next((t for t in tokens if not 0 <= t < n_vocab), None)
    if bad is not None:
        raise EftError(f"token id {bad} is outside the vocabulary (0..{n_vocab - 1})")
    if isinstance(top_n, bool) or not isinstance(top_n, int) or top_n < 0:
        raise EftError(f"invalid top_n {top_n!r}: must be an integer >= 0")
    mix_settings = SamplerSettings(conservative_top_p=settings.conservative_top_p)
    plan = window_spans(len(tokens), engine.n_ctx)
    out = [TokenScore(position=0, token=tokens[0], logprob=None)]
    for start, first, end in plan:
        for rows, predicted in logit_rows(engine, tokens[start:end], piece=chunk):
            for i, at in enumerate(predicted):
                target = start + at  # the position whose token row i predicts
                if target >= first:
                    out.append(_token_score(engine, rows[:, i, :width], tokens[target],
                                            target, weights, mix_settings, top_n, per_model,
                                            conservative))
    notes = []
    context = 0
    if len(plan) > 1:
        context = plan[1][1] - plan[1][0]
        notes.append(f"the text is {len(tokens)} tokens, longer than the context "
                     f"({engine.n_ctx}): scored in {len(plan)} windows, each later window "
                     f"conditioned on the {context} tokens before it")
    return Score(tokens=out, windows=len(plan), context=context, notes=notes)


def _token_score(engine: Engine, rows: np.ndarray, token: int, position: int,
                 weights: np.ndarray, settings: SamplerSettings, top_n: int,
                 per_model: bool, conservative: str | None) -> TokenScore:
    mixed = engine.distribution(rows, weights, settings, conservative)
    top = top_logprobs(mixed, top_n) if top_n else ()
    models = None
    if per_model:
        models = {role: float(engine.model_logprobs(rows, i)[token])
                  for i, role in enumerate(engine.roles)}
    return TokenScore(position=position, token=token, logprob=float(mixed[token]), top=top,
                      model_logprobs=models)

