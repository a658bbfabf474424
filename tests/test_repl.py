"""The chat REPL, driven by scripted input: exact transcripts, slash commands, Ctrl-C."""

from __future__ import annotations

import json
import math
import re
import sys
from contextlib import closing
from pathlib import Path
from types import SimpleNamespace

import pytest

from eft_local.chat import Conversation
from eft_local.cli import repl
from eft_local.errors import EftError
from eft_local.session import Session
from tests.clihelp import THREADS, api_session, run, stdout

MAX = 5
GREEDY = ["-t", "0", "--max-tokens", str(MAX), *THREADS]


def reply(session: Session, message: str) -> str:
    """The REPL's lines for one answer, computed through the library."""
    chunks = list(session.chat(message, max_tokens=MAX))
    notices = "".join(f"[{c.notice}]\n" for c in chunks if c.notice)
    text = "".join(c.text for c in chunks)
    note = f"[stopped at {MAX} tokens]\n" if chunks[-1].finish == "length" else ""
    return notices + text + "\n" + note


def banner(family) -> str:
    return (
        "preset: command-line (models given with --model)\n"
        f"  large_base: {family.large_base}\n"
        f"  small_ft: {family.small_ft}\n"
        f"  small_base: {family.small_base}\n"
        "vocabulary: aligned\n"
        "formula: large_base + beta * (small_ft - small_base)\n"
        "  = 1*large_base + 1*small_ft - 1*small_base  (beta=1)\n"
        "sampling: temperature 0, top-p 1, top-k 0, min-p 0, seed 0\n"
        "type /help for commands, /quit or Ctrl-D to leave\n"
    )


def test_exact_transcript_with_slash_commands(family, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    script = ["Hi", "/beta 2", "/beta abc", "/temp -1", "/beta nan", "Again", "/save t.json",
              "/reset", "/load t.json", "/system Be brief", "More", "/quit", "ignored"]
    result = run(["chat", *family.trio(), *GREEDY], input="\n".join(script) + "\n")
    assert result.exit_code == 0, result.output

    with api_session(family.pairs(), temperature=0) as s:
        first = reply(s, "Hi")
        s.set_param("beta", 2.0)
        second = reply(s, "Again")
        saved = [dict(t) for t in s.conversation.turns]
        s.conversation.system = "Be brief"
        third = reply(s, "More")
    assert stdout(result) == (
        banner(family)
        + ">>> Hi\n" + first
        + ">>> /beta 2\nbeta = 2: 1*large_base + 2*small_ft - 2*small_base\n"
        + ">>> /beta abc\n>>> /temp -1\n>>> /beta nan\n"
        + ">>> Again\n" + second
        + ">>> /save t.json\nsaved 4 turns to t.json\n"
        + ">>> /reset\nconversation cleared\n"
        + ">>> /load t.json\nloaded 4 turns from t.json\n"
        + ">>> /system Be brief\nsystem prompt set\n"
        + ">>> More\n" + third
        + ">>> /quit\n"
    )
    errors = [line for line in result.stderr.splitlines() if line.startswith("error")]
    assert errors == ["error: /beta: 'abc' is not a number",
                      "error: invalid temperature -1.0: must be 0 (greedy) or in [1e-06, 1e+06] "
                      "(beyond, float32 overflows)",
                      "error: invalid beta nan: must be a finite number"]
    transcript = json.loads((tmp_path / "t.json").read_text("utf-8"))
    assert transcript["turns"] == saved
    assert transcript["system"] is None
    assert transcript["params"]["beta"] == 2.0


def test_why_and_stats(family) -> None:
    result = run(["chat", *family.trio(), *GREEDY], input="/why\nHi\n/why 3\n/stats\n")
    assert result.exit_code == 0, result.output
    with api_session(family.pairs(), temperature=0) as s:
        reply(s, "Hi")
        top = s.why(3)
    lines = stdout(result)[len(banner(family)):].splitlines()
    assert lines[:2] == [">>> /why", "nothing generated yet"]
    why = lines[lines.index(">>> /why 3") + 1:][:4]
    assert [line.split(":")[0] for line in why] == ["large_base", "small_ft", "small_base",
                                                    "mix"]
    assert why[3] == "mix:        " + "  ".join(f"{t!r} {p:.3f}" for t, p in top["mix"])
    stats = lines[lines.index(">>> /stats") + 1:]
    assert re.fullmatch(r"generated \d+ tokens at [\d.]+ tokens/s \(prefill \d+ tokens, "
                        r"first token after [\d.]+ s\)", stats[0]), stats[0]
    assert re.fullmatch(r"time per model: large_base [\d.]+ s, small_ft [\d.]+ s, "
                        r"small_base [\d.]+ s", stats[1]), stats[1]
    assert re.fullmatch(r"sampler: [\d.]+ ms/token", stats[2]), stats[2]



def test_stats_line_names_the_watch_of_a_measured_schedule(family) -> None:
    from eft_local.cli.repl import schedule_line
    from eft_local.presets import preset_from_paths
    from eft_local.session import LoadOptions

    with Session(preset_from_paths(family.pairs()), options=LoadOptions(n_threads=2)) as s:
        line = schedule_line(s.stats())
    assert re.search(r"measured at load .*; watched while decoding: 0 probe\(s\), "
                     r"0 switch\(es\)$", line), line


def test_ctrl_c_stops_the_answer_and_keeps_it(family, monkeypatch) -> None:
    session = api_session(family.pairs(), temperature=0)
    real_chat = session.chat

    def chat_interrupted_once(message: str, **kwargs):
        inner = real_chat(message, **kwargs)
        with closing(inner):
            for i, chunk in enumerate(inner):
                yield chunk
                if message == "Hi" and i == 1:  # the user presses Ctrl-C mid-answer
                    raise KeyboardInterrupt

    monkeypatch.setattr(session, "chat", chat_interrupted_once)
    monkeypatch.setattr(repl, "open_session", lambda preset, opts: session)
    result = run(["chat", *GREEDY], input="Hi\nAgain\n")  # ends with Ctrl-D (end of input)
    assert result.exit_code == 0, result.output

    partial = session.conversation.turns[1]["content"]
    assert session.conversation.turns[0] == {"role": "user", "content": "Hi"}
    with api_session(family.pairs(), temperature=0) as s:
        s.conversation = Conversation(turns=[{"role": "user", "content": "Hi"},
                                             {"role": "assistant", "content": partial}])
        second = reply(s, "Again")
        full_first = "".join(c.text for c in api_session(family.pairs(), temperature=0)
                             .chat("Hi", max_tokens=MAX))
    assert full_first.startswith(partial) and partial != full_first
    assert stdout(result) == (banner(family) + ">>> Hi\n" + partial + "\n[interrupted]\n"
                              + ">>> Again\n" + second + ">>> \n")


def test_message_too_long_for_the_context_keeps_the_session(family) -> None:
    result = run(["chat", *family.trio(), *GREEDY], input="x" * 300 + "\n/quit\n")
    assert result.exit_code == 0
    out = stdout(result)
    assert out.endswith(">>> " + "x" * 300 + "\n>>> /quit\n")
    (err,) = [line for line in result.stderr.splitlines() if line.startswith("error")]
    assert re.search(r"the message needs \d+ tokens .* but \d+ are allowed", err), err


def test_oldest_exchange_is_dropped_when_the_context_is_full(family) -> None:
    messages = ["a" * 100, "b" * 100, "c" * 100, "d" * 100]
    result = run(["chat", *family.trio(), *GREEDY], input="\n".join(messages) + "\n")
    assert result.exit_code == 0, result.output
    with api_session(family.pairs(), temperature=0) as s:
        replies = [reply(s, m) for m in messages]
        assert s.conversation.dropped == 4  # two exchanges, one at each of the last turns
    assert replies[2].startswith("[the conversation is longer than the context (256 tokens): "
                                 "its oldest turns are dropped from now on (1 exchange(s) this "
                                 "time)]\n")
    assert "[" not in replies[3].split("\n")[0]  # said once, not at every later turn
    assert stdout(result) == banner(family) + "".join(
        f">>> {m}\n{r}" for m, r in zip(messages, replies, strict=True)) + ">>> \n"


def test_context_overflow_error_refuses_and_keeps_the_whole_history(family) -> None:
    messages = ["a" * 100, "b" * 100, "c" * 100]
    lines = "\n".join([*messages, "/overflow truncate", "c" * 100, "/overflow sideways"])
    result = run(["chat", *family.trio(), *GREEDY, "--context-overflow", "error"],
                 input=lines + "\n")
    assert result.exit_code == 0, result.output
    errors = [x for x in result.stderr.splitlines() if x.startswith("error")]
    assert len(errors) == 2, result.stderr
    assert re.fullmatch(r"error: the conversation needs \d+ tokens but the context holds 256; "
                        r"drop older turns \(context overflow 'truncate'\) or raise n_ctx",
                        errors[0])
    assert errors[1] == "error: invalid context_overflow 'sideways': choose truncate or error"
    with api_session(family.pairs(), temperature=0) as s:
        replies = [reply(s, m) for m in messages[:2]]
        s.update(context_overflow="error")
        with pytest.raises(EftError, match="the conversation needs"):
            reply(s, messages[2])
        assert [t["content"][:1] for t in s.conversation.turns] == ["a", replies[0][0],
                                                                      "b", replies[1][0]]
        s.update(context_overflow="truncate")
        third = reply(s, messages[2])
    assert stdout(result).endswith(
        f">>> {messages[1]}\n{replies[1]}>>> {messages[2]}\n>>> /overflow truncate\n"
        f"context overflow = truncate\n>>> {messages[2]}\n{third}>>> /overflow sideways\n"
        ">>> \n")


def test_lambda_and_beta_options_and_live_changes(family) -> None:
    models = [*family.trio(), "-m", f"small_ft_alt={family.small_base}"]
    result = run(["chat", *models, "--formula", "interpolate", "--lambda", "0.8", "--beta",
                  "1.5", *THREADS], input="/lambda 0.25\n/lam x\n")
    assert result.exit_code == 0, result.output
    with api_session([*family.pairs(), f"small_ft_alt={family.small_base}"]) as s:
        s.update(formula=s.preset.with_formula("interpolate").formula)
        s.set_param("beta", 1.5)
        s.set_param("lam", 0.8)
        at_start = s.describe()
        s.set_param("lam", 0.25)
        live = s.describe()
    out = stdout(result)
    assert f"  = {at_start}  (beta=1.5, lam=0.8)\n" in out
    assert f">>> /lambda 0.25\nlam = 0.25: {live}\n>>> /lam x\n" in out
    assert "error: /lambda: 'x' is not a number" in result.stderr


def test_unknown_command_and_help(family) -> None:
    result = run(["chat", *family.trio(), *THREADS], input="/frob\n/help\n/exit\n")
    assert result.exit_code == 0
    assert "error: unknown command /frob (try /help)" in result.stderr
    out = stdout(result)
    for command in ("/beta X", "/lambda X", "/temp X", "/topp X", "/seed N", "/system TEXT",
                    "/reset", "/save FILE", "/load FILE", "/stats", "/why", "/quit"):
        assert f"\n{command} " in out


def test_history_lives_in_the_user_data_dir(isolated_home: Path, monkeypatch) -> None:
    path = repl.history_path()
    assert path == isolated_home / ".local" / "share" / "eft-local" / "chat_history"
    calls: list[tuple[str, str]] = []
    fake = SimpleNamespace(
        read_history_file=lambda p: calls.append(("read", p)),
        write_history_file=lambda p: calls.append(("write", p)),
        set_history_length=lambda n: None)
    monkeypatch.setitem(sys.modules, "readline", fake)
    path.parent.mkdir(parents=True)
    path.write_text("earlier line\n")
    save = repl.enable_history(path)
    save()
    assert calls == [("read", str(path)), ("write", str(path))]


def test_penalty_commands_change_the_replies_as_the_library_does(family) -> None:
    with api_session(family.pairs(), temperature=0, dry_base=2.0) as s:
        plain = reply(s, "Hi")
        s.reset()
        first = next(c.step.token for c in s.chat("Hi", max_tokens=1) if c.step)
        s.reset()
        s.set_sampling(repeat_penalty=1.3, frequency_penalty=0.5, presence_penalty=-0.5,
                       repeat_last_n=-1, dry_multiplier=0.8,
                       logit_bias={first: -math.inf, first + 1: 2})
        answer = reply(s, "Hi")
    assert answer != plain
    script = ["/repeat 1.3", "/freq 0.5", "/presence -0.5", "/lastn -1", "/dry 0.8",
              f"/bias {first + 1}=2", f"/bias {first}=-inf", "Hi", "/bias off", "/quit"]
    result = run(["chat", *family.trio(), *GREEDY, "--dry-base", "2"],
                 input="\n".join(script) + "\n")
    assert result.exit_code == 0, result.output
    assert stdout(result).endswith(
        ">>> /repeat 1.3\nrepeat_penalty = 1.3\n>>> /freq 0.5\nfrequency_penalty = 0.5\n"
        ">>> /presence -0.5\npresence_penalty = -0.5\n>>> /lastn -1\nrepeat_last_n = -1\n"
        f">>> /dry 0.8\ndry_multiplier = 0.8\n>>> /bias {first + 1}=2\nlogit bias "
        f"{first + 1}=2\n>>> /bias {first}=-inf\nlogit bias {first}=-inf {first + 1}=2\n"
        ">>> Hi\n" + answer + ">>> /bias off\nlogit bias off\n>>> /quit\n")


def test_penalty_options_show_in_the_banner(family) -> None:
    result = run(["chat", *family.trio(), *GREEDY, "--repeat-penalty", "1.1",
                  "--logit-bias", "5=-100", "--dry-multiplier", "0.8"], input="/quit\n")
    assert result.exit_code == 0, result.output
    assert ("sampling: temperature 0, top-p 1, top-k 0, min-p 0, seed 0, repeat penalty 1.1, "
            "frequency 0, presence 0 over the last 64 tokens, DRY 0.8, logit bias 5=-100\n"
            ) in stdout(result)


@pytest.mark.parametrize("line", ["/seed -1", "/seed x", "/topp 0", "/topp 2", "/minp 1",
                                  "/topk -3", "/max 0", "/temp", "/save", "/load missing.json",
                                  "/repeat 0", "/freq 3", "/presence x", "/lastn -2",
                                  "/dry -1", "/bias x", "/bias 5=200", "/bias 99999=1"])
def test_bad_slash_values_are_one_line(family, line: str, tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    result = run(["chat", *family.trio(), *THREADS], input=f"{line}\n/seed 4\n")
    assert result.exit_code == 0
    errors = [x for x in result.stderr.splitlines() if x.startswith("error")]
    assert len(errors) == 1, result.stderr
    assert stdout(result).endswith(f">>> {line}\n>>> /seed 4\nseed = 4\n>>> \n")
