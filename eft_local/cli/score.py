"""``eft-local score``: a text's log-prob, token count and perplexity under the mix.

One text (argument or stdin) prints a summary line, or with ``--json`` one record with the
per-token log-probs. ``--input`` reads JSONL records ``{"id": ..., "text": ...}`` and writes
one result line per record as each finishes; a rerun skips ids already in the output, as
``generate --input`` does.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from eft_local.cli.batch import score_batch
from eft_local.cli.options import (
    Number,
    model_options,
    open_session,
    parallel_option,
    split_args,
    stdin_prompt,
)
from eft_local.errors import EftError
from eft_local.records import check_paths, score_record

if TYPE_CHECKING:
    from eft_local.session import Score


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
@parallel_option(what="texts of --input")
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
        if output_path is not None or opts["n_parallel"] > 1:
            raise click.UsageError(f"{'--output' if output_path else '-np/--parallel'} needs "
                                   "--input")
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
        score_batch(session, input_path, output_path, top_n=top_n, per_model=per_model,
                    per_token=as_json, parallel=opts["n_parallel"])
