"""Issue 22 (third round), files: what the user names is read only when it is a regular
file of bounded size (never a FIFO that blocks, nor /dev/zero), and an --output is never
eaten: someone's own file, the input under another name, two runs at once, a full disk."""

from __future__ import annotations

import fcntl
import json
import os
import resource
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from eft_local import files
from eft_local.chat import Conversation
from eft_local.errors import EftError
from eft_local.files import read_user_bytes, read_user_text
from eft_local.session import LoadOptions, load_session
from tests.clihelp import THREADS, assert_one_line_error, run
from tests.hostilehelp import PATIENCE, Child, slow_decode

ROOT = Path(__file__).resolve().parent.parent
GREEDY = ["-t", "0", "--max-tokens", "2", *THREADS]


def cli(args: list[str], *, stdin: str = "", prelude: str = "",
        limits: dict[int, int] | None = None) -> subprocess.CompletedProcess[str]:
    """``eft-local ARGS`` in a child process with resource ``limits`` (a file that does
    not end there cannot hang the test: it fails at its timeout)."""
    code = f"import sys\n{prelude}\nfrom eft_local.cli.main import main\nmain(sys.argv[1:])"

    def limit() -> None:
        for kind, value in (limits or {}).items():
            resource.setrlimit(kind, (value, value))

    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("EFT_LOCAL_DEBUG", None)
    return subprocess.run([sys.executable, "-c", code, *args], input=stdin, text=True,
                          capture_output=True, timeout=PATIENCE, env=env, preexec_fn=limit)


def one_error(proc: subprocess.CompletedProcess[str]) -> str:
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    return errors[0]


@pytest.fixture
def fifo(tmp_path: Path) -> Path:
    path = tmp_path / "pipe.json"
    os.mkfifo(path)
    return path


# -- 5. special files: refused before anything is read, never blocking -------------------------
def test_5_special_files_are_refused(tmp_path: Path, fifo: Path) -> None:
    for path, kind in ((fifo, "is a FIFO (named pipe)"), (Path("/dev/zero"), "is a device"),
                       (tmp_path, "is a directory")):
        with pytest.raises(EftError) as caught:
            read_user_text(path, what="transcript")
        assert str(caught.value) == (f"{path}: {kind}, not a regular file; give the "
                                     "transcript as a regular file")
    with pytest.raises(EftError, match="none.json: transcript not found"):
        Conversation.load(tmp_path / "none.json")


def test_5_a_file_over_the_limit_is_refused_unread(tmp_path: Path) -> None:
    big = tmp_path / "big.json"
    with big.open("wb") as fh:
        fh.truncate(3 << 20)  # sparse: nothing to write
    with pytest.raises(EftError, match=r"big.json: the file is 3.0 MiB, over the limit of "
                                       r"2.0 MiB"):
        read_user_bytes(big, limit=2 << 20)
    assert len(read_user_bytes(big, limit=4 << 20)) == 3 << 20


def test_5_reading_is_done_in_pieces_an_interrupt_lands_between(tmp_path: Path,
                                                               monkeypatch) -> None:
    big = tmp_path / "big.txt"
    with big.open("wb") as fh:
        fh.truncate(5 << 20)
    calls = []
    real_read = os.read

    def read(fd: int, n: int) -> bytes:
        calls.append(n)
        if len(calls) == 2:
            raise KeyboardInterrupt  # Ctrl-C while the file is read
        return real_read(fd, n)

    monkeypatch.setattr(files.os, "read", read)
    open_fds = len(os.listdir("/proc/self/fd"))
    with pytest.raises(KeyboardInterrupt):
        read_user_bytes(big)
    assert calls == [1 << 20, 1 << 20]  # a piece at a time, not the whole file in one call
    assert len(os.listdir("/proc/self/fd")) == open_fds  # and the file was closed


@pytest.mark.parametrize("command", ["/load", "/grammar"])
def test_5_the_repl_refuses_special_files_and_goes_on(family, fifo: Path, command: str) -> None:
    script = f"{command} {fifo}\n{command} /dev/zero\n/quit\n"
    proc = cli(["chat", *family.trio(), *GREEDY], stdin=script,
               limits={resource.RLIMIT_AS: 4 << 30})
    assert proc.returncode == 0, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert errors == [f"error: {fifo}: is a FIFO (named pipe), not a regular file; give the "
                      f"{'transcript' if command == '/load' else 'file'} as a regular file",
                      "error: /dev/zero: is a device, not a regular file; give the "
                      f"{'transcript' if command == '/load' else 'file'} as a regular file"]
    assert proc.stdout.endswith(">>> /quit\n")


@pytest.mark.parametrize("option", ["--grammar", "--json-schema", "--input"])
def test_5_command_line_files_refuse_fifos(family, fifo: Path, option: str) -> None:
    proc = cli(["generate", *family.trio(), *GREEDY, option, str(fifo)])
    assert proc.returncode == 1
    assert "is a FIFO (named pipe), not a regular file" in one_error(proc)


# -- 10. an output file is never eaten ----------------------------------------------------------
def _texts(path: Path, *texts: str, newline: bool = True) -> Path:
    lines = [json.dumps({"id": i, "text": t}) for i, t in enumerate(texts, 1)]
    path.write_text("\n".join(lines) + ("\n" if newline else ""), encoding="utf-8")
    return path


@pytest.mark.parametrize("texts", [("first text", "second text"), ("only text",)])
def test_10_the_users_own_file_without_a_final_newline_is_refused(family, tmp_path,
                                                                  texts) -> None:
    src = _texts(tmp_path / "t.jsonl", "Hello there")
    mine = _texts(tmp_path / "mytexts.jsonl", *texts, newline=False)
    before = mine.read_bytes()
    result = run(["score", *family.trio(), *THREADS, "--input", str(src), "--output",
                  str(mine)])
    assert_one_line_error(result, "mytexts.jsonl: not an eft-local results file",
                          "give another --output")
    assert mine.read_bytes() == before


def test_10_a_whole_last_record_without_its_newline_is_kept(family, tmp_path) -> None:
    src = tmp_path / "in.jsonl"
    src.write_text('{"id": "a", "prompt": "Hi"}\n{"id": "b", "prompt": "Yo"}\n')
    out = tmp_path / "out.jsonl"
    args = ["generate", *family.trio(), *GREEDY, "--input", str(src), "--output", str(out)]
    assert run(args).exit_code == 0
    first = out.read_bytes().split(b"\n")[0]
    out.write_bytes(first)  # record a, whole, and no newline after it
    result = run(args)
    assert result.exit_code == 0, result.output
    assert "dropped" not in result.stderr
    assert result.stderr.splitlines()[-1] == "1 generated, 0 errors, 1 already done"
    lines = out.read_bytes().split(b"\n")
    assert lines[0] == first and json.loads(lines[1])["id"] == "b" and lines[2] == b""


def test_10_a_hard_link_to_the_input_is_refused(family, tmp_path) -> None:
    src = _texts(tmp_path / "t.jsonl", "first text", "second text", newline=False)
    before = src.read_bytes()
    link = tmp_path / "results.jsonl"
    os.link(src, link)
    result = run(["score", *family.trio(), *THREADS, "--input", str(src), "--output",
                  str(link)])
    assert_one_line_error(result, "the output is the input under another name (a hard link)")
    assert src.read_bytes() == before


# -- 11. two runs on one output -------------------------------------------------------------------
def test_11_an_output_locked_by_another_run_is_refused(family, tmp_path) -> None:
    src = tmp_path / "in.jsonl"
    src.write_text('{"id": "a", "prompt": "Hi"}\n')
    out = tmp_path / "out.jsonl"
    with out.open("ab") as other:  # what another run holds while it writes
        fcntl.flock(other.fileno(), fcntl.LOCK_EX)
        result = run(["generate", *family.trio(), *GREEDY, "--input", str(src), "--output",
                      str(out)])
    assert_one_line_error(result, "another run is writing this output", "give another --output")
    assert out.read_bytes() == b""


def test_11_two_runs_on_one_output_write_each_id_once(family, tmp_path) -> None:
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps({"id": i, "prompt": f"Hi {i}"}) + "\n" for i in range(6)))
    out = tmp_path / "out.jsonl"
    args = ["generate", *family.trio(), "-t", "0", "--max-tokens", "20", *THREADS,
            "--no-speculative", "--input", str(src), "--output", str(out)]
    first = Child(args, prelude=slow_decode(0.2, endless=True))
    try:
        first.wait_for(lambda: out.exists() and out.read_bytes().count(b"\n") >= 1,
                       "the first run writes a record")
        second = cli(args)
        assert second.returncode == 1
        assert "another run is writing this output" in one_error(second)
        first.signal(signal.SIGINT)
        first.finish()
    finally:
        first.kill()
    ids = [json.loads(line)["id"] for line in out.read_text().splitlines()]
    assert len(ids) == len(set(ids)) >= 1


# -- smaller: a full disk names the file ----------------------------------------------------------
def test_a_full_disk_names_the_output(family, tmp_path) -> None:
    src = tmp_path / "in.jsonl"
    src.write_text('{"id": "a", "prompt": "Hi"}\n')
    out = tmp_path / "out.jsonl"
    proc = cli(["generate", *family.trio(), *GREEDY, "--input", str(src), "--output", str(out)],
               prelude="import signal\nsignal.signal(signal.SIGXFSZ, signal.SIG_IGN)",
               limits={resource.RLIMIT_FSIZE: 100})  # as if the disk were full after 100 bytes
    assert proc.returncode == 1
    assert one_error(proc).startswith(f"error: {out}: cannot write output (File too large)")


# -- smaller: the first turn after /load of a long transcript tokenizes only what can fit -----
def test_a_long_history_is_never_tokenized_whole(family, monkeypatch) -> None:
    with load_session(models=family.pairs(), options=LoadOptions(n_threads=1)) as session:
        turns = []
        for i in range(2000):
            turns += [{"role": "user", "content": f"question number {i}"},
                      {"role": "assistant", "content": f"the answer to question {i}"}]
        session.conversation = Conversation(turns=turns)
        longest = []
        real = session.chat_tokens

        def counting(messages, **kwargs):
            longest.append(sum(len(m["content"]) for m in messages))
            return real(messages, **kwargs)

        monkeypatch.setattr(session, "chat_tokens", counting)
        for _chunk in session.chat("Hi", max_tokens=2, temperature=0):
            pass
        allowed = session.engine.n_ctx * session.longest_token
        assert max(longest) <= allowed, (max(longest), allowed)
        assert session.conversation.dropped > 3900
