"""What one generate, chat or score call is made with: one frozen, validated value.

A :class:`Settings` holds the formula, its knobs (``beta``, ``lam``), the sampler settings,
the stop strings and how messages are tokenized. A session keeps one as its defaults
(:attr:`eft_local.session.Session.defaults`); every call takes one, or changes to the
defaults as keywords (``s.generate(..., beta=1.5, temperature=0)``), and never changes the
session. The server builds one per request, so no knob can leak from one request into the
next.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields, replace
from types import MappingProxyType
from typing import Any

from eft_local import backend
from eft_local.errors import EftError
from eft_local.formula import PARAMETERS, Formula, parse_formula
from eft_local.limits import PARAM_LIMIT
from eft_local.sampler import SamplerSettings
from eft_local.schema import schema_grammar

__all__ = ["SamplerSettings", "Settings"]

SAMPLING = tuple(f.name for f in fields(SamplerSettings))
"""Keywords of :meth:`Settings.replace` that change the sampler settings."""

OVERFLOW = ("truncate", "error")
"""Context policies: what a chat whose history no longer fits the context does."""


def param_name(name: str) -> str:
    """The canonical name of a formula parameter (``lambda`` is ``lam``)."""
    return "lam" if name == "lambda" else name


@dataclass(frozen=True)
class Settings:
    """Formula, knobs, sampling and stops of one call; checked when made."""

    formula: Formula
    params: Mapping[str, float] = field(default_factory=dict)
    sampling: SamplerSettings = field(default_factory=SamplerSettings)
    stop: tuple[str, ...] = ()
    """The text ends before the first of these."""
    parse_special: bool = False
    """Parse control-token text inside messages (unsafe with untrusted input)."""
    context_overflow: str = "truncate"
    """A chat longer than the context: ``truncate`` drops its oldest whole turns (the
    system prompt and the newest message stay), ``error`` refuses it."""
    grammar: str | None = None
    """GBNF text (llama.cpp's grammar format, start rule ``root``) that the generated text
    must follow: the mix is restricted to the tokens it allows before the filters and the
    draw. None (or empty): free text."""

    def __post_init__(self) -> None:
        params = {**PARAMETERS}
        for name, value in dict(self.params).items():
            params[param_name(name)] = _check_param(name, value)
        self.formula.weights(params)
        object.__setattr__(self, "params", MappingProxyType(params))
        if isinstance(self.stop, str) or not all(isinstance(s, str) for s in self.stop):
            raise EftError(f"invalid stop {self.stop!r}: must be a list of strings")
        object.__setattr__(self, "stop", tuple(s for s in self.stop if s))
        if self.context_overflow not in OVERFLOW:
            raise EftError(f"invalid context_overflow {self.context_overflow!r}: choose "
                           f"{' or '.join(OVERFLOW)}")
        if self.grammar is not None and not isinstance(self.grammar, str):
            raise EftError(f"invalid grammar {self.grammar!r}: must be GBNF text")
        object.__setattr__(self, "grammar", backend.check_grammar(self.grammar)
                           if self.grammar and self.grammar.strip() else None)

    def replace(self, **changes: Any) -> Settings:
        """A copy with ``changes``: ``formula`` (text or :class:`Formula`), ``params`` (a
        mapping), any parameter (``beta``, ``lam``/``lambda``), any
        :class:`~eft_local.sampler.SamplerSettings` field, ``sampling``, ``stop``,
        ``parse_special``, ``context_overflow``, ``grammar`` (GBNF text; ``""`` removes it)
        or ``json_schema`` (a JSON schema, as a mapping or JSON text, turned into a
        grammar). ``None`` values leave a setting as it is."""
        changes = {k: v for k, v in changes.items() if v is not None}
        if "json_schema" in changes:
            if "grammar" in changes:
                raise EftError("give a grammar or a JSON schema, not both")
            changes["grammar"] = schema_grammar(changes.pop("json_schema"))
        params = dict(self.params)
        changed = dict(changes.pop("params", {}))
        changed.update({n: changes.pop(n) for n in [n for n in changes if param_name(n) in
                                                    PARAMETERS]})
        for name, value in changed.items():
            params[param_name(name)] = _check_param(name, value)
        sampling = changes.pop("sampling", self.sampling)
        knobs = {n: changes.pop(n) for n in [n for n in changes if n in SAMPLING]}
        if knobs:
            try:
                sampling = replace(sampling, **knobs)
            except TypeError as exc:
                raise EftError(f"unknown sampler setting: {exc}") from None
        formula = changes.pop("formula", self.formula)
        if isinstance(formula, str):
            formula = parse_formula(formula, roles=self.formula.roles or None)
        unknown = sorted(set(changes) - {"stop", "parse_special", "context_overflow",
                                         "grammar"})
        if unknown:
            raise EftError(f"unknown setting {unknown[0]!r} (known: formula, "
                           f"{', '.join(PARAMETERS)}, {', '.join(SAMPLING)}, stop, "
                           "parse_special, context_overflow, grammar, json_schema)")
        for name, value in changed.items():  # name the knob that broke the formula
            try:
                formula.weights(params)
            except EftError as exc:
                raise EftError(f"invalid {name} {value:g}: {exc}") from None
        stop = changes.get("stop", self.stop)
        return Settings(formula=formula, params=params, sampling=sampling,
                        stop=(stop,) if isinstance(stop, str) else tuple(stop),
                        parse_special=bool(changes.get("parse_special", self.parse_special)),
                        context_overflow=changes.get("context_overflow",
                                                     self.context_overflow),
                        grammar=changes.get("grammar", self.grammar))

    @staticmethod
    def grammar_of(*, grammar: str | None = None, json_schema: object = None,
                   strict: bool = False, note: Callable[[str], None] | None = None
                   ) -> str | None:
        """The checked GBNF text of ``grammar`` or ``json_schema`` (a mapping or JSON
        text), as :meth:`replace` would store it; ``strict`` and ``note`` as
        :func:`eft_local.schema.schema_grammar` (a keyword the grammar cannot enforce is
        refused, or reported to ``note``)."""
        if json_schema is not None:
            return schema_grammar(json_schema, strict=strict, note=note)
        return backend.check_grammar(grammar) if grammar and grammar.strip() else None

    def weights(self) -> dict[str, float]:
        """One weight per role of the formula."""
        return self.formula.weights(self.params)

    def knobs(self) -> dict[str, float]:
        """The parameters the formula uses, with their values."""
        return {name: self.params[name] for name in self.formula.params}

    def describe(self) -> str:
        """The formula with numbers filled in."""
        return self.formula.describe(self.params)


def _check_param(name: str, value: object) -> float:
    if param_name(name) not in PARAMETERS:
        raise EftError(f"unknown parameter {name!r} (known: {', '.join(PARAMETERS)})")
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(
            value):
        raise EftError(f"invalid {name} {value!r}: must be a finite number")
    if abs(value) > PARAM_LIMIT:
        raise EftError(f"invalid {name} {value:g}: the mix overflows float32; use a value in "
                       f"[-{PARAM_LIMIT:g}, {PARAM_LIMIT:g}]")
    return float(value)
