"""Long chats: the context policy, and caches that keep what a truncated chat still holds."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from eft_local import backend, kvshift
from eft_local.errors import ContextFull, EftError
from eft_local.kvshift import best_cut
from eft_local.presets import preset_from_paths
from eft_local.session import Chunk, LoadOptions, Session, Settings
from eft_local.vocab import align
from tests import ggufs

ROLES = ("large_base", "small_ft", "small_base")


def write_trio(d: Path, n_layer: int) -> dict[str, Path]:
    """large_base shares small_ft's weights (so drafts get accepted), small_base differs."""
    return {"large_base": ggufs.write_model(d / "large.gguf", seed=1, n_embd=64,
                                            n_layer=n_layer),
            "small_ft": ggufs.write_model(d / "ft.gguf", seed=1, n_embd=64, n_layer=n_layer),
            "small_base": ggufs.write_model(d / "base.gguf", seed=2, n_embd=32,
                                            n_layer=n_layer)}


@pytest.fixture(scope="module")
def one_layer(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One layer: a token's keys and values depend on it and its position only, so a
    shifted cache must give exactly what a fresh evaluation gives."""
    return write_trio(tmp_path_factory.mktemp("one"), 1)


@pytest.fixture(scope="module")
def two_layers(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return write_trio(tmp_path_factory.mktemp("two"), 2)


@pytest.fixture
def always_shift(monkeypatch: pytest.MonkeyPatch) -> None:
    """Shift whatever the model's size and however few tokens are kept."""
    monkeypatch.setattr(kvshift, "SHIFT_MIN_BYTES", 0)
    monkeypatch.setattr(kvshift, "SHIFT_MIN_TOKENS", 1)
    monkeypatch.setattr(kvshift, "SHIFT_CTX_SHARE", 1 << 30)


def session(trio: dict[str, Path], *, n_ctx: int = 256, **options: object) -> Session:
    preset = replace(preset_from_paths([f"{r}={p}" for r, p in trio.items()]),
                     draft_role="small_ft")
    report = align({r: backend.read_vocab(p) for r, p in trio.items()}, reference="small_ft")
    models = {r: backend.LlamaModel(p, n_ctx=n_ctx, n_threads=1) for r, p in trio.items()}
    options.setdefault("speculative", False)
    return Session(preset, models=models, report=report,
                   options=LoadOptions(**options))  # type: ignore[arg-type]


def log_softmax64(row: np.ndarray) -> np.ndarray:
    row = row.astype(np.float64)
    return row - np.log(np.exp(row - row.max()).sum()) - row.max()


def fresh_rows(trio: dict[str, Path], tokens: list[int], width: int) -> list[np.ndarray]:
    """Each model's log-probs after ``tokens``, fresh models evaluating them in one batch
    (in the session's role order)."""
    rows = []
    for path in trio.values():
        model = backend.LlamaModel(path, n_ctx=256)
        try:
            rows.append(log_softmax64(model.eval(tokens)[-1][:width]))
        finally:
            model.close()
    return rows


def assert_fresh(seen: np.ndarray, trio: dict[str, Path], tokens: list[int]) -> None:
    """The rows of a step equal those of fresh models, to float noise: a cache that
    evaluated the prompt in other batches differs by about 1e-3 (other kernels), a token at
    a wrong position by 0.05 or more on these models."""
    for got, expected in zip(seen, fresh_rows(trio, tokens, seen.shape[1]), strict=True):
        np.testing.assert_allclose(log_softmax64(got), expected, atol=5e-3)


def chat_until_dropped(s: Session, seen: list[np.ndarray] | None = None, *,
                       max_tokens: int = 12) -> tuple[list[int], Chunk]:
    """Chat until a turn drops older ones; the prompt of that turn and its last chunk (its
    steps' rows go into ``seen`` when given)."""
    original = s.engine.scores

    def record(rows, weights, settings, conservative=None):  # noqa: ANN001, ANN202
        if seen is not None:
            seen.append(np.array(rows))
        return original(rows, weights, settings, conservative)

    s.engine.scores = record  # type: ignore[method-assign]
    try:
        for i in range(12):
            message = f"message {i} " * 3
            before = s.conversation.dropped
            tokens, _kept, _n = s.fit_chat(
                [*s.conversation.messages(), {"role": "user", "content": message}],
                max_tokens=max_tokens)
            if seen is not None:
                seen.clear()
            chunks = list(s.chat(message, max_tokens=max_tokens))
            if s.conversation.dropped > before:
                return tokens, chunks[-1]
            assert chunks[-1].shifted == 0  # nothing dropped: no shift either
    finally:
        s.engine.scores = original  # type: ignore[method-assign]
    raise AssertionError("the chat never outgrew the context")


# -- finding the cut, and making it -------------------------------------------------------------
def test_best_cut_finds_the_longest_run_of_kept_tokens() -> None:
    cached = [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11]
    assert best_cut(cached, [1, 2, 3, 7, 8, 9, 20], 3) == (6, 3)
    assert best_cut(cached, [1, 2, 3, 9, 10, 11], 3) == (8, 3)
    assert best_cut([1, 2, 5, 9, 5, 6, 7], [1, 2, 5, 6, 7], 2) == (4, 3)  # longest, not first
    assert best_cut(cached, [1, 2, 99], 2) == (2, 0)  # nothing to keep
    assert best_cut(cached, [1, 2, 3], 3) == (3, 0)  # the prompt is a prefix
    assert best_cut([4, 4, 4, 4], [4, 4], 1) == (2, 1)  # nearest of equals


def test_cut_moves_the_kept_tokens_to_their_new_positions(one_layer: dict[str, Path]) -> None:
    path = one_layer["small_base"]
    model, fresh = backend.LlamaModel(path, n_ctx=128), backend.LlamaModel(path, n_ctx=128)
    try:
        tokens = list(range(10, 70))
        model.eval(tokens)
        assert model.can_shift and model.cut(5, 25)
        assert model.tokens == tokens[:5] + tokens[25:]
        row = model.eval([77])[-1]
        expected = fresh.eval(tokens[:5] + tokens[25:] + [77])[-1]
        np.testing.assert_allclose(log_softmax64(row), log_softmax64(expected), atol=5e-3)
        model.can_shift = False  # as llama.cpp says of a cache that cannot shift
        before = list(model.tokens)
        assert not model.cut(0, 3) and model.tokens == before
        with pytest.raises(ValueError, match="outside"):
            model.cut(3, 999)
    finally:
        model.close()
        fresh.close()


# -- a truncated chat ------------------------------------------------------------------------
def test_a_shifted_chat_gives_a_fresh_prompts_mix_on_one_layer_models(
        one_layer: dict[str, Path], always_shift: None) -> None:
    with session(one_layer) as s:
        s.update(temperature=0.0)
        seen: list[np.ndarray] = []
        prompt, last = chat_until_dropped(s, seen)
    assert last.shifted and last.shifted > len(prompt) // 3  # moved, not evaluated again
    assert last.evaluated is not None and last.evaluated <= len(prompt) - last.shifted
    assert_fresh(seen[0], one_layer, prompt)


def test_where_a_shift_does_not_pay_a_truncated_chat_is_a_fresh_prompt(
        one_layer: dict[str, Path]) -> None:
    with session(one_layer) as s:  # tiny files: worth_shifting says no
        s.update(temperature=0.0)
        seen: list[np.ndarray] = []
        prompt, last = chat_until_dropped(s, seen)
        assert s.engine.stats.shifted == 0 and last.shifted == 0
    assert_fresh(seen[0], one_layer, prompt)


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_speculative_equals_plain_after_a_shift(two_layers: dict[str, Path],
                                               always_shift: None, temperature: float) -> None:
    plain = session(two_layers)
    spec = session(two_layers, speculative=True, draft_k=4)
    try:
        replies = []
        for s in (plain, spec):
            s.update(temperature=temperature, seed=3, top_k=40)
            chat_until_dropped(s, max_tokens=16)
            replies.append([list(s.chat("and one more", max_tokens=16))
                            for _ in range(2)])
            assert s.engine.stats.shifted > 0
        a, b = replies
        assert [[c.text for c in r] for r in b] == [[c.text for c in r] for r in a]
        assert plain.conversation.turns == spec.conversation.turns
        assert spec.engine.stats.drafted > 0 and plain.engine.stats.drafted == 0
    finally:
        plain.close()
        spec.close()


def test_the_policy_is_a_setting_and_error_keeps_the_history(one_layer: dict[str, Path]
                                                            ) -> None:
    with pytest.raises(EftError, match="invalid context_overflow 'drop'"):
        Settings(formula=preset_from_paths(["small_ft=x.gguf"]).formula,
                 context_overflow="drop")
    with session(one_layer) as s:
        s.update(temperature=0.0)
        assert s.defaults.context_overflow == "truncate"
        for i in range(2):
            list(s.chat(f"message {i} " * 3, max_tokens=12))
        turns = [dict(t) for t in s.conversation.turns]
        long = "z" * 180
        with pytest.raises(ContextFull, match=r"the conversation needs \d+ tokens but the "
                           r"context holds 256"):
            list(s.chat(long, max_tokens=12, context_overflow="error"))
        assert s.conversation.turns == turns and s.conversation.dropped == 0
        chunks = list(s.chat(long, max_tokens=12))  # the default: truncate
        assert chunks[0].notice and s.conversation.dropped > 0
        assert s.conversation.turns[-2] == {"role": "user", "content": long}
        with pytest.raises(ContextFull, match="the message needs"):  # alone, it cannot fit
            list(s.chat("y" * 300, max_tokens=12))
        assert s.conversation.turns[-2] == {"role": "user", "content": long}
        s.reset()
        assert s.conversation.dropped == 0
