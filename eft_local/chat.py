"""Chat templates and conversation history.

Templates are the fine-tuned model's own Jinja template (GGUF ``tokenizer.chat_template``)
rendered in a sandbox, as llama.cpp front ends do. History keeps the system prompt and
drops the oldest turns when the context is full.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from jinja2 import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment

from eft_local.errors import EftError

FALLBACK_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] | capitalize }}: {{ m['content'] }}\n\n{% endfor %}"
    "{% if add_generation_prompt %}Assistant:{% endif %}"
)
"""Used only when neither the model nor the preset has a template."""


def _raise(message: str) -> None:
    raise TemplateError(message)


def render(template: str, messages: list[dict[str, str]], *, bos_token: str = "",
           eos_token: str = "", add_generation_prompt: bool = True) -> str:
    """Render ``messages`` with a chat template; template errors become :class:`EftError`."""
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = _raise
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        return env.from_string(template).render(
            messages=messages, bos_token=bos_token, eos_token=eos_token,
            add_generation_prompt=add_generation_prompt)
    except TemplateError as exc:
        raise EftError(f"chat template failed: {exc}") from None


@dataclass
class Conversation:
    """A system prompt and alternating user/assistant turns."""

    system: str | None = None
    turns: list[dict[str, str]] = field(default_factory=list)

    def messages(self) -> list[dict[str, str]]:
        """The message list a chat template expects."""
        head = [{"role": "system", "content": self.system}] if self.system else []
        return head + list(self.turns)

    def add(self, role: str, content: str) -> None:
        """Append one turn."""
        self.turns.append({"role": role, "content": content})

    def drop_oldest_exchange(self) -> bool:
        """Drop the oldest user turn and the replies after it; False when nothing is left."""
        if len(self.turns) <= 1:
            return False
        cut = 1
        while cut < len(self.turns) and self.turns[cut]["role"] != "user":
            cut += 1
        if cut >= len(self.turns):
            return False
        del self.turns[:cut]
        return True

    def fit(self, count_tokens: Callable[[list[dict[str, str]]], int], budget: int) -> int:
        """Drop oldest exchanges until the prompt fits ``budget`` tokens; returns how many."""
        dropped = 0
        while count_tokens(self.messages()) > budget:
            if not self.drop_oldest_exchange():
                raise EftError(f"the prompt does not fit the context ({budget} tokens left for "
                               "it); shorten it or raise n_ctx")
            dropped += 1
        return dropped

    def save(self, path: str | Path, extra: dict | None = None) -> None:
        """Write the transcript as JSON (atomically)."""
        path = Path(path)
        data = {"system": self.system, "turns": self.turns, **(extra or {})}
        tmp = path.with_name(path.name + ".part")
        try:
            tmp.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", "utf-8")
            tmp.replace(path)
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            raise EftError(f"{path}: cannot write transcript ({exc.strerror})") from None

    @classmethod
    def load(cls, path: str | Path) -> Conversation:
        """Read a transcript written by :meth:`save`."""
        path = Path(path)
        try:
            data = json.loads(path.read_text("utf-8"))
        except FileNotFoundError:
            raise EftError(f"{path}: transcript not found") from None
        except (OSError, ValueError) as exc:
            raise EftError(f"{path}: not a readable JSON transcript ({exc})") from None
        turns = data.get("turns") if isinstance(data, dict) else None
        ok = isinstance(turns, list) and all(
            isinstance(t, dict) and t.get("role") in ("user", "assistant")
            and isinstance(t.get("content"), str) for t in turns)
        if not ok:
            raise EftError(f"{path}: transcript needs 'turns': a list of "
                           "{role: user|assistant, content: text}")
        system = data.get("system")
        return cls(system=system if isinstance(system, str) else None,
                   turns=[{"role": t["role"], "content": t["content"]} for t in turns])
