"""Number ranges as grammar rules: JSON schema's ``minimum``, ``maximum``,
``exclusiveMinimum`` and ``exclusiveMaximum`` on integers and numbers, in GBNF.

A range becomes rules over the digits, compared from the first digit on: at each place the
digits that already decide the comparison are one character class followed by any digits,
and the one digit that ties the bound goes on to the next place (llama.cpp's C++ converter
does the same for integers). An integer is written as JSON writes it (``0`` or no leading
zero, ``-`` only before a non-zero value), of at most :data:`DIGITS` digits; a number in a
range without an exponent, at most :data:`DIGITS` digits either side of the point. Every
text the rules allow is a value in the range, and every value in the range with that many
digits is allowed.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from decimal import ROUND_CEILING, ROUND_FLOOR, Decimal, InvalidOperation

from eft_local.errors import EftError

DIGITS = 16
"""Digits of an integer (and of a number's integer part and fraction): as the integer and
number rules of llama.cpp's converters allow."""

KEYWORDS = ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum")
"""The range keywords."""

_Bound = tuple[str, bool] | None
"""A bound on a digit string: the bound's digits and whether it is exclusive; None: none."""


def has_range(schema: Mapping[str, object]) -> bool:
    """Whether ``schema`` uses a range keyword (a draft-4 boolean ``exclusive*`` alone
    does not bound anything)."""
    return any(k in schema and not isinstance(schema[k], bool) for k in KEYWORDS) or any(
        schema.get(k) is True for k in KEYWORDS[2:])


def range_rule(schema: Mapping[str, object], *, integer: bool, where: str = "schema") -> str:
    """The GBNF expression of the integers (``integer``) or numbers that ``schema``'s range
    keywords allow (without the space after them). A bound that is not a number, or a range
    that holds no value, is an :class:`EftError` naming the keyword and ``where``."""
    low, low_open, high, high_open = _bounds(schema, where)
    limit = Decimal(10) ** DIGITS
    what = "integer" if integer else "number"
    if low is not None and low >= limit or high is not None and high <= -limit:
        key = _key(schema, low is not None and low >= limit)
        raise EftError(f"'{key}' at {where} is {schema[key]!r}: a grammar writes {what}s of "
                       f"at most {DIGITS} digits, so no value could follow it")
    low = None if low is not None and low <= -limit else low  # past every written value
    high = None if high is not None and high >= limit else high
    if integer:
        lo = None if low is None else _whole(low, low_open, ROUND_CEILING, 1)
        hi = None if high is None else _whole(high, high_open, ROUND_FLOOR, -1)
        if lo is not None and hi is not None and lo > hi:
            raise EftError(f"the range at {where} holds no integer ({_shown(schema)})")
        return integer_rule(lo, hi)
    low, low_open = _on_grid(low, low_open, ROUND_CEILING)
    high, high_open = _on_grid(high, high_open, ROUND_FLOOR)
    if low is not None and high is not None and (
            low > high or low == high and (low_open or high_open)):
        raise EftError(f"the range at {where} holds no number ({_shown(schema)})")
    return number_rule(low, low_open, high, high_open)


def integer_rule(low: int | None, high: int | None) -> str:
    """GBNF for the integers from ``low`` to ``high`` (None: open), as JSON writes them."""
    alts = []
    if low is None or low < 0:  # -high' .. -low' with high' >= 1
        top = None if low is None else -low
        bottom = 1 if high is None or high >= 0 else -high
        alts.append(f'"-" ({_natural(bottom, top)})')
    if high is None or high >= 0:
        alts.append(_natural(max(low or 0, 0), high))
    return " | ".join(alts)


def number_rule(low: Decimal | None, low_open: bool, high: Decimal | None,
                high_open: bool) -> str:
    """GBNF for the numbers from ``low`` to ``high`` (each excluded when ``*_open``; None:
    open), written without an exponent."""
    alts = []
    if low is None or low < 0:  # magnitudes above 0 and -high, up to -low
        if high is not None and high < 0:
            floor: tuple[Decimal, bool] = (-high, high_open)
        else:
            floor = (Decimal(0), True)
        top = None if low is None else (-low, low_open)
        alts.append(f'"-" ({_magnitude(floor, top)})')
    if high is None or high > 0 or high == 0 and not high_open:
        floor = (Decimal(0), False) if low is None or low < 0 else (low, low_open)
        alts.append(_magnitude(floor, None if high is None else (high, high_open)))
    return " | ".join(alts)


# -- the digits ------------------------------------------------------------------------------
def _natural(low: int, high: int | None) -> str:
    """Natural numbers from ``low`` to ``high`` (None: up to :data:`DIGITS` digits)."""
    top = len(str(high)) if high is not None else DIGITS
    alts, whole = [], []  # whole: the lengths (above 1) whose every number is in the range
    for n in range(len(str(low)), top + 1):
        first = 10 ** (n - 1) if n > 1 else 0
        a, b = max(low, first), 10 ** n - 1 if high is None else min(high, 10 ** n - 1)
        if n > 1 and a == first and b == 10 ** n - 1:
            whole.append(n - 1)
        elif a <= b:
            alts.append(_same_length(str(a), str(b)))
    if whole:  # consecutive lengths: one item
        span = f"{whole[0]}" if len(whole) == 1 else f"{whole[0]},{whole[-1]}"
        alts.append(f"[1-9] [0-9]{{{span}}}")
    return " | ".join(alts)


def _magnitude(low: tuple[Decimal, bool], high: tuple[Decimal, bool] | None) -> str:
    """Non-negative numbers from ``low`` (its value, exclusive) up to ``high``: an integer
    part, then a fraction ``"." DIGITS`` where one is needed or allowed."""
    a, a_digits = _split(low[0])
    lower: _Bound = (a_digits, low[1])
    alts = []
    if high is None:
        alts.append(_with_fraction(_natural(a, a), lower, None))
        if a + 1 < 10 ** DIGITS:
            alts.append(_with_fraction(_natural(a + 1, None), None, None))
    else:
        h, h_digits = _split(high[0])
        upper: _Bound = (h_digits, high[1])
        if a == h:
            alts.append(_with_fraction(_natural(a, a), lower, upper))
        else:
            alts.append(_with_fraction(_natural(a, a), lower, None))
            if a + 1 <= h - 1:
                alts.append(_with_fraction(_natural(a + 1, h - 1), None, None))
            alts.append(_with_fraction(_natural(h, h), None, upper))
    kept = [x for x in alts if x is not None]
    return " | ".join(f"({x})" for x in kept) if len(kept) > 1 else kept[0]


def _with_fraction(whole: str, lower: _Bound, upper: _Bound) -> str | None:
    """``whole`` followed by the fractions from ``lower`` to ``upper`` (none when 0 is
    allowed and nothing else is); None when no fraction fits."""
    alts, empty = _fraction(lower, upper, DIGITS)
    whole = f"({whole})" if " | " in whole else whole
    if not alts:
        return whole if empty else None
    digits = alts[0] if len(alts) == 1 else f"({' | '.join(alts)})"
    return f'{whole} ("." {digits}){"?" if empty else ""}'


def _same_length(low: str, high: str) -> str:
    """Digit strings of one length from ``low`` to ``high`` (``low`` <= ``high``)."""
    n = len(low)
    if low[0] == high[0]:
        rest = _same_length(low[1:], high[1:]) if n > 1 else ""
        return f"[{low[0]}]" + (f" ({rest})" if " | " in rest else f" {rest}" if rest else "")
    zeros, nines = "0" * (n - 1), "9" * (n - 1)
    alts, first, last = [], int(low[0]), int(high[0])
    if low[1:] != zeros:  # the lowest first digit ties the bound: the rest from low on
        alts.append(f"[{low[0]}] ({_same_length(low[1:], nines)})")
        first += 1
    if high[1:] != nines:
        last -= 1
    if first <= last:
        alts.append(_digit_class(first, last) + (f" [0-9]{{{n - 1}}}" if n > 1 else ""))
    if high[1:] != nines:
        alts.append(f"[{high[0]}] ({_same_length(zeros, high[1:])})")
    return " | ".join(alts)


def _fraction(lower: _Bound, upper: _Bound, n: int) -> tuple[list[str], bool]:
    """Digit strings of up to ``n`` digits whose value as a fraction (a missing digit is 0)
    lies between ``lower`` and ``upper``: the alternatives for the strings that are not
    empty, and whether the empty string (the value 0) fits."""
    def zero(bound: tuple[str, bool]) -> bool:
        return not bound[0].strip("0")

    if lower is not None and zero(lower) and not lower[1]:
        lower = None  # at least 0: no bound
    empty = lower is None and (
        upper is None or not zero(upper) or not upper[1])
    if n == 0:
        return [], empty
    if lower is None and upper is None:
        return [f"[0-9]{{1,{n}}}"], True
    if upper is not None and zero(upper) and not upper[1] and lower is None:
        return [f"[0]{{1,{n}}}"], True
    if lower is not None and zero(lower) and lower[1] and upper is None:  # above 0
        return [f"[0]{{0,{n - 1}}} [1-9] [0-9]{{0,{n - 1}}}"], False
    groups: list[list] = []  # [first digit, last digit, (lower of the rest, upper)]
    for d in range(10):
        c = str(d)
        lo_first, lo_rest = (lower[0][:1] or "0", lower[0][1:]) if lower else ("0", "")
        hi_first, hi_rest = (upper[0][:1] or "0", upper[0][1:]) if upper else ("9", "")
        if lower and c < lo_first or upper and c > hi_first:
            continue
        key = ((lo_rest, lower[1]) if lower and c == lo_first else None,
               (hi_rest, upper[1]) if upper and c == hi_first else None)
        if groups and groups[-1][1] == d - 1 and groups[-1][2] == key:
            groups[-1][1] = d
        else:
            groups.append([d, d, key])
    alts = []
    for first, last, (lo, hi) in groups:
        head = _digit_class(first, last)
        if lo is None and hi is None:
            alts.append(head + (f" [0-9]{{0,{n - 1}}}" if n > 1 else ""))
            continue
        sub, sub_empty = _fraction(lo, hi, n - 1)
        if sub:
            rest = " | ".join(sub)
            alts.append(f"{head} ({rest})?" if sub_empty else
                        f"{head} ({rest})" if len(sub) > 1 else f"{head} {rest}")
        elif sub_empty:
            alts.append(head)
    return alts, empty


def _digit_class(first: int, last: int) -> str:
    return f"[{first}]" if first == last else f"[{first}-{last}]"


# -- bounds ----------------------------------------------------------------------------------
def _bounds(schema: Mapping[str, object], where: str
            ) -> tuple[Decimal | None, bool, Decimal | None, bool]:
    """The lower bound, whether it is excluded, the upper bound, whether it is excluded:
    the tighter of ``minimum`` and ``exclusiveMinimum`` (a number, or in draft 4 a boolean
    that excludes ``minimum``), likewise above."""
    out: list[Decimal | None | bool] = []
    for inclusive, exclusive, tighter in (("minimum", "exclusiveMinimum", max),
                                          ("maximum", "exclusiveMaximum", min)):
        value, is_open = _number(schema, inclusive, where), False
        flag = schema.get(exclusive)
        if isinstance(flag, bool):
            is_open = flag and value is not None
        else:
            other = _number(schema, exclusive, where)
            if other is not None and (value is None or tighter(other, value) == other):
                value, is_open = other, True
        out += [value, is_open]
    return out[0], bool(out[1]), out[2], bool(out[3])  # type: ignore[return-value]


def _number(schema: Mapping[str, object], key: str, where: str) -> Decimal | None:
    value = schema.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (
            isinstance(value, float) and not math.isfinite(value)):
        raise EftError(f"'{key}' at {where} is {value!r}; it must be a number")
    try:
        return Decimal(value) if isinstance(value, int) else Decimal(repr(value))
    except InvalidOperation:  # pragma: no cover - repr of a finite float always parses
        raise EftError(f"'{key}' at {where} is {value!r}; it must be a number") from None


def _on_grid(value: Decimal | None, is_open: bool, rounding: str
             ) -> tuple[Decimal | None, bool]:
    """A bound with more than :data:`DIGITS` decimals, moved to the nearest written value
    inside the range (which is then included)."""
    if value is None:
        return None, is_open
    step = Decimal(1).scaleb(-DIGITS)
    grid = value.quantize(step, rounding=rounding)
    return (value, is_open) if grid == value else (grid, False)


def _whole(value: Decimal, is_open: bool, rounding: str, step: int) -> int:
    """The nearest integer inside a bound: past it when it is an excluded integer."""
    if is_open and value == value.to_integral_value():
        return int(value) + step
    return int(value.to_integral_value(rounding))


def _split(value: Decimal) -> tuple[int, str]:
    """A non-negative number's integer part and its decimals' digits (no trailing 0)."""
    whole = int(value.to_integral_value(ROUND_FLOOR))
    fraction = format(value - whole, "f").partition(".")[2].rstrip("0")
    return whole, fraction


def _key(schema: Mapping[str, object], low: bool) -> str:
    keys = ("minimum", "exclusiveMinimum") if low else ("maximum", "exclusiveMaximum")
    return next(k for k in keys if k in schema and not isinstance(schema[k], bool))


def _shown(schema: Mapping[str, object]) -> str:
    return ", ".join(f"{k} {schema[k]!r}" for k in KEYWORDS if k in schema)
