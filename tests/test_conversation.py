"""Conversation history: fitting the context never loses what it cannot replace."""

from __future__ import annotations

import random

import pytest

from eft_local.chat import Conversation, fit_messages
from eft_local.errors import ContextFull, EftError


def count(messages: list[dict[str, str]]) -> int:
    """One token per character."""
    return sum(len(m["content"]) for m in messages)


def three_exchanges() -> Conversation:
    conv = Conversation(system="sys")
    for q, a in (("q1", "a1"), ("q2", "a2"), ("q3", "a3")):
        conv.add("user", q)
        conv.add("assistant", a)
    return conv


def fit(conv: Conversation, budget: int) -> int:
    """What a chat turn does with its history (:meth:`eft_local.session.Session.chat`): the
    messages fitted to ``budget``, then the oldest turns dropped; the exchanges dropped."""
    _kept, n = fit_messages(conv.messages(), count, budget)
    return conv.drop(n)


def test_a_too_long_message_leaves_the_history_exactly_as_it_was() -> None:
    conv = three_exchanges()
    conv.add("user", "x" * 50)
    before = [dict(t) for t in conv.turns]
    with pytest.raises(EftError) as err:
        fit(conv, 20)
    assert conv.turns == before and conv.system == "sys"
    assert "needs 53 tokens" in str(err.value) and "but 20 are allowed" in str(err.value)


def test_fit_drops_only_what_it_must() -> None:
    conv = three_exchanges()
    conv.add("user", "x" * 10)
    assert fit(conv, 20) == 2  # 3 + 4 (q3 a3) + 10 = 17 fits; with q2 a2 it is 21
    assert [t["content"] for t in conv.turns] == ["q3", "a3", "x" * 10]


def test_fit_keeps_every_turn_when_it_fits_and_counts_what_it_drops() -> None:
    conv = three_exchanges()
    conv.add("user", "x")
    assert fit(conv, 100) == 0 and len(conv.turns) == 7 and conv.dropped == 0
    assert fit(conv, 7) == 3 and conv.turns == [{"role": "user", "content": "x"}]
    assert conv.dropped == 6  # turns, over the conversation's life


def msg(role: str, content: str) -> dict[str, str]:
    return {"role": role, "content": content}


def test_fit_messages_keeps_system_messages_the_newest_and_alternation() -> None:
    messages = [msg("system", "s"), msg("assistant", "hello"), msg("user", "u1"),
                msg("assistant", "a1"), msg("user", "u2"), msg("assistant", "a2"),
                msg("user", "u3")]
    kept, dropped = fit_messages(messages, count, 12)
    assert dropped == 1 and kept == [messages[0], *messages[2:]]  # the greeting is a turn
    kept, dropped = fit_messages(messages, count, 9)
    assert dropped == 3 and kept == [messages[0], *messages[4:]]
    kept, dropped = fit_messages(messages, count, 3)
    assert dropped == 5 and kept == [messages[0], messages[6]]
    assert [m["role"] for m in kept] == ["system", "user"]


def test_the_newest_message_may_take_the_room_of_the_reply_but_not_more() -> None:
    messages = [msg("system", "sys"), msg("user", "q1"), msg("assistant", "a1"),
                msg("user", "x" * 10)]
    kept, dropped = fit_messages(messages, count, 10, limit=13)
    assert dropped == 2 and kept == [messages[0], messages[3]]  # 13 > 10, within the limit
    before = [dict(m) for m in messages]
    with pytest.raises(ContextFull, match="needs 13 tokens .* but 12 are allowed"):
        fit_messages(messages, count, 10, limit=12)
    assert messages == before  # nothing of the history is lost


def test_a_message_alone_over_the_budget_without_older_turns() -> None:
    only = [msg("user", "x" * 10)]
    assert fit_messages(only, count, 5, limit=10) == (only, 0)
    with pytest.raises(ContextFull):
        fit_messages(only, count, 5)


@pytest.mark.parametrize("seed", range(20))
def test_fit_messages_drops_the_fewest_turns(seed: int) -> None:
    rng = random.Random(seed)
    messages = [msg("system", "s" * rng.randrange(5))]
    for _ in range(rng.randrange(1, 9)):
        messages += [msg("user", "u" * rng.randrange(1, 20)),
                     msg("assistant", "a" * rng.randrange(20))]
    messages.append(msg("user", "n" * rng.randrange(1, 20)))
    budget = rng.randrange(1, count(messages) + 5)
    others = len(messages) - 1
    fewest = next((q for q in range(0, others, 2)
                   if count(messages[:1] + messages[1 + q:]) <= budget), None)
    if fewest is None:
        with pytest.raises(ContextFull):
            fit_messages(messages, count, budget)
        return
    kept, dropped = fit_messages(messages, count, budget)
    assert dropped == fewest and kept == messages[:1] + messages[1 + fewest:]
