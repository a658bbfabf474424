"""The decode loop on real (tiny, random-weight) GGUF models through llama.cpp."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from eft_local import backend
from eft_local.engine import Engine
from eft_local.errors import EftError
from eft_local.presets import preset_from_paths
from eft_local.sampler import SamplerSettings, log_softmax
from eft_local.session import LoadOptions, Session, load_session
from tests import ggufs
from tests.fakes import FakeModel
from tests.test_sampler import HAND_EXPECTED, HAND_ROWS, HAND_WEIGHTS

ROLES = ("large_base", "small_ft", "small_base")


@pytest.fixture(scope="module")
def trio(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("trio")
    return {r: ggufs.write_model(d / f"{r}.gguf", seed=i, n_embd=64 if r == "large_base"
                                 else 32) for i, r in enumerate(ROLES)}


def session(trio: dict[str, Path], **kwargs) -> Session:
    preset = preset_from_paths([f"{r}={p}" for r, p in trio.items()])
    opts = kwargs.pop("options", LoadOptions(speculative=False))
    return Session(preset, options=opts, **kwargs)


def log_softmax64(row: np.ndarray) -> np.ndarray:
    row = row.astype(np.float64)
    return row - np.log(np.exp(row - row.max()).sum()) - row.max()


def fresh_logprobs(path: Path, tokens: list[int]) -> np.ndarray:
    """One fresh model, the whole prefix in one batch: its last row's log-probs."""
    return alone(path, tokens, [])[0]


def alone(path: Path, prompt: list[int], generated: list[int]) -> list[np.ndarray]:
    """A fresh model on its own, stepping like generation does: prompt in one batch, then
    one token at a time; the log-probs before each generated token (and after the last)."""
    model = backend.LlamaModel(path, n_ctx=256)
    try:
        out = [log_softmax64(model.eval(prompt)[-1])]
        out += [log_softmax64(model.eval([t])[-1]) for t in generated]
    finally:
        model.close()
    return out


def record_distributions(s: Session) -> list[np.ndarray]:
    """The mixed log-probs of every step (the engine samples from scores: the same up to a
    constant)."""
    seen: list[np.ndarray] = []
    original = s.engine.scores

    def wrapper(rows, weights, settings, conservative=None):
        out = original(rows, weights, settings, conservative)
        seen.append(log_softmax(out))
        return out

    s.engine.scores = wrapper  # type: ignore[method-assign]
    return seen


@pytest.mark.parametrize("beta", [1.0, 0.5, 2.0])
def test_every_step_equals_models_evaluated_alone(trio: dict[str, Path], beta: float) -> None:
    with session(trio, sampling=SamplerSettings(temperature=1.0, seed=3)) as s:
        s.set_param("beta", beta)
        seen = record_distributions(s)
        prompt = s.raw_tokens("hello there")
        result = s.generate("hello there", max_tokens=12)
    generated = [st.token for st in result.steps]
    assert len(generated) == 12 and len(seen) == 12
    w = {"large_base": 1.0, "small_ft": beta, "small_base": -beta}
    each = {r: alone(trio[r], prompt, generated[:-1]) for r in ROLES}
    for i, mixed in enumerate(seen):
        by_hand = log_softmax64(sum(w[r] * each[r][i] for r in ROLES))
        np.testing.assert_allclose(mixed, by_hand, atol=1e-4)
        assert result.steps[i].p_mix == pytest.approx(np.exp(by_hand[generated[i]]), abs=1e-4)


def test_kv_reuse_across_turns_matches_fresh_evaluation(trio: dict[str, Path]) -> None:
    with session(trio, sampling=SamplerSettings(temperature=0.0)) as s:
        for _ in s.chat("hi", max_tokens=6):
            pass
        seen = record_distributions(s)
        evaluated_before = s.engine.stats.prefilled
        for _ in s.chat("and again", max_tokens=3):
            pass
        prompt2 = s.chat_tokens(s.conversation.messages()[:-1])
        suffix_evaluated = s.engine.stats.prefilled - evaluated_before
    assert suffix_evaluated < len(prompt2)  # only the new part was evaluated
    by_hand = log_softmax64(fresh_logprobs(trio["large_base"], prompt2) + fresh_logprobs(
        trio["small_ft"], prompt2) - fresh_logprobs(trio["small_base"], prompt2))
    np.testing.assert_allclose(seen[0], by_hand, atol=1e-4)


def test_rewind_then_eval_matches_fresh(trio: dict[str, Path]) -> None:
    model = backend.LlamaModel(trio["small_ft"], n_ctx=256)
    try:
        model.eval([5, 6, 7, 8, 9, 10])
        model.rewind(3)
        assert model.tokens == [5, 6, 7]
        row = model.eval([20, 21])[-1]
    finally:
        model.close()
    fresh = fresh_logprobs(trio["small_ft"], [5, 6, 7, 20, 21])
    np.testing.assert_allclose(log_softmax64(row), fresh, atol=1e-4)


def test_same_seed_same_text_and_diagnostics(trio: dict[str, Path]) -> None:
    with session(trio, sampling=SamplerSettings(temperature=0.8, seed=11)) as s:
        a = s.generate("abc", max_tokens=8, diagnostics=True)
        b = s.generate("abc", max_tokens=8, diagnostics=True)
    assert [x.token for x in a.steps] == [x.token for x in b.steps]
    step = a.steps[0]
    assert set(step.p_models) == set(ROLES)
    assert all(0.0 < p <= 1.0 for p in step.p_models.values())
    assert isinstance(step.ref_token, int)


def test_diagnostics_give_each_models_log_prob_and_best_tokens(trio: dict[str, Path]) -> None:
    with session(trio, sampling=SamplerSettings(temperature=0.0)) as s:
        steps = [c.step for c in s.stream(s.raw_tokens("abc"), max_tokens=6, diagnostics=True,
                                          top_n=3) if c.step is not None]
        conservative = s.conservative_role()
    assert steps
    for step in steps:
        assert set(step.logprob_models) == set(step.top_models) == set(ROLES)
        for role in ROLES:
            assert np.exp(step.logprob_models[role]) == pytest.approx(step.p_models[role],
                                                                       rel=1e-5)
            best = step.top_models[role]
            assert len(best) == 3 and best[0][1] >= best[1][1] >= best[2][1]
            assert best[0][1] >= step.logprob_models[role]
        assert step.top_models[conservative][0][0] == step.ref_token  # greedy: its best
        assert step.logprob == pytest.approx(step.top[0][1])  # greedy: the mix's best


def test_context_limit_stops_cleanly(trio: dict[str, Path]) -> None:
    with session(trio, options=LoadOptions(n_ctx=32, speculative=False),
                 sampling=SamplerSettings(temperature=0.0)) as s:
        allowed = s.engine.allowed.copy()
        allowed[[1, 4]] = False  # no end-of-generation token: run into the limit
        s.engine.allowed = allowed
        result = s.generate("hello", max_tokens=500)
        assert result.finish == "context"
        assert result.prompt_tokens + len(result.steps) == s.engine.n_ctx
        with pytest.raises(EftError, match="context holds"):
            s.generate("hello " * 300, max_tokens=5)


def test_chat_drops_oldest_turns_when_full(trio: dict[str, Path]) -> None:
    with session(trio, options=LoadOptions(n_ctx=256, speculative=False),
                 sampling=SamplerSettings(temperature=0.0)) as s:
        s.conversation.system = "be brief"
        notices = []
        for i in range(8):
            for chunk in s.chat(f"question number {i} " * 3, max_tokens=40):
                if chunk.notice:
                    notices.append(chunk.notice)
        assert len(notices) == 1 and "oldest turns are dropped" in notices[0]  # said once
        assert s.conversation.dropped >= 4  # turns, over more than one chat call
        assert s.conversation.system == "be brief"
        assert s.conversation.turns[-2]["content"].startswith("question number 7")
        assert sum(t["role"] == "user" for t in s.conversation.turns) < 8


def test_params_and_max_tokens_are_validated(trio: dict[str, Path]) -> None:
    with session(trio) as s:
        with pytest.raises(EftError, match="invalid beta"):
            s.set_param("beta", float("nan"))
        with pytest.raises(EftError, match="unknown parameter"):
            s.set_param("gamma", 1.0)
        s.set_param("lambda", 0.2)
        assert s.params["lam"] == 0.2
        with pytest.raises(EftError, match="max_tokens"):
            s.generate("x", max_tokens=0)


def test_incompatible_models_are_refused(tmp_path: Path, trio: dict[str, Path]) -> None:
    other = ggufs.write_model(tmp_path / "other.gguf", swap=(40, 41))
    preset = preset_from_paths([f"large_base={other}", f"small_ft={trio['small_ft']}",
                                f"small_base={trio['small_base']}"])
    with pytest.raises(EftError, match="do not share a token space: incompatible"):
        Session(preset)


def test_three_copies_of_one_gguf_give_that_model(trio: dict[str, Path]) -> None:
    one = trio["small_ft"]
    copies = {r: one for r in ROLES}
    with session(copies, sampling=SamplerSettings(temperature=0.0)) as s:
        s.set_param("beta", 1.7)
        seen = record_distributions(s)
        prompt = s.raw_tokens("copies")
        result = s.generate("copies", max_tokens=5)
    each = alone(one, prompt, [st.token for st in result.steps][:-1])
    for mixed, own in zip(seen, each, strict=True):
        np.testing.assert_allclose(mixed, own, atol=1e-4)


def test_beta_zero_follows_the_large_base_alone(trio: dict[str, Path]) -> None:
    with session(trio, sampling=SamplerSettings(temperature=0.0)) as s:
        s.set_param("beta", 0.0)
        prompt = s.raw_tokens("base only")
        result = s.generate("base only", max_tokens=6)
    generated = [st.token for st in result.steps]
    rows = alone(trio["large_base"], prompt, generated[:-1])
    assert generated == [int(np.argmax(r)) for r in rows]


def test_padding_rows_never_get_probability(tmp_path: Path, trio: dict[str, Path]) -> None:
    padded = ggufs.write_model(tmp_path / "padded.gguf", seed=9, n_embd=64, pad_to=400)
    models = {**trio, "large_base": padded}
    with session(models, sampling=SamplerSettings(temperature=5.0, seed=1)) as s:
        assert s.report.verdict == "aligned on a common range"
        common = s.report.common
        seen = record_distributions(s)
        result = s.generate("pad", max_tokens=40)
    assert all(st.token < common for st in result.steps)
    assert all(row.size == common for row in seen)


def test_conservative_decoding_normalises_once_as_the_paper_defines() -> None:
    """The engine path of conservative decoding on the hand-computed 4-token example."""
    models = {r: FakeModel(seed=i, n_vocab=4) for i, r in
              enumerate(("large_base", "small_ft", "small_base"))}
    engine = Engine(models, template_role="small_ft", allowed=np.ones(4, dtype=bool))
    out = engine.distribution(HAND_ROWS, HAND_WEIGHTS, SamplerSettings(conservative_top_p=0.8))
    np.testing.assert_allclose(np.exp(out), HAND_EXPECTED, atol=1e-6)
    out = engine.distribution(HAND_ROWS, HAND_WEIGHTS, SamplerSettings(conservative_top_p=0.8),
                              "large_base")  # flat: its top-0.8 set is 4 tokens, the mix
    np.testing.assert_allclose(np.exp(out), [0.2, 0.6, 0.1, 0.1], atol=1e-6)


@pytest.mark.parametrize("template", [
    ggufs.TEMPLATE,                       # no bos_token in the template: BOS prepended
    "{{ bos_token }}" + ggufs.TEMPLATE,  # the template writes it: not twice
])
def test_bos_is_prepended_when_the_model_asks_for_it(tmp_path: Path, template: str) -> None:
    path = ggufs.write_model(tmp_path / "bos.gguf", add_bos=True, template=template)
    with load_session(models=[f"chat={path}"], options=LoadOptions(n_ctx=128)) as s:
        bos = s.report.vocabs["chat"].bos
        tokens = s.chat_tokens([{"role": "user", "content": "hi"}])
        assert tokens[0] == bos and tokens[1] != bos
        assert s.raw_tokens("hi")[0] == bos  # as plain prompts always had


def test_no_bos_when_the_model_does_not_ask(trio: dict[str, Path]) -> None:
    s = session(trio)
    try:
        assert s.chat_tokens([{"role": "user", "content": "hi"}])[0] != 0  # bos id 0
    finally:
        s.close()


def test_failed_partial_rollback_clears_and_evaluates_again(
        trio: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    """A cache that cannot drop part of a sequence (recurrent/hybrid models: llama.cpp's
    llama_memory_seq_rm returns false): rewind clears it and evaluates the kept tokens."""
    monkeypatch.setattr(backend.L, "llama_memory_seq_rm", lambda *_args: False)
    model = backend.LlamaModel(trio["small_ft"], n_ctx=256)
    try:
        model.eval([5, 6, 7, 8, 9, 10])
        model.rewind(3)
        assert model.tokens == [5, 6, 7] and model.full_rewinds == 1
        row = model.eval([20, 21])[-1]
    finally:
        model.close()
    fresh = fresh_logprobs(trio["small_ft"], [5, 6, 7, 20, 21])
    np.testing.assert_allclose(log_softmax64(row), fresh, atol=1e-4)


def test_failed_decode_with_a_failed_rollback_leaves_a_clean_cache(
        trio: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    model = backend.LlamaModel(trio["small_ft"], n_ctx=256, n_batch=4)
    real_decode, calls = backend.L.llama_decode, []

    def decode(ctx, batch):  # the second chunk of a prompt fails
        calls.append(1)
        return 1 if len(calls) == 2 else real_decode(ctx, batch)

    try:
        model.eval([5, 6])
        with monkeypatch.context() as m:
            m.setattr(backend.L, "llama_decode", decode)
            m.setattr(backend.L, "llama_memory_seq_rm", lambda *_args: False)
            with pytest.raises(EftError, match="llama_decode failed"):
                model.eval(list(range(30, 40)))
        assert model.tokens == []  # cleared: the next prompt is evaluated from position 0
        row = model.eval([5, 6, 7, 20])[-1]
    finally:
        model.close()
    np.testing.assert_allclose(log_softmax64(row), fresh_logprobs(trio["small_ft"],
                                                                  [5, 6, 7, 20]), atol=1e-4)
