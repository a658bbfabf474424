"""The questions of the README's tour and of the serving examples (docs/serving.md, once a
section of the README) are ones the default preset knows."""

from __future__ import annotations

import re
from pathlib import Path

from eft_local.evaluate import DEFAULT_QUESTIONS, load_questions
from eft_local.session import LoadOptions, load_session

ROOT = Path(__file__).resolve().parent.parent
PAGES = (ROOT / "README.md", ROOT / "docs" / "serving.md")


def test_the_serve_examples_ask_questions_the_default_preset_answers() -> None:
    """Issue 16: every question in the README and docs/serving.md is one of the family's own
    (``eval`` scores them) and the default preset answers it right, greedily."""
    known = {q.prompt: q.expected for q in load_questions(DEFAULT_QUESTIONS)}
    asked = [q for page in PAGES
             for q in re.findall(r'"([A-Z][^"]*\?)"', page.read_text("utf-8"))]
    assert asked
    unknown = [q for q in asked if q not in known]
    assert not unknown, f"not a question of the family: {unknown}"
    with load_session(options=LoadOptions(speculative=False, n_threads=1)) as s:
        for question in set(asked):
            answer = s.generate(question, raw=False, temperature=0, max_tokens=16).text
            assert answer == known[question], (question, answer)
