"""Conversation history, and what a chat longer than the context keeps.

:class:`Conversation` holds a system prompt and alternating turns (saved and loaded as JSON
transcripts); :func:`fit_messages` is the context policy: drop the oldest whole turns until
the rest fits, the system prompt and the newest message always kept. Rendering a chat with
its template is :mod:`eft_local.templates`.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from eft_local.errors import ContextFull, EftError
from eft_local.files import atomic_write, read_user_text


def fit_messages(messages: list[dict[str, str]],
                 count_tokens: Callable[[list[dict[str, str]]], int], budget: int, *,
                 limit: int | None = None) -> tuple[list[dict[str, str]], int]:
    """Drop the oldest whole turns of ``messages`` until they take at most ``budget``
    tokens; returns the messages kept and how many were dropped.

    A turn is a user message and what follows it up to the next user message (a reply
    before the first user message is a turn of its own). System messages and the newest
    message always stay, and the messages kept alternate as before. When even the shortest
    history is over ``budget`` it is returned if it fits ``limit`` (default ``budget``:
    the room left for a reply shrinks); else :class:`ContextFull` says how many tokens the
    newest message needs and how many are allowed, and nothing is dropped.
    """
    need = count_tokens(messages)
    if need <= budget:
        return list(messages), 0
    others = [i for i, m in enumerate(messages) if m.get("role") != "system"]
    cuts = [q for q in range(1, len(others)) if messages[others[q]].get("role") == "user"]

    def without(q: int) -> list[dict[str, str]]:
        gone = set(others[:q])
        return [m for i, m in enumerate(messages) if i not in gone]

    shortest = cuts[-1] if cuts else 0
    if shortest:
        need = count_tokens(without(shortest))
    allowed = budget if limit is None else limit
    if need > allowed:
        raise ContextFull(f"the message needs {need} tokens (with the system prompt and chat "
                          f"template) but {allowed} are allowed; shorten it or raise the "
                          "context size (n_ctx)")
    if need > budget:
        return without(shortest), shortest
    low, high = 0, len(cuts) - 1  # the fewest turns to drop (fewer turns, fewer tokens)
    while low < high:
        mid = (low + high) // 2
        if count_tokens(without(cuts[mid])) <= budget:
            high = mid
        else:
            low = mid + 1
    return without(cuts[low]), cuts[low]


@dataclass
class Conversation:
    """A system prompt and alternating user/assistant turns."""

    system: str | None = None
    turns: list[dict[str, str]] = field(default_factory=list)
    dropped: int = 0
    """Turns dropped so far to fit the context (:meth:`drop`)."""

    def messages(self) -> list[dict[str, str]]:
        """The message list a chat template expects."""
        head = [{"role": "system", "content": self.system}] if self.system else []
        return head + list(self.turns)

    def add(self, role: str, content: str) -> None:
        """Append one turn."""
        self.turns.append({"role": role, "content": content})

    def drop(self, n: int) -> int:
        """Drop the ``n`` oldest turns; returns how many user turns (exchanges) went."""
        exchanges = sum(t["role"] == "user" for t in self.turns[:n])
        del self.turns[:n]
        self.dropped += n
        return exchanges

    def save(self, path: str | Path, extra: dict | None = None) -> None:
        """Write the transcript as JSON (atomically)."""
        path = Path(path)
        data = {"system": self.system, "turns": self.turns, **(extra or {})}
        atomic_write(path, json.dumps(data, indent=2, ensure_ascii=False) + "\n",
                     what="transcript")

    @classmethod
    def load(cls, path: str | Path) -> Conversation:
        """Read a transcript written by :meth:`save`."""
        path = Path(path)
        text = read_user_text(path, what="transcript")
        try:
            data = json.loads(text)
        except RecursionError:
            raise EftError(f"{path}: not a readable JSON transcript (nested too deeply)"
                           ) from None
        except ValueError as exc:
            raise EftError(f"{path}: not a readable JSON transcript ({exc})") from None
        turns = data.get("turns") if isinstance(data, dict) else None
        ok = isinstance(turns, list) and all(
            isinstance(t, dict) and t.get("role") in ("user", "assistant")
            and isinstance(t.get("content"), str) for t in turns)
        if not ok:
            raise EftError(f"{path}: transcript needs 'turns': a list of "
                           "{role: user|assistant, content: text}")
        for i, turn in enumerate(turns):
            want = "user" if i % 2 == 0 else "assistant"
            if turn["role"] != want:
                raise EftError(f"{path}: turn {i + 1} is a {turn['role']} turn where a {want} "
                               "turn belongs (turns alternate, starting with the user)")
        if len(turns) % 2:
            raise EftError(f"{path}: the last turn is the user's, with no reply (a transcript "
                           "ends with an assistant turn)")
        system = data.get("system")
        return cls(system=system if isinstance(system, str) else None,
                   turns=[{"role": t["role"], "content": t["content"]} for t in turns])


# -- tokenizing a rendered chat -----------------------------------------------------------------
