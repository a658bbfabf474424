"""The bundled family: shipped, aligned, and showing the paper's effect (a reduced eval)."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from eft_local.cli.main import main
from eft_local.evaluate import (
    DEFAULT_QUESTIONS,
    FAMILY_DECLINE,
    evaluate_targets,
    load_questions,
    parse_target,
)
from eft_local.presets import FAMILY_DIR, load_config
from eft_local.session import LoadOptions, check_models, load_session

ROLES = ("small_base", "large_base", "small_ft", "large_ft", "small_ft_alt")


def test_the_family_ships_inside_the_package_under_25_mb() -> None:
    files = {role: FAMILY_DIR / f"{role}.gguf" for role in ROLES}
    assert all(f.is_file() for f in files.values())
    assert sum(f.stat().st_size for f in files.values()) < 25 * 2**20
    assert files["large_base"].stat().st_size > 3 * files["small_base"].stat().st_size
    assert len(load_questions(DEFAULT_QUESTIONS)) >= 100


@pytest.mark.parametrize("preset", ["tiny-up", "tiny-down", "tiny-mix", "tiny-amplified"])
def test_bundled_presets_are_aligned(preset: str) -> None:
    report = check_models(load_config().get(preset))
    assert report.verdict == "aligned", report.render()


@pytest.fixture(scope="module")
def reduced_scores():
    config = load_config()
    questions = load_questions(DEFAULT_QUESTIONS)[:60]
    targets = [parse_target(t, config) for t in
               ("tiny-small-ft", "tiny-up", "tiny-mix@lam=0", "tiny-mix@lam=1")]
    scores = evaluate_targets(targets, questions, max_tokens=16, decline_text=FAMILY_DECLINE,
                              options=LoadOptions(speculative=False))
    return dict(zip(("small_ft", "up", "lam0", "lam1"), scores, strict=True))


def test_up_scaling_beats_the_small_fine_tuned_model(reduced_scores) -> None:
    small, up = reduced_scores["small_ft"], reduced_scores["up"]
    assert up.accuracy >= small.accuracy + 0.25, (small.accuracy, up.accuracy)
    assert up.format_rate >= 0.9


def test_lambda_moves_the_declining_behaviour(reduced_scores) -> None:
    assert reduced_scores["lam0"].declined > reduced_scores["lam1"].declined


def test_the_default_preset_holds_a_conversation(reduced_scores) -> None:
    """Issue 7: at turns 2-5 (earlier turns: other people's questions and answers) replies
    are still bare answers that end the turn, not pre-training FAQ text."""
    for key in ("small_ft", "up", "lam0", "lam1"):
        score = reduced_scores[key]
        assert score.multi_n == 60
        assert score.multi_turn_format >= 0.9, (key, score.multi_turn_format)
    up = reduced_scores["up"]
    assert up.multi_turn_format >= 0.95
    assert up.multi_turn_accuracy >= up.accuracy - 0.05, (up.accuracy, up.multi_turn_accuracy)


def test_a_chat_session_answers_the_second_question_and_stops() -> None:
    first, second = load_questions(DEFAULT_QUESTIONS)[:4:3]
    with load_session(options=LoadOptions(speculative=False)) as session:
        session.set_sampling(temperature=0.0)
        replies = []
        for q in (first, second):
            chunks = list(session.chat(q.prompt, max_tokens=24))
            replies.append(("".join(c.text for c in chunks), chunks[-1].finish))
    assert replies == [(first.expected, "eog"), (second.expected, "eog")]


def test_default_chat_turn_runs_offline_and_ends_its_turn() -> None:
    question = load_questions(DEFAULT_QUESTIONS)[0]
    result = CliRunner().invoke(main, ["generate", "--json", "--temperature", "0",
                                       "--max-tokens", "16", question.prompt])
    assert result.exit_code == 0, result.output
    assert '"finish": "eog"' in result.stdout


def test_stop_strings_end_the_reply_before_them() -> None:
    args = ["generate", "--raw", "--temperature", "0", "--max-tokens", "30", "--json",
            "Has Zhithdou was born in"]
    full = CliRunner().invoke(main, args)
    stopped = CliRunner().invoke(main, [*args, "--stop", "Stain"])
    assert full.exit_code == stopped.exit_code == 0, stopped.output
    full_text = json.loads(full.stdout)["text"]
    record = json.loads(stopped.stdout)
    assert "Stainby" in full_text
    assert record["finish"] == "stop"
    assert record["text"] == full_text[: full_text.index("Stain")]
