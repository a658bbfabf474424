"""Number ranges as grammar rules (:mod:`eft_local.ranges`): every text a range's rule
allows is a value in the range, and every value in the range is allowed, over random bounds
(checked on the rules read as regular expressions, and a few through llama.cpp's own grammar
engine)."""

from __future__ import annotations

import re
from decimal import Decimal

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from eft_local import ranges
from eft_local.errors import EftError
from eft_local.schema import schema_grammar


def regex(rule: str) -> re.Pattern[str]:
    """A range rule read as a Python regular expression (its items are literals, classes,
    groups, ``|``, ``?`` and ``{m,n}``, which mean the same in both)."""
    assert set(re.sub(r'"[-.]"', "", rule)) <= set("[]0123456789-(){},|? "), rule
    return re.compile(rule.replace('"-"', r"\-").replace('"."', r"\.").replace(" ", ""))


BOUND = st.one_of(st.none(), st.integers(-10**6, 10**6), st.integers(-10**15, 10**15))


@settings(max_examples=300, deadline=None)
@given(low=BOUND, high=BOUND, values=st.lists(st.integers(-2 * 10**6, 2 * 10**6), max_size=40),
       data=st.data())
def test_an_integer_rule_holds_exactly_the_integers_in_its_range(
        low: int | None, high: int | None, values: list[int], data: st.DataObject) -> None:
    if low is not None and high is not None and low > high:
        low, high = high, low
    pattern = regex(ranges.integer_rule(low, high))
    near = [b + d for b in (low, high) if b is not None for d in (-2, -1, 0, 1, 2)]
    for v in [*values, *near, 0, -1, 1]:
        inside = (low is None or v >= low) and (high is None or v <= high)
        assert bool(pattern.fullmatch(str(v))) == inside, (low, high, v)
    for text in ("-0", "00", "01", "-01", "+1", "1.0", "1e3", ""):
        assert not pattern.fullmatch(text)
    for _ in range(5):  # texts the rule writes: JSON integers in the range
        text = data.draw(st.from_regex(pattern, fullmatch=True))
        assert text == str(int(text))
        assert (low is None or int(text) >= low) and (high is None or int(text) <= high)


DECIMAL = st.decimals(min_value=-10**4, max_value=10**4, places=3, allow_nan=False,
                      allow_infinity=False)


def fixed(value: Decimal) -> str:
    """A decimal as JSON writes it without an exponent (no -0)."""
    text = format(value.normalize(), "f")
    return "0" if text in ("-0", "0") else text


@settings(max_examples=300, deadline=None)
@given(low=st.one_of(st.none(), DECIMAL), high=st.one_of(st.none(), DECIMAL),
       low_open=st.booleans(), high_open=st.booleans(),
       values=st.lists(DECIMAL, max_size=40), data=st.data())
def test_a_number_rule_holds_exactly_the_numbers_in_its_range(
        low: Decimal | None, high: Decimal | None, low_open: bool, high_open: bool,
        values: list[Decimal], data: st.DataObject) -> None:
    if low is not None and high is not None and (low > high or low == high and (
            low_open or high_open)):
        return  # no number: refused by range_rule (below)
    pattern = regex(ranges.number_rule(low, low_open, high, high_open))
    step = Decimal("0.001")
    near = [b + d * step for b in (low, high) if b is not None for d in (-1, 0, 1)]

    def inside(v: Decimal) -> bool:
        return ((low is None or v > low or v == low and not low_open)
                and (high is None or v < high or v == high and not high_open))

    for v in [*values, *near, Decimal(0), Decimal("-0.5"), Decimal("0.5")]:
        text = fixed(v)
        assert bool(pattern.fullmatch(text)) == inside(v), (low, low_open, high, high_open, text)
        if "." in text:  # trailing zeros change nothing
            assert bool(pattern.fullmatch(text + "00")) == inside(v)
        elif text.lstrip("-") != "0":
            assert bool(pattern.fullmatch(text + ".0")) == inside(v)
    for text in ("-0", "-0.0", "00", "01.5", "+1", "1.", ".5", "1e3", ""):
        assert not pattern.fullmatch(text)
    for _ in range(5):
        text = data.draw(st.from_regex(pattern, fullmatch=True))
        assert inside(Decimal(text)) and not text.startswith("-0") or text.startswith("-0.")
        assert inside(Decimal(text))


@pytest.mark.parametrize(("schema", "integer", "inside", "outside"), [
    ({"minimum": 0, "maximum": 3000}, True, ["0", "7", "3000", "999"], ["-1", "3001", "1.5"]),
    ({"exclusiveMinimum": 0, "exclusiveMaximum": 10}, True, ["1", "9"], ["0", "10"]),
    ({"minimum": 0.5, "maximum": 2.5}, True, ["1", "2"], ["0", "3"]),
    ({"minimum": 5, "exclusiveMinimum": True}, True, ["6"], ["5"]),  # draft 4
    ({"minimum": 1, "exclusiveMinimum": 3}, True, ["4"], ["3", "2"]),  # the tighter bound
    ({"exclusiveMinimum": 0, "maximum": 1}, False, ["0.5", "1", "1.0", "0.0001"],
     ["0", "0.0", "1.5", "-0.5"]),
    ({"minimum": -1.5, "exclusiveMaximum": -0.25}, False, ["-1.5", "-1", "-0.3"],
     ["-0.25", "-0.2", "0", "-1.6"]),
    ({"maximum": 1e-20, "minimum": 0}, False, ["0", "0.000"], ["0.0000000000000001"]),
    ({"minimum": -1e300}, True, ["-9999999999999999", "0"], ["-10000000000000000"]),
])
def test_a_range_keyword_set_becomes_its_rule(schema: dict, integer: bool, inside: list[str],
                                              outside: list[str]) -> None:
    pattern = regex(ranges.range_rule(schema, integer=integer))
    assert [t for t in inside if not pattern.fullmatch(t)] == []
    assert [t for t in outside if pattern.fullmatch(t)] == []


@pytest.mark.parametrize(("schema", "words"), [
    ({"type": "integer", "minimum": 5, "maximum": 4}, "the range at schema holds no integer"),
    ({"type": "integer", "exclusiveMinimum": 4, "exclusiveMaximum": 5}, "holds no integer"),
    ({"type": "number", "minimum": 1, "exclusiveMaximum": 1}, "holds no number"),
    ({"type": "object", "properties": {"a": {"type": "integer", "minimum": "3"}}},
     "'minimum' at schema.properties.a is '3'; it must be a number"),
    ({"type": "integer", "minimum": 1e20}, "'minimum' at schema is 1e+20: a grammar writes "
     "integers of at most 16 digits"),
])
def test_a_range_that_cannot_hold_a_value_is_refused_where_it_is(schema: dict,
                                                                  words: str) -> None:
    with pytest.raises(EftError, match=re.escape(words)):
        schema_grammar(schema)


def test_ranges_pass_through_the_converter_into_llamas_grammar_engine(
        tmp_path: pytest.TempPathFactory) -> None:
    from eft_local.backend import Grammar, LlamaModel
    from tests import ggufs

    model = LlamaModel(ggufs.write_model(tmp_path / "m.gguf"), n_ctx=64, n_threads=1)
    schema = {"type": "object", "properties": {
        "year": {"type": "integer", "minimum": -20, "maximum": 3000},
        "share": {"type": ["number", "null"], "exclusiveMinimum": 0, "maximum": 1}},
        "required": ["year", "share"]}
    text = schema_grammar(schema)
    byte = {chr(b): 5 + b for b in range(256)}  # ggufs' byte tokens follow the 5 specials

    def accepts(reply: str) -> bool:
        grammar = Grammar(model, text)
        for ch in reply:
            token = byte[ch]
            if not grammar.allowed([token])[0]:
                return False
            grammar.accept(token)
        return True

    for year, share in (("2024", "0.5"), ("-20", "1"), ("0", "null"), ("3000", "0.001")):
        assert accepts(f'{{"year": {year}, "share": {share}}}'), (year, share)
    for year, share in (("3001", "0.5"), ("-21", "1"), ("2024", "0"), ("1", "1.5"),
                        ("01", "0.5"), ("-0", "0.5"), ("2e3", "0.5")):
        assert not accepts(f'{{"year": {year}, "share": {share}}}'), (year, share)
