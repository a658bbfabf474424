"""The sequences a model's KV cache holds: evaluating, batching, rolling back, sharing.

One llama.cpp context holds ``n_seq`` sequences, and one ``llama_decode`` carries tokens of
several of them. By default each sequence has its own cache stream (llama.cpp's
``kv_unified=false``, as llama-server's ``-np N``): a sequence's attention is computed over
its own stream alone, so its rows are those it would get decoded by itself (llama.cpp then
batches only runs of consecutive sequence ids with equal token counts: a gap between busy
slots costs another pass over the weights), and :meth:`Sequences.copy_prefix` copies the
source's whole stream. With ``kv_unified`` one cache holds every sequence, cells tagged by
the sequences that use them: any set of sequences goes in one pass and a prefix is shared
without copying, but each token's attention spans the whole cache, so rows differ slightly
with what else is cached. :class:`Sequences` is the evaluation half of
:class:`~eft_local.backend.model.LlamaModel`; :class:`Part` is one sequence's share of a
batched decode (:meth:`Sequences.decode`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from eft_local.backend.library import L
from eft_local.errors import EftError

ROWS = ("last", "all", "none")


@dataclass(frozen=True)
class Part:
    """One sequence's share of a batched decode (:meth:`Sequences.decode`).

    The sequence is first rewound to ``keep`` tokens, then ``tokens`` are appended.
    ``rows``: ``"last"`` the logits row after the last token, ``"all"`` one row per token,
    ``"none"`` no row (a prompt chunk whose logits nobody reads).
    """

    seq: int
    keep: int
    tokens: tuple[int, ...]
    rows: str = "last"


class Sequences:
    """Per-sequence evaluation over one llama.cpp context (mixed into ``LlamaModel``).

    ``seq_tokens(s)`` is what the cache holds for sequence ``s``; ``tokens`` is sequence 0's
    list (the one-sequence interface). Not thread-safe: one caller at a time.
    """

    path: Path
    n_vocab: int
    n_ctx: int
    """Tokens each sequence may hold."""
    n_batch: int
    n_seq: int
    partial_rewind: bool
    can_shift: bool
    kv_unified: bool
    """One cache for every sequence (else a stream per sequence: module doc)."""
    full_rewinds: int
    tokens: list[int]
    _ctx: object
    _mem: object
    _batch: object
    _cells: int  # KV cells of the whole cache (n_seq x n_ctx)

    def _init_sequences(self, n_seq: int) -> None:
        self.n_seq = n_seq
        self._seqs: list[list[int]] = [[] for _ in range(n_seq)]
        self.tokens = self._seqs[0]  # the same list: never rebound
        self._shared: dict[tuple[int, int], int] = {}
        """(a, b) with a < b -> how many leading cells sequences a and b share."""

    # -- reading --------------------------------------------------------------------------
    def seq_tokens(self, seq: int) -> list[int]:
        """What the cache holds for sequence ``seq`` (the live list: do not modify it)."""
        return self._seqs[self._check_seq(seq)]

    def _check_seq(self, seq: int) -> int:
        if not (isinstance(seq, (int, np.integer)) and 0 <= seq < self.n_seq):
            raise ValueError(f"sequence {seq!r} outside [0, {self.n_seq})")
        return seq

    def _full(self, seq: int, have: int, n: int) -> EftError:
        where = f" of sequence {seq}" if self.n_seq > 1 else ""
        return EftError(f"{self.path.name}: context{where} full ({have} + {n} tokens > "
                        f"n_ctx {self.n_ctx})")

    # -- one sequence ---------------------------------------------------------------------
    def eval(self, tokens: list[int], *, all_logits: bool = False, seq: int = 0
             ) -> np.ndarray:
        """Append ``tokens`` to sequence ``seq``; return copied logit rows, shape (rows,
        n_vocab): one per new position when ``all_logits``, else the last one only. On a
        failure or Ctrl-C the sequence keeps what it had."""
        if not tokens:
            raise ValueError("eval needs at least one token")
        keep = len(self._seqs[self._check_seq(seq)])
        part = Part(seq, keep, tuple(tokens), "all" if all_logits else "last")
        return self.decode([part])[0]  # type: ignore[return-value]

    def eval_into(self, tokens: list[int], out: np.ndarray, seq: int = 0) -> None:
        """Like :meth:`eval` for the last row only, copied into ``out`` (the first
        ``out.size`` logits): no allocation per step."""
        if len(tokens) > 1:
            out[:] = self.eval(tokens, seq=seq)[-1, : out.size]
            return
        if not 0 <= seq < self.n_seq:
            self._check_seq(seq)
        have = self._seqs[seq]
        if len(have) + 1 > self.n_ctx:
            raise self._full(seq, len(have), 1)
        b = self._batch
        b.token[0], b.pos[0], b.n_seq_id[0], b.seq_id[0][0], b.logits[0] = (
            tokens[0], len(have), 1, seq, True)
        b.n_tokens = 1
        start_len = len(have)
        try:
            rc = L.llama_decode(self._ctx, b)
            if rc != 0:
                raise EftError(f"{self.path.name}: llama_decode failed (code {rc})")
            have.append(tokens[0])
        except BaseException:  # a failed decode or Ctrl-C: the cache keeps what it had
            self._drop_from(start_len, seq)
            raise
        ptr = L.llama_get_logits_ith(self._ctx, 0)
        out[:] = np.ctypeslib.as_array(ptr, shape=(self.n_vocab,))[: out.size]

    def rewind(self, n_past: int, seq: int = 0) -> None:
        """Drop sequence ``seq``'s cached positions from ``n_past`` on. Where the cache
        cannot drop part of a sequence (recurrent and hybrid models), the sequence is
        cleared and its kept tokens are evaluated again from position 0, as llama-server
        does."""
        have = self._seqs[self._check_seq(seq)]
        if n_past >= len(have):
            return
        keep = have[:n_past]
        if not self._drop_from(n_past, seq) and keep:
            self.eval(keep, seq=seq)

    def clear(self, seq: int) -> None:
        """Empty sequence ``seq`` (the other sequences keep their cells)."""
        self._check_seq(seq)
        L.llama_memory_seq_rm(self._mem, seq, -1, -1)
        self._seqs[seq].clear()
        self._unshare(seq, 0)

    def cut(self, start: int, end: int, seq: int = 0) -> bool:
        """Remove sequence ``seq``'s cached positions ``start`` to ``end`` (exclusive) and
        move every later position down by ``end - start``: its tokens become ``tokens[:start]
        + tokens[end:]``, each token at its new position. llama.cpp rotates the moved keys at
        the next decode (one pass over the whole cache); their values still carry what they
        attended to, so later logits differ slightly from a fresh evaluation. False, with
        nothing changed, when this model cannot shift (:attr:`can_shift`) or when a moved
        position is a cell this sequence shares with another (:meth:`copy_prefix`): moving
        it would move it for both."""
        have = self._seqs[self._check_seq(seq)]
        if not 0 <= start < end <= len(have):
            raise ValueError(f"cut({start}, {end}) outside the {len(have)} cached tokens")
        if not self.can_shift or self._shared_beyond(seq, end):
            return False
        if not L.llama_memory_seq_rm(self._mem, seq, start, end):
            return False
        L.llama_memory_seq_add(self._mem, seq, end, -1, start - end)
        del have[start:end]
        self._unshare(seq, start)
        return True

    def copy_prefix(self, src: int, dst: int, n: int) -> None:
        """Make sequence ``dst`` hold the first ``n`` tokens of sequence ``src`` (what
        ``dst`` held is dropped), with no evaluation: in a cache stream per sequence,
        ``src``'s stream is copied whole (llama.cpp copies streams only whole, at the next
        decode) and cut to ``n``; in a unified cache the two share those cells (no copy)
        until either is rewound below them. Models whose cache cannot drop part of a
        sequence (recurrent, hybrid) evaluate the tokens again."""
        have = self._seqs[self._check_seq(src)]
        self._check_seq(dst)
        if not 0 <= n <= len(have):
            raise ValueError(f"copy_prefix: {n} tokens, sequence {src} holds {len(have)}")
        if src == dst:
            self.rewind(n, dst)
            return
        prefix = have[:n]
        self.clear(dst)
        if not prefix:
            return
        if not self.partial_rewind:
            self.eval(prefix, seq=dst)
            return
        if not self.kv_unified:
            L.llama_memory_seq_cp(self._mem, src, dst, -1, -1)  # the whole stream
            L.llama_memory_seq_rm(self._mem, dst, n, -1)
            self._seqs[dst][:] = prefix
            return
        L.llama_memory_seq_cp(self._mem, src, dst, 0, n)
        self._seqs[dst][:] = prefix
        for (a, b), length in list(self._shared.items()):
            if src in (a, b) and dst not in (a, b):
                self._share(dst, b if a == src else a, min(n, length))
        self._share(src, dst, n)

    # -- shared cells ---------------------------------------------------------------------
    def _share(self, a: int, b: int, n: int) -> None:
        if n > 0:
            self._shared[(min(a, b), max(a, b))] = n

    def _unshare(self, seq: int, n: int) -> None:
        """Sequence ``seq`` now holds at most its first ``n`` shared cells."""
        if self._shared:
            for key, length in list(self._shared.items()):
                if seq in key and length > n:
                    if n > 0:
                        self._shared[key] = n
                    else:
                        del self._shared[key]

    def _shared_beyond(self, seq: int, pos: int) -> bool:
        return any(seq in key and length > pos for key, length in self._shared.items())

    def _drop_from(self, n_past: int, seq: int = 0) -> bool:
        """Remove sequence ``seq``'s positions from ``n_past`` on; False when llama.cpp
        cannot remove part of it: then the sequence is cleared (with one sequence, the whole
        cache, as before several existed)."""
        have = self._seqs[seq]
        if L.llama_memory_seq_rm(self._mem, seq, n_past, -1):
            del have[n_past:]
            self._unshare(seq, n_past)
            return True
        if self.n_seq == 1:
            L.llama_memory_clear(self._mem, True)
        else:
            L.llama_memory_seq_rm(self._mem, seq, -1, -1)
        have.clear()
        self._unshare(seq, 0)
        self.full_rewinds += 1
        return False

    # -- several sequences in one decode -------------------------------------------------
    def decode(self, parts: Sequence[Part], out: np.ndarray | None = None
               ) -> list[np.ndarray | None]:
        """Decode several sequences at once: one ``llama_decode`` carries every part's
        tokens (several when they pass ``n_batch``), with logits only where rows are asked.

        Each part's sequence is first rewound to ``keep`` (its cells are freed, so the new
        tokens take the cells a fresh evaluation would: a rewound and a fresh sequence give
        the same rows) and ``tokens`` appended. The list gives each part's rows, shape
        (rows, n_vocab), None for ``rows="none"``. With ``out``, shape (len(parts), width),
        each ``"last"`` row is written into ``out[i, :width]`` instead (and the list holds
        the view ``out[i:i+1]``). On a failure or Ctrl-C each sequence keeps its first
        ``keep`` tokens (what it held beyond them was already dropped); ``out`` may be
        partly written.
        """
        self._check_parts(parts, out)
        if not parts:
            return []
        for p in parts:
            self.rewind(p.keep, p.seq)
        try:
            rows = self._run(parts, out)
        except BaseException:
            for p in parts:
                self._drop_from(p.keep, p.seq)
            raise
        for p in parts:
            self._seqs[p.seq].extend(p.tokens)
        return rows

    def _check_parts(self, parts: Sequence[Part], out: np.ndarray | None) -> None:
        seen = set()
        for p in parts:
            seq = self._check_seq(p.seq)
            if seq in seen:
                raise ValueError(f"sequence {seq} appears twice in one decode")
            seen.add(seq)
            have = len(self._seqs[seq])
            if not p.tokens:
                raise ValueError(f"sequence {seq}: a part needs at least one token")
            if not 0 <= p.keep <= have:
                raise ValueError(f"sequence {seq}: keep {p.keep} outside [0, {have}]")
            if p.rows not in ROWS:
                raise ValueError(f"sequence {seq}: rows {p.rows!r} is not one of {ROWS}")
            if p.keep + len(p.tokens) > self.n_ctx:
                raise self._full(seq, p.keep, len(p.tokens))
        if out is not None and (out.ndim != 2 or out.shape[0] != len(parts)
                                or out.shape[1] > self.n_vocab):
            raise ValueError(f"out has shape {out.shape}: need ({len(parts)}, width <= "
                             f"{self.n_vocab})")

    def _run(self, parts: Sequence[Part], out: np.ndarray | None) -> list[np.ndarray | None]:
        """Fill the batch with every part's tokens and decode it, ``n_batch`` at a time."""
        results: list[np.ndarray | None] = []
        for i, p in enumerate(parts):
            if p.rows == "none":
                results.append(None)
            elif p.rows == "last" and out is not None:
                results.append(out[i:i + 1])
            else:
                n = len(p.tokens) if p.rows == "all" else 1
                results.append(np.empty((n, self.n_vocab), dtype=np.float32))
        b, cap = self._batch, self.n_batch
        n = 0
        targets: list[tuple[np.ndarray, int]] = []  # where each output row of the chunk goes
        for p, res in zip(parts, results, strict=True):
            every, last, base, seq = p.rows == "all", len(p.tokens) - 1, p.keep, p.seq
            for k, tok in enumerate(p.tokens):
                want = every or (k == last and res is not None)
                b.token[n], b.pos[n], b.n_seq_id[n], b.seq_id[n][0], b.logits[n] = (
                    tok, base + k, 1, seq, want)
                if want:
                    targets.append((res, k if every else 0))  # type: ignore[arg-type]
                n += 1
                if n == cap:
                    self._flush(n, targets)
                    n, targets = 0, []
        if n:
            self._flush(n, targets)
        return results

    def _flush(self, n: int, targets: list[tuple[np.ndarray, int]]) -> None:
        self._batch.n_tokens = n
        rc = L.llama_decode(self._ctx, self._batch)
        if rc != 0:
            raise EftError(f"{self.path.name}: llama_decode failed (code {rc})")
        if targets:  # the rows of flagged tokens, in batch order
            logits = np.ctypeslib.as_array(L.llama_get_logits(self._ctx),
                                           shape=(len(targets), self.n_vocab))
            for j, (res, r) in enumerate(targets):
                res[r] = logits[j, : res.shape[1]]
