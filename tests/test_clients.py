"""Structured output and tools as the clients people run ask for them: the official openai
client's ``beta.chat.completions.parse``, LangChain's ``with_structured_output`` and
``bind_tools``, simonw/llm's ``-o json_object 1``; against the tiny family and against
random-weight models (under a grammar a random model still writes valid, parsed objects:
that is the grammar's job; the schemas bound their strings and arrays, so that a random
model also reaches the end)."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Literal

import openai
import pytest
from pydantic import BaseModel, Field

from eft_local.server.app import ServerOptions
from tests import ggufs
from tests.servehelp import Served, serving_bundled
from tests.shapes import Birth, Shape

QUESTION = "What is the home town of Has Zhithdou? Answer in JSON."


class Lookup(BaseModel):
    """Look up a fact about a person."""

    person: str = Field(max_length=24)
    fact: Literal["town", "year", "profession"]


@pytest.fixture(scope="module", params=["family", "random"])
def served(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
           ) -> Iterator[tuple[Served, str]]:
    """``tiny-up``, or random-weight models (served with seed 0 for requests without one)."""
    if request.param == "family":
        with serving_bundled(tmp_path_factory, n_ctx=1024) as s:
            yield s, "tiny-up"
    else:
        d = tmp_path_factory.mktemp("random")
        models = (f"large_base={ggufs.write_model(d / 'l.gguf', seed=1, n_embd=64)}",
                  f"small_ft={ggufs.write_model(d / 'f.gguf', seed=2)}",
                  f"small_base={ggufs.write_model(d / 'b.gguf', seed=3)}")
        with serving_bundled(tmp_path_factory, models=models, n_ctx=2048,
                             options=ServerOptions(seed=0)) as s:
            yield s, "command-line"


def test_openai_parse(served: tuple[Served, str]) -> None:
    server, model = served
    client = openai.OpenAI(base_url=server.v1, api_key="unused", max_retries=0, timeout=120)
    for temperature in (0.0, 1.0):
        reply = client.beta.chat.completions.parse(
            model=model, messages=[{"role": "user", "content": QUESTION}], response_format=Shape,
            temperature=temperature, seed=5, max_tokens=900)
        message = reply.choices[0].message
        assert isinstance(message.parsed, Shape), message.content
        assert Shape.model_validate_json(message.content) == message.parsed


def test_openai_parse_with_number_ranges(served: tuple[Served, str]) -> None:
    """pydantic's ``Field(ge=0, le=3000)`` reaches the server as a strict schema's
    ``minimum``/``maximum``: the grammar holds the range (it was a 400 before)."""
    server, model = served
    client = openai.OpenAI(base_url=server.v1, api_key="unused", max_retries=0, timeout=120)
    for temperature in (0.0, 1.0):
        reply = client.beta.chat.completions.parse(
            model=model, messages=[{"role": "user", "content": "When was Has Zhithdou born?"}],
            response_format=Birth, temperature=temperature, seed=5, max_tokens=600)
        birth = reply.choices[0].message.parsed
        assert isinstance(birth, Birth), reply.choices[0].message.content
        assert birth.in_range()
        assert "schema_violations" not in (reply.model_extra or {}).get("eft", {})


def test_langchain_structured_output_and_tools(served: tuple[Served, str]) -> None:
    langchain_openai = pytest.importorskip("langchain_openai")
    server, model = served
    os.environ.pop("LANGCHAIN_TRACING_V2", None)  # nothing leaves the machine
    chat = langchain_openai.ChatOpenAI(base_url=server.v1, api_key="unused", model=model,
                                       temperature=1.0, seed=7, max_tokens=900, max_retries=0)
    for method in ("json_schema", "function_calling"):
        shape = chat.with_structured_output(Shape, method=method).invoke(QUESTION)
        assert isinstance(shape, Shape), method
        birth = chat.with_structured_output(Birth, method=method, strict=True).invoke(
            "When was Has Zhithdou born?")
        assert isinstance(birth, Birth) and birth.in_range(), method
    reply = chat.bind_tools([Lookup], tool_choice="required").invoke(QUESTION)
    assert len(reply.tool_calls) == 1 and reply.tool_calls[0]["name"] == "Lookup"
    Lookup(**reply.tool_calls[0]["args"])
    named = chat.bind_tools([Lookup, Shape], tool_choice="Shape").invoke(QUESTION)
    assert named.tool_calls[0]["name"] == "Shape"
    Shape(**named.tool_calls[0]["args"])
    ranged = chat.bind_tools([Birth], tool_choice="Birth", strict=True).invoke(QUESTION)
    assert Birth(**ranged.tool_calls[0]["args"]).in_range()


def test_llm_json_object(served: tuple[Served, str], tmp_path: Path,
                         monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("llm")
    from click.testing import CliRunner
    from llm.cli import cli

    server, model = served
    monkeypatch.setenv("LLM_USER_PATH", str(tmp_path))
    (tmp_path / "extra-openai-models.yaml").write_text(
        f"- model_id: eft\n  model_name: {model}\n  api_base: \"{server.v1}\"\n"
        "  supports_schema: true\n")
    sampling = ["-o", "temperature", "0"] if model == "tiny-up" else ["-o", "seed", "0"]
    if model == "tiny-up":
        # an object of any shape has no bound: the family ends it at temperature 0; a random
        # model ends it only by chance (which draws do depends on the CPU's arithmetic), so
        # it is held to the bounded schema below
        out = CliRunner().invoke(cli, ["-m", "eft", "-o", "json_object", "1", *sampling,
                                       "-o", "max_tokens", "1900", "-n", "--key", "unused",
                                       QUESTION])
        assert out.exit_code == 0, out.output
        assert isinstance(json.loads(out.output), dict)
    schema = {"type": "object", "properties": {"town": {"type": "string", "maxLength": 16},
                                               "year": {"type": "integer"}},
              "required": ["town", "year"]}
    out = CliRunner().invoke(cli, ["-m", "eft", "--schema", json.dumps(schema), *sampling,
                                   "-o", "max_tokens", "1900", "-n", "--key", "unused",
                                   QUESTION])
    assert out.exit_code == 0, out.output
    data = json.loads(out.output)
    assert set(data) == {"town", "year"} and isinstance(data["year"], int)
