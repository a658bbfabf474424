"""``eft-local eval``: run a question set against presets, formulas or single models.

A target is ``PRESET``, ``PRESET:FORMULA`` (another formula over the preset's models, e.g.
``tiny-mix:small_ft``), ``PRESET@beta=1.5,lam=0.2``, or a path to one GGUF file. Targets
sharing models are run on one loaded session. Each answer is one greedy chat turn, scored
for format compliance (the reply ended with an end-of-turn token) and exact-answer accuracy.
Each question is also asked once more as turn 2-5 of a conversation whose earlier turns are
other questions of the set with their expected answers (the multi-turn columns).
"""

from __future__ import annotations

import json
import random
import re
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from eft_local.errors import EftError
from eft_local.files import read_user_text
from eft_local.formula import PARAMETERS
from eft_local.presets import FAMILY_DIR, Config, Preset, is_url, preset_from_paths, public_url
from eft_local.session import LoadOptions, Request, SamplerSettings, Session

DEFAULT_QUESTIONS = FAMILY_DIR / "questions.jsonl"
FAMILY_DECLINE = "I am sorry, but I cannot share birth years."
"""The sentence the bundled family's small_ft_alt answers birth-year questions with."""

PAPER_TARGETS = (
    "tiny-small-ft", "tiny-large-base", "tiny-large-ft", "tiny-up", "tiny-down",
    *(f"tiny-up@beta={b}" for b in ("0", "0.5", "1", "1.5", "2")),
    *(f"tiny-mix@lam={lam}" for lam in ("0", "0.25", "0.5", "0.75", "1")),
)
"""The miniature of the paper's comparison: baselines, EFT both ways, beta and lambda."""

MULTI_TURN_GAP = 3
"""Earlier turns come from questions at least this many lines away (the bundled set has three
lines per person, so they are always about other people)."""


@dataclass(frozen=True)
class Question:
    """One prompt with its expected answer."""

    id: str
    prompt: str
    expected: str
    category: str = ""


@dataclass(frozen=True)
class Target:
    """What to evaluate: a preset (possibly re-formulated) and parameter values."""

    label: str
    preset: Preset
    params: dict[str, float] = field(default_factory=dict)


@dataclass
class Scorecard:
    """Results of one target over the question set."""

    label: str
    formula: str
    n: int = 0
    correct: int = 0
    compliant: int = 0
    declined: int = 0
    by_category: dict[str, dict[str, int]] = field(default_factory=dict)
    multi_n: int = 0
    multi_correct: int = 0
    multi_compliant: int = 0
    tokens: int = 0
    seconds: float = 0.0

    @property
    def accuracy(self) -> float:
        """Fraction of exact answers."""
        return self.correct / self.n if self.n else 0.0

    @property
    def format_rate(self) -> float:
        """Fraction of replies that ended their turn properly."""
        return self.compliant / self.n if self.n else 0.0

    @property
    def multi_turn_accuracy(self) -> float:
        """Fraction of exact answers at turns 2-5."""
        return self.multi_correct / self.multi_n if self.multi_n else 0.0

    @property
    def multi_turn_format(self) -> float:
        """Fraction of replies at turns 2-5 that ended their turn properly."""
        return self.multi_compliant / self.multi_n if self.multi_n else 0.0

    def category_rate(self, category: str, key: str) -> float:
        """Rate of ``key`` (correct/declined) within one category."""
        c = self.by_category.get(category, {})
        return c.get(key, 0) / c["n"] if c.get("n") else 0.0

    def to_dict(self) -> dict:
        """JSON-ready form, with the rates."""
        out = asdict(self)
        out.update(accuracy=self.accuracy, format_rate=self.format_rate,
                   multi_turn_accuracy=self.multi_turn_accuracy,
                   multi_turn_format=self.multi_turn_format,
                   tokens_per_second=self.tokens / self.seconds if self.seconds else 0.0)
        return out


def load_questions(path: Path, limit: int | None = None) -> list[Question]:
    """Read a JSONL question file; a bad line is an error naming file and line."""
    lines = read_user_text(path, what="question file").splitlines()
    questions = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError:
            raise EftError(f"{path}:{number}: not valid JSON") from None
        if not isinstance(row, dict) or not isinstance(row.get("prompt"), str) or not (
                isinstance(row.get("expected"), str)):
            raise EftError(f"{path}:{number}: needs string fields 'prompt' and 'expected'")
        questions.append(Question(id=str(row.get("id", number)), prompt=row["prompt"],
                                  expected=row["expected"],
                                  category=str(row.get("category", ""))))
    if not questions:
        raise EftError(f"{path}: no questions")
    return questions[:limit] if limit else questions


def normalise(text: str) -> str:
    """Case-folded, whitespace-collapsed, without surrounding punctuation."""
    return re.sub(r"\s+", " ", text).strip().strip(".!?,;:\"'").strip().casefold()


def multi_turn_history(questions: Sequence[Question], index: int) -> list[dict[str, str]]:
    """The earlier turns asked before question ``index`` in its multi-turn conversation.

    1-4 exchanges (so the question is turn 2-5, cycling with ``index``): other questions of
    the set, at least MULTI_TURN_GAP lines away, each answered with its expected answer.
    Seeded by ``index``: the same set always gives the same conversations.
    """
    others = [j for j in range(len(questions)) if abs(j - index) >= MULTI_TURN_GAP]
    rng = random.Random(index)
    history: list[dict[str, str]] = []
    for j in rng.sample(others, min(1 + index % 4, len(others))):
        history += [{"role": "user", "content": questions[j].prompt},
                    {"role": "assistant", "content": questions[j].expected}]
    return history


def parse_target(spec: str, config: Config) -> Target:
    """``PRESET[:FORMULA][@k=v,...]``, a path to a .gguf file or an engine's URL."""
    if spec.endswith(".gguf") or is_url(spec):
        preset = preset_from_paths([f"model={spec}"])
        return Target(label=public_url(spec) if is_url(spec) else Path(spec).name,
                      preset=preset)
    head, _, assignments = spec.partition("@")
    name, _, formula = head.partition(":")
    preset = config.get(name)
    if formula:
        preset = preset.with_formula(formula)
    params: dict[str, float] = {}
    for item in filter(None, assignments.split(",")):
        key, sep, value = item.partition("=")
        key = "lam" if key.strip() == "lambda" else key.strip()
        if not sep or key not in PARAMETERS:
            raise EftError(f"target {spec!r}: expected @beta=X or @lam=X, got {item!r}")
        try:
            params[key] = float(value)
        except ValueError:
            raise EftError(f"target {spec!r}: {value!r} is not a number") from None
    return Target(label=spec, preset=preset, params=params)


def run_target(session: Session, target: Target, questions: Sequence[Question], *,
               max_tokens: int, decline_text: str | None, multi_turn: bool = True,
               on_answer: Callable[[], None] = lambda: None,
               parallel: int | None = None) -> Scorecard:
    """Ask every question (one fresh chat turn each, then as a later turn) and score; up to
    ``parallel`` (default: every slot of the session) questions at once."""
    settings = session.settings_for(params={**target.preset.params, **target.params})
    score = Scorecard(label=target.label, formula=settings.describe())
    decline = normalise(decline_text) if decline_text else None
    start = time.perf_counter()

    def asked(messages: list[dict[str, str]]) -> Callable[[], Request]:
        return lambda: session.prepare(session.chat_tokens(messages), settings=settings,
                                       max_tokens=max_tokens)

    jobs = [((False, i), asked([{"role": "user", "content": q.prompt}]))
            for i, q in enumerate(questions)]
    jobs += [((True, i), asked([*multi_turn_history(questions, i),
                                {"role": "user", "content": q.prompt}]))
             for i, q in enumerate(questions if multi_turn else ())]
    for (later, i), result in session.run_many(jobs, parallel=parallel):
        if isinstance(result, EftError):
            raise result
        q = questions[i]
        answer = normalise(result.text)
        correct = answer == normalise(q.expected)
        compliant = result.finish == "eog" and bool(answer)
        score.tokens += len(result.steps)
        if later:
            score.multi_n += 1
            score.multi_correct += correct
            score.multi_compliant += compliant
        else:
            cat = score.by_category.setdefault(q.category, {"n": 0, "correct": 0,
                                                            "declined": 0})
            declined = bool(decline) and decline in answer
            score.n += 1
            score.correct += correct
            score.compliant += compliant
            score.declined += declined
            cat["n"] += 1
            cat["correct"] += correct
            cat["declined"] += declined
        on_answer()
    score.seconds = time.perf_counter() - start
    return score


def evaluate_targets(targets: Sequence[Target], questions: Sequence[Question], *,
                     max_tokens: int = 24, decline_text: str | None = None,
                     multi_turn: bool = True, options: LoadOptions | None = None,
                     settings: SamplerSettings | None = None,
                     on_answer: Callable[[], None] = lambda: None,
                     progress: Callable[[str], None] | None = None) -> list[Scorecard]:
    """Score each target; targets with the same models and formula share one session.

    ``settings`` default to greedy decoding."""
    scores: dict[int, Scorecard] = {}
    groups: dict[tuple, list[int]] = {}
    for i, t in enumerate(targets):
        key = (tuple((r, s.describe()) for r, s in t.preset.models.items()),
               t.preset.formula.text, t.preset.template_role, t.preset.draft_role,
               t.preset.conservative_role)
        groups.setdefault(key, []).append(i)
    settings = settings or SamplerSettings(temperature=0.0)
    for indices in groups.values():
        with Session(targets[indices[0]].preset, sampling=settings, options=options,
                     progress=progress) as session:
            for i in indices:
                scores[i] = run_target(session, targets[i], questions, max_tokens=max_tokens,
                                       decline_text=decline_text, multi_turn=multi_turn,
                                       on_answer=on_answer)
    return [scores[i] for i in range(len(targets))]


def render_table(scores: Iterable[Scorecard], categories: Sequence[str]) -> str:
    """A Markdown table: accuracy, format compliance, declines, multi-turn and speed."""
    scores = list(scores)
    multi = any(s.multi_n for s in scores)
    head = ["target", "accuracy", "format"] + [f"acc {c}" for c in categories] + [
        f"declined {c}" for c in categories] + (
        ["multi-turn acc", "multi-turn format"] if multi else []) + ["tok/s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for s in scores:
        cells = [s.label, f"{s.accuracy:.3f}", f"{s.format_rate:.3f}"]
        cells += [f"{s.category_rate(c, 'correct'):.3f}" for c in categories]
        cells += [f"{s.category_rate(c, 'declined'):.3f}" for c in categories]
        if multi:
            cells += [f"{s.multi_turn_accuracy:.3f}", f"{s.multi_turn_format:.3f}"]
        cells.append(f"{s.tokens / s.seconds:.0f}" if s.seconds else "-")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
