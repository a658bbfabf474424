"""Tool calls and reasoning in each chat template's own shape (:mod:`eft_local.callshape`):
found from real templates (tests/templates/), the reply grammar of each shape run through
llama.cpp's grammar engine, replies read back, and a streamed reply split into its
reasoning, text and call (:class:`eft_local.server.replies.ChatReply`)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from eft_local import structured
from eft_local.backend import Grammar, LlamaModel
from eft_local.callshape import FALLBACK, CallShape, call_shape, read_calls, short_id
from eft_local.server.replies import ChatReply
from eft_local.templates import render, tool_support
from tests import ggufs

TEMPLATES = Path(__file__).resolve().parent / "templates"
LOOKUP = {"type": "function", "function": {
    "name": "lookup", "description": "Look up a fact about a person",
    "parameters": {"type": "object", "properties": {
        "person": {"type": "string", "maxLength": 24},
        "year": {"type": "integer", "minimum": 1900, "maximum": 2100}},
        "required": ["person", "year"]}}}
ARGS = {"person": "Has Zhithdou", "year": 1987}


def template(name: str) -> str:
    return (TEMPLATES / f"{name}.jinja").read_text()


@pytest.mark.parametrize(("name", "want"), [
    ("llama-3.1", CallShape(arguments="parameters", rendered=True)),
    ("mistral-nemo", CallShape(prefix="[TOOL_CALLS]", listed=True, ids=True, short_ids=True,
                               rendered=True)),
    ("qwen-2.5", CallShape(prefix="<tool_call>", suffix="</tool_call>", rendered=True)),
    ("qwen-3", CallShape(prefix="<tool_call>", suffix="</tool_call>", rendered=True,
                         think=True)),
    ("deepseek-r1-distill", CallShape(think=True, think_open=True)),
    ("tiny", FALLBACK),
])
def test_the_shape_of_calls_is_found_by_rendering_the_template(name: str,
                                                               want: CallShape) -> None:
    text = ggufs.TEMPLATE if name == "tiny" else template(name)
    assert call_shape(text) == want


def test_mistral_gets_ids_it_takes_and_its_calls_render() -> None:
    text = template("mistral-nemo")
    support = tool_support(text)
    assert (support.tools, support.calls, support.results) == (True, True, True)
    call = {"id": "call_0123456789abcdef", "type": "function",
            "function": {"name": "lookup", "arguments": json.dumps(ARGS)}}
    messages = [{"role": "user", "content": "When was Has Zhithdou born?"},
                {"role": "assistant", "content": None, "tool_calls": [call]},
                {"role": "tool", "tool_call_id": call["id"], "content": "1987"}]
    out, cards = structured.tool_messages(text, messages, [LOOKUP])
    rendered = render(text, out, tools=cards)
    sid = short_id(call["id"])
    assert len(sid) == 9 and sid.isalnum() and short_id(call["id"]) == sid
    assert f'[TOOL_CALLS][{{"name": "lookup", "arguments": {{"person": "Has Zhithdou", ' \
           f'"year": 1987}}, "id": "{sid}"}}]' in rendered
    assert f'"call_id": "{sid}"' in rendered


# -- the grammar of each shape, through llama.cpp's engine --------------------------------------
@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> LlamaModel:
    path = ggufs.write_model(tmp_path_factory.mktemp("shape") / "m.gguf")
    return LlamaModel(path, n_ctx=64, n_threads=1)


BYTE = {chr(b): 5 + b for b in range(256)}  # ggufs' byte tokens follow its 5 specials


def accepts(model: LlamaModel, grammar: str, text: str) -> bool:
    """Whether ``grammar`` allows ``text`` whole, written one byte token at a time."""
    state = Grammar(model, grammar)
    for byte in text.encode("utf-8"):
        token = BYTE[chr(byte)]
        if not state.allowed([token])[0]:
            return False
        state.accept(token)
    return bool(state.allowed([1])[0])  # the end of the turn fits: the grammar is complete


def calls_in(shape: CallShape, reasoning: str = "") -> str:
    text = shape.call_text("lookup", ARGS, "abcdefghi")
    if shape.think_open:
        return f"{reasoning}\n</think>\n\n{text}"
    return f"<think>\n{reasoning}\n</think>\n\n{text}" if reasoning else text


@pytest.mark.parametrize("name", ["llama-3.1", "mistral-nemo", "qwen-2.5", "qwen-3",
                                  "deepseek-r1-distill"])
def test_each_shape_allows_its_own_calls_and_no_other(model: LlamaModel, name: str) -> None:
    shape = call_shape(template(name))
    plan = structured.tool_plan([LOOKUP], "auto")
    grammar = plan.grammar(shape)
    assert grammar is not None
    thought = "The user asks about <b>Has</b>; </thin is not the end."
    assert accepts(model, grammar, calls_in(shape, thought if shape.think else ""))
    if shape.think and not shape.think_open:
        assert accepts(model, grammar, calls_in(shape, thought))
        assert accepts(model, grammar, calls_in(shape))  # the block may be left out
    lead = "x" if shape.think_open else ""
    own = calls_in(shape, lead)
    required = structured.tool_plan([LOOKUP], "required").grammar(shape)
    assert required is not None and accepts(model, required, own)
    for other in (CallShape(arguments="parameters"), CallShape(prefix="<tool_call>",
                                                               suffix="</tool_call>"),
                  CallShape(prefix="[TOOL_CALLS]", listed=True, ids=True), FALLBACK):
        wrong = calls_in(CallShape(**{**other.__dict__, "think_open": shape.think_open}), lead)
        if wrong != own:  # a call must be one of the template's own
            assert not accepts(model, required, wrong), (name, wrong)
    bad = calls_in(shape, "x" if shape.think_open else "").replace("1987", "1800")
    assert not accepts(model, required, bad)  # the arguments' range holds
    answer = "He was born in 1987."
    assert accepts(model, grammar, (f"x</think>{answer}" if shape.think_open else answer))
    if not shape.think_open:
        assert not accepts(model, grammar, "{" + answer)  # text may not look like a call
    if shape.think and not shape.think_open:
        assert accepts(model, grammar, f"<think>hm</think>{answer}")
        assert not accepts(model, grammar, f"<think>hm</think><think>{answer}")


@settings(max_examples=60, deadline=None)
@given(body=st.text(alphabet="</think>ab \n", max_size=24))
def test_a_reasoning_block_holds_any_text_but_its_end_tag(model: LlamaModel,
                                                          body: str) -> None:
    grammar = structured.reply_grammar(CallShape(think=True), '"x"')
    assert grammar is not None
    assert accepts(model, grammar, f"<think>{body}</think>x") == ("</think>" not in body)


def test_a_required_call_after_an_open_block_must_close_it(model: LlamaModel) -> None:
    shape = call_shape(template("deepseek-r1-distill"))
    grammar = structured.tool_plan([LOOKUP], "required").grammar(shape)
    assert grammar is not None
    assert not accepts(model, grammar, shape.call_text("lookup", ARGS))
    assert accepts(model, grammar, "ok</think>" + shape.call_text("lookup", ARGS))


# -- replies read back -------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["llama-3.1", "mistral-nemo", "qwen-2.5"])
def test_calls_are_read_back_in_their_shape(name: str) -> None:
    shape = call_shape(template(name))
    text = shape.call_text("lookup", ARGS, "abcdefghi")
    assert read_calls(text, shape) == [{"name": "lookup", "arguments": ARGS,
                                        "id": "abcdefghi" if shape.ids else None}]
    plan = structured.tool_plan([LOOKUP], "required")
    calls = plan.parse(text, shape)
    assert calls is not None and json.loads(calls[0]["function"]["arguments"]) == ARGS
    if shape.ids:  # the model's own id comes back: it renders again as it was
        assert calls[0]["id"] == "abcdefghi"
    if shape.prefix == "[TOOL_CALLS]":  # a control token: its text is not in the reply
        assert read_calls(text.removeprefix("[TOOL_CALLS]"), shape) is not None


def chunks(text: str, cuts: list[int]) -> Iterator[dict[str, Any]]:
    """``text`` as generation chunks cut at ``cuts``; the last carries the finish."""
    points = [0, *sorted(c for c in cuts if 0 < c < len(text)), len(text)]
    for i, (a, b) in enumerate(zip(points, points[1:], strict=False)):
        yield {"text": text[a:b], "finish": "stop" if i == len(points) - 2 else None}


def read(reply: ChatReply, text: str, cuts: list[int]) -> dict[str, Any]:
    out: dict[str, Any] = {"text": "", "reasoning": "", "calls": None, "finish": None}
    for data in chunks(text, cuts):
        got = reply(data)
        out["text"] += got["text"]
        out["reasoning"] += got.get("reasoning") or ""
        out["calls"] = got.get("tool_calls") or out["calls"]
        out["finish"] = got["finish"] or out["finish"]
        if out["text"] and not got.get("tool_calls"):
            assert out["calls"] is None
    return out


@settings(max_examples=80, deadline=None)
@given(cuts=st.lists(st.integers(0, 200), max_size=12))
def test_a_streamed_reply_splits_into_reasoning_and_a_call_wherever_it_is_cut(
        cuts: list[int]) -> None:
    shape = call_shape(template("qwen-3"))
    plan = structured.tool_plan([LOOKUP], "auto")
    call = shape.call_text("lookup", ARGS)
    got = read(ChatReply(shape, plan), f"<think>\nWho is he?\n</think>\n\n{call}", cuts)
    assert got["reasoning"] == "Who is he?" and got["text"] == ""
    assert got["finish"] == "tool_calls" and json.loads(
        got["calls"][0]["function"]["arguments"]) == ARGS
    got = read(ChatReply(shape, plan), "<think>\nHm. <b>\n</think>\n\nHe was born in 1987.",
               cuts)
    assert (got["reasoning"], got["text"], got["calls"]) == ("Hm. <b>",
                                                              "He was born in 1987.", None)
    raw = "<think>\nHm.\n</think>\n\nHe was born in 1987."
    got = read(ChatReply(shape, plan, raw=True), raw, cuts)  # reasoning_format none
    assert (got["reasoning"], got["text"]) == ("", raw)
    got = read(ChatReply(shape, None), "Plain <thinking> words", cuts)
    assert (got["reasoning"], got["text"]) == ("", "Plain <thinking> words")


@settings(max_examples=40, deadline=None)
@given(cuts=st.lists(st.integers(0, 60), max_size=8))
def test_an_open_block_is_reasoning_until_it_closes(cuts: list[int]) -> None:
    shape = call_shape(template("deepseek-r1-distill"))
    got = read(ChatReply(shape, None), "Let me think.\n\n</think>\n\nThe answer is 4.", cuts)
    assert (got["reasoning"], got["text"]) == ("Let me think.", "The answer is 4.")
    got = read(ChatReply(shape, None), "Still thinking when the tokens ran out", cuts)
    assert (got["reasoning"], got["text"]) == ("Still thinking when the tokens ran out", "")


def test_a_call_is_checked_for_what_its_grammar_cannot_hold() -> None:
    tool = {"type": "function", "function": {"name": "pick", "parameters": {
        "type": "object", "properties": {"n": {"type": "integer", "multipleOf": 5},
                                         "tags": {"type": "array", "uniqueItems": True,
                                                  "items": {"type": "string"}}}}}}
    plan = structured.tool_plan([tool], "required")
    from functools import partial

    from eft_local.schema_check import violations
    reply = ChatReply(FALLBACK, plan, tool_checks={
        "pick": partial(violations, tool["function"]["parameters"])})
    out = reply({"text": '{"name": "pick", "arguments": {"n": 7, "tags": ["a", "a"]}}',
                 "finish": "stop"})
    assert out["finish"] == "tool_calls" and out["violations"] == [
        "pick: 'multipleOf' at schema.properties.n: reply.n is 7, not a multiple of 5",
        "pick: 'uniqueItems' at schema.properties.tags: reply.tags is [\"a\", \"a\"], with "
        "\"a\" twice"]


# -- over HTTP: random-weight models whose chat template is a published one -------------------
@pytest.fixture(scope="module", params=["llama-3.1", "mistral-nemo", "qwen-3"])
def shaped(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
           ) -> Iterator[tuple[str, Any]]:
    from tests.servehelp import serving

    d, text = tmp_path_factory.mktemp(request.param), template(request.param)
    models = (f"large_base={ggufs.write_model(d / 'l.gguf', seed=1, n_embd=64)}",
              f"small_ft={ggufs.write_model(d / 'f.gguf', seed=2, template=text)}",
              f"small_base={ggufs.write_model(d / 'b.gguf', seed=3)}")
    with serving(models=models, n_ctx=2048) as served:
        yield request.param, served


def post(served: Any, body: dict[str, Any]) -> dict[str, Any]:
    import httpx

    body = {"model": "command-line", "temperature": 0, "max_tokens": 200, **body}
    with httpx.Client(base_url=served.v1, timeout=120) as http:
        r = http.post("/chat/completions", json=body)
        assert r.status_code == 200, r.text
        whole = r.json()
        with http.stream("POST", "/chat/completions", json={**body, "stream": True}) as s:
            events = [json.loads(line[6:]) for line in s.iter_lines()
                      if line.startswith("data: {")]
    deltas = [c["delta"] for e in events for c in e["choices"]]
    whole["streamed"] = {
        "content": "".join(d.get("content") or "" for d in deltas),
        "reasoning_content": "".join(d.get("reasoning_content") or "" for d in deltas),
        "tool_calls": [t for d in deltas for t in d.get("tool_calls") or []],
        "finish": next(c["finish_reason"] for e in events for c in e["choices"]
                       if c["finish_reason"])}
    return whole


def test_a_call_comes_back_from_each_templates_shape_and_goes_on(
        shaped: tuple[str, Any]) -> None:
    name, served = shaped
    question = [{"role": "user", "content": "When was Has Zhithdou born?"}]
    reply = post(served, {"messages": question, "tools": [LOOKUP], "tool_choice": "required"})
    choice = reply["choices"][0]
    assert choice["finish_reason"] == "tool_calls", choice
    call = choice["message"]["tool_calls"][0]
    args = json.loads(call["function"]["arguments"])
    assert call["function"]["name"] == "lookup" and set(args) == {"person", "year"}
    assert 1900 <= args["year"] <= 2100  # the range in the tool's schema holds
    streamed = reply["streamed"]
    assert streamed["finish"] == "tool_calls" and json.loads(
        streamed["tool_calls"][0]["function"]["arguments"]) == args
    if name == "mistral-nemo":  # the model's own id: nine letters and digits
        assert len(call["id"]) == 9 and call["id"].isalnum()
    history = [*question, choice["message"],
               {"role": "tool", "tool_call_id": call["id"], "content": "1987"}]
    again = post(served, {"messages": history, "tools": [LOOKUP], "tool_choice": "none",
                          "max_tokens": 5})
    assert again["choices"][0]["message"]["content"] is not None
    session = served.runner.session
    text = session.detokenize(session.chat_tokens(history, tools=[LOOKUP]))
    written = {"llama-3.1": '{"name": "lookup", "parameters": ',
               "mistral-nemo": '[TOOL_CALLS][{"name": "lookup", "arguments": ',
               "qwen-3": '<tool_call>\n{"name": "lookup", "arguments": '}[name]
    assert written in text  # the history renders the call in the template's own shape


@pytest.fixture(scope="module")
def thinker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    from tests.servehelp import serving

    d = tmp_path_factory.mktemp("r1")
    r1 = template("deepseek-r1-distill")
    models = (f"large_base={ggufs.write_model(d / 'l.gguf', seed=1, n_embd=64)}",
              f"small_ft={ggufs.write_model(d / 'f.gguf', seed=2, template=r1)}",
              f"small_base={ggufs.write_model(d / 'b.gguf', seed=3)}")
    with serving(models=models, n_ctx=1024) as served:
        yield served


def test_reasoning_comes_back_as_reasoning_content_or_in_the_text(thinker: Any) -> None:
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 24}
    reply = post(thinker, body)
    message = reply["choices"][0]["message"]
    assert reply["choices"][0]["finish_reason"] == "length"  # a random model never closes it
    assert message["content"] == "" and message["reasoning_content"]
    assert reply["streamed"]["reasoning_content"] == message["reasoning_content"]
    assert reply["streamed"]["content"] == ""
    raw = post(thinker, {**body, "reasoning_format": "none"})
    assert "reasoning_content" not in raw["choices"][0]["message"]
    assert raw["choices"][0]["message"]["content"].strip() == message["reasoning_content"]
    assert raw["streamed"]["content"] == raw["choices"][0]["message"]["content"]
    import httpx

    with httpx.Client(base_url=thinker.v1, timeout=60) as http:
        r = http.post("/chat/completions", json={**body, "model": "command-line",
                                                 "reasoning_format": "hidden"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "reasoning_format"


def test_ollamas_think_puts_the_block_into_thinking(thinker: Any) -> None:
    import ollama

    client = ollama.Client(host=thinker.url, timeout=120)
    ask = {"model": "command-line", "messages": [{"role": "user", "content": "hi"}],
           "options": {"temperature": 0, "num_predict": 24}}
    thought = client.chat(**ask, think=True)
    assert thought.message.content == "" and thought.message.thinking
    parts = list(client.chat(**ask, think=True, stream=True))
    assert "".join(p.message.thinking or "" for p in parts) == thought.message.thinking
    plain = client.chat(**ask)  # unset: the text keeps the block, as before
    assert plain.message.thinking is None
    assert plain.message.content.strip() == thought.message.thinking
    made = client.generate(model="command-line", prompt="hi", think=True,
                           options=ask["options"])
    assert made.thinking == thought.message.thinking and made.response == ""
    with pytest.raises(ollama.ResponseError, match="levels are not applied"):
        client.chat(**ask, think="high")
