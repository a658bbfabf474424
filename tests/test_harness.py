"""lm-evaluation-harness's requests, raw: one log-prob entry per generated token.

The harness scores a multiple-choice answer with ``/v1/completions``, ``echo: true``,
``logprobs: 1``, ``max_tokens: 1`` and token ids, and sums ``token_logprobs[ctxlen:-1]``:
it expects the generated token's entry last, also when that token ends the turn.
"""

from __future__ import annotations

import json
from collections.abc import Iterator

import httpx
import numpy as np
import pytest

from eft_local.session import LoadOptions, load_session
from tests.servehelp import Served, serving_bundled

CONTEXT = "What is the profession of Thos Draisquun?\n"
ANSWER = "tailor"


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    with serving_bundled(tmp_path_factory) as s:
        yield s


@pytest.fixture(scope="module")
def http(served: Served) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=served.url, timeout=60) as c:
        yield c


def harness_payload(tokens: list[list[int]]) -> dict:
    """lm-eval's local-completions loglikelihood request, field for field."""
    return {"model": "tiny-up", "prompt": tokens, "temperature": 0, "max_tokens": 1,
            "logprobs": 1, "seed": 1234, "echo": True}


def harness_score(choice: dict, ctxlen: int) -> tuple[float, bool]:
    """lm-eval's parse_logprobs for one choice: the continuation's log-prob and whether it
    is the greedy continuation."""
    lp = choice["logprobs"]
    tokens, top = lp["token_logprobs"][ctxlen:-1], lp["top_logprobs"][ctxlen:-1]
    return sum(tokens), all(t == max(d.values()) for t, d in zip(tokens, top, strict=True))


def test_an_answer_that_ends_the_turn_keeps_its_last_token(http: httpx.Client) -> None:
    context = http.post("/tokenize", json={"prompt": CONTEXT}).json()["tokens"]
    whole = http.post("/tokenize", json={"prompt": CONTEXT + ANSWER}).json()["tokens"]
    assert whole[:len(context)] == context and len(whole) > len(context)
    body = http.post("/v1/completions", json=harness_payload([whole])).json()
    choice = body["choices"][0]
    lp = choice["logprobs"]
    assert choice["finish_reason"] == "stop"  # the generated token ends the turn
    assert body["usage"]["completion_tokens"] == 1
    assert body["usage"]["prompt_tokens"] == len(whole)
    n = body["usage"]["prompt_tokens"] + body["usage"]["completion_tokens"]
    assert len(lp["token_logprobs"]) == len(lp["tokens"]) == len(lp["top_logprobs"]) == n
    assert len(lp["text_offset"]) == n and lp["text_offset"][-1] == len(choice["text"])
    assert lp["token_logprobs"][-1] is not None and lp["token_logprobs"][-1] <= 0
    with load_session("tiny-up", options=LoadOptions(n_threads=1)) as s:
        scored = s.score(whole)
        assert s.is_eog(s.tokenize(lp["tokens"][-1], add_bos=False, parse_special=True)[0])
    want = sum(t.logprob for t in scored.tokens[len(context):])
    got, _greedy = harness_score(choice, len(context))
    assert got == pytest.approx(want, abs=1e-3)


def test_every_generated_token_has_an_entry_streamed_or_not(http: httpx.Client) -> None:
    ids = http.post("/tokenize", json={"prompt": CONTEXT + ANSWER}).json()["tokens"]
    for max_tokens in (1, 6):
        body = {**harness_payload([ids]), "max_tokens": max_tokens}
        whole = http.post("/v1/completions", json=body).json()
        lp = whole["choices"][0]["logprobs"]
        assert len(lp["tokens"]) == len(ids) + whole["usage"]["completion_tokens"]
        with http.stream("POST", "/v1/completions",
                         json={**body, "stream": True,
                               "stream_options": {"include_usage": True}}) as r:
            events = [json.loads(line[6:]) for line in r.iter_lines()
                      if line.startswith("data: {")]
        entries = [t for e in events for c in e["choices"] if c.get("logprobs")
                   for t in c["logprobs"]["token_logprobs"]]
        usage = next(e["usage"] for e in events if e.get("usage"))
        assert usage == whole["usage"]
        assert len(entries) == len(ids) + usage["completion_tokens"]
        assert np.allclose(entries[1:], lp["token_logprobs"][1:], atol=1e-5)


@pytest.mark.parametrize("stream", [False, True])
def test_chat_logprobs_count_the_end_of_turn_token(http: httpx.Client, stream: bool) -> None:
    body = {"model": "tiny-up", "messages": [{"role": "user", "content": CONTEXT.strip()}],
            "temperature": 0, "max_tokens": 12, "logprobs": True, "top_logprobs": 2}
    if not stream:
        reply = http.post("/v1/chat/completions", json=body).json()
        entries = reply["choices"][0]["logprobs"]["content"]
        finish, usage = reply["choices"][0]["finish_reason"], reply["usage"]
        content = reply["choices"][0]["message"]["content"]
    else:
        with http.stream("POST", "/v1/chat/completions",
                         json={**body, "stream": True,
                               "stream_options": {"include_usage": True}}) as r:
            events = [json.loads(line[6:]) for line in r.iter_lines()
                      if line.startswith("data: {")]
        entries = [e for ev in events for c in ev["choices"] if c.get("logprobs")
                   for e in c["logprobs"]["content"]]
        finish = next(c["finish_reason"] for ev in events for c in ev["choices"]
                      if c["finish_reason"])
        usage = next(ev["usage"] for ev in events if ev.get("usage"))
        content = "".join(c["delta"].get("content") or "" for ev in events
                          for c in ev["choices"])
    assert finish == "stop" and content
    assert len(entries) == usage["completion_tokens"]
    assert "".join(e["token"] for e in entries[:-1]) == content  # the last ends the turn
    assert entries[-1]["logprob"] <= 0 and len(entries[-1]["top_logprobs"]) == 2
