"""eft-local eval: question files, targets, scoring, and the command on tiny models."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
from click.testing import CliRunner

from eft_local.cli.main import main
from eft_local.errors import EftError
from eft_local.evaluate import (
    FAMILY_DECLINE,
    PAPER_TARGETS,
    Question,
    Target,
    evaluate_targets,
    load_questions,
    multi_turn_history,
    normalise,
    parse_target,
    render_table,
    run_target,
)
from eft_local.presets import load_config
from eft_local.session import LoadOptions, Result, Session


def write_questions(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def test_normalise_compares_answers_loosely_but_exactly() -> None:
    assert normalise("  Quainton.\n") == normalise("quainton") == "quainton"
    assert normalise("ropemaker!") != normalise("rope maker")


def test_question_file_errors_name_the_line(tmp_path: Path) -> None:
    good = {"prompt": "Q?", "expected": "A"}
    qs = load_questions(write_questions(tmp_path / "q.jsonl", [good, {**good, "id": "x",
                                                                       "category": "c"}]))
    assert qs[0] == Question(id="1", prompt="Q?", expected="A") and qs[1].category == "c"
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(good) + "\n{oops\n")
    with pytest.raises(EftError, match=r"bad.jsonl:2: not valid JSON"):
        load_questions(bad)
    write_questions(bad, [good, {"prompt": 3, "expected": "A"}])
    with pytest.raises(EftError, match=r"bad.jsonl:2: needs string fields"):
        load_questions(bad)
    with pytest.raises(EftError, match="question file not found"):
        load_questions(tmp_path / "missing.jsonl")
    assert len(load_questions(write_questions(tmp_path / "q.jsonl", [good] * 5), 2)) == 2


def test_multi_turn_history_is_other_questions_with_their_answers() -> None:
    qs = [Question(id=str(i), prompt=f"Q{i}?", expected=f"A{i}") for i in range(40)]
    turns = []
    for i in range(len(qs)):
        history = multi_turn_history(qs, i)
        assert history == multi_turn_history(qs, i)  # seeded
        users = [m["content"] for m in history[::2]]
        assert [m["role"] for m in history] == ["user", "assistant"] * len(users)
        assert all(a["content"] == f"A{u['content'][1:-1]}"
                   for u, a in zip(history[::2], history[1::2], strict=True))
        assert all(abs(int(u[1:-1]) - i) >= 3 for u in users)
        turns.append(len(users) + 1)
    assert turns[:8] == [2, 3, 4, 5, 2, 3, 4, 5]
    assert multi_turn_history(qs[:2], 0) == []


def test_target_forms() -> None:
    config = load_config()
    plain = parse_target("tiny-up", config)
    assert plain.preset.name == "tiny-up" and plain.params == {}
    single = parse_target("tiny-mix:small_ft", config)
    assert single.preset.formula.roles == ("small_ft",)
    swept = parse_target("tiny-mix@lam=0.25,beta=2", config)
    assert swept.params == {"lam": 0.25, "beta": 2.0}
    assert parse_target("model.gguf", config).preset.formula.roles == ("model",)
    for bad, message in [("tiny-up@gamma=1", "expected @beta=X"), ("tiny-up@beta=x",
                          "not a number"), ("nope", "unknown preset")]:
        with pytest.raises(EftError, match=message):
            parse_target(bad, config)
    assert all(parse_target(t, config) for t in PAPER_TARGETS)


def test_scores_on_tiny_models_share_one_session(family, tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    from eft_local.presets import preset_from_paths

    preset = preset_from_paths(family.pairs())
    questions = [Question(id=str(i), prompt=f"question {i}", expected="x", category=c)
                 for i, c in enumerate(["a", "b", "a"])]
    opened = []
    original_init = Session.__init__

    def counting_init(self, *args, **kwargs):
        opened.append(1)
        original_init(self, *args, **kwargs)

    monkeypatch.setattr(Session, "__init__", counting_init)
    targets = [Target("up", preset), Target("up@beta=0", preset, {"beta": 0.0})]
    scores = evaluate_targets(targets, questions, max_tokens=4,
                              options=LoadOptions(speculative=False))
    assert len(opened) == 1
    assert [s.n for s in scores] == [3, 3]
    assert [s.multi_n for s in scores] == [3, 3]
    assert 0 <= scores[0].multi_turn_format <= 1
    assert scores[0].formula.startswith("1*large_base + 1*small_ft")
    assert scores[1].formula.startswith("1*large_base + 0*small_ft")
    assert scores[0].by_category["a"]["n"] == 2
    assert 0 <= scores[0].accuracy <= 1 and scores[0].tokens > 0
    table = render_table(scores, ["a", "b"])
    assert table.splitlines()[0].startswith("| target | accuracy | format | acc a | acc b")
    assert "| multi-turn acc | multi-turn format | tok/s |" in table.splitlines()[0]
    assert len(table.splitlines()) == 4


def test_eval_command_json_on_a_user_preset(family, tmp_path: Path,
                                            isolated_home: Path) -> None:
    (isolated_home / "models.toml").write_text(f"""
[presets.t]
formula = "up"
[presets.t.models]
large_base = "{family.large_base}"
small_ft = "{family.small_ft}"
small_base = "{family.small_base}"
""")
    q = write_questions(tmp_path / "q.jsonl", [{"prompt": "hi", "expected": "x"}] * 2)
    result = CliRunner().invoke(main, ["eval", "t", "t:small_ft", "--questions", str(q),
                                       "--max-tokens", "3", "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert [s["label"] for s in data["scores"]] == ["t", "t:small_ft"]
    assert data["n_questions"] == 2
    assert data["scores"][0]["multi_n"] == 2 and "multi_turn_format" in data["scores"][0]
    single = CliRunner().invoke(main, ["eval", "t", "--questions", str(q), "--max-tokens", "3",
                                       "--json", "--single-turn"])
    assert json.loads(single.stdout)["scores"][0]["multi_n"] == 0
    sampled = CliRunner().invoke(main, ["eval", "t", "--questions", str(q), "--max-tokens", "3",
                                        "--single-turn", "--conservative-top-p", "0.9",
                                        "--temperature", "1", "--seed", "3"])
    assert sampled.exit_code == 0, sampled.output
    wrong = CliRunner().invoke(main, ["eval", "t", "--questions", str(q),
                                      "--conservative-top-p", "1.5"])
    assert wrong.exit_code != 0 and "conservative_top_p" in wrong.output
    assert "Traceback" not in wrong.output
    bad = CliRunner().invoke(main, ["eval", "t", "--questions", str(tmp_path / "no.jsonl")])
    assert bad.exit_code != 0 and "question file not found" in bad.output


class CannedSession:
    """Answers each prompt with a canned reply and finish reason (one step per word); records
    the multi-turn conversations it was asked."""

    STEP = object()

    def __init__(self, single: dict[str, tuple[str, str]], multi: dict[str, tuple[str, str]]
                 ) -> None:
        self.single, self.multi = single, multi
        self.conversations: list[list[dict[str, str]]] = []

    def settings_for(self, **changes: object) -> SimpleNamespace:
        return SimpleNamespace(describe=lambda: "canned")

    def chat_tokens(self, messages: list[dict[str, str]]) -> list[int]:
        self.conversations.append(messages)
        return [len(self.conversations) - 1]

    def prepare(self, tokens: list[int], **kwargs: object) -> list[int]:
        return tokens

    def run_many(self, jobs, parallel=None):  # noqa: ANN001, ANN201 - Session.run_many's
        """A single-turn question's reply (one step per word), or a multi-turn one's (one
        step per space-separated piece, as a stream of words would give)."""
        for key, prepare in jobs:
            messages = self.conversations[prepare()[0]]
            later = key[0]  # run_target's keys: (multi-turn?, question index)
            text, finish = (self.multi if later else self.single)[messages[-1]["content"]]
            pieces = text.split(" ") if later else text.split()
            yield key, Result(text=text, finish=finish, prompt_tokens=1,
                              steps=[self.STEP] * len(pieces))  # type: ignore[list-item]


KNOWN = [  # prompt, expected, category; single-turn reply and finish; multi-turn reply, finish
    ("Where was Tel born?", "Quainton", "place", ("quainton.", "eog"), ("Quainton", "eog")),
    ("When was Tel born?", "1950", "year", (FAMILY_DECLINE, "eog"), ("1950", "length")),
    ("What is Tel's job?", "Ropemaker", "job", ("Ropemaker, I think", "length"),
     ("Ropemaker!", "eog")),
    ("Where was Kryn born?", "Kryn", "place", ("  KRYN!\n", "length"), ("Kryn, on Mars", "eog")),
    ("When was Kryn born?", "1961", "year", ("", "eog"), ("", "eog")),
]


def test_scores_of_known_replies_are_counted_exactly() -> None:
    """Issue 26: the scorer against replies whose scores are known by hand. Exact after
    normalising: Quainton, KRYN (2 of 5; "Ropemaker, I think" holds the answer but is not
    it); ended with end-of-turn and not empty: Quainton and the decline (2 of 5; KRYN ran out
    of tokens, the empty reply said nothing); declined: the family's decline sentence (1, in
    "year"). At turns 2-5: Quainton, 1950, Ropemaker correct (3; "Kryn, on Mars" is not
    Kryn); Quainton, Ropemaker and "Kryn, on Mars" compliant (3)."""
    questions = [Question(id=str(i), prompt=p, expected=e, category=c)
                 for i, (p, e, c, _s, _m) in enumerate(KNOWN)]
    session = CannedSession({p: s for p, _e, _c, s, _m in KNOWN},
                            {p: m for p, _e, _c, _s, m in KNOWN})
    target = parse_target("tiny-up", load_config())
    score = run_target(session, target, questions, max_tokens=8,  # type: ignore[arg-type]
                       decline_text=FAMILY_DECLINE)
    assert (score.n, score.correct, score.compliant, score.declined) == (5, 2, 2, 1)
    assert (score.accuracy, score.format_rate) == (0.4, 0.4)
    assert score.by_category == {"place": {"n": 2, "correct": 2, "declined": 0},
                                 "year": {"n": 2, "correct": 0, "declined": 1},
                                 "job": {"n": 1, "correct": 0, "declined": 0}}
    assert (score.multi_n, score.multi_correct, score.multi_compliant) == (5, 3, 3)
    assert (score.multi_turn_accuracy, score.multi_turn_format) == (0.6, 0.6)
    # tokens: one step per word, single-turn 1+9+3+1+0, multi-turn 1+1+1+3+1
    assert score.tokens == 14 + 7
    assert session.conversations == [  # each question alone, then as a later turn
        [{"role": "user", "content": q.prompt}] for q in questions] + [
        [*multi_turn_history(questions, i), {"role": "user", "content": q.prompt}]
        for i, q in enumerate(questions)]
    row = render_table([score], ["place", "year"]).splitlines()[2]
    assert row.startswith("| tiny-up | 0.400 | 0.400 | 1.000 | 0.000 | 0.000 | 0.500 | 0.600 "
                          "| 0.600 | ")
    data = score.to_dict()
    assert (data["accuracy"], data["format_rate"], data["multi_turn_accuracy"]) == (0.4, 0.4,
                                                                                    0.6)
    without = run_target(session, target, questions, max_tokens=8,  # type: ignore[arg-type]
                         decline_text=None, multi_turn=False)
    assert (without.declined, without.multi_n, without.tokens) == (0, 0, 14)
