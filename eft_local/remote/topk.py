"""Rows from engines that give only the top K log-probs of a position, and the rule for the rest.

An engine that answers a position's K most likely tokens with their log-probs leaves the
other ``V - K`` tokens unknown. eft-local gives each of them an equal share of the mass the
K leave over: ``log((1 - sum of the K probabilities) / (V - K))``. The row is then a proper
distribution that agrees with the engine on its K tokens and on the total mass of the rest,
so the mix keeps its formula's meaning whatever the sign of the role's weight (a cut to the
top K would put ``-inf`` in the row, which a negative weight, as ``large_base`` has when
down-scaling, turns into ``+inf``). Among the tokens outside the top K the remote model then
has no say: the other models' terms alone rank them. With K at least the vocabulary the row
is the engine's whole distribution (exact up to the engine's rounding of log-probs). A
log-prob below ``log(TAIL_FLOOR / V)`` (-inf: probability 0) counts as that floor: a row
must stay finite under a negative weight (an infinite one would overflow the mix, and the
error would blame the formula's numbers instead of the engine). The K probabilities may
not sum to more than 1 (a little rounding allowed): such an answer is no distribution.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from eft_local.remote.http import ANSWER_HEADROOM, Endpoint

TAIL_FLOOR = 1e-30
"""Leftover mass below this counts as this much (rounding can leave it negative)."""
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


def topk_row(ids: Sequence[int], logprobs: Sequence[float], width: int) -> np.ndarray:
    """A full row of ``width`` log-probs from one position's top-K answer (see module)."""
    row_ids = np.asarray(ids, dtype=np.int64)
    lps = np.asarray(logprobs, dtype=np.float64)
    k = len(np.unique(row_ids))
    floor = float(np.log(TAIL_FLOOR / width))
    row = np.empty(width, dtype=np.float64)
    if k < width:
        rest = max(1.0 - float(np.exp(lps).sum()), TAIL_FLOOR)
        row.fill(np.log(rest / (width - k)))
    else:
        row.fill(floor)
    row[row_ids] = np.maximum(lps, floor)
    return row.astype(np.float32)


def check_entries(ep: Endpoint, ids: Sequence[int], logprobs: Sequence[float], *, width: int,
                  top_k: int, where: str) -> None:
    """One position's answer must hold ``min(top_k, width)`` distinct ids inside the
    vocabulary with log-probs that are numbers <= 0 whose probabilities sum to at most 1
    (a little rounding allowed: :data:`SUM_SLACK`)."""
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
    total = float(np.exp(arr).sum())
    if total > 1 + SUM_SLACK:
        raise ep.fail(f"answered log-probs whose probabilities sum to {total:.4g} {where} "
                      "(more than 1: no distribution)")
