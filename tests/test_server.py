"""``eft-local serve`` on a loopback port, driven by the official openai client and raw HTTP."""

from __future__ import annotations

import json
import math
import re
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import openai
import pytest
from starlette.testclient import TestClient

from eft_local.cli.serve import is_loopback
from eft_local.presets import load_config
from eft_local.server.app import ServerOptions, create_app
from eft_local.server.worker import Job, Worker
from eft_local.session import LoadOptions, load_session
from tests.clihelp import THREADS, assert_one_line_error, run, stdout
from tests.servehelp import Served, serving, serving_bundled, slow_steps

QUESTION = "What is the home town of Has Zhithdou?"
SECOND = "In which year was Has Zhithdou born?"


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    with serving_bundled(tmp_path_factory) as s:
        yield s


@pytest.fixture
def client(served: Served) -> openai.OpenAI:
    return openai.OpenAI(base_url=served.v1, api_key="unused", max_retries=0, timeout=60)


def chat(client: openai.OpenAI, content: str = QUESTION, **kwargs):
    kwargs.setdefault("model", "tiny-up")
    kwargs.setdefault("max_tokens", 12)
    return client.chat.completions.create(messages=[{"role": "user", "content": content}],
                                          **kwargs)


def streamed(client: openai.OpenAI, content: str = QUESTION, **kwargs) -> str:
    out = []
    for chunk in chat(client, content, stream=True, **kwargs):
        if chunk.choices and chunk.choices[0].delta.content:
            out.append(chunk.choices[0].delta.content)
    return "".join(out)


# -- the openai client ------------------------------------------------------------------------
@pytest.mark.parametrize("beta", [None, 1.5])
def test_greedy_chat_equals_eft_local_generate(client: openai.OpenAI, beta: float | None
                                               ) -> None:
    knobs = [] if beta is None else ["--beta", str(beta)]
    cli = run(["generate", "tiny-up", QUESTION, "-t", "0", "--max-tokens", "12", *THREADS,
               *knobs])
    assert cli.exit_code == 0, cli.output
    extra = {} if beta is None else {"extra_body": {"eft": {"beta": beta}}}
    reply = chat(client, temperature=0, **extra)
    assert reply.choices[0].message.content == stdout(cli)[:-1]
    assert reply.choices[0].finish_reason in ("stop", "length")
    assert reply.usage.completion_tokens >= 1
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens
    assert reply.model_extra["eft"]["params"]["beta"] == (beta or 1.0)


def test_streaming_joins_to_the_sync_answer_with_usage(client: openai.OpenAI) -> None:
    sync = chat(client, temperature=0.8, seed=5).choices[0].message.content
    chunks = list(chat(client, temperature=0.8, seed=5, stream=True,
                       stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == sync
    assert chunks[0].choices[0].delta.role == "assistant"
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] in ("stop", "length") and not any(finishes[:-1])
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens >= 1
    assert all(c.usage is None for c in chunks[:-1])


def test_model_names_carry_knobs_and_knobs_never_leak(client: openai.OpenAI) -> None:
    default = chat(client, temperature=0, max_tokens=16).choices[0].message.content
    by_name = chat(client, model="tiny-up@beta=3", temperature=0, max_tokens=16)
    by_body = chat(client, temperature=0, max_tokens=16, extra_body={"eft": {"beta": 3}})
    assert by_name.choices[0].message.content == by_body.choices[0].message.content
    assert by_name.model_extra["eft"]["params"] == {"beta": 3.0}
    formula = chat(client, temperature=0, max_tokens=16,
                   extra_body={"eft": {"formula": "small_ft", "conservative_top_p": 0.9}})
    assert formula.model_extra["eft"]["formula"] == "1*small_ft"
    after = chat(client, temperature=0, max_tokens=16)
    assert after.choices[0].message.content == default
    assert after.model_extra["eft"]["params"] == {"beta": 1.0}
    assert after.model_extra["eft"]["formula"] == "1*large_base + 1*small_ft - 1*small_base"


def test_requests_never_touch_the_sessions_own_settings(client: openai.OpenAI,
                                                         served: Served) -> None:
    session = served.runner.session
    assert session is not None
    defaults = session.defaults
    chat(client, model="tiny-up@beta=2", temperature=0.3, top_p=0.9, seed=4, stop=["x"],
         extra_body={"eft": {"formula": "amplified", "conservative_top_p": 0.8}})
    client.completions.create(model="tiny-up", prompt="Has", max_tokens=2, temperature=1.5,
                              extra_body={"eft": {"beta": 0.5}})
    assert session.defaults is defaults  # the very same frozen value: nothing was written


def test_diagnostics_and_logprobs_of_the_mix(client: openai.OpenAI) -> None:
    reply = chat(client, temperature=0, logprobs=True, top_logprobs=3,
                 extra_body={"eft": {"diagnostics": True}})
    entries = reply.choices[0].logprobs.content
    tokens = reply.model_extra["eft"]["tokens"]
    assert entries and len(tokens) == len(entries) == reply.usage.completion_tokens
    assert reply.choices[0].finish_reason == "stop"  # the last entry is the end of turn
    assert "".join(e.token for e in entries[:-1]) == reply.choices[0].message.content
    for entry, diag in zip(entries, tokens, strict=False):
        assert len(entry.top_logprobs) == 3
        assert entry.top_logprobs[0].logprob >= entry.top_logprobs[1].logprob
        assert entry.logprob == pytest.approx(entry.top_logprobs[0].logprob)  # greedy
        assert math.exp(entry.logprob) == pytest.approx(diag["p_mix"], abs=1e-4)
        assert set(diag["p_models"]) == {"large_base", "small_ft", "small_base"}


def test_diagnostics_attribute_the_text_and_measure_the_shift_from_the_base(
        served: Served) -> None:
    body = {"model": "tiny-up", "messages": [{"role": "user", "content": QUESTION}],
            "max_tokens": 16, "temperature": 0, "seed": 3,
            "eft": {"beta": 2, "diagnostics": True, "alternatives": 3}}
    whole = httpx.post(served.v1 + "/chat/completions", json=body, timeout=60).json()
    eft, content = whole["eft"], whole["choices"][0]["message"]["content"]
    assert eft["base_role"] == "large_base" and eft["conservative_role"] == "small_ft"
    tokens = eft["tokens"]
    assert "".join(t["content"] for t in tokens) == content
    for t in tokens:
        assert t["shift"] == pytest.approx(t["logprob_mix"] - t["logprob_models"]["large_base"])
        assert math.exp(t["logprob_models"]["small_ft"]) == pytest.approx(
            t["p_models"]["small_ft"], rel=1e-4)
        alt = t["alternatives"]
        assert set(alt) == {"large_base", "small_ft", "small_base", "mix"}
        assert all(len(top) == 3 and top[0]["logprob"] >= top[2]["logprob"]
                   for top in alt.values())
        assert alt["mix"][0]["token"] == t["token"]  # greedy: the mix's best token
        assert alt["mix"][0]["logprob"] == pytest.approx(t["logprob_mix"])
        assert alt["small_ft"][0]["token"] == t["ref_token"]  # small_ft alone, greedy
        assert t["ref_text"] == alt["small_ft"][0]["text"]
        assert t["differs"] == (t["ref_token"] != t["token"])
    assert any(t["differs"] for t in tokens) and any(abs(t["shift"]) > 0.1 for t in tokens)
    text, streamed_tokens = [], []
    with httpx.stream("POST", served.v1 + "/chat/completions", json={**body, "stream": True},
                      timeout=60) as r:
        for line in r.iter_lines():
            if line.startswith("data: {"):
                chunk = json.loads(line[6:])
                text.append(chunk["choices"][0]["delta"].get("content") or "")
                streamed_tokens += chunk.get("eft", {}).get("tokens", [])
    assert "".join(text) == content
    assert [t["content"] for t in streamed_tokens] == [t["content"] for t in tokens]
    assert [t["shift"] for t in streamed_tokens] == pytest.approx([t["shift"] for t in tokens],
                                                                  abs=1e-4)
    plain = {**body, "eft": {"diagnostics": True}}
    first = httpx.post(served.v1 + "/chat/completions", json=plain, timeout=60).json()
    assert "alternatives" not in first["eft"]["tokens"][0]
    card = httpx.get(served.v1 + "/models/tiny-mix").json()["eft"]
    assert card["params"] == {"beta": 1.0, "lam": 0.5} and card["base_role"] == "large_base"
    assert card["sampling"]["temperature"] == served.runner.sampling.temperature


def test_the_page_is_one_self_contained_file_with_a_strict_policy(served: Served) -> None:
    r = httpx.get(served.url + "/")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    policy = r.headers["content-security-policy"]
    assert "default-src 'none'" in policy and "connect-src 'self'" in policy
    assert "unsafe-inline" not in policy and "unsafe-eval" not in policy
    assert not re.search(r"""(?:src|href)\s*=\s*["'](?!data:)""", r.text)  # nothing fetched
    assert "innerHTML" not in r.text and "insertAdjacentHTML" not in r.text
    assert httpx.get(served.v1 + "/models").status_code == 200  # the API stays where it is


def test_completions_echo_logprobs_equal_session_score(client: openai.OpenAI) -> None:
    prompt = "Has Zhithdou was born in Stainby."
    scored = client.completions.create(model="tiny-up", prompt=prompt, echo=True, max_tokens=0,
                                       logprobs=2)
    choice = scored.choices[0]
    assert choice.text == prompt and scored.usage.completion_tokens == 0
    lp = choice.logprobs
    with load_session("tiny-up", options=LoadOptions(n_threads=1)) as s:
        tokens = s.tokenize(prompt)
        want = s.score(tokens, top_n=2)
    assert len(lp.tokens) == len(tokens) and lp.token_logprobs[0] is None
    assert lp.top_logprobs[0] is None
    assert np.allclose(lp.token_logprobs[1:], [t.logprob for t in want.tokens[1:]], atol=1e-4)
    for token, offset in zip(lp.tokens, lp.text_offset, strict=True):
        assert prompt[offset:offset + len(token)] == token
    # lm-evaluation-harness style: token ids, echo, one generated token, log-probs
    both = client.completions.create(model="tiny-up", prompt=[tokens, tokens[:4]], echo=True,
                                     max_tokens=1, logprobs=1, temperature=0)
    assert [c.index for c in both.choices] == [0, 1]
    first = both.choices[0].logprobs
    assert len(first.token_logprobs) == len(tokens) + 1
    assert np.allclose(first.token_logprobs[1:-1], lp.token_logprobs[1:], atol=1e-4)
    assert len(both.choices[1].logprobs.tokens) == 5


def test_parts_stop_limits_and_llama_extensions(client: openai.OpenAI) -> None:
    base = chat(client, temperature=0, max_tokens=24).choices[0].message.content
    parts = client.chat.completions.create(
        model="tiny-up", temperature=0, max_tokens=24,
        messages=[{"role": "user", "content": [{"type": "text", "text": QUESTION[:10]},
                                               {"type": "text", "text": QUESTION[10:]}]}])
    assert parts.choices[0].message.content == base
    cut = base[2:5]
    stopped = chat(client, temperature=0, max_tokens=24, stop=["zzz", cut])
    assert stopped.choices[0].message.content == base[:base.index(cut)]
    assert stopped.choices[0].finish_reason == "stop"
    short = chat(client, temperature=0, max_tokens=None, max_completion_tokens=2)
    assert short.usage.completion_tokens == 2 and short.choices[0].finish_reason == "length"
    top1 = chat(client, temperature=1.0, max_tokens=24, seed=9, extra_body={"top_k": 1})
    assert top1.choices[0].message.content == base
    tiny_p = chat(client, temperature=1.0, max_tokens=24, seed=9, extra_body={"min_p": 0.999})
    assert tiny_p.choices[0].message.content == base


def test_completions_stream_equals_the_whole_response(client: openai.OpenAI) -> None:
    prompt = "Has Zhithdou was born in"
    whole = client.completions.create(model="tiny-up", prompt=prompt, max_tokens=12, seed=4,
                                      temperature=1.0, logprobs=1)
    parts = list(client.completions.create(model="tiny-up", prompt=prompt, max_tokens=12,
                                           seed=4, temperature=1.0, stream=True))
    assert "".join(p.choices[0].text for p in parts if p.choices) == whole.choices[0].text
    assert parts[-1].choices[0].finish_reason == whole.choices[0].finish_reason
    lp = whole.choices[0].logprobs
    assert lp.text_offset[0] == len(prompt)  # offsets run over prompt + completion
    text = prompt + whole.choices[0].text
    for token, offset in zip(lp.tokens, lp.text_offset, strict=True):
        assert text[offset:offset + len(token)] == token


def test_tokenize_detokenize_and_tokenizer_info(served: Served) -> None:
    text = "Has Zhithdou was born"
    tokens = httpx.post(served.url + "/tokenize", json={"prompt": text}).json()["tokens"]
    with load_session("tiny-up", options=LoadOptions(n_threads=1)) as s:
        assert tokens == s.tokenize(text, parse_special=True)
    back = httpx.post(served.url + "/detokenize", json={"tokens": tokens}).json()
    assert back == {"prompt": text}
    info = httpx.get(served.url + "/tokenizer_info").json()
    assert info["chat_template"] and info["eos_token"] and info["model_max_length"] > 0
    msgs = httpx.post(served.url + "/tokenize",
                      json={"messages": [{"role": "user", "content": "hi"}]}).json()
    assert msgs["count"] == len(msgs["tokens"]) > 1


def test_models_lists_present_presets_and_cards_take_knob_names(client: openai.OpenAI
                                                                ) -> None:
    ids = [m.id for m in client.models.list().data]
    assert "tiny-up" in ids and "tiny-mix" in ids and not any("@" in i for i in ids)
    assert not any(i.startswith("llama3-up") for i in ids)  # its files are not present
    assert client.models.retrieve("tiny-up").id == "tiny-up"
    assert client.models.retrieve("tiny-mix@lam=0.5").id == "tiny-mix@lam=0.5"


def test_another_preset_is_loaded_on_demand(client: openai.OpenAI, served: Served) -> None:
    reply = chat(client, model="tiny-small-ft", temperature=0, max_tokens=4)
    assert reply.model_extra["eft"]["preset"] == "tiny-small-ft"
    assert any("loading preset 'tiny-small-ft'" in line for line in served.logs)
    back = chat(client, temperature=0, max_tokens=4)
    assert back.model_extra["eft"]["preset"] == "tiny-up"
    assert httpx.get(served.url + "/health").json()["status"] == "ok"


def test_resent_chat_pays_only_for_the_new_suffix(client: openai.OpenAI) -> None:
    history = [{"role": "user", "content": QUESTION}]
    first = client.chat.completions.create(model="tiny-up", messages=history, max_tokens=12,
                                           temperature=0)
    history += [{"role": "assistant", "content": first.choices[0].message.content},
                {"role": "user", "content": SECOND}]
    second = client.chat.completions.create(model="tiny-up", messages=history, max_tokens=4,
                                            temperature=0)
    timings = second.model_extra["timings"]
    with load_session("tiny-up", options=LoadOptions(n_threads=1)) as s:
        full = s.chat_tokens(history)
        before = s.chat_tokens(history[:1])
    assert second.usage.prompt_tokens == len(full)
    assert timings["cache_n"] + timings["prompt_n"] == len(full)
    assert timings["cache_n"] >= len(before) + first.usage.completion_tokens - 1
    assert timings["prompt_n"] <= len(full) - len(before) - first.usage.completion_tokens + 1


# -- raw HTTP: SSE framing and errors ---------------------------------------------------------
def test_sse_framing_is_openai_chunks_then_done(served: Served) -> None:
    body = {"model": "tiny-up", "messages": [{"role": "user", "content": QUESTION}],
            "max_tokens": 6, "stream": True}
    with httpx.stream("POST", served.v1 + "/chat/completions", json=body) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        raw = r.read().decode()
    events = raw.split("\n\n")
    assert events[-1] == "" and events[-2] == "data: [DONE]"
    for event in events[:-2]:
        assert event.startswith("data: ")
        chunk = json.loads(event[6:])
        assert chunk["object"] == "chat.completion.chunk" and chunk["id"].startswith("chatcmpl-")
        assert len(chunk["choices"]) == 1 and chunk["choices"][0]["index"] == 0


def _error(response: httpx.Response, status: int, *words: str) -> dict:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    assert "Traceback" not in response.text
    for word in words:
        assert word in body["error"]["message"] or word == body["error"]["param"], body
    return body["error"]


@pytest.mark.parametrize(("body", "words"), [
    ({"messages": [{"role": "user", "content": "x"}], "n": 17}, ["'n'", "16"]),
    ({"messages": [{"role": "user", "content": "x"}], "best_of": 2}, ["best_of", "completions"]),
    ({"messages": [{"role": "user", "content": "x"}], "temperature": 5}, ["temperature"]),
    ({"messages": [{"role": "user", "content": "x"}], "top_p": "high"}, ["top_p"]),
    ({"messages": []}, ["messages"]),
    ({"messages": [{"role": "robot", "content": "x"}]}, ["role"]),
    ({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, ["text parts"]),
    ({"messages": [{"role": "user", "content": "x"}], "eft": {"beta": "big"}}, ["eft.beta"]),
    ({"messages": [{"role": "user", "content": "x"}], "eft": {"betta": 1}}, ["eft.betta"]),
    ({"messages": [{"role": "user", "content": "x"}], "eft": {"formula": "nobody"}},
     ["eft.formula"]),
    ({"messages": [{"role": "user", "content": "x"}], "eft": {"beta": 1e300}}, ["eft.beta"]),
    ({"messages": [{"role": "user", "content": "x"}], "eft": {"alternatives": 3}},
     ["eft.alternatives", "eft.diagnostics"]),
    ({"messages": [{"role": "user", "content": "x"}],
      "eft": {"alternatives": 21, "diagnostics": True}}, ["eft.alternatives"]),
    ({"messages": [{"role": "user", "content": "x"}], "model": "tiny-up@beta=x"}, ["model"]),
    ({"messages": [{"role": "user", "content": "x " * 400}]}, ["context"]),
])
def test_bad_chat_requests_are_400(served: Served, body: dict, words: list[str]) -> None:
    err = _error(httpx.post(served.v1 + "/chat/completions", json=body), 400, *words)
    assert err["type"] == "invalid_request_error"


def test_other_errors_have_openai_bodies_and_statuses(served: Served) -> None:
    url = served.v1 + "/chat/completions"
    as_json = {"Content-Type": "application/json"}
    _error(httpx.post(url, content=b"{not json", headers=as_json), 400, "parse the JSON")
    _error(httpx.post(url, json={"model": "nope", "messages": [{"role": "user", "content": "x"}]}),
           404, "nope")
    _error(httpx.post(url, content=b"[" + b"1," * (9 << 20) + b"1]", headers=as_json), 413,
           "limit")
    _error(httpx.get(served.v1 + "/nothing"), 404)
    _error(httpx.post(served.v1 + "/completions", json={"prompt": [99999]}), 400, "vocabulary")
    _error(httpx.post(served.v1 + "/completions", json={"prompt": "x", "max_tokens": 0}), 400,
           "max_tokens")
    assert any(" 404 " in line for line in served.logs)
    with pytest.raises(openai.BadRequestError):
        chat(openai.OpenAI(base_url=served.v1, api_key="x", max_retries=0), n=17)


# -- concurrency and disconnects --------------------------------------------------------------
def test_eight_simultaneous_streams_each_get_their_solo_answer(client: openai.OpenAI) -> None:
    solo = [streamed(client, temperature=1.0, seed=i, max_tokens=16) for i in range(8)]
    assert len(set(solo)) > 1  # the seeds matter, so a mix-up would show
    got: dict[int, str] = {}

    def one(i: int) -> None:
        got[i] = streamed(client, temperature=1.0, seed=i, max_tokens=16)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert [got.get(i) for i in range(8)] == solo


def test_a_client_that_disconnects_stops_its_generation_and_disturbs_no_one(
        client: openai.OpenAI, served: Served, monkeypatch: pytest.MonkeyPatch) -> None:
    session = served.runner.session
    solo = streamed(client, SECOND, temperature=0, max_tokens=10)
    monkeypatch.setattr(session, "step", session.step)
    slow_steps(session, 0.02)  # a slow model: 20 ms per token
    body = {"model": "tiny-up", "messages": [{"role": "user", "content": QUESTION}],
            "max_tokens": 200, "stream": True, "temperature": 0,
            "eft": {"formula": "large_base"}}
    alone = chat(client, temperature=0, max_tokens=200, extra_body={"eft": {
        "formula": "large_base"}})
    assert alone.usage.completion_tokens > 20  # long enough to be cut short
    other: dict[str, str] = {}
    with httpx.stream("POST", served.v1 + "/chat/completions", json=body) as r:
        lines = r.iter_lines()
        seen = 0
        for line in lines:
            if line.startswith("data: "):
                seen += 1
                if seen == 3:
                    break
        waiter = threading.Thread(target=lambda: other.setdefault(
            "text", streamed(client, SECOND, temperature=0, max_tokens=10)))
        waiter.start()
        time.sleep(0.1)
    waiter.join(timeout=60)
    monkeypatch.undo()
    assert other["text"] == solo
    gone = next(j for j in reversed(served.runner.history) if j.generated_at_cancel is not None)
    assert gone.info["cancelled"]
    stopped = [line for line in served.logs if "client gone: stopped after" in line]
    assert stopped and f"stopped after {gone.generated_at_cancel} tokens" in stopped[-1]
    assert gone.generated - gone.generated_at_cancel <= 1
    assert gone.generated < alone.usage.completion_tokens
    assert streamed(client, SECOND, temperature=0, max_tokens=10) == solo


def test_a_full_queue_answers_503_with_retry_after(tmp_path: Path) -> None:
    with serving("tiny-up", max_queue=1) as s:
        release = threading.Event()
        started = threading.Event()

        def hold(_session, _job) -> None:
            started.set()
            release.wait(30)

        s.runner.submit(Job(work=hold))
        assert started.wait(30)
        body = {"messages": [{"role": "user", "content": "x"}], "max_tokens": 2}
        waiting = threading.Thread(target=lambda: httpx.post(s.v1 + "/chat/completions",
                                                             json=body, timeout=60))
        waiting.start()
        deadline = time.monotonic() + 10
        while s.runner.waiting() < 1 and time.monotonic() < deadline:
            time.sleep(0.01)
        refused = httpx.post(s.v1 + "/chat/completions", json=body)
        release.set()
        waiting.join(timeout=60)
    err = _error(refused, 503, "busy")
    assert err["code"] == "queue_full" and refused.headers["retry-after"].isdigit()


# -- keys, health, pinning, the command -------------------------------------------------------
def _runner(pinned: bool = False) -> Worker:
    preset = load_config().get("tiny-up")
    return Worker(load_config(), preset, pinned=pinned, log=lambda _m: None)


def test_api_key_is_required_when_set() -> None:
    app = create_app(_runner(), ServerOptions(api_key="sesame"), log=lambda _m: None)
    with TestClient(app, base_url="http://127.0.0.1") as web:
        err = _error(web.get("/v1/models"), 401)
        assert err["code"] == "invalid_api_key"
        _error(web.get("/v1/models", headers={"Authorization": "Bearer wrong"}), 401)
        ok = web.get("/v1/models", headers={"Authorization": "Bearer sesame"})
        assert ok.status_code == 200 and ok.json()["object"] == "list"
        assert web.get("/health").status_code == 503  # open without a key; still loading


def test_health_is_503_while_loading_and_pinning_refuses_other_presets() -> None:
    app = create_app(_runner(pinned=True), log=lambda _m: None)
    with TestClient(app, base_url="http://127.0.0.1") as web:
        health = web.get("/health")
        assert health.status_code == 503 and health.json()["status"] == "loading"
        body = {"model": "tiny-down", "messages": [{"role": "user", "content": "x"}]}
        err = _error(web.post("/v1/chat/completions", json=body), 404, "pinned")
        assert err["code"] == "model_not_found"
        assert [m["id"] for m in web.get("/v1/models").json()["data"]] == ["tiny-up"]


def test_serve_without_the_extra_names_what_to_install(monkeypatch: pytest.MonkeyPatch
                                                       ) -> None:
    for name in [m for m in sys.modules if m.split(".")[0] in ("starlette", "uvicorn")]:
        monkeypatch.setitem(sys.modules, name, None)  # as if they were not installed
    monkeypatch.setitem(sys.modules, "starlette", None)
    monkeypatch.setitem(sys.modules, "uvicorn", None)
    monkeypatch.delitem(sys.modules, "eft_local.server.app", raising=False)
    result = run(["serve", "tiny-up"])
    assert_one_line_error(result, "pip install 'eft-local[server]'")


def test_binding_beyond_loopback_without_a_key_warns() -> None:
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("192.168.1.4")
    result = run(["serve", "no-such-preset", "--host", "0.0.0.0"])
    assert "warning: listening on 0.0.0.0 without --api-key" in result.stderr
    assert_one_line_error(result, "no-such-preset")


def test_stopping_the_server_cancels_the_running_generation() -> None:
    """After three tokens the stream makes no more until its job is cancelled (or a minute
    has passed): stop() must cancel it, and the answer ends within a token of that. (It used
    to expect stop() to return within 5 s, which a busy machine can break.)"""
    with serving("tiny-up") as s:
        session = s.runner.session
        original = session.step
        three = threading.Event()

        def held():  # three steps, then none until the job is cancelled
            if s.runner.current is not None and s.runner.current.generated >= 3:
                three.set()
                s.runner.current.cancelled.wait(timeout=60)
            return original()

        session.step = held
        body = {"messages": [{"role": "user", "content": QUESTION}], "max_tokens": 200,
                "temperature": 0, "eft": {"formula": "large_base"}}
        threading.Thread(target=lambda: httpx.post(s.v1 + "/chat/completions", json=body,
                                                   timeout=120), daemon=True).start()
        assert three.wait(timeout=60)
        s.runner.stop()
        info = s.runner.history[-1].info
        assert info["cancelled"] and info["completion_tokens"] <= 4, info


def test_a_port_in_use_is_a_one_line_error() -> None:
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        result = run(["serve", "tiny-up", "--port", str(taken.getsockname()[1])])
    assert_one_line_error(result, "cannot listen on 127.0.0.1")
