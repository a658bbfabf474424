"""Speculative EFT decoding (paper section 4.3): draft with the reference, verify in blocks.

The reference model (the small fine-tuned one) drafts up to ``k`` tokens, each drawn from
its own filtered distribution with the same position-seeded uniform that plain decoding
uses, so draft and verifier are coupled. Every model then evaluates the block in one
batched decode with a row per position; the true mixed distribution of each position is
sampled with exactly the code of plain decoding (:meth:`Engine.choose`). Drafted tokens are
kept while the sample agrees; the first disagreement keeps the sample and drops the rest,
and if every draft agrees the last row gives one more token for free. Since each position's
token is drawn from the same rows with the same uniform as in plain decoding, the output is
the same token sequence (exactly so when the models' rows do not depend on batching, as
with the in-memory fakes; llama.cpp's batched rows differ from one-token rows by about
1e-5, which can flip a draw that lands that close to a boundary).
"""

from __future__ import annotations

import math
import time
import weakref
from collections.abc import Iterator
from dataclasses import dataclass, replace

import numpy as np

from eft_local import sampler
from eft_local.engine import Engine, Step, common_prefix
from eft_local.errors import EftError
from eft_local.sampler import SamplerSettings

K_MAX = 12
"""Largest adaptive block size."""
VERIFY_SLOPE = 0.25
"""Prior cost of one more token in a verification block, relative to a one-token decode."""
STOP_BELOW = 0.2
"""Adaptive drafting stops when the drafter's top probability falls below this."""


@dataclass
class BlockSizer:
    """Chooses the block size from the observed acceptance and the observed costs.

    Acceptance is modelled as independent per drafted token with probability ``alpha``
    (estimated from decayed counts of accepted tokens and rejections); a block of ``k``
    drafts then yields ``(1 - alpha**(k+1)) / (1 - alpha)`` tokens and costs ``k`` draft
    steps plus a verification of ``k + 1`` tokens. The k with most tokens per second wins.
    """

    fixed: int | None = None
    k_max: int = K_MAX
    decay: float = 0.9
    accepted: float = 3.0  # prior: alpha = 0.75
    rejected: float = 1.0
    draft_step: float | None = None  # seconds per draft token (EMA)
    verify_unit: float | None = None  # seconds of a one-token verification (EMA)
    slope: float = VERIFY_SLOPE

    @property
    def alpha(self) -> float:
        """Estimated probability that one drafted token is accepted."""
        return self.accepted / (self.accepted + self.rejected)

    def next_k(self) -> int:
        """The block size for the next block."""
        if self.fixed is not None:
            return self.fixed
        alpha = min(self.alpha, 0.999)
        draft = self.draft_step if self.draft_step is not None else 0.1
        unit = self.verify_unit if self.verify_unit is not None else 1.0
        best, best_rate = 1, -1.0
        for k in range(1, self.k_max + 1):
            tokens = (1.0 - alpha ** (k + 1)) / (1.0 - alpha)
            rate = tokens / (k * draft + unit * (1.0 + self.slope * k))
            if rate > best_rate:
                best, best_rate = k, rate
        return best

    def observe(self, drafted: int, accepted: int, draft_seconds: float,
                verify_seconds: float, block_len: int) -> None:
        """Update the estimates after one verified block."""
        if drafted == 0:
            return
        self.accepted = self.decay * self.accepted + accepted
        self.rejected = self.decay * self.rejected + (1.0 if accepted < drafted else 0.0)
        unit = verify_seconds / (1.0 + self.slope * max(0, block_len - 1))
        self.draft_step = _ema(self.draft_step, draft_seconds / drafted)
        self.verify_unit = _ema(self.verify_unit, unit)


def _ema(old: float | None, new: float, rate: float = 0.2) -> float:
    return new if old is None else (1.0 - rate) * old + rate * new


def worth_speculating(engine: Engine, weights: np.ndarray) -> bool:
    """True when some model besides the reference has a non-zero weight in the mix."""
    return any(w != 0 for i, w in enumerate(np.asarray(weights)) if i != engine.ref_index)


class Speculator:
    """Speculative decoding over an :class:`Engine`; its :meth:`generate` mirrors
    :meth:`Engine.generate` (same steps, same stops, ``finish_reason`` set on the engine)."""

    def __init__(self, engine: Engine, *, draft_k: int | None = None,
                 stop_below: float | None = None, reuse_draft_rows: bool = True) -> None:
        if draft_k is not None and (isinstance(draft_k, bool) or draft_k < 1):
            raise EftError(f"invalid draft_k {draft_k!r}: must be an integer >= 1 (or None "
                           "for an adaptive block size)")
        self.engine = engine
        self.sizer = BlockSizer(fixed=draft_k)
        self.stop_below = (STOP_BELOW if draft_k is None else 0.0) if stop_below is None \
            else stop_below
        self.reuse_draft_rows = reuse_draft_rows
        self.block_sizes: list[int] = []

    @property
    def draft_k(self) -> int | None:
        """The fixed block size, or None when it adapts."""
        return self.sizer.fixed

    # -- the loop -------------------------------------------------------------------------
    def generate(self, tokens: list[int], weights: np.ndarray, settings: SamplerSettings,
                 *, max_tokens: int, diagnostics: bool = False) -> Iterator[Step]:
        """Yield the tokens plain decoding would yield, drafting and verifying in blocks."""
        eng = self.engine
        started = time.perf_counter()
        eng.finish_reason = "length"
        eng.prime(tokens)
        seq = list(tokens)
        head: np.ndarray | None = eng.rows  # rows at len(seq); None: seq[-1] not evaluated
        emitted = 0
        try:
            while True:
                position = len(seq)
                k = min(self.sizer.next_k(), max_tokens - emitted - 1, eng.n_ctx - 1 - position)
                t0 = time.perf_counter()
                draft, ref_rows = self._draft(seq, head, settings, max(0, k))
                t1 = time.perf_counter()
                rows = self._verify(seq, head, draft, ref_rows)
                t2 = time.perf_counter()
                accepted = 0
                for i in range(len(draft) + 1):
                    step = eng.choose(rows[:, i], weights, settings, position + i,
                                      diagnostics=diagnostics)
                    agree = i < len(draft) and step.token == draft[i]
                    if agree:
                        step = replace(step, from_draft=True)
                    seq.append(step.token)
                    emitted += 1
                    eng._count_token(started)
                    yield step
                    if self._stopped(step.token, position + i + 1, emitted, max_tokens):
                        self._record(draft, accepted + agree, t1 - t0, t2 - t1)
                        return
                    if not agree:
                        break
                    accepted += 1
                self._record(draft, accepted, t1 - t0, t2 - t1)
                head = None
        finally:
            self._rewind_to(seq)
            eng.stats.wall_seconds += time.perf_counter() - started

    def _stopped(self, token: int, next_position: int, emitted: int, max_tokens: int) -> bool:
        """The stops of plain decoding, in its order; sets the engine's finish reason."""
        eng = self.engine
        if eng.ref.is_eog(token):
            eng.finish_reason = "eog"
            return True
        if next_position >= eng.n_ctx:
            eng.finish_reason = "context"
            return True
        return emitted >= max_tokens

    # -- draft, verify, bookkeeping -------------------------------------------------------
    def _draft(self, seq: list[int], head: np.ndarray | None, settings: SamplerSettings,
               k: int) -> tuple[list[int], list[np.ndarray]]:
        """Up to ``k`` tokens from the reference alone, drawn with the positions' uniforms,
        and the reference's row before each of them."""
        if k == 0:
            return [], []
        eng = self.engine
        role = eng.ref_role
        eng.solo_threads(role)
        try:
            if head is not None:
                row = head[eng.ref_index]
            else:
                row = eng.evaluate_role(role, len(seq) - 1, seq[-1:])[-1]
            draft: list[int] = []
            rows: list[np.ndarray] = []
            while True:
                own = sampler.log_softmax(np.where(eng.allowed, row, sampler.NEG_INF))
                token, final = sampler.pick(own, settings, len(seq) + len(draft))
                if draft and self.stop_below and math.exp(float(final.max())) < self.stop_below:
                    return draft, rows
                draft.append(token)
                rows.append(row)
                if len(draft) == k or eng.ref.is_eog(token):
                    return draft, rows
                row = eng.evaluate_role(role, len(seq) + len(draft) - 1, [token])[-1]
        finally:
            eng.share_threads()

    def _verify(self, seq: list[int], head: np.ndarray | None, draft: list[int],
                ref_rows: list[np.ndarray]) -> np.ndarray:
        """Rows (models, len(draft) + 1, width): row i is the position ``len(seq) + i``.

        Every model evaluates the block (the unevaluated last token of ``seq``, if any, and
        the draft) in one batched decode. With ``reuse_draft_rows`` the drafter evaluates
        only the last draft token and its drafting rows stand for the others.
        """
        eng = self.engine
        pending = [] if head is not None else seq[-1:]
        block = pending + draft
        if not block:
            return head[:, None, :]  # type: ignore[index]
        start = len(seq) - len(pending)
        if not (self.reuse_draft_rows and draft):
            rows = eng.evaluate(start, block, all_logits=True)
            return rows if head is None else np.concatenate([head[:, None, :], rows], axis=1)
        keeps = [start] * len(eng.roles)
        batches = [block] * len(eng.roles)
        keeps[eng.ref_index] = len(seq) + len(draft) - 1
        batches[eng.ref_index] = draft[-1:]
        each = eng.evaluate_each(keeps, batches, all_logits=True)
        out = []
        for i, rows in enumerate(each):
            if i == eng.ref_index:
                out.append(np.concatenate([np.stack(ref_rows), rows]))
            else:
                out.append(rows if head is None else np.concatenate([head[i][None], rows]))
        return np.stack(out)

    def _record(self, draft: list[int], accepted: int, draft_s: float, verify_s: float) -> None:
        stats = self.engine.stats
        stats.draft_seconds += draft_s
        stats.verify_seconds += verify_s
        if draft:
            stats.blocks += 1
            stats.drafted += len(draft)
            stats.accepted += accepted
            self.block_sizes.append(len(draft))
            self.sizer.observe(len(draft), accepted, draft_s, verify_s, len(draft) + 1)

    def _rewind_to(self, seq: list[int]) -> None:
        """Drop rejected drafts: every model keeps only the part of ``seq`` it evaluated."""
        for model in self.engine.models.values():
            model.rewind(common_prefix(model.tokens, seq))


_SPECULATORS: weakref.WeakKeyDictionary[Engine, Speculator] = weakref.WeakKeyDictionary()


def speculator(engine: Engine, draft_k: int | None) -> Speculator:
    """The engine's speculator (created once, so the adaptive state lasts across turns)."""
    spec = _SPECULATORS.get(engine)
    if spec is None or spec.draft_k != draft_k:
        spec = _SPECULATORS[engine] = Speculator(engine, draft_k=draft_k)
    return spec
