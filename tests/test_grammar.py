"""Grammar-constrained sampling: llama.cpp's grammar engine applied to the mix.

The grammar restricts the mixed distribution before the filters and the draw; the draw that
asks the grammar only as far as it must (:func:`sampler.grammar_pick`) equals the exact mask;
speculative decoding stays token-identical to plain decoding under a grammar; random-weight
models under a JSON-schema grammar still write JSON that validates.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from eft_local import backend, sampler
from eft_local.errors import EftError
from eft_local.sampler import SamplerSettings
from eft_local.session import LoadOptions, Session, Settings, load_session
from tests import ggufs
from tests.clihelp import THREADS, assert_one_line_error, run, stdout
from tests.fakes import EOG, decode
from tests.shapes import Point, Shape
from tests.test_speculative import fake_engine, weights_for


# -- the draw under a constraint equals the exact mask ----------------------------------------
@settings(max_examples=300, deadline=None)
@given(n=st.integers(2, 3000), density=st.sampled_from([0.001, 0.05, 0.5, 1.0]),
       data_seed=st.integers(0, 2**31), position=st.integers(0, 10_000),
       temperature=st.sampled_from([0.0, 0.7, 1.0, 1.5]), top_k=st.sampled_from([0, 1, 3, 50]),
       top_p=st.sampled_from([1.0, 0.9]), min_p=st.sampled_from([0.0, 0.05, 0.3]),
       seed=st.integers(0, 2**20))
def test_the_search_draws_what_the_exact_mask_draws(n: int, density: float, data_seed: int,
                                                   position: int, temperature: float,
                                                   top_k: int, top_p: float, min_p: float,
                                                   seed: int) -> None:
    rng = np.random.default_rng(data_seed)
    scores = (rng.standard_normal(n) * 3).astype(np.float32)
    scores[rng.random(n) < 0.1] = -np.inf  # ids outside the common range
    scores[0] = 0.5  # one id always inside
    allowed = (rng.random(n) < density) & np.isfinite(scores)
    if not allowed.any():
        allowed[int(np.flatnonzero(np.isfinite(scores))[0])] = True
    s = SamplerSettings(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
                        seed=seed)
    asked: list[int] = []

    def allows(ids: np.ndarray) -> np.ndarray:
        asked.append(len(ids))
        return allowed[ids]

    exact = scores.copy()
    exact[~allowed] = -np.inf
    want = sampler.make_sampler(s)(exact, position)
    got = sampler.grammar_pick(sampler.make_sampler(s), scores.copy(), s, position, allows)
    assert got.token == want.token
    assert allowed[got.token]
    if top_k or min_p or top_p < 1:  # the filtered set is known: so is the probability
        assert got.p == pytest.approx(want.p, rel=1e-4)
        assert got.p_top == pytest.approx(want.p_top, rel=1e-4)
    if top_p == 1 and not (top_k or min_p) and density == 1.0:
        assert sum(asked) <= 16  # the first candidate is allowed: one small question


def test_best_first_gives_every_finite_id_once_in_order() -> None:
    keys = np.random.default_rng(1).standard_normal(5000).astype(np.float32)
    keys[::7] = -np.inf
    chunks = list(sampler.best_first(keys, (16, 256, keys.size)))
    order = np.concatenate(chunks)
    assert sorted(order.tolist()) == np.flatnonzero(np.isfinite(keys)).tolist()
    assert (np.diff(keys[order]) <= 0).all()
    assert [len(c) for c in chunks][:2] == [16, 240]
    head = np.concatenate(list(sampler.best_first(keys)))
    assert head.tolist() == order[:head.size].tolist() and head.size <= 256


def test_a_constraint_that_allows_nothing_is_one_clear_error() -> None:
    s = SamplerSettings(seed=1)
    scores = np.zeros(50, dtype=np.float32)
    for settings_ in (s, SamplerSettings(top_k=3), SamplerSettings(top_p=0.5)):
        with pytest.raises(EftError, match="the grammar allows no token"):
            sampler.grammar_pick(sampler.make_sampler(settings_), scores.copy(), settings_, 3,
                                 lambda ids: np.zeros(len(ids), dtype=bool))


# -- plain and speculative decoding under a grammar ---------------------------------------------
class Alternating:
    """A pure-Python constraint: even and odd ids alternate; the end only after 4 tokens."""

    def __init__(self, count: int = 0) -> None:
        self.count = count

    def allowed(self, tokens: np.ndarray) -> np.ndarray:
        ids = np.asarray(tokens)
        return np.where(ids == EOG, self.count >= 4, ids % 2 == self.count % 2)

    def accept(self, token: int) -> None:
        assert self.allowed(np.array([token]))[0], "accepted a token the grammar refuses"
        self.count += 1

    def clone(self) -> Alternating:
        return Alternating(self.count)


@settings(max_examples=120, deadline=None)
@given(seed=st.integers(0, 2**20), temperature=st.sampled_from([0.0, 0.7, 1.0]),
       top_k=st.sampled_from([0, 3]), top_p=st.sampled_from([1.0, 0.8]),
       min_p=st.sampled_from([0.0, 0.1]), draft_k=st.sampled_from([None, 1, 3, 8]),
       formula=st.sampled_from(["up", "down"]), noise=st.sampled_from([0.1, 1.0]),
       max_tokens=st.integers(1, 30))
def test_speculative_equals_plain_under_a_grammar(seed: int, temperature: float, top_k: int,
                                                  top_p: float, min_p: float,
                                                  draft_k: int | None, formula: str,
                                                  noise: float, max_tokens: int) -> None:
    s = SamplerSettings(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
                        seed=seed)
    prompt = [5, 9, 14, 3]
    plain_engine, spec_engine = fake_engine(formula, noise=noise), fake_engine(formula,
                                                                               noise=noise)
    w = weights_for(plain_engine, formula, 1.0)
    plain = decode(plain_engine, prompt, w, s, max_tokens=max_tokens, grammar=Alternating())
    spec = decode(spec_engine, prompt, w, s, max_tokens=max_tokens, grammar=Alternating(),
                  draft_k=draft_k)
    assert [x.token for x in spec] == [x.token for x in plain]
    assert [x.finish for x in spec] == [x.finish for x in plain]
    tokens = [x.token for x in plain]
    for i, t in enumerate(tokens):
        assert (t == EOG and i >= 4) or (t != EOG and t % 2 == i % 2)


# -- llama.cpp's grammar engine over real (random-weight) models --------------------------------
@pytest.fixture(scope="module")
def trio(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    d = tmp_path_factory.mktemp("grammar")
    return [f"large_base={ggufs.write_model(d / 'large.gguf', seed=1, n_embd=64)}",
            f"small_ft={ggufs.write_model(d / 'ft.gguf', seed=2)}",
            f"small_base={ggufs.write_model(d / 'base.gguf', seed=3)}"]


def random_session(trio: list[str], **options: object) -> Session:
    return load_session(models=trio, options=LoadOptions(n_threads=1, n_ctx=1024,
                                                         **options))  # type: ignore[arg-type]


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_random_models_write_json_that_validates_and_speculation_changes_nothing(
        trio: list[str], temperature: float) -> None:
    schema = Shape.model_json_schema()
    with random_session(trio, speculative=False) as plain, \
            random_session(trio, speculative=True, draft_k=3) as spec:
        for seed in (1, 2, 3):
            a = plain.generate("Describe a shape", raw=False, json_schema=schema,
                               temperature=temperature, seed=seed, max_tokens=900)
            b = spec.generate("Describe a shape", raw=False, json_schema=schema,
                              temperature=temperature, seed=seed, max_tokens=900)
            assert a.finish == "eog", a.text
            Shape.model_validate_json(a.text)  # valid JSON of the schema, from random weights
            assert [x.token for x in b.steps] == [x.token for x in a.steps]
            assert b.text == a.text
        assert spec.engine.stats.drafted > 0


def test_the_grammar_allows_exactly_the_pieces_that_fit(trio: list[str]) -> None:
    with random_session(trio) as s:
        g = s.grammar('root ::= "hello" | "he"')
        ids = np.arange(s.vocab_size)
        pieces = [s.models["small_ft"].piece(int(t)) for t in ids]
        want = [bool(p) and (b"hello".startswith(p)) for p in pieces]
        assert g.allowed(ids).tolist() == want
        first = next(int(t) for t in ids if pieces[t] == b"he")
        copy = g.clone()
        copy.accept(first)
        after = copy.allowed(ids)
        assert after[[t for t in ids if pieces[t] == b"l"][0]]
        assert g.allowed(ids).tolist() == want  # the original state did not move
        assert s.is_eog(int(ids[after][-1])) or after.sum() >= 1
        with pytest.raises(EftError, match="does not fit the grammar"):
            copy.accept(first)  # "hehe" is not in the language: an error, not an abort


def test_diagnostics_give_the_probability_under_the_grammar(trio: list[str]) -> None:
    grammar = 'root ::= [a-z]+ "."'
    with random_session(trio) as s:
        r = s.generate("x", grammar=grammar, temperature=1.0, seed=4, max_tokens=1,
                       diagnostics=True)
        rows, weights, _role, _active = s.engine.last
        lp = s.engine.distribution(rows, weights, s.defaults.sampling)
        ok = s.grammar(grammar).allowed(np.arange(s.vocab_size))
        step = r.steps[0]
        want = np.exp(lp[step.token]) / np.exp(lp[ok]).sum()
        assert step.p_mix == pytest.approx(float(want), rel=1e-4)
        assert ok[step.token] and s.grammar(grammar).allowed(np.array([step.ref_token]))[0]


def test_settings_check_a_grammar_once_and_say_what_is_wrong() -> None:
    s = Settings(formula=load_defaults_formula())
    good = 'root ::= "yes" | "no"'
    backend.check_grammar.cache_clear()
    a = s.replace(grammar=good)
    b = a.replace(temperature=0.5)
    assert a.grammar == b.grammar == good
    assert backend.check_grammar.cache_info().misses == 1
    assert a.replace(grammar="").grammar is None
    with pytest.raises(EftError, match=r"invalid grammar: Undefined rule identifier 'nope'"):
        s.replace(grammar="root ::= nope")
    with pytest.raises(EftError, match="left recursion"):
        s.replace(grammar='root ::= root "a" | "b"')
    with pytest.raises(EftError, match="not both"):
        s.replace(grammar=good, json_schema={"type": "object"})
    with pytest.raises(EftError, match="cannot turn the JSON schema"):
        s.replace(json_schema={"type": "nonsense"})
    with pytest.raises(EftError, match="not valid JSON"):
        s.replace(json_schema="{")
    schema = s.replace(json_schema='{"type": "object", "properties": {"a": {"enum": [1, 2]}}}')
    assert "root ::=" in schema.grammar


def load_defaults_formula():  # noqa: ANN201
    from eft_local.formula import parse_formula

    return parse_formula("small_ft", roles=("small_ft",))


def test_json_strings_hold_no_raw_control_characters() -> None:
    grammar = backend.json_schema_grammar({"type": "string"})
    char = next(line for line in grammar.splitlines() if line.startswith("char ::="))
    assert r"\x00-\x1F" in char and r"\x7F" in char


# -- the command line -----------------------------------------------------------------------
def test_generate_with_a_json_schema_or_a_grammar_file(family, tmp_path: Path) -> None:
    schema = tmp_path / "shape.json"
    schema.write_text(json.dumps(Shape.model_json_schema()))
    out = run(["generate", *family.trio(), "Describe a shape", "--json-schema", str(schema),
               "-t", "0", "--max-tokens", "900", "--n-ctx", "1024", *THREADS])
    assert out.exit_code == 0, out.output
    Shape.model_validate_json(stdout(out))
    gbnf = tmp_path / "yn.gbnf"
    gbnf.write_text('root ::= "yes" | "no"\n')
    out = run(["generate", *family.trio(), "Is it?", "--grammar", str(gbnf), "-t", "1",
               "--seed", "3", *THREADS])
    assert out.exit_code == 0, out.output
    assert stdout(out) in ("yes\n", "no\n")


def test_bad_grammar_files_are_one_line_errors(family, tmp_path: Path) -> None:
    bad = tmp_path / "bad.gbnf"
    bad.write_text("root ::= (\n")
    assert_one_line_error(run(["generate", *family.trio(), "x", "--grammar", str(bad),
                               *THREADS]), "bad.gbnf", "invalid grammar")
    recursive = tmp_path / "lr.gbnf"
    recursive.write_text('root ::= root "a" | "b"\n')
    assert_one_line_error(run(["generate", *family.trio(), "x", "--grammar", str(recursive),
                               *THREADS]), "lr.gbnf", "left recursion")
    nonsense = tmp_path / "bad.json"
    nonsense.write_text('{"type": 3}')
    assert_one_line_error(run(["generate", *family.trio(), "x", "--json-schema",
                               str(nonsense), *THREADS]), "bad.json", "JSON schema")
    broken = tmp_path / "broken.json"
    broken.write_text("{")
    assert_one_line_error(run(["generate", *family.trio(), "x", "--json-schema",
                               str(broken), *THREADS]), "broken.json", "not valid JSON")
    assert_one_line_error(run(["generate", *family.trio(), "x", "--json-schema",
                               str(tmp_path / "missing.json"), *THREADS]), "missing.json",
                          "not found")
    assert_one_line_error(run(["generate", *family.trio(), "x", "--json-schema",
                               str(broken), "--grammar", str(bad), *THREADS]), "not both")


def test_batch_records_carry_their_own_schema_or_grammar(family, tmp_path: Path) -> None:
    lines = [{"id": "s", "prompt": "Describe a shape",
              "json_schema": Shape.model_json_schema(), "max_tokens": 900},
             {"id": "g", "prompt": "Is it?", "grammar": 'root ::= "yes" | "no"'},
             {"id": "bad", "prompt": "x", "grammar": "root ::= ("},
             {"id": "both", "prompt": "x", "grammar": 'root ::= "a"', "json_schema": {}},
             {"id": "free", "prompt": "Is it?", "max_tokens": 3}]
    batch = tmp_path / "in.jsonl"
    batch.write_text("".join(json.dumps(x) + "\n" for x in lines))
    out = run(["generate", *family.trio(), "--input", str(batch), "-t", "0", "--n-ctx",
               "1024", *THREADS])
    assert out.exit_code == 0, out.output
    records = {r["id"]: r for r in map(json.loads, stdout(out).splitlines())}
    Shape.model_validate_json(records["s"]["text"])
    assert records["g"]["text"] in ("yes", "no")
    assert "invalid grammar" in records["bad"]["error"]
    assert "not both" in records["both"]["error"]
    assert records["free"]["finish"] in ("length", "eog")


def test_repl_grammar_on_and_off(family, tmp_path: Path) -> None:
    gbnf = tmp_path / "yn.gbnf"
    gbnf.write_text('root ::= "yes" | "no"\n')
    schema = tmp_path / "point.json"
    schema.write_text(json.dumps(Point.model_json_schema()))
    script = (f"/grammar {gbnf}\nIs it?\n/grammar\n/grammar {schema}\nWhere?\n"
              f"/grammar {tmp_path / 'none.gbnf'}\n/grammar off\n/grammar\n")
    out = run(["chat", *family.trio(), "-t", "0", "--max-tokens", "200", "--n-ctx", "1024",
               *THREADS], input=script)
    assert out.exit_code == 0, out.output
    lines = stdout(out).splitlines()
    assert lines[lines.index(">>> Is it?") + 1] in ("yes", "no")
    text = stdout(out)
    assert "replies follow the grammar in" in text and "grammar: on" in text
    assert "replies follow the JSON schema in" in text
    point = next(line for line in lines if line.startswith("{"))
    Point.model_validate_json(point)
    assert "none.gbnf: file not found" in out.stderr
    assert "grammar off" in text and text.rstrip().endswith("grammar: off\n>>>")


def test_the_utf8_guard_keeps_text_well_formed() -> None:
    from eft_local import utf8

    for bad in (b"\xc1\x81", b"\xe0\x80\x80", b"\xed\xa0\x80", b"\xf4\x90\x80\x80", b"\xf5",
                b"\x80", b"\xc3A"):
        assert utf8.scan(bad) is None, bad
    for good in ("é", "€", "😀", "a"):
        assert utf8.scan(good.encode()) == utf8.START
    pieces = utf8.Pieces([b"", b"a", b"\xc3", b"\xa9", b"\xa9b", b"\xe2\x82", b"\xac"], eog=[0])
    guard = utf8.Utf8Guard(pieces)
    ids = np.arange(7)
    assert guard.allowed(ids).tolist() == [True, True, True, False, False, True, False]
    copy = guard.clone()
    copy.accept(2)  # half of an "é": only its continuation may follow, not the end
    assert copy.allowed(ids).tolist() == [False, False, False, True, True, False, True]
    copy.accept(4)
    assert copy.state == utf8.START and guard.state == utf8.START
