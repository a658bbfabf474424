"""Many generations or scores at once: :meth:`Batches.run_many` and
:meth:`Batches.score_many`, the part of :class:`eft_local.session.Session` behind
``generate --input -np``, ``score --input -np`` and ``eval -np``.

Each runs up to ``parallel`` items in the session's slots (``LoadOptions.n_seq``) as soon
as one is free: generations side by side in one batched step per token
(:meth:`~eft_local.session.Session.step`), texts scored a piece of each in one batched
decode per model (:func:`eft_local.scoring.score_many`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import replace
from typing import TypeVar

from eft_local.batch import Batch
from eft_local.engine import Engine
from eft_local.errors import EftError
from eft_local.request import Chunk, Generation, Request, Result, collect
from eft_local.scoring import Score, check_scorable, score_many
from eft_local.settings import Settings

K = TypeVar("K")


class Batches:
    """Batch runs of a session (see the module docstring); they use the session's
    :meth:`start`, :meth:`step`, settings, tokenizer and free slots."""

    batch: Batch
    engine: Engine

    def _width(self, parallel: int | None) -> int:
        n = len(self.batch.slots)
        width = n if parallel is None else parallel
        if isinstance(width, bool) or not isinstance(width, int) or not 1 <= width <= n:
            raise EftError(f"invalid parallel {parallel!r}: this session holds {n} "
                           "sequence(s) (load it with n_seq)")
        return width

    def run_many(self, jobs: Iterable[tuple[K, Callable[[], Request]]], *,
                 parallel: int | None = None) -> Iterator[tuple[K, Result | EftError]]:
        """Run many generations, up to ``parallel`` (default: every slot) side by side, each
        as soon as a slot is free, in the order given: ``jobs`` are ``(key, prepare)``
        pairs; yields ``(key, Result)`` as each finishes, or ``(key, error)`` when its
        preparation failed. Greedy generations give the same tokens as one at a time, up
        to llama.cpp's batched arithmetic."""
        width = self._width(parallel)
        pending = iter(jobs)
        running: dict[Generation, tuple[K, list[Chunk]]] = {}
        try:
            while True:
                while len(running) < width and (job := next(pending, None)) is not None:
                    try:
                        gen = self.start(job[1]())
                    except EftError as exc:
                        yield job[0], exc
                        continue
                    running[gen] = (job[0], [])
                if not running:
                    return
                try:
                    stepped = self.step()
                except EftError as exc:  # a failed step fails what ran in it, not the rest
                    for gen, (key, _got) in list(running.items()):
                        gen.cancel()
                        del running[gen]
                        yield key, exc
                    continue
                for gen, chunks in stepped:
                    key, got = running[gen]
                    got += chunks
                    if gen.finish is not None:
                        del running[gen]
                        if isinstance(gen.error, EftError):
                            yield key, gen.error
                        elif gen.error is not None:
                            raise gen.error
                        else:
                            yield key, collect(got, len(gen.request.tokens))
        finally:
            for gen in running:
                gen.cancel()

    def score_many(self, texts: Iterable[tuple[K, str | Sequence[int]]], *,
                   parallel: int | None = None, settings: Settings | None = None,
                   top_n: int = 0, per_model: bool = False, **changes: object
                   ) -> Iterator[tuple[K, Score | EftError]]:
        """:meth:`score` for many ``(key, text)`` pairs, up to ``parallel`` (default: every
        slot) evaluated together: ``(key, Score)`` in order, or ``(key, error)`` for a text
        that cannot be scored."""
        s = self.settings_for(settings, **changes)
        width = self._width(parallel)
        pending = iter(texts)
        while True:
            group: list[tuple[K, list[int]]] = []
            for key, text in pending:
                try:
                    tokens = (self.raw_tokens(text) if isinstance(text, str)
                              else [int(t) for t in text])
                    check_scorable(self.engine, tokens)
                except EftError as exc:
                    yield key, exc
                    continue
                group.append((key, tokens))
                if len(group) == width:
                    break
            if not group:
                return
            slots = self.free_slots()[:len(group)]
            for slot in slots:
                self.batch.touch(slot)
            scores = score_many(self.engine, [(t, slot) for (_k, t), slot in
                                              zip(group, slots, strict=True)],
                                self.weights(s), s.sampling, top_n=top_n,
                                per_model=per_model, conservative=self.conservative_role(s))
            for (key, _tokens), result in zip(group, scores, strict=True):
                yield key, replace(result, formula=s.describe())
