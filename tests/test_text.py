"""Streaming text: UTF-8 across token boundaries and stop strings."""

from __future__ import annotations

from eft_local.text import TextStream


def test_multibyte_characters_split_across_tokens() -> None:
    data = "héllo 🙂!".encode()
    ts = TextStream()
    out = [ts.push(data[i:i + 1]) for i in range(len(data))]
    out.append(ts.flush())
    assert "".join(out) == "héllo 🙂!"
    assert all("\ufffd" not in piece for piece in out)


def test_stop_string_across_tokens_is_not_shown() -> None:
    ts = TextStream(stops=["\nUser:"])
    shown = [ts.push(p.encode()) for p in ["Hi", " there", "\nUs", "er:", " more"]]
    assert "".join(shown) == "Hi there"
    assert ts.stopped
    assert ts.flush() == ""


def test_partial_stop_prefix_is_released_when_it_diverges() -> None:
    ts = TextStream(stops=["END"])
    assert ts.push(b"abc E") == "abc "
    assert ts.push(b"N") == ""
    assert ts.push(b"D?") == ""  # "END" completes: stop
    ts2 = TextStream(stops=["END"])
    assert ts2.push(b"x EN") == "x "
    assert ts2.push(b"O") == "ENO"
