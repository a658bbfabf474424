"""The decode loop over N models that condition on one token sequence.

Every model holds the same tokens in its KV cache. :meth:`Engine.prime` brings all of them
to a prompt, re-using the longest cached prefix (so a chat turn evaluates only its new
suffix); each step mixes the models' rows with the formula weights, samples with the
position's uniform draw, and evaluates the chosen token on every model. With
``parallel=True`` the models are grouped into lanes (at most one per thread of the budget,
balanced by file size) that decode concurrently; ctypes releases the GIL around llama.cpp.
Speculative decoding (:mod:`eft_local.speculative`) drives the same evaluation methods.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np

from eft_local import sampler
from eft_local.errors import EftError
from eft_local.sampler import SamplerSettings


class Model(Protocol):
    """What the engine needs of a model; :class:`eft_local.backend.LlamaModel` is one."""

    path: Path
    n_vocab: int
    n_ctx: int
    tokens: list[int]

    def eval(self, tokens: list[int], *, all_logits: bool = False) -> np.ndarray: ...
    def rewind(self, n_past: int) -> None: ...
    def is_eog(self, token: int) -> bool: ...
    def piece(self, token: int, *, special: bool = False) -> bytes: ...
    def tokenize(self, text: str, *, add_bos: bool, special: bool) -> list[int]: ...


@dataclass(frozen=True)
class Step:
    """One generated token, with diagnostics when they were asked for."""

    position: int
    token: int
    p_mix: float
    p_models: Mapping[str, float] | None = None
    ref_token: int | None = None
    from_draft: bool = False


@dataclass
class Stats:
    """Counters and timers, cumulative until :meth:`reset`."""

    generated: int = 0
    prefilled: int = 0
    eval_seconds: dict[str, float] = field(default_factory=dict)
    sampler_seconds: float = 0.0
    wall_seconds: float = 0.0
    first_token_seconds: float | None = None
    blocks: int = 0  # speculative: verified blocks that held at least one draft token
    drafted: int = 0
    accepted: int = 0
    draft_seconds: float = 0.0
    verify_seconds: float = 0.0

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
    """Decode with a weighted mix of ``models`` (role -> model), masked by ``allowed``."""

    def __init__(self, models: Mapping[str, Model], *, template_role: str, allowed: np.ndarray,
                 conservative_role: str | None = None, parallel: bool = False,
                 n_threads: int | None = None) -> None:
        self.models = dict(models)
        self.roles = tuple(self.models)
        for kind, role in (("template", template_role), ("conservative", conservative_role)):
            if role is not None and role not in self.models:
                raise EftError(f"{kind} role {role!r} is not among the models "
                               f"({', '.join(self.roles)})")
        self.template_role = template_role
        self.conservative_role = conservative_role or template_role
        """Whose top-p set conservative decoding keeps, and whose own pick diagnostics show
        (the session sets it from the preset, or the formula's fine-tuned model)."""
        self.allowed = allowed
        self.width = int(allowed.size)
        self.n_ctx = min(m.n_ctx for m in self.models.values())
        self.stats = Stats()
        self.rows: np.ndarray | None = None
        self.last: tuple[np.ndarray, np.ndarray] | None = None  # rows, weights of last step
        self.finish_reason = "length"
        self.n_threads = max(1, n_threads or os.cpu_count() or 1)
        self.lanes = _lanes(self.models, self.n_threads) if parallel else [list(self.roles)]
        self._pool = ThreadPoolExecutor(len(self.lanes)) if len(self.lanes) > 1 else None
        if self._pool is not None:
            self.share_threads()

    @property
    def template_model(self) -> Model:
        """The model whose tokenizer, chat template and end-of-generation tokens are used."""
        return self.models[self.template_role]

    def is_eog(self, token: int) -> bool:
        """True when ``token`` ends generation (the template model's EOS/EOT/EOG ids)."""
        return self.template_model.is_eog(token)

    def index(self, role: str) -> int:
        """Position of ``role`` in :attr:`roles` (and in rows and weights)."""
        return self.roles.index(role)

    def cheapest_role(self, weights: np.ndarray, prefer: str | None = None) -> str:
        """The cheapest model with a non-zero weight: the smallest file, where files within
        :data:`SAME_COST` of the smallest count as equal and ``prefer`` (then role order)
        breaks the tie. The default drafter for speculative decoding."""
        live = [r for r, w in zip(self.roles, np.asarray(weights), strict=True) if w != 0]
        live = live or list(self.roles)
        cost = {r: _file_size(self.models[r]) for r in live}
        low = min(cost.values())
        cheap = [r for r in live if cost[r] <= low * (1.0 + SAME_COST)]
        return prefer if prefer in cheap else cheap[0]

    # -- threads --------------------------------------------------------------------------
    def share_threads(self) -> None:
        """Split the thread budget between the parallel lanes (one model per lane at once)."""
        per_lane = max(1, self.n_threads // len(self.lanes))
        for lane in self.lanes:
            for role in lane:
                _set_threads(self.models[role], per_lane)

    # -- evaluation over all models -------------------------------------------------------
    def evaluate_role(self, role: str, n_keep: int, tokens: list[int], *,
                      all_logits: bool = False) -> np.ndarray:
        """Rewind one model to ``n_keep`` and evaluate ``tokens``; rows (rows, width)."""
        return self._timed_eval(role, n_keep, tokens, all_logits)

    def _timed_eval(self, role: str, n_keep: int, tokens: list[int], all_logits: bool
                    ) -> np.ndarray:
        model = self.models[role]
        start = time.perf_counter()
        model.rewind(n_keep)
        rows = model.eval(tokens, all_logits=all_logits)[:, : self.width]
        self.stats.eval_seconds[role] = (self.stats.eval_seconds.get(role, 0.0)
                                         + time.perf_counter() - start)
        return rows

    def evaluate(self, n_keep: int | Sequence[int], tokens: list[int] | Sequence[list[int]],
                 *, all_logits: bool = False) -> np.ndarray:
        """Rewind each model to ``n_keep``, evaluate ``tokens``; rows (models, rows, width).

        ``n_keep`` and ``tokens`` may be given per model (same order as ``roles``).
        """
        return np.stack(self.evaluate_each(n_keep, tokens, all_logits=all_logits))

    def evaluate_each(self, n_keep: int | Sequence[int],
                      tokens: list[int] | Sequence[list[int]], *, all_logits: bool = False
                      ) -> list[np.ndarray]:
        """Like :meth:`evaluate`, one array per model (row counts may differ)."""
        keeps = [n_keep] * len(self.roles) if isinstance(n_keep, int) else list(n_keep)
        batches = (list(tokens) if tokens and isinstance(tokens[0], list)
                   else [list(tokens)] * len(self.roles))  # type: ignore[list-item]
        jobs = {r: (k, t) for r, k, t in zip(self.roles, keeps, batches, strict=True)}
        if self._pool is None:
            done = self._run_lane(self.roles, jobs, all_logits)
        else:
            futures = [self._pool.submit(self._run_lane, lane, jobs, all_logits)
                       for lane in self.lanes]
            done = {}
            for future in futures:
                done.update(future.result())
        return [done[r] for r in self.roles]

    def _run_lane(self, lane: Sequence[str], jobs: Mapping[str, tuple[int, list[int]]],
                  all_logits: bool) -> dict[str, np.ndarray]:
        return {r: self._timed_eval(r, *jobs[r], all_logits) for r in lane}

    def prime(self, tokens: list[int]) -> None:
        """Make every model hold ``tokens``, re-using cached prefixes; sets :attr:`rows`."""
        if not tokens:
            raise EftError("empty prompt: nothing to condition on")
        if len(tokens) >= self.n_ctx:
            raise EftError(f"prompt is {len(tokens)} tokens; the context holds {self.n_ctx} "
                           "(raise n_ctx or shorten the prompt)")
        keeps, suffixes = [], []
        for role in self.roles:
            cached = self.models[role].tokens
            k = common_prefix(cached, tokens)
            k = min(k, len(tokens) - 1)  # the last token is re-evaluated for its logits
            keeps.append(k)
            suffixes.append(tokens[k:])
        self.stats.prefilled += max(len(s) for s in suffixes)
        self.rows = self.evaluate(keeps, suffixes)[:, -1, :]

    def advance(self, token: int) -> None:
        """Append one token to every model; sets :attr:`rows` to the next position."""
        n = len(self.template_model.tokens)
        self.rows = self.evaluate(n, [token])[:, -1, :]

    # -- one sampling step ----------------------------------------------------------------
    def distribution(self, rows: np.ndarray, weights: np.ndarray, settings: SamplerSettings
                     ) -> np.ndarray:
        """The mixed log-probs for one position, before temperature and filters."""
        if settings.conservative_top_p is not None:
            return sampler.conservative_mix(rows, weights, self.index(self.conservative_role),
                                            settings.conservative_top_p, self.allowed)
        return sampler.mix_logits(rows, weights, self.allowed)

    def model_logprobs(self, rows: np.ndarray, index: int) -> np.ndarray:
        """One model's own log-probs over the allowed ids."""
        return sampler.log_softmax(np.where(self.allowed, rows[index], sampler.NEG_INF))

    def choose(self, rows: np.ndarray, weights: np.ndarray, settings: SamplerSettings,
               position: int, *, diagnostics: bool = False) -> Step:
        """Sample the token at ``position`` from the mix of ``rows``."""
        start = time.perf_counter()
        mixed = self.distribution(rows, weights, settings)
        token, final = sampler.pick(mixed, settings, position)
        p_models = ref_token = None
        if diagnostics:
            lps = [self.model_logprobs(rows, i) for i in range(len(self.roles))]
            p_models = {r: float(np.exp(lp[token]))
                        for r, lp in zip(self.roles, lps, strict=True)}
            ref_token, _ = sampler.pick(lps[self.index(self.conservative_role)], settings,
                                        position)
        self.last = (rows, weights)
        self.stats.sampler_seconds += time.perf_counter() - start
        return Step(position=position, token=token, p_mix=float(np.exp(final[token])),
                    p_models=p_models, ref_token=ref_token)

    def why(self, settings: SamplerSettings, k: int = 5) -> dict[str, list[tuple[int, float]]]:
        """Top tokens of each model and of the mix at the last step."""
        if self.last is None:
            return {}
        rows, weights = self.last
        out = {r: sampler.top_tokens(self.model_logprobs(rows, i), k)
               for i, r in enumerate(self.roles)}
        out["mix"] = sampler.top_tokens(
            sampler.filter_logprobs(self.distribution(rows, weights, settings), settings), k)
        return out

    # -- the loop -------------------------------------------------------------------------
    def generate(self, tokens: list[int], weights: np.ndarray, settings: SamplerSettings,
                 *, max_tokens: int, diagnostics: bool = False) -> Iterator[Step]:
        """Yield sampled tokens until an end-of-generation token, ``max_tokens`` or a full
        context; :attr:`finish_reason` says which (the caller may stop earlier)."""
        started = time.perf_counter()
        self.finish_reason = "length"
        self.prime(tokens)
        position = len(tokens)
        try:
            for n in range(1, max_tokens + 1):
                step = self.choose(self.rows, weights, settings, position,
                                   diagnostics=diagnostics)
                self.count_token(started)
                yield step
                if self.is_eog(step.token):
                    self.finish_reason = "eog"
                    return
                position += 1
                if position >= self.n_ctx:
                    self.finish_reason = "context"
                    return
                if n < max_tokens:  # no decode for a token nobody will sample after
                    self.advance(step.token)
        finally:
            self.stats.wall_seconds += time.perf_counter() - started

    def count_token(self, started: float) -> None:
        """Count one generated token (and the time to the first one)."""
        if self.stats.first_token_seconds is None:
            self.stats.first_token_seconds = time.perf_counter() - started
        self.stats.generated += 1

    def close(self) -> None:
        """Stop worker threads (models are closed by their owner)."""
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None


def _lanes(models: Mapping[str, Model], n_threads: int) -> list[list[str]]:
    """Group roles into at most ``n_threads`` lanes of similar cost (file size), largest
    model first, so that parallel decodes never need more threads than the budget."""
    n_lanes = max(1, min(n_threads, len(models)))
    cost = {r: _file_size(m) for r, m in models.items()}
    lanes: list[list[str]] = [[] for _ in range(n_lanes)]
    load = [0] * n_lanes
    for role in sorted(models, key=lambda r: -cost[r]):
        i = load.index(min(load))
        lanes[i].append(role)
        load[i] += max(cost[role], 1)
    return [lane for lane in lanes if lane]


def _file_size(model: Model) -> int:
    """Bytes of the model's file (its ``file_size()`` when it has one), 1 if unknown."""
    try:
        sized = getattr(model, "file_size", None)
        return int(sized()) if callable(sized) else Path(model.path).stat().st_size
    except (OSError, TypeError, ValueError):
        return 1


def _set_threads(model: Model, n: int) -> None:
    setter = getattr(model, "set_threads", None)
    if setter is not None:
        setter(n)


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """Length of the longest common prefix of two token sequences."""
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i
