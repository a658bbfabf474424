"""The JSONL batches of ``generate --input`` and ``score --input``.

Generate reads ``{"id": ..., "prompt": ..., "system": ..., "raw": ..., "max_tokens": ...,
"json_schema": {...} or "grammar": "GBNF"}`` per line (only ``prompt`` is required; ``id``
defaults to the line number; a record's schema or grammar replaces the command line's); score reads
``{"id": ..., "text": ...}``. Results are appended as each record finishes and a rerun
resumes (:func:`eft_local.records.write_results`).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from eft_local.errors import EftError
from eft_local.records import (
    BadRecord,
    Counts,
    check_unicode,
    read_lines,
    read_record,
    result_record,
    score_record,
    write_results,
)
from eft_local.text import printable

if TYPE_CHECKING:
    from eft_local.session import Request, Session

_KEYS = {"id": (str, int), "prompt": (str,), "system": (str, type(None)), "raw": (bool,),
         "max_tokens": (int,), "json_schema": (dict,), "grammar": (str,)}


@dataclass(frozen=True)
class BatchDefaults:
    """Values for fields a record leaves out (from the command line)."""

    raw: bool = False
    system: str | None = None
    max_tokens: int = 512
    diagnostics: bool = False
    check: Mapping[str, Any] | None = None
    """``--json-schema``'s schema, when a finished reply must be checked against it."""


@dataclass(frozen=True)
class Prompt:
    """One valid line of a generate batch."""

    id: str | int
    line: int
    prompt: str
    system: str | None
    raw: bool
    max_tokens: int
    json_schema: dict[str, Any] | None = None
    grammar: str | None = None


@dataclass(frozen=True)
class Text:
    """One valid line of a score batch."""

    id: str | int
    line: int
    text: str


def parse_prompt(line_no: int, line: str, defaults: BatchDefaults) -> Prompt:
    """Validate one generate line; raises :class:`BadRecord` naming the problem."""
    data, bad_id = read_record(line_no, line)
    record_id = data.get("id", line_no)
    for key, types in _KEYS.items():
        if key in data and (not isinstance(data[key], types)
                            or (bool not in types and isinstance(data[key], bool))):
            names = " or ".join("null" if t is type(None) else t.__name__ for t in types)
            raise BadRecord(line_no, bad_id, f"{key!r} must be {names}, got {data[key]!r}")
    check_unicode(line_no, data, ("id", "prompt", "system", "grammar"), bad_id)
    if "prompt" not in data:
        raise BadRecord(line_no, record_id, "missing 'prompt'")
    if not data["prompt"].strip():
        raise BadRecord(line_no, record_id, "empty 'prompt'")
    max_tokens = data.get("max_tokens", defaults.max_tokens)
    if max_tokens < 1:
        raise BadRecord(line_no, record_id, f"'max_tokens' must be >= 1, got {max_tokens}")
    if "json_schema" in data and "grammar" in data:
        raise BadRecord(line_no, record_id, "give 'json_schema' or 'grammar', not both")
    return Prompt(id=record_id, line=line_no, prompt=data["prompt"],
                  system=data.get("system", defaults.system), raw=data.get("raw", defaults.raw),
                  max_tokens=max_tokens, json_schema=data.get("json_schema"),
                  grammar=data.get("grammar"))


def parse_text(line_no: int, line: str) -> Text:
    """Validate one score line; raises :class:`BadRecord` naming the problem."""
    data, record_id = read_record(line_no, line)
    raw_id = data.get("id", line_no)
    if isinstance(raw_id, bool) or not isinstance(raw_id, (str, int)):
        raise BadRecord(line_no, None, f"'id' must be str or int, got {raw_id!r}")
    check_unicode(line_no, data, ("id", "text"), record_id)
    text = data.get("text")
    if not isinstance(text, str):
        raise BadRecord(line_no, record_id, "missing 'text' (a string)" if text is None
                        else f"'text' must be str, got {text!r}")
    if not text:
        raise BadRecord(line_no, record_id, "empty 'text'")
    return Text(id=raw_id, line=line_no, text=text)


def err_line(message: str) -> None:
    """One line on stderr: a command's progress or notes."""
    click.echo(printable(message), err=True)


def generate_batch(session: Session, input_path: Path, output_path: Path | None,
                   defaults: BatchDefaults, *, retry_errors: bool = True,
                   parallel: int = 1) -> Counts:
    """Generate a reply for every line of ``input_path``, appending results to
    ``output_path`` (or stdout) as each finishes, ``parallel`` records at once; progress
    and a summary on stderr."""
    from eft_local.schema_check import needs_check, violations
    from eft_local.session import Settings

    lines = read_lines(input_path)

    def request(prompt: Any) -> Request:
        grammar = prompt.grammar
        if prompt.json_schema is not None:  # as --json-schema: bounded, with its note
            grammar = Settings.grammar_of(
                json_schema=prompt.json_schema, note=lambda text: err_line(
                    f"note: line {prompt.line} (id {prompt.id!r}): {text}"))
        tokens = session.prompt_tokens(prompt.prompt, raw=prompt.raw, system=prompt.system)
        return session.prepare(tokens, max_tokens=prompt.max_tokens,
                               diagnostics=defaults.diagnostics, grammar=grammar)

    def run_many(todo: Iterator[tuple[int, Any]]
                 ) -> Iterator[tuple[tuple[int, Any], dict[str, Any] | EftError]]:
        jobs = ((entry, partial(request, entry[1])) for entry in todo)
        for entry, result in session.run_many(jobs, parallel=parallel):
            if isinstance(result, EftError):
                yield entry, result
                continue
            record = result_record(session, result, diagnostics=defaults.diagnostics)
            prompt = entry[1]
            schema = defaults.check if prompt.json_schema is None else prompt.json_schema
            broken = violations(schema, result.text) if schema and needs_check(schema) else []
            if broken:  # said in the record and on stderr
                record["schema_violations"] = broken
                err_line(f"note: line {prompt.line} (id {prompt.id!r}): the reply does not "
                         f"follow the JSON schema: {'; '.join(broken)}")
            yield entry, record

    counts = write_results(lines, output_path,
                           parse=lambda n, line: parse_prompt(n, line, defaults),
                           run=lambda _item: {}, run_many=run_many,
                           retry_errors=retry_errors, say=err_line, total=len(lines))
    err_line(f"{counts.done} generated, {counts.errors} errors, {counts.skipped} already done"
         + (f" ({counts.retried} earlier errors retried)" if counts.retried else ""))
    return counts


def score_batch(session: Session, input_path: Path, output_path: Path | None, *, top_n: int,
                per_model: bool, per_token: bool, parallel: int = 1) -> Counts:
    """Score every line of ``input_path``, appending results to ``output_path`` (or
    stdout), ``parallel`` texts evaluated together; progress and a summary on stderr."""
    lines = read_lines(input_path)

    def run_many(todo: Iterator[tuple[int, Any]]
                 ) -> Iterator[tuple[tuple[int, Any], dict[str, Any] | EftError]]:
        texts = ((entry, entry[1].text) for entry in todo)
        for entry, result in session.score_many(texts, parallel=parallel, top_n=top_n,
                                                per_model=per_model):
            yield entry, (result if isinstance(result, EftError) else
                          {"text": entry[1].text,
                           **score_record(session, result, per_token=per_token)})

    counts = write_results(lines, output_path, parse=parse_text, run=lambda _item: {},
                           run_many=run_many, say=err_line, total=len(lines))
    err_line(f"{counts.done} scored, {counts.errors} errors, {counts.skipped} already done")
    return counts
