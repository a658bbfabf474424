"""Rows from engines that give only the top K log-probs of a position, and the rule for the rest.

An engine that answers a position's K most likely tokens with their log-probs leaves the
other ``V - K`` tokens unknown. eft-local gives each of them an equal share of the mass the
K leave over: ``log((1 - sum of the K probabilities) / (V - K))``. The row is then a proper
distribution that agrees with the engine on its K tokens and on the total mass of the rest,
so the mix keeps its formula's meaning whatever the sign of the role's weight (a cut to the
top K would put ``-inf`` in the row, which a negative weight, as ``large_base`` has when
down-scaling, turns into ``+inf``). Among the tokens outside the top K the remote model then
has no say: the other models' terms alone rank them. With K at least the vocabulary the row
is the engine's whole distribution (exact up to the engine's rounding of log-probs).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from eft_local.remote.http import Endpoint

TAIL_FLOOR = 1e-30
"""Leftover mass below this counts as this much (rounding can leave it negative)."""


def topk_row(ids: Sequence[int], logprobs: Sequence[float], width: int) -> np.ndarray:
    """A full row of ``width`` log-probs from one position's top-K answer (see module)."""
    row_ids = np.asarray(ids, dtype=np.int64)
    lps = np.asarray(logprobs, dtype=np.float64)
    k = len(np.unique(row_ids))
    row = np.empty(width, dtype=np.float64)
    if k < width:
        rest = max(1.0 - float(np.exp(lps).sum()), TAIL_FLOOR)
        row.fill(np.log(rest / (width - k)))
    else:
        row.fill(-np.inf)
    row[row_ids] = lps
    return row.astype(np.float32)


def check_entries(ep: Endpoint, ids: Sequence[int], logprobs: Sequence[float], *, width: int,
                  top_k: int, where: str) -> None:
    """One position's answer must hold ``min(top_k, width)`` distinct ids inside the
    vocabulary with log-probs that are numbers <= 0 (a little rounding allowed)."""
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
