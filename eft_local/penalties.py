"""Penalties on the mix, with llama.cpp's definitions: logit bias, repetition, DRY.

They change the mix's scores after the formula and before temperature and the filters, in
llama.cpp's order: **logit bias, then the repetition penalties (repeat, frequency,
presence), then DRY**. The scores are the formula's weighted sum of the models' raw logits
(with one model of weight 1: that model's logits, what llama.cpp's samplers see), so the
repeat penalty's rule "divide a positive score, multiply a negative one" reads the same
numbers llama.cpp reads for a single model.

Each link is a pure function of the scores (changed in place) and the sequence's tokens so
far (``history``: the prompt and what was generated, as llama-server feeds its sampler the
prompt before the first token); :func:`make_penalties` builds the links of one settings
once. Nothing here keeps state between steps, so a position's penalties depend only on the
tokens before it: plain and speculative decoding draw alike.

- ``logit_bias``: ``score[id] += bias`` (``-inf`` bans the token).
- repetition, over the last ``repeat_last_n`` tokens (-1: all, 0: off), for each token seen
  ``count`` times there: ``score / repeat_penalty`` when the score is positive, else
  ``score * repeat_penalty``; then ``score -= count * frequency_penalty +
  presence_penalty``.
- DRY ("don't repeat yourself", over the last ``dry_penalty_last_n`` tokens): a token that
  would extend a repeat of ``n >= dry_allowed_length`` tokens (the text so far ends with
  ``n`` tokens that occurred before, followed by that token) loses
  ``dry_multiplier * dry_base ** (n - dry_allowed_length)``; a repeat never reaches back
  across a sequence breaker (a string such as ``"\\n"``, matched on the tokens that spell
  it), and a token that is itself a breaker is never penalised.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from eft_local.errors import EftError, check_field
from eft_local.schema_check import is_number

DRY_BREAKERS = ("\n", ":", "\"", "*")
"""llama.cpp's default DRY sequence breakers."""
PENALTY_RANGE = 2.0
"""Frequency and presence penalties lie in [-this, this] (OpenAI's range)."""
BIAS_RANGE = 100.0
"""A logit bias lies in [-this, this] (OpenAI's range), or is ``-inf`` (a banned token)."""
MAX_BREAKERS = 32
"""Most DRY sequence breakers (each is looked for in every token of the vocabulary once)."""
BREAKER_BYTES = 40
"""A longer breaker is cut to this many bytes (llama.cpp's limit)."""
TAIL_TOKENS = 20
"""A breaker's tokens after the first are matched up to this many (llama.cpp's limit)."""
_FLOAT_MAX_LOG = np.float32(88.7228391)
"""log of the largest float32: DRY's exponent is capped below it."""

Penalty = Callable[[np.ndarray, Sequence[int]], np.ndarray]
"""``penalty(scores, history) -> scores``, changed in place."""
Breakers = Mapping[int, tuple[tuple[int, ...], ...]]
"""DRY's restart sequences: a head token -> the token tails that follow it (empty: the head
alone is a breaker)."""


# -- checks --------------------------------------------------------------------------------
def check_penalties(s: Any) -> None:
    """Check the penalty fields of ``s`` (a :class:`~eft_local.sampler.SamplerSettings`;
    one-line errors name the field and its range); store ``logit_bias`` as sorted (id,
    bias) pairs and the breakers as a tuple."""
    field = check_field
    field(is_number(s.repeat_penalty) and _positive32(s.repeat_penalty), "repeat_penalty",
          s.repeat_penalty, "a finite number > 0 (1 = off)")
    for name in ("frequency_penalty", "presence_penalty"):
        value = getattr(s, name)
        field(is_number(value) and -PENALTY_RANGE <= value <= PENALTY_RANGE, name, value,
              f"in [-{PENALTY_RANGE:g}, {PENALTY_RANGE:g}] (0 = off)")
    for name in ("repeat_last_n", "dry_penalty_last_n"):
        value = getattr(s, name)
        field(_integer(value) and value >= -1, name, value,
              "an integer >= -1 (-1 = the whole context, 0 = off)")
    field(is_number(s.dry_multiplier) and 0 <= s.dry_multiplier < math.inf, "dry_multiplier",
          s.dry_multiplier, "a finite number >= 0 (0 = off)")
    field(is_number(s.dry_base) and 1 <= s.dry_base < math.inf, "dry_base", s.dry_base,
          "a finite number >= 1")
    field(_integer(s.dry_allowed_length) and s.dry_allowed_length >= 0,
          "dry_allowed_length", s.dry_allowed_length, "an integer >= 0")
    breakers = s.dry_sequence_breakers
    field(isinstance(breakers, (list, tuple)) and len(breakers) <= MAX_BREAKERS
          and all(isinstance(b, str) and b for b in breakers), "dry_sequence_breakers",
          breakers, f"a list of at most {MAX_BREAKERS} non-empty strings")
    object.__setattr__(s, "dry_sequence_breakers", tuple(breakers))
    object.__setattr__(s, "logit_bias", _bias_pairs(s.logit_bias))


def _positive32(value: float) -> bool:
    """``value`` and its inverse are finite and positive in float32 (llama.cpp's check)."""
    with np.errstate(over="ignore", divide="ignore"):
        x = np.float32(value)
        return bool(0 < x < np.inf and np.isfinite(np.float32(1.0) / x))


def _integer(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _bias_pairs(value: Any) -> tuple[tuple[int, float], ...]:
    """``logit_bias`` (a mapping or pairs) as sorted (id, bias) pairs; the biases of an id
    given twice add up (as in llama.cpp)."""
    want = (f"token id -> bias, each bias in [-{BIAS_RANGE:g}, {BIAS_RANGE:g}] or -inf "
            "(banned)")
    try:
        pairs = [(t, b) for t, b in (value.items() if isinstance(value, Mapping) else value)]
    except (TypeError, ValueError):
        raise EftError(f"invalid logit_bias {value!r}: must be {want}") from None
    out: dict[int, float] = {}
    for token, bias in pairs:
        check_field(_integer(token) and token >= 0, "logit_bias", {token: bias},
                    "a token id (an integer >= 0) -> bias")
        check_field(is_number(bias) and (-BIAS_RANGE <= bias <= BIAS_RANGE
                                       or bias == -math.inf), "logit_bias", {token: bias}, want)
        out[token] = out.get(token, 0.0) + float(bias)
    return tuple(sorted(out.items()))


# -- the links -----------------------------------------------------------------------------
def window(history: Sequence[int], last_n: int) -> np.ndarray:
    """The last ``last_n`` tokens of ``history`` (-1: all of them) as an int64 array."""
    recent = history if last_n < 0 else history[max(0, len(history) - last_n):] if last_n \
        else ()
    return np.asarray(recent, dtype=np.int64)


def bias_link(pairs: Sequence[tuple[int, float]]) -> Penalty:
    """Add each (id, bias) pair's bias to that token's score."""
    ids = np.array([t for t, _ in pairs], dtype=np.int64)
    biases = np.array([b for _, b in pairs], dtype=np.float32)

    def apply(scores: np.ndarray, _history: Sequence[int]) -> np.ndarray:
        scores[ids] += biases
        return scores

    return apply


def repetition_link(last_n: int, repeat: float, frequency: float, presence: float
                    ) -> Penalty:
    """llama.cpp's penalties over the last ``last_n`` tokens (see the module docstring)."""
    rep, freq, pres = np.float32(repeat), np.float32(frequency), np.float32(presence)

    def apply(scores: np.ndarray, history: Sequence[int]) -> np.ndarray:
        recent = window(history, last_n)
        if not recent.size:
            return scores
        ids, counts = np.unique(recent, return_counts=True)
        inside = (ids >= 0) & (ids < scores.size)
        ids, counts = ids[inside], counts[inside]
        got = scores[ids]
        with np.errstate(over="ignore", invalid="ignore"):
            got = np.where(got <= 0, got * rep, got / rep)
            got -= counts.astype(np.float32) * freq + pres
        scores[ids] = got
        return scores

    return apply


def dry_link(multiplier: float, base: float, allowed: int, last_n: int,
             breakers: Breakers) -> Penalty:
    """llama.cpp's DRY over the last ``last_n`` tokens, with the restart sequences
    ``breakers`` (see the module docstring and :func:`restart_sequences`)."""
    heads = np.array(sorted(breakers), dtype=np.int64)
    alone = np.array(sorted(h for h, tails in breakers.items() if () in tails),
                     dtype=np.int64)
    base32 = np.float32(base)
    cap = int(_FLOAT_MAX_LOG / np.log(base32)) if base32 > np.float32(1.000001) else 0
    scale, grow = float(np.float32(multiplier)), float(base32)
    # a repeat longer than this costs no more: the exponent is capped (or base is 1)
    enough = allowed + cap if cap > 0 else allowed if base32 == 1 else None

    def apply(scores: np.ndarray, history: Sequence[int]) -> np.ndarray:
        recent = window(history, last_n)
        n = recent.size
        if n <= allowed:
            return scores
        limit = _restart_limit(recent, heads, breakers)
        if limit < allowed:
            return scores
        counts = _suffix_matches(recent, limit if enough is None else min(limit, enough))
        ends = np.flatnonzero(counts >= allowed)
        if not ends.size:
            return scores
        ids, inverse = np.unique(recent[ends + 1], return_inverse=True)
        longest = np.zeros(ids.size, dtype=np.int64)
        np.maximum.at(longest, inverse, counts[ends])
        keep = (ids >= 0) & (ids < scores.size) & ~np.isin(ids, alone)
        exponent = longest[keep] - allowed
        if cap > 0:
            exponent = np.minimum(exponent, cap)
        with np.errstate(over="ignore"):
            scores[ids[keep]] -= (scale * np.power(grow, exponent.astype(np.float64))
                                  ).astype(np.float32)
        return scores

    return apply


def _restart_limit(recent: np.ndarray, heads: np.ndarray, breakers: Breakers) -> int:
    """How far back a repeat may reach: the tokens after the most recent complete restart
    sequence (all of ``recent`` when none)."""
    n = recent.size
    if heads.size:
        for pos in np.flatnonzero(np.isin(recent, heads))[::-1]:
            after = n - 1 - int(pos)  # tokens after the head
            longest = -1
            for tail in breakers[int(recent[pos])]:
                k = len(tail)
                if longest < k <= after and tuple(recent[pos + 1: pos + 1 + k].tolist()) == tail:
                    longest = k
            if longest >= 0:
                return after - longest
    return n


def _suffix_matches(recent: np.ndarray, limit: int) -> np.ndarray:
    """For each position j before the last: how many tokens ending at j equal the last
    tokens of ``recent`` (the longest such run, at most ``limit``)."""
    counts = np.zeros(recent.size - 1, dtype=np.int64)
    if limit <= 0:
        return counts
    last = recent.size - 1
    alive = np.flatnonzero(recent[:-1] == recent[-1])
    length = 1
    while alive.size:
        counts[alive] = length
        if length >= limit:
            break
        alive = alive[alive >= length]
        alive = alive[recent[alive - length] == recent[last - length]]
        length += 1
    return counts


# -- DRY's breakers as tokens --------------------------------------------------------------
class PieceIndex:
    """Every token's bytes in one buffer: a vocabulary searched for a breaker at C speed."""

    def __init__(self, pieces: Sequence[bytes]) -> None:
        self.blob = b"".join(pieces)
        self.bytes = np.frombuffer(self.blob, dtype=np.uint8)
        self.lengths = np.fromiter(map(len, pieces), dtype=np.int64, count=len(pieces))
        self.ends = np.cumsum(self.lengths)
        """Where each token's bytes end in :attr:`blob`."""
        self.last = np.full(len(pieces), -1, dtype=np.int64)
        """Each token's last byte (-1: none)."""
        some = self.lengths > 0
        self.last[some] = self.bytes[self.ends[some] - 1]


def restart_sequences(text: str, index: PieceIndex, tokenize: Callable[[str], list[int]]
                      ) -> list[tuple[int, tuple[int, ...]]]:
    """The token sequences that spell the breaker ``text`` (llama.cpp's definition), by
    token id: every token whose bytes hold the whole breaker, alone; and every token whose
    bytes end with a beginning of it, followed by the rest of it as tokenized (at most
    :data:`TAIL_TOKENS` tokens; a rest that starts inside a character matches nothing)."""
    word = text.encode("utf-8")[:BREAKER_BYTES]
    starts = np.array([m.start() for m in re.finditer(b"(?=" + re.escape(word) + b")",
                                                      index.blob)], dtype=np.int64)
    owner = np.searchsorted(index.ends, starts, side="right")  # the token each starts in
    holders = np.unique(owner[starts + len(word) <= index.ends[owner]])
    found: list[tuple[int, int, tuple[int, ...]]] = [(int(t), 0, ()) for t in holders]
    for k in range(1, len(word)):  # the last k bytes of a token are the breaker's first k
        ids = np.flatnonzero((index.lengths >= k) & (index.last == word[k - 1]))
        for j in range(k - 1):
            ids = ids[index.bytes[index.ends[ids] - k + j] == word[j]]
        ids = ids[~np.isin(ids, holders)]
        if not ids.size:
            continue
        try:
            rest = word[k:].decode("utf-8")
        except UnicodeDecodeError:
            continue
        tail = tuple(tokenize(rest)[:TAIL_TOKENS])
        found += [(int(t), -k, tail) for t in ids]
    out = [(token, tail) for token, _k, tail in sorted(found)]  # longest match first
    return list(dict.fromkeys(out))


class BreakerTable:
    """DRY's restart sequences over one model's vocabulary (its ``piece`` and
    ``tokenize``), each breaker worked out once and kept."""

    KEEP = 64
    """Breakers kept (a server's clients may send their own)."""

    def __init__(self, model: Any) -> None:
        self.model = model
        self._index: PieceIndex | None = None
        self._done: dict[str, list[tuple[int, tuple[int, ...]]]] = {}

    def __call__(self, strings: Sequence[str]) -> Breakers:
        """The restart sequences of ``strings``, merged."""
        if self._index is None:
            self._index = PieceIndex([self.model.piece(t, special=True)
                                      for t in range(self.model.n_vocab)])
        merged: dict[int, list[tuple[int, ...]]] = {}
        for text in strings:
            found = self._done.get(text)
            if found is None:
                if len(self._done) >= self.KEEP:
                    self._done.clear()
                found = self._done[text] = restart_sequences(
                    text, self._index,
                    lambda rest: self.model.tokenize(rest, add_bos=False, special=False))
            for head, tail in found:
                tails = merged.setdefault(head, [])
                if tail not in tails:
                    tails.append(tail)
        return {head: tuple(tails) for head, tails in merged.items()}


# -- building ------------------------------------------------------------------------------
def make_penalties(s: Any, *, width: int,
                   breakers: Callable[[Sequence[str]], Breakers] | None = None
                   ) -> Penalty | None:
    """The penalty links of ``s`` (a :class:`~eft_local.sampler.SamplerSettings`) in
    llama.cpp's order, as one function; None when every penalty is off. ``width``: how many
    token ids the scores hold (a biased id beyond is refused); ``breakers`` turns DRY's
    breakers into restart sequences (None: none)."""
    links: list[Penalty] = []
    if s.logit_bias:
        outside = next((t for t, _ in s.logit_bias if t >= width), None)
        if outside is not None:
            raise EftError(f"invalid logit_bias: token id {outside} is outside the vocabulary "
                           f"the models share (0..{width - 1})")
        links.append(bias_link(s.logit_bias))
    if s.repeat_last_n != 0 and (s.repeat_penalty != 1.0 or s.frequency_penalty != 0.0
                                 or s.presence_penalty != 0.0):
        links.append(repetition_link(s.repeat_last_n, s.repeat_penalty, s.frequency_penalty,
                                     s.presence_penalty))
    if s.dry_multiplier != 0.0 and s.dry_penalty_last_n != 0:
        table = breakers(s.dry_sequence_breakers) if breakers and s.dry_sequence_breakers \
            else {}
        links.append(dry_link(s.dry_multiplier, s.dry_base, s.dry_allowed_length,
                              s.dry_penalty_last_n, table))
    if not links:
        return None
    if len(links) == 1:
        return links[0]
    chain = tuple(links)

    def apply(scores: np.ndarray, history: Sequence[int]) -> np.ndarray:
        for link in chain:
            scores = link(scores, history)
        return scores

    return apply
