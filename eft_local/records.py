"""JSONL batch generation: one result record per prompt line, appended as each finishes.

Input lines are ``{"id": ..., "prompt": ..., "system": ..., "raw": ..., "max_tokens": ...}``
(only ``prompt`` is required; ``id`` defaults to the line number). Each result is one whole
line, flushed at once, so an interrupted run loses nothing; a rerun skips every id the output
already holds a result for, and tries again those that ended in an error record (the old
error stays in the file, the new record follows it; ``--skip-errors`` skips them instead).
A bad record yields ``{"id": ..., "line": n, "error": "..."}`` and the batch goes on.
"""

from __future__ import annotations

import json
import os
import re
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

import click

from eft_local.errors import EftError

if TYPE_CHECKING:
    from eft_local.engine import Step
    from eft_local.session import Result, Session

Key = tuple[str, object]
"""How the output remembers a record: ("id", id), or ("line", n) when it has no id."""

_KEYS = {"id": (str, int), "prompt": (str,), "system": (str, type(None)), "raw": (bool,),
         "max_tokens": (int,)}


@dataclass(frozen=True)
class BatchDefaults:
    """Values for fields a record leaves out (from the command line)."""

    raw: bool = False
    system: str | None = None
    max_tokens: int = 512
    diagnostics: bool = False


@dataclass(frozen=True)
class Job:
    """One valid prompt line."""

    id: str | int
    line: int
    prompt: str
    system: str | None
    raw: bool
    max_tokens: int


_SURROGATE = re.compile("[\ud800-\udfff]")


def _lone_surrogate(value: object) -> int | None:
    """Index of the first UTF-16 surrogate in a string (JSON's "\\ud800"), else None."""
    found = _SURROGATE.search(value) if isinstance(value, str) else None
    return found.start() if found else None


def _usable_id(value: object) -> bool:
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
    safe = _usable_id(record_id) and _lone_surrogate(record_id) is None
    return data, (record_id if safe else None)


def check_unicode(line_no: int, data: dict[str, Any], keys: tuple[str, ...],
                  record_id: str | int | None) -> None:
    """Refuse string fields holding a lone surrogate (they cannot be encoded as UTF-8)."""
    for key in keys:
        where = _lone_surrogate(data.get(key))
        if where is not None:
            raise BadRecord(line_no, record_id, f"{key!r} is not valid Unicode (a lone "
                            f"surrogate \\u{ord(data[key][where]):04x} at character {where})")


def parse_job(line_no: int, line: str, defaults: BatchDefaults) -> Job:
    """Validate one input line; raises :class:`BadRecord` naming the problem."""
    data, bad_id = read_record(line_no, line)
    record_id = data.get("id", line_no)
    for key, types in _KEYS.items():
        if key in data and (not isinstance(data[key], types)
                            or (bool not in types and isinstance(data[key], bool))):
            names = " or ".join("null" if t is type(None) else t.__name__ for t in types)
            raise BadRecord(line_no, bad_id, f"{key!r} must be {names}, got {data[key]!r}")
    check_unicode(line_no, data, ("id", "prompt", "system"), bad_id)
    if "prompt" not in data:
        raise BadRecord(line_no, record_id, "missing 'prompt'")
    if not data["prompt"].strip():
        raise BadRecord(line_no, record_id, "empty 'prompt'")
    max_tokens = data.get("max_tokens", defaults.max_tokens)
    if max_tokens < 1:
        raise BadRecord(line_no, record_id, f"'max_tokens' must be >= 1, got {max_tokens}")
    return Job(id=record_id, line=line_no, prompt=data["prompt"],
               system=data.get("system", defaults.system), raw=data.get("raw", defaults.raw),
               max_tokens=max_tokens)


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


def previous_results(output_path: Path | None) -> dict[Key, bool]:
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
        click.echo(f"{output_path}: dropped an incomplete last line", err=True)
    status: dict[Key, bool] = {}
    for record in found:
        if _usable_id(record.get("id")):
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


def run_job(session: Session, job: Job, defaults: BatchDefaults) -> dict[str, Any]:
    """Generate one record; an :class:`EftError` (e.g. prompt too long) becomes an error."""
    try:
        result = session.generate(job.prompt, raw=job.raw, system=job.system,
                                  max_tokens=job.max_tokens,
                                  diagnostics=defaults.diagnostics)
    except EftError as exc:
        return {"id": job.id, "line": job.line, "error": str(exc)}
    return {"id": job.id, **result_record(session, result, diagnostics=defaults.diagnostics)}


def records(session: Session, lines: list[tuple[int, str]], defaults: BatchDefaults,
            skip: set[Key]) -> Iterator[dict[str, Any] | None]:
    """One output record per input line (None for a line skipped as already done)."""
    seen: set[str | int] = set()
    for line_no, line in lines:
        try:
            job = parse_job(line_no, line, defaults)
        except BadRecord as bad:
            yield None if bad.key() in skip else bad.record()
            continue
        if ("id", job.id) in skip:
            yield None
        elif job.id in seen:
            yield {"id": job.id, "line": line_no, "error": f"duplicate id {job.id!r}"}
        else:
            seen.add(job.id)
            yield run_job(session, job, defaults)


def run_batch(session: Session, input_path: Path, output_path: Path | None,
              defaults: BatchDefaults, *, retry_errors: bool = True) -> None:
    """Run every prompt of ``input_path``, appending results to ``output_path`` (or stdout).

    A rerun skips what the output already holds a result for, and tries again the records
    that only ended in errors (``retry_errors=False``: skips them too)."""
    lines = read_lines(input_path)
    previous = previous_results(output_path)
    skip = {key for key, ok in previous.items() if ok or not retry_errors}
    failed_before = {key for key, ok in previous.items() if not ok}
    total = len(lines)
    counts = {"done": 0, "errors": 0, "skipped": 0, "retried": 0}
    out: IO[str]
    try:
        out = output_path.open("a", encoding="utf-8") if output_path else sys.stdout
    except OSError as exc:
        raise EftError(f"{output_path}: cannot write output ({exc.strerror})") from None
    try:
        for n, record in enumerate(records(session, lines, defaults, skip), 1):
            if record is None:
                counts["skipped"] += 1
                continue
            out.write(json.dumps(record, ensure_ascii=False) + "\n")
            out.flush()
            counts["errors" if "error" in record else "done"] += 1
            key: Key = (("id", record["id"]) if _usable_id(record["id"])
                        else ("line", record.get("line")))
            retry = " (retried)" if key in failed_before else ""
            counts["retried"] += bool(retry)
            state = f"error: {record['error']}" if "error" in record else record["finish"]
            name = record["id"] if record["id"] is not None else f"line {record['line']}"
            click.echo(f"{n}/{total} {name}: {state}{retry}", err=True)
    finally:
        if out is not sys.stdout:
            out.close()
        click.echo(f"{counts['done']} generated, {counts['errors']} errors, "
                   f"{counts['skipped']} already done"
                   + (f" ({counts['retried']} earlier errors retried)" if counts["retried"]
                      else ""), err=True)


def result_record(session: Session, result: Result, *, diagnostics: bool) -> dict[str, Any]:
    """A finished generation as a JSON-ready dict (with per-token diagnostics if asked)."""
    record: dict[str, Any] = {"text": result.text, "finish": result.finish,
                              "prompt_tokens": result.prompt_tokens,
                              "generated_tokens": len(result.steps),
                              "formula": session.describe()}
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
