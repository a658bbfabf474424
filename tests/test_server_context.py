"""The server with long chats (the context policy), model names and cards, unused knobs and
the default preset."""

from __future__ import annotations

import json
from collections.abc import Iterator

import httpx
import pytest

from eft_local.server.app import ServerOptions
from eft_local.session import LoadOptions, load_session
from tests.servehelp import Served, serving, serving_bundled

QUESTION = "What is the home town of Has Zhithdou?"


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    with serving_bundled(tmp_path_factory) as s:
        yield s


def long_chat() -> list[dict[str, str]]:
    """A system prompt, four exchanges and a question: more than tiny-up's 256 tokens."""
    messages = [{"role": "system", "content": "Answer with one word."}]
    for name in ("Thos Draisquun", "Shel Zhithdou", "Nim Zhithdou", "Has Zhithdou"):
        messages += [{"role": "user", "content": f"Tell me everything you know about {name}, "
                      "where they live and what they do."},
                     {"role": "assistant", "content": f"{name} is someone I know a little "
                      "about: a person of the world of the tiny family."}]
    return [*messages, {"role": "user", "content": QUESTION}]


def post(served: Served, body: dict, path: str = "/chat/completions") -> httpx.Response:
    return httpx.post(served.v1 + path, json=body, timeout=60)


def error(response: httpx.Response, status: int) -> dict:
    assert response.status_code == status, response.text
    return response.json()["error"]


# -- long chats ------------------------------------------------------------------------------
def test_a_chat_longer_than_the_context_drops_its_oldest_turns(served: Served) -> None:
    messages = long_chat()
    with load_session("tiny-up", options=LoadOptions(n_threads=1)) as s:
        assert len(s.chat_tokens(messages)) > s.n_ctx
        tokens, kept, dropped = s.fit_chat(messages, max_tokens=8)
    assert dropped >= 2 and kept[0] == messages[0] and kept[-1] == messages[-1]
    body = {"model": "tiny-up", "messages": messages, "max_tokens": 8, "temperature": 0}
    reply = post(served, body)
    assert reply.status_code == 200, reply.text
    data = reply.json()
    assert data["eft"]["dropped_messages"] == dropped
    assert data["usage"]["prompt_tokens"] == len(tokens)
    line = [x for x in served.logs if "dropped the" in x][-1]
    assert f"dropped the {dropped} oldest message(s) to fit the context" in line
    same = post(served, {**body, "messages": kept}).json()  # what was kept, sent as is
    assert "dropped_messages" not in same["eft"]
    assert same["choices"][0]["message"]["content"] == data["choices"][0]["message"]["content"]
    assert data["choices"][0]["message"]["content"] == "Stainby"


def test_streamed_long_chats_say_so_in_the_first_chunk(served: Served) -> None:
    body = {"model": "tiny-up", "messages": long_chat(), "max_tokens": 4, "stream": True}
    with httpx.stream("POST", served.v1 + "/chat/completions", json=body, timeout=60) as r:
        assert r.status_code == 200
        first = json.loads(next(r.iter_lines())[6:])
    assert first["eft"]["dropped_messages"] >= 2


def test_context_overflow_error_keeps_the_400(served: Served) -> None:
    body = {"model": "tiny-up", "messages": long_chat(), "max_tokens": 8,
            "eft": {"context_overflow": "error"}}
    err = error(post(served, body), 400)
    assert err["code"] == "context_length_exceeded" and err["param"] == "messages"
    assert "the conversation needs" in err["message"]


@pytest.mark.parametrize("policy", ["truncate", "error"])
def test_a_message_that_cannot_fit_alone_is_400_under_either_policy(served: Served,
                                                                   policy: str) -> None:
    body = {"messages": [{"role": "user", "content": "x " * 400}],
            "eft": {"context_overflow": policy}}
    assert error(post(served, body), 400)["code"] == "context_length_exceeded"


@pytest.mark.parametrize(("path", "body", "words"), [
    ("/chat/completions", {"messages": [{"role": "user", "content": "x"}],
                           "eft": {"context_overflow": "sideways"}}, "\"truncate\""),
    ("/completions", {"prompt": "x", "eft": {"context_overflow": "truncate"}},
     "chat completions"),
])
def test_bad_context_overflow_values_are_400(served: Served, path: str, body: dict,
                                             words: str) -> None:
    err = error(post(served, body, path), 400)
    assert err["param"] == "eft.context_overflow" and words in err["message"]


def test_the_servers_policy_is_the_default_and_a_request_may_change_it() -> None:
    with serving("tiny-up", options=ServerOptions(context_overflow="error")) as s:
        body = {"messages": long_chat(), "max_tokens": 4}
        assert error(post(s, body), 400)["code"] == "context_length_exceeded"
        body["eft"] = {"context_overflow": "truncate"}
        reply = post(s, body)
        assert reply.status_code == 200 and reply.json()["eft"]["dropped_messages"] >= 2


# -- model names, cards and knobs --------------------------------------------------------------
def test_models_lists_each_preset_once(served: Served) -> None:
    ids = [m["id"] for m in httpx.get(served.v1 + "/models").json()["data"]]
    assert "tiny-up" in ids and "tiny-mix" in ids
    assert not any("@" in i for i in ids) and len(ids) == len(set(ids))


@pytest.mark.parametrize("name", ["tiny-up", "tiny-up@beta=1.5", "tiny-mix@lam=0.3",
                                  "tiny-mix@beta=2,lambda=0.25", "tiny-up@lam=1",
                                  "tiny-small-ft@beta=2", "tiny-up@beta=x", "nobody",
                                  "nobody@beta=1"])
def test_a_model_card_exists_for_every_name_chat_accepts(served: Served, name: str) -> None:
    card = httpx.get(f"{served.v1}/models/{name}")
    body = {"model": name, "messages": [{"role": "user", "content": QUESTION}],
            "max_tokens": 1}
    chat = post(served, body)
    assert (card.status_code == 200) == (chat.status_code == 200), (card.text, chat.text)
    if card.status_code == 200:
        data = card.json()
        assert data["id"] == name and data["object"] == "model"
        assert {k: data["eft"][k] for k in chat.json()["eft"]["params"]} == chat.json()[
            "eft"]["params"]
    else:
        assert card.status_code == 404 and card.json()["error"]["code"] == "model_not_found"


@pytest.mark.parametrize(("body", "param"), [
    ({"model": "tiny-up", "eft": {"lambda": 0.3}}, "eft.lambda"),
    ({"model": "tiny-up", "eft": {"lam": 0.3}}, "eft.lam"),
    ({"model": "tiny-up@lam=0.3"}, "model"),
    ({"model": "tiny-small-ft", "eft": {"beta": 2}}, "eft.beta"),
    ({"model": "tiny-up", "eft": {"formula": "small_ft", "beta": 2}}, "eft.beta"),
])
def test_a_knob_the_formula_does_not_use_is_400(served: Served, body: dict, param: str
                                                ) -> None:
    body = {**body, "messages": [{"role": "user", "content": QUESTION}], "max_tokens": 1}
    err = error(post(served, body), 400)
    assert err["param"] == param and "does not use" in err["message"]


def test_a_knob_of_the_requests_own_formula_is_used(served: Served) -> None:
    body = {"model": "tiny-up", "messages": [{"role": "user", "content": QUESTION}],
            "max_tokens": 1, "eft": {"formula": "large_base + lam * (small_ft - small_base)",
                                     "lambda": 2}}
    reply = post(served, body)
    assert reply.status_code == 200, reply.text
    assert reply.json()["eft"]["params"] == {"lam": 2.0}


def test_a_request_without_a_model_gets_the_servers_default_preset(served: Served) -> None:
    question = [{"role": "user", "content": QUESTION}]
    other = post(served, {"model": "tiny-small-ft", "messages": question, "max_tokens": 1})
    assert other.json()["eft"]["preset"] == "tiny-small-ft"
    plain = post(served, {"messages": question, "max_tokens": 1})
    assert plain.status_code == 200 and plain.json()["eft"]["preset"] == "tiny-up"
