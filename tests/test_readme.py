"""README's examples ask what the default preset knows."""

from __future__ import annotations

import re
from pathlib import Path

from eft_local.evaluate import DEFAULT_QUESTIONS, load_questions
from eft_local.session import LoadOptions, load_session

README = Path(__file__).resolve().parent.parent / "README.md"


def section(title: str) -> str:
    """The README's ``## title`` section, up to the next one."""
    text = README.read_text("utf-8")
    start = text.index(f"\n## {title}")
    end = text.find("\n## ", start + 1)
    return text[start:end if end > 0 else None]


def test_the_serve_examples_ask_questions_the_default_preset_answers() -> None:
    """Issue 16: every question in "Serving" is one of the family's own (``eval`` scores
    them) and the default preset answers it right, greedily."""
    known = {q.prompt: q.expected for q in load_questions(DEFAULT_QUESTIONS)}
    asked = re.findall(r'"([A-Z][^"]*\?)"', section("Serving"))
    assert asked
    unknown = [q for q in asked if q not in known]
    assert not unknown, f"not a question of the family: {unknown}"
    with load_session(options=LoadOptions(speculative=False, n_threads=1)) as s:
        for question in set(asked):
            answer = s.generate(question, raw=False, temperature=0, max_tokens=16).text
            assert answer == known[question], (question, answer)
