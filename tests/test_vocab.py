"""Alignment verdicts on families the tests write themselves."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from eft_local import backend
from eft_local.errors import EftError
from eft_local.vocab import (
    ALIGNED,
    ATTR_CONTROL,
    ATTR_UNUSED,
    COMMON_RANGE,
    INCOMPATIBLE,
    VocabInfo,
    align,
)
from tests import ggufs


def vocab(tmp_path: Path, name: str, **kwargs) -> backend.VocabInfo:
    return backend.read_vocab(ggufs.write_model(tmp_path / f"{name}.gguf", **kwargs))


def test_identical_vocabularies_are_aligned(tmp_path: Path) -> None:
    v = {r: vocab(tmp_path, r, seed=i) for i, r in enumerate(["large_base", "small_ft"])}
    report = align(v, reference="small_ft")
    assert report.verdict == ALIGNED
    assert report.identical == report.common == v["small_ft"].n_tokens
    assert report.allowed.all()
    assert "verdict: aligned" in report.render()


def test_padded_vocabulary_is_aligned_on_the_common_range(tmp_path: Path) -> None:
    small = vocab(tmp_path, "small")
    big = vocab(tmp_path, "big", pad_to=300)
    report = align({"small_ft": small, "large_base": big}, reference="small_ft")
    assert report.verdict == COMMON_RANGE
    assert report.common == small.n_tokens
    assert report.allowed.size == small.n_tokens and report.allowed.all()
    assert f"{300 - small.n_tokens} rows beyond the common range" in report.render()


def test_unused_padding_inside_the_range_is_masked(tmp_path: Path) -> None:
    a = vocab(tmp_path, "a", pad_to=300)
    b = vocab(tmp_path, "b", pad_to=300)
    report = align({"a": a, "b": b})
    assert report.verdict == COMMON_RANGE
    unused = np.flatnonzero(~report.allowed)
    assert unused.tolist() == [i for i, t in enumerate(a.texts) if t.startswith(b"[PAD")]
    assert report.unused == len(unused) > 0


def test_swapped_normal_tokens_are_incompatible(tmp_path: Path) -> None:
    a = vocab(tmp_path, "a")
    b = vocab(tmp_path, "b", swap=(40, 41))
    report = align({"small_ft": a, "large_base": b}, reference="small_ft")
    assert report.verdict == INCOMPATIBLE and not report.ok
    assert report.n_normal_mismatch == 2
    assert [m.token_id for m in report.mismatches] == [40, 41]
    assert "normal tokens differ (first: id 40" in report.summary()


def test_differing_special_tokens_are_masked_not_fatal(tmp_path: Path) -> None:
    a = vocab(tmp_path, "a", extra_special="<|tool|>")
    b = vocab(tmp_path, "b", extra_special="<|image|>")
    report = align({"small_ft": a, "large_base": b}, reference="small_ft")
    assert report.verdict == COMMON_RANGE
    assert report.n_special_mismatch == 1
    assert not report.allowed[a.n_tokens - 1]
    assert report.to_dict()["first_mismatches"][0]["special"] is True


def test_corrupt_and_missing_files(tmp_path: Path) -> None:
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + b"\x00" * 64)
    with pytest.raises(EftError, match="could not load"):
        backend.read_vocab(bad)
    text = tmp_path / "text.gguf"
    text.write_text("hello")
    with pytest.raises(EftError, match="not a GGUF file"):
        backend.read_vocab(text)
    with pytest.raises(EftError, match="not found"):
        backend.read_vocab(tmp_path / "missing.gguf")


def hand_vocab(n: int, *, eos: int = 1, eot: int = -1, unused: tuple[int, ...] = ()
               ) -> VocabInfo:
    """A vocabulary written by hand: no GGUF, no llama.cpp."""
    texts = tuple(b"<|eos|>" if i == eos else b"<|end|>" if i == eot else b"t%d" % i
                  for i in range(n))
    attrs = tuple(ATTR_UNUSED if i in unused else ATTR_CONTROL if i in (eos, eot) else 4
                  for i in range(n))
    return VocabInfo(path=f"v{n}.gguf", vocab_type="bpe", n_tokens=n, bos=0, eos=eos, eot=eot,
                     eog=frozenset(i for i in (eos, eot) if i >= 0), add_bos=False,
                     add_eos=False, texts=texts, attrs=attrs)


def test_end_of_turn_beyond_the_common_range_is_reported() -> None:
    ft = hand_vocab(12, eot=11)
    report = align({"small_ft": ft, "large_base": hand_vocab(10)}, reference="small_ft")
    assert report.verdict == COMMON_RANGE  # EOS (id 1) can still end a reply
    assert "end-of-turn token(s) of small_ft masked: id 11 '<|end|>' is beyond the common " \
           "range 0..9 (tokens: large_base 10)" in report.summary()
    assert report.render().endswith(f"verdict: {COMMON_RANGE} ({report.end_reason()})")
    assert report.to_dict()["masked_end_tokens"][0]["id"] == 11


def test_end_of_turn_marked_unused_by_another_model_is_reported() -> None:
    ft, base = hand_vocab(10, eos=9), hand_vocab(10, eos=1, unused=(9,))
    report = align({"small_ft": ft, "small_base": base}, reference="small_ft")
    assert not report.allowed[9]
    assert report.verdict == INCOMPATIBLE and not report.ok
    assert ("every end-of-turn token of small_ft is masked (id 9 '<|eos|>' is marked unused "
            "by small_base): replies could never end their turn") in report.summary()


def test_vocab_module_does_not_load_the_backend() -> None:
    code = ("import sys, eft_local.vocab; "
            "sys.exit(any(m in sys.modules for m in ('eft_local.backend', 'llama_cpp')))")
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0



# -- engines that tell less than a GGUF file (issue 25) -----------------------------------------
def engine_view(local: VocabInfo, *, replace: bool = True) -> VocabInfo:
    """``local`` as an OpenAI-compatible engine shows it: no type, each id's piece read as
    text through /detokenize (a piece that is not whole UTF-8 characters is U+FFFD)."""
    pieces = tuple(p.decode("utf-8", "replace").encode() if replace else p
                   for p in local.pieces or ())
    return VocabInfo(path="http://gpu:8000", vocab_type="unknown", n_tokens=local.n_tokens,
                     bos=-1, eos=-1, eot=-1, eog=frozenset(), add_bos=False, add_eos=False,
                     texts=pieces, attrs=(0,) * local.n_tokens, pieces=pieces,
                     text_kind="piece", lossy=replace)


def family_pieces() -> VocabInfo:
    from eft_local.presets import FAMILY_DIR

    return backend.read_vocab(FAMILY_DIR / "large_base.gguf", pieces=True).as_pieces()


def test_a_vocabulary_of_unknown_type_is_compared_by_its_pieces() -> None:
    """vLLM tells no vocabulary type: it used to be refused for 'vocab types differ (bpe,
    unknown)' whatever its tokens were."""
    local = family_pieces()
    report = align({"large_base": engine_view(local, replace=False), "small_ft": local},
                   reference="small_ft")
    assert report.verdict != INCOMPATIBLE, report.summary()
    assert "types differ" not in report.summary()
    assert "vocab type unknown for large_base" in report.render()
    assert not any("bos differs" in n or "eos differs" in n for n in report.notes)


def test_two_known_types_that_differ_are_still_incompatible() -> None:
    local = family_pieces()
    other = VocabInfo(**{**local.__dict__, "vocab_type": "spm"})
    report = align({"a": local, "b": other, "c": engine_view(local, replace=False)})
    assert report.verdict == INCOMPATIBLE and "vocab types differ (bpe, spm)" in report.summary()


def test_byte_tokens_shown_as_replacement_characters_are_unknown_not_different() -> None:
    """128 of the family's 1,024 ids are single bytes of longer UTF-8 characters: through
    /detokenize they read as U+FFFD and used to count as 128 differing normal tokens."""
    local = family_pieces()
    report = align({"large_base": engine_view(local), "small_ft": local},
                   reference="small_ft")
    assert report.verdict != INCOMPATIBLE, report.summary()
    assert report.unknown == 128 and report.identical == 1024 - 128
    assert report.to_dict()["unknown"] == 128
    assert "compared as text only: 128 ids" in report.render()


def test_a_replacement_character_where_the_local_piece_is_text_is_a_mismatch() -> None:
    """Only what the engine could not show is unknown: U+FFFD where the local model has a
    whole character still differs."""
    local = family_pieces()
    seen = engine_view(local)
    texts = list(seen.texts)
    texts[300] = "\ufffd".encode()  # ' in' locally
    seen = VocabInfo(**{**seen.__dict__, "texts": tuple(texts), "pieces": tuple(texts)})
    report = align({"large_base": seen, "small_ft": local}, reference="small_ft")
    assert report.verdict == INCOMPATIBLE and report.n_normal_mismatch == 1
    assert report.mismatches[0].token_id == 300
