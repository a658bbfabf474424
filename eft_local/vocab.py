"""Tokenizer alignment: do the models share one token space, and on which ids?

:func:`align` compares vocabularies read by the backend (no weights needed) and returns a
report with a verdict and the ``allowed`` mask the sampler applies: ids outside the common
range, unused/padding ids and mismatched special tokens never get probability.

Some engines show less than a GGUF file: an OpenAI-compatible server tells no vocabulary
type (:data:`UNKNOWN_TYPE`: compared with no type, by the pieces alone) and spells each id
as text, so a token that is not whole UTF-8 characters (a byte of a longer character)
shows as U+FFFD (:attr:`VocabInfo.lossy`). Such an id is compared as far as that shows:
it matches where the other models' pieces show the same once decoded the same way, and is
counted as unknown rather than identical or different.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace

import numpy as np

ATTR_UNKNOWN = 1 << 0
ATTR_UNUSED = 1 << 1
ATTR_CONTROL = 1 << 3
"""Token attribute bits as llama.cpp defines them (``llama_token_attr``); the backend checks
them against llama_cpp when it loads."""

VOCAB_TYPES = {0: "none", 1: "spm", 2: "bpe", 3: "wpm", 4: "ugm", 5: "rwkv", 6: "plamo2"}
"""llama.cpp's vocabulary types (``llama_vocab_type``) by number."""
UNKNOWN_TYPE = "unknown"
"""The type of a vocabulary whose engine does not tell it (an OpenAI-compatible server):
it is compared with no type, by its pieces alone."""

ALIGNED = "aligned"
COMMON_RANGE = "aligned on a common range"
INCOMPATIBLE = "incompatible"
_SPECIAL = ATTR_CONTROL | ATTR_UNUSED


@dataclass(frozen=True)
class VocabInfo:
    """A model's vocabulary as llama.cpp sees it: what the alignment check compares."""

    path: str
    vocab_type: str
    n_tokens: int
    bos: int
    eos: int
    eot: int
    eog: frozenset[int]
    add_bos: bool
    add_eos: bool
    texts: tuple[bytes, ...]
    attrs: tuple[int, ...]
    pieces: tuple[bytes, ...] | None = None
    """What each id decodes to (control tokens as their text), when known."""
    text_kind: str = "text"
    """What :attr:`texts` holds: ``text``, each token's stored text (a GGUF file, eft-local
    serve), or ``piece``, what it decodes to (engines that show no more: llama-server,
    OpenAI-compatible servers)."""
    lossy: bool = False
    """The pieces were read as text (an OpenAI-compatible engine's ``/detokenize``): a
    token that is not whole UTF-8 characters shows as U+FFFD, not its bytes."""

    def as_pieces(self) -> VocabInfo:
        """The same vocabulary compared by pieces (needs :attr:`pieces`)."""
        if self.text_kind == "piece":
            return self
        if self.pieces is None:
            raise ValueError(f"{self.path}: no pieces to compare")
        return replace(self, texts=self.pieces, text_kind="piece")


def comparable(vocabs: Mapping[str, VocabInfo]) -> dict[str, VocabInfo]:
    """``vocabs`` made comparable: when any of them is known only by its pieces, all are
    compared by pieces."""
    if all(v.text_kind == "text" for v in vocabs.values()):
        return dict(vocabs)
    return {role: v.as_pieces() for role, v in vocabs.items()}


@dataclass(frozen=True)
class Mismatch:
    """One id whose token text differs between models."""

    token_id: int
    texts: dict[str, bytes]
    special: bool


@dataclass(frozen=True)
class MaskedEnd:
    """An end-of-generation id of the template model that the mask removes, and why."""

    token_id: int
    text: bytes
    why: str


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
    reference: str | None = None
    masked_ends: tuple[MaskedEnd, ...] = ()
    unknown: int = 0
    """Ids compared only as far as an engine that reads pieces as text shows them
    (:attr:`VocabInfo.lossy`): neither identical nor different."""

    def end_reason(self) -> str:
        """Why the template model's end-of-turn tokens are (partly) masked; '' if not."""
        if not self.masked_ends:
            return ""
        listed = "; ".join(f"id {m.token_id} {m.text.decode('utf-8', 'replace')!r} {m.why}"
                           for m in self.masked_ends)
        ends = _end_ids(self.vocabs[self.reference]) if self.reference in self.vocabs else ()
        if len(self.masked_ends) == len(ends):
            return (f"every end-of-turn token of {self.reference} is masked ({listed}): "
                    "replies could never end their turn")
        return f"end-of-turn token(s) of {self.reference} masked: {listed}"

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
        types = _known_types(self.vocabs)
        if len(types) > 1:
            why += f"; vocab types differ ({', '.join(sorted(types))})"
        if self.masked_ends:
            why += f"; {self.end_reason()}"
        return f"{self.verdict}: {why}"

    def render(self) -> str:
        """A multi-line human-readable report."""
        lines = [f"{'role':<14} {'type':<5} {'tokens':>7} {'bos':>6} "
                 f"{'eos':>6} {'eot':>6}  end-of-generation ids"]
        for role, v in self.vocabs.items():
            eog = ",".join(str(i) for i in sorted(v.eog)[:6]) + ("..." if len(v.eog) > 6 else "")
            lines.append(f"{role:<14} {v.vocab_type:<5} {v.n_tokens:>7} "
                         f"{v.bos:>6} {v.eos:>6} {v.eot:>6}  {eog}")
        lines.append(f"common range: ids 0..{self.common - 1}; identical text: "
                     f"{self.identical}/{self.common}")
        if self.unknown:
            lines.append(f"compared as text only: {self.unknown} ids (pieces that are not "
                         "whole UTF-8 characters, which an engine showed as U+FFFD)")
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
        reason = self.end_reason()
        lines.append(f"verdict: {self.verdict}" + (f" ({reason})" if reason else ""))
        return "\n".join(lines)

    def to_dict(self) -> dict:
        """JSON-ready form of the report."""
        return {
            "verdict": self.verdict,
            "common": self.common,
            "identical": self.identical,
            "unknown": self.unknown,
            "unused": self.unused,
            "normal_mismatches": self.n_normal_mismatch,
            "special_mismatches": self.n_special_mismatch,
            "first_mismatches": [
                {"id": m.token_id, "special": m.special,
                 "texts": {r: t.decode("utf-8", "replace") for r, t in m.texts.items()}}
                for m in self.mismatches],
            "models": {r: {"path": v.path, "vocab_type": v.vocab_type, "tokens": v.n_tokens,
                           "bos": v.bos, "eos": v.eos, "eot": v.eot,
                           "eog": sorted(v.eog), "add_bos": v.add_bos}
                       for r, v in self.vocabs.items()},
            "notes": list(self.notes),
            "masked_end_tokens": [
                {"id": m.token_id, "text": m.text.decode("utf-8", "replace"), "why": m.why}
                for m in self.masked_ends],
        }


def align(vocabs: Mapping[str, VocabInfo], *, reference: str | None = None,
          max_listed: int = 10) -> AlignmentReport:
    """Compare vocabularies; ``reference`` (the template role) keeps its end tokens where
    it can, and the report says which of them are masked anyway, and why."""
    vocabs = dict(vocabs)
    roles = list(vocabs)
    common = min(v.n_tokens for v in vocabs.values())
    allowed = np.ones(common, dtype=bool)
    attrs = np.array([v.attrs[:common] for v in vocabs.values()], dtype=np.int64)
    unused_ids = np.flatnonzero((attrs & ATTR_UNUSED).any(axis=0))
    allowed[unused_ids] = False

    first = vocabs[roles[0]].texts
    differ = [i for i in range(common) if any(v.texts[i] != first[i] for v in vocabs.values())]
    unknown = [i for i in differ if _same_as_text(vocabs, i)]
    if unknown:
        shown = set(unknown)
        differ = [i for i in differ if i not in shown]
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
        values = {r: getattr(v, attr) for r, v in vocabs.items()  # -1 of an untyped one:
                  if not (attr != "add_bos" and v.vocab_type == UNKNOWN_TYPE  # not told
                          and getattr(v, attr) < 0)}
        if len(set(values.values())) > 1:
            notes.append(f"{attr} differs: " + ", ".join(f"{r}={x}" for r, x in values.items()))
    masked_ends = _masked_ends(vocabs, reference, common, allowed)
    types = _known_types(vocabs)
    untyped = [r for r, v in vocabs.items() if v.vocab_type == UNKNOWN_TYPE]
    if untyped:
        notes.append(f"vocab type unknown for {', '.join(untyped)} (its engine does not tell "
                     "it): compared by token pieces only")
    every_end_masked = bool(masked_ends) and len(masked_ends) == len(
        _end_ids(vocabs[reference]))  # type: ignore[index]
    if len(types) > 1 or n_normal or every_end_masked:
        verdict = INCOMPATIBLE
    elif len({v.n_tokens for v in vocabs.values()}) > 1 or not allowed.all():
        verdict = COMMON_RANGE
    else:
        verdict = ALIGNED
    return AlignmentReport(
        vocabs=vocabs, common=common, identical=common - len(differ) - len(unknown),
        mismatches=tuple(mismatches), n_normal_mismatch=n_normal, n_special_mismatch=n_special,
        unused=int(unused_ids.size), notes=tuple(notes), verdict=verdict, allowed=allowed,
        reference=reference if reference in vocabs else None, masked_ends=masked_ends,
        unknown=len(unknown),
    )


REPLACEMENT = "\ufffd".encode()
"""U+FFFD in UTF-8: what a token that is not whole UTF-8 characters decodes to as text."""


def _same_as_text(vocabs: Mapping[str, VocabInfo], i: int) -> bool:
    """Whether id ``i`` differs only where a lossy vocabulary shows U+FFFD: every model's
    piece, decoded as text the way such an engine does, is the same, and a lossy one
    shows U+FFFD in it."""
    lossy = [v for v in vocabs.values() if v.lossy]
    if not any(REPLACEMENT in v.texts[i] for v in lossy):
        return False
    shown = {v.texts[i].decode("utf-8", "replace") for v in vocabs.values()}
    return len(shown) == 1


def _known_types(vocabs: Mapping[str, VocabInfo]) -> set[str]:
    """The vocabulary types that their engines told (an unknown one differs from none)."""
    return {v.vocab_type for v in vocabs.values() if v.vocab_type != UNKNOWN_TYPE}


def _end_ids(vocab: VocabInfo) -> list[int]:
    """A vocabulary's end-of-generation ids: EOS, EOT and every EOG token."""
    return sorted(i for i in {vocab.eos, vocab.eot, *vocab.eog} if i >= 0)


def _masked_ends(vocabs: Mapping[str, VocabInfo], reference: str | None, common: int,
                 allowed: np.ndarray) -> tuple[MaskedEnd, ...]:
    """The template model's end ids the mask removes: beyond the common range, or marked
    unused by another model."""
    if reference not in vocabs:
        return ()
    ref = vocabs[reference]
    out = []
    for i in _end_ids(ref):
        text = ref.texts[i] if i < len(ref.texts) else b""
        if i >= common:
            short = ", ".join(f"{r} {v.n_tokens}" for r, v in vocabs.items()
                              if v.n_tokens <= i)
            out.append(MaskedEnd(i, text, f"is beyond the common range 0..{common - 1} "
                                          f"(tokens: {short})"))
        elif not allowed[i]:
            unused = [r for r, v in vocabs.items() if v.attrs[i] & ATTR_UNUSED]
            why = (f"is marked unused by {', '.join(unused)}" if unused
                   else "differs between the models")
            out.append(MaskedEnd(i, text, why))
    return tuple(out)
