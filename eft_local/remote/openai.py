"""OpenAI-compatible ``POST /v1/completions``: token-id prompts, ``logprobs: K``, ``echo``.

One position: ``{"prompt": [ids], "max_tokens": 1, "logprobs": K, "temperature": 0}``; the
generated token's ``top_logprobs`` is the next-token distribution's top K. Several
positions in one request (a speculative block, a scored text): ``echo: true``, whose prompt
``top_logprobs`` hold the top K at every position (and the generated token's, the row after
the prompt; where an engine leaves that one out, the prompt plus one extra token is echoed
with ``max_tokens`` 0). The
``return_tokens_as_token_ids`` field (vLLM's, and eft-local's) names tokens ``token_id:N``;
an engine that names them by text has them mapped back through its vocabulary, where the
text is unambiguous. Echo answers log-probs for the whole prompt, so the bytes of such a
request grow with the context. vLLM lists a position's own token first, then the top K (K + 1
entries where the token ranks below them): :func:`eft_local.remote.topk.topk_row` bounds
the tail by the K-th largest, not by that extra entry; its -9999.0 (probability 0) is a
placeholder, not a log-prob.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from eft_local.remote.http import Endpoint
from eft_local.remote.llamaserver import count_timings
from eft_local.remote.topk import answer_limit, check_entries, topk_row

ID_PREFIX = "token_id:"


class OpenAIClient:
    """Rows of a model behind an OpenAI-compatible completions endpoint."""

    def __init__(self, endpoint: Endpoint, *, model: str, width: int, top_k: int,
                 pieces: Sequence[bytes], piece_bytes: int | None = None) -> None:
        self.endpoint = endpoint
        self.model = model
        self.width = width
        self.top_k = min(top_k, width)
        self._pieces = pieces
        self.piece_bytes = piece_bytes or max((len(p) for p in pieces), default=1)
        """The longest token's bytes (bounds an answer's size)."""
        self._by_text: dict[str, list[int]] | None = None
        self.max_tokens_zero = True
        """False once the engine refused ``max_tokens`` 0 with echo."""

    def rows(self, done: Sequence[int], new: Sequence[int], all_rows: bool) -> np.ndarray:
        """Rows after each of ``new`` (or after its last one) given ``done`` before it."""
        seq = [*done, *new]
        if not all_rows or len(new) == 1:
            row = self._next(seq)
            if row is not None:
                return row[None]
        return self._echo(seq, len(done))

    def _body(self, prompt: list[int], **more: Any) -> dict[str, Any]:
        return {"model": self.model, "prompt": prompt, "logprobs": self.top_k,
                "temperature": 0, "return_tokens_as_token_ids": True, "stream": False, **more}

    def _next(self, seq: list[int]) -> np.ndarray | None:
        """The row after ``seq`` from one generated token; None when the engine gave that
        token no log-probs (some leave them out for an end-of-turn token)."""
        data = self.endpoint.json("POST", "/v1/completions", self._body(seq, max_tokens=1),
                                  limit=self._limit(1, len(seq)))
        count_timings(self.endpoint, data)
        tops = self._tops(data)
        if not tops or tops[0] is None:
            return None
        return self._row(tops[0], f"after {len(seq)} tokens")

    def _echo(self, seq: list[int], first: int) -> np.ndarray:
        """Rows after tokens ``first .. len(seq) - 1``: the echoed prompt log-probs of
        ``seq`` and the generated token's; when the engine leaves the latter out (an
        end-of-turn token, say), ``seq`` plus one extra token is echoed without generating,
        whose last entry is the row after ``seq``."""
        ep = self.endpoint
        data = ep.json("POST", "/v1/completions", self._body(seq, max_tokens=1, echo=True),
                       limit=self._limit(len(seq) + 1, len(seq)))
        count_timings(ep, data)
        tops = self._tops(data)
        if len(tops) < len(seq):
            raise ep.fail(f"/v1/completions echoed {len(tops)} log-prob entries for a "
                          f"{len(seq)}-token prompt (does it support echo with logprobs?)")
        if len(tops) == len(seq) or tops[len(seq)] is None:
            tops = self._echo_extra(seq)
        return np.stack([self._row(tops[i], f"at position {i}")
                         for i in range(first + 1, len(seq) + 1)])

    def _echo_extra(self, seq: list[int]) -> list[Any]:
        """Echo entries of ``seq`` plus one token, generating nothing (``max_tokens`` 0,
        or 1 where 0 is refused)."""
        ep = self.endpoint
        prompt = [*seq, seq[-1]]
        limit = self._limit(len(prompt) + 1, len(prompt))
        if self.max_tokens_zero:
            answer = ep.request("POST", "/v1/completions", ok=(200, 400, 422), limit=limit,
                                payload=self._body(prompt, max_tokens=0, echo=True))
            if answer.status == 200:
                return self._tops(answer.json())
            self.max_tokens_zero = False
        return self._tops(ep.json("POST", "/v1/completions",
                                  self._body(prompt, max_tokens=1, echo=True), limit=limit))

    def _limit(self, positions: int, prompt: int) -> int:
        """The size cap of an answer with log-probs at ``positions`` positions."""
        return answer_limit(positions=positions, top_k=self.top_k, prompt=prompt,
                            piece_bytes=self.piece_bytes)

    def _tops(self, data: Any) -> list[Any]:
        try:
            tops = data["choices"][0]["logprobs"]["top_logprobs"]
            if not isinstance(tops, list):
                raise TypeError
            return tops
        except (KeyError, IndexError, TypeError):
            raise self.endpoint.fail("/v1/completions answered no logprobs.top_logprobs "
                                     "(does it support logprobs for token-id prompts?)"
                                     ) from None

    def _row(self, entry: Any, where: str) -> np.ndarray:
        ep = self.endpoint
        if not isinstance(entry, Mapping):
            raise ep.fail(f"/v1/completions answered no top_logprobs {where}")
        ids, lps = [], []
        for key, value in entry.items():
            ids.append(self._id(str(key), where))
            try:
                lps.append(float(value))
            except (TypeError, ValueError):
                raise ep.fail(f"answered a log-prob that is not a number {where}") from None
        check_entries(ep, ids, lps, width=self.width, top_k=self._expected(entry), where=where)
        return topk_row(ids, lps, self.width, top_k=self.top_k)

    def _expected(self, entry: Mapping[str, Any]) -> int:
        """Entries to expect: K, or fewer distinct texts where texts name the tokens."""
        if all(str(k).startswith(ID_PREFIX) for k in entry):
            return self.top_k
        return min(self.top_k, len(self._text_index()))

    def _id(self, key: str, where: str) -> int:
        if key.startswith(ID_PREFIX):
            try:
                return int(key[len(ID_PREFIX):])
            except ValueError:
                raise self.endpoint.fail(f"answered the token name {key!r} {where}") from None
        found = self._text_index().get(key)
        if not found:
            raise self.endpoint.fail(f"answered the token text {key!r} {where}, which no id "
                                     "of its vocabulary decodes to")
        if len(found) > 1:
            raise self.endpoint.fail(
                f"answered the token text {key!r} {where}, which ids {found[:4]} all decode "
                "to: it names tokens by text, not id (use an engine that returns ids: "
                "vLLM's return_tokens_as_token_ids, llama-server, eft-local)")
        return found[0]

    def _text_index(self) -> dict[str, list[int]]:
        if self._by_text is None:
            index: dict[str, list[int]] = {}
            for i, piece in enumerate(self._pieces):
                index.setdefault(piece.decode("utf-8", "replace"), []).append(i)
            self._by_text = index
        return self._by_text
