"""How far one mixed distribution is from another, position by position (pure NumPy).

The reference's distributions are kept compressed, as a cache on disk would hold them: per
position its ``k`` most likely token ids with their log-probs and the probability mass left
over. :func:`kl_topk` is then KL(reference || candidate) between the two distributions
coarsened to those ``k`` tokens plus one "everything else" bucket: exact when the leftover
mass is 0 (``k`` at least the vocabulary), and never above the full KL otherwise.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from eft_local.errors import EftError


@dataclass(frozen=True)
class TopK:
    """Compressed distributions: ``ids``/``logprobs`` (positions, k), best first (ties by
    lower id), and ``rest``, the probability mass outside them, per position."""

    ids: np.ndarray
    logprobs: np.ndarray
    rest: np.ndarray

    @property
    def top1(self) -> np.ndarray:
        """The most likely id per position."""
        return self.ids[:, 0]

    @staticmethod
    def concat(parts: Sequence[TopK]) -> TopK:
        """Positions of several parts, in order."""
        return TopK(np.concatenate([p.ids for p in parts]),
                    np.concatenate([p.logprobs for p in parts]),
                    np.concatenate([p.rest for p in parts]))


def top_k(logprobs: np.ndarray, k: int) -> TopK:
    """The ``k`` most likely ids of each row of ``logprobs`` (positions, width)."""
    if k < 1:
        raise EftError(f"invalid top-k {k}: must be >= 1")
    n, width = logprobs.shape
    k = min(k, width)
    part = np.argpartition(-logprobs, k - 1, axis=1)[:, :k] if k < width else np.tile(
        np.arange(width), (n, 1))
    values = np.take_along_axis(logprobs, part, axis=1)
    order = np.lexsort((part, -values), axis=1)  # by value, ties by the lower id
    ids = np.take_along_axis(part, order, axis=1).astype(np.int32)
    lps = np.take_along_axis(values, order, axis=1).astype(np.float32)
    kept = np.exp(lps.astype(np.float64)).sum(axis=1)
    return TopK(ids, lps, np.clip(1.0 - kept, 0.0, 1.0).astype(np.float32))


def kl_topk(ref: TopK, logprobs: np.ndarray) -> np.ndarray:
    """KL(reference || candidate) per position, in nats, on the coarsened distributions.

    ``logprobs`` (positions, width) is the candidate; reference ids beyond its width have
    probability 0 there (infinite KL when the reference gives them mass).
    """
    width = logprobs.shape[1]
    inside = ref.ids < width
    q = np.where(inside, np.take_along_axis(logprobs, np.minimum(ref.ids, width - 1), axis=1),
                 -np.inf).astype(np.float64)
    p = ref.logprobs.astype(np.float64)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        terms = np.where(np.isfinite(p), np.exp(p) * (p - q), 0.0)
        kl = terms.sum(axis=1)
        rest_p = ref.rest.astype(np.float64)
        # as top_k computes the reference's rest (float32), so that a distribution compared
        # with itself gives exactly 0
        rest_q = np.clip(1.0 - np.exp(q).sum(axis=1), 0.0, 1.0).astype(np.float32)
        rest_q = np.maximum(rest_q.astype(np.float64), 1e-12)
        tail = np.where(rest_p > 0, rest_p * (np.log(rest_p) - np.log(rest_q)), 0.0)
    return np.maximum(kl + tail, 0.0)


@dataclass(frozen=True)
class Quality:
    """Closeness to the reference over a text."""

    kl_mean: float
    kl_p99: float
    top1_agreement: float
    perplexity: float
    positions: int

    def to_dict(self) -> dict[str, float]:
        """JSON-ready form."""
        return {"kl_mean": self.kl_mean, "kl_p99": self.kl_p99,
                "top1_agreement": self.top1_agreement, "perplexity": self.perplexity,
                "positions": self.positions}


def summarise(kl: np.ndarray, agree: np.ndarray, nll: np.ndarray) -> Quality:
    """Mean and 99th percentile KL, share of agreeing top-1 ids, exp(mean NLL)."""
    if kl.size == 0:
        raise EftError("the text gave no position to compare (it needs at least 2 tokens)")
    return Quality(kl_mean=float(np.mean(kl)), kl_p99=float(np.percentile(kl, 99)),
                   top1_agreement=float(np.mean(agree)),
                   perplexity=float(np.exp(np.mean(nll))), positions=int(kl.size))


def pareto(points: Sequence[tuple[float, float, float]]) -> list[bool]:
    """For (kl, speed, memory) points: True where no other point dominates, that is, is at
    least as good on every axis (kl and memory lower or equal, speed higher or equal) and
    strictly better on one. Equal points do not dominate each other."""
    costs = np.asarray(points, dtype=np.float64).reshape(-1, 3) * [1.0, -1.0, 1.0]
    mine, theirs = costs[:, None, :], costs[None, :, :]  # [i, j]: point j against point i
    as_good = (theirs <= mine).all(axis=2)  # lower is better on every axis now
    better = (theirs < mine).any(axis=2)
    return (~(as_good & better).any(axis=1)).tolist()
