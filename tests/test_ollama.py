"""Issue 24, item 7: Ollama's API (``/api/chat``, ``/api/generate``, ``/api/tags``,
``/api/show``, ``/api/ps``, ``/api/version``) driven by the ``ollama`` package from PyPI and
by the exact requests Open WebUI's Ollama connection sends, against the tiny family; a
greedy reply equals the OpenAI route's, errors have Ollama's shape and name the field."""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterator
from datetime import datetime
from typing import Any

import httpx
import pytest

from eft_local.server.options import ServerOptions
from tests.servehelp import Served, serving, serving_bundled, slow_steps

ollama = pytest.importorskip("ollama", reason="the ollama client is not installed "
                             "(pip install ollama)")

QUESTION = "What is the home town of Has Zhithdou?"
PROMPT = "Has Zhithdou was born in"
USER = [{"role": "user", "content": QUESTION}]
GREEDY = {"temperature": 0, "num_predict": 12}
LOOKUP = {"type": "function", "function": {
    "name": "lookup", "description": "Look up a fact about a person",
    "parameters": {"type": "object", "properties": {
        "person": {"type": "string", "maxLength": 24},
        "fact": {"enum": ["town", "year", "profession"]}},
        "required": ["person", "fact"]}}}


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    with serving_bundled(tmp_path_factory, n_ctx=1024) as s:
        yield s


@pytest.fixture
def client(served: Served) -> ollama.Client:
    return ollama.Client(host=served.url, timeout=120)


def openai_chat(served: Served, **body: Any) -> dict[str, Any]:
    body = {"model": "tiny-up", "messages": USER, "temperature": 0, "max_tokens": 12, **body}
    r = httpx.post(served.v1 + "/chat/completions", json=body, timeout=120)
    assert r.status_code == 200, r.text
    return r.json()


def api_chat(served: Served, **body: Any) -> dict[str, Any]:
    """``/api/chat``'s whole answer as JSON (the client's models drop the ``eft`` object)."""
    body = {"model": "tiny-up", "messages": USER, "stream": False, "options": GREEDY, **body}
    r = httpx.post(served.url + "/api/chat", json=body, timeout=120)
    assert r.status_code == 200, r.text
    return r.json()


def ndjson(served: Served, path: str, body: dict[str, Any],
           headers: dict[str, str] | None = None) -> list[dict[str, Any]]:
    """The lines of a streamed answer (each one whole JSON, as Open WebUI reads them)."""
    with httpx.stream("POST", served.url + path, content=json.dumps(body), timeout=120,
                      headers={"Content-Type": "application/json", **(headers or {})}) as r:
        assert r.status_code == 200, r.read()
        assert r.headers["content-type"] == "application/x-ndjson"
        return [json.loads(line) for line in r.iter_lines()]


# -- the ollama package -------------------------------------------------------------------------
def test_a_greedy_chat_equals_the_openai_routes_reply(served: Served,
                                                      client: ollama.Client) -> None:
    want = openai_chat(served)
    reply = client.chat(model="tiny-up", messages=USER, options=GREEDY)
    assert reply.message.role == "assistant"
    assert reply.message.content == want["choices"][0]["message"]["content"]
    assert reply.done and reply.done_reason == "stop"
    assert reply.eval_count == want["usage"]["completion_tokens"]
    assert reply.prompt_eval_count == want["usage"]["prompt_tokens"]
    assert reply.total_duration >= reply.load_duration >= 0
    assert reply.eval_duration > 0 and reply.prompt_eval_duration > 0
    eft = api_chat(served)["eft"]
    assert eft["preset"] == "tiny-up" and eft["params"] == {"beta": 1.0}
    # the tag Ollama's clients add, and the model named back as the request named it
    tagged = client.chat(model="tiny-up:latest", messages=USER, options=GREEDY)
    assert tagged.message.content == reply.message.content
    assert tagged.model == "tiny-up:latest" and reply.model == "tiny-up"


def test_beta_by_the_model_name_or_the_eft_object(served: Served,
                                                  client: ollama.Client) -> None:
    want = openai_chat(served, eft={"beta": 3}, max_tokens=16)["choices"][0]["message"]
    options = {**GREEDY, "num_predict": 16}
    by_name = client.chat(model="tiny-up@beta=3", messages=USER, options=options)
    by_options = client.chat(model="tiny-up", messages=USER, options={**options,
                                                                      "eft": {"beta": 3}})
    by_body = api_chat(served, model="tiny-up:latest", options=options, eft={"beta": 3})
    assert by_name.message.content == by_options.message.content == want["content"]
    assert by_body["message"]["content"] == want["content"]
    assert by_body["eft"]["params"] == {"beta": 3.0}
    assert api_chat(served, model="tiny-up@beta=3", options=options)["eft"]["params"] == {
        "beta": 3.0}
    plain = api_chat(served, options=options)
    assert plain["eft"]["params"] == {"beta": 1.0}  # nothing leaks into the next request


def test_a_streamed_chat_joins_to_the_whole_reply(client: ollama.Client) -> None:
    whole = client.chat(model="tiny-up", messages=USER, options=GREEDY)
    parts = list(client.chat(model="tiny-up", messages=USER, options=GREEDY, stream=True))
    assert len(parts) > 2 and [p.done for p in parts] == [False] * (len(parts) - 1) + [True]
    assert "".join(p.message.content for p in parts) == whole.message.content
    assert parts[-1].message.content == "" and parts[-1].done_reason == whole.done_reason
    assert parts[-1].eval_count == whole.eval_count
    assert all(p.done_reason is None and p.eval_count is None for p in parts[:-1])


def test_streaming_is_the_default_as_in_ollama(served: Served) -> None:
    lines = ndjson(served, "/api/chat", {"model": "tiny-up", "messages": USER,
                                         "options": GREEDY})
    assert lines[-1]["done"] and not any(line["done"] for line in lines[:-1])
    assert set(lines[0]) == {"model", "created_at", "message", "done"}
    datetime.fromisoformat(lines[0]["created_at"].replace("Z", "+00:00"))


def test_generate_is_a_user_turn_and_raw_continues_the_text(served: Served,
                                                            client: ollama.Client) -> None:
    chat = client.chat(model="tiny-up", messages=USER, options=GREEDY)
    generated = client.generate(model="tiny-up", prompt=QUESTION, options=GREEDY)
    assert generated.response == chat.message.content and generated.done_reason == "stop"
    parts = list(client.generate(model="tiny-up", prompt=QUESTION, options=GREEDY,
                                 stream=True))
    assert "".join(p.response for p in parts) == generated.response and parts[-1].done
    system = "You answer in one word."
    with_system = client.generate(model="tiny-up", prompt=QUESTION, system=system,
                                  options=GREEDY)
    assert with_system.response == client.chat(model="tiny-up", options=GREEDY, messages=[
        {"role": "system", "content": system}, *USER]).message.content
    raw = client.generate(model="tiny-up", prompt=PROMPT, raw=True, options=GREEDY)
    want = httpx.post(served.v1 + "/completions", timeout=120, json={
        "model": "tiny-up", "prompt": PROMPT, "temperature": 0, "max_tokens": 12}).json()
    assert raw.response == want["choices"][0]["text"]
    assert raw.eval_count == want["usage"]["completion_tokens"]
    assert raw.done_reason == ("length" if want["choices"][0]["finish_reason"] == "length"
                               else "stop")


def test_options_set_the_same_knobs(served: Served, client: ollama.Client) -> None:
    sampled = client.chat(model="tiny-up", messages=USER,
                          options={"temperature": 0.9, "top_p": 0.95, "seed": 11,
                                   "num_predict": 16})
    want = openai_chat(served, temperature=0.9, top_p=0.95, seed=11, max_tokens=16)
    assert sampled.message.content == want["choices"][0]["message"]["content"]
    short = client.chat(model="tiny-up", messages=USER, options={"temperature": 0,
                                                                 "num_predict": 2})
    assert short.eval_count == 2 and short.done_reason == "length"
    for unlimited in (-1, -2, 0):  # Ollama: no limit; the reply runs to its end of turn
        whole = client.chat(model="tiny-up", messages=USER,
                            options={"temperature": 0, "num_predict": unlimited})
        assert whole.done_reason == "stop"
    assert whole.message.content.startswith(short.message.content)
    stopped = client.chat(model="tiny-up", messages=USER,
                          options={**GREEDY, "stop": [short.message.content[-2:]]})
    assert short.message.content[-2:] not in stopped.message.content
    # load options are taken (the context is the server's own) and neutral values too
    same = client.chat(model="tiny-up", messages=USER, options={
        **GREEDY, "num_ctx": 4096, "num_gpu": 0, "use_mmap": True, "repeat_penalty": 1.0,
        "mirostat": 0, "num_keep": 4})
    assert same.message.content == client.chat(model="tiny-up", messages=USER,
                                               options=GREEDY).message.content
    # penalties are the OpenAI routes' knobs
    penalised = client.chat(model="tiny-up", messages=USER, options={
        **GREEDY, "num_predict": 24, "repeat_penalty": 1.8, "repeat_last_n": 16})
    want = openai_chat(served, temperature=0, max_tokens=24, repeat_penalty=1.8,
                       repeat_last_n=16)
    assert penalised.message.content == want["choices"][0]["message"]["content"]
    assert any("options.num_ctx 4096 asks for more than this server's context" in line
               and "--n-ctx 4096" in line for line in served.logs)


def test_logprobs_of_the_mix_as_on_v1(served: Served, client: ollama.Client) -> None:
    want = openai_chat(served, logprobs=True, top_logprobs=2)["choices"][0]["logprobs"]
    reply = client.chat(model="tiny-up", messages=USER, options=GREEDY, logprobs=True,
                        top_logprobs=2)
    assert [e.token for e in reply.logprobs] == [e["token"] for e in want["content"]]
    assert [e.logprob for e in reply.logprobs] == pytest.approx(
        [e["logprob"] for e in want["content"]], abs=1e-4)
    assert all(len(e.top_logprobs) == 2 for e in reply.logprobs)
    parts = list(client.chat(model="tiny-up", messages=USER, options=GREEDY, logprobs=True,
                             top_logprobs=2, stream=True))
    assert [e.token for p in parts for e in p.logprobs or ()] == [e.token for e in
                                                                  reply.logprobs]
    raw = client.generate(model="tiny-up", prompt=PROMPT, raw=True, options=GREEDY,
                          logprobs=True, top_logprobs=3)
    legacy = httpx.post(served.v1 + "/completions", timeout=120, json={
        "model": "tiny-up", "prompt": PROMPT, "temperature": 0, "max_tokens": 12,
        "logprobs": 3}).json()["choices"][0]["logprobs"]
    assert [e.token for e in raw.logprobs] == legacy["tokens"]
    assert [e.logprob for e in raw.logprobs] == pytest.approx(legacy["token_logprobs"],
                                                              abs=1e-4)
    for entry, top in zip(raw.logprobs, legacy["top_logprobs"], strict=True):
        assert {t.token: t.logprob for t in entry.top_logprobs} == pytest.approx(top, abs=1e-4)
    assert client.chat(model="tiny-up", messages=USER, options=GREEDY).logprobs is None


def test_format_json_or_a_schema(client: ollama.Client) -> None:
    reply = client.chat(model="tiny-up", messages=USER, format="json",
                        options={"temperature": 0, "num_predict": 300})
    assert isinstance(json.loads(reply.message.content), dict)
    schema = {"type": "object", "properties": {"town": {"type": "string", "maxLength": 16},
                                               "year": {"type": "integer"}},
              "required": ["town", "year"]}
    shaped = client.generate(model="tiny-up", prompt=QUESTION, format=schema,
                             options={"temperature": 0, "num_predict": 300})
    data = json.loads(shaped.response)
    assert set(data) == {"town", "year"} and isinstance(data["year"], int)


def test_tools_and_tool_results_in_ollamas_shape(served: Served,
                                                 client: ollama.Client) -> None:
    want = openai_chat(served, tools=[LOOKUP], max_tokens=300)["choices"][0]["message"]
    reply = client.chat(model="tiny-up", messages=USER, tools=[LOOKUP],
                        options={"temperature": 0, "num_predict": 300})
    if want.get("tool_calls"):
        call = reply.message.tool_calls[0].function
        assert call.name == want["tool_calls"][0]["function"]["name"]
        assert dict(call.arguments) == json.loads(want["tool_calls"][0]["function"]["arguments"])
    else:
        assert reply.message.content == want["content"] and not reply.message.tool_calls
    # a call (tool_choice, OpenAI's field, read here too), whole and streamed
    want = openai_chat(served, tools=[LOOKUP], tool_choice="required", max_tokens=300)
    wanted = want["choices"][0]["message"]["tool_calls"][0]["function"]
    called = api_chat(served, tools=[LOOKUP], tool_choice="required",
                      options={"temperature": 0, "num_predict": 300})
    message = ollama.ChatResponse(**called).message  # as the client reads it
    assert message.content == "" and called["done_reason"] == "stop"
    assert message.tool_calls[0].function.name == wanted["name"] == "lookup"
    assert dict(message.tool_calls[0].function.arguments) == json.loads(wanted["arguments"])
    lines = ndjson(served, "/api/chat", {"model": "tiny-up", "messages": USER,
                                         "tools": [LOOKUP], "tool_choice": "required",
                                         "options": {"temperature": 0, "num_predict": 300}})
    calls = [c["function"] for line in lines for c in line["message"].get("tool_calls", [])]
    assert calls == [c["function"] for c in called["message"]["tool_calls"]]
    assert lines[-1]["done"]
    history = [*USER, {"role": "assistant", "content": "", "tool_calls": [
        {"function": {"name": "lookup", "arguments": {"person": "Has Zhithdou",
                                                      "fact": "town"}}}]},
               {"role": "tool", "tool_name": "lookup", "content": "Stainby"}]
    after = client.chat(model="tiny-up", messages=history, tools=[LOOKUP], options=GREEDY)
    assert after.done


def test_list_show_ps_and_version(served: Served, client: ollama.Client) -> None:
    listed = {m.model: m for m in client.list().models}
    assert {"tiny-up:latest", "tiny-down:latest", "tiny-mix:latest"} <= set(listed)
    up = listed["tiny-up:latest"]
    assert up.size > 0 and re.fullmatch(r"[0-9a-f]{64}", up.digest)
    assert up.details.format == "gguf" and up.details.family == "llama"
    shown = client.show("tiny-up:latest")
    session = served.runner.session
    assert session is not None and session.preset.name == "tiny-up"
    assert shown.template == session.template
    assert shown.modelinfo["llama.context_length"] == session.n_ctx
    assert "completion" in shown.capabilities and "num_ctx 1024" in shown.parameters
    card = httpx.post(served.url + "/api/show", json={"model": "tiny-up@beta=2"}).json()
    assert card["eft"]["params"] == {"beta": 2.0} and card["eft"]["preset"] == "tiny-up"
    loaded = client.ps().models
    assert [m.model for m in loaded] == ["tiny-up:latest"]
    assert loaded[0].context_length == session.n_ctx
    version = httpx.get(served.url + "/api/version").json()["version"]
    assert all(part.isdigit() for part in version.split("."))


# -- errors ------------------------------------------------------------------------------------
@pytest.mark.parametrize(("path", "body", "status", "words"), [
    ("/api/chat", {"options": {"temperature": 5}}, 400, "'options.temperature' is 5"),
    ("/api/chat", {"options": {"tempreture": 1}}, 400, "'options.tempreture' is not an option"),
    ("/api/chat", {"options": {"repeat_penalty": 0}}, 400, "'options.repeat_penalty' is 0"),
    ("/api/chat", {"options": {"mirostat": 2}}, 400, "'options.mirostat' is 2"),
    ("/api/chat", {"options": {"num_ctx": "big"}}, 400, "'options.num_ctx' must be a positive"),
    ("/api/chat", {"options": {"num_predict": 1.5}}, 400, "'options.num_predict' must be an"),
    ("/api/chat", {"options": {"eft": {"bogus": 1}}}, 400, "'options.eft.bogus' is not an EFT"),
    ("/api/chat", {"eft": {"beta": "x"}}, 400, "'eft.beta' must be a number"),
    ("/api/chat", {"model": "nope"}, 404, "'nope' does not exist"),
    ("/api/chat", {"model": "tiny-up:7b"}, 404, "named without a tag or with :latest"),
    ("/api/chat", {"format": "yaml"}, 400, "'format' must be \"json\" or a JSON schema"),
    ("/api/chat", {"format": {"type": "wat"}}, 400, "'format': "),
    ("/api/chat", {"think": "high"}, 400, "levels are not applied here"),
    ("/api/generate", {"prompt": "Hi", "raw": True, "think": True}, 400, "does not apply"),
    ("/api/chat", {"keep_alive": [5]}, 400, "'keep_alive' is [5]"),
    ("/api/chat", {"messages": [{"role": "user", "content": "Hi", "images": ["aGk="]}]}, 400,
     "'messages[0].images': this server's models read text only"),
    ("/api/chat", {"messages": [{"role": "robot", "content": "Hi"}]}, 400,
     "'messages[0].role' is 'robot'"),
    ("/api/generate", {"prompt": "Hi", "suffix": "end"}, 400, "'suffix': fill-in-the-middle"),
    ("/api/generate", {"prompt": "Hi", "template": "{{ .Prompt }}"}, 400, "'template': "),
    ("/api/generate", {"prompt": "Hi", "context": [1, 2]}, 400, "send the conversation to"),
    ("/api/generate", {"prompt": "Hi", "raw": True, "system": "S"}, 400, "'system' does not"),
    ("/api/generate", {"prompt": "x" * 20000}, 400, "this model's context holds 1024 tokens"),
    ("/api/show", {}, 400, "'model' is required"),
    ("/api/show", {"model": "tiny-up@lam=2"}, 404, "does not use lam"),
])
def test_errors_have_ollamas_shape_and_name_the_field(served: Served, path: str,
                                                      body: dict[str, Any], status: int,
                                                      words: str) -> None:
    if path != "/api/show":
        body = {"model": "tiny-up", "stream": True,
                "messages" if path == "/api/chat" else "prompt": USER if path == "/api/chat"
                else QUESTION, **body}
    r = httpx.post(served.url + path, json=body, timeout=120)
    assert r.status_code == status, r.text
    assert r.headers["content-type"] == "application/json"
    error = r.json()
    assert list(error) == ["error"] and isinstance(error["error"], str)
    assert words in error["error"], error["error"]


def test_the_client_raises_ollamas_error_with_its_status(client: ollama.Client) -> None:
    with pytest.raises(ollama.ResponseError) as caught:
        client.chat(model="nope", messages=USER)
    assert caught.value.status_code == 404 and "'nope' does not exist" in caught.value.error
    with pytest.raises(ollama.ResponseError) as caught:
        list(client.chat(model="tiny-up", messages=USER, stream=True,
                         options={"top_p": 2}))
    assert caught.value.status_code == 400 and "'options.top_p' is 2" in caught.value.error


def test_the_guards_answer_in_ollamas_shape_under_api(served: Served) -> None:
    r = httpx.post(served.url + "/api/chat", content=json.dumps({"messages": USER}),
                   headers={"Content-Type": "text/plain"})
    assert r.status_code == 415 and "Content-Type: application/json" in r.json()["error"]
    r = httpx.post(served.url + "/api/pull", json={"model": "x"})
    assert r.status_code == 404 and r.json() == {"error": "no route POST /api/pull"}
    r = httpx.get(served.url + "/api/tags", headers={"Host": "evil.example.com"})
    assert r.status_code == 403 and "--allowed-host evil.example.com" in r.json()["error"]
    r = httpx.get(served.v1 + "/models/nope")  # the OpenAI routes keep OpenAI's shape
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"


def test_a_key_is_asked_as_on_v1_but_for_the_version() -> None:
    key = "sk-test-ollama-3b9d"
    with serving(options=ServerOptions(api_key=key)) as s:
        assert httpx.get(s.url + "/api/version").status_code == 200
        with pytest.raises(ollama.ResponseError) as caught:
            ollama.Client(host=s.url).list()
        assert caught.value.status_code == 401 and "Bearer" in caught.value.error
        keyed = ollama.Client(host=s.url, headers={"Authorization": f"Bearer {key}"})
        assert keyed.list().models


def test_an_empty_request_loads_the_preset(served: Served, client: ollama.Client) -> None:
    loaded = client.generate(model="tiny-up", prompt="")
    assert loaded.done and loaded.done_reason == "load" and loaded.response == ""
    chat = httpx.post(served.url + "/api/chat", json={"model": "tiny-up", "messages": []})
    assert chat.status_code == 200 and chat.json()["done_reason"] == "load"
    assert chat.json()["message"] == {"role": "assistant", "content": ""}


def _until(ready: Any, what: str) -> None:
    deadline = time.monotonic() + 60
    while not ready():
        assert time.monotonic() < deadline, f"gave up waiting for {what}"
        time.sleep(0.01)


def test_a_stream_cut_by_a_shutdown_ends_with_an_error_line() -> None:
    with serving() as s:
        slow_steps(s.runner.session, 0.05, endless=True)
        body = {"model": "tiny-up", "messages": USER, "options": {"num_predict": 500}}
        with httpx.stream("POST", s.url + "/api/chat", json=body, timeout=60) as r:
            lines = r.iter_lines()
            first = [json.loads(next(lines)) for _ in range(2)]
            s.runner.close()
            rest = [json.loads(line) for line in lines]
    assert not any(part["done"] for part in first + rest[:-1])
    assert rest[-1] == {"error": "the server is shutting down"}


def test_a_client_leaving_a_stream_stops_its_work() -> None:
    with serving() as s:
        slow_steps(s.runner.session, 0.05, endless=True)
        body = {"model": "tiny-up", "prompt": QUESTION, "options": {"num_predict": 500}}
        with httpx.stream("POST", s.url + "/api/generate", json=body, timeout=60) as r:
            lines = r.iter_lines()
            next(lines), next(lines)
            job = s.runner.current
        assert job is not None
        _until(lambda: job in s.runner.history, "the job ended")
        assert job.cancel_reason == "client" and job.generated < 100


# -- Open WebUI's Ollama connection, replayed ------------------------------------------------------
def test_open_webuis_requests_replayed(served: Served) -> None:
    """The requests of Open WebUI's backend (backend/open_webui/routers/ollama.py and
    utils/payload.py, read for this test): GETs that send Content-Type: application/json,
    bodies sent as text, ``:latest`` added to a name without a tag, the version compared
    as numbers, ``expires_at`` read with ``datetime.fromisoformat``, ``num_ctx`` and other
    load options in ``options``, and its unload request."""
    json_header = {"Content-Type": "application/json"}
    version = httpx.get(served.url + "/api/version", headers=json_header).json()["version"]
    assert tuple(map(int, re.sub(r"^v|-.*", "", version).split(".")))
    models = httpx.get(served.url + "/api/tags", headers=json_header).json()["models"]
    ids = {m["model"]: m for m in models}
    assert "tiny-up:latest" in ids and all(":" in name for name in ids)
    ps = httpx.get(served.url + "/api/ps", headers=json_header).json()["models"]
    assert int(datetime.fromisoformat(ps[0]["expires_at"]).timestamp()) > 0
    assert {m["name"] for m in ps} <= set(ids)
    payload = {"model": "tiny-up:latest", "stream": True, "keep_alive": "5m",
               "messages": [{"role": "system", "content": "You are a helpful assistant."},
                            *USER],
               "options": {"temperature": 0.0, "num_predict": 12, "num_ctx": 1024,
                           "top_k": 40, "top_p": 0.9, "num_thread": 2, "use_mlock": False}}
    lines = ndjson(served, "/api/chat", payload)
    text = "".join(line.get("message", {}).get("content", "") for line in lines)
    last = lines[-1]
    assert last["done"] and int(last["prompt_eval_count"]) > 0 and last["eval_duration"] > 0
    whole = httpx.post(served.url + "/api/chat", headers=json_header, timeout=120,
                       content=json.dumps({**payload, "stream": False})).json()
    assert whole["message"]["content"] == text  # a title or a follow-up: not streamed
    knobs = ndjson(served, "/api/chat", {**payload, "model": "tiny-up@beta=2:latest"})
    assert knobs[-1]["eft"]["params"] == {"beta": 2.0}
    unload = httpx.post(served.url + "/api/generate", headers=json_header, content=json.dumps(
        {"model": "tiny-up:latest", "keep_alive": 0, "prompt": ""}))
    assert unload.status_code == 200 and unload.json()["done"]
