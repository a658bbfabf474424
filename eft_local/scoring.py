"""Scoring a given text under the mix: every token's log-prob, from batched evaluations.

Each model evaluates the whole text (or a window of it) in batches with logits on every
position; the mix at each position is :meth:`Engine.distribution` at temperature 1 without
filters, the same definition generation samples from, so the sum of a text's log-probs is
what generation assigns it. Texts longer than the context are scored in overlapping windows:
each window after the first is conditioned on the half-context of tokens before it.
"""

from __future__ import annotations

import math
from collections.abc import Generator, Iterator, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from eft_local.backend.sequences import Part
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
               through_last: bool = True, seq: int = 0
               ) -> Iterator[tuple[np.ndarray, range]]:
    """Every model's logit rows over ``tokens`` evaluated from position 0, ``piece`` tokens
    per batch, each model with every thread in turn: per piece, the rows
    ``(models, n, width)`` and the positions of ``tokens`` they predict (``rows[:, i]``
    predicts ``tokens[positions[i]]``; over the pieces, 1 .. len(tokens) - 1 in order).
    ``through_last``: evaluate the last token too (its row predicts nothing and is dropped),
    so that the caches hold all of ``tokens`` afterwards. ``seq``: the models' sequence
    (slot) that evaluates them."""
    if piece < 1:
        raise EftError(f"invalid piece {piece}: must be >= 1")
    end = len(tokens) if through_last else len(tokens) - 1
    for lo in range(0, end, piece):
        hi = min(end, lo + piece)
        rows = np.stack(engine.evaluate_each(lo, list(tokens[lo:hi]), all_logits=True,
                                             prefill=True, seq=seq))
        n = min(hi, len(tokens) - 1) - lo  # the last token's row predicts nothing
        if n > 0:
            yield rows[:, :n], range(lo + 1, lo + 1 + n)


Want = tuple[int, list[int]]
"""What a scorer asks to evaluate next: after keeping ``n`` tokens of its sequence, these
tokens, with a row per position."""


def score_tokens(engine: Engine, tokens: Sequence[int], weights: np.ndarray,
                 settings: SamplerSettings, *, top_n: int = 0, per_model: bool = False,
                 conservative: str | None = None, chunk: int = CHUNK, seq: int = 0
                 ) -> Score:
    """Score ``tokens`` under the mix of ``engine`` with ``weights`` (see module doc), in
    the models' sequence (slot) ``seq``.

    Only ``settings.conservative_top_p`` matters: the mix is taken at temperature 1 with no
    top-k/top-p/min-p filter. The models' caches hold the (last window's) tokens afterwards,
    so a generation that continues the text re-uses them.
    """
    return score_many(engine, [(tokens, seq)], weights, settings, top_n=top_n,
                      per_model=per_model, conservative=conservative, chunk=chunk)[0]


def score_many(engine: Engine, texts: Sequence[tuple[Sequence[int], int]],
               weights: np.ndarray, settings: SamplerSettings, *, top_n: int = 0,
               per_model: bool = False, conservative: str | None = None, chunk: int = CHUNK
               ) -> list[Score]:
    """Score several token lists at once, each ``(tokens, seq)`` in its own sequence (slot)
    of the models: each model evaluates one piece of every text in one batched decode.
    Each score is what :func:`score_tokens` gives for that text alone, up to llama.cpp's
    batched arithmetic."""
    if isinstance(top_n, bool) or not isinstance(top_n, int) or top_n < 0:
        raise EftError(f"invalid top_n {top_n!r}: must be an integer >= 0")
    seqs = [seq for _tokens, seq in texts]
    if len(set(seqs)) != len(seqs):
        raise EftError("each text needs a sequence of its own")
    scorers = [_scorer(engine, list(tokens), weights, settings, top_n=top_n,
                       per_model=per_model, conservative=conservative, chunk=chunk)
               for tokens, _seq in texts]
    done: list[Score | None] = [None] * len(texts)
    wants: dict[int, Want] = {}
    for i, scorer in enumerate(scorers):
        _advance(scorer, None, i, wants, done)
    while wants:
        order = sorted(wants)
        parts = [Part(seqs[i], wants[i][0], tuple(wants[i][1]), "all") for i in order]
        rows = engine.evaluate_parts(dict.fromkeys(engine.roles, parts), prefill=True)
        for j, i in enumerate(order):
            got = np.stack([rows[r][j] for r in engine.roles])  # type: ignore[misc]
            _advance(scorers[i], got, i, wants, done)
    return done  # type: ignore[return-value]


def _advance(scorer: Generator[Want, np.ndarray | None, Score], rows: np.ndarray | None,
             i: int, wants: dict[int, Want], done: list[Score | None]) -> None:
    try:
        wants[i] = scorer.send(rows)  # type: ignore[arg-type]
    except StopIteration as stop:
        wants.pop(i, None)
        done[i] = stop.value


def _scorer(engine: Engine, tokens: list[int], weights: np.ndarray,
            settings: SamplerSettings, *, top_n: int, per_model: bool,
            conservative: str | None, chunk: int) -> Generator[Want, np.ndarray, Score]:
    """One text's scoring: yields what to evaluate next, receives those rows."""
    check_scorable(engine, tokens)
    width = engine.width
    mix_settings = SamplerSettings(conservative_top_p=settings.conservative_top_p)
    plan = window_spans(len(tokens), engine.n_ctx)
    out = [TokenScore(position=0, token=tokens[0], logprob=None)]
    for start, first, end in plan:
        window = tokens[start:end]
        for lo in range(0, len(window), chunk):
            hi = min(len(window), lo + chunk)
            rows = yield lo, window[lo:hi]
            n = min(hi, len(window) - 1) - lo  # the last token's row predicts nothing
            for i in range(max(0, n)):
                target = start + lo + 1 + i  # the position whose token row i predicts
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


def check_scorable(engine: Engine, tokens: Sequence[int]) -> None:
    """An error unless ``tokens`` is a text the engine can score."""
    if not tokens:
        raise EftError("nothing to score: the text has no tokens")
    n_vocab = min(m.n_vocab for m in engine.models.values())
    bad = next((t for t in tokens if not 0 <= t < n_vocab), None)
    if bad is not None:
        raise EftError(f"token id {bad} is outside the vocabulary (0..{n_vocab - 1})")


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

