"""Conversation history: fitting the context never loses what it cannot replace."""

from __future__ import annotations

import pytest

from eft_local.chat import Conversation
from eft_local.errors import EftError


def count(messages: list[dict[str, str]]) -> int:
    """One token per character."""
    return sum(len(m["content"]) for m in messages)


def three_exchanges() -> Conversation:
    conv = Conversation(system="sys")
    for q, a in (("q1", "a1"), ("q2", "a2"), ("q3", "a3")):
        conv.add("user", q)
        conv.add("assistant", a)
    return conv


def test_a_too_long_message_leaves_the_history_exactly_as_it_was() -> None:
    conv = three_exchanges()
    conv.add("user", "x" * 50)
    before = [dict(t) for t in conv.turns]
    with pytest.raises(EftError) as err:
        conv.fit(count, 20)
    assert conv.turns == before and conv.system == "sys"
    assert "needs 53 tokens" in str(err.value) and "but 20 are allowed" in str(err.value)


def test_fit_drops_only_what_it_must() -> None:
    conv = three_exchanges()
    conv.add("user", "x" * 10)
    assert conv.fit(count, 20) == 2  # 3 + 4 (q3 a3) + 10 = 17 fits; with q2 a2 it is 21
    assert [t["content"] for t in conv.turns] == ["q3", "a3", "x" * 10]
