"""JSONL records: reading input lines, resumable result files, and the records eft-local
writes for a generation, a step and a score.

``generate --input``, ``score --input`` and the server share this module. A result file
holds one whole record per line, flushed as each finishes, so an interrupted run loses
nothing; a rerun skips every id the output already holds a result for, and tries again those
that ended in an error record (the old error stays, the new record follows it). A bad input
line yields ``{"id": ..., "line": n, "error": "..."}`` and the run goes on.
"""

from __future__ import annotations

import json
import math
import os
import re
import sys
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, Protocol

from eft_local.errors import EftError

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


def check_paths(input_path: Path, output_path: Path | None) -> None:
    """Fail early (before loading models) on an unreadable or undecodable input, and an
    unwritable output or one that is not this tool's results file."""
    if not input_path.exists():
        raise EftError(f"{input_path}: input file not found")
    if not input_path.is_file():
        raise EftError(f"{input_path}: input is not a regular file")
    try:
        with input_path.open("rb"):
            pass
    except OSError as exc:
        raise EftError(f"{input_path}: cannot read input ({exc.strerror})") from None
    read_lines(input_path)
    if output_path is None:
        return
    if output_path.resolve() == input_path.resolve():
        raise EftError(f"{output_path}: the output would overwrite the input")
    parent = output_path.parent
    if not parent.is_dir():
        raise EftError(f"{output_path}: output directory {parent} does not exist")
    if output_path.exists() and not output_path.is_file():
        raise EftError(f"{output_path}: not a regular file")
    target = output_path if output_path.exists() else parent
    if not os.access(target, os.W_OK):
        raise EftError(f"{output_path}: cannot write output (permission denied)")
    scan_output(output_path)


def read_lines(input_path: Path) -> list[tuple[int, str]]:
    """Non-blank input lines with their 1-based line numbers."""
    try:
        text = input_path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise EftError(f"{input_path}: not UTF-8 text ({exc.reason} at byte {exc.start})"
                       ) from None
    except OSError as exc:
        raise EftError(f"{input_path}: cannot read input ({exc.strerror})") from None
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


def scan_output(output_path: Path) -> tuple[list[dict[str, Any]], bool]:
    """The result records of an existing output file, and whether its last line is torn
    (a record cut off without its newline). Refuses a file that holds anything else: its
    lines are someone's data, never to be appended to or cut."""
    if not output_path.exists():
        return [], False
    try:
        data = output_path.read_bytes()
    except OSError as exc:
        raise EftError(f"{output_path}: cannot read output ({exc.strerror})") from None
    lines = data.split(b"\n")
    torn = lines.pop() if lines else b""  # what follows the last newline
    found = []
    for n, line in enumerate(lines, 1):
        record = _result_record(line)
        if record is None and line.strip():
            raise EftError(f"{output_path}: not an eft-local results file (line {n} is not a "
                           "result record); give another --output")
        if record is not None:
            found.append(record)
    if torn and not torn.startswith(RECORD_START):
        raise EftError(f"{output_path}: not an eft-local results file (line {len(lines) + 1} "
                       "is not a result record); give another --output")
    return found, bool(torn)


def _result_record(line: bytes) -> dict[str, Any] | None:
    try:
        record = json.loads(line.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        return None
    ok = isinstance(record, dict) and "id" in record and ("error" in record or "text" in record)
    return record if ok else None


def previous_results(output_path: Path | None, say: Say = lambda _m: None
                     ) -> dict[Key, bool]:
    """Each key already in the output: True when one of its records is a result, False when
    it has only error records (a later error for a done id is a duplicate line's). A torn
    last line (no newline) is cut off first."""
    if output_path is None:
        return {}
    found, torn = scan_output(output_path)
    if torn:
        data = output_path.read_bytes()
        with output_path.open("r+b") as fh:
            fh.truncate(data.rfind(b"\n") + 1)
        say(f"{output_path}: dropped an incomplete last line")
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
    previous = previous_results(output_path, say)
    skip = {key for key, ok in previous.items() if ok or not retry_errors}
    failed_before = {key for key, ok in previous.items() if not ok}
    counts = Counts()
    out: IO[str]
    try:
        out = output_path.open("a", encoding="utf-8") if output_path else sys.stdout
    except OSError as exc:
        raise EftError(f"{output_path}: cannot write output ({exc.strerror})") from None
    written = 0

    def emit(record: dict[str, Any]) -> None:
        nonlocal written
        out.write(json.dumps(record, ensure_ascii=False) + "\n")
        out.flush()
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
                emit({"id": item.id, "line": line_no, "error": f"duplicate id {item.id!r}"})
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

    try:
        for (line_no, item), outcome in (run_many or one_by_one)(items()):
            emit({"id": item.id, "line": line_no, "error": str(outcome)}
                 if isinstance(outcome, EftError) else {"id": item.id, **outcome})
    finally:
        if out is not sys.stdout:
            out.close()
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
