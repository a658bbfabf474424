"""llama.cpp's llama-server: ``POST /completion`` with ``n_probs``, one position per request.

``{"prompt": [ids], "n_predict": 1, "n_probs": K, "cache_prompt": true,
"post_sampling_probs": false, "temperature": 0}`` answers, in
``completion_probabilities[0].top_logprobs``, the K most likely next tokens as ``{id,
token, bytes, logprob}`` with probabilities from the model's own logits, before any
sampler touches them (``post_sampling_probs: false``, the default; ``true`` would give them
after the sampling chain). ``cache_prompt`` lets the slot re-use the prefix it holds, so
each request evaluates only the new tokens. Its ``/v1/completions`` has no prompt
log-probs (no ``echo``), so each position costs one request: a speculative block of k
tokens is k requests. With ``top_k`` at least the vocabulary the rows are exact up to the
float32 softmax and logarithm.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from eft_local.remote.http import Endpoint
from eft_local.remote.topk import answer_limit, check_entries, topk_row


def count_timings(ep: Endpoint, data: Any) -> None:
    """Add the compute time an answer reports in llama-server's ``timings`` (``prompt_ms``
    + ``predicted_ms``; other engines that copy it too) to ``ep``'s counters."""
    timings = data.get("timings") if isinstance(data, dict) else None
    if not isinstance(timings, dict):
        return
    try:
        ms = float(timings.get("prompt_ms") or 0) + float(timings.get("predicted_ms") or 0)
    except (TypeError, ValueError):
        return
    if math.isfinite(ms) and ms > 0:
        ep.traffic.server_seconds += ms / 1e3


class LlamaServerClient:
    """Rows of a model served by llama-server."""

    def __init__(self, endpoint: Endpoint, *, width: int, top_k: int,
                 piece_bytes: int = 64) -> None:
        self.endpoint = endpoint
        self.width = width
        self.top_k = min(top_k, width)
        self.piece_bytes = piece_bytes
        """The longest token's bytes (bounds an answer's size)."""

    def rows(self, done: Sequence[int], new: Sequence[int], all_rows: bool) -> np.ndarray:
        """Rows after each of ``new`` (or after its last one) given ``done`` before it."""
        seq = [*done, *new]
        ends = range(len(done) + 1, len(seq) + 1) if all_rows else [len(seq)]
        return np.stack([self._one(seq[:end]) for end in ends])

    def _one(self, prompt: list[int]) -> np.ndarray:
        ep = self.endpoint
        limit = answer_limit(positions=1, top_k=self.top_k, prompt=len(prompt),
                             piece_bytes=self.piece_bytes)
        data = ep.json("POST", "/completion", {
            "prompt": prompt, "n_predict": 1, "n_probs": self.top_k, "cache_prompt": True,
            "post_sampling_probs": False, "temperature": 0, "stream": False}, limit=limit)
        where = f"after {len(prompt)} tokens"
        try:
            top = data["completion_probabilities"][0]["top_logprobs"]
            ids = [int(e["id"]) for e in top]
            lps = [float(e["logprob"]) for e in top]
        except (KeyError, IndexError, TypeError, ValueError):
            raise ep.fail(f"/completion answered no completion_probabilities {where} (is "
                          "it llama-server? the n_probs field needs a recent build)") from None
        count_timings(ep, data)
        check_entries(ep, ids, lps, width=self.width, top_k=self.top_k, where=where)
        return topk_row(ids, lps, self.width, top_k=self.top_k)
