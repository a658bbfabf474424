"""Sequences decoding together: one generation per slot, one step for all of them.

A :class:`Plan` is one generation prepared once (prompt tokens, formula weights, sampler
settings, grammar, limits, the drafter): everything that shapes its tokens, frozen.
:class:`Batch` runs plans side by side, each in a slot (the same KV sequence of every
model). Each :meth:`Batch.step` brings every model up to the tokens each running sequence
needs of it (the last token of decoding sequences, chunks of joining prompts: at most
``n_batch`` tokens per model and step, so running streams keep flowing while a long prompt is
read) in one batched decode per model, then mixes and draws the next token of every
sequence whose rows are ready, each with its own settings and noise. A sequence's tokens do
not depend on its neighbours beyond llama.cpp's batched arithmetic. A sequence running alone
decodes speculatively where its drafter pays (:mod:`eft_local.speculative`).
"""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, replace
from typing import Protocol

import numpy as np

from eft_local.backend.sequences import Part
from eft_local.engine import Engine, Step, file_size
from eft_local.errors import Cancelled, EftError
from eft_local.interrupts import cancel_on
from eft_local.kvshift import best_cut, common_prefix, worth_shifting
from eft_local.sampler import SamplerSettings
from eft_local.utf8 import Constraint

SIMILAR = 0.5
"""A free slot is chosen for the prefix its cache shares with a new prompt only when that
prefix is at least this share of the prompt (llama-server's ``--slot-prompt-similarity``);
otherwise the least recently used slot is taken, so one unrelated request (a chat client's
title request) does not evict another conversation's cache."""


@dataclass(frozen=True)
class Plan:
    """One generation, prepared once (:meth:`eft_local.session.Session.prepare`)."""

    tokens: tuple[int, ...]
    weights: tuple[float, ...]
    """One weight per engine role (:attr:`Engine.roles` order)."""
    sampling: SamplerSettings
    max_tokens: int
    conservative: str
    """Whose top-p set conservative decoding keeps, and whose own pick diagnostics show."""
    drafter: str | None = None
    """The model that drafts when this sequence runs alone; None: never speculative."""
    diagnostics: bool = False
    top_n: int | None = None
    shift: bool = False
    """The prompt continues what a slot's caches hold with a span of older tokens taken out
    (a chat that dropped its oldest turns): models that can shift cut that span out instead
    of evaluating the kept tokens again (:func:`eft_local.kvshift.worth_shifting`)."""
    grammar: Callable[[], Constraint] | None = None
    """Makes a fresh state of the grammar the text must follow."""

    def __post_init__(self) -> None:
        if not self.tokens:
            raise EftError("empty prompt: nothing to condition on")
        if isinstance(self.max_tokens, bool) or self.max_tokens < 1:
            raise EftError(f"invalid max_tokens {self.max_tokens!r}: must be >= 1")


class Sequence:
    """A plan decoding in a slot: its tokens so far and what each model holds of them."""

    def __init__(self, plan: Plan, slot: int, roles: tuple[str, ...], order: int) -> None:
        self.plan = plan
        self.slot = slot
        self.roles = roles
        """The models evaluated for this sequence."""
        self.order = order
        self.tokens = list(plan.tokens)
        self.weights = np.asarray(plan.weights, dtype=np.float32)
        self.grammar = plan.grammar() if plan.grammar is not None else None
        self.held: dict[str, int] = {}
        """How many of :attr:`tokens` each model's cache holds in this slot."""
        self.emitted = 0
        self.finish: str | None = None
        self.evaluated = 0
        """Prompt tokens the models evaluate (the most any model needs; the others were
        re-used from the slot's caches)."""
        self.shifted = 0
        """Prompt tokens kept by cutting dropped turns out of the caches (moved, not
        evaluated; the most any model moved)."""
        self.mode = "plain"
        """While it runs alone: ``blocks`` (speculative), ``shadow`` (plain steps that keep
        the drafter's acceptance measured) or ``plain`` (see :meth:`Speculator.start`)."""
        self.started = time.perf_counter()
        self.owner: object = None
        """Whoever runs this sequence (the session's generation)."""
        self.cancelled: threading.Event | None = None
        """Set when its caller gave up: long grammar work stops for it (and only it)."""
        self.error: BaseException | None = None
        """Why its own step failed (its grammar): it left its slot, the others went on."""
        self.share: Sequence | None = None
        """Another sequence with the same prompt, whose cached prompt this one copies once
        that one has read it (several choices of one request), instead of reading it too."""

    @property
    def position(self) -> int:
        """The position of the next token."""
        return len(self.tokens)

    @property
    def prefilling(self) -> bool:
        """Some model still has more than the last token to evaluate."""
        return any(len(self.tokens) - k > 1 for k in self.held.values())


class Drafting(Protocol):
    """What the batch asks of speculative decoding (:class:`eft_local.speculative.
    Speculator`) for a sequence that runs alone."""

    def start(self, seq: Sequence) -> str: ...
    def block_size(self, seq: Sequence) -> int: ...
    def block(self, batch: Batch, seq: Sequence, k: int) -> list[Step]: ...
    def shadow(self, seq: Sequence, rows: np.ndarray, step: Step) -> None: ...
    def plain_step(self, seconds: float) -> None: ...


class Batch:
    """The running sequences of one engine, at most one per slot (see the module
    docstring)."""

    def __init__(self, engine: Engine, speculator: Drafting | None = None) -> None:
        self.engine = engine
        self.speculator = speculator
        self.slots: list[Sequence | None] = [None] * engine.n_seq
        self._used = [0] * engine.n_seq
        self._clock = itertools.count(1)

    @property
    def running(self) -> list[Sequence]:
        """The sequences in their slots, in the order they joined."""
        return sorted((s for s in self.slots if s is not None), key=lambda s: s.order)

    def free_slots(self) -> list[int]:
        """Slots no sequence runs in."""
        return [i for i, s in enumerate(self.slots) if s is None]

    def choose_slot(self, tokens: tuple[int, ...] | list[int]) -> int | None:
        """The free slot for a prompt: the one whose caches share the longest prefix with
        it, when that is at least :data:`SIMILAR` of it; else the least recently used one.
        None when every slot is taken."""
        free = self.free_slots()
        if not free:
            return None
        eng = self.engine
        local = [r for r in eng.local_roles] or list(eng.roles)
        weight = {r: float(file_size(eng.models[r])) for r in local}
        total = sum(weight.values()) or 1.0

        def shared(slot: int) -> float:
            return sum(weight[r] * common_prefix(eng.held(r, slot), tokens) for r in local
                       ) / total

        best = max(free, key=lambda i: (shared(i), -self._used[i]))
        if shared(best) >= SIMILAR * len(tokens):
            return best
        return min(free, key=lambda i: self._used[i])

    def add(self, plan: Plan, *, slot: int | None = None,
            cancelled: threading.Event | None = None, share: Sequence | None = None
            ) -> Sequence:
        """Start ``plan`` in ``slot`` (default :meth:`choose_slot`); it joins at the next
        step. The models' caches keep the longest prefix they share with its prompt.
        ``cancelled``: an event that stops its grammar work once set (see
        :func:`eft_local.interrupts.cancel_on`). ``share``: a running sequence with the same
        prompt; this one waits until that one has read it, then copies its cached prompt
        (``copy_prefix``: the KV cells are shared, not evaluated again)."""
        eng = self.engine
        if len(plan.tokens) >= eng.n_ctx:
            raise EftError(f"prompt is {len(plan.tokens)} tokens; the context holds "
                           f"{eng.n_ctx} (raise n_ctx or shorten the prompt)")
        if len(plan.weights) != len(eng.roles):
            raise EftError(f"a plan needs {len(eng.roles)} weights, got {len(plan.weights)}")
        slot = self.choose_slot(plan.tokens) if slot is None else slot
        if slot is None or not 0 <= slot < len(self.slots) or self.slots[slot] is not None:
            raise EftError(f"no free slot for another sequence (all {len(self.slots)} run)"
                           if slot is None else f"slot {slot} is not free")
        seq = Sequence(plan, slot, (), next(self._clock))
        seq.cancelled = cancelled
        if share is not None and share.plan.tokens == plan.tokens:
            seq.share = share
        if plan.drafter is not None and self.speculator is not None:
            seq.mode = self.speculator.start(seq)
        extra = (plan.drafter,) if plan.drafter is not None and seq.mode != "plain" else ()
        seq.roles = roles = eng.needed(seq.weights, plan.sampling,
                                       diagnostics=plan.diagnostics, extra=extra,
                                       conservative=plan.conservative)
        tokens = seq.tokens
        for role in roles:
            seq.held[role], moved = self._reuse(role, slot, tokens, plan.shift)
            seq.evaluated = max(seq.evaluated, len(tokens) - seq.held[role])
            seq.shifted = max(seq.shifted, moved)
        eng.stats.prefilled += seq.evaluated
        eng.stats.shifted += seq.shifted
        self.slots[slot] = seq
        self.touch(slot)
        return seq

    def _reuse(self, role: str, slot: int, tokens: list[int], shift: bool) -> tuple[int, int]:
        """How much of ``tokens`` ``role``'s cache in ``slot`` can keep (the last token is
        always evaluated again, for its row), after cutting a dropped span out where that
        pays; and how many tokens the cut moved."""
        model = self.engine.models[role]
        held = self.engine.held(role, slot)
        k = common_prefix(held, tokens)
        moved = 0
        if shift and k < len(tokens) - 1 and getattr(model, "can_shift", False):
            end, kept = best_cut(held, tokens, k)
            kept = min(kept, len(tokens) - 1 - k)
            if kept and worth_shifting(kept, n_ctx=model.n_ctx, file_bytes=file_size(model)):
                model.rewind(end + kept, slot)  # what follows the kept span goes first
                if model.cut(k, end, slot):
                    k += kept
                    moved = kept
        return min(k, len(tokens) - 1), moved

    def touch(self, slot: int) -> None:
        """``slot`` was just used outside a sequence (rows or a score evaluated in it): it is
        now the most recently used."""
        self._used[slot] = next(self._clock)

    def remove(self, seq: Sequence) -> None:
        """Take ``seq`` out (finished or cancelled): its slot is free at once; the caches
        keep what they hold for a later prompt with the same prefix."""
        if 0 <= seq.slot < len(self.slots) and self.slots[seq.slot] is seq:
            self.slots[seq.slot] = None

    def close(self) -> None:
        """Take every sequence out."""
        for seq in self.running:
            self.remove(seq)

    # -- one step -------------------------------------------------------------------------
    def step(self) -> list[tuple[Sequence, Step | None]]:
        """One step of every running sequence: the tokens drawn (none for a sequence still
        reading its prompt; several for a speculative block). A sequence whose step carries
        a ``finish`` has left its slot; so has one paired with None, whose own work failed
        (its :attr:`Sequence.error`): the others went on."""
        running = self.running
        if not running:
            return []
        started = time.perf_counter()
        try:
            if len(running) == 1 and running[0].mode == "blocks" and running[0].emitted:
                spec = self.speculator
                assert spec is not None
                seq = running[0]
                k = spec.block_size(seq)
                if k > 0:
                    return [(seq, step) for step in spec.block(self, seq, k)]
            return self._plain(running)
        finally:
            self.engine.stats.wall_seconds += time.perf_counter() - started

    def _plain(self, running: list[Sequence]) -> list[tuple[Sequence, Step | None]]:
        eng = self.engine
        lone = running[0] if len(running) == 1 else None
        decoding = lone is not None and not lone.prefilling
        t0 = time.perf_counter()
        ready = self.evaluate(running)
        t1 = time.perf_counter()
        out: list[tuple[Sequence, Step | None]] = []
        for seq in ready:
            p = seq.plan
            rows = eng.rows_of(seq.slot)
            try:
                with cancel_on(seq.cancelled) if seq.cancelled else nullcontext():
                    step = eng.choose(rows, seq.weights, p.sampling, seq.position,
                                      diagnostics=p.diagnostics, top_n=p.top_n,
                                      conservative=p.conservative, grammar=seq.grammar,
                                      history=seq.tokens)
                    if seq is lone and seq.mode != "plain" and self.speculator is not None:
                        self.speculator.shadow(seq, rows, step)
                    out.append((seq, self.advance(seq, step)))
            except (Cancelled, EftError) as exc:  # its grammar: it alone stops
                seq.error = exc
                self.remove(seq)
                out.append((seq, None))
        if decoding and lone is not None:
            if lone.mode == "blocks" and self.speculator is not None:
                self.speculator.plain_step(t1 - t0)
            eng.observe_step(time.perf_counter() - t0)
        return out

    def evaluate(self, running: list[Sequence]) -> list[Sequence]:
        """Bring each model up to what the running sequences need of it, in one batched
        decode per model (decoding sequences first, then prompt chunks within ``n_batch``
        tokens per model); the sequences whose rows are now complete."""
        eng = self.engine
        budget = dict.fromkeys(eng.roles, eng.n_batch)
        jobs: dict[str, list[tuple[Sequence, Part]]] = {r: [] for r in eng.roles}
        ready = []
        for seq in sorted(running, key=lambda s: (s.prefilling, s.order)):
            if seq.share is not None and not self._copied(seq, running):
                continue  # it waits for the prompt it shares to be read
            complete = True
            for role in seq.roles:
                k = seq.held[role]
                take = min(len(seq.tokens) - k, budget[role])
                if take <= 0:
                    complete = False
                    continue
                budget[role] -= take
                end = k + take
                last = end == len(seq.tokens)
                complete = complete and last
                jobs[role].append((seq, Part(seq.slot, k, tuple(seq.tokens[k:end]),
                                             "last" if last else "none")))
            if complete:
                ready.append(seq)
        jobs = {r: sorted(j, key=lambda x: x[1].seq) for r, j in jobs.items() if j}
        eng.activate({r for s in running for r in s.roles})
        prefill = any(len(part.tokens) > 1 for j in jobs.values() for _, part in j)
        outs = {r: self._out(r, [part for _, part in j]) for r, j in jobs.items()}
        done = eng.evaluate_parts({r: [part for _, part in j] for r, j in jobs.items()},
                                  prefill=prefill, outs=outs)
        buf = eng.row_buffer
        for role, items in jobs.items():
            index = eng.index(role)
            for (seq, part), rows in zip(items, done[role], strict=True):
                seq.held[role] = part.keep + len(part.tokens)
                if outs[role] is None and rows is not None:
                    buf[index, part.seq] = rows[-1]
        return ready

    def _copied(self, seq: Sequence, running: list[Sequence]) -> bool:
        """Whether ``seq`` may evaluate now: the sequence whose prompt it shares has read
        it (then its cached prompt is copied into ``seq``'s slot), or left (then ``seq``
        reads the prompt itself)."""
        src = seq.share
        assert src is not None
        n = len(seq.plan.tokens) - 1
        if src not in running or src.finish is not None:
            seq.share = None
            return True
        roles = [r for r in seq.roles if r in src.held and hasattr(self.engine.models[r],
                                                                    "copy_prefix")]
        if any(src.held[r] < n for r in roles):
            return False
        for role in roles:
            if seq.held[role] < n:
                self.engine.models[role].copy_prefix(src.slot, seq.slot, n)
                seq.held[role] = n
        before = seq.evaluated
        seq.evaluated = max(len(seq.tokens) - k for k in seq.held.values())
        self.engine.stats.prefilled -= before - seq.evaluated
        seq.share = None
        return True

    def _out(self, role: str, parts: list[Part]) -> np.ndarray | None:
        """Where a model's decode writes its parts' last rows: the row buffer itself when
        every part wants one and their slots are consecutive (else None: copied after)."""
        slots = [p.seq for p in parts]
        if any(p.rows != "last" for p in parts) or slots != list(range(slots[0],
                                                                        slots[-1] + 1)):
            return None
        return self.engine.row_buffer[self.engine.index(role), slots[0]:slots[-1] + 1]

    def advance(self, seq: Sequence, step: Step) -> Step:
        """Count ``step`` as ``seq``'s next token: its finish (the sequence then leaves its
        slot), or the grammar moves past it."""
        eng = self.engine
        seq.emitted += 1
        eng.count_token(seq.started)
        finish = eng.finish(step.token, seq.position + 1, seq.emitted, seq.plan.max_tokens)
        seq.tokens.append(step.token)
        if finish is not None:
            seq.finish = finish
            self.remove(seq)
            return replace(step, finish=finish)
        if seq.grammar is not None:
            seq.grammar.accept(step.token)
        return step
