"""The NumPy sampler against hand computations and brute force."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from eft_local import sampler as S
from eft_local.errors import EftError


def ref_log_softmax(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    return x - np.log(np.exp(x - x.max()).sum()) - x.max()


def rows(seed: int, n: int = 3, width: int = 50, scale: float = 3.0) -> np.ndarray:
    return (np.random.default_rng(seed).standard_normal((n, width)) * scale).astype(np.float32)


def test_mix_equals_hand_computation() -> None:
    r = np.array([[1.0, 2.0, 0.5], [0.0, 1.0, 3.0], [2.0, 0.0, 1.0]], dtype=np.float32)
    w = np.array([1.0, 1.5, -1.5], dtype=np.float32)
    by_hand = sum(wi * ref_log_softmax(ri) for wi, ri in zip(w, r, strict=True))
    expected = ref_log_softmax(by_hand)
    np.testing.assert_allclose(S.mix_logits(r, w), expected, atol=1e-6)
    assert S.mix_logits(r, w).dtype == np.float32


def test_beta_zero_is_large_base_alone() -> None:
    r = rows(1)
    w = np.array([1.0, 0.0, -0.0], dtype=np.float32)  # large + 0 * (ft - base)
    np.testing.assert_allclose(S.mix_logits(r, w), ref_log_softmax(r[0]), atol=1e-5)


def test_three_copies_of_one_model_give_that_model() -> None:
    one = rows(2, n=1)[0]
    r = np.stack([one, one, one])
    for beta in (0.5, 1.0, 2.0):
        w = np.array([1.0, beta, -beta], dtype=np.float32)
        np.testing.assert_allclose(S.mix_logits(r, w), ref_log_softmax(one), atol=1e-5)


def test_mask_removes_ids_even_with_negative_weights() -> None:
    r = rows(3, width=8)
    allowed = np.array([True] * 6 + [False] * 2)
    out = S.mix_logits(r, np.array([1, 1, -1], dtype=np.float32), allowed)
    assert np.all(np.isneginf(out[6:]))
    assert np.isclose(np.exp(out[:6]).sum(), 1.0, atol=1e-6)
    sliced = S.mix_logits(r[:, :6], np.array([1, 1, -1], dtype=np.float32))
    np.testing.assert_allclose(out[:6], sliced, atol=1e-6)


def test_mix_of_several_positions_is_each_position_mixed_alone() -> None:
    r = (np.random.default_rng(5).standard_normal((3, 7, 40)) * 4).astype(np.float32)
    allowed = np.arange(40) < 37
    for w in ([1.0, 1.5, -1.5], [1.0, 0.0, -0.0], [0.3, 0.7, 0.0]):
        w = np.array(w, dtype=np.float32)
        batch = S.mix_logits(r, w, allowed)
        assert batch.shape == (7, 40) and batch.dtype == np.float32
        alone = np.stack([S.mix_logits(r[:, i], w, allowed) for i in range(7)])
        assert np.array_equal(batch, alone)  # the same arithmetic, bit for bit
    masked = r.copy()
    with pytest.raises(EftError, match="masked"):
        S.mix_logits(masked, np.array([1.0, 1.0, -1.0], np.float32), np.zeros(40, bool))


def test_log_softmax_is_stable_for_huge_logits() -> None:
    out = S.log_softmax(np.array([1e4, 1e4 - 1, -1e4], dtype=np.float32))
    assert np.all(np.isfinite(out))
    np.testing.assert_allclose(out, ref_log_softmax([1e4, 1e4 - 1, -1e4]), atol=1e-5)


# Conservative decoding, paper section 4.4: up-scaling large_base + small_ft - small_base,
# rows that are already log-probs. small_ft = [.5, .3, .1, .1]: its top-0.8 set is {0, 1}.
# Inside: .25 * .5 / .5 = .25 and .25 * .3 / .1 = .75; outside: small_ft's .1 and .1;
# normalised once: [.25, .75, .1, .1] / 1.2. (The old rule normalised the mix first,
# [.25, .75, .125, .125] / 1.25, then spliced in .1 and .1: [.2, .6, .1, .1].)
HAND_ROWS = np.log(np.array([[0.25, 0.25, 0.25, 0.25],   # large_base
                             [0.5, 0.3, 0.1, 0.1],       # small_ft
                             [0.5, 0.1, 0.2, 0.2]],      # small_base
                            dtype=np.float32))
HAND_WEIGHTS = np.array([1.0, 1.0, -1.0], dtype=np.float32)
HAND_EXPECTED = np.array([0.25, 0.75, 0.1, 0.1]) / 1.2


def test_conservative_matches_the_hand_computed_example() -> None:
    out = S.conservative_mix(HAND_ROWS, HAND_WEIGHTS, 1, 0.8)
    np.testing.assert_allclose(np.exp(out), HAND_EXPECTED, atol=1e-6)
    shifted = HAND_ROWS + np.array([[3.0], [-7.0], [11.0]], dtype=np.float32)  # raw logits
    np.testing.assert_allclose(S.conservative_mix(shifted, HAND_WEIGHTS, 1, 0.8), out,
                               atol=1e-5)


def conservative_by_definition(r: np.ndarray, w: np.ndarray, ref: int, top_p: float,
                               allowed: np.ndarray) -> np.ndarray:
    """The paper's rule in float64, written out token by token (the top-p set from
    :func:`top_p_mask`, tested against brute force below)."""
    lps = [ref_log_softmax(row[allowed]) for row in r]
    lp_ref = lps[ref]
    inside = set(np.flatnonzero(S.top_p_mask(lp_ref.astype(np.float32), top_p)).tolist())
    score = np.array([sum(wm * lp[i] for wm, lp in zip(w, lps, strict=True)) if i in inside
                      else lp_ref[i] for i in range(lp_ref.size)])
    out = np.full(r.shape[1], -np.inf)
    out[allowed] = ref_log_softmax(score)
    return out


@settings(max_examples=150, deadline=None)
@given(seed=st.integers(0, 10_000), top_p=st.floats(0.05, 1.0), width=st.integers(2, 200),
       n_models=st.integers(1, 4), masked=st.integers(0, 5))
def test_conservative_follows_the_definition_on_random_rows(
        seed: int, top_p: float, width: int, n_models: int, masked: int) -> None:
    rng = np.random.default_rng(seed)
    r = rows(seed, n=n_models, width=width)
    w = rng.uniform(-2, 2, n_models).astype(np.float32)
    ref = int(rng.integers(n_models))
    allowed = np.ones(width, dtype=bool)
    allowed[rng.choice(width, size=min(masked, width - 1), replace=False)] = False
    got = S.conservative_mix(r, w, ref, top_p, allowed)
    want = conservative_by_definition(r, w, ref, top_p, allowed)
    assert np.all(np.isneginf(got[~allowed]))
    np.testing.assert_allclose(np.exp(got[allowed]), np.exp(want[allowed]), atol=2e-4)


def test_conservative_at_top_p_one_is_the_plain_mix() -> None:
    r, w = rows(11), np.array([1.0, 1.5, -1.5], dtype=np.float32)
    np.testing.assert_allclose(S.conservative_mix(r, w, 1, 1.0), S.mix_logits(r, w),
                               atol=1e-5)


@settings(max_examples=200, deadline=None)
@given(seed=st.integers(0, 10_000), top_p=st.floats(0.05, 0.999), width=st.integers(1, 300),
       scale=st.floats(0.1, 8.0))
def test_top_p_mask_matches_brute_force(seed: int, top_p: float, width: int,
                                        scale: float) -> None:
    lp = S.log_softmax(rows(seed, n=1, width=width, scale=scale)[0])
    p = np.exp(lp.astype(np.float64))
    got = S.top_p_mask(lp, top_p)
    kept = p[got]
    assert got.any()
    assert (~got).sum() == 0 or kept.min() >= p[~got].max()  # the most likely tokens
    assert kept.sum() >= top_p - 1e-6  # reach top_p ...
    assert kept.sum() - kept.min() < top_p + 1e-6  # ... and no token more than needed


def test_filters() -> None:
    lp = S.log_softmax(np.log(np.array([0.5, 0.25, 0.15, 0.1], dtype=np.float32)))
    top_k = S.filter_logprobs(lp, S.SamplerSettings(top_k=2))
    np.testing.assert_allclose(np.exp(top_k), [2 / 3, 1 / 3, 0, 0], atol=1e-6)
    min_p = S.filter_logprobs(lp, S.SamplerSettings(min_p=0.25))  # keeps p >= 0.125
    np.testing.assert_allclose(np.exp(min_p), [0.5 / 0.9, 0.25 / 0.9, 0.15 / 0.9, 0], atol=1e-6)
    hot = S.filter_logprobs(lp, S.SamplerSettings(temperature=2.0))
    expected = np.sqrt([0.5, 0.25, 0.15, 0.1])
    np.testing.assert_allclose(np.exp(hot), expected / expected.sum(), atol=1e-6)


def test_draw_inverts_the_cdf() -> None:
    lp = np.array([np.log(0.1), -np.inf, np.log(0.6), np.log(0.3)], dtype=np.float32)
    picks = [S.draw(lp, u) for u in (0.0, 0.05, 0.0999, 0.1001, 0.69, 0.7001, 0.9999)]
    assert picks == [0, 0, 0, 2, 2, 3, 3]
    assert S.draw(lp, 0.3, greedy=True) == 2


def test_draw_matches_frequencies_over_blocks() -> None:
    width = 5000  # several blocks
    lp = S.log_softmax(rows(7, n=1, width=width)[0])
    p = np.exp(lp.astype(np.float64))
    us = (np.arange(20_000) + 0.5) / 20_000
    counts = np.bincount([S.draw(lp, u) for u in us], minlength=width)
    top = np.argsort(-p)[:5]
    np.testing.assert_allclose(counts[top] / us.size, p[top], atol=2e-3)


def test_draw_depends_only_on_seed_and_position() -> None:
    assert S.uniform_for(3, 10) == S.uniform_for(3, 10)
    assert S.uniform_for(3, 10) != S.uniform_for(3, 11)
    assert S.uniform_for(3, 10) != S.uniform_for(4, 10)
    lp = S.log_softmax(rows(8, n=1)[0])
    st_ = S.SamplerSettings(seed=5, temperature=0.9, top_p=0.9)
    sample = S.make_sampler(st_)
    assert sample(lp.copy(), 12).token == sample(lp.copy(), 12).token


def test_temperature_zero_is_argmax() -> None:
    lp = S.log_softmax(rows(9, n=1)[0])
    greedy = S.make_sampler(S.SamplerSettings(temperature=0.0))
    assert greedy(lp.copy(), 0).token == int(np.argmax(lp))


@pytest.mark.parametrize("kwargs", [
    {"temperature": -1.0}, {"temperature": float("nan")}, {"top_p": 0.0}, {"top_p": 1.5},
    {"top_k": -2}, {"min_p": 1.0}, {"seed": -1}, {"conservative_top_p": 0.0},
])
def test_invalid_settings_are_one_line_errors(kwargs: dict) -> None:
    with pytest.raises(EftError, match="invalid") as err:
        S.SamplerSettings(**kwargs)
    assert "\n" not in str(err.value)


def test_top_logprobs() -> None:
    lp = S.log_softmax(np.log(np.array([0.1, 0.5, 0.4], dtype=np.float32)))
    top = S.top_logprobs(lp, 2)
    assert [t for t, _ in top] == [1, 2]
    assert np.isclose(np.exp(top[0][1]), 0.5)


# -- the filter chain and the race ---------------------------------------------------------
def test_chain_order_is_temperature_then_filters() -> None:
    s = S.SamplerSettings(temperature=0.5, top_k=3, top_p=0.9, min_p=0.1)
    names = [f.__qualname__.split(".")[0] for f in S.make_filters(s)]
    assert names == ["temperature_filter", "top_k_filter", "top_p_filter", "min_p_filter"]
    assert S.make_filters(S.SamplerSettings()) == ()  # T=1, no filter: nothing to do
    # temperature first: at T=0.5 the top-p set is smaller than at T=1
    lp = S.log_softmax(np.log(np.array([0.4, 0.3, 0.2, 0.1], dtype=np.float32)))
    cold = S.filter_logprobs(lp, S.SamplerSettings(temperature=0.5, top_p=0.7))
    assert np.isfinite(cold).sum() == 2  # 16:9:4:1 -> top two hold 25/30 >= 0.7
    warm = S.filter_logprobs(lp, S.SamplerSettings(top_p=0.7))
    assert np.isfinite(warm).sum() == 2
    hot = S.filter_logprobs(lp, S.SamplerSettings(temperature=4.0, top_p=0.7))
    assert np.isfinite(hot).sum() == 3  # flatter: three tokens needed


def test_filters_ignore_constant_shifts() -> None:
    lp = S.log_softmax(rows(4, n=1, width=200)[0])
    s = S.SamplerSettings(temperature=0.7, top_k=50, top_p=0.8, min_p=0.02, seed=3)
    np.testing.assert_allclose(S.filter_logprobs(lp + 17.0, s), S.filter_logprobs(lp, s),
                               atol=1e-5)
    sample = S.make_sampler(s)
    assert all(sample(lp.copy(), i).token == sample(lp + 17.0, i).token for i in range(50))


def test_greedy_is_the_argmax_of_the_masked_mix() -> None:
    r = rows(12, width=3000)
    w = np.array([1.0, 1.5, -1.5], dtype=np.float32)
    blocked = np.array([int(np.argmax(w @ r))])  # the best token is outside the range
    scores = S.mix_scores(r, w, blocked)
    picked = S.make_sampler(S.SamplerSettings(temperature=0.0))(scores.copy(), 5)
    expected = w @ r
    expected[blocked] = -np.inf
    assert picked.token == int(np.argmax(expected))
    lp = S.log_softmax(expected)
    assert picked.p == pytest.approx(float(np.exp(lp.max())), rel=1e-4)


def test_race_samples_exactly() -> None:
    width = 3000
    lp = S.log_softmax(rows(13, n=1, width=width, scale=1.5)[0])
    p = np.exp(lp.astype(np.float64))
    probs = np.exp(lp)
    n = 20_000
    counts = np.bincount([S.race(probs, 7, i) for i in range(n)], minlength=width)
    top = np.argsort(-p)[:5]
    np.testing.assert_allclose(counts[top] / n, p[top], atol=4 * np.sqrt(p[top] / n).max())
    thirds = [counts[i:i + 1000].sum() / n for i in range(0, width, 1000)]
    np.testing.assert_allclose(thirds, [p[i:i + 1000].sum() for i in range(0, width, 1000)],
                               atol=0.015)
    assert S.race(probs, 7, 3) == S.race(probs.copy(), 7, 3)  # only the seed and position


def coupled_rows(seed: int, width: int, closeness: float) -> tuple[np.ndarray, np.ndarray]:
    """A peaked mix and a drafter that agrees with it up to noise."""
    rng = np.random.default_rng(seed)
    shared = -1.5 * np.log(np.arange(1, width + 1))[rng.permutation(width)]
    p = S.log_softmax((shared + closeness * rng.standard_normal(width)).astype(np.float32))
    q = S.log_softmax((shared + closeness * rng.standard_normal(width)).astype(np.float32))
    return p, q


def test_race_coupling_accepts_near_the_optimum() -> None:
    """The same noise for draft and mix: P(same token) close to sum(min(p, q)) (at least
    (1 - tv) / (1 + tv) for Gumbel-max); the inverse-CDF coupling in token-id order reaches
    far less."""
    optimum, race, inverse = [], [], []
    for pos in range(300):
        p, q = coupled_rows(pos, 2000, 1.0)
        optimum.append(float(np.minimum(np.exp(p), np.exp(q)).sum()))
        race.append(S.race(np.exp(p), 1, pos) == S.race(np.exp(q), 1, pos))
        u = S.uniform_for(1, pos)
        inverse.append(S.draw(p, u) == S.draw(q, u))
    best = np.mean(optimum)  # 0.53
    assert np.mean(race) >= 0.8 * best  # 0.45
    assert np.mean(inverse) < 0.6 * best  # 0.29
