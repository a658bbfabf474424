"""Structured output and tools over HTTP: ``response_format``, llama-server's ``grammar`` and
``json_schema``, ``tools`` and ``tool_choice``, in chat and completions, streamed or not."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from pydantic import BaseModel, Field

from eft_local import structured
from eft_local.callshape import FALLBACK, CallShape, call_shape
from eft_local.session import LoadOptions, load_session
from eft_local.templates import tool_support
from tests import ggufs
from tests.servehelp import Served, serving, serving_bundled

QUESTION = "What is the home town of Has Zhithdou?"
LOOKUP = {"type": "function", "function": {
    "name": "lookup", "description": "Look up a fact about a person",
    "parameters": {"type": "object", "properties": {
        "person": {"type": "string", "maxLength": 24},
        "fact": {"enum": ["town", "year", "profession"]}},
        "required": ["person", "fact"]}}}
WEATHER = {"type": "function", "function": {
    "name": "weather", "parameters": {"type": "object", "properties": {
        "town": {"type": "string", "maxLength": 16}, "days": {"type": "integer"}},
        "required": ["town"]}}}


class Fact(BaseModel):
    person: str = Field(max_length=24)
    town: str = Field(max_length=16)
    year: int


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    with serving_bundled(tmp_path_factory, n_ctx=1024) as s:
        yield s


@pytest.fixture(scope="module")
def http(served: Served) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=served.v1, timeout=120) as c:
        yield c


def chat(http: httpx.Client, **body: Any) -> httpx.Response:
    body.setdefault("messages", [{"role": "user", "content": QUESTION}])
    return http.post("/chat/completions", json={"model": "tiny-up", "temperature": 0,
                                                "max_tokens": 300, **body})


def events(http: httpx.Client, path: str, body: dict[str, Any]) -> list[dict[str, Any]]:
    with http.stream("POST", path, json={**body, "stream": True}) as r:
        assert r.status_code == 200, r.read()
        return [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]


def streamed_chat(http: httpx.Client, **body: Any) -> tuple[str, list[dict], str]:
    body.setdefault("messages", [{"role": "user", "content": QUESTION}])
    evs = events(http, "/chat/completions", {"model": "tiny-up", "temperature": 0,
                                             "max_tokens": 300, **body})
    deltas = [c["delta"] for e in evs for c in e["choices"]]
    finish = next(c["finish_reason"] for e in evs for c in e["choices"] if c["finish_reason"])
    calls = [t for d in deltas for t in d.get("tool_calls") or []]
    return "".join(d.get("content") or "" for d in deltas), calls, finish


# -- response formats ------------------------------------------------------------------------
def test_json_object_in_chat_and_completions_streamed_or_not(http: httpx.Client) -> None:
    fmt = {"type": "json_object"}
    reply = chat(http, response_format=fmt).json()
    text = reply["choices"][0]["message"]["content"]
    assert isinstance(json.loads(text), dict)
    assert streamed_chat(http, response_format=fmt)[0] == text
    body = {"model": "tiny-up", "prompt": "Has Zhithdou:", "temperature": 0, "max_tokens": 300,
            "response_format": fmt}
    done = http.post("/completions", json=body).json()["choices"][0]
    assert isinstance(json.loads(done["text"]), dict) and done["finish_reason"] == "stop"
    parts = events(http, "/completions", body)
    assert "".join(c["text"] for e in parts for c in e["choices"]) == done["text"]


@pytest.mark.parametrize("strict", [True, False, None])
def test_json_schema_follows_the_schema(http: httpx.Client, strict: bool | None) -> None:
    spec: dict[str, Any] = {"name": "fact", "schema": Fact.model_json_schema()}
    if strict is not None:
        spec["strict"] = strict
    reply = chat(http, response_format={"type": "json_schema", "json_schema": spec}).json()
    text = reply["choices"][0]["message"]["content"]
    Fact.model_validate_json(text)
    assert streamed_chat(http, response_format={"type": "json_schema",
                                                "json_schema": spec})[0] == text


def test_llama_server_grammar_and_json_schema_fields(http: httpx.Client) -> None:
    grammar = 'root ::= " " [A-Z] [a-z]+ "."'
    for path, key in (("/completions", "prompt"), ("/chat/completions", "messages")):
        value = "Has Zhithdou was born in" if key == "prompt" else [
            {"role": "user", "content": QUESTION}]
        r = http.post(path, json={"model": "tiny-up", key: value, "grammar": grammar,
                                  "temperature": 0, "max_tokens": 40})
        assert r.status_code == 200, r.text
        choice = r.json()["choices"][0]
        text = choice.get("text", (choice.get("message") or {}).get("content"))
        assert text[0] == " " and text[1].isupper() and text.endswith(".") and text[2:-1].isalpha()
    r = http.post("/completions", json={"model": "tiny-up", "prompt": "Has Zhithdou",
                                        "json_schema": Fact.model_json_schema(),
                                        "temperature": 0, "max_tokens": 300})
    Fact.model_validate_json(r.json()["choices"][0]["text"])


@pytest.mark.parametrize(("body", "param", "words"), [
    ({"response_format": {"type": "json_schema", "json_schema": {
        "name": "x", "schema": {"type": "object", "properties": {"a": {"type": "wat"}}}}}},
     "response_format.json_schema.schema", "cannot turn the JSON schema"),
    ({"response_format": {"type": "json_schema", "json_schema": {
        "name": "x", "strict": True, "schema": {"type": "object", "properties": {
            "age": {"type": "integer", "multipleOf": 5}}}}}},
     "response_format.json_schema.schema", "strict but uses 'multipleOf' at "
     "schema.properties.age, which constrained decoding cannot enforce; drop it or set "
     "strict to false (without strict, the finished reply is checked against it)"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}},
     "response_format.json_schema", "schema"),
    ({"response_format": {"type": "yaml"}}, "response_format.type", "yaml"),
    ({"grammar": "root ::= ("}, "grammar", "invalid grammar"),
    ({"grammar": 'root ::= "a"', "response_format": {"type": "json_object"}}, "grammar",
     "not 'response_format' and 'grammar'"),
    ({"tools": [LOOKUP], "tool_choice": {"type": "function", "function": {"name": "nope"}}},
     "tool_choice", "'nope', which is not among the tools (lookup)"),
    ({"tool_choice": "required"}, "tool_choice", "needs 'tools'"),
    ({"tools": [LOOKUP], "grammar": 'root ::= "a"'}, "grammar", "exclude each other"),
    ({"tools": [{"type": "function", "function": {"name": "bad name"}}]},
     "tools[0].function.name", "letters, digits"),
    ({"tools": [{**WEATHER, "function": {**WEATHER["function"], "parameters": {
        "type": "object", "properties": {"x": {"type": "wat"}}}}}]},
     "tools[0].function.parameters", "cannot turn the JSON schema"),
])
def test_what_cannot_be_constrained_is_a_clear_400(http: httpx.Client, body: dict, param: str,
                                                   words: str) -> None:
    r = chat(http, **body)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == param and words in error["message"], error


def test_a_schema_keyword_not_enforced_passes_without_strict(http: httpx.Client) -> None:
    schema = {"type": "object", "properties": {"year": {"type": "integer", "minimum": 0}},
              "required": ["year"]}
    r = chat(http, response_format={"type": "json_schema",
                                    "json_schema": {"name": "y", "schema": schema}})
    assert r.status_code == 200
    assert isinstance(json.loads(r.json()["choices"][0]["message"]["content"])["year"], int)


# -- tools ---------------------------------------------------------------------------------------
def check_call(call: dict[str, Any], name: str) -> dict[str, Any]:
    assert call["type"] == "function" and call["id"].startswith("call_")
    assert call["function"]["name"] == name
    args = json.loads(call["function"]["arguments"])
    tool = {"lookup": LOOKUP, "weather": WEATHER}[name]["function"]["parameters"]
    assert set(tool["required"]) <= set(args) <= set(tool["properties"])
    return args


@pytest.mark.parametrize("choice", ["required", {"type": "function",
                                                 "function": {"name": "weather"}}])
def test_a_required_or_named_call_comes_back_in_openais_shape(http: httpx.Client,
                                                             choice: Any) -> None:
    reply = chat(http, tools=[LOOKUP, WEATHER], tool_choice=choice).json()
    message = reply["choices"][0]["message"]
    assert reply["choices"][0]["finish_reason"] == "tool_calls"
    assert message["content"] is None and len(message["tool_calls"]) == 1
    name = message["tool_calls"][0]["function"]["name"]
    if isinstance(choice, dict):
        assert name == "weather"
    args = check_call(message["tool_calls"][0], name)
    content, calls, finish = streamed_chat(http, tools=[LOOKUP, WEATHER], tool_choice=choice)
    assert content == "" and finish == "tool_calls" and len(calls) == 1
    assert calls[0]["index"] == 0 and json.loads(calls[0]["function"]["arguments"]) == args


def test_auto_may_answer_in_text_and_none_never_calls(http: httpx.Client) -> None:
    for choice in ("auto", None, "none"):
        extra = {} if choice is None else {"tool_choice": choice}
        reply = chat(http, tools=[LOOKUP], **extra).json()
        choice_ = reply["choices"][0]
        if choice_["message"].get("tool_calls"):
            assert choice != "none" and choice_["finish_reason"] == "tool_calls"
            check_call(choice_["message"]["tool_calls"][0], "lookup")
        else:
            assert choice_["message"]["content"] and choice_["finish_reason"] == "stop"
        content, calls, finish = streamed_chat(http, tools=[LOOKUP], **extra)
        assert (content or None) == choice_["message"]["content"]
        assert bool(calls) == bool(choice_["message"].get("tool_calls"))


def test_a_conversation_with_calls_and_results_goes_on(http: httpx.Client) -> None:
    first = chat(http, tools=[LOOKUP], tool_choice="required").json()["choices"][0]["message"]
    call = first["tool_calls"][0]
    messages = [{"role": "user", "content": QUESTION}, first,
                {"role": "tool", "tool_call_id": call["id"], "content": "Stainby"}]
    r = chat(http, tools=[LOOKUP], tool_choice="none", messages=messages, max_tokens=20)
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["message"]["content"]


def test_the_fallback_rendering_of_tools_calls_and_results() -> None:
    call = {"id": "call_7", "type": "function",
            "function": {"name": "lookup", "arguments": '{"person": "Has", "fact": "town"}'}}
    messages = [{"role": "system", "content": "Be brief."},
                {"role": "user", "content": QUESTION},
                {"role": "assistant", "content": None, "tool_calls": [call]},
                {"role": "tool", "tool_call_id": "call_7", "content": "Stainby"}]
    with load_session("tiny-up", options=LoadOptions(n_threads=1, n_ctx=1024)) as s:
        support = tool_support(s.template)
        assert (support.tools, support.calls, support.results) == (False, False, False)
        out, cards = structured.tool_messages(s.template, messages, [LOOKUP])
        assert cards is None
        assert out[0]["role"] == "system" and out[0]["content"].startswith("Be brief.\n\n")
        assert '{"name":"lookup","description":"Look up a fact about a person"' in \
            out[0]["content"]
        assert out[2] == {"role": "assistant", "content":
                          '{"name": "lookup", "arguments": {"person": "Has", "fact": "town"}}'}
        assert out[3] == {"role": "user", "content": "Result of lookup: Stainby"}
        text = s.detokenize(s.chat_tokens(messages, tools=[LOOKUP]))
        assert "Result of lookup: Stainby" in text and '"arguments"' in text


HERMES = (
    "{% if tools %}<|system|>Tools: {% for t in tools %}{{ t['function']['name'] }} "
    "{% endfor %}<|end|>{% endif %}"
    "{% for m in messages %}{% if m['role'] == 'tool' %}<|user|><tool_response>"
    "{{ m['content'] }}</tool_response><|end|>{% elif m.get('tool_calls') %}<|assistant|>"
    "{% for c in m['tool_calls'] %}<tool_call>\n{\"name\": \"{{ c['function']['name'] }}\", "
    "\"arguments\": {{ c['function']['arguments'] | tojson }}}\n</tool_call>{% endfor %}<|end|>"
    "{% else %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}")
"""A template that renders tools, calls and results as Hermes-style models are trained."""


@pytest.fixture(scope="module")
def hermes(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    d = tmp_path_factory.mktemp("hermes")
    models = (f"large_base={ggufs.write_model(d / 'l.gguf', seed=1, n_embd=64)}",
              f"small_ft={ggufs.write_model(d / 'f.gguf', seed=2, template=HERMES)}",
              f"small_base={ggufs.write_model(d / 'b.gguf', seed=3)}")
    with serving(models=models, n_ctx=1024) as s:
        yield s


def test_a_template_that_renders_tools_gets_them_and_its_call_tags(hermes: Served) -> None:
    support = tool_support(HERMES)
    assert (support.tools, support.calls, support.results) == (True, True, True)
    with httpx.Client(base_url=hermes.v1, timeout=120) as http:
        body = {"model": "command-line", "messages": [{"role": "user", "content": "hi"}],
                "tools": [LOOKUP], "tool_choice": "required", "temperature": 0,
                "max_tokens": 400}
        reply = http.post("/chat/completions", json=body).json()
        assert reply["choices"][0]["finish_reason"] == "tool_calls", reply
        call = reply["choices"][0]["message"]["tool_calls"][0]
        check_call(call, "lookup")
        history = [*body["messages"], reply["choices"][0]["message"],
                   {"role": "tool", "tool_call_id": call["id"], "content": "Stainby"}]
        r = http.post("/chat/completions", json={**body, "messages": history,
                                                 "tool_choice": "none", "max_tokens": 5})
        assert r.status_code == 200, r.text
    session = hermes.runner.session
    assert session is not None
    text = session.detokenize(session.chat_tokens(history, tools=[LOOKUP]))
    assert "Tools: lookup" in text and "<tool_response>Stainby</tool_response>" in text
    assert '<tool_call>\n{"name": "lookup", "arguments": {' in text
    plan = structured.tool_plan([LOOKUP], "required")
    assert plan is not None and plan.grammar(call_shape(HERMES)).startswith(
        'root ::= "<tool_call>" eft-ws tool-call eft-ws "</tool_call>"')


def test_tool_plans_parse_only_whole_calls_of_known_tools() -> None:
    plan = structured.tool_plan([LOOKUP, WEATHER], "auto")
    assert plan is not None
    bare, tagged = FALLBACK, CallShape(prefix="<tool_call>", suffix="</tool_call>")
    good = '{"name": "weather", "arguments": {"town": "Stainby"}}'
    assert plan.parse(good, bare)[0]["function"]["arguments"] == '{"town": "Stainby"}'
    assert plan.parse(f"<tool_call>\n{good}\n</tool_call>", tagged) is not None
    assert plan.parse(good, tagged) is None  # a template that renders no call: tags needed
    assert plan.parse(good[:-3], bare) is None  # cut short by the token limit: text
    assert plan.parse('{"name": "rain", "arguments": {}}', bare) is None
    assert plan.parse("Stainby", bare) is None
    assert plan.may_be_call("  {", bare) and plan.may_be_call("", bare)
    assert not plan.may_be_call("Stain", bare)
    assert plan.may_be_call("<tool", tagged) and not plan.may_be_call("{", tagged)


def test_strictness_names_the_first_keyword_a_grammar_cannot_enforce() -> None:
    assert structured.unenforced(Fact.model_json_schema()) is None
    nested = {"type": "object", "properties": {"a": {"type": "array", "items": {
        "type": "object", "properties": {"b": {"type": "number", "multipleOf": 2}}}}}}
    assert structured.unenforced(nested) == "'multipleOf' at schema.properties.a.items" \
        ".properties.b"
    assert structured.unenforced({"type": "string", "format": "email"}) == \
        "'format' 'email' at schema"
    assert structured.unenforced({"type": "string", "format": "date"}) is None


def test_tools_with_a_response_format_allow_a_call_or_the_structured_reply(
        http: httpx.Client) -> None:
    fmt = {"type": "json_schema", "json_schema": {"name": "fact", "schema":
                                                  Fact.model_json_schema()}}
    for choice in ("auto", "none"):
        reply = chat(http, tools=[LOOKUP], tool_choice=choice, response_format=fmt).json()
        message = reply["choices"][0]["message"]
        if message.get("tool_calls"):
            assert choice == "auto"
            check_call(message["tool_calls"][0], "lookup")
        else:
            Fact.model_validate_json(message["content"])
    reply = chat(http, tools=[LOOKUP], tool_choice="required", response_format=fmt).json()
    check_call(reply["choices"][0]["message"]["tool_calls"][0], "lookup")
