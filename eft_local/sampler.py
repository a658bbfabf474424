"""Pure NumPy sampling: combine models' logit rows by formula weights, filter, draw.

Every function takes arrays (and, to draw, a uniform number) and returns arrays or ints,
so each is deterministic and testable on its own. Log-probs are float32; rejected tokens
are ``-inf``. The random number for position ``n`` comes from :func:`uniform_for`, which
depends only on the seed and the position: that is what makes speculative and plain
decoding give identical text.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from eft_local.errors import EftError
from eft_local.limits import TEMPERATURE_RANGE

NEG_INF = np.float32(-np.inf)
_BLOCK = 1024


@dataclass(frozen=True)
class SamplerSettings:
    """Knobs applied to the mixed distribution, validated on creation.

    ``conservative_top_p``: paper section 4.4 (:func:`conservative_mix`). Outside the top-p
    set of the conservative (fine-tuned) model, a token keeps that model's own log-prob
    instead of the weighted sum; the result is normalised once.
    """

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    seed: int = 0
    conservative_top_p: float | None = None

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


def _check(ok: bool, name: str, value: object, want: str) -> None:
    if not ok:
        raise EftError(f"invalid {name} {value!r}: must be {want}")


def log_softmax(x: np.ndarray) -> np.ndarray:
    """Numerically stable log-softmax of a 1-D row, float32; ``-inf`` entries stay ``-inf``."""
    x = np.asarray(x, dtype=np.float32)
    top = x.max()
    if not np.isfinite(top):
        raise EftError("every token of a row is masked or non-finite")
    shifted = x - top
    return shifted - np.float32(np.log(np.exp(shifted, dtype=np.float32).sum(dtype=np.float64)))


def mix_logits(rows: np.ndarray, weights: np.ndarray, allowed: np.ndarray | None = None
               ) -> np.ndarray:
    """Weighted sum of raw logit rows ``(n_models, width)``, renormalised to log-probs.

    Each row's own log-normaliser is a constant per row, so summing log_softmax'ed rows and
    renormalising gives exactly this; ``allowed`` (bool, width) masks rows outside the
    common token range after the sum, so negative weights never meet ``-inf``.
    """
    mixed = _weighted_sum(rows, weights)
    if allowed is not None:
        mixed[~allowed] = NEG_INF
    top = mixed.max()
    if np.isnan(top) or top == np.inf:
        raise _overflow(weights)
    return log_softmax(mixed)


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
    """Bool mask of the smallest set of most likely tokens whose mass reaches ``top_p``."""
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


def filter_logprobs(logprobs: np.ndarray, s: SamplerSettings) -> np.ndarray:
    """Temperature, then top-k, top-p and min-p; returns renormalised log-probs."""
    out = logprobs / np.float32(s.temperature) if s.temperature not in (0.0, 1.0) else logprobs
    if s.top_k and s.top_k < out.size:
        kth = np.partition(out, out.size - s.top_k)[out.size - s.top_k]
        out = np.where(out >= kth, out, NEG_INF)
    if s.top_p < 1.0:
        out = np.where(top_p_mask(out, s.top_p), out, NEG_INF)
    if s.min_p > 0.0:
        out = np.where(out >= out.max() + np.float32(math.log(s.min_p)), out, NEG_INF)
    return log_softmax(out) if out is not logprobs else out


def uniform_for(seed: int, position: int) -> float:
    """The uniform draw in [0, 1) used at absolute token position ``position``."""
    return float(np.random.default_rng((seed, position)).random())


def draw(logprobs: np.ndarray, u: float, *, greedy: bool = False) -> int:
    """Inverse-CDF sample of a token id with uniform ``u``; ``greedy`` takes the argmax."""
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


def pick(logprobs: np.ndarray, settings: SamplerSettings, position: int) -> tuple[int, np.ndarray]:
    """Filter ``logprobs`` by ``settings`` and draw the token for ``position``."""
    final = filter_logprobs(logprobs, settings)
    greedy = settings.temperature == 0.0
    u = 0.0 if greedy else uniform_for(settings.seed, position)
    return draw(final, u, greedy=greedy), final


def top_tokens(logprobs: np.ndarray, k: int = 5) -> list[tuple[int, float]]:
    """The ``k`` most likely token ids with their probabilities, best first."""
    k = min(k, logprobs.size)
    if k < 1:
        return []
    idx = np.argpartition(logprobs, logprobs.size - k)[-k:]
    idx = idx[np.argsort(-logprobs[idx], kind="stable")]
    return [(int(i), float(np.exp(logprobs[i]))) for i in idx]
