"""Formulas: a weighted sum of named models' log-probs, written as a small expression.

A formula such as ``large_base + beta * (small_ft - small_base)`` is parsed once into a
syntax tree; :meth:`Formula.weights` evaluates it for given parameter values into one
weight per role. Role names act as unit vectors, parameters (``beta``, ``lam``) and numbers
as scalars, so the result must be linear in the roles: ``small_ft * small_base`` is refused.
"""

from __future__ import annotations

import ast
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from eft_local.errors import EftError

PARAMETERS: Mapping[str, float] = MappingProxyType({"beta": 1.0, "lam": 0.5})
"""The knobs a formula may use, with their defaults."""

PRESET_FORMULAS: Mapping[str, str] = MappingProxyType({
    "up": "large_base + beta * (small_ft - small_base)",
    "down": "small_base + beta * (large_ft - large_base)",
    "amplified": "small_ft + beta * (large_base - small_base)",
    "interpolate": "large_base + beta * (lam * (small_ft - small_base)"
    " + (1 - lam) * (small_ft_alt - small_base))",
})
"""Named shorthands accepted wherever a formula is (``formula = "up"``)."""

_Vec = dict[str, float]

WEIGHT_LIMIT = 1e6
"""Largest |weight| a formula may give a model (float32 logits times this stay finite)."""

MAX_LENGTH = 1000
"""Longest formula text accepted (characters)."""

MAX_DEPTH = 100
"""Deepest nesting accepted (parentheses, and operators within operators)."""


@dataclass(frozen=True)
class Formula:
    """A parsed formula: its source text, the roles it names and the parameters it uses."""

    text: str
    roles: tuple[str, ...]
    params: tuple[str, ...]
    _tree: ast.expr = field(repr=False, compare=False)

    def weights(self, values: Mapping[str, float] | None = None) -> dict[str, float]:
        """One weight per role (in ``self.roles`` order) for these parameter values."""
        env = dict(PARAMETERS)
        env.update(values or {})
        vec = _as_vec(_eval(self._tree, env, self.text), self.text)
        return {role: vec.get(role, 0.0) for role in self.roles}

    def describe(self, values: Mapping[str, float] | None = None) -> str:
        """The evaluated weights as text, e.g. ``1*large_base + 1*small_ft - 1*small_base``."""
        parts = []
        for role, w in self.weights(values).items():
            sign = "-" if w < 0 else "+"
            parts.append(f"{sign} {abs(w):g}*{role}")
        text = " ".join(parts)
        return text[2:] if text.startswith("+ ") else text

    def base_role(self) -> str | None:
        """The formula's base term: the one model the mix is when every knob is 0
        (``large_base`` for up-scaling, ``small_base`` for down-scaling, ``small_ft`` for
        amplified up-scaling, the model itself for a one-model formula), or None when the
        formula at knobs 0 is not one model with weight 1."""
        try:
            weights = self.weights(dict.fromkeys(PARAMETERS, 0.0))
        except EftError:  # e.g. a division by a knob
            return None
        used = [(role, w) for role, w in weights.items() if w != 0]
        if len(used) == 1 and math.isclose(used[0][1], 1.0):
            return used[0][0]
        return None


def parse_formula(text: str, *, roles: tuple[str, ...] | None = None) -> Formula:
    """Parse ``text`` (or a named shorthand) and check it is a linear mix of roles.

    ``roles``, when given, are the only role names allowed (the models a preset defines).
    Raises :class:`EftError` naming the problem.
    """
    text = PRESET_FORMULAS.get(text.strip(), text).strip()
    if len(text) > MAX_LENGTH:
        raise EftError(f"formula {text[:40]!r}...: {len(text)} characters, more than the "
                       f"{MAX_LENGTH} allowed")
    depth = 0
    for char in text:
        depth += (char == "(") - (char == ")")
        if depth > MAX_DEPTH:
            raise EftError(f"formula {text[:40]!r}...: parentheses nested more than "
                           f"{MAX_DEPTH} deep")
    try:
        tree = ast.parse(text, mode="eval").body
    except (SyntaxError, ValueError) as exc:  # ValueError: a null character
        where = f" at column {exc.offset}" if getattr(exc, "offset", None) else ""
        raise EftError(f"formula {text!r}: syntax error{where}") from None
    except (RecursionError, MemoryError):
        raise EftError(f"formula {text[:40]!r}...: nested too deeply") from None
    if _depth(tree) > MAX_DEPTH:
        raise EftError(f"formula {text[:40]!r}...: operators nested more than {MAX_DEPTH} "
                       "deep")
    names = _names(tree, text)
    used_roles = tuple(dict.fromkeys(n for n in names if n not in PARAMETERS))
    used_params = tuple(dict.fromkeys(n for n in names if n in PARAMETERS))
    if not used_roles:
        raise EftError(f"formula {text!r} names no model role")
    if roles is not None:
        unknown = [r for r in used_roles if r not in roles]
        if unknown:
            raise EftError(
                f"formula {text!r} uses role {unknown[0]!r}, which is not among the models "
                f"({', '.join(roles) or 'none'})"
            )
    formula = Formula(text=text, roles=used_roles, params=used_params, _tree=tree)
    weights = formula.weights()  # evaluates once: catches non-linear forms early
    if all(w == 0 for w in weights.values()):
        raise EftError(f"formula {text!r} gives every model weight 0")
    return formula


def _depth(tree: ast.AST) -> int:
    """Height of a syntax tree, without recursion."""
    deepest, todo = 0, [(tree, 1)]
    while todo:
        node, depth = todo.pop()
        deepest = max(deepest, depth)
        todo.extend((child, depth + 1) for child in ast.iter_child_nodes(node)
                    if isinstance(child, ast.expr))
    return deepest


def _names(node: ast.AST, text: str) -> list[str]:
    allowed = (ast.Expression, ast.BinOp, ast.UnaryOp, ast.Name, ast.Constant, ast.Load,
               ast.Add, ast.Sub, ast.Mult, ast.Div, ast.USub, ast.UAdd)
    names = []
    for sub in ast.walk(node):
        if not isinstance(sub, allowed):
            raise EftError(f"formula {text!r}: {type(sub).__name__} is not allowed "
                           "(use names, numbers, + - * / and parentheses)")
        if isinstance(sub, ast.Constant) and not isinstance(sub.value, (int, float)):
            raise EftError(f"formula {text!r}: {sub.value!r} is not a number")
        if isinstance(sub, ast.Name):
            names.append(sub.id)
    return names


def _eval(node: ast.expr, env: Mapping[str, float], text: str) -> float | _Vec:
    """Evaluate with roles as unit vectors and parameters as scalars."""
    if isinstance(node, ast.Constant):
        return float(node.value)
    if isinstance(node, ast.Name):
        return float(env[node.id]) if node.id in env else {node.id: 1.0}
    if isinstance(node, ast.UnaryOp):
        value = _eval(node.operand, env, text)
        return _scale(value, -1.0) if isinstance(node.op, ast.USub) else value
    assert isinstance(node, ast.BinOp)
    left, right = _eval(node.left, env, text), _eval(node.right, env, text)
    if isinstance(node.op, (ast.Add, ast.Sub)):
        sign = 1.0 if isinstance(node.op, ast.Add) else -1.0
        if isinstance(left, float) != isinstance(right, float):
            raise EftError(f"formula {text!r}: cannot add a number to a model's log-prob")
        if isinstance(left, float):
            return left + sign * right  # type: ignore[operator]
        out = dict(left)
        for role, w in right.items():  # type: ignore[union-attr]
            out[role] = out.get(role, 0.0) + sign * w
        return out
    if isinstance(node.op, ast.Mult):
        if isinstance(left, dict) and isinstance(right, dict):
            raise EftError(f"formula {text!r}: a product of two models is not linear")
        return _scale(right, left) if isinstance(left, float) else _scale(left, right)
    # division: only by a number
    if isinstance(right, dict):
        raise EftError(f"formula {text!r}: cannot divide by a model's log-prob")
    if right == 0:
        raise EftError(f"formula {text!r}: division by zero")
    return _scale(left, 1.0 / right)


def _scale(value: float | _Vec, k: float) -> float | _Vec:
    if isinstance(value, float):
        return value * k
    return {role: w * k for role, w in value.items()}


def _as_vec(value: float | _Vec, text: str) -> _Vec:
    if isinstance(value, float):
        raise EftError(f"formula {text!r} evaluates to a number, not a mix of models")
    if any(not math.isfinite(w) for w in value.values()):
        raise EftError(f"formula {text!r} gives a non-finite weight")
    for role, w in value.items():
        if abs(w) > WEIGHT_LIMIT:
            raise EftError(f"formula {text!r} gives {role} the weight {w:g}; weights beyond "
                           f"±{WEIGHT_LIMIT:g} make the float32 mix overflow")
    return value
