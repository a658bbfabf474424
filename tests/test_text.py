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


def whole(stops: list[str], pieces: list[str]) -> tuple[str, bool]:
    ts = TextStream(stops=stops)
    out = "".join(ts.push(p.encode()) for p in pieces) + ts.flush()
    assert out == ts.text
    return out, ts.stopped


def test_earliest_stop_in_text_order_wins_not_list_order() -> None:
    assert whole(["B", "A"], ["xAyB"]) == ("x", True)
    assert whole(["B", "A"], list("xAyB")) == ("x", True)  # streaming, one char a token


def test_a_longer_stop_that_starts_earlier_wins_when_streaming() -> None:
    # "B" completes first, but "ABCD" starts before it: the text ends before "ABCD"
    assert whole(["ABCD", "B"], list("xABCDy")) == ("x", True)
    # ...and when "ABCD" never completes, the text ends before the "B"
    assert whole(["ABCD", "B"], list("xABCy")) == ("xA", True)
    # generation ending while it waits: the earlier match still applies
    assert whole(["ABCD", "B"], list("xABC")) == ("xA", True)


def test_stream_matches_one_shot_on_random_texts() -> None:
    import random

    rng = random.Random(5)
    for _ in range(300):
        text = "".join(rng.choice("abc") for _ in range(rng.randint(0, 12)))
        stops = ["".join(rng.choice("abc") for _ in range(rng.randint(1, 4)))
                 for _ in range(rng.randint(1, 3))]
        hits = [i for i in (text.find(s) for s in stops) if i >= 0]
        expected = text[: min(hits)] if hits else text
        cuts = sorted(rng.sample(range(len(text) + 1), k=min(3, len(text) + 1)))
        pieces = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)], strict=True)]
        assert whole(stops, pieces) == (expected, bool(hits)), (text, stops, pieces)
