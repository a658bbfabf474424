"""Tokenizer alignment: do the models share one token space, and on which ids?

:func:`align` compares vocabularies read by the backend (no weights needed) and returns a
report with a verdict and the ``allowed`` mask the sampler applies: ids outside the common
range, unused/padding ids and mismatched special tokens never get probability.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np

from eft_local.backend import ATTR_CONTROL, ATTR_UNUSED, VocabInfo

ALIGNED = "aligned"
COMMON_RANGE = "aligned on a common range"
INCOMPATIBLE = "incompatible"
_SPECIAL = ATTR_CONTROL | ATTR_UNUSED


@dataclass(frozen=True)
class Mismatch:
    """One id whose token text differs between models."""

    token_id: int
    texts: dict[str, bytes]
    special: bool


@dataclass(frozen=True)
class AlignmentReport:
    """What the check found, and which ids may be sampled."""

    vocabs: dict[str, VocabInfo]
    common: int
    identical: int
    mismatches: tuple[Mismatch, ...]
    n_normal_mismatch: int
    n_special_mismatch: int
    unused: int
    notes: tuple[str, ...]
    verdict: str
    allowed: np.ndarray = field(repr=False)

    @property
    def ok(self) -> bool:
        """True unless the verdict is incompatible."""
        return self.verdict != INCOMPATIBLE

    def summary(self) -> str:
        """One line: the verdict and its main reason."""
        sizes = ", ".join(f"{r} {v.n_tokens}" for r, v in self.vocabs.items())
        why = f"{self.identical}/{self.common} ids identical; vocab sizes {sizes}"
        if self.n_normal_mismatch:
            m = next(m for m in self.mismatches if not m.special)
            texts = ", ".join(f"{r}={t!r}" for r, t in m.texts.items())
            why += (f"; {self.n_normal_mismatch} normal tokens differ "
                    f"(first: id {m.token_id}: {texts})")
        types = {v.vocab_type for v in self.vocabs.values()}
        if len(types) > 1:
            why += f"; vocab types differ ({', '.join(sorted(types))})"
        return f"{self.verdict}: {why}"

    def render(self) -> str:
        """A multi-line human-readable report."""
        lines = [f"{'role':<14} {'type':<5} {'tokens':>7} {'logit rows':>10} {'bos':>6} "
                 f"{'eos':>6} {'eot':>6}  end-of-generation ids"]
        for role, v in self.vocabs.items():
            eog = ",".join(str(i) for i in sorted(v.eog)[:6]) + ("..." if len(v.eog) > 6 else "")
            lines.append(f"{role:<14} {v.vocab_type:<5} {v.n_tokens:>7} {v.n_tokens:>10} "
                         f"{v.bos:>6} {v.eos:>6} {v.eot:>6}  {eog}")
        lines.append(f"common range: ids 0..{self.common - 1}; identical text: "
                     f"{self.identical}/{self.common}")
        for role, v in self.vocabs.items():
            if v.n_tokens > self.common:
                lines.append(f"{role}: {v.n_tokens - self.common} rows beyond the common range "
                             "(masked)")
        if self.unused:
            lines.append(f"unused/padding ids in the common range: {self.unused} (masked)")
        if self.mismatches:
            lines.append(f"mismatched ids: {self.n_normal_mismatch} normal, "
                         f"{self.n_special_mismatch} special (special ones are masked); first:")
            for m in self.mismatches:
                texts = "  ".join(f"{r}={t!r}" for r, t in m.texts.items())
                lines.append(f"  id {m.token_id}: {texts}")
        lines.extend(f"note: {n}" for n in self.notes)
        lines.append(f"verdict: {self.verdict}")
        return "\n".join(lines)

    def to_dict(self) -> dict:
        """JSON-ready form of the report."""
        return {
            "verdict": self.verdict,
            "common": self.common,
            "identical": self.identical,
            "unused": self.unused,
            "normal_mismatches": self.n_normal_mismatch,
            "special_mismatches": self.n_special_mismatch,
            "first_mismatches": [
                {"id": m.token_id, "special": m.special,
                 "texts": {r: t.decode("utf-8", "replace") for r, t in m.texts.items()}}
                for m in self.mismatches],
            "models": {r: {"path": v.path, "vocab_type": v.vocab_type, "tokens": v.n_tokens,
                           "logit_rows": v.n_tokens, "bos": v.bos, "eos": v.eos, "eot": v.eot,
                           "eog": sorted(v.eog), "add_bos": v.add_bos}
                       for r, v in self.vocabs.items()},
            "notes": list(self.notes),
        }


def align(vocabs: Mapping[str, VocabInfo], *, reference: str | None = None,
          max_listed: int = 10) -> AlignmentReport:
    """Compare vocabularies; ``reference`` (the fine-tuned role) keeps its end tokens."""
    vocabs = dict(vocabs)
    roles = list(vocabs)
    common = min(v.n_tokens for v in vocabs.values())
    allowed = np.ones(common, dtype=bool)
    attrs = np.array([v.attrs[:common] for v in vocabs.values()], dtype=np.int64)
    unused_ids = np.flatnonzero((attrs & ATTR_UNUSED).any(axis=0))
    allowed[unused_ids] = False

    first = vocabs[roles[0]].texts
    differ = [i for i in range(common) if any(v.texts[i] != first[i] for v in vocabs.values())]
    keep = vocabs[reference].eog if reference in vocabs else frozenset()
    mismatches: list[Mismatch] = []
    n_normal = n_special = 0
    for i in differ:
        special = bool(((attrs[:, i] & _SPECIAL) != 0).all())
        if special:
            n_special += 1
            if i not in keep:
                allowed[i] = False
        else:
            n_normal += 1
        if len(mismatches) < max_listed:
            mismatches.append(Mismatch(i, {r: v.texts[i] for r, v in vocabs.items()}, special))

    notes = []
    for attr in ("bos", "eos", "add_bos"):
        values = {r: getattr(v, attr) for r, v in vocabs.items()}
        if len(set(values.values())) > 1:
            notes.append(f"{attr} differs: " + ", ".join(f"{r}={x}" for r, x in values.items()))
    types = {v.vocab_type for v in vocabs.values()}
    if len(types) > 1 or n_normal:
        verdict = INCOMPATIBLE
    elif len({v.n_tokens for v in vocabs.values()}) > 1 or not allowed.all():
        verdict = COMMON_RANGE
    else:
        verdict = ALIGNED
    return AlignmentReport(
        vocabs=vocabs, common=common, identical=common - len(differ),
        mismatches=tuple(mismatches), n_normal_mismatch=n_normal, n_special_mismatch=n_special,
        unused=int(unused_ids.size), notes=tuple(notes), verdict=verdict, allowed=allowed,
    )
