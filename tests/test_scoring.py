"""Session.score and ``eft-local score``: one batched evaluation per model, checked against
step-by-step evaluation of each model alone and against generate --json's log-probs."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from eft_local import backend, sampler
from eft_local.sampler import SamplerSettings
from eft_local.scoring import window_spans
from eft_local.session import LoadOptions, Session, load_session
from tests.clihelp import THREADS, assert_one_line_error, run, stdout

TEXT = "Has Zhithdou was born in Shathstead. Hello there, the other one."


def stepwise(session: Session, tokens: list[int], conservative: float | None = None
             ) -> list[float]:
    """Each model alone, fresh, one token at a time; the mix recomputed from those rows."""
    rows = []
    for role in session.engine.roles:
        model = backend.LlamaModel(session.models[role].path, n_ctx=256)
        try:
            rows.append([model.eval([t])[-1][: session.engine.width] for t in tokens[:-1]])
        finally:
            model.close()
    weights = session.weights()
    ref = session.engine.index(session.conservative_role())
    out = []
    for i, token in enumerate(tokens[1:]):
        step = np.stack([r[i] for r in rows])
        mixed = (sampler.mix_logits(step, weights, session.report.allowed) if conservative is None
                 else sampler.conservative_mix(step, weights, ref, conservative,
                                               session.report.allowed))
        out.append(float(mixed[token]))
    return out


@pytest.mark.parametrize(("beta", "conservative"), [(1.0, None), (1.7, None), (1.0, 0.9)])
def test_score_equals_each_model_stepped_alone(family, beta: float,
                                               conservative: float | None) -> None:
    with load_session(models=family.pairs(), params={"beta": beta},
                      sampling=SamplerSettings(temperature=0.3, top_k=3,
                                               conservative_top_p=conservative),
                      options=LoadOptions(n_threads=1)) as s:
        tokens = s.tokenize(TEXT)
        got = s.score(tokens, per_model=True)
        want = stepwise(s, tokens, conservative)
    assert [t.token for t in got.tokens] == tokens
    assert got.tokens[0].logprob is None
    assert np.allclose([t.logprob for t in got.tokens[1:]], want, atol=1e-4)
    assert got.count == len(tokens) - 1
    assert math.isclose(got.logprob, sum(want), abs_tol=1e-3)
    assert math.isclose(got.perplexity, math.exp(-sum(want) / len(want)), rel_tol=1e-3)


def test_score_on_the_bundled_family_equals_stepwise() -> None:
    with load_session("tiny-up", options=LoadOptions(n_threads=1)) as s:
        tokens = s.tokenize("Has Zhithdou was born in")
        got = s.score(tokens, top_n=3, per_model=True)
        want = stepwise(s, tokens)
        assert np.allclose([t.logprob for t in got.tokens[1:]], want, atol=1e-4)
        for t in got.tokens[1:]:
            assert len(t.top) == 3 and t.top[0][1] >= t.top[1][1] >= t.top[2][1]
            assert t.top[0][1] >= t.logprob - 1e-6
            assert set(t.model_logprobs) == {"large_base", "small_ft", "small_base"}


def test_generate_json_logprobs_equal_the_score(family) -> None:
    result = run(["generate", *family.trio(), "--raw", "--json", "--max-tokens", "8", "--seed", "3",
                  "--beta", "1.5", *THREADS, "Has Zhithdou was"])
    assert result.exit_code == 0, result.output
    record = json.loads(stdout(result))
    steps = record["tokens"]
    assert steps
    with load_session(models=family.pairs(), params={"beta": 1.5},
                      options=LoadOptions(n_threads=1)) as s:
        prompt = s.tokenize("Has Zhithdou was")
        got = s.score(prompt + [step["token"] for step in steps])
    scored = got.tokens[len(prompt):]
    assert [t.position for t in scored] == [step["position"] for step in steps]
    assert np.allclose([t.logprob for t in scored], [math.log(step["p_mix"]) for step in steps],
                       atol=1e-4)


def test_stream_logprobs_equal_the_score(family) -> None:
    with load_session(models=family.pairs(), sampling=SamplerSettings(temperature=0.7),
                      options=LoadOptions(n_threads=1)) as s:
        prompt = s.tokenize(TEXT)
        steps = [c.step for c in s.stream(prompt, max_tokens=6, top_n=2) if c.step]
        got = s.score(prompt + [st.token for st in steps], top_n=2)
    scored = got.tokens[len(prompt):]
    assert np.allclose([t.logprob for t in scored], [st.logprob for st in steps], atol=1e-4)
    assert [[i for i, _ in t.top] for t in scored] == [[i for i, _ in st.top] for st in steps]


@pytest.mark.parametrize(("n_tokens", "n_ctx"), [(5, 256), (255, 256), (256, 256),
                                                 (1000, 256), (4097, 300)])
def test_windows_score_every_position_once_within_the_context(n_tokens: int, n_ctx: int
                                                              ) -> None:
    plan = window_spans(n_tokens, n_ctx)
    scored = [p for _, first, end in plan for p in range(first, end)]
    assert scored == list(range(1, n_tokens))
    assert all(end - start <= n_ctx - 1 for start, _, end in plan)
    assert all(first - start == (n_ctx - 1) // 2 for start, first, _ in plan[1:])


def test_long_text_is_scored_in_windows_with_a_note(family) -> None:
    with load_session(models=family.pairs(), options=LoadOptions(n_threads=1)) as s:
        tokens = (s.tokenize(TEXT) * 12)[:400]
        got = s.score(tokens)
        assert got.windows == 3 and got.notes and "3 windows" in got.notes[0]
        assert [t.token for t in got.tokens] == tokens
        head = s.score(tokens[:255])
        start, first, end = window_spans(len(tokens), s.engine.n_ctx)[1]
        part = s.score(tokens[start:end])
    assert np.allclose([t.logprob for t in got.tokens[1:255]],
                       [t.logprob for t in head.tokens[1:]], atol=1e-5)
    assert np.allclose([t.logprob for t in got.tokens[first:end]],
                       [t.logprob for t in part.tokens[first - start:]], atol=1e-5)


def test_bad_token_ids_are_refused(family) -> None:
    with load_session(models=family.pairs(), options=LoadOptions(n_threads=1)) as s:
        with pytest.raises(Exception, match="outside the vocabulary"):
            s.score([1, 2, 99999])
        with pytest.raises(Exception, match="nothing to score"):
            s.score([])


def test_cli_score_argument_stdin_and_json(family) -> None:
    with load_session(models=family.pairs(), options=LoadOptions(n_threads=1)) as s:
        want = s.score(TEXT)
    out = run(["score", *family.trio(), *THREADS, TEXT])
    assert out.exit_code == 0, out.output
    assert stdout(out) == (f"logprob {want.logprob:.4f}  tokens {want.count}  perplexity "
                           f"{want.perplexity:.4f}\n")
    piped = run(["score", *family.trio(), *THREADS], input=TEXT + "\n")
    assert stdout(piped) == stdout(out)
    js = run(["score", *family.trio(), *THREADS, "--json", "--top", "2", TEXT])
    record = json.loads(stdout(js))
    assert math.isclose(record["logprob"], want.logprob, abs_tol=1e-6)
    assert record["scored_tokens"] == want.count and record["windows"] == 1
    assert [t["logprob"] for t in record["token_scores"][1:]] == [t.logprob
                                                                  for t in want.tokens[1:]]
    assert len(record["token_scores"][1]["top"]) == 2


def test_cli_score_batch_resumes_and_reports_bad_records(family, tmp_path: Path) -> None:
    src = tmp_path / "in.jsonl"
    src.write_text('{"id": "a", "text": "Hello there"}\n{"id": "b"}\n'
                   '{"id": "c", "text": "the other one"}\n')
    dst = tmp_path / "out.jsonl"
    first = run(["score", *family.trio(), *THREADS, "--input", str(src), "--output", str(dst)])
    assert first.exit_code == 0, first.output
    records = [json.loads(line) for line in dst.read_text().splitlines()]
    assert [r["id"] for r in records] == ["a", "b", "c"]
    assert "error" in records[1] and "'text'" in records[1]["error"]
    assert records[0]["scored_tokens"] > 0 and records[2]["logprob"] < 0
    src.write_text('{"id": "a", "text": "Hello there"}\n{"id": "d", "text": "more"}\n')
    again = run(["score", *family.trio(), *THREADS, "--input", str(src), "--output", str(dst)])
    assert again.exit_code == 0 and "1 already done" in again.stderr, again.stderr
    assert [json.loads(line)["id"] for line in dst.read_text().splitlines()] == [
        "a", "b", "c", "d"]


def test_cli_score_bad_input_is_one_line(family) -> None:
    assert_one_line_error(run(["score", *family.trio(), *THREADS, ""]), "empty")
    assert_one_line_error(run(["score", *family.trio(), *THREADS, "--output", "x.jsonl", "hi"]),
                          "--output")


def test_cli_score_batch_lone_surrogates_are_error_records(family, tmp_path: Path) -> None:
    # a lone surrogate in an id or a text is valid JSON but cannot be written as UTF-8
    src = tmp_path / "in.jsonl"
    src.write_text('{"id": "\\ud800", "text": "hello there"}\n'
                   '{"id": "b", "text": "hi \\udc00"}\n{"id": "c", "text": "the other one"}\n')
    dst = tmp_path / "out.jsonl"
    result = run(["score", *family.trio(), *THREADS, "--input", str(src), "--output", str(dst)])
    assert result.exit_code == 0, result.output
    assert "internal error" not in result.output
    records = [json.loads(line) for line in dst.read_text().splitlines()]
    assert [r["id"] for r in records] == [None, "b", "c"]
    assert "surrogate" in records[0]["error"] and "surrogate" in records[1]["error"]
    assert records[2]["logprob"] < 0
