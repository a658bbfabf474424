"""Evaluating N models over shared token sequences, and mixing and drawing one position.

Each model holds ``n_seq`` sequences (KV caches: the slots of :mod:`eft_local.batch`); a
batched evaluation (:meth:`Engine.evaluate_parts`) gives every model one decode carrying its
share of several sequences, as the decode :class:`~eft_local.schedule.Schedule` says (lanes
run concurrently: ctypes releases the GIL around llama.cpp); remote roles' requests go out
from I/O threads beside the lanes (:mod:`eft_local.remote.io`). :meth:`Engine.choose`
mixes one position's rows with the formula weights and draws with the position's noise. The
loop over steps is :mod:`eft_local.batch`; speculative decoding (:mod:`eft_local.speculative`)
drives the same methods.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Protocol

import numpy as np

from eft_local import penalties, sampler
from eft_local.backend.sequences import Part
from eft_local.errors import EftError
from eft_local.remote.http import Traffic
from eft_local.remote.io import RemoteIO, is_remote
from eft_local.sampler import SamplerSettings
from eft_local.schedule import shapes as schedules
from eft_local.schedule.lanes import Gate, LaneStopped
from eft_local.schedule.shapes import Schedule
from eft_local.schedule.watch import Watch
from eft_local.utf8 import Constraint


class Model(Protocol):
    """What the engine needs of a model; :class:`eft_local.backend.LlamaModel` is one. A
    model holds ``n_seq`` sequences (KV caches), each of up to ``n_ctx`` tokens."""

    path: Path
    n_vocab: int
    n_ctx: int
    n_seq: int

    def decode(self, parts: Sequence[Part], out: np.ndarray | None = None
               ) -> list[np.ndarray | None]: ...
    def seq_tokens(self, seq: int) -> list[int]: ...
    def rewind(self, n_past: int, seq: int = 0) -> None: ...
    def is_eog(self, token: int) -> bool: ...
    def piece(self, token: int, *, special: bool = False) -> bytes: ...
    def tokenize(self, text: str, *, add_bos: bool, special: bool) -> list[int]: ...


@dataclass(frozen=True)
class Step:
    """One generated token, with diagnostics when they were asked for."""

    position: int
    token: int
    p_mix: float
    """The token's probability under the filtered mix it was drawn from (under a grammar
    without diagnostics: before the grammar's mask, see :func:`sampler.grammar_pick`)."""
    p_models: Mapping[str, float] | None = None
    ref_token: int | None = None
    from_draft: bool = False
    logprob: float | None = None
    """With ``top_n`` or diagnostics: the token's log-prob under the mix at temperature 1,
    no filters."""
    top: tuple[tuple[int, float], ...] | None = None
    """With ``top_n``: the most likely (id, log-prob) pairs of that distribution."""
    logprob_models: Mapping[str, float] | None = None
    """With diagnostics: the token's log-prob under each model alone."""
    top_models: Mapping[str, tuple[tuple[int, float], ...]] | None = None
    """With diagnostics and ``top_n``: each model's most likely (id, log-prob) pairs."""
    finish: str | None = None
    """On the last step of a generation: ``eog`` (an end-of-generation token), ``length``
    (``max_tokens``) or ``context`` (the context is full)."""


@dataclass
class Stats:
    """Counters and timers, cumulative until :meth:`reset`."""

    generated: int = 0
    prefilled: int = 0
    shifted: int = 0
    """Prompt tokens kept by cutting older tokens out of a cache (moved, not evaluated;
    per prompt, the most that any model moved)."""
    eval_seconds: dict[str, float] = field(default_factory=dict)
    sampler_seconds: float = 0.0
    wall_seconds: float = 0.0
    first_token_seconds: float | None = None
    blocks: int = 0  # speculative: verified blocks that held at least one draft token
    drafted: int = 0
    accepted: int = 0
    draft_seconds: float = 0.0
    verify_seconds: float = 0.0
    traffic: dict[str, Traffic] = field(default_factory=dict)  # remote roles' network costs

    def reset(self) -> None:
        """Zero everything."""
        self.__init__()  # type: ignore[misc]

    def tokens_per_second(self) -> float:
        """Generated tokens per wall-clock second of generation."""
        return self.generated / self.wall_seconds if self.wall_seconds else 0.0

    def acceptance_rate(self) -> float:
        """Accepted draft tokens per drafted token (0 when nothing was drafted)."""
        return self.accepted / self.drafted if self.drafted else 0.0


SAME_COST = 0.1
"""Model files whose sizes differ by at most this fraction cost the same to decode (a base
and its instruct model differ by a chat template and metadata)."""


class Engine:
    """Evaluate and mix ``models`` (role -> model), masked by ``allowed``.

    Decoding steps evaluate the models as ``schedule`` says (default: concurrent lanes with
    ``parallel``, else one after another); prompts are evaluated by each model with the
    whole thread budget, one after another. A generation evaluates only the models it needs
    (:meth:`needed`: non-zero weight, and any that diagnostics or conservative decoding
    read); the others' caches catch up, from their longest cached prefix, when needed again.
    """

    def __init__(self, models: Mapping[str, Model], *, template_role: str, allowed: np.ndarray,
                 conservative_role: str | None = None, parallel: bool = False,
                 n_threads: int | None = None, schedule: Schedule | None = None) -> None:
        self.models = dict(models)
        self.roles = tuple(self.models)
        for kind, role in (("template", template_role), ("conservative", conservative_role)):
            if role is not None and role not in self.models:
                raise EftError(f"{kind} role {role!r} is not among the models "
                               f"({', '.join(self.roles)})")
        self._index = {r: i for i, r in enumerate(self.roles)}
        self.template_role = template_role
        self.conservative_role = conservative_role or template_role
        """Whose top-p set conservative decoding keeps, and whose own pick diagnostics show,
        when a call names none (the session names one in every call)."""
        self.allowed = allowed
        self.width = int(allowed.size)
        self.n_ctx = min(m.n_ctx for m in self.models.values())
        """Tokens each sequence may hold (the smallest model's per-sequence context)."""
        self.n_seq = max(1, min(int(getattr(m, "n_seq", 1)) for m in self.models.values()))
        """Sequences every model holds at once (slots)."""
        self.n_batch = max(1, min((int(getattr(m, "n_batch", 512)) for m in
                                   self.models.values()), default=512))
        """Most tokens one decode of a model takes: what a step reads of joining prompts."""
        self.stats = Stats()
        self.last: tuple[np.ndarray, np.ndarray, str, tuple[str, ...]] | None = None
        """Rows, weights, conservative role and evaluated models of the last sampled step
        (for :meth:`why`)."""
        self._last_history: tuple[int, ...] = ()  # under penalties: what they looked at
        self.n_threads = max(1, n_threads or os.cpu_count() or 1)
        self.remote_roles = tuple(r for r, m in self.models.items() if is_remote(m))
        """Roles that remote engines evaluate, each in an I/O thread (:attr:`remote`)."""
        self.local_roles = tuple(r for r in self.roles if r not in self.remote_roles)
        self.remote = RemoteIO(len(self.remote_roles))
        sizes = {r: float(file_size(self.models[r])) for r in self.local_roles}
        self.schedule = schedule or (schedules.lanes(sizes, self.n_threads) if parallel
                                     else schedules.sequential(self.local_roles))
        self.active: tuple[str, ...] = self.roles
        self._pool: ThreadPoolExecutor | None = None
        self._pool_size = 0
        self._rows = np.zeros((len(self.roles), self.n_seq, self.width), dtype=np.float32)
        self._scores = np.empty(self.width, dtype=np.float32)
        self._samplers: dict[SamplerSettings, sampler.Sampler] = {}
        self._penalties: dict[SamplerSettings, penalties.Penalty | None] = {}
        self.breakers = penalties.BreakerTable(self.template_model)
        """DRY's sequence breakers as tokens of the template model's vocabulary."""
        self.watch: Watch | None = None
        """Re-measures the schedule while decoding and switches (set with ``auto``)."""

    @property
    def template_model(self) -> Model:
        """The model whose tokenizer, chat template and end-of-generation tokens are used."""
        return self.models[self.template_role]

    def is_eog(self, token: int) -> bool:
        """True when ``token`` ends generation (the template model's EOS/EOT/EOG ids)."""
        return self.template_model.is_eog(token)

    def index(self, role: str) -> int:
        """Position of ``role`` in :attr:`roles` (and in rows and weights)."""
        return self._index[role]

    def cheapest_role(self, weights: np.ndarray, prefer: str | None = None) -> str:
        """The cheapest model with a non-zero weight: the smallest file, where files within
        :data:`SAME_COST` of the smallest count as equal and ``prefer`` (then role order)
        breaks the tie. The default drafter for speculative decoding."""
        live = [r for r, w in zip(self.roles, np.asarray(weights), strict=True) if w != 0]
        live = live or list(self.roles)
        cost = {r: file_size(self.models[r]) for r in live}
        low = min(cost.values())
        cheap = [r for r in live if cost[r] <= low * (1.0 + SAME_COST)]
        return prefer if prefer in cheap else cheap[0]

    @property
    def allowed(self) -> np.ndarray:
        """Bool mask of the token ids that may be drawn (the common range, minus unused);
        assign a new mask to change it (the engine keeps the blocked ids precomputed)."""
        return self._allowed

    @allowed.setter
    def allowed(self, mask: np.ndarray) -> None:
        self._allowed = mask
        self._blocked = np.flatnonzero(~np.asarray(mask, dtype=bool))

    @property
    def row_buffer(self) -> np.ndarray:
        """The (models, sequences, width) buffer that decoding steps write rows into."""
        return self._rows

    @property
    def lanes(self) -> list[list[str]]:
        """Every lane of the decode schedule, stage after stage."""
        return [list(lane) for stage in self.schedule.stages for lane in stage]

    def set_schedule(self, schedule: Schedule) -> None:
        """Decode with ``schedule`` from the next step on."""
        named = [r for r in schedule.roles() if r not in self.remote_roles]
        if sorted(named) != sorted(self.local_roles):
            raise EftError(f"schedule {schedule.describe()!r} does not name every model once")
        self.schedule = schedule

    def needed(self, weights: np.ndarray, settings: SamplerSettings, *,
               diagnostics: bool = False, extra: Sequence[str] = (),
               conservative: str | None = None) -> tuple[str, ...]:
        """The models a generation evaluates: non-zero weight, the conservative model when
        conservative decoding reads it, every model for diagnostics, and ``extra`` (the
        drafter)."""
        w = np.asarray(weights).ravel()
        need = {r for r, x in zip(self.roles, w, strict=True) if x != 0} | set(extra)
        if diagnostics:
            need = set(self.roles)
        if settings.conservative_top_p is not None:
            need.add(conservative or self.conservative_role)
        if not need:
            need.add(self.template_role)
        return tuple(r for r in self.roles if r in need)

    def activate(self, roles: Sequence[str]) -> None:
        """The models evaluated from now on (the watch times steps per set of models)."""
        active = tuple(r for r in self.roles if r in roles)
        if active != self.active:
            self.active = active
            if self.watch is not None:
                self.watch.models(active)

    # -- evaluation -----------------------------------------------------------------------
    def _use_threads(self, role: str, n: int) -> None:
        # asked every time: models may be shared with other engines (bench, explore) that
        # set other counts; a model skips the call when nothing changes
        setter = getattr(self.models[role], "set_threads", None)
        if setter is not None:
            setter(n)

    def held(self, role: str, seq: int = 0) -> list[int]:
        """The tokens ``role``'s cache holds in sequence ``seq``."""
        return self.models[role].seq_tokens(seq)

    def rows_of(self, seq: int) -> np.ndarray:
        """The (models, width) rows that the last evaluation left for sequence ``seq`` (a
        view into :attr:`row_buffer`; rows of models not evaluated for it are stale)."""
        return self._rows[:, seq]

    def evaluate_role(self, role: str, n_keep: int, tokens: list[int], *,
                      all_logits: bool = False, seq: int = 0, whole: bool = False
                      ) -> np.ndarray:
        """Rewind one model's sequence ``seq`` to ``n_keep`` and evaluate ``tokens`` with
        every thread (it runs alone: the drafter while drafting); rows (rows, width), or
        with ``whole`` the model's own rows (rows, n_vocab)."""
        self._use_threads(role, self.n_threads)
        part = Part(seq, n_keep, tuple(tokens), "all" if all_logits else "last")
        return self._timed_decode(role, [part], None, whole)[0]  # type: ignore[return-value]

    def _timed_decode(self, role: str, parts: Sequence[Part], out: np.ndarray | None,
                      whole: bool = False) -> list[np.ndarray | None]:
        start = time.perf_counter()
        rows = self.models[role].decode(parts, out)
        self.stats.eval_seconds[role] = (self.stats.eval_seconds.get(role, 0.0)
                                         + time.perf_counter() - start)
        if whole:
            return rows
        return [None if r is None else r[:, : self.width] for r in rows]

    def evaluate(self, n_keep: int | Sequence[int], tokens: list[int] | Sequence[list[int]],
                 *, all_logits: bool = False, seq: int = 0) -> np.ndarray:
        """Rewind each model to ``n_keep``, evaluate ``tokens``; rows (models, rows, width).

        ``n_keep`` and ``tokens`` may be given per model (same order as ``roles``).
        """
        return np.stack(self.evaluate_each(n_keep, tokens, all_logits=all_logits, seq=seq))

    def evaluate_each(self, n_keep: int | Sequence[int],
                      tokens: list[int] | Sequence[list[int]], *, all_logits: bool = False,
                      roles: Sequence[str] | None = None, prefill: bool = False,
                      out: np.ndarray | None = None, seq: int = 0) -> list[np.ndarray]:
        """Like :meth:`evaluate` for ``roles`` (default: all) in sequence ``seq``, one array
        per model (row counts may differ). ``prefill``: each model with every thread, one
        after another; else the decode schedule. ``out`` (models, width) receives each
        model's last row."""
        roles = self.roles if roles is None else tuple(roles)
        keeps = [n_keep] * len(roles) if isinstance(n_keep, int) else list(n_keep)
        batches = (list(tokens) if tokens and isinstance(tokens[0], list)
                   else [list(tokens)] * len(roles))  # type: ignore[list-item]
        kind = "all" if all_logits else "last"
        jobs = {r: [Part(seq, k, tuple(t), kind)]
                for r, k, t in zip(roles, keeps, batches, strict=True)}
        outs = {r: None if out is None or all_logits else out[self._index[r]][None]
                for r in roles}
        done = self.evaluate_parts(jobs, prefill=prefill, outs=outs)
        return [done[r][0] for r in roles]  # type: ignore[misc]

    def evaluate_parts(self, jobs: Mapping[str, Sequence[Part]], *, prefill: bool,
                       outs: Mapping[str, np.ndarray | None] | None = None
                       ) -> dict[str, list[np.ndarray | None]]:
        """Each role's ``parts`` in one batched decode of that model (several sequences at
        once), local models as the decode schedule says (``prefill``: each with every
        thread, one after another), remote ones in I/O threads meanwhile; each part's rows.
        ``outs[role]`` (parts, width) receives the parts' last rows (see :func:`decode`)."""
        outs = outs or {}
        pending = self.remote.start({r: partial(self._timed_decode, r, parts, outs.get(r))
                                     for r, parts in jobs.items() if r in self.remote_roles},
                                    self.models, self.stats.traffic)
        try:
            done = self._evaluate_local([r for r in jobs if r not in pending], jobs, outs,
                                        prefill)
            done.update(self.remote.finish(pending))
        except BaseException:  # the remote requests' late results must not count
            self.remote.abandon(pending, self.models)
            raise
        return done

    def _evaluate_local(self, roles: Sequence[str], jobs: Mapping[str, Sequence[Part]],
                        outs: Mapping[str, np.ndarray | None], prefill: bool
                        ) -> dict[str, list[np.ndarray | None]]:
        done: dict[str, list[np.ndarray | None]] = {}
        if prefill:
            for r in roles:
                self._use_threads(r, self.n_threads)
                done[r] = self._timed_decode(r, jobs[r], outs.get(r))
            return done
        for stage_lanes, threads in self.schedule.threads(self.n_threads, roles):
            for lane in stage_lanes:
                for r in lane:
                    self._use_threads(r, threads)
            if len(stage_lanes) == 1:
                done.update(self._run_lane(stage_lanes[0], jobs, outs))
                continue
            # the first lane runs in this thread, the others in workers: one hand-off fewer
            if self._pool_size < len(stage_lanes) - 1:
                self.close()
                self._pool_size = len(stage_lanes) - 1
                self._pool = ThreadPoolExecutor(self._pool_size)
            assert self._pool is not None
            gate, futures = Gate(), []
            try:
                for lane in stage_lanes[1:]:
                    futures.append(self._pool.submit(self._run_lane, lane, jobs, outs, gate))
                done.update(self._run_lane(stage_lanes[0], jobs, outs, gate))
                for future in futures:
                    done.update(future.result())
            except BaseException:  # Ctrl-C or a failed lane: no rollback while one decodes
                gate.close()
                raise
        return done

    def _run_lane(self, lane: Sequence[str], jobs: Mapping[str, Sequence[Part]],
                  outs: Mapping[str, np.ndarray | None], gate: Gate | None = None
                  ) -> dict[str, list[np.ndarray | None]]:
        done = {}
        for r in lane:
            if gate is not None and not gate.enter():
                raise LaneStopped
            try:
                done[r] = self._timed_decode(r, jobs[r], outs.get(r))
            finally:
                if gate is not None:
                    gate.leave()
        return done

    # -- one sampling step ----------------------------------------------------------------
    def sampler(self, settings: SamplerSettings) -> sampler.Sampler:
        """The sampler for ``settings``, built once."""
        found = self._samplers.get(settings)
        if found is None:
            if len(self._samplers) > 8:
                self._samplers.clear()
            found = self._samplers[settings] = sampler.make_sampler(settings)
        return found

    def penalties(self, settings: SamplerSettings) -> penalties.Penalty | None:
        """The penalties of ``settings`` (:mod:`eft_local.penalties`), built once; None
        when all are off. A logit bias on an id beyond :attr:`width` is refused here."""
        if not settings.penalized:
            return None
        if settings not in self._penalties:
            if len(self._penalties) > 8:
                self._penalties.clear()
            self._penalties[settings] = penalties.make_penalties(
                settings, width=self.width, breakers=self.breakers)
        return self._penalties[settings]

    def scores(self, rows: np.ndarray, weights: np.ndarray, settings: SamplerSettings,
               conservative: str | None = None) -> np.ndarray:
        """The mix for one position as log-probs up to a constant, in a buffer that the
        next call reuses (conservative decoding: normalised, see :meth:`distribution`)."""
        if settings.conservative_top_p is not None:
            np.copyto(self._scores, self.distribution(rows, weights, settings, conservative))
            return self._scores
        return sampler.mix_scores(rows, weights, self._blocked, out=self._scores)

    def distribution(self, rows: np.ndarray, weights: np.ndarray, settings: SamplerSettings,
                     conservative: str | None = None) -> np.ndarray:
        """The mixed log-probs for one position, before temperature and filters;
        ``conservative`` (default :attr:`conservative_role`) is whose top-p set conservative
        decoding keeps."""
        if settings.conservative_top_p is not None:
            role = conservative or self.conservative_role
            return sampler.conservative_mix(rows, weights, self.index(role),
                                            settings.conservative_top_p, self.allowed)
        return sampler.mix_logits(rows, weights, self.allowed)

    def model_scores(self, row: np.ndarray) -> np.ndarray:
        """A copy of one model's row with the ids outside the common range at ``-inf``."""
        out = np.array(row, dtype=np.float32)
        out[self._blocked] = sampler.NEG_INF
        return out

    def model_logprobs(self, rows: np.ndarray, index: int) -> np.ndarray:
        """One model's own log-probs over the allowed ids."""
        return sampler.log_softmax(self.model_scores(rows[index]))

    def draw(self, scores: np.ndarray, settings: SamplerSettings, position: int,
             grammar: Constraint | None = None, history: Sequence[int] | None = None
             ) -> sampler.Pick:
        """Penalise (given the tokens before ``position``, ``history``), filter ``scores``
        (changed in place) and draw the token at ``position``, among the tokens ``grammar``
        allows when there is one."""
        penalize = None if history is None else self.penalties(settings)
        if penalize is not None:
            penalize(scores, history)  # type: ignore[arg-type]
        sample = self.sampler(settings)
        if grammar is None:
            return sample(scores, position)
        return sampler.grammar_pick(sample, scores, settings, position, grammar.allowed)

    def choose(self, rows: np.ndarray, weights: np.ndarray, settings: SamplerSettings,
               position: int, *, diagnostics: bool = False, top_n: int | None = None,
               conservative: str | None = None, grammar: Constraint | None = None,
               history: Sequence[int] = ()) -> Step:
        """Sample the token at ``position`` from the mix of ``rows`` (among the tokens that
        ``grammar`` allows), penalised given ``history`` (the sequence's tokens before
        ``position``); ``top_n`` (0 or more) adds the token's log-prob under the unfiltered
        mix (no penalty, no grammar: llama-server's default too) and its ``top_n`` best
        tokens; diagnostics add each model's log-prob of the token (and, with ``top_n``,
        each model's best tokens) and what ``conservative`` (default
        :attr:`conservative_role`) alone would have drawn."""
        start = time.perf_counter()
        role = conservative or self.conservative_role
        sample = self.sampler(settings)
        scores = self.scores(rows, weights, settings, role)
        penalize = self.penalties(settings)
        if penalize is not None:
            penalize(scores, history)
        refused = None
        if grammar is not None and diagnostics:  # exact probabilities: ask about every token
            refused = sampler.mask_disallowed(scores, grammar.allowed)
            picked = sample(scores, position)
        else:
            picked = self.draw(scores, settings, position, grammar)
        p_models = ref_token = logprob_models = top_models = None
        if diagnostics:
            lps = dict(zip(self.roles, (self.model_logprobs(rows, i)
                                        for i in range(len(self.roles))), strict=True))
            logprob_models = {r: float(lp[picked.token]) for r, lp in lps.items()}
            p_models = {r: float(np.exp(lp[picked.token])) for r, lp in lps.items()}
            if top_n is not None:
                top_models = {r: sampler.top_logprobs(lp, top_n) for r, lp in lps.items()}
            own = lps[role]
            if penalize is not None:  # penalties read raw scores, as for the mix
                own = penalize(self.model_scores(rows[self.index(role)]), history)
            if refused is not None:
                own[refused] = sampler.NEG_INF
            ref_token = sample(own, position).token  # may change lps[role] in place
        logprob = top = None
        if top_n is not None or diagnostics:
            mixed = self.distribution(rows, weights, settings, role)
            logprob = float(mixed[picked.token])
            top = sampler.top_logprobs(mixed, top_n) if top_n is not None else None
        self.last = (rows, weights, role, self.active)
        self._last_history = () if penalize is None else tuple(history)
        self.stats.sampler_seconds += time.perf_counter() - start
        return Step(position=position, token=picked.token, p_mix=picked.p,
                    p_models=p_models, ref_token=ref_token, logprob=logprob, top=top,
                    logprob_models=logprob_models, top_models=top_models)

    def why(self, settings: SamplerSettings, k: int = 5) -> dict[str, list[tuple[int, float]]]:
        """Top tokens of each evaluated model and of the mix at the last step."""
        if self.last is None:
            return {}
        rows, weights, role, active = self.last
        out = {r: sampler.top_logprobs(self.model_logprobs(rows, i), k)
               for i, r in enumerate(self.roles) if r in active}
        penalize = self.penalties(settings)
        mixed = (self.distribution(rows, weights, settings, role) if penalize is None else
                 penalize(np.array(self.scores(rows, weights, settings, role)),
                          self._last_history))
        out["mix"] = sampler.top_logprobs(sampler.filter_logprobs(mixed, settings), k)
        return {name: [(t, float(np.exp(lp))) for t, lp in top] for name, top in out.items()}

    # -- the end of a generation -------------------------------------------------------
    def finish(self, token: int, next_position: int, emitted: int, max_tokens: int
               ) -> str | None:
        """Why a generation ends after ``token`` (``eog``, ``context``, ``length``), or
        None when it goes on."""
        if self.is_eog(token):
            return "eog"
        if next_position >= self.n_ctx:
            return "context"
        return "length" if emitted >= max_tokens else None

    def observe_step(self, seconds: float) -> None:
        """One plain decoding step (evaluation and sampling) took ``seconds``: the watch
        may move decoding to another schedule from the next step on."""
        if self.watch is not None:
            new = self.watch.observe(seconds)
            if new is not None and new != self.schedule:
                self.set_schedule(new)

    def settle_schedule(self) -> None:
        """Steps other than plain ones follow: end any probe of the watch."""
        if self.watch is not None:
            home = self.watch.settle()
            if home != self.schedule:
                self.set_schedule(home)

    def count_token(self, started: float) -> None:
        """Count one generated token (and the time to the first one)."""
        if self.stats.first_token_seconds is None:
            self.stats.first_token_seconds = time.perf_counter() - started
        self.stats.generated += 1

    def close(self) -> None:
        """Stop worker threads (models are closed by their owner)."""
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool, self._pool_size = None, 0
        self.remote.close()


def file_size(model: Model) -> int:
    """A model's cost proxy: bytes of its file (its ``file_size()`` when it has one), 1 if
    unknown."""
    try:
        sized = getattr(model, "file_size", None)
        return int(sized()) if callable(sized) else Path(model.path).stat().st_size
    except (OSError, TypeError, ValueError):
        return 1

