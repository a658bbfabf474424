"""The serving half of the exact protocol (:mod:`eft_local.remote.exact` is the client's):
``POST /eft/rows`` and ``GET /eft/vocab`` make a model of this server an exact remote role of
another eft-local. Rows are evaluated in a free slot (the one whose cache holds the prefix a
request names), through the session; the loaded preset is served and never switched.
"""

from __future__ import annotations

import base64
import hashlib
import json
import time
import weakref
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from eft_local.errors import EftError
from eft_local.remote.exact import (
    H_EVAL_MS,
    H_ROWS,
    H_WIDTH,
    PREFIX_MISMATCH,
    encode_rows,
    pack_bytes,
    prefix_hash,
)
from eft_local.server.protocol import ApiError, RowsRequest
from eft_local.server.worker import Job
from eft_local.session import Session, VocabInfo


def pick_role(roles: Sequence[str], role: str | None, preset: str) -> str:
    """``role``, checked; None names the only model of a single-model preset."""
    if role is None and len(roles) == 1:
        return roles[0]
    if role is None or role not in roles:
        why = "name one with 'role'" if role is None else f"it has no model {role!r}"
        raise ApiError(400, f"preset {preset!r} has models {', '.join(roles)}: {why}",
                       param="role")
    return role


def vocab_payload(v: VocabInfo, pieces: Sequence[bytes], plain: Mapping[int, bytes]
                  ) -> dict[str, Any]:
    """A vocabulary as ``/eft/vocab`` sends it (JSON-ready; ``hash`` over the rest)."""
    body = {"vocab_type": v.vocab_type, "n_tokens": v.n_tokens, "bos": v.bos, "eos": v.eos,
            "eot": v.eot, "eog": sorted(v.eog), "add_bos": v.add_bos, "add_eos": v.add_eos,
            "attrs": list(v.attrs), "texts": pack_bytes(v.texts), "pieces": pack_bytes(pieces),
            "plain": {str(i): base64.b64encode(b).decode("ascii") for i, b in plain.items()}}
    digest = hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()[:32]
    return {**body, "hash": digest}



def check_loaded(session: Session, preset: str | None) -> None:
    """409 unless ``preset`` (when named) is the loaded one: the exact protocol serves what
    is loaded and never switches it (two clients naming two presets would reload models at
    every token)."""
    if preset is not None and preset != session.preset.name:
        raise ApiError(409, f"this server serves {session.preset.name!r} to remote roles; "
                       f"it does not load {preset!r} for them (name the loaded preset, or "
                       "none)", param="model", code="preset_not_loaded")


def rows_work(req: RowsRequest, preset: str | None) -> Callable[[Session, Job], None]:
    """``POST /eft/rows``: one model's logit rows as a binary body (``result`` event:
    ``{"body": bytes, "headers": {...}}``); 409 when the prefix named is not held."""

    def work(session: Session, job: Job) -> None:
        check_loaded(session, preset)
        role = pick_role(tuple(session.models), req.role, session.preset.name)
        tokens, slot = req.tokens, None
        if req.n_past:  # the free slot whose cache holds that prefix
            slot = next((s for s in session.free_slots()
                         if prefix_hash(session.held(role, s)[:req.n_past]) == req.prefix
                         and len(session.held(role, s)) >= req.n_past), None)
            if slot is None:
                raise ApiError(409, f"{role} no longer holds those {req.n_past} tokens; "
                               "send the whole sequence (n_past 0)", code=PREFIX_MISMATCH)
            tokens = session.held(role, slot)[:req.n_past] + tokens
        started = time.perf_counter()
        try:
            rows, reused = session.model_rows(role, tokens, req.first, slot=slot)
        except EftError as exc:
            raise ApiError(400, str(exc), param="tokens") from None
        ms = 1e3 * (time.perf_counter() - started)
        job.info = {"prompt_tokens": len(tokens), "completion_tokens": 0,
                    "timings": {"cache_n": reused, "prompt_n": len(tokens) - reused}}
        job.emit("result", {"body": encode_rows(rows), "headers": {
            H_ROWS: str(rows.shape[0]), H_WIDTH: str(rows.shape[1]),
            H_EVAL_MS: f"{ms:.3f}"}})

    return work


_VOCABS: weakref.WeakKeyDictionary[Session, dict[str, dict[str, Any]]] = (
    weakref.WeakKeyDictionary())


def vocab_work(query: Mapping[str, str], preset: str | None
               ) -> Callable[[Session, Job], None]:
    """``GET /eft/vocab``: a role's vocabulary as a local file gives it (``hash_only``:
    only its hash, context size and chat template)."""
    hash_only = query.get("hash_only", "") not in ("", "0", "false")

    def work(session: Session, job: Job) -> None:
        check_loaded(session, preset)
        role = pick_role(tuple(session.models), query.get("role") or None,
                         session.preset.name)
        found = _VOCABS.setdefault(session, {})
        if role not in found:
            vocab, pieces, plain = session.role_vocab(role)
            found[role] = vocab_payload(vocab, pieces, plain)
        payload = found[role]
        head = {"role": role, "preset": session.preset.name, "hash": payload["hash"],
                "n_tokens": payload["n_tokens"], "n_ctx": session.models[role].n_ctx,
                "chat_template": session.template
                if role == session.preset.template_role else None}
        job.emit("result", head if hash_only else {**head, **payload})

    return work
