"""Pure NumPy sampling: combine models' logit rows by formula weights, filter, draw.

Sampling is a chain of small filters built once from :class:`SamplerSettings` by
:func:`make_sampler` (the shape of mlx-lm's ``make_sampler``). The order, in one place
(:func:`make_filters`): **temperature, then top-k, then top-p, then min-p**, then the draw.
Temperature 0 short-circuits to the argmax. Each filter takes scores (log-probs up to an
additive constant, float32) and returns scores with rejected tokens at ``-inf``; it may work
in place. No filter needs normalised input, so a step never pays for a log-softmax.

The draw at absolute position ``n`` is an exponential race (the Gumbel-max trick) with noise
that depends only on the seed and ``n`` (:func:`race`): exact sampling, and since a drafting
model draws with the same noise at the same position, draft and mix agree close to the
optimum sum(min(p, q)) of any coupling; plain and speculative decoding draw each position
alike, so they give identical text wherever the models' rows do not depend on batching
(llama.cpp's batched rows differ by about 1e-5: see :mod:`eft_local.speculative`).
"""

from __future__ import annotations

import math
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import numpy.random  # noqa: F401  (loaded lazily otherwise: 20 ms inside the first step)

from eft_local import penalties
from eft_local.errors import EftError
from eft_local.errors import check_field as _check
from eft_local.limits import TEMPERATURE_RANGE

NEG_INF = np.float32(-np.inf)
_BLOCK = 1024
"""Tokens per block of the inverse-CDF draw."""

Filter = Callable[[np.ndarray], np.ndarray]
"""One link of the chain: scores in, scores out (rejected tokens ``-inf``), maybe in place."""


@dataclass(frozen=True)
class SamplerSettings:
    """Knobs applied to the mixed distribution, validated on creation.

    ``conservative_top_p``: paper section 4.4 (:func:`conservative_mix`). Outside the top-p
    set of the conservative (fine-tuned) model, a token keeps that model's own log-prob
    instead of the weighted sum; the result is normalised once.

    The penalties (``logit_bias``, ``repeat_penalty``, ``frequency_penalty``,
    ``presence_penalty``, DRY) have llama.cpp's definitions and defaults, all neutral; they
    change the mix's scores before temperature and the filters
    (:mod:`eft_local.penalties`). ``repeat_last_n`` and ``dry_penalty_last_n``: how many of
    the sequence's last tokens (prompt included) they look at; -1 all of them, 0 none.
    ``logit_bias``: (token id, bias) pairs, or a mapping id -> bias; ``-inf`` bans a token.
    """

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    seed: int = 0
    conservative_top_p: float | None = None
    repeat_penalty: float = 1.0
    repeat_last_n: int = 64
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    dry_multiplier: float = 0.0
    dry_base: float = 1.75
    dry_allowed_length: int = 2
    dry_penalty_last_n: int = 64
    dry_sequence_breakers: tuple[str, ...] = penalties.DRY_BREAKERS
    logit_bias: tuple[tuple[int, float], ...] = ()

    @property
    def penalized(self) -> bool:
        """True when some penalty changes the scores (see :mod:`eft_local.penalties`)."""
        return bool(self.logit_bias) or (self.repeat_last_n != 0 and (
            self.repeat_penalty != 1.0 or self.frequency_penalty != 0.0
            or self.presence_penalty != 0.0)) or (
            self.dry_multiplier != 0.0 and self.dry_penalty_last_n != 0)

    def __post_init__(self) -> None:
        low, high = TEMPERATURE_RANGE
        _check(self.temperature == 0 or low <= self.temperature <= high, "temperature",
               self.temperature, f"0 (greedy) or in [{low:g}, {high:g}] (beyond, float32 "
               "overflows)")
        _check(isinstance(self.top_k, int) and self.top_k >= 0, "top_k", self.top_k,
               "an integer >= 0 (0 = off)")
        _check(0 < self.top_p <= 1, "top_p", self.top_p, "in (0, 1]")
        _check(0 <= self.min_p < 1, "min_p", self.min_p, "in [0, 1)")
        _check(isinstance(self.seed, int) and self.seed >= 0, "seed", self.seed,
               "an integer >= 0")
        if self.conservative_top_p is not None:
            _check(0 < self.conservative_top_p <= 1, "conservative_top_p",
                   self.conservative_top_p, "in (0, 1]")
        penalties.check_penalties(self)


# -- mixing --------------------------------------------------------------------------------
def log_softmax(x: np.ndarray) -> np.ndarray:
    """Numerically stable log-softmax of each row (the last axis), float32; ``-inf``
    entries stay ``-inf``."""
    x = np.asarray(x, dtype=np.float32)
    top = x.max(axis=-1, keepdims=True)
    if not np.isfinite(top).all():
        raise EftError("every token of a row is masked or non-finite")
    shifted = x - top
    norm = np.log(np.exp(shifted, dtype=np.float32).sum(axis=-1, keepdims=True,
                                                         dtype=np.float64))
    return shifted - norm.astype(np.float32)


def mix_scores(rows: np.ndarray, weights: np.ndarray, blocked: np.ndarray | None = None,
               out: np.ndarray | None = None) -> np.ndarray:
    """Weighted sum of raw logit rows ``(n_models, width)`` into ``out``: the mix's log-probs
    up to a constant. Each row's log-normaliser is a constant, so this equals the sum of
    log-softmaxed rows up to a shift. ``blocked`` (token ids) are set to ``-inf`` after the
    sum, so negative weights never meet ``-inf``; models of weight 0 are skipped. Rows of
    several positions ``(n_models, positions, width)`` give ``(positions, width)``."""
    rows = np.asarray(rows, dtype=np.float32)
    weights = np.asarray(weights, dtype=np.float32).ravel()
    if out is None:
        out = np.empty(rows.shape[1:], dtype=np.float32)
    first = True
    with np.errstate(over="ignore", invalid="ignore"):
        for i, w in enumerate(weights):
            if w == 0:
                continue
            if first:
                np.multiply(rows[i], w, out=out)
                first = False
            elif w == 1:
                np.add(out, rows[i], out=out)
            elif w == -1:
                np.subtract(out, rows[i], out=out)
            else:
                out += w * rows[i]
    if first:
        out[:] = 0.0
    if blocked is not None and blocked.size:
        out[..., blocked] = NEG_INF
    top = out.max()
    if np.isnan(top) or top == np.inf:
        raise _overflow(weights)
    return out


def mix_logits(rows: np.ndarray, weights: np.ndarray, allowed: np.ndarray | None = None
               ) -> np.ndarray:
    """Weighted sum of raw logit rows ``(n_models, width)``, renormalised to log-probs;
    ``allowed`` (bool, width) masks rows outside the common token range. Rows of several
    positions ``(n_models, positions, width)`` give one row per position."""
    blocked = None if allowed is None else np.flatnonzero(~allowed)
    return log_softmax(mix_scores(rows, weights, blocked))


def _weighted_sum(rows: np.ndarray, weights: np.ndarray) -> np.ndarray:
    # einsum, not @: a BLAS matrix-vector product spawns threads that cost milliseconds
    # per step on busy cores at large vocabularies
    with np.errstate(over="ignore", invalid="ignore"):
        return np.einsum("m,mv->v", np.asarray(weights, dtype=np.float32),
                         np.asarray(rows, dtype=np.float32))


def _overflow(weights: np.ndarray) -> EftError:
    return EftError("the mix overflowed float32 (weights "
                    + ", ".join(f"{w:g}" for w in np.asarray(weights).ravel())
                    + "): lower beta/lam or the formula's numbers")


def conservative_mix(rows: np.ndarray, weights: np.ndarray, reference: int, top_p: float,
                     allowed: np.ndarray | None = None) -> np.ndarray:
    """Conservative decoding (paper section 4.4) of raw logit rows ``(n_models, width)``.

    With ``lp_m`` each model's own log-softmax over the allowed ids and ``ref`` the row at
    index ``reference`` (the fine-tuned model)::

        score(y) = sum_m w_m * lp_m(y)   if y is in the top-p set of lp_ref
        score(y) = lp_ref(y)             otherwise

    normalised once over all allowed ``y``. Tokens outside the set keep the reference's own
    log-prob, so an exploding large/small ratio on a rare token cannot reach them.
    """
    rows = np.asarray(rows, dtype=np.float32)
    weights = np.asarray(weights, dtype=np.float32)
    ok = None if allowed is None or allowed.all() else np.asarray(allowed, dtype=bool)
    lse = np.array([_logsumexp(row if ok is None else row[ok]) for row in rows])
    lp_ref = rows[reference] - np.float32(lse[reference])
    if ok is not None:
        lp_ref[~ok] = NEG_INF
    inside = top_p_mask(lp_ref, top_p)
    mixed = _weighted_sum(rows, weights) - np.float32(np.dot(weights, lse))
    if not np.isfinite(mixed[inside]).all():
        raise _overflow(weights)
    return log_softmax(np.where(inside, mixed, lp_ref))


def _logsumexp(x: np.ndarray) -> float:
    top = x.max() if x.size else -np.inf
    if not np.isfinite(top):
        raise EftError("every token of a row is masked or non-finite")
    return float(top + np.log(np.exp(x - top, dtype=np.float32).sum(dtype=np.float64)))


def top_p_mask(logprobs: np.ndarray, top_p: float) -> np.ndarray:
    """Bool mask of the smallest set of most likely tokens whose mass reaches ``top_p``
    (``logprobs`` may be off by a constant)."""
    if top_p >= 1.0:
        return np.isfinite(logprobs)
    probs = np.exp(logprobs - logprobs.max(), dtype=np.float32)
    total = float(probs.sum(dtype=np.float64))
    # Tokens below eps can hold at most (1 - top_p) / 2 of the mass together, so the top-p
    # set lies among the rest: sort only their values (exact, and cheap for peaked rows).
    eps = np.float32(total * (1.0 - top_p) / (2.0 * probs.size))
    values = np.sort(probs[probs > eps])[::-1]
    cum = np.cumsum(values, dtype=np.float64)
    keep = min(int(np.searchsorted(cum, top_p * total * (1 - 1e-12))) + 1, values.size)
    threshold = values[keep - 1]
    mask = probs > threshold
    ties = np.flatnonzero(probs == threshold)  # take just enough of the tied tokens
    mask[ties[: keep - int(mask.sum())]] = True
    return mask


# -- the filters, and the one place that orders them ---------------------------------------
def temperature_filter(temperature: float) -> Filter:
    """Divide the scores by ``temperature`` (> 0)."""
    inv = np.float32(1.0 / temperature)

    def apply(scores: np.ndarray) -> np.ndarray:
        return np.multiply(scores, inv, out=scores)

    return apply


def top_k_filter(k: int) -> Filter:
    """Keep the ``k`` best tokens (ties at the k-th score are all kept)."""
    def apply(scores: np.ndarray) -> np.ndarray:
        if k >= scores.size:
            return scores
        live = scores[scores > NEG_INF]  # numpy's partition crawls over many equal -infs
        if k >= live.size:
            return scores
        kth = np.partition(live, live.size - k)[live.size - k]
        scores[scores < kth] = NEG_INF
        return scores

    return apply


def top_p_filter(p: float) -> Filter:
    """Keep the smallest set of best tokens whose probability reaches ``p``."""
    def apply(scores: np.ndarray) -> np.ndarray:
        scores[~top_p_mask(scores, p)] = NEG_INF
        return scores

    return apply


def min_p_filter(p: float) -> Filter:
    """Drop tokens less likely than ``p`` times the best one."""
    log_p = np.float32(math.log(p))

    def apply(scores: np.ndarray) -> np.ndarray:
        scores[scores < scores.max() + log_p] = NEG_INF
        return scores

    return apply


def make_filters(s: SamplerSettings) -> tuple[Filter, ...]:
    """The chain for ``s``, in order: temperature, top-k, top-p, min-p (each only when it
    changes something). At temperature 0 the draw is the argmax, which every filter keeps,
    so the filters then only shape the reported probability."""
    chain: list[Filter] = []
    if s.temperature not in (0.0, 1.0):
        chain.append(temperature_filter(s.temperature))
    if s.top_k:
        chain.append(top_k_filter(s.top_k))
    if s.top_p < 1.0:
        chain.append(top_p_filter(s.top_p))
    if s.min_p > 0.0:
        chain.append(min_p_filter(s.min_p))
    return tuple(chain)


def filter_logprobs(logprobs: np.ndarray, s: SamplerSettings) -> np.ndarray:
    """The chain of ``s`` applied to a copy of ``logprobs``, renormalised to log-probs."""
    out = np.array(logprobs, dtype=np.float32)
    for link in make_filters(s):
        out = link(out)
    return log_softmax(out)


# -- drawing -------------------------------------------------------------------------------
class Pick(NamedTuple):
    """A drawn token, its probability and the best token's probability (after filters)."""

    token: int
    p: float
    p_top: float


Sampler = Callable[[np.ndarray, int], Pick]
"""``sampler(scores, position) -> Pick``; may change ``scores`` in place."""


def make_sampler(s: SamplerSettings) -> Sampler:
    """A sampler for ``s``: the filter chain, then the argmax (temperature 0) or the race
    seeded by ``(s.seed, position)``. Build it once per settings, call it every step."""
    chain = make_filters(s)
    greedy = s.temperature == 0.0
    seed = s.seed

    def sample(scores: np.ndarray, position: int) -> Pick:
        for link in chain:
            scores = link(scores)
        top = int(np.argmax(scores))
        best = scores[top]
        if not np.isfinite(best):
            raise EftError("every token of a row is masked or non-finite")
        probs = np.subtract(scores, best, out=scores)
        np.exp(probs, out=probs)
        total = float(probs.sum(dtype=np.float64))
        token = top if greedy else race(probs, seed, position)
        return Pick(token, float(probs[token]) / total, 1.0 / total)

    return sample


# -- drawing under a constraint (a grammar) --------------------------------------------------
Allows = Callable[[np.ndarray], np.ndarray]
"""``allows(ids)``: bool array, which of the token ids a constraint lets through next."""
Asked = tuple[list[np.ndarray], list[np.ndarray]]
"""Ids a constraint was asked about, and its answers."""

HEAD = (16, 256)
"""How many of the best candidates a constrained draw asks about, in two rounds, before it
asks about every token (the exact mask)."""


def _nothing_allowed() -> EftError:
    return EftError("the grammar allows no token here that the models can produce")


def mask_disallowed(scores: np.ndarray, allows: Allows, asked: Asked | None = None
                    ) -> np.ndarray:
    """Set the finite scores of the tokens ``allows`` refuses to ``-inf`` (in place); returns
    the refused ids. Asks about every token (those in ``asked`` excepted): exact, and the
    slow way at large vocabularies."""
    ids = np.flatnonzero(np.isfinite(scores))
    known = np.zeros(scores.size, dtype=np.int8)  # 0 unknown, 1 allowed, 2 refused
    if asked and asked[0]:
        known[np.concatenate(asked[0])] = np.where(np.concatenate(asked[1]), 1, 2)
    todo = known[ids] == 0
    ok = known[ids] == 1
    ok[todo] = allows(ids[todo])
    if not ok.any():
        raise _nothing_allowed()
    refused = ids[~ok]
    scores[refused] = NEG_INF
    return refused


def best_first(keys: np.ndarray, sizes: Sequence[int] = HEAD) -> Iterator[np.ndarray]:
    """Token ids in decreasing order of ``keys``, in chunks that end at the ``sizes`` best,
    finite keys only, none twice: a search that stops early sorts only what it saw."""
    seen = 0
    for size in sizes:
        size = min(size, keys.size)
        if size <= seen:
            return
        top = np.argpartition(-keys, size - 1)[:size] if size < keys.size else np.arange(size)
        top = top[np.argsort(-keys[top], kind="stable")][seen:]
        seen = size
        fresh = top[np.isfinite(keys[top])]
        if fresh.size:
            yield fresh
        if fresh.size < top.size:  # the rest is -inf
            return


def grammar_pick(sample: Sampler, scores: np.ndarray, s: SamplerSettings, position: int,
                 allows: Allows) -> Pick:
    """Draw as ``sample`` (the sampler of ``s``) would from ``scores`` restricted to the
    tokens ``allows`` lets through: the constraint applies to the mix, before the filters
    and the draw. ``scores`` may be changed in place.

    Asking about every token costs milliseconds per step at large vocabularies (llama.cpp's
    grammar engine decodes each one), so the draw first asks only about the best candidates
    (:data:`HEAD`): the race's winner among the allowed tokens is the first allowed one in
    the order of the race's keys (the argmax: in the order of scores); with top-k or min-p
    the filtered set is known once enough of the best allowed tokens are. Where the head does
    not settle the draw, and with top-p (which needs the mass of every allowed token), every
    token is asked about (:func:`mask_disallowed`) and ``sample`` draws. Settled in the head
    without a filter, ``p`` and ``p_top`` are those before the constraint (the constrained
    probability is at least ``p``)."""
    asked: Asked = ([], [])
    if s.top_p == 1.0:
        scaled = scores if s.temperature in (0.0, 1.0) else scores * np.float32(
            1.0 / s.temperature)
        search = _filtered_pick if s.top_k or s.min_p > 0.0 else _first_pick
        picked = search(scaled, s, position, allows, asked)
        if picked is not None:
            return picked
    mask_disallowed(scores, allows, asked)
    return sample(scores, position)


def _ask(allows: Allows, ids: np.ndarray, asked: Asked) -> np.ndarray:
    ok = np.asarray(allows(ids), dtype=bool)
    asked[0].append(ids)
    asked[1].append(ok)
    return ok


def _log_keys(scaled: np.ndarray, s: SamplerSettings, position: int) -> np.ndarray:
    """The race's keys in logs: log p_i - log E_i (the scores themselves at temperature 0)."""
    if s.temperature == 0.0:
        return scaled
    with np.errstate(divide="ignore"):
        return scaled - np.log(-race_noise(s.seed, position, scaled.size))


def _first_pick(scaled: np.ndarray, s: SamplerSettings, position: int, allows: Allows,
                asked: Asked) -> Pick | None:
    """No filter: the first allowed token in the order of the race's keys."""
    for chunk in best_first(_log_keys(scaled, s, position)):
        ok = _ask(allows, chunk, asked)
        if ok.any():
            token = int(chunk[np.argmax(ok)])
            top = float(scaled.max())
            total = float(np.exp(scaled - top).sum(dtype=np.float64))
            return Pick(token, math.exp(float(scaled[token]) - top) / total, 1.0 / total)
    return None


def _filtered_pick(scaled: np.ndarray, s: SamplerSettings, position: int, allows: Allows,
                   asked: Asked) -> Pick | None:
    """Top-k (ties at the k-th kept) and min-p over the allowed tokens, best first."""
    found: list[np.ndarray] = []
    count, floor = 0, -np.inf
    n_finite = int(np.isfinite(scaled).sum())
    seen = 0
    settled = False
    for chunk in best_first(scaled):
        seen += chunk.size
        ok = _ask(allows, chunk, asked)
        good = chunk[ok]
        if good.size and not count and s.min_p > 0.0:
            floor = max(floor, float(scaled[good[0]]) + math.log(s.min_p))
        if s.top_k and count < s.top_k <= count + good.size:
            floor = max(floor, float(scaled[good[s.top_k - count - 1]]))
        found.append(good)
        count += good.size
        if seen == n_finite or (np.isfinite(floor) and scaled[chunk[-1]] < floor):
            settled = True
            break
    if not settled:
        return None
    kept = np.concatenate(found)
    kept = kept[scaled[kept] >= floor]
    if not kept.size:
        raise _nothing_allowed()
    top = scaled[kept[0]]
    probs = np.exp(scaled[kept] - top)
    total = float(probs.sum(dtype=np.float64))
    i = 0 if s.temperature == 0.0 else int(np.argmax(_log_keys(scaled, s, position)[kept]))
    return Pick(int(kept[i]), float(probs[i]) / total, 1.0 / total)


def race(probs: np.ndarray, seed: int, position: int) -> int:
    """An exact sample from ``probs`` (non-negative, not normalised) with the noise of
    ``(seed, position)``: the exponential race, argmax p_i / E_i with E_i ~ Exp(1) (the
    Gumbel-max trick: log p_i - log E_i is log p_i plus Gumbel noise). Every distribution
    drawn at a position meets the same noise, so two models' draws agree with probability
    close to the optimum sum(min(p, q))."""
    neg = race_noise(seed, position, probs.size)  # -E_i
    # p_i / -E_i <= 0: the most negative is the largest p_i / E_i
    return int(np.argmin(np.divide(probs, neg, out=_scratch(probs.size))))


_NOISE: OrderedDict[tuple[int, int, int], np.ndarray] = OrderedDict()
_NOISE_KEEP = 24  # a drafted block and its verification read the same positions
_NOISE_LOCK = threading.Lock()
_SCRATCH = threading.local()


def race_noise(seed: int, position: int, n: int) -> np.ndarray:
    """Minus the Exp(1) noise of ``n`` tokens at ``position``: log(1 - v) with v uniform in
    (0, 1), precise near 0 (read-only; the last few positions' noise is kept, since a draft
    and its verification draw at the same positions)."""
    key = (seed, position, n)
    with _NOISE_LOCK:
        found = _NOISE.get(key)
        if found is not None:
            _NOISE.move_to_end(key)
            return found
    raw = np.random.SFC64((seed, position)).random_raw((n + 1) // 2).view(np.uint32)[:n]
    neg = np.multiply(raw, np.float32(-(2.0**-32)), dtype=np.float32)
    neg -= np.float32(2.0**-33)  # -v, never 0; v rounded to 1 gives -inf: that token loses
    with np.errstate(divide="ignore"):
        np.log1p(neg, out=neg)
    neg.flags.writeable = False
    with _NOISE_LOCK:
        _NOISE[key] = neg
        while len(_NOISE) > _NOISE_KEEP:
            _NOISE.popitem(last=False)
    return neg


def _scratch(n: int) -> np.ndarray:
    buf = getattr(_SCRATCH, "buf", None)
    if buf is None or buf.size != n:
        buf = _SCRATCH.buf = np.empty(n, dtype=np.float32)
    return buf


def uniform_for(seed: int, position: int) -> float:
    """A uniform number in [0, 1) for ``position``: the noise of :func:`draw`."""
    return float(np.random.default_rng((seed, position)).random())


def draw(logprobs: np.ndarray, u: float, *, greedy: bool = False) -> int:
    """Inverse-CDF sample of a token id with uniform ``u`` (token-id order; the coupling
    this project used before the race, kept to compare); ``greedy`` takes the argmax."""
    if greedy:
        return int(np.argmax(logprobs))
    probs = np.exp(logprobs - logprobs.max())
    n = probs.size
    pad = (-n) % _BLOCK
    blocks = np.pad(probs, (0, pad)).reshape(-1, _BLOCK).sum(axis=1, dtype=np.float64)
    target = u * blocks.sum()
    cum_blocks = np.cumsum(blocks)
    b = min(int(np.searchsorted(cum_blocks, target, side="right")), blocks.size - 1)
    before = cum_blocks[b - 1] if b else 0.0
    inner = np.cumsum(probs[b * _BLOCK:(b + 1) * _BLOCK], dtype=np.float64)
    i = min(int(np.searchsorted(inner, target - before, side="right")), inner.size - 1)
    idx = b * _BLOCK + i
    while probs[idx] == 0.0:  # u landed exactly on a boundary next to a rejected token
        idx -= 1
    return idx


def top_logprobs(logprobs: np.ndarray, n: int) -> tuple[tuple[int, float], ...]:
    """The ``n`` most likely ids of a log-prob row with their log-probs, best first."""
    n = min(n, logprobs.size)
    if n < 1:
        return ()
    idx = np.argpartition(logprobs, logprobs.size - n)[-n:]
    idx = idx[np.argsort(-logprobs[idx], kind="stable")]
    return tuple((int(i), float(logprobs[i])) for i in idx)
