"""The OpenAI path against vLLM's protocol (issue 25): a double written from vLLM 0.32.0's
source (tests/vllm_double.py) serving the family's large base, the small pair local.

Alignment accepts it (no vocabulary type; byte tokens read as U+FFFD compared as text), a
second start reads no vocabulary (its model card changes on every call), the top-K rows
at K = the vocabulary give the all-local tokens, its max_logprobs error is shown at start,
a negative-weight role served top-K is warned about, and placeholders (-9999.0) are
never drawn.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest

from eft_local.errors import EftError
from eft_local.loading import check_models
from eft_local.presets import FAMILY_DIR
from eft_local.session import LoadOptions, Session, load_session
from eft_local.vocab import INCOMPATIBLE
from tests.vllm_double import GgufRows, VllmDouble

F = FAMILY_DIR
LOCAL = [f"small_ft={F / 'small_ft.gguf'}", f"small_base={F / 'small_base.gguf'}"]
PROMPT = "Has Zhithdou was born in"


@pytest.fixture(scope="module")
def rows() -> Iterator[GgufRows]:
    engine = GgufRows(F / "large_base.gguf")
    yield engine
    engine.close()


@pytest.fixture()
def vllm(rows: GgufRows) -> Iterator[VllmDouble]:
    """The double with ``--max-logprobs 1024`` (the whole vocabulary)."""
    with VllmDouble(rows, max_logprobs=1024) as double:
        yield double


def up(url: str, **options: object) -> Session:
    return load_session(models=[f"large_base={url}", *LOCAL],
                        options=LoadOptions(n_threads=1, **options))  # type: ignore[arg-type]


def test_vllm_is_aligned_and_its_vocabulary_is_read_once(vllm: VllmDouble) -> None:
    """It used to be refused ('vocab types differ (bpe, unknown)', then 128 byte tokens
    read as U+FFFD), and read again one /detokenize per id at every start: its model card
    has a new ``created`` and permission id on every call."""
    from eft_local.presets import preset_from_paths

    preset = preset_from_paths([f"large_base={vllm.url}#api=openai&top_k=1024", *LOCAL])
    report = check_models(preset)
    assert report.verdict != INCOMPATIBLE, report.summary()
    assert report.unknown == 128 and report.identical == 1024 - 128
    assert "vocab type unknown for large_base" in report.render()
    read = vllm.calls["/detokenize"]
    assert read >= 1024
    first = vllm.route("GET", "/v1/models", None)[1]["data"][0]
    assert vllm.route("GET", "/v1/models", None)[1]["data"][0] != first  # changes every call
    check_models(preset)
    with up(f"{vllm.url}#api=openai&top_k=1024", speculative=False) as session:
        assert session.models["large_base"].api == "openai"
    assert vllm.calls["/detokenize"] == read  # the second and third start read nothing


def test_vllm_top_k_covering_the_vocabulary_gives_the_all_local_tokens(
        vllm: VllmDouble) -> None:
    """Plain steps (one generated token's top K) and speculative blocks (echo: every
    position's top K, vLLM's own token first) against the all-local run."""
    with up(str(F / "large_base.gguf"), speculative=False) as local:
        want = local.generate(PROMPT, max_tokens=16, temperature=0, top_n=0)
    for options in ({"speculative": False}, {"draft_k": 3}):
        with up(f"{vllm.url}#api=openai&top_k=1024", **options) as remote:
            got = remote.generate(PROMPT, max_tokens=16, temperature=0, top_n=0)
        assert [s.token for s in got.steps] == [s.token for s in want.steps]
        assert max(abs(x.logprob - y.logprob)
                   for x, y in zip(got.steps, want.steps, strict=True)) <= 1e-3
    assert vllm.calls["/v1/completions"] > 16


def test_vllm_s_max_logprobs_error_is_shown_at_start(rows: GgufRows) -> None:
    """vLLM answers 400 to more log-probs than --max-logprobs (20 by default): it used to
    come at the first step; now it is a one-line error before anything loads."""
    with VllmDouble(rows) as double, pytest.raises(EftError) as err:
        up(f"{double.url}#api=openai&top_k=100")
    message = str(err.value)
    assert "\n" not in message and message.startswith(f"remote large_base ({double.url})")
    assert "Requested sample logprobs of 100, which is greater than max allowed: 20" in message
    assert "--max-logprobs" in message and "lower top_k" in message


def down(url: str, messages: list[str]) -> Session:
    """Down-scaling (small_base + beta * (large_ft - large_base)), large_base remote."""
    return load_session(models=[f"large_base={url}", f"large_ft={F / 'large_ft.gguf'}",
                                f"small_base={F / 'small_base.gguf'}"], formula="down",
                        options=LoadOptions(n_threads=1, speculative=False),
                        progress=messages.append)


def test_a_negative_weight_served_top_k_is_warned_about(vllm: VllmDouble) -> None:
    said: list[str] = []
    with down(f"{vllm.url}#api=openai&top_k=20", said):
        pass
    warning = [m for m in said if m.startswith("warning: large_base weighs -1")]
    assert len(warning) == 1 and "top 20 of 1024" in warning[0]
    assert "#top_k=1024" in warning[0] and "eft-local serve" in warning[0]
    for url in (f"{vllm.url}#api=openai&top_k=1024", str(F / "large_base.gguf")):
        said.clear()
        with down(url, said):
            pass
        assert not [m for m in said if "weighs" in m]
    said.clear()
    with up(f"{vllm.url}#api=openai&top_k=20", speculative=False) as session:
        assert session.weights()[0] > 0  # up-scaling: large_base weighs +1, no warning


QUESTIONS = ["What is the home town of Has Zhithdou?", "When was Tova Brint born?",
             "What does Has Zhithdou do for a living?", "Where does Tova Brint live?"]


def down_answers(double: VllmDouble, top_k: int) -> list:
    with down(f"{double.url}#api=openai&top_k={top_k}", []) as session:
        return [session.generate(q, max_tokens=12, temperature=0, top_n=0)
                for q in QUESTIONS]


def test_a_placeholder_is_never_drawn_under_a_negative_weight(rows: GgufRows) -> None:
    """vLLM writes -inf as -9999.0 (llama-server a probability 0 as -3.4e38). The double
    reports every log-prob below -20 so, as an engine whose probabilities underflow;
    down-scaling weighs large_base by -beta. The old floor put the placeholders at -76,
    which -beta made +76: drawn. As tail tokens (no higher than the lowest log-prob the
    engine gave) they are not, and the answers are the whole rows' answers."""
    with VllmDouble(rows, max_logprobs=1024, underflow=-20.0) as double:
        answers = down_answers(double, 1024)
        steps = sum(len(a.steps) for a in answers)
        assert double.placeholders > 100 * steps  # hundreds at every step
    with VllmDouble(rows, max_logprobs=1024) as double:
        whole = down_answers(double, 1024)
    assert [a.text for a in answers] == [a.text for a in whole]
    assert np.isfinite([s.logprob for a in answers for s in a.steps]).all()
