"""A role evaluated by a remote engine: :class:`RemoteModel` is one more
:class:`eft_local.engine.Model`.

Its ``tokens`` are the sequence it has been asked to condition on; :meth:`RemoteModel.eval`
sends what the protocol needs (the exact protocol: only what the engine does not hold yet;
the others: the whole prompt, whose prefix the engine re-uses from its cache) and returns
rows of ``n_vocab`` values, as a local model would. ``rewind`` costs nothing: it only
shortens ``tokens``. Text (pieces, end-of-generation ids) comes from the vocabulary read at
load; tokenizing text, needed only when the remote model is the template role, is a request.
The engine runs a remote model's evaluation in a thread of its own, concurrently with the
local models (:meth:`eft_local.engine.Engine.evaluate_each`): its cost is waiting, not CPU.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from eft_local.backend.sequences import Part
from eft_local.errors import EftError
from eft_local.presets import ModelSpec
from eft_local.remote.exact import ExactClient
from eft_local.remote.http import ANSWER_HEADROOM, Endpoint, RemoteError
from eft_local.remote.llamaserver import LlamaServerClient
from eft_local.remote.openai import OpenAIClient
from eft_local.remote.topk import DEFAULT_TOP_K
from eft_local.remote.vocab import RemoteInfo, read_info
from eft_local.vocab import ATTR_CONTROL

TOKEN_ID_BYTES = 16
"""JSON bytes of one token id in a list (at most a byte of text makes one token)."""
REMOTE_COST = 1 << 50
"""What :meth:`RemoteModel.file_size` reports: never the cheapest model, so never the
drafter (drafting remotely costs a round trip per token)."""


class Abandoned(EftError):
    """A remote evaluation whose result came after the caller gave up on it."""


class RemoteModel:
    """A model served by a remote engine (see the module docstring)."""

    remote = True
    partial_rewind = True

    def __init__(self, spec: ModelSpec, endpoint: Endpoint, info: RemoteInfo, *,
                 n_seq: int = 1) -> None:
        self.spec = spec
        self.endpoint = endpoint
        self.info = info
        self.url = endpoint.shown
        self.path = Path(spec.describe())
        self.n_vocab = info.vocab.n_tokens
        self.n_ctx = info.n_ctx
        self.n_seq = n_seq
        """Sequences it conditions on at once (the local models' slots): each has its own
        tokens, and the rows every sequence needs in a step go out as concurrent
        requests."""
        self._seqs: list[list[int]] = [[] for _ in range(n_seq)]
        self.tokens = self._seqs[0]  # the same list: never rebound
        self.api = info.api
        self.top_k = None if info.api == "eft-local" else min(
            spec.top_k or DEFAULT_TOP_K, self.n_vocab)
        """Log-probs per position (None: whole rows, exact)."""
        self._lock = threading.Lock()
        self._epoch = 0
        pieces = info.vocab.pieces or info.vocab.texts
        self.piece_bytes = max((len(p) for p in pieces), default=1)
        """The longest token's bytes: what bounds the size of a JSON answer."""
        self._clients = [self._make_client() for _ in range(n_seq)]
        """One client per sequence (the exact protocol's remembers what the engine holds
        of its sequence)."""
        self._pool: ThreadPoolExecutor | None = None

    def _make_client(self) -> Any:
        info, ep = self.info, self.endpoint
        if info.api == "eft-local":
            return ExactClient(ep, role=info.role, model=info.model, width=self.n_vocab)
        if info.api == "llama-server":
            return LlamaServerClient(ep, width=self.n_vocab, top_k=self.top_k or 1,
                                     piece_bytes=self.piece_bytes)
        pieces = info.vocab.pieces or info.vocab.texts
        return OpenAIClient(ep, model=info.model or "", width=self.n_vocab,
                            top_k=self.top_k or 1, pieces=pieces, piece_bytes=self.piece_bytes)

    @property
    def traffic(self) -> Any:
        """Network counters (:class:`eft_local.remote.http.Traffic`), cumulative."""
        return self.endpoint.traffic

    def describe(self) -> str:
        """How this role is reached, in a few words."""
        how = "exact rows" if self.top_k is None else f"top {self.top_k} log-probs"
        return f"{self.url} ({self.api}, {how})"

    # -- evaluation -----------------------------------------------------------------------
    def eval(self, tokens: list[int], *, all_logits: bool = False, seq: int = 0
             ) -> np.ndarray:
        """Append ``tokens`` to sequence ``seq``; rows (one per new position, or the last),
        ``n_vocab`` wide."""
        if not tokens:
            raise ValueError("eval needs at least one token")
        have = self.seq_tokens(seq)
        with self._lock:
            done, epoch = list(have), self._epoch
        if len(done) + len(tokens) > self.n_ctx:
            raise EftError(f"remote {self.spec.role} ({self.url}): context full "
                           f"({len(done)} + {len(tokens)} tokens > n_ctx {self.n_ctx})")
        rows = self._clients[seq].rows(done, list(tokens), all_logits)
        with self._lock:
            if self._epoch != epoch:
                raise Abandoned(f"remote {self.spec.role}: an abandoned evaluation ended")
            have[:] = [*done, *tokens]
        return rows

    def decode(self, parts: Sequence[Part], out: np.ndarray | None = None
               ) -> list[np.ndarray | None]:
        """The rows of several sequences' parts (see
        :meth:`eft_local.backend.LlamaModel.decode`): one request per part, all under way
        at once."""
        def one(i: int) -> np.ndarray | None:
            part = parts[i]
            self.rewind(part.keep, part.seq)
            rows = self.eval(list(part.tokens), all_logits=part.rows == "all", seq=part.seq)
            if part.rows == "none":
                return None
            if part.rows == "last" and out is not None:
                out[i] = rows[-1, : out.shape[1]]
                return out[i:i + 1]
            return rows

        if len(parts) <= 1:
            return [one(i) for i in range(len(parts))]
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self.n_seq, thread_name_prefix="eft-remote-seq")
        futures = [self._pool.submit(one, i) for i in range(len(parts))]
        return [future.result() for future in futures]

    def seq_tokens(self, seq: int = 0) -> list[int]:
        """What sequence ``seq`` has been asked to condition on."""
        if isinstance(seq, bool) or not 0 <= seq < self.n_seq:
            raise EftError(f"remote {self.spec.role}: holds {self.n_seq} sequence(s), not "
                           f"sequence {seq}")
        return self._seqs[seq]

    def rewind(self, n_past: int, seq: int = 0) -> None:
        """Forget sequence ``seq``'s positions from ``n_past`` on."""
        have = self.seq_tokens(seq)
        with self._lock:
            if n_past < len(have):
                del have[n_past:]

    def abandon(self) -> None:
        """A caller gave up on an evaluation still under way: its result will be dropped,
        ``tokens`` stays as it was before it, and its connection is shut down (its thread
        returns at once)."""
        with self._lock:
            self._epoch += 1
        self.endpoint.abort()

    # -- text -----------------------------------------------------------------------------
    def is_eog(self, token: int) -> bool:
        """End-of-generation ids of its vocabulary."""
        return token in self.info.vocab.eog

    def piece(self, token: int, *, special: bool = False) -> bytes:
        """A token's bytes (control tokens empty unless ``special``)."""
        vocab = self.info.vocab
        pieces = vocab.pieces or vocab.texts
        if not special:
            if token in self.info.plain:
                return self.info.plain[token]
            if vocab.text_kind == "piece" and vocab.attrs[token] & ATTR_CONTROL:
                return b""
        return pieces[token]

    def tokenize(self, text: str, *, add_bos: bool, special: bool) -> list[int]:
        """Text to ids through the engine's tokenizer."""
        ep, info = self.endpoint, self.info
        limit = ANSWER_HEADROOM + TOKEN_ID_BYTES * (len(text.encode("utf-8", "replace")) + 8)
        if info.api == "llama-server":
            got = ep.json("POST", "/tokenize", {"content": text, "add_special": add_bos,
                                                "parse_special": special}, limit=limit)
        else:
            got = ep.json("POST", "/tokenize", {"model": info.model, "prompt": text,
                                                "add_special_tokens": add_bos,
                                                "parse_special": special}, limit=limit)
        tokens = got.get("tokens") if isinstance(got, dict) else None
        if not isinstance(tokens, list) or not all(isinstance(t, int) for t in tokens):
            raise ep.fail("/tokenize answered no token list")
        return tokens

    def chat_template(self) -> str | None:
        """The engine's chat template, if it tells one."""
        return self.info.chat_template

    def file_size(self) -> int:
        """:data:`REMOTE_COST` (see there)."""
        return REMOTE_COST

    def close(self) -> None:
        """Close the connections."""
        if self._pool is not None:
            self._pool.shutdown(wait=False)
            self._pool = None
        self.endpoint.close()


def top_k_warning(role: str, weight: float, model: Any) -> str | None:
    """The warning for a remote role that the formula weighs negatively (``large_base``
    when down-scaling) and whose engine gives only the top K of its log-probs: such a
    weight asks for the tokens the model finds unlikely, which top-K rows leave out
    (:mod:`eft_local.remote.topk`). None where the rows are whole."""
    top_k = getattr(model, "top_k", None)
    if weight >= 0 or top_k is None or top_k >= model.n_vocab:
        return None
    return (f"warning: {role} weighs {weight:g} in the formula but its engine gives only "
            f"the top {top_k} of {model.n_vocab} log-probs: a negative weight asks for the "
            "tokens it finds unlikely, which top-K rows leave out (each such token gets "
            f"one shared value). Serve it with whole rows: eft-local serve (exact), or "
            f"#top_k={model.n_vocab} where the engine allows that many")


def endpoint_for(spec: ModelSpec) -> Endpoint:
    """The endpoint of a remote model spec."""
    assert spec.url is not None
    return Endpoint(spec.url, role=spec.role, api_key_env=spec.api_key_env,
                    timeout=spec.timeout)


def open_remote(spec: ModelSpec, *, expected_vocab: int | None = None,
                say: Callable[[str], None] | None = None, n_seq: int = 1) -> RemoteModel:
    """Connect to the engine of ``spec`` and read what the model is; it conditions on
    ``n_seq`` sequences at once."""
    ep = endpoint_for(spec)
    try:
        info = read_info(ep, spec, expected=expected_vocab, say=say)
        return RemoteModel(spec, ep, info, n_seq=n_seq)
    except BaseException:
        ep.close()
        raise


__all__ = ["Abandoned", "RemoteError", "RemoteModel", "endpoint_for", "open_remote",
           "top_k_warning"]
