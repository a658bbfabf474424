"""Choosing the size of the next speculative block from measured costs and acceptance.

:class:`BlockSizer` models acceptance as independent per drafted token and picks the block
size with the highest expected tokens per second; 0 means a plain step. Pure arithmetic:
:mod:`eft_local.speculative` feeds it what it measures.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np

K_MAX = 12
"""Largest adaptive block size."""
VERIFY_SLOPE = 0.5
"""Prior cost of one more token in a verification block, relative to a one-token decode
(measured on 2 CPU cores: 0.5-0.6; GPUs are far lower)."""
PROBE_EVERY = 64
"""While plain steps win, one speculative block every this many tokens re-measures."""
REPLAN_EVERY = 8
"""While plain steps win, the best block size is recomputed after this many observed steps
(the search costs about 20 us); after a speculative block it is recomputed at once, so one
block that did not pay is not followed by more of the same."""
PROBE_MARGIN = 0.8
"""A probe block is spent only when the best block is predicted at least this fraction of
the plain rate: blocks the measured costs say cannot pay are not probed."""

ACCEPTED_PRIOR, REJECTED_PRIOR = 1.2, 0.8
"""Prior counts of accepted drafts and rejections: alpha = 0.6, worth two observed blocks."""


@dataclass
class BlockSizer:
    """Chooses the block size from the observed acceptance and the observed costs.

    Acceptance is modelled as independent per drafted token with probability ``alpha``
    (decayed counts of accepted tokens and rejections); a block of ``k`` drafts then yields
    ``(1 - alpha**(k+1)) / (1 - alpha)`` tokens and costs ``k`` draft steps plus one
    verification of ``k + 1`` tokens by every model. ``k = 0`` is a plain step, so when
    verification is too dear for the acceptance seen, decoding falls back to plain steps
    (with a probe block now and then).
    """

    fixed: int | None = None
    k_max: int = K_MAX
    decay: float = 0.9
    accepted: float = ACCEPTED_PRIOR
    rejected: float = REJECTED_PRIOR
    slope: float = VERIFY_SLOPE
    draft_step: float | None = None  # seconds per drafted token (EMA)
    verify: dict[int, float] = field(default_factory=dict)  # block length -> seconds (EMA)
    probe_every: int = PROBE_EVERY
    plain_run: int = 0
    _plan: int | None = None
    _plan_age: int = 0
    plain_only: bool = False  # the last plan found that no block could pay

    @property
    def alpha(self) -> float:
        """Estimated probability that one drafted token is accepted."""
        return self.accepted / (self.accepted + self.rejected)

    def verify_cost(self, n: int) -> float:
        """Seconds to verify a block of ``n`` tokens: linear through the measured lengths,
        or the prior slope from the one measured length."""
        xs = sorted(self.verify)
        if len(xs) == 1:
            m = xs[0]
            return self.verify[m] * (1.0 + self.slope * (n - 1)) / (1.0 + self.slope * (m - 1))
        lo, hi = (xs[0], xs[1]) if n < xs[0] else (xs[-2], xs[-1]) if n > xs[-1] else (0, 0)
        if lo == hi:
            return float(np.interp(n, xs, [self.verify[x] for x in xs]))
        per_token = (self.verify[hi] - self.verify[lo]) / (hi - lo)
        return max(self.verify[lo] + per_token * (n - lo), 1e-9)

    def rate(self, k: int, alpha: float | None = None) -> float:
        """Expected tokens per second with ``k`` drafts per block (at the estimated
        acceptance, or at ``alpha``)."""
        alpha = min(self.alpha if alpha is None else alpha, 0.999)
        tokens = (1.0 - alpha ** (k + 1)) / (1.0 - alpha)
        return tokens / (k * (self.draft_step or 0.0) + self.verify_cost(k + 1))

    def best_k(self) -> int:
        """The block size with the highest expected rate (0 = plain steps)."""
        return max(range(self.k_max + 1), key=self.rate)

    def hopeless(self) -> bool:
        """True when, with the measured costs, no block could pay even if every draft were
        accepted: then plain decoding is faster, and neither shadow guesses nor probes are
        worth their time. False while a cost is unknown or the block size is fixed."""
        if self.fixed is not None or self.draft_step is None or not self.verify:
            return False
        plain = self.rate(0)
        return all(self.rate(k, 1.0) < plain for k in range(1, self.k_max + 1))

    def plain_wins(self) -> bool:
        """True when, at the acceptance estimated so far and the measured costs, plain
        steps beat every block size (False while a cost is unknown or the size is fixed)."""
        if self.fixed is not None or self.draft_step is None or not self.verify:
            return False
        return self.best_k() == 0

    def prior(self, *, step: float, draft_step: float, slope: float | None = None,
              verify: Mapping[int, float] | None = None) -> None:
        """Start from measured costs: a plain step of every model (``step`` seconds), one
        drafted token, and the verification of blocks of some lengths (``verify``: length
        -> seconds) or else the relative cost of each further block token (``slope``)."""
        self.verify.setdefault(1, step)
        for n, seconds in (verify or {}).items():
            self.verify.setdefault(n, seconds)
        if slope is not None:
            self.slope = slope
        if self.draft_step is None:
            self.draft_step = draft_step

    def forget_costs(self) -> None:
        """Drop every measured or prior cost: the next block is a real one that measures
        them again (a decision that blocks cannot pay is only as good as its costs)."""
        self.draft_step, self.verify, self.slope = None, {}, VERIFY_SLOPE
        self._plan, self._plan_age, self.plain_run, self.plain_only = None, 0, 0, False

    def forget_acceptance(self) -> None:
        """Back to the prior acceptance (another drafter or another mix)."""
        self.accepted, self.rejected = ACCEPTED_PRIOR, REJECTED_PRIOR
        self._plan = None

    def next_k(self) -> int:
        """The block size for the next block."""
        if self.fixed is not None:
            return self.fixed
        if self.draft_step is None or not self.verify:
            return 2  # measure something first
        if self._plan is None or self._plan_age >= REPLAN_EVERY:
            self._plan, self._plan_age = self.best_k(), 0
            self.plain_only = self._plan == 0 and self.hopeless()
        k = self._plan
        if k > 0:
            self.plain_run = 0
            return k
        self.plain_run += 1
        if self.plain_run >= self.probe_every and not self.plain_only:
            self.plain_run = 0
            probe = max(range(1, self.k_max + 1), key=self.rate)
            if self.rate(probe) >= PROBE_MARGIN * self.rate(0):
                return probe
        return 0

    def observe(self, drafted: int, accepted: int, draft_seconds: float,
                verify_seconds: float, block_len: int) -> None:
        """Update the estimates after one verified block (``drafted`` may be 0)."""
        self._plan_age += REPLAN_EVERY if drafted else 1
        if block_len:
            self.verify[block_len] = _ema(self.verify.get(block_len), verify_seconds)
        if drafted:
            self.draft_step = _ema(self.draft_step, draft_seconds / drafted)
            self.count(accepted, accepted < drafted)

    def count(self, accepted: int, rejected: bool) -> None:
        """Add accepted drafts and (at most one) rejection to the decayed counts."""
        self.accepted = self.decay * self.accepted + accepted
        self.rejected = self.decay * self.rejected + (1.0 if rejected else 0.0)


def _ema(old: float | None, new: float, rate: float = 0.2) -> float:
    return new if old is None else (1.0 - rate) * old + rate * new
