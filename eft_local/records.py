"""JSONL records: reading input lines, resumable result files, and the records eft-local
writes for a generation, a step and a score.

``generate --input``, ``score --input`` and the server share this module. A result file
holds one whole record per line, flushed as each finishes, so an interrupted run loses
nothing; a rerun skips every id the output already holds a result for, and tries again those
that ended in an error record (the old error stays, the new record follows it). A bad input
line yields ``{"id": ..., "line": n, "error": "..."}`` and the run goes on.

An existing output must be such a file, told by its records' fields (:data:`RESULT_FIELDS`),
not the input under another name (a hard link included), and not written by another run at
the same time (:class:`ResultsFile` locks it). Only a last line that is not a whole record
(no newline, does not parse) is cut, as what an interrupted write left.
"""

from __future__ import annotations

import json
import math
import os
import re
import stat
import sys
from collections.abc import Callable, Iterable, Iterator
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, Protocol

from eft_local.errors import EftError
from eft_local.files import read_user_text

try:
    import fcntl
except ImportError:  # Windows: results files are not locked there
    fcntl = None  # type: ignore[assignment]

if TYPE_CHECKING:
    from eft_local.session import Result, Score, Session, Step

Key = tuple[str, object]
"""How the output remembers a record: ("id", id), or ("line", n) when it has no id."""

LOGPROB_FLOOR = -9999.0
"""Written for a log-prob of -inf (a masked token), as OpenAI's API does: JSON has no
infinity."""

Say = Callable[[str], None]


def finite(value: float) -> float:
    """``value``, or :data:`LOGPROB_FLOOR` when it is -inf (JSON cannot carry it)."""
    return value if math.isfinite(value) else LOGPROB_FLOOR


# -- input lines --------------------------------------------------------------------------------
_SURROGATE = re.compile("[\ud800-\udfff]")


def lone_surrogate(value: object) -> int | None:
    """Index of the first UTF-16 surrogate in a string (JSON's "\\ud800"), else None."""
    found = _SURROGATE.search(value) if isinstance(value, str) else None
    return found.start() if found else None


def usable_id(value: object) -> bool:
    """True for an id a record can carry (a str or an int, not a bool)."""
    return isinstance(value, (str, int)) and not isinstance(value, bool)


class BadRecord(Exception):
    """An input line that cannot be run."""

    def __init__(self, line: int, record_id: str | int | None, message: str) -> None:
        super().__init__(message)
        self.line, self.id, self.message = line, record_id, message

    def record(self) -> dict[str, Any]:
        """The error record written to the output."""
        return {"id": self.id, "line": self.line, "error": self.message}

    def key(self) -> Key:
        """What a rerun looks for in the output."""
        return ("line", self.line) if self.id is None else ("id", self.id)


INPUT_LIMIT = 256 << 20
"""Largest batch input file read (256 MiB): a bigger batch is split into several files."""


def check_paths(input_path: Path, output_path: Path | None) -> None:
    """Fail early (before loading models) on an unreadable or undecodable input, and an
    unwritable output, one that is the input under another name, one that is not this
    tool's results file, or one that another run is writing."""
    read_lines(input_path)
    if output_path is None:
        return
    if output_path.resolve() == input_path.resolve():
        raise EftError(f"{output_path}: the output would overwrite the input")
    if same_file(output_path, input_path):
        raise EftError(f"{output_path}: the output is the input under another name (a hard "
                       "link); give another output")
    parent = output_path.parent
    if not parent.is_dir():
        raise EftError(f"{output_path}: output directory {parent} does not exist")
    if output_path.exists() and not output_path.is_file():
        raise EftError(f"{output_path}: not a regular file")
    target = output_path if output_path.exists() else parent
    if not os.access(target, os.W_OK):
        raise EftError(f"{output_path}: cannot write output (permission denied)")
    if output_path.exists():
        with ResultsFile(output_path, create=False) as results:
            results.scan()


def same_file(a: Path, b: Path) -> bool:
    """True when ``a`` and ``b`` both exist and are one file (same device and inode: a hard
    link, which :meth:`Path.resolve` does not see)."""
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def read_lines(input_path: Path) -> list[tuple[int, str]]:
    """Non-blank input lines with their 1-based line numbers (a regular file of at most
    :data:`INPUT_LIMIT` bytes, UTF-8)."""
    text = read_user_text(input_path, what="input file", limit=INPUT_LIMIT)
    # split on newlines only: str.splitlines() would also split inside JSON strings that
    # hold U+2028 or U+0085, which json.dumps(ensure_ascii=False) leaves as they are
    return [(n, line) for n, line in enumerate(text.split("\n"), 1) if line.strip()]


def read_record(line_no: int, line: str) -> tuple[dict[str, Any], str | int | None]:
    """One input line as a JSON object, and its id when that id can go into a record
    (a str or int without lone surrogates), else None; raises :class:`BadRecord`."""
    try:
        data = json.loads(line)
    except ValueError as exc:
        raise BadRecord(line_no, None, f"not JSON ({exc})") from None
    if not isinstance(data, dict):
        raise BadRecord(line_no, None, "a record must be a JSON object")
    record_id = data.get("id", line_no)
    safe = usable_id(record_id) and lone_surrogate(record_id) is None
    return data, (record_id if safe else None)


def check_unicode(line_no: int, data: dict[str, Any], keys: tuple[str, ...],
                  record_id: str | int | None) -> None:
    """Refuse string fields holding a lone surrogate (they cannot be encoded as UTF-8)."""
    for key in keys:
        where = lone_surrogate(data.get(key))
        if where is not None:
            raise BadRecord(line_no, record_id, f"{key!r} is not valid Unicode (a lone "
                            f"surrogate \\u{ord(data[key][where]):04x} at character {where})")


RECORD_START = b'{"id": '
"""How every line this tool writes begins (json.dumps of a dict whose first key is id)."""

RESULT_FIELDS = ({"text", "finish", "generated_tokens", "formula"},
                 {"text", "logprob", "scored_tokens", "formula"})
"""The fields a result record of ``generate --input`` and of ``score --input`` always has
(besides its id); an input line such as ``{"id": 1, "text": ...}`` has not."""

ERROR_FIELDS = {"id", "line", "error"}
"""The fields of an error record, exactly."""


def result_line(line: bytes) -> dict[str, Any] | None:
    """The record on ``line`` when it is one this tool writes (a result or an error record,
    told by its fields), else None."""
    try:
        record = json.loads(line.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        return None
    if not isinstance(record, dict) or "id" not in record:
        return None
    if set(record) == ERROR_FIELDS or any(fields <= record.keys() for fields in RESULT_FIELDS):
        return record
    return None


def _parses(line: bytes) -> bool:
    """True when ``line`` is whole JSON (of any kind)."""
    try:
        json.loads(line.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        return False
    return True


class ResultsFile:
    """A results file (``--output``) opened for reading and appending, and locked for the
    run: an advisory lock (``flock``) that a second run on the same file finds taken, so it
    stops with one line instead of writing the same ids again. The lock goes with the file's
    closing (or the process's end, however it ends)."""

    def __init__(self, path: Path, *, create: bool = True) -> None:
        self.path = path
        flags = (os.O_RDWR | os.O_APPEND | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0)
                 | (os.O_CREAT if create else 0))
        try:
            fd = os.open(path, flags, 0o666)
        except OSError as exc:
            raise EftError(f"{path}: cannot write output ({exc.strerror or exc})") from None
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            raise EftError(f"{path}: not a regular file")
        self.fh: IO[bytes] = os.fdopen(fd, "r+b")
        try:
            _lock(fd, path)
        except BaseException:
            self.fh.close()
            raise

    def __enter__(self) -> ResultsFile:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the file (which releases the lock); what a failed write left in the
        buffer is dropped, its error was raised already."""
        with suppress(OSError):
            self.fh.close()

    def scan(self) -> tuple[list[dict[str, Any]], bytes | None]:
        """The records in the file, and its last line when that has no newline and is not a
        whole record (a record cut off by an interrupted run). Refuses a file that holds
        anything else: its lines are someone's data, never to be appended to or cut."""
        self.fh.seek(0)
        found: list[dict[str, Any]] = []
        n, line = 0, b""
        try:
            for n, line in enumerate(self.fh, 1):  # noqa: B007 - the last one is used below
                if not line.endswith(b"\n"):
                    break
                record = result_line(line)
                if record is None and line.strip():
                    raise self._foreign(n)
                if record is not None:
                    found.append(record)
            else:
                return found, None
        except OSError as exc:
            raise EftError(f"{self.path}: cannot read output ({exc.strerror})") from None
        record = result_line(line)
        if record is not None:  # a whole record that only lacks its newline
            found.append(record)
            return found, None
        if not line.startswith(RECORD_START) or _parses(line):  # someone's whole line
            raise self._foreign(n)
        return found, line

    def _foreign(self, n: int) -> EftError:
        return EftError(f"{self.path}: not an eft-local results file (line {n} is not a "
                        "result record); give another --output")

    def previous(self, say: Say = lambda _m: None) -> dict[Key, bool]:
        """Each key already in the file: True when one of its records is a result, False
        when it has only error records (a later error for a done id is a duplicate line's).
        A torn last line is cut off, and a newline added after a last record without one, so
        that appending starts on a line of its own."""
        found, torn = self.scan()
        size = self.fh.seek(0, os.SEEK_END)
        try:
            if torn is not None:
                self.fh.truncate(size - len(torn))
                say(f"{self.path}: dropped an incomplete last line")
            elif size:
                self.fh.seek(size - 1)
                if self.fh.read(1) != b"\n":
                    self.write(b"\n")
        except OSError as exc:
            raise EftError(f"{self.path}: cannot write output ({exc.strerror})") from None
        status: dict[Key, bool] = {}
        for record in found:
            if usable_id(record.get("id")):
                key: Key = ("id", record["id"])
            elif isinstance(record.get("line"), int):
                key = ("line", record["line"])
            else:
                continue
            status[key] = status.get(key, False) or "error" not in record
        return status

    def write(self, data: bytes) -> None:
        """Append ``data`` whole (a one-line error naming the file when the disk is full)."""
        try:
            self.fh.write(data)
            self.fh.flush()
        except OSError as exc:
            raise EftError(f"{self.path}: cannot write output ({exc.strerror or exc}); the "
                           "records before this one are kept, a rerun goes on from there"
                           ) from None


def _lock(fd: int, path: Path) -> None:
    """Take ``fd``'s exclusive advisory lock, or fail at once in one line."""
    if fcntl is None:  # no flock on this system (Windows): no lock
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise EftError(f"{path}: another run is writing this output (the file is locked); "
                       "wait for it to end or give another --output") from None
    except OSError:
        pass  # a file system without locks: go on unlocked


def scan_output(output_path: Path) -> tuple[list[dict[str, Any]], bool]:
    """The records of an existing results file, and whether its last line is torn."""
    if not output_path.exists():
        return [], False
    with ResultsFile(output_path, create=False) as results:
        found, torn = results.scan()
    return found, torn is not None


def previous_results(output_path: Path | None, say: Say = lambda _m: None
                     ) -> dict[Key, bool]:
    """Each key already in the output (see :meth:`ResultsFile.previous`)."""
    if output_path is None or not output_path.exists():
        return {}
    with ResultsFile(output_path, create=False) as results:
        return results.previous(say)


def done_keys(output_path: Path | None, *, retry_errors: bool = True) -> set[Key]:
    """Keys a rerun skips: those with a result, and with ``retry_errors=False`` also those
    whose records are all errors (by default a rerun tries them again, appending the new
    record after the old ones)."""
    return {key for key, ok in previous_results(output_path).items()
            if ok or not retry_errors}


class Item(Protocol):
    """A valid input record: what :func:`write_results` needs of it."""

    id: str | int
    line: int


RunMany = Callable[[Iterator[tuple[int, Item]]],
                   Iterator[tuple[tuple[int, Item], "dict[str, Any] | EftError"]]]
"""Runs (line number, item) pairs several at a time, yielding each pair with its record's
fields (or the error it ended in) as it finishes."""

@dataclass
class Counts:
    """What a run of :func:`write_results` did."""

    done: int = 0
    errors: int = 0
    skipped: int = 0
    retried: int = 0


def write_results(lines: Iterable[tuple[int, str]], output_path: Path | None, *,
                  parse: Callable[[int, str], Item], run: Callable[[Item], dict[str, Any]],
                  retry_errors: bool = True, say: Say = lambda _m: None,
                  total: int | None = None, run_many: RunMany | None = None) -> Counts:
    """Parse each input line, run it and append its record to ``output_path`` (stdout when
    None), one whole line each, flushed at once. Skips keys the output already holds a result
    for (and, without ``retry_errors``, those that only ended in errors); a bad line
    (:class:`BadRecord`), a duplicate id or an :class:`EftError` of ``run`` is an error
    record. ``run_many`` (instead of ``run``, item by item) runs several items at once and
    yields each with its outcome as it finishes: records are written in that order. ``say``
    gets one progress line per record."""
    results = ResultsFile(output_path) if output_path is not None else None
    try:
        previous = results.previous(say) if results else {}
        skip = {key for key, ok in previous.items() if ok or not retry_errors}
        failed_before = {key for key, ok in previous.items() if not ok}
        counts = Counts()
        written = 0

        def emit(record: dict[str, Any]) -> None:
            nonlocal written
            text = json.dumps(record, ensure_ascii=False) + "\n"
            if results is not None:
                results.write(text.encode("utf-8"))
            else:
                sys.stdout.write(text)
                sys.stdout.flush()
            written += 1
            key: Key = (("id", record["id"]) if usable_id(record["id"])
                        else ("line", record.get("line")))
            retry = " (retried)" if key in failed_before else ""
            counts.retried += bool(retry)
            if "error" in record:
                counts.errors += 1
                state = f"error: {record['error']}"
            else:
                counts.done += 1
                state = str(record.get("finish", "done"))
            name = record["id"] if record["id"] is not None else f"line {record['line']}"
            say(f"{written + counts.skipped}/{total or '?'} {name}: {state}{retry}")

        seen: set[str | int] = set()

        def items() -> Iterator[tuple[int, Item]]:
            for line_no, line in lines:
                try:
                    item = parse(line_no, line)
                except BadRecord as bad:
                    if bad.key() in skip:
                        counts.skipped += 1
                    else:
                        emit(bad.record())
                    continue
                if ("id", item.id) in skip:
                    counts.skipped += 1
                elif item.id in seen:
                    emit({"id": item.id, "line": line_no,
                          "error": f"duplicate id {item.id!r}"})
                else:
                    seen.add(item.id)
                    yield line_no, item

        def one_by_one(todo: Iterable[tuple[int, Item]]
                       ) -> Iterator[tuple[tuple[int, Item], dict[str, Any] | EftError]]:
            for entry in todo:
                try:
                    yield entry, run(entry[1])
                except EftError as exc:
                    yield entry, exc

        for (line_no, item), outcome in (run_many or one_by_one)(items()):
            emit({"id": item.id, "line": line_no, "error": str(outcome)}
                 if isinstance(outcome, EftError) else {"id": item.id, **outcome})
    finally:
        if results is not None:
            results.close()
    return counts


# -- the records eft-local writes ---------------------------------------------------------------
def result_record(session: Session, result: Result, *, diagnostics: bool,
                  remote: bool = False) -> dict[str, Any]:
    """A finished generation as a JSON-ready dict (with per-token diagnostics if asked;
    ``remote``: the session's network statistics of its remote roles, if it has any)."""
    record: dict[str, Any] = {"text": result.text, "finish": result.finish,
                              "prompt_tokens": result.prompt_tokens,
                              "generated_tokens": len(result.steps),
                              "formula": session.describe()}
    if remote and session.remote_stats():
        record["remote"] = session.remote_stats()["remote"]
    if diagnostics:
        record["tokens"] = [step_record(session, step) for step in result.steps]
    return record


def step_record(session: Session, step: Step) -> dict[str, Any]:
    """One token's diagnostics: text, p under the mix and each model, and whether the
    fine-tuned model alone (the session's conservative role) would have chosen another
    token."""
    return {"position": step.position, "token": step.token,
            "text": session.token_text(step.token), "p_mix": step.p_mix,
            "p_models": dict(step.p_models or {}), "ref_token": step.ref_token,
            "differs": step.ref_token is not None and step.ref_token != step.token}


def score_record(session: Session, score: Score, *, per_token: bool) -> dict[str, Any]:
    """A scored text as a JSON-ready dict (per-token records when asked)."""
    ppl = score.perplexity
    record: dict[str, Any] = {
        "logprob": finite(score.logprob), "tokens": len(score.tokens),
        "scored_tokens": score.count,
        "perplexity": ppl if math.isfinite(ppl) else None, "windows": score.windows,
        "formula": score.formula}
    if score.notes:
        record["notes"] = list(score.notes)
    if per_token:
        record["token_scores"] = [
            {"position": t.position, "token": t.token, "text": session.token_text(t.token),
             "logprob": None if t.logprob is None else finite(t.logprob),
             **({"top": [{"token": i, "text": session.token_text(i), "logprob": finite(lp)}
                         for i, lp in t.top]} if t.top else {}),
             **({"logprob_models": {r: finite(v) for r, v in t.model_logprobs.items()}}
                if t.model_logprobs is not None else {})}
            for t in score.tokens]
    return record
