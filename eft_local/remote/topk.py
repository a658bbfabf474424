"""Rows from engines that give only the top K log-probs of a position, and the rule for the rest.

An engine that answers a position's K most likely tokens with their log-probs leaves the
other ``V - K`` tokens (the tail) unknown. What is known of each of them: its log-prob is at
most the smallest of the K (the K-th entry's, ``lp_K``), and the tail holds what the K leave
over, ``1 - sum of the K probabilities``. eft-local gives every tail token the same value::

    tail = min(lp_K, log(max(1 - sum_K, SUM_RESOLUTION) / (V - K)))

the leftover mass spread evenly, never above the K-th entry (where the even share would pass
it, the share is no longer possible: the tail is at the bound), and never below the share
of :data:`SUM_RESOLUTION`, the mass that the engine's float32 log-probs cannot tell from 0
(at a confident position the K probabilities sum to 1 or more after rounding: the leftover
then says nothing, and flooring it at 1e-30 put the tail at -76, which a negative weight
turned into +76 x beta for every tail token: a draw that no model wanted).

What the rule does by the sign of the role's weight (a row's own normalisation cancels in
the mix, so only the tail's place below the K entries matters): a positive weight never
favours a tail token over the K-th entry; a negative weight (``large_base`` when
down-scaling) favours every tail token over the K entries by at most ``beta x (lp_K -
tail)``, bounded by the leftover's resolution rather than by a floor 60 nats down. Among
the tail the remote model has no say: the other models' terms alone rank those tokens. With
K at least the vocabulary there is no tail and the row is the engine's whole distribution
(exact up to the engine's rounding). Only full rows (the exact protocol, or K >= V) give a
negative weight the tail it asks for; :func:`eft_local.remote.model.top_k_warning` says so
at start.

Placeholders are not log-probs: an engine that reports probability 0 writes -inf, vLLM
-9999.0, llama-server -3.4028235e38 (-FLT_MAX); any log-prob at or below
:data:`PLACEHOLDER_MAX` counts as "not in the row" and its id is a tail token (an infinite
or absurd value would otherwise become +inf or +3.4e38 under a negative weight: a certain
draw, or an overflow blamed on the formula). The K probabilities may not sum to more than
1 (a little rounding allowed): such an answer is no distribution.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from eft_local.remote.http import ANSWER_HEADROOM, Endpoint

DEFAULT_TOP_K = 100
"""Log-probs per position asked of engines that give only the top K, when ``top_k`` is
not set."""
SUM_RESOLUTION = 1e-6
"""The leftover mass that a top-K answer cannot tell from 0: its log-probs are computed in
float32 (vLLM, llama-server, eft-local), whose probabilities sum to 1 only within about
this. A smaller leftover (rounding can make it 0 or negative) counts as this much."""
PLACEHOLDER_MAX = -9999.0
"""A log-prob at or below this is an engine's placeholder for probability 0, not a value:
vLLM's -9999.0, llama-server's -3.4028235e38, -inf. (A float32 log-softmax reaches a few
hundred below 0 at most.)"""
SUM_SLACK = 1e-2
"""How far above 1 the K probabilities of a position may sum (the engine's rounding)."""
ENTRY_BYTES = 128
"""JSON bytes of one log-prob entry besides its token's text (id, log-prob, field names)."""
BYTES_PER_PIECE_BYTE = 12
"""JSON bytes a token's byte can take: escaped as text (up to 6, ``\\u00ff``) and again
as a number in a byte list (up to 5, ``255, ``)."""


def answer_limit(*, positions: int, top_k: int, prompt: int, piece_bytes: int) -> int:
    """The most bytes a JSON answer can take with ``top_k`` log-probs (and the chosen
    token's) at each of ``positions`` positions and ``prompt`` tokens echoed (as text and
    as a token list) when no token is longer than ``piece_bytes`` bytes, plus
    :data:`ANSWER_HEADROOM`: a cap on what an engine may send."""
    per_token = ENTRY_BYTES + BYTES_PER_PIECE_BYTE * max(1, piece_bytes)
    return ANSWER_HEADROOM + (positions * (top_k + 2) + 2 * prompt) * per_token


def topk_row(ids: Sequence[int], logprobs: Sequence[float], width: int, *,
             top_k: int | None = None) -> np.ndarray:
    """A full row of ``width`` log-probs from one position's top-K answer (see the module:
    placeholders and the ids outside the answer get the tail value). ``top_k``: the K
    asked for; entries beyond the K largest (vLLM adds the position's own token wherever
    it ranks) are known values but do not bound the tail. The answer must hold at least
    one log-prob above :data:`PLACEHOLDER_MAX` (:func:`check_entries`)."""
    row_ids = np.asarray(ids, dtype=np.int64)
    lps = np.asarray(logprobs, dtype=np.float64)
    real = lps > PLACEHOLDER_MAX
    known_ids, known = row_ids[real], lps[real]
    k = len(np.unique(known_ids))
    row = np.empty(width, dtype=np.float64)
    if k == 0:  # nothing known (check_entries refuses such an answer)
        row.fill(-np.log(width))
    elif k < width:
        ranked = np.sort(known)[::-1]
        bound = float(ranked[min(top_k or len(ranked), len(ranked)) - 1])
        rest = max(1.0 - float(np.exp(known).sum()), SUM_RESOLUTION)
        row.fill(min(bound, float(np.log(rest / (width - k)))))
    row[known_ids] = known
    return row.astype(np.float32)


def check_entries(ep: Endpoint, ids: Sequence[int], logprobs: Sequence[float], *, width: int,
                  top_k: int, where: str) -> None:
    """One position's answer must hold ``min(top_k, width)`` distinct ids inside the
    vocabulary with log-probs that are numbers <= 0, not all placeholders, whose
    probabilities sum to at most 1 (a little rounding allowed: :data:`SUM_SLACK`)."""
    want = min(top_k, width)
    if len(set(ids)) < want:
        raise ep.fail(f"answered {len(set(ids))} log-prob(s) {where}, fewer than top_k "
                      f"{want} (raise the engine's limit, e.g. vLLM's --max-logprobs or "
                      "eft-local serve --max-logprobs, or lower top_k)")
    bad = next((i for i in ids if not 0 <= i < width), None)
    if bad is not None:
        raise ep.fail(f"answered token id {bad} {where}, outside its vocabulary "
                      f"(0..{width - 1})")
    arr = np.asarray(logprobs, dtype=np.float64)
    if np.isnan(arr).any() or (arr > 1e-3).any():
        raise ep.fail(f"answered a log-prob that is not a number <= 0 {where}")
    if not (arr > PLACEHOLDER_MAX).any():
        raise ep.fail(f"answered only placeholder log-probs (<= {PLACEHOLDER_MAX:g}: "
                      f"probability 0) {where}: no distribution")
    total = float(np.exp(arr).sum())
    if total > 1 + SUM_SLACK:
        raise ep.fail(f"answered log-probs whose probabilities sum to {total:.4g} {where} "
                      "(more than 1: no distribution)")
