"""Speculative EFT decoding (paper section 4.3): draft with one model, verify in blocks.

The drafter (the preset's ``draft_role``, by default :meth:`Engine.cheapest_role`) drafts up
to ``k`` tokens, each drawn from its own filtered distribution with the noise of its
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
from collections.abc import Collection, Iterator
from dataclasses import replace

import numpy as np

from eft_local.engine import Constraint, Engine, Step
from eft_local.errors import EftError
from eft_local.kvshift import common_prefix
from eft_local.sampler import SamplerSettings
from eft_local.schedule.blocks import BlockSizer

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
    """Speculative decoding over an :class:`Engine`; its :meth:`generate` mirrors
    :meth:`Engine.generate` (same steps, same stops, the same finish on the last step)."""

    def __init__(self, engine: Engine, *, draft_k: int | None = None,
                 stop_below: float | None = None, reuse_draft_rows: bool = True,
                 draft_role: str | None = None) -> None:
        if draft_k is not None and (isinstance(draft_k, bool) or draft_k < 1):
            raise EftError(f"invalid draft_k {draft_k!r}: must be an integer >= 1 (or None "
                           "for an adaptive block size)")
        if draft_role is not None and draft_role not in engine.models:
            raise EftError(f"draft role {draft_role!r} is not among the models "
                           f"({', '.join(engine.roles)})")
        self.engine = engine
        self.draft_role = draft_role
        """The drafting model; None: the cheapest one with weight, chosen per generation."""
        self.drafter = draft_role or engine.template_role
        """The model drafting in the current (or last) generation."""
        self.sizer = BlockSizer(fixed=draft_k)
        self.stop_below = (STOP_BELOW if draft_k is None else 0.0) if stop_below is None \
            else stop_below
        self.reuse_draft_rows = reuse_draft_rows
        self.block_sizes: list[int] = []
        self._plain_steps = 0
        self._rows: np.ndarray | None = None
        self._grammar: Constraint | None = None
        self.plain_generations = 0
        """Generations handed to plain decoding because no block could pay."""
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

    # -- the loop -------------------------------------------------------------------------
    def generate(self, tokens: list[int], weights: np.ndarray, settings: SamplerSettings,
                 *, max_tokens: int, diagnostics: bool = False, top_n: int | None = None,
                 conservative: str | None = None, shift: bool = False,
                 grammar: Constraint | None = None) -> Iterator[Step]:
        """Yield the tokens plain decoding would yield, drafting and verifying in blocks
        (``shift``: the prompt as :meth:`Engine.prime` takes it); under ``grammar`` the
        drafter drafts with a copy of its state (each position's draw is plain decoding's
        own, with the state after the tokens before it)."""
        eng = self.engine
        self._grammar = grammar
        conservative = conservative or eng.conservative_role
        self.drafter = self.draft_role or eng.cheapest_role(weights, prefer=conservative)
        self._refresh_costs(weights, settings, diagnostics, conservative)
        self._since_block += 1
        if self.sizer.hopeless():  # blocks cannot pay here: plain decoding, as is
            self.plain_generations += 1
            yield from eng.generate(tokens, weights, settings, max_tokens=max_tokens,
                                    diagnostics=diagnostics, top_n=top_n,
                                    conservative=conservative, shift=shift,
                                    grammar=grammar)
            return
        if self.sizer.plain_wins():
            # plain steps win at the acceptance seen so far: plain decoding's own loop (the
            # speculative one costs more per plain step), guessing drafts to keep learning
            self.plain_generations += 1
            yield from eng.generate(tokens, weights, settings, max_tokens=max_tokens,
                                    diagnostics=diagnostics, top_n=top_n,
                                    conservative=conservative,
                                    on_step=lambda rows, step: self._shadow_step(
                                        rows, step, settings),
                                    extra=(self.drafter,), shift=shift,
                                    grammar=grammar)
            return
        started = time.perf_counter()
        eng.settle_schedule()  # a probe left unfinished would outlive its plain steps
        eng.activate(weights, settings, diagnostics=diagnostics, extra=(self.drafter,),
                     conservative=conservative)
        eng.prime(tokens, shift=shift)
        seq = list(tokens)
        head: np.ndarray | None = eng.rows  # rows at len(seq); None: seq[-1] not evaluated
        emitted = 0
        try:
            while True:
                position = len(seq)
                # the first token comes straight from the prompt's rows (time to first token
                # as in plain decoding); later blocks start with that token, unevaluated
                k = 0 if head is not None else min(self.sizer.next_k(), max_tokens - emitted - 1,
                                                   eng.n_ctx - 1 - position)
                if k <= 0 and head is None:  # a plain step, by plain decoding's own path
                    k, head = 0, self._plain_step(seq)
                t0 = time.perf_counter()
                draft, ref_rows = self._draft(seq, head, settings, max(0, k), grammar)
                t1 = time.perf_counter()
                rows = self._verify(seq, head, draft, ref_rows)
                t2 = time.perf_counter()
                accepted = 0
                guess = self._shadow_guess(rows[:, 0], settings, position) if not draft \
                    else None
                for i in range(len(draft) + 1):
                    step = eng.choose(rows[:, i], weights, settings, position + i,
                                      diagnostics=diagnostics, top_n=top_n,
                                      conservative=conservative, grammar=grammar)
                    if guess is not None:
                        self.sizer.count(int(guess == step.token), guess != step.token)
                    agree = i < len(draft) and step.token == draft[i]
                    seq.append(step.token)
                    emitted += 1
                    eng.count_token(started)
                    finish = eng.finish(step.token, position + i + 1, emitted, max_tokens)
                    if agree or finish:
                        step = replace(step, from_draft=agree, finish=finish)
                    yield step
                    if finish is not None:
                        self._record(draft, accepted + agree, t1 - t0, t2 - t1, head)
                        return
                    if grammar is not None:
                        grammar.accept(step.token)
                    if not agree:
                        break
                    accepted += 1
                self._record(draft, accepted, t1 - t0, t2 - t1, head)
                head = None
        finally:
            self._grammar = None
            self._rewind_to(seq)
            eng.stats.wall_seconds += time.perf_counter() - started

    # -- draft, verify, bookkeeping -------------------------------------------------------
    def _plain_step(self, seq: list[int]) -> np.ndarray:
        """Evaluate the last token of ``seq`` with every active model exactly as a plain
        step does (one-token decode into a row buffer, the decode schedule) and time it:
        adaptive speculation that chose plain steps costs what plain decoding costs."""
        eng = self.engine
        if self._rows is None or self._rows.shape != (len(eng.roles), eng.width):
            self._rows = np.zeros((len(eng.roles), eng.width), dtype=np.float32)
        start = time.perf_counter()
        eng.evaluate_each(len(seq) - 1, seq[-1:], roles=eng.active, out=self._rows)
        seconds = time.perf_counter() - start
        eng.stats.verify_seconds += seconds
        self.sizer.observe(0, 0, 0.0, seconds, 1)
        return self._rows

    def _draft(self, seq: list[int], head: np.ndarray | None, settings: SamplerSettings,
               k: int, grammar: Constraint | None = None) -> tuple[list[int], list[np.ndarray]]:
        """Up to ``k`` tokens from the drafter alone, drawn with the positions' noise (the
        argmax at temperature 0) under a copy of ``grammar``, and the drafter's row before
        each of them."""
        if k == 0:
            return [], []
        eng = self.engine
        role = self.drafter
        state = None if grammar is None else grammar.clone()
        if head is not None:
            row = head[eng.index(role)]
        else:
            row = eng.evaluate_role(role, len(seq) - 1, seq[-1:])[-1]
        draft: list[int] = []
        rows: list[np.ndarray] = []
        while True:
            picked = eng.draw(eng.model_scores(row), settings, len(seq) + len(draft), state)
            if draft and self.stop_below and picked.p_top < self.stop_below:
                return draft, rows
            draft.append(picked.token)
            rows.append(row)
            if len(draft) == k or eng.is_eog(picked.token):
                return draft, rows
            if state is not None:
                state.accept(picked.token)
            row = eng.evaluate_role(role, len(seq) + len(draft) - 1, [picked.token])[-1]

    def _verify(self, seq: list[int], head: np.ndarray | None, draft: list[int],
                ref_rows: list[np.ndarray]) -> np.ndarray:
        """Rows (models, len(draft) + 1, width): row i is the position ``len(seq) + i``.

        Every active model evaluates the block (the unevaluated last token of ``seq``, if
        any, and the draft) in one batched decode. With ``reuse_draft_rows`` the drafter
        evaluates only the last draft token and its drafting rows stand for the others.
        Rows of inactive models (weight 0) are zeros.
        """
        eng = self.engine
        pending = [] if head is not None else seq[-1:]
        block = pending + draft
        if not block:
            return head[:, None, :]  # type: ignore[index]
        start = len(seq) - len(pending)
        active = eng.active
        keeps = {r: start for r in active}
        batches = {r: block for r in active}
        reuse = self.reuse_draft_rows and bool(draft)
        if reuse:
            keeps[self.drafter] = len(seq) + len(draft) - 1
            batches[self.drafter] = draft[-1:]
        # a block is a short prompt: each model in turn with every thread is fastest there
        # (what the load-time costs measured), a lone token takes the decode schedule
        each = eng.evaluate_each([keeps[r] for r in active], [batches[r] for r in active],
                                 all_logits=True, roles=active, prefill=len(block) > 1)
        out = np.empty((len(eng.roles), len(draft) + 1, eng.width), dtype=np.float32)
        for role in eng.roles:
            if role not in active:
                out[eng.index(role)] = 0.0
        for role, rows in zip(active, each, strict=True):
            i = eng.index(role)
            if reuse and role == self.drafter:
                out[i, : len(ref_rows)] = ref_rows
                out[i, len(ref_rows):] = rows
            elif head is None:
                out[i] = rows
            else:
                out[i, 0] = head[i]
                out[i, 1:] = rows
        return out

    def _record(self, draft: list[int], accepted: int, draft_s: float, verify_s: float,
                head: np.ndarray | None) -> None:
        stats = self.engine.stats
        stats.draft_seconds += draft_s
        stats.verify_seconds += verify_s
        if draft:
            self._since_block = 0
            stats.blocks += 1
            stats.drafted += len(draft)
            stats.accepted += accepted
            self.block_sizes.append(len(draft))
        block_len = len(draft) + (head is None)
        if not block_len:
            return  # a plain step (timed by _plain_step) or the prompt's first token
        self.sizer.observe(len(draft), accepted, draft_s, verify_s, block_len)

    def _shadow_guess(self, rows: np.ndarray, settings: SamplerSettings, position: int
                      ) -> int | None:
        """During adaptive plain steps, every few steps: the token the drafter would have
        drafted (sampled, not decoded), to keep the acceptance estimate fresh."""
        if self.sizer.fixed is not None or self.sizer.plain_only:
            return None
        self._plain_steps += 1
        if self._plain_steps % SHADOW_EVERY:
            return None
        eng = self.engine
        row = rows[eng.index(self.drafter)]
        return eng.draw(eng.model_scores(row), settings, position, self._grammar).token

    def _shadow_step(self, rows: np.ndarray, step: Step, settings: SamplerSettings) -> None:
        """A plain-decoding step: every few steps, count whether the drafter's guess (with
        the position's noise) is the token the mix drew."""
        guess = self._shadow_guess(rows, settings, step.position)
        if guess is not None:
            self.sizer.count(int(guess == step.token), guess != step.token)

    def _rewind_to(self, seq: list[int]) -> None:
        """Drop rejected drafts: every model keeps only the part of ``seq`` it evaluated."""
        for model in self.engine.models.values():
            model.rewind(common_prefix(model.tokens, seq))
