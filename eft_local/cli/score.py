"""``eft-local score``: a text's log-prob, token count and perplexity under the mix.

One text (argument or stdin) prints a summary line, or with ``--json`` one record with the
per-token log-probs. ``--input`` reads JSONL records ``{"id": ..., "text": ...}`` and writes
one result line per record as each finishes; a rerun skips ids already in the output, as
``generate --input`` does.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

import click

from eft_local.cli.options import Number, model_options, open_session, split_args, stdin_prompt
from eft_local.errors import EftError
from eft_local.records import (
    BadRecord,
    check_paths,
    check_unicode,
    done_keys,
    read_lines,
    read_record,
)

if TYPE_CHECKING:
    from eft_local.session import Score, Session

LOGPROB_FLOOR = -9999.0
"""Written for a log-prob of -inf (a masked token), as OpenAI's API does; JSON has no inf."""


def finite(value: float) -> float:
    """``value``, or :data:`LOGPROB_FLOOR` when it is -inf (JSON cannot carry it)."""
    return value if math.isfinite(value) else LOGPROB_FLOOR


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


def summary(score: Score) -> str:
    """The one-line summary of a score."""
    ppl = score.perplexity
    return (f"logprob {score.logprob:.4f}  tokens {score.count}  perplexity "
            f"{ppl:.4f}" if math.isfinite(ppl) else
            f"logprob {score.logprob:.4f}  tokens {score.count}  perplexity n/a")


@click.command()
@click.argument("args", nargs=-1, metavar="[PRESET] [TEXT]")
@model_options
@click.option("--conservative-top-p", type=Number(0, 1, open_low=True),
              help="Score under conservative decoding's mix (see generate).")
@click.option("--top", "top_n", type=click.IntRange(0, 100), default=0,
              help="With --json: the N most likely tokens at each position.")
@click.option("--per-model", is_flag=True,
              help="With --json: each model's own log-prob of every token.")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON record with per-token "
              "log-probs.")
@click.option("--input", "input_path", type=click.Path(dir_okay=False, path_type=Path),
              help='JSONL file of texts: {"id", "text"} per line.')
@click.option("--output", "output_path", type=click.Path(dir_okay=False, path_type=Path),
              help="JSONL results, appended as each text is scored; a rerun skips done ids.")
def score(args: tuple[str, ...], top_n: int, per_model: bool, as_json: bool,
          input_path: Path | None, output_path: Path | None, **opts: Any) -> None:
    """Score TEXT (or stdin) under the mix: total log-prob, token count, perplexity.

    Every token after the first gets its log-prob under the mix at temperature 1 with no
    filters (what generation samples from), from one batched evaluation of each model. The
    text is taken as raw text (no chat template), BOS first when the model asks for it.
    Texts longer than the context are scored in windows, each conditioned on half a context
    of the tokens before it (a note says so).
    """
    preset, text = split_args(args, opts, batch=input_path is not None)
    if input_path is None:
        if output_path is not None:
            raise click.UsageError("--output needs --input")
        text = text if text is not None else stdin_prompt()
        if not text:
            raise EftError("empty text: nothing to score")
        with open_session(preset, opts) as session:
            result = session.score(text, top_n=top_n, per_model=per_model)
            for note in result.notes:
                click.echo(f"note: {note}", err=True)
            if as_json:
                click.echo(json.dumps(score_record(session, result, per_token=True),
                                      ensure_ascii=False))
            else:
                click.echo(summary(result))
        return
    check_paths(input_path, output_path)
    with open_session(preset, opts) as session:
        run_batch(session, input_path, output_path, top_n=top_n, per_model=per_model,
                  per_token=as_json)


def _parse(line_no: int, line: str) -> tuple[str | int, str]:
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
    return raw_id, text


def run_batch(session: Session, input_path: Path, output_path: Path | None, *, top_n: int,
              per_model: bool, per_token: bool) -> None:
    """Score every record of ``input_path``, appending results to ``output_path`` (stdout)."""
    lines = read_lines(input_path)
    skip = done_keys(output_path)
    counts = {"done": 0, "errors": 0, "skipped": 0}
    out: IO[str]
    try:
        out = output_path.open("a", encoding="utf-8") if output_path else sys.stdout
    except OSError as exc:
        raise EftError(f"{output_path}: cannot write output ({exc.strerror})") from None
    seen: set[str | int] = set()
    try:
        for line_no, line in lines:
            try:
                record_id, text = _parse(line_no, line)
            except BadRecord as bad:
                if bad.key() in skip:
                    counts["skipped"] += 1
                    continue
                record = bad.record()
            else:
                if ("id", record_id) in skip:
                    counts["skipped"] += 1
                    continue
                if record_id in seen:
                    record = {"id": record_id, "line": line_no,
                              "error": f"duplicate id {record_id!r}"}
                else:
                    seen.add(record_id)
                    try:
                        result = session.score(text, top_n=top_n, per_model=per_model)
                        record = {"id": record_id, "text": text,
                                  **score_record(session, result, per_token=per_token)}
                    except EftError as exc:
                        record = {"id": record_id, "line": line_no, "error": str(exc)}
            out.write(json.dumps(record, ensure_ascii=False) + "\n")
            out.flush()
            counts["errors" if "error" in record else "done"] += 1
    finally:
        if out is not sys.stdout:
            out.close()
        click.echo(f"{counts['done']} scored, {counts['errors']} errors, "
                   f"{counts['skipped']} already done", err=True)
