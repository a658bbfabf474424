"""Speculative EFT decoding (paper section 4.3): draft with one model, verify in blocks.

A sequence running alone in its batch (:mod:`eft_local.batch`) may decode in blocks; with
several sequences running, each step is one batched plain step for all of them (the cores
are then busy with every sequence's token already). The drafter (the preset's
``draft_role``, by default :meth:`Engine.cheapest_role`) drafts up
to ``k`` tokens, each drawn from its own filtered distribution (penalised as the mix is,
given the tokens before it: :mod:`eft_local.penalties`) with the noise of its
position (:func:`eft_local.sampler.race`), the very noise plain decoding uses, so draft and
mix are coupled. Every active model then evaluates the block in one batched decode with a
row per position (each model in turn with every thread); each position's mixed distribution
is sampled with exactly the code of plain decoding (:meth:`Engine.choose`). Drafted tokens
are kept while the sample agrees; the first disagreement keeps the sample and drops the
rest, and if every draft agrees the last row gives one more token for free. Since each
position's token is drawn from the same rows with the same noise as in plain decoding, the
output is the same token sequence (exactly so when the models' rows do not depend on
batching, as with the in-memory fakes; llama.cpp's batched rows differ from one-token rows
by about 1e-5, which can flip a draw that lands that close to a tie).
"""

from __future__ import annotations

import time
from collections.abc import Collection
from dataclasses import replace
from typing import TYPE_CHECKING

import numpy as np

from eft_local.engine import Engine, Step
from eft_local.errors import EftError
from eft_local.kvshift import common_prefix
from eft_local.sampler import SamplerSettings
from eft_local.schedule.blocks import BlockSizer

if TYPE_CHECKING:
    from eft_local.batch import Batch, Sequence

STOP_BELOW = 0.2
"""Adaptive drafting stops when the drafter's top probability falls below this."""
SHADOW_EVERY = 4
"""While plain steps win, every this many steps the draft is guessed (not decoded) to keep
the acceptance estimate fresh."""
RETRY_AFTER = 8
"""After this many generations in a row without a drafted block (decoded plainly because the
costs said no block could pay, or plain steps won at the acceptance seen), the next one
forgets the block costs and measures them again with a real block. Costs measured at load,
on a busy moment, or on the CPU before the models moved to a GPU must not switch speculation
off for good. Where blocks truly cannot pay, the retry costs about one plain step (1B shape
on 2 cores: a block of two drafts takes about 100 ms for 1 to 3 tokens, a plain step 50 ms;
docs/benchmarks.md): under 1 % of eight 16-token generations, less for longer ones; and a
machine or model placement that changed is noticed within eight replies."""


def worth_speculating(engine: Engine, weights: np.ndarray, draft_role: str) -> bool:
    """True when some model besides the drafter has a non-zero weight in the mix."""
    skip = engine.index(draft_role)
    return any(w != 0 for i, w in enumerate(np.asarray(weights)) if i != skip)


class Speculator:
    """Speculative decoding for a sequence that runs alone in its :class:`~eft_local.batch.
    Batch`: :meth:`start` decides, per generation, whether blocks may pay; the batch then
    asks :meth:`block_size` before each step and runs :meth:`block` (drafted tokens checked
    by every model in one batched decode) or a plain step, which it reports back
    (:meth:`plain_step`, :meth:`shadow`). Either way each token is drawn exactly as a plain
    step draws it."""

    def __init__(self, engine: Engine, *, draft_k: int | None = None) -> None:
        if draft_k is not None and (isinstance(draft_k, bool) or draft_k < 1):
            raise EftError(f"invalid draft_k {draft_k!r}: must be an integer >= 1 (or None "
                           "for an adaptive block size)")
        self.engine = engine
        self.drafter = engine.template_role
        """The model drafting in the current (or last) generation."""
        self.sizer = BlockSizer(fixed=draft_k)
        self.stop_below = STOP_BELOW if draft_k is None else 0.0
        self.block_sizes: list[int] = []
        self._plain_steps = 0
        self.plain_generations = 0
        """Generations decoded plainly because no block could pay (or plain steps won)."""
        self.remeasured = 0
        """Times the block costs were forgotten to be measured again (:data:`RETRY_AFTER`,
        or the settings they were measured under changed)."""
        self._since_block = 0
        self._costs_for: tuple | None = None

    @property
    def draft_k(self) -> int | None:
        """The fixed block size, or None when it adapts."""
        return self.sizer.fixed

    def seed(self, *, drafter: str, step: float, draft_step: float,
             verify: dict[int, float] | None = None, slope: float | None = None) -> None:
        """Start the block sizer from costs measured with every model evaluated and
        ``drafter`` drafting (the session's load-time measurement); a generation under other
        settings measures its own (:meth:`BlockSizer.prior` for the arguments)."""
        self.sizer.prior(step=step, draft_step=draft_step, verify=verify, slope=slope)
        self._costs_for = self._costs_key(drafter, self.engine.roles)

    def _costs_key(self, drafter: str, live: Collection[str]) -> tuple:
        """What block costs depend on besides the machine: the drafter, the models a block
        evaluates, the thread budget and each of those models' GPU layers."""
        eng = self.engine
        roles = tuple(r for r in eng.roles if r in live)
        return (drafter, roles, eng.n_threads,
                tuple(getattr(eng.models[r], "n_gpu_layers", 0) for r in roles))

    def _refresh_costs(self, weights: np.ndarray, settings: SamplerSettings,
                       diagnostics: bool, conservative: str) -> None:
        """Forget the block costs (and, for another drafter, the acceptance) when they were
        measured under other settings, or :data:`RETRY_AFTER` generations ago."""
        eng = self.engine
        live = {r for r, w in zip(eng.roles, np.asarray(weights).ravel(), strict=True)
                if w != 0} | {self.drafter}
        if diagnostics:
            live = set(eng.roles)
        if settings.conservative_top_p is not None:
            live.add(conservative)
        key = self._costs_key(self.drafter, live)
        old, self._costs_for = self._costs_for, key
        changed = old is not None and old != key
        if self.sizer.fixed is not None or (not changed and self._since_block < RETRY_AFTER):
            return
        if changed and old[0] != key[0]:  # type: ignore[index]
            self.sizer.forget_acceptance()
        self.sizer.forget_costs()
        self._since_block = 0
        self.remeasured += 1

    # -- a generation -----------------------------------------------------------------------
    def start(self, seq: Sequence) -> str:
        """How ``seq`` decodes while it runs alone: ``blocks``; ``shadow`` (plain steps win
        at the acceptance seen so far, and every few steps the drafter's guess keeps that
        acceptance measured); or ``plain`` (the costs say no block can pay)."""
        plan = seq.plan
        assert plan.drafter is not None
        self.drafter = plan.drafter
        self._refresh_costs(seq.weights, plan.sampling, plan.diagnostics, plan.conservative)
        self._since_block += 1
        if self.sizer.hopeless():
            self.plain_generations += 1
            return "plain"
        if self.sizer.plain_wins():
            self.plain_generations += 1
            return "shadow"
        self.engine.settle_schedule()  # a probe left unfinished would outlive its plain steps
        return "blocks"

    def block_size(self, seq: Sequence) -> int:
        """Drafts for ``seq``'s next step; 0: a plain step (then :meth:`plain_step`)."""
        return min(self.sizer.next_k(), seq.plan.max_tokens - seq.emitted - 1,
                   self.engine.n_ctx - 1 - seq.position)

    def block(self, batch: Batch, seq: Sequence, k: int) -> list[Step]:
        """Draft up to ``k`` tokens after ``seq``'s last one, verify them with every model in
        one batched decode each, and keep what plain decoding would draw: the agreeing
        drafts and the first sample that differs (or one more token when all agree)."""
        eng = self.engine
        plan = seq.plan
        position = seq.position
        t0 = time.perf_counter()
        draft, ref_rows = self._draft(seq, k)
        t1 = time.perf_counter()
        rows = self._verify(seq, draft, ref_rows)
        t2 = time.perf_counter()
        accepted, out = 0, []
        try:
            for i in range(len(draft) + 1):
                step = eng.choose(rows[:, i], seq.weights, plan.sampling, position + i,
                                  diagnostics=plan.diagnostics, top_n=plan.top_n,
                                  conservative=plan.conservative, grammar=seq.grammar,
                                  history=seq.tokens)  # what precedes position + i
                agree = i < len(draft) and step.token == draft[i]
                step = batch.advance(seq, replace(step, from_draft=True) if agree else step)
                out.append(step)
                accepted += agree
                if step.finish is not None or not agree:
                    break
        finally:
            self._record(draft, accepted, t1 - t0, t2 - t1)
            self._rewind(seq)
        return out

    # -- draft, verify, bookkeeping -------------------------------------------------------
    def _draft(self, seq: Sequence, k: int) -> tuple[list[int], list[np.ndarray]]:
        """Up to ``k`` tokens from the drafter alone after ``seq``'s last token (which no
        model has evaluated yet), drawn with the positions' noise (the argmax at temperature
        0) under a copy of the grammar, and the drafter's row before each of them."""
        eng = self.engine
        role, tokens, slot = self.drafter, seq.tokens, seq.slot
        settings = seq.plan.sampling
        state = None if seq.grammar is None else seq.grammar.clone()
        row = eng.evaluate_role(role, len(tokens) - 1, tokens[-1:], seq=slot)[-1]
        draft: list[int] = []
        rows: list[np.ndarray] = []
        penalized = settings.penalized  # the drafter's own row, penalised as the mix is
        while True:
            picked = eng.draw(eng.model_scores(row), settings, len(tokens) + len(draft), state,
                              history=tokens + draft if penalized else None)
            if draft and self.stop_below and picked.p_top < self.stop_below:
                return draft, rows
            draft.append(picked.token)
            rows.append(row)
            if len(draft) == k or eng.is_eog(picked.token):
                return draft, rows
            if state is not None:
                state.accept(picked.token)
            row = eng.evaluate_role(role, len(tokens) + len(draft) - 1, [picked.token],
                                    seq=slot)[-1]

    def _verify(self, seq: Sequence, draft: list[int], ref_rows: list[np.ndarray]
                ) -> np.ndarray:
        """Rows (models, len(draft) + 1, width): row i is the position ``position + i``.

        Every model of ``seq`` evaluates the block (its last token and the draft) in one
        batched decode; the drafter evaluates only the last draft token, its drafting rows
        stand for the others. Rows of models not evaluated for ``seq`` (weight 0) are zeros.
        """
        eng = self.engine
        tokens = seq.tokens
        block = tokens[-1:] + draft
        roles = seq.roles
        keeps = {r: len(tokens) - 1 for r in roles}
        batches = {r: block for r in roles}
        keeps[self.drafter] = len(tokens) + len(draft) - 1
        batches[self.drafter] = draft[-1:]
        # a block is a short prompt: each model in turn with every thread is fastest there
        # (what the load-time costs measured)
        each = eng.evaluate_each([keeps[r] for r in roles], [batches[r] for r in roles],
                                 all_logits=True, roles=roles, prefill=len(block) > 1,
                                 seq=seq.slot)
        out = np.zeros((len(eng.roles), len(draft) + 1, eng.width), dtype=np.float32)
        for role, rows in zip(roles, each, strict=True):
            i = eng.index(role)
            if role == self.drafter:
                out[i, : len(ref_rows)] = ref_rows
                out[i, len(ref_rows):] = rows
            else:
                out[i] = rows
        return out

    def _record(self, draft: list[int], accepted: int, draft_s: float, verify_s: float
                ) -> None:
        stats = self.engine.stats
        stats.draft_seconds += draft_s
        stats.verify_seconds += verify_s
        self._since_block = 0
        stats.blocks += 1
        stats.drafted += len(draft)
        stats.accepted += accepted
        self.block_sizes.append(len(draft))
        self.sizer.observe(len(draft), accepted, draft_s, verify_s, len(draft) + 1)

    def plain_step(self, seconds: float) -> None:
        """A plain step of a sequence in ``blocks`` mode evaluated in ``seconds``: what the
        block sizer weighs blocks against."""
        self.engine.stats.verify_seconds += seconds
        self.sizer.observe(0, 0, 0.0, seconds, 1)

    def shadow(self, seq: Sequence, rows: np.ndarray, step: Step) -> None:
        """A plain step of ``seq`` drew ``step`` from ``rows``: every few steps, count
        whether the drafter's guess (sampled with the position's noise, not decoded) is the
        token the mix drew, to keep the acceptance estimate fresh."""
        if self.sizer.fixed is not None or self.sizer.plain_only:
            return
        self._plain_steps += 1
        if self._plain_steps % SHADOW_EVERY:
            return
        eng = self.engine
        row = rows[eng.index(self.drafter)]
        guess = eng.draw(eng.model_scores(row), seq.plan.sampling, step.position,
                         seq.grammar, history=seq.tokens).token
        self.sizer.count(int(guess == step.token), guess != step.token)

    def _rewind(self, seq: Sequence) -> None:
        """Drop rejected drafts: every model keeps only the part of ``seq`` it evaluated."""
        eng = self.engine
        start = min(seq.held.values(), default=0)
        for role in seq.roles:
            held = eng.held(role, seq.slot)
            k = start + common_prefix(held[start:], seq.tokens[start:])
            eng.models[role].rewind(k, seq.slot)
            seq.held[role] = min(k, len(seq.tokens) - 1)
