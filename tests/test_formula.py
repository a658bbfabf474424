"""Formulas are data: parsed once, evaluated to weights per role."""

from __future__ import annotations

import pytest

from eft_local.errors import EftError
from eft_local.formula import PRESET_FORMULAS, parse_formula


def test_up_scaling_weights_follow_beta() -> None:
    f = parse_formula("up")
    assert f.roles == ("large_base", "small_ft", "small_base")
    assert f.weights() == {"large_base": 1.0, "small_ft": 1.0, "small_base": -1.0}
    assert f.weights({"beta": 0.0}) == {"large_base": 1.0, "small_ft": 0.0, "small_base": 0.0}
    assert f.weights({"beta": 2.5})["small_base"] == -2.5


def test_every_method_form_is_expressible() -> None:
    down = parse_formula("down").weights({"beta": 1.0})
    assert down == {"small_base": 1.0, "large_ft": 1.0, "large_base": -1.0}
    amp = parse_formula("amplified").weights({"beta": 2.0})
    assert amp == {"small_ft": 1.0, "large_base": 2.0, "small_base": -2.0}
    mix = parse_formula("interpolate").weights({"lam": 0.25, "beta": 1.0})
    assert mix == pytest.approx({"large_base": 1.0, "small_ft": 0.25, "small_base": -1.0,
                                 "small_ft_alt": 0.75})


def test_free_form_and_roles_check() -> None:
    f = parse_formula("0.5*a + 0.5*b - c/2", roles=("a", "b", "c"))
    assert f.weights() == {"a": 0.5, "b": 0.5, "c": -0.5}
    assert "- 0.5*c" in f.describe()
    with pytest.raises(EftError, match="role 'd'"):
        parse_formula("a + d", roles=("a", "b"))


@pytest.mark.parametrize("text,message", [
    ("a * b", "not linear"), ("beta", "names no model"), ("1 + a", "cannot add a number"),
    ("a / b", "cannot divide"), ("a / 0", "division by zero"), ("a.b", "not allowed"),
    ("f(a)", "not allowed"), ("a +", "syntax error"), ("a - a", "weight 0"),
    ("'x' * a", "not a number"),
])
def test_bad_formulas_are_one_line_errors(text: str, message: str) -> None:
    with pytest.raises(EftError, match=message) as err:
        parse_formula(text)
    assert "\n" not in str(err.value)


def test_shorthands_parse() -> None:
    for name in PRESET_FORMULAS:
        assert parse_formula(name).text == PRESET_FORMULAS[name]


@pytest.mark.parametrize("text,base", [
    ("up", "large_base"), ("down", "small_base"), ("amplified", "small_ft"),
    ("interpolate", "large_base"), ("small_ft", "small_ft"),
    ("large_base + 1.5 * (small_ft - small_base)", None), ("0.5*a + 0.5*b", None),
    ("a / lam", None), ("2 * a", None),
])
def test_base_role_is_the_mix_at_knobs_zero(text: str, base: str | None) -> None:
    assert parse_formula(text).base_role() == base
