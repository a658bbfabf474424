"""Speculative EFT decoding gives exactly the tokens of plain decoding, only faster."""

from __future__ import annotations

import math
import signal
import sys
import threading
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from eft_local import backend
from eft_local.engine import Engine, Step
from eft_local.formula import PRESET_FORMULAS, parse_formula
from eft_local.presets import preset_from_paths
from eft_local.sampler import SamplerSettings
from eft_local.schedule.blocks import BlockSizer
from eft_local.session import LoadOptions, Session, load_session
from eft_local.speculative import RETRY_AFTER, Speculator, worth_speculating
from eft_local.vocab import align
from tests import ggufs
from tests.fakes import FakeModel, decode, decoding

FORMULA_ROLES = {"up": ("large_base", "small_ft", "small_base"),
                 "down": ("small_base", "large_ft", "large_base"),
                 "amplified": ("small_ft", "large_base", "small_base"),
                 "interpolate": ("large_base", "small_ft", "small_base", "small_ft_alt")}
REF = {"down": "large_ft"}
PROMPT = [5, 9, 14, 3, 22, 7]


def fake_engine(formula: str, *, noise: float = 0.3, n_ctx: int = 256, n_vocab: int = 48,
                parallel: bool = False) -> Engine:
    roles = FORMULA_ROLES[formula]
    models = {r: FakeModel(seed=i + 1, noise=noise, n_ctx=n_ctx, n_vocab=n_vocab)
              for i, r in enumerate(roles)}
    return Engine(models, template_role=REF.get(formula, "small_ft"),
                  allowed=np.ones(n_vocab, dtype=bool), parallel=parallel)


def weights_for(engine: Engine, formula: str, beta: float, lam: float = 0.3) -> np.ndarray:
    w = parse_formula(PRESET_FORMULAS[formula]).weights({"beta": beta, "lam": lam})
    return np.array([w.get(r, 0.0) for r in engine.roles], dtype=np.float32)


def run(engine: Engine, weights: np.ndarray, s: SamplerSettings, *, draft_k: int | None | str,
        max_tokens: int = 40, prompt: list[int] = PROMPT, diagnostics: bool = False
        ) -> tuple[list[Step], str]:
    """Plain decoding when ``draft_k == "plain"``, else speculative with that block size."""
    steps = decode(engine, prompt, weights, s, max_tokens=max_tokens, draft_k=draft_k,
                   diagnostics=diagnostics)
    return steps, steps[-1].finish if steps else None


def same_steps(a: list[Step], b: list[Step]) -> bool:
    return [replace(x, from_draft=False) for x in a] == [replace(x, from_draft=False) for x in b]


# -- the property: identical to plain decoding ---------------------------------------------
PENALTIES = [
    {},
    {"repeat_penalty": 1.3},
    {"repeat_penalty": 0.8, "repeat_last_n": -1},
    {"frequency_penalty": 0.7, "presence_penalty": -0.5, "repeat_last_n": 3},
    {"dry_multiplier": 0.8, "dry_allowed_length": 1, "dry_penalty_last_n": -1,
     "dry_sequence_breakers": ("c", "ab")},
    {"dry_multiplier": 2.0, "dry_base": 1.1, "dry_allowed_length": 0},
    {"logit_bias": {3: -100.0, 5: 2.0, 1: -math.inf}},
    {"repeat_penalty": 1.5, "frequency_penalty": 1.0, "dry_multiplier": 0.5,
     "logit_bias": {7: 4.0}},
]
"""Penalty settings the property draws from: each kind alone, and all at once."""


@settings(max_examples=200, deadline=None)
@given(seed=st.integers(0, 2**20), temperature=st.sampled_from([0.0, 0.7, 1.0, 1.5]),
       top_k=st.sampled_from([0, 3, 12]), top_p=st.sampled_from([1.0, 0.9, 0.5]),
       min_p=st.sampled_from([0.0, 0.05, 0.3]), conservative=st.sampled_from([None, 0.9]),
       formula=st.sampled_from(sorted(FORMULA_ROLES)), beta=st.sampled_from([0.0, 0.5, 1.0, 2.5]),
       draft_k=st.sampled_from([None, 1, 2, 3, 5, 8, 16]), noise=st.sampled_from([0.1, 0.5, 2.0]),
       n_ctx=st.sampled_from([12, 30, 256]), max_tokens=st.integers(1, 40),
       penalty=st.sampled_from(range(len(PENALTIES))))
def test_speculative_equals_plain(seed: int, temperature: float, top_k: int, top_p: float,
                                  min_p: float, conservative: float | None, formula: str,
                                  beta: float, draft_k: int | None, noise: float, n_ctx: int,
                                  max_tokens: int, penalty: int) -> None:
    s = SamplerSettings(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
                        seed=seed, conservative_top_p=conservative, **PENALTIES[penalty])
    plain_engine = fake_engine(formula, noise=noise, n_ctx=n_ctx)
    spec_engine = fake_engine(formula, noise=noise, n_ctx=n_ctx)
    w = weights_for(plain_engine, formula, beta)
    plain, plain_finish = run(plain_engine, w, s, draft_k="plain", max_tokens=max_tokens)
    spec, spec_finish = run(spec_engine, w, s, draft_k=draft_k, max_tokens=max_tokens)
    assert [x.token for x in spec] == [x.token for x in plain]
    assert same_steps(spec, plain)
    assert spec_finish == plain_finish
    assert [x.position for x in spec] == list(range(len(PROMPT), len(PROMPT) + len(spec)))


@pytest.mark.parametrize("penalty", range(1, len(PENALTIES)))
def test_the_drafter_drafts_under_the_same_penalties(penalty: int) -> None:
    # three identical models: the mix is the drafter's row, so drafts penalised as the mix is
    # are always accepted (unpenalised drafts are not: 19-38 % accepted where these are 100 %)
    s = SamplerSettings(temperature=0.8, seed=5, **PENALTIES[penalty])
    plain_engine, spec_engine = fake_engine("up", noise=0.0), fake_engine("up", noise=0.0)
    w = weights_for(spec_engine, "up", 1.0)
    plain, _ = run(plain_engine, w, s, draft_k="plain", max_tokens=60)
    spec, _ = run(spec_engine, w, s, draft_k=4, max_tokens=60)
    assert same_steps(spec, plain)
    assert spec_engine.stats.drafted > 20
    assert spec_engine.stats.acceptance_rate() == 1.0


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_diagnostics_and_draft_flags(temperature: float) -> None:
    s = SamplerSettings(temperature=temperature, seed=3)
    plain_engine, spec_engine = fake_engine("up", noise=0.2), fake_engine("up", noise=0.2)
    w = weights_for(plain_engine, "up", 1.0)
    plain, _ = run(plain_engine, w, s, draft_k="plain", diagnostics=True)
    spec, _ = run(spec_engine, w, s, draft_k=4, diagnostics=True)
    assert same_steps(spec, plain)
    assert all(x.p_models is not None and x.ref_token is not None for x in spec)
    assert any(x.from_draft for x in spec) and not all(x.from_draft for x in spec)
    assert spec_engine.why(s)["mix"] == plain_engine.why(s)["mix"]


def test_acceptance_follows_closeness() -> None:
    s = SamplerSettings(temperature=1.0, seed=11)
    rates = []
    for noise in (0.0, 0.2, 3.0):
        engine = fake_engine("up", noise=noise)
        run(engine, weights_for(engine, "up", 1.0), s, draft_k=4, max_tokens=80)
        rates.append(engine.stats.acceptance_rate())
    assert rates[0] == 1.0 > rates[1] > rates[2] > 0.0


def test_close_drafter_needs_fewer_verifier_calls() -> None:
    s = SamplerSettings(temperature=0.0)
    plain_engine, spec_engine = fake_engine("up", noise=0.0), fake_engine("up", noise=0.0)
    w = weights_for(plain_engine, "up", 1.0)
    run(plain_engine, w, s, draft_k="plain", max_tokens=40)
    run(spec_engine, w, s, draft_k=7, max_tokens=40)
    assert plain_engine.models["large_base"].eval_calls == 40  # the prompt, then 39 one-token steps
    assert spec_engine.models["large_base"].eval_calls == 1 + 5  # prompt + 5 blocks of 8


def test_closing_early_leaves_consistent_caches() -> None:
    engine = fake_engine("up", noise=1.0)
    w = weights_for(engine, "up", 1.0)
    s = SamplerSettings(temperature=1.0, seed=5)
    gen = decoding(engine, PROMPT, w, s, max_tokens=50, draft_k=8)
    out = [next(gen).token for _ in range(7)]
    gen.close()
    seq = PROMPT + out
    for model in engine.models.values():
        assert model.tokens == seq[: len(model.tokens)]
        assert len(model.tokens) >= len(seq) - 1
    # and the next call on the same engine (KV reused) still matches plain decoding
    plain_engine = fake_engine("up", noise=1.0)
    more = seq + [4, 4]
    a, _ = run(plain_engine, w, s, draft_k="plain", prompt=more, max_tokens=20)
    b, _ = run(engine, w, s, draft_k=None, prompt=more, max_tokens=20)
    assert same_steps(a, b)


def test_parallel_engine_matches_sequential() -> None:
    s = SamplerSettings(temperature=0.7, seed=2)
    seq_engine = fake_engine("interpolate", noise=0.3)
    par_engine = fake_engine("interpolate", noise=0.3, parallel=True)
    assert len(par_engine.lanes) == min(len(par_engine.roles), par_engine.n_threads)
    w = weights_for(seq_engine, "interpolate", 1.0)
    a, _ = run(seq_engine, w, s, draft_k="plain")
    b, _ = run(par_engine, w, s, draft_k=None)
    par_engine.close()
    assert same_steps(a, b)


def test_block_sizer_adapts() -> None:
    sizer = BlockSizer()
    assert sizer.next_k() == 2  # nothing measured yet
    for _ in range(20):
        sizer.observe(4, 4, draft_seconds=0.004, verify_seconds=0.02, block_len=5)
    assert sizer.next_k() >= 6
    for _ in range(20):
        sizer.observe(4, 0, draft_seconds=0.004, verify_seconds=0.02, block_len=5)
    ks = [sizer.next_k() for _ in range(sizer.probe_every)]
    assert ks[:-1] == [0] * (sizer.probe_every - 1) and ks[-1] >= 1  # plain, then a probe
    assert BlockSizer(fixed=3).next_k() == 3


def test_dear_verification_never_pays() -> None:
    """Verifying 5 tokens costs 5 one-token steps: plain steps win at any acceptance."""
    sizer = BlockSizer(accepted=100.0, rejected=1.0)
    sizer.observe(0, 0, draft_seconds=0.0, verify_seconds=0.01, block_len=1)
    sizer.observe(4, 4, draft_seconds=0.004, verify_seconds=0.05, block_len=5)
    assert sizer.best_k() == 0


def test_adaptive_falls_back_to_plain_steps_and_stays_identical() -> None:
    s = SamplerSettings(temperature=1.0, seed=9)
    plain_engine, spec_engine = fake_engine("up", noise=3.0), fake_engine("up", noise=3.0)
    w = weights_for(plain_engine, "up", 1.0)
    a, _ = run(plain_engine, w, s, draft_k="plain", max_tokens=120)
    spec = Speculator(spec_engine, draft_k=None)
    spec.sizer.probe_every = 8
    b = decode(spec.engine, PROMPT, w, s, max_tokens=120, speculator=spec)
    assert same_steps(a, b)
    assert spec.sizer.alpha < 0.5  # shadow guesses and probes keep it measured


def test_single_model_mix_is_not_worth_speculating() -> None:
    engine = fake_engine("up")
    only_ref = np.array([1.0 if r == "small_ft" else 0.0 for r in engine.roles])
    assert not worth_speculating(engine, only_ref, "small_ft")
    assert worth_speculating(engine, weights_for(engine, "up", 0.0), "small_ft")


# -- real llama.cpp models -----------------------------------------------------------------
@pytest.fixture(scope="module")
def trio(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """large_base shares small_ft's weights, so the mix 2*ft - base is near the drafter."""
    d = tmp_path_factory.mktemp("spec")
    return {"large_base": ggufs.write_model(d / "large.gguf", seed=1, n_embd=64),
            "small_ft": ggufs.write_model(d / "ft.gguf", seed=1, n_embd=64),
            "small_base": ggufs.write_model(d / "base.gguf", seed=2, n_embd=32)}


def test_rewind_gives_the_rows_of_a_fresh_evaluation(trio: dict[str, Path]) -> None:
    a = backend.LlamaModel(trio["small_base"], n_ctx=64)
    b = backend.LlamaModel(trio["small_base"], n_ctx=64)
    try:
        prefix, block = list(range(10, 22)), [40, 41, 42, 43, 44]
        a.eval(prefix)
        a.eval([7, 8, 9, 11, 12, 13], all_logits=True)  # a rejected draft
        a.rewind(len(prefix))
        assert a.tokens == prefix
        again = a.eval(block, all_logits=True)
        b.eval(prefix)
        fresh = b.eval(block, all_logits=True)
        assert np.array_equal(again, fresh)
    finally:
        a.close()
        b.close()


def gguf_session(trio: dict[str, Path], formula: str | None = None,
                 **options: object) -> Session:
    preset = replace(preset_from_paths([f"{r}={p}" for r, p in trio.items()], formula=formula),
                     draft_role="small_ft")  # large_base is near it (the cheapest: small_base)
    report = align({r: backend.read_vocab(p) for r, p in trio.items()}, reference="small_ft")
    models = {r: backend.LlamaModel(p, n_ctx=128, n_threads=1) for r, p in trio.items()}
    return Session(preset, models=models, report=report,
                   options=LoadOptions(**options))  # type: ignore[arg-type]


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_gguf_speculative_equals_plain(trio: dict[str, Path], temperature: float) -> None:
    plain = gguf_session(trio, speculative=False)
    spec = gguf_session(trio, speculative=True, draft_k=4)
    try:
        for seed in (1, 2):
            for s in (plain, spec):
                s.set_sampling(temperature=temperature, seed=seed, top_k=40)
            prompt = plain.raw_tokens("hello there")
            a = plain.generate("hello there", max_tokens=24)
            b = spec.generate("hello there", max_tokens=24)
            assert [x.token for x in b.steps] == [x.token for x in a.steps]
            assert (b.text, b.finish) == (a.text, a.finish)
            assert len(prompt) == a.prompt_tokens
        stats = spec.engine.stats
        assert stats.drafted > stats.accepted > 0  # accepted and rejected drafts both occur
        assert plain.engine.stats.drafted == 0
    finally:
        plain.close()
        spec.close()


def test_gguf_chat_two_turns(trio: dict[str, Path]) -> None:
    plain = gguf_session(trio, speculative=False)
    spec = gguf_session(trio, speculative=True, draft_k=None, parallel=True)
    try:
        for s in (plain, spec):
            s.set_sampling(temperature=0.8, seed=4)
        for message in ("hi", "tell me more"):
            a = list(plain.chat(message, max_tokens=20, diagnostics=True))
            prefilled = spec.engine.stats.prefilled
            b = list(spec.chat(message, max_tokens=20, diagnostics=True))
            assert [c.text for c in b] == [c.text for c in a]
            assert [c.step.token for c in b if c.step] == [c.step.token for c in a if c.step]
            assert b[-1].finish == a[-1].finish
        new = spec.engine.stats.prefilled - prefilled
        assert new < len(spec.chat_tokens(spec.conversation.messages()[:-1]))  # KV reused
        assert plain.conversation.turns == spec.conversation.turns
    finally:
        plain.close()
        spec.close()


def test_session_speculates_only_when_another_model_counts(trio: dict[str, Path]) -> None:
    mixed = gguf_session(trio, speculative=True, draft_k=3)
    alone = gguf_session(trio, formula="small_ft", speculative=True, draft_k=3)
    try:
        for s in (mixed, alone):
            s.set_sampling(temperature=0.0)
            s.generate("hello", max_tokens=12)
        assert mixed.engine.stats.drafted > 0
        assert alone.engine.stats.drafted == 0  # the reference alone: plain decoding
    finally:
        mixed.close()
        alone.close()


# -- which model drafts ----------------------------------------------------------------------
def sized_engine(formula: str, sizes: dict[str, int]) -> Engine:
    roles = FORMULA_ROLES[formula]
    models = {r: FakeModel(seed=i + 1, size=sizes[r]) for i, r in enumerate(roles)}
    return Engine(models, template_role=REF.get(formula, "small_ft"),
                  allowed=np.ones(48, dtype=bool))


def test_down_scaling_drafts_with_the_small_model_not_large_ft() -> None:
    engine = sized_engine("down", {"small_base": 100, "large_ft": 1000, "large_base": 1000})
    w = weights_for(engine, "down", 1.0)
    assert engine.cheapest_role(w) == "small_base"
    spec = Speculator(engine, draft_k=3)
    s = SamplerSettings(temperature=1.0, seed=3)
    b = decode(spec.engine, PROMPT, w, s, max_tokens=30, speculator=spec)
    assert spec.drafter == "small_base" and engine.stats.drafted > 0
    plain = sized_engine("down", {"small_base": 100, "large_ft": 1000, "large_base": 1000})
    a, _ = run(plain, w, s, draft_k="plain", max_tokens=30)
    assert same_steps(a, b)


def test_default_drafter_follows_the_weights_and_prefers_the_fine_tuned_on_ties() -> None:
    engine = sized_engine("up", {"large_base": 1000, "small_ft": 105, "small_base": 100})
    assert engine.cheapest_role(weights_for(engine, "up", 1.0), prefer="small_ft") == "small_ft"
    apart = sized_engine("up", {"large_base": 1000, "small_ft": 150, "small_base": 100})
    assert apart.cheapest_role(weights_for(apart, "up", 1.0), prefer="small_ft") == "small_base"
    # beta = 0: only the large base has weight, so it is the only candidate
    assert engine.cheapest_role(weights_for(engine, "up", 0.0)) == "large_base"
    spec = Speculator(engine, draft_k=2)
    decode(engine, PROMPT, weights_for(engine, "up", 1.0), SamplerSettings(), max_tokens=5,
           speculator=spec, draft_role="large_base")  # explicit wins
    assert spec.drafter == "large_base"


def test_bundled_down_scaling_session_drafts_with_small_base() -> None:
    with load_session("tiny-down", options=LoadOptions(draft_k=3, n_ctx=256)) as session:
        assert session.roles() == {"template": "large_ft", "draft": "small_base",
                                   "conservative": "large_ft"}
        session.set_sampling(temperature=0.0)
        session.generate("The capital of", max_tokens=8)
        assert session.speculator.drafter == "small_base"
        assert session.engine.stats.drafted > 0
        session.set_param("beta", 0.0)  # small_base alone: nothing to speculate with
        assert session.draft_role() == "small_base"


# -- zero weights, the drafter, the session's speculator -----------------------------------
def test_zero_weight_models_are_not_evaluated_and_catch_up_lazily() -> None:
    s = SamplerSettings(temperature=1.0, seed=4)
    engine = fake_engine("up")
    base_only = weights_for(engine, "up", 0.0)  # large_base alone
    first, _ = run(engine, base_only, s, draft_k="plain", max_tokens=10)
    assert engine.models["small_ft"].eval_calls == engine.models["small_base"].eval_calls == 0
    seq = PROMPT + [x.token for x in first]
    # beta back to 1: the small models catch up on the whole prefix once, then follow
    mixed = weights_for(engine, "up", 1.0)
    again, _ = run(engine, mixed, s, draft_k="plain", prompt=seq, max_tokens=10)
    fresh = fake_engine("up")
    expected, _ = run(fresh, mixed, s, draft_k="plain", prompt=seq, max_tokens=10)
    assert same_steps(again, expected)
    assert engine.models["small_ft"].eval_calls == 1 + 9  # the prompt in one batch, 9 steps


@pytest.mark.parametrize("draft_k", [None, 3])
def test_zero_weight_models_are_skipped_in_speculative_decoding(draft_k: int | None) -> None:
    s = SamplerSettings(temperature=0.7, seed=8)
    plain_engine = fake_engine("interpolate")
    spec_engine = fake_engine("interpolate")
    w = weights_for(plain_engine, "interpolate", 1.0, lam=1.0)  # small_ft_alt has weight 0
    assert w[spec_engine.index("small_ft_alt")] == 0
    a, _ = run(plain_engine, w, s, draft_k="plain")
    b, _ = run(spec_engine, w, s, draft_k=draft_k)
    assert same_steps(a, b)
    assert spec_engine.models["small_ft_alt"].eval_calls == 0


@pytest.mark.parametrize("drafter", ["large_base", "small_ft", "small_base"])
def test_any_drafter_gives_the_plain_tokens(drafter: str) -> None:
    s = SamplerSettings(temperature=1.0, seed=6)
    plain_engine, spec_engine = fake_engine("up"), fake_engine("up")
    w = weights_for(plain_engine, "up", 1.0)
    a, _ = run(plain_engine, w, s, draft_k="plain", max_tokens=30)
    b = decode(spec_engine, PROMPT, w, s, max_tokens=30, draft_k=3, draft_role=drafter)
    assert same_steps(a, b)
    assert worth_speculating(spec_engine, w, drafter)
    assert not worth_speculating(spec_engine, np.array([0.0, 2.0, 0.0]), "small_ft")


def test_the_session_owns_its_speculator(trio: dict[str, Path]) -> None:
    a, b = gguf_session(trio, draft_k=3), gguf_session(trio, draft_k=3)
    try:
        spec = a.speculator
        assert spec is a.speculator and spec is not b.speculator and spec.engine is a.engine
        a.set_sampling(temperature=0.0)
        a.generate("hello", max_tokens=8)
        assert a.speculator is spec and spec.block_sizes  # it drafted, and stays
        a.options = LoadOptions(draft_k=2)
        assert a.speculator is not spec and a.speculator.draft_k == 2
    finally:
        a.close()
        b.close()


def test_eval_into_writes_the_last_row_in_place(trio: dict[str, Path]) -> None:
    a = backend.LlamaModel(trio["small_base"], n_ctx=64)
    b = backend.LlamaModel(trio["small_base"], n_ctx=64)
    try:
        out = np.zeros(a.n_vocab - 3, dtype=np.float32)
        a.eval([5, 6, 7])
        b.eval([5, 6, 7])
        a.eval_into([9], out)
        assert np.array_equal(out, b.eval([9])[-1][: out.size])
        assert a.tokens == b.tokens == [5, 6, 7, 9]
    finally:
        a.close()
        b.close()


# -- Ctrl-C while a parallel lane decodes ---------------------------------------------------
class BlockingModel(FakeModel):
    """A fake whose first decode in a worker thread from the ``block_at``-th on waits on an
    event: a lane stuck in a decode. It counts rollbacks of itself while one of its decodes
    runs (in another thread): what would corrupt its cache. Each model's counters are
    touched by one thread at a time (shared counters updated from several threads could
    lose updates)."""

    def __init__(self, *, shared: dict, block_at: int = 0, **kwargs) -> None:
        super().__init__(**kwargs)
        self.shared, self.block_at, self.calls = shared, block_at, 0
        self.inside = 0
        self.decoding = 0
        self.entered, self.release = threading.Event(), threading.Event()

    def decode(self, parts, out=None):  # noqa: ANN001, ANN201 - FakeModel.decode's
        self.calls += 1
        blocking = (0 < self.block_at <= self.calls and not self.entered.is_set()
                    and threading.current_thread() is not threading.main_thread())
        self.inside += 1
        self.decoding = threading.get_ident()
        try:
            if blocking:
                self.entered.set()
                self.release.wait(10)
            return super().decode(parts, out)
        finally:
            self.inside -= 1

    def rewind(self, n_past: int, seq: int = 0) -> None:
        if self.inside and threading.get_ident() != self.decoding:  # inside another thread's
            self.shared["rewound_mid_decode"] += 1
        super().rewind(n_past, seq)


def main_waits_for_a_result() -> bool:
    """True while the main thread is inside ``Future.result``."""
    frame = sys._current_frames().get(threading.main_thread().ident)
    while frame is not None:
        if frame.f_code.co_name == "result" and "futures" in frame.f_code.co_filename:
            return True
        frame = frame.f_back
    return False


@pytest.mark.parametrize("path", ["plain", "speculative"])
def test_ctrl_c_during_a_lane_decode_waits_for_every_lane(path: str) -> None:
    shared = {"rewound_mid_decode": 0}
    roles = FORMULA_ROLES["up"]
    models = {r: BlockingModel(shared=shared, seed=i + 1) for i, r in enumerate(roles)}
    engine = Engine(models, template_role="small_ft", allowed=np.ones(48, dtype=bool),
                    parallel=True, n_threads=3)
    assert len(engine.lanes) == 3
    # the first lane runs in the caller's thread: block a model of another lane, in a worker
    blocked = models[engine.lanes[-1][0]]
    blocked.block_at = 2

    def interrupt() -> None:  # Ctrl-C while the worker lane is inside its decode
        blocked.entered.wait(10)
        for _ in range(100):  # again if it landed just before the wait began (a known race)
            signal.pthread_kill(threading.main_thread().ident, signal.SIGINT)
            time.sleep(0.05)
            if not main_waits_for_a_result():
                break
        time.sleep(0.5)  # the lane stays inside its decode a while after the Ctrl-C
        blocked.release.set()

    def ctrl_c_once(_signum: int, _frame: object) -> None:  # resent signals do nothing
        if not shared.get("pressed"):
            shared["pressed"] = 1
            raise KeyboardInterrupt

    previous = signal.signal(signal.SIGINT, ctrl_c_once)
    helper = threading.Thread(target=interrupt)
    helper.start()
    w = weights_for(engine, "up", 1.0)
    gen = decoding(engine, PROMPT, w, SamplerSettings(), max_tokens=50,
                   draft_k="plain" if path == "plain" else 2)
    try:
        with pytest.raises(KeyboardInterrupt):
            for _ in gen:
                pass
        # when the interrupt reaches the caller no lane is still decoding, and no model
        # was rolled back while it decoded
        assert [m.inside for m in models.values()] == [0, 0, 0]
        assert blocked.release.is_set()
        assert shared["rewound_mid_decode"] == 0
    finally:
        blocked.release.set()
        helper.join()
        signal.signal(signal.SIGINT, previous)
        engine.close()
    # the models are usable afterwards: the next generation starts from their caches
    assert len(decode(engine, PROMPT, w, SamplerSettings(), max_tokens=3)) == 3


def test_block_sizer_starts_from_measured_costs() -> None:
    cheap = BlockSizer()
    cheap.prior(step=0.1, slope=0.05, draft_step=0.005)  # verification nearly free
    assert cheap.next_k() > 2
    dear = BlockSizer()
    dear.prior(step=0.1, slope=1.0, draft_step=0.02)  # n tokens cost n steps
    assert dear.next_k() == 0  # plain steps from the start, no block spent to find out


def test_no_speculation_when_a_model_cannot_roll_back_part_of_its_cache(
        trio: dict[str, Path]) -> None:
    preset = replace(preset_from_paths([f"{r}={p}" for r, p in trio.items()]),
                     draft_role="small_ft")
    report = align({r: backend.read_vocab(p) for r, p in trio.items()}, reference="small_ft")
    models = {r: backend.LlamaModel(p, n_ctx=128, n_threads=1) for r, p in trio.items()}
    assert all(m.partial_rewind for m in models.values())  # llama: a KV cache
    models["large_base"].partial_rewind = False  # as llama.cpp says of recurrent models
    said: list[str] = []
    with Session(preset, models=models, report=report, progress=said.append,
                 options=LoadOptions(speculative=True, draft_k=3)) as s:
        s.set_sampling(temperature=0.0)
        s.generate("hello", max_tokens=12)
        assert s.engine.stats.drafted == 0 and not s.can_speculate
    assert any("large_base cannot roll back part of its cache" in m for m in said)


def test_block_sizer_never_spends_a_block_where_the_measured_costs_say_it_cannot_pay() -> None:
    """Issue 9: a drafted token costs more than a plain step of every model, so no block
    pays at any acceptance: plain steps from the first token, and no probe blocks either."""
    sizer = BlockSizer()
    sizer.prior(step=0.0004, slope=0.07, draft_step=0.001)  # the family's load-time costs
    ks = [sizer.next_k() for _ in range(3 * sizer.probe_every)]
    assert ks == [0] * len(ks)
    paying = BlockSizer()
    paying.prior(step=0.1, slope=0.1, draft_step=0.005)  # 1B-like: cheap drafts, batching
    assert paying.next_k() > 0


def test_one_block_that_did_not_pay_ends_the_plan() -> None:
    sizer = BlockSizer()
    sizer.prior(step=0.01, slope=0.1, draft_step=0.001)
    assert sizer.next_k() > 0
    sizer.observe(4, 0, draft_seconds=0.004, verify_seconds=0.05, block_len=5)  # dear, rejected
    assert sizer.next_k() == 0  # replanned at once, not after REPLAN_EVERY blocks


def test_adaptive_plain_steps_are_plain_decoding_steps() -> None:
    """Where blocks cannot pay, adaptive speculation drafts nothing and evaluates one token
    per step with every active model (no all-logits batches), and yields plain's tokens."""
    s = SamplerSettings(temperature=1.0, seed=4)
    plain_engine, spec_engine = fake_engine("up", noise=3.0), fake_engine("up", noise=3.0)
    w = weights_for(plain_engine, "up", 1.0)
    a, _ = run(plain_engine, w, s, draft_k="plain", max_tokens=80)
    spec = Speculator(spec_engine, draft_k=None)
    spec.sizer.prior(step=0.0004, slope=0.5, draft_step=0.001)
    calls: list[bool] = []
    evaluate_each = spec_engine.evaluate_each

    def spy(*args: object, **kwargs: object) -> list[np.ndarray]:
        calls.append(bool(kwargs.get("all_logits")))
        return evaluate_each(*args, **kwargs)  # type: ignore[arg-type]

    spec_engine.evaluate_each = spy  # type: ignore[method-assign]
    b = decode(spec.engine, PROMPT, w, s, max_tokens=80, speculator=spec)
    assert same_steps(a, b)
    assert spec.block_sizes == [] and spec_engine.stats.drafted == 0
    assert not any(calls)
    assert spec.plain_generations == 1  # handed to plain decoding from the first token


def test_where_plain_wins_so_far_generation_is_plain_decoding_that_keeps_learning() -> None:
    """Blocks could pay at high acceptance, but not at the acceptance estimated so far: the
    generation runs plain decoding's own loop (the speculative loop's plain steps cost more:
    0.944x on the family), its drafts guessed to learn the acceptance; once that is high
    enough, the next generation drafts."""
    s = SamplerSettings(temperature=1.0, seed=4)
    plain_engine, spec_engine = fake_engine("up", noise=3.0), fake_engine("up", noise=3.0)
    w = weights_for(plain_engine, "up", 1.0)
    a, _ = run(plain_engine, w, s, draft_k="plain", max_tokens=60)
    spec = Speculator(spec_engine, draft_k=None)
    spec.sizer.prior(step=0.05, draft_step=0.005, verify={2: 0.09, 4: 0.1, 8: 0.14})
    spec.sizer.accepted, spec.sizer.rejected = 0.2, 1.8  # alpha 0.1: plain wins
    assert spec.sizer.plain_wins() and not spec.sizer.hopeless()
    before = spec.sizer.accepted + spec.sizer.rejected
    b = decode(spec.engine, PROMPT, w, s, max_tokens=60, speculator=spec)
    assert same_steps(a, b) and spec.plain_generations == 1
    assert spec_engine.stats.drafted == 0
    assert spec.sizer.accepted + spec.sizer.rejected != before  # guesses were counted
    spec.sizer.accepted, spec.sizer.rejected = 9.5, 0.5  # learned: alpha 0.95
    c = decode(spec.engine, PROMPT, w, s, max_tokens=60, speculator=spec)
    assert same_steps(a, c) and spec.plain_generations == 1 and spec_engine.stats.drafted > 0


HOPELESS = {"step": 0.0004, "slope": 0.07, "draft_step": 0.001}
"""The family's load-time costs: a drafted token dearer than a plain step, no block pays."""


def test_cannot_pay_expires_after_some_generations() -> None:
    """Issue 18: once the costs said no block could pay, every later generation ran plain and
    nothing measured them again, so a stale prior (costs measured on the CPU, then the models
    on a GPU) switched speculation off for good. After RETRY_AFTER generations without a
    block the costs are forgotten and a real block measures them again."""
    s = SamplerSettings(temperature=1.0, seed=4)
    plain_engine, spec_engine = fake_engine("up"), fake_engine("up")
    w = weights_for(plain_engine, "up", 1.0)
    a, _ = run(plain_engine, w, s, draft_k="plain", max_tokens=12)
    spec = Speculator(spec_engine, draft_k=None)
    spec.sizer.prior(**HOPELESS)
    for _ in range(RETRY_AFTER):
        assert same_steps(a, decode(spec.engine, PROMPT, w, s, max_tokens=12, speculator=spec))
    assert spec.plain_generations == RETRY_AFTER and spec_engine.stats.drafted == 0
    assert same_steps(a, decode(spec.engine, PROMPT, w, s, max_tokens=12, speculator=spec))
    assert spec_engine.stats.drafted > 0 and spec.block_sizes  # a real block, measured
    assert spec.plain_generations == RETRY_AFTER and spec.remeasured == 1
    assert spec.sizer.draft_step is not None and spec.sizer.draft_step != HOPELESS["draft_step"]


def test_a_fixed_block_size_is_never_forgotten() -> None:
    spec = Speculator(fake_engine("up"), draft_k=3)
    w = weights_for(spec.engine, "up", 1.0)
    for _ in range(RETRY_AFTER + 2):
        decode(spec.engine, PROMPT, w, SamplerSettings(seed=1), max_tokens=8, speculator=spec)
    assert spec.remeasured == 0 and max(spec.block_sizes) == 3


@pytest.mark.parametrize("change", ["drafter", "weights", "gpu_layers"])
def test_block_costs_are_measured_again_when_what_they_depend_on_changes(change: str) -> None:
    """Costs measured for one drafter, one set of evaluated models and one placement do not
    hold for another: the next generation forgets them and tries a real block."""
    s = SamplerSettings(temperature=1.0, seed=4)
    engine = fake_engine("up")
    w = weights_for(engine, "up", 1.0)
    spec = Speculator(engine, draft_k=None)
    spec.sizer.prior(**HOPELESS)
    decode(spec.engine, PROMPT, w, s, max_tokens=10, speculator=spec)
    decode(spec.engine, PROMPT, w, s, max_tokens=10, speculator=spec)
    assert engine.stats.drafted == 0 and spec.plain_generations == 2
    if change == "drafter":
        engine.conservative_role = "small_base"  # the default drafter prefers it on ties
    elif change == "weights":
        w = np.array([1.0, 1.0, 0.0], dtype=np.float32)  # small_base no longer evaluated
    else:
        engine.models["large_base"].n_gpu_layers = -1  # type: ignore[attr-defined]
    decode(spec.engine, PROMPT, w, s, max_tokens=10, speculator=spec)
    assert engine.stats.drafted > 0, change  # a real block, measuring the costs again
    assert spec.remeasured == 1
    if change == "drafter":
        assert spec.drafter == "small_base"


def test_costs_seeded_for_the_settings_of_a_generation_are_kept() -> None:
    """The session seeds the sizer with costs measured at load for every model and its
    drafter: a generation under those settings trusts them (no block where none pays)."""
    engine = fake_engine("up")
    w = weights_for(engine, "up", 1.0)
    spec = Speculator(engine, draft_k=None)
    spec.seed(drafter="small_ft", **HOPELESS)
    decode(spec.engine, PROMPT, w, SamplerSettings(seed=2), max_tokens=10, speculator=spec)
    assert engine.stats.drafted == 0 and spec.remeasured == 0
    spec.seed(drafter="small_base", **HOPELESS)  # measured with another drafter
    decode(spec.engine, PROMPT, w, SamplerSettings(seed=2), max_tokens=10, speculator=spec)
    assert engine.stats.drafted > 0 and spec.remeasured == 1
