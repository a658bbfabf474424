"""Penalties on the mix (logit bias, repetition, DRY) against hand-worked values and against
llama.cpp's own samplers, run through llama-cpp-python on the same scores and tokens."""

from __future__ import annotations

import ctypes
import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from eft_local import penalties as P
from eft_local.engine import Engine
from eft_local.errors import EftError
from eft_local.sampler import SamplerSettings
from tests import ggufs
from tests.fakes import FakeModel


def penalize(scores: list[float], history: list[int], **knobs: object) -> np.ndarray:
    link = P.make_penalties(SamplerSettings(**knobs), width=len(scores))  # type: ignore[arg-type]
    out = np.array(scores, dtype=np.float32)
    return out if link is None else link(out, history)


# -- hand-worked values ------------------------------------------------------------------------
def test_repetition_penalties_by_hand() -> None:
    # token 0 seen twice, 1 and 2 once, 3 never; repeat 2 divides a positive score and
    # multiplies a negative one, then count * 0.5 + 0.25 comes off
    got = penalize([2.0, -1.0, 0.5, 3.0], [0, 1, 0, 2], repeat_penalty=2.0,
                   frequency_penalty=0.5, presence_penalty=0.25)
    np.testing.assert_array_equal(got, np.float32([2 / 2 - 1.25, -1 * 2 - 0.75,
                                                   0.5 / 2 - 0.75, 3.0]))


def test_repeat_last_n_is_a_window_of_the_last_tokens() -> None:
    knobs = {"repeat_penalty": 2.0, "frequency_penalty": 0.5, "presence_penalty": 0.25}
    # only [0, 2] are looked at: 0 once now, 1 not at all
    np.testing.assert_array_equal(penalize([2.0, -1.0, 0.5, 3.0], [0, 1, 0, 2],
                                           repeat_last_n=2, **knobs),
                                  np.float32([1.0 - 0.75, -1.0, 0.25 - 0.75, 3.0]))
    whole = penalize([2.0, -1.0, 0.5, 3.0], [0, 1, 0, 2] * 40, repeat_last_n=-1, **knobs)
    assert whole[0] == np.float32(1.0 - (80 * 0.5 + 0.25))  # -1: all 160 tokens count
    assert penalize([2.0, -1.0], [0, 1], repeat_last_n=0, **knobs).tolist() == [2.0, -1.0]


def test_dry_penalises_the_token_that_extends_a_repeat() -> None:
    # "0 1 2 0 1": the text ends with "0 1", which occurred before followed by 2, so 2 would
    # extend a repeat of length 2 = allowed length: it loses 1.0 * 1.1 ** 0
    got = penalize([0.0] * 4, [0, 1, 2, 0, 1], dry_multiplier=1.0, dry_base=1.1,
                   dry_allowed_length=2, dry_penalty_last_n=5)
    assert got.tolist() == [0.0, 0.0, -1.0, 0.0]
    # "0 1 2 3 0 1 2": 3 would extend "0 1 2", one longer than allowed: 2 * 3 ** 1
    got = penalize([0.0] * 5, [0, 1, 2, 3, 0, 1, 2], dry_multiplier=2.0, dry_base=3.0,
                   dry_allowed_length=2, dry_penalty_last_n=-1)
    assert got.tolist() == [0.0, 0.0, 0.0, -6.0, 0.0]
    # the same repeat with a longer allowed length, or a window too short to hold it: none
    assert not penalize([0.0] * 5, [0, 1, 2, 3, 0, 1, 2], dry_multiplier=2.0,
                        dry_allowed_length=4).any()
    assert not penalize([0.0] * 5, [0, 1, 2, 3, 0, 1, 2], dry_multiplier=2.0,
                        dry_penalty_last_n=4).any()


def test_dry_exponent_is_capped_below_float32_overflow() -> None:
    loop = [0, 1] * 200
    got = penalize([0.0, 0.0, 0.0], loop, dry_multiplier=1.0, dry_base=10.0,
                   dry_penalty_last_n=-1)
    cap = int(np.float32(88.7228391) / np.log(np.float32(10.0)))  # 38
    assert got[0] == -np.float32(10.0 ** cap) and np.isfinite(got).all()


def test_restart_sequences_of_a_toy_vocabulary() -> None:
    index = P.PieceIndex([b"x", b"a", b"b", b"ab", b"za", b":", b"q:", b"", b"aba"])
    tokens = {"b": [2], "a": [1], "ba": [2, 1]}
    got = P.restart_sequences("ab", index, lambda text: tokens[text])
    # "ab" and "aba" hold the breaker; "a" and "za" end with its beginning, "b" must follow
    assert got == [(1, (2,)), (3, ()), (4, (2,)), (8, ())]
    assert P.restart_sequences(":", index, lambda text: tokens[text]) == [(5, ()), (6, ())]
    # "aba" against "abab": held nowhere; "aba" ends with "aba" (then "b") and with "a"
    # (then "bab": cut), "ab" ends with "ab" (then "ab"), "a", "za" with "a"
    tokens.update({"bab": [2, 1, 2], "ab": [3]})
    assert P.restart_sequences("abab", index, lambda text: tokens[text]) == [
        (1, (2, 1, 2)), (3, (3,)), (4, (2, 1, 2)), (8, (2,)), (8, (2, 1, 2))]


def reference_restarts(text: str, pieces: list[bytes], tokenize) -> set:
    """llama.cpp's loop, token by token (what :func:`P.restart_sequences` vectorises)."""
    word = text.encode()[:P.BREAKER_BYTES]
    out = set()
    for token, piece in enumerate(pieces):
        if word in piece:
            out.add((token, ()))
            continue
        for pos in range(len(piece)):
            size = len(piece) - pos
            if size < len(word) and piece[pos:] == word[:size]:
                out.add((token, tuple(tokenize(word[size:].decode())[:P.TAIL_TOKENS])))
    return out


@settings(max_examples=200, deadline=None)
@given(pieces=st.lists(st.binary(max_size=6).map(lambda b: bytes(97 + x % 3 for x in b)),
                       max_size=40),
       text=st.text("abc", min_size=1, max_size=6))
def test_restart_sequences_equal_llama_cpps_loop(pieces: list[bytes], text: str) -> None:
    def tokenize(rest: str) -> list[int]:
        return [ord(c) for c in rest]

    got = P.restart_sequences(text, P.PieceIndex(pieces), tokenize)
    assert set(got) == reference_restarts(text, pieces, tokenize)
    assert len(got) == len(set(got)) and got == sorted(got, key=lambda x: x[0])


def test_a_breaker_stops_a_repeat_from_reaching_back() -> None:
    breakers = {3: ((),)}  # token 3 alone is a breaker
    link = P.dry_link(1.0, 1.1, 2, 64, breakers)
    # "0 1 3 4 0 1": the repeat "0 1" -> 3, but 3 is a breaker: no penalty at all
    assert not link(np.zeros(5, dtype=np.float32), [0, 1, 3, 4, 0, 1]).any()
    # "0 1 2 0 1 3 0 1": 3 came last but one ago, so "0 1" (2 tokens) is the longest repeat
    # allowed to count; "0 1" -> 2 and "0 1" -> 3 both occurred: 2 is penalised, 3 not
    got = link(np.zeros(5, dtype=np.float32), [0, 1, 2, 0, 1, 3, 0, 1])
    assert got.tolist() == [0.0, 0.0, -1.0, 0.0, 0.0]
    # a two-token breaker "4 2": after it, repeats reach back only to its end
    two = P.dry_link(1.0, 1.1, 1, 64, {4: ((2,),)})
    assert two(np.zeros(5, dtype=np.float32), [0, 1, 4, 2, 0, 1, 0]).tolist() == [
        0.0, -1.0, 0.0, 0.0, 0.0]  # "0" -> 1 seen before: 1 extends "0"
    # "0 4 2 1 9 0 4 2 1": without breakers 9 extends "0 4 2 1" (4 tokens); after the
    # breaker "4 2" only "1" counts, shorter than allowed
    loop = [0, 4, 2, 1, 9, 0, 4, 2, 1]
    free = P.dry_link(1.0, 1.1, 2, 64, {})(np.zeros(10, dtype=np.float32), loop)
    assert free[9] == -np.float32(1.1 ** 2) and np.count_nonzero(free) == 1
    assert not P.dry_link(1.0, 1.1, 2, 64, {4: ((2,),)})(np.zeros(10, dtype=np.float32),
                                                          loop).any()


def test_logit_bias_adds_and_bans() -> None:
    got = penalize([1.0, 2.0, 3.0], [], logit_bias={0: 5.0, 2: -math.inf})
    assert got.tolist() == [6.0, 2.0, -math.inf]
    # pairs given twice add up, as llama.cpp adds each entry
    assert SamplerSettings(logit_bias=((1, 2.0), (1, 3.0))).logit_bias == ((1, 5.0),)
    with pytest.raises(EftError, match=r"logit_bias: token id 3 is outside the vocabulary "
                       r"the models share \(0\.\.2\)"):
        P.make_penalties(SamplerSettings(logit_bias={3: 1.0}), width=3)


def test_penalties_apply_in_llama_cpps_order() -> None:
    # token 2: bias first (2 -> 4), then repeat (4 / 2 = 2), then DRY's 1.0 -> 1.0; any other
    # order gives another number (repeat first: 2 / 2 + 2 - 1 = 2; DRY first: 1.5)
    got = penalize([0.0, 0.0, 2.0], [0, 1, 2, 0, 1], logit_bias={2: 2.0}, repeat_penalty=2.0,
                   repeat_last_n=3, dry_multiplier=1.0, dry_base=1.1)
    assert got.tolist() == [0.0, 0.0, 1.0]  # 0 * 2 stays 0


def test_every_default_is_neutral() -> None:
    s = SamplerSettings()
    assert not s.penalized and P.make_penalties(s, width=10) is None
    assert not SamplerSettings(repeat_penalty=1.3, repeat_last_n=0).penalized
    assert not SamplerSettings(dry_multiplier=0.8, dry_penalty_last_n=0).penalized
    assert SamplerSettings(presence_penalty=0.1).penalized


@pytest.mark.parametrize(("knobs", "message"), [
    ({"repeat_penalty": 0}, r"invalid repeat_penalty 0: must be a finite number > 0 \(1 = off\)"),
    ({"repeat_penalty": math.inf}, "invalid repeat_penalty inf"),
    ({"repeat_penalty": 1e-300}, "invalid repeat_penalty"),
    ({"frequency_penalty": 2.5}, r"invalid frequency_penalty 2.5: must be in \[-2, 2\]"),
    ({"presence_penalty": -3}, r"invalid presence_penalty -3: must be in \[-2, 2\]"),
    ({"presence_penalty": math.nan}, "invalid presence_penalty nan"),
    ({"repeat_last_n": -2}, r"invalid repeat_last_n -2: must be an integer >= -1 "
     r"\(-1 = the whole context, 0 = off\)"),
    ({"repeat_last_n": 1.5}, "invalid repeat_last_n 1.5"),
    ({"dry_multiplier": -1}, r"invalid dry_multiplier -1: must be a finite number >= 0"),
    ({"dry_base": 0.9}, r"invalid dry_base 0.9: must be a finite number >= 1"),
    ({"dry_allowed_length": -1}, "invalid dry_allowed_length -1: must be an integer >= 0"),
    ({"dry_penalty_last_n": True}, "invalid dry_penalty_last_n True"),
    ({"dry_sequence_breakers": "\n"}, "invalid dry_sequence_breakers '\\\\n': must be a list "
     "of at most 32 non-empty strings"),
    ({"dry_sequence_breakers": ("",)}, "invalid dry_sequence_breakers"),
    ({"dry_sequence_breakers": ("x",) * 33}, "invalid dry_sequence_breakers"),
    ({"logit_bias": {5: 101}}, r"invalid logit_bias \{5: 101\}: must be token id -> bias, "
     r"each bias in \[-100, 100\] or -inf \(banned\)"),
    ({"logit_bias": {-1: 1}}, r"invalid logit_bias \{-1: 1\}: must be a token id"),
    ({"logit_bias": {"5": 1}}, "invalid logit_bias"),
    ({"logit_bias": 5}, "invalid logit_bias 5"),
])
def test_bad_values_are_one_line_errors_naming_the_field(knobs: dict, message: str) -> None:
    with pytest.raises(EftError, match=message) as info:
        SamplerSettings(**knobs)
    assert "\n" not in str(info.value).replace("'\\n'", "")


# -- the mix -----------------------------------------------------------------------------------
def engine_of(n_vocab: int = 12) -> Engine:
    models = {r: FakeModel(seed=i + 1, n_vocab=n_vocab) for i, r in
              enumerate(("large_base", "small_ft", "small_base"))}
    return Engine(models, template_role="small_ft", allowed=np.ones(n_vocab, dtype=bool))


def test_penalties_act_on_the_mix_before_temperature_and_report_plain_logprobs() -> None:
    eng = engine_of()
    rows = np.random.default_rng(1).standard_normal((3, 12)).astype(np.float32)
    w = np.array([1.0, 1.5, -1.5], dtype=np.float32)
    mix = rows[0] + 1.5 * rows[1] - 1.5 * rows[2]
    best = int(np.argmax(mix))
    greedy = SamplerSettings(temperature=0.0)
    plain = eng.choose(rows, w, greedy, 5, top_n=3, history=[best])
    assert plain.token == best
    banned = eng.choose(rows, w, SamplerSettings(temperature=0.0, logit_bias={best: -math.inf}),
                        5, top_n=3, history=[best])
    assert banned.token == int(np.argsort(-mix)[1])
    assert banned.top == plain.top and banned.logprob is not None  # log-probs: no penalties
    # a repeat penalty on the mix's own score: divided when positive, multiplied when not
    s = SamplerSettings(temperature=0.0, repeat_penalty=1e6)
    assert eng.choose(rows, w, s, 5, history=[best]).token != best
    # the same penalty at a high temperature: the penalised token is still penalised
    hot = SamplerSettings(temperature=1e3, seed=3, logit_bias={best: -math.inf})
    assert all(eng.choose(rows, w, hot, p, history=[best]).token != best for p in range(50))


def test_why_shows_the_penalised_mix() -> None:
    eng = engine_of()
    rows = np.random.default_rng(2).standard_normal((3, 12)).astype(np.float32)
    w = np.array([1.0, 1.0, -1.0], dtype=np.float32)
    s = SamplerSettings(temperature=0.0, logit_bias={0: -math.inf, 1: -math.inf})
    eng.choose(rows, w, s, 3, history=[4])
    assert {t for t, _ in eng.why(s, 12)["mix"] if _ > 0} <= set(range(2, 12))
    eng.choose(rows, w, SamplerSettings(), 3)
    assert len(eng.why(SamplerSettings(), 12)["mix"]) == 12


# -- against llama.cpp's samplers ------------------------------------------------------------
def llama_apply(sampler: object, scores: np.ndarray, history: list[int]) -> np.ndarray:
    """``scores`` after llama.cpp's ``sampler`` has accepted ``history`` (then freed)."""
    import llama_cpp as L

    for token in history:
        L.llama_sampler_accept(sampler, token)
    n = scores.size
    data = (L.llama_token_data * n)()
    for i in range(n):
        data[i].id, data[i].logit, data[i].p = i, float(scores[i]), 0.0
    arr = L.llama_token_data_array(data=data, size=n, selected=-1, sorted=False)
    L.llama_sampler_apply(sampler, ctypes.byref(arr))
    out = np.empty(n, dtype=np.float32)
    for i in range(arr.size):
        out[data[i].id] = data[i].logit
    L.llama_sampler_free(sampler)
    return out


def test_repetition_penalties_equal_llama_cpps_bit_for_bit() -> None:
    import llama_cpp as L

    rng = np.random.default_rng(0)
    changed = 0
    for _ in range(150):
        n = 20
        scores = (rng.standard_normal(n) * 3).astype(np.float32)
        history = rng.integers(0, n, rng.integers(1, 80)).tolist()
        last_n = int(rng.choice([-1, 1, 5, 64]))
        knobs = {"repeat_penalty": float(rng.choice([1.0, 0.7, 1.3, 2.0])),
                 "frequency_penalty": float(rng.choice([0.0, 0.5, -1.2])),
                 "presence_penalty": float(rng.choice([0.0, 1.5, -0.3]))}
        ours = penalize(scores.tolist(), history, repeat_last_n=last_n, **knobs)
        theirs = llama_apply(L.llama_sampler_init_penalties(
            n, len(history) if last_n == -1 else last_n, *knobs.values()), scores, history)
        np.testing.assert_array_equal(ours, theirs)
        changed += not np.array_equal(theirs, scores)
    assert changed > 100


class _Vocab:
    """A GGUF file's vocabulary through llama.cpp: what :class:`P.BreakerTable` reads."""

    def __init__(self, vocab: object, n_vocab: int) -> None:
        self.vocab, self.n_vocab = vocab, n_vocab

    def piece(self, token: int, *, special: bool = False) -> bytes:
        import llama_cpp as L

        buf = ctypes.create_string_buffer(64)
        n = L.llama_token_to_piece(self.vocab, token, buf, 64, 0, special)
        return buf.raw[:n]

    def tokenize(self, text: str, *, add_bos: bool, special: bool) -> list[int]:
        import llama_cpp as L

        raw = text.encode()
        out = (L.llama_token * (len(raw) + 8))()
        n = L.llama_tokenize(self.vocab, raw, len(raw), out, len(raw) + 8, add_bos, special)
        return list(out[:n])


def test_dry_equals_llama_cpps_bit_for_bit(tmp_path: Path) -> None:
    import llama_cpp as L

    params = L.llama_model_default_params()
    params.vocab_only = True
    model = L.llama_model_load_from_file(str(ggufs.write_model(tmp_path / "m.gguf")).encode(),
                                         params)
    try:
        vocab = L.llama_model_get_vocab(model)
        words = _Vocab(vocab, L.llama_vocab_n_tokens(vocab))
        table = P.BreakerTable(words)
        rng = np.random.default_rng(1)
        letters = list("helo tn:\n*\"ab")  # merges he, ll, hell, th, an...: multi-token breakers
        changed = 0
        for trial in range(160):
            chunk = "".join(rng.choice(letters, rng.integers(1, 8)))
            loops = int(rng.integers(1, 6)) if trial % 3 else int(rng.integers(20, 60))
            text = ("".join(rng.choice(letters, rng.integers(0, 40))) + chunk * loops
                    + chunk[: int(rng.integers(0, len(chunk) + 1))])
            history = words.tokenize(text, add_bos=False, special=False)
            scores = (rng.standard_normal(words.n_vocab) * 3).astype(np.float32)
            breakers = [["\n", ":", "\"", "*"], ["hello", "o t"], [], ["ll", "an"]][trial % 4]
            knobs = {"dry_multiplier": float(rng.choice([0.8, 1.0, 2.5])),
                     "dry_base": float(rng.choice([1.0, 1.1, 1.75, 3.0, 10.0])),
                     "dry_allowed_length": int(rng.choice([0, 1, 2, 4]))}
            last_n = int(rng.choice([-1, 8, 64, 512]))
            link = P.make_penalties(SamplerSettings(**knobs, dry_penalty_last_n=last_n,
                                                    dry_sequence_breakers=tuple(breakers)),
                                    width=words.n_vocab, breakers=table)
            assert link is not None
            ours = link(scores.copy(), history)
            names = (ctypes.c_char_p * max(1, len(breakers)))(*[b.encode() for b in breakers])
            theirs = llama_apply(L.llama_sampler_init_dry(
                vocab, *knobs.values(), len(history) if last_n == -1 else last_n, names,
                len(breakers)), scores, history)
            np.testing.assert_array_equal(ours, theirs, err_msg=f"{text!r} {breakers} {knobs}")
            changed += not np.array_equal(theirs, scores)
        assert changed > 80
    finally:
        L.llama_model_free(model)


def test_a_ban_holds_under_a_grammar_and_in_speculative_decoding() -> None:
    from eft_local.session import LoadOptions, load_session

    grammar = 'root ::= "yes" | "no"'
    ask = {"raw": False, "grammar": grammar, "temperature": 0.0, "max_tokens": 4}
    with load_session("tiny-up", options=LoadOptions(n_threads=1)) as s:
        plain = s.generate("Is Has Zhithdou an astronomer?", **ask).text
        first = s.tokenize(plain, add_bos=False)[0]
        banned = s.generate("Is Has Zhithdou an astronomer?", logit_bias={first: -math.inf},
                            **ask).text
        assert {plain, banned} == {"yes", "no"}
        # a long greedy reply under every penalty: speculative gives the plain tokens
        knobs = {"temperature": 0.0, "max_tokens": 40, "repeat_penalty": 1.2,
                 "frequency_penalty": 0.3, "dry_multiplier": 0.8, "logit_bias": {first: -5}}
        spec = s.generate("Has Zhithdou was born in", **knobs)
        assert s.engine.stats.drafted > 0
        s.options = replace(s.options, speculative=False)
        assert s.generate("Has Zhithdou was born in", **knobs).text == spec.text
