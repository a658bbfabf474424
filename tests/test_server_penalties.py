"""Penalties and logit bias through the server, as the clients people run send them: the
openai client (OpenAI's fields, llama-server's in ``extra_body``), LangChain's
``ChatOpenAI`` and simonw/llm's options; the same reply as the CLI's options and the
library's keywords give; bad values are 400s naming the field."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from eft_local.sampler import SamplerSettings
from eft_local.server.protocol import parse_chat
from eft_local.session import load_session
from tests.clihelp import THREADS, run, stdout
from tests.servehelp import Served, serving_bundled

QUESTION = "Tell me about Has Zhithdou."
"""A question the family answers with a token of its prompt: a penalty changes the reply."""


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    with serving_bundled(tmp_path_factory) as s:
        yield s


@pytest.fixture
def client(served: Served) -> openai.OpenAI:
    return openai.OpenAI(base_url=served.v1, api_key="unused", max_retries=0, timeout=60)


def reply(client: openai.OpenAI, **kwargs: object) -> str:
    out = client.chat.completions.create(
        model="tiny-up", messages=[{"role": "user", "content": QUESTION}], temperature=0,
        max_tokens=16, **kwargs)  # type: ignore[call-overload]
    return out.choices[0].message.content or ""


def first_token(served: Served, text: str) -> int:
    got = httpx.post(served.url + "/tokenize", json={"content": text}).json()
    return got["tokens"][0]


def test_openai_penalties_change_the_greedy_reply_and_equal_the_cli(
        served: Served, client: openai.OpenAI) -> None:
    plain = reply(client)
    penalised = reply(client, frequency_penalty=2.0, presence_penalty=2.0)
    assert penalised != plain
    streamed = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(
        model="tiny-up", messages=[{"role": "user", "content": QUESTION}], temperature=0,
        max_tokens=16, frequency_penalty=2.0, presence_penalty=2.0, stream=True) if c.choices)
    assert streamed == penalised
    cli = run(["generate", "tiny-up", QUESTION, "-t", "0", "--max-tokens", "16", *THREADS,
               "--frequency-penalty", "2", "--presence-penalty", "2"])
    assert cli.exit_code == 0, cli.output
    assert stdout(cli)[:-1] == penalised


def test_logit_bias_bans_the_greedy_first_token(served: Served, client: openai.OpenAI) -> None:
    plain = reply(client)
    token = first_token(served, plain)
    banned = reply(client, logit_bias={str(token): -100})
    assert banned != plain and first_token(served, banned) != token
    # llama-server's list of pairs, with false to ban, gives the same reply
    assert reply(client, extra_body={"logit_bias": [[token, False]]}) == banned
    # biased up by 100, the token wins at every position
    piece = httpx.post(served.url + "/detokenize", json={"tokens": [token]}).json()["prompt"]
    assert reply(client, logit_bias={str(token): 100}) == piece * 16


def test_llama_server_fields_are_applied(client: openai.OpenAI) -> None:
    plain = reply(client)
    repeat = {"repeat_penalty": 3.0, "repeat_last_n": -1}
    assert reply(client, extra_body=repeat) != plain
    assert reply(client, extra_body={**repeat, "repeat_last_n": 0}) == plain  # 0: off
    dry = {"dry_multiplier": 5.0, "dry_allowed_length": 0, "dry_penalty_last_n": -1}
    changed = reply(client, extra_body=dry)
    assert changed != plain
    # text-generation-webui's breakers (JSON strings in one text) are llama-server's list
    assert reply(client, extra_body={**dry, "dry_sequence_breakers": '"\\n", ":"'}) == reply(
        client, extra_body={**dry, "dry_sequence_breakers": ["\n", ":"]})


def test_completions_take_the_same_fields(served: Served) -> None:
    body = {"model": "tiny-up", "prompt": "Has Zhithdou was born in", "temperature": 0,
            "max_tokens": 12}
    plain = httpx.post(served.v1 + "/completions", json=body, timeout=60).json()
    got = httpx.post(served.v1 + "/completions", json={**body, "repeat_penalty": 5.0,
                                                       "repeat_last_n": -1}, timeout=60).json()
    text = got["choices"][0]["text"]
    assert text != plain["choices"][0]["text"]
    s = load_session("tiny-up")
    try:
        library = s.generate("Has Zhithdou was born in", temperature=0, max_tokens=12,
                             repeat_penalty=5.0, repeat_last_n=-1).text
    finally:
        s.close()
    assert library == text


def test_langchain_sends_penalties_and_logit_bias(served: Served, client: openai.OpenAI
                                                  ) -> None:
    langchain_openai = pytest.importorskip("langchain_openai")
    os.environ.pop("LANGCHAIN_TRACING_V2", None)  # nothing leaves the machine
    token = first_token(served, reply(client))
    knobs = {"frequency_penalty": 1.5, "presence_penalty": 0.5, "logit_bias": {token: -100}}
    chat = langchain_openai.ChatOpenAI(base_url=served.v1, api_key="unused", model="tiny-up",
                                       temperature=0, max_tokens=16, max_retries=0, **knobs)
    assert chat.invoke(QUESTION).content == reply(client, **{
        **knobs, "logit_bias": {str(token): -100}})


def test_llm_options_send_penalties(served: Served, client: openai.OpenAI, tmp_path: Path,
                                    monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("llm")
    from click.testing import CliRunner
    from llm.cli import cli

    monkeypatch.setenv("LLM_USER_PATH", str(tmp_path))
    (tmp_path / "extra-openai-models.yaml").write_text(
        f"- model_id: eft\n  model_name: tiny-up\n  api_base: \"{served.v1}\"\n")
    token = first_token(served, reply(client))
    out = CliRunner().invoke(cli, ["-m", "eft", "-n", "--key", "unused", "-o", "temperature",
                                   "0", "-o", "max_tokens", "16", "-o", "frequency_penalty",
                                   "2", "-o", "logit_bias", json.dumps({str(token): -100}),
                                   QUESTION])
    assert out.exit_code == 0, out.output
    assert out.output.rstrip("\n") == reply(client, frequency_penalty=2.0,
                                            logit_bias={str(token): -100})


@pytest.mark.parametrize(("fields", "param", "words"), [
    ({"frequency_penalty": 3}, "frequency_penalty", ["[-2, 2]"]),
    ({"presence_penalty": "high"}, "presence_penalty", ["a number"]),
    ({"repeat_penalty": 0}, "repeat_penalty", ["above 0"]),
    ({"repeat_penalty": -1}, "repeat_penalty", ["[0, "]),
    ({"repeat_last_n": -2}, "repeat_last_n", ["[-1, "]),
    ({"repeat_last_n": 1.5}, "repeat_last_n", ["an integer"]),
    ({"dry_multiplier": -0.5}, "dry_multiplier", ["[0, "]),
    ({"dry_base": 0.5}, "dry_base", ["[1, "]),
    ({"dry_allowed_length": -1}, "dry_allowed_length", ["[0, "]),
    ({"dry_sequence_breakers": 5}, "dry_sequence_breakers", ["list of non-empty strings"]),
    ({"dry_sequence_breakers": ["x"] * 33}, "dry_sequence_breakers", ["at most 32"]),
    ({"logit_bias": {"hello": 1}}, "logit_bias", ["not a token id", "/tokenize"]),
    ({"logit_bias": {"5": 200}}, "logit_bias", ["[-100, 100]", "false"]),
    ({"logit_bias": {"5": True}}, "logit_bias", ["[-100, 100]"]),
    ({"logit_bias": "x"}, "logit_bias", ["token ids"]),
    ({"logit_bias": {"99999": -1}}, "logit_bias", ["outside the vocabulary", "0.."]),
])
def test_bad_values_are_400s_naming_the_field(served: Served, fields: dict, param: str,
                                              words: list[str]) -> None:
    for path, body in (("/chat/completions", {"messages": [{"role": "user", "content": "x"}]}),
                       ("/completions", {"prompt": "x"})):
        got = httpx.post(served.v1 + path, json={**body, "max_tokens": 2, **fields},
                         timeout=60)
        assert got.status_code == 400, got.text
        err = got.json()["error"]
        assert err["param"] == param, err
        assert all(word in err["message"] for word in words), err
        assert "\n" not in err["message"]


def test_each_client_form_reads_as_the_same_settings() -> None:
    def sampling(**fields: object) -> SamplerSettings:
        body = {"messages": [{"role": "user", "content": "x"}], "seed": 1, **fields}
        return parse_chat(body, SamplerSettings(), 0).common.sampling

    want = SamplerSettings(seed=1, logit_bias={5: -math.inf, 7: 2.5})
    assert sampling(logit_bias={"5": False, "7": 2.5}) == want  # OpenAI's object
    assert sampling(logit_bias=[[5, False], [7, 2.5]]) == want  # llama-server's pairs
    breakers = SamplerSettings(seed=1, dry_sequence_breakers=("\n", ":"))
    assert sampling(dry_sequence_breakers=["\n", ":"]) == breakers
    assert sampling(dry_sequence_breakers='"\\n", ":"') == breakers  # text-generation-webui
    assert sampling(dry_sequence_breakers='["\\n", ":"]') == breakers
    assert sampling(dry_sequence_breakers='"\\n"').dry_sequence_breakers == ("\n",)
    assert sampling(dry_sequence_breakers=[]).dry_sequence_breakers == ()
    assert sampling(repeat_last_n=-1, dry_penalty_last_n=-1).repeat_last_n == -1
