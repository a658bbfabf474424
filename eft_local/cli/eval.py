"""``eft-local eval``: score presets, formulas or files on a question set, side by side."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from eft_local.cli.options import parallel_option
from eft_local.evaluate import (
    DEFAULT_QUESTIONS,
    FAMILY_DECLINE,
    PAPER_TARGETS,
    Target,
    evaluate_targets,
    load_questions,
    parse_target,
    render_table,
)
from eft_local.presets import load_config, preset_from_paths
from eft_local.session import LoadOptions, SamplerSettings


@click.command("eval")
@click.argument("targets", nargs=-1)
@click.option("--model", "-m", "models", multiple=True, metavar="ROLE=PATH",
              help="One more target made of these models (a GGUF file or an engine's URL "
              "per role; large_base, small_ft and small_base give up-scaling).")
@click.option("--formula", metavar="TEXT", help="The formula of the --model target.")
@click.option("--questions", "questions_path", type=click.Path(path_type=Path),
              help="JSONL with prompt, expected and optional id/category "
              "(default: the bundled world's held-out questions).")
@click.option("--limit", type=click.IntRange(min=1), help="Use only the first N questions.")
@click.option("--paper", is_flag=True, help="Evaluate the miniature of the paper's figure: "
              "baselines, EFT up/down, the beta sweep and the lambda sweep.")
@click.option("--max-tokens", type=click.IntRange(min=1), default=24, show_default=True)
@click.option("--decline-text", help="A reply containing this counts as declined "
              "(default for the bundled questions: the family's decline sentence).")
@click.option("--no-speculative", is_flag=True, help="Decode token by token.")
@click.option("--single-turn", is_flag=True, help="Skip the multi-turn pass (each question "
              "asked again as turn 2-5 after other questions and their answers).")
@click.option("--conservative-top-p", type=float, help="Conservative decoding (paper section "
              "4.4): outside this top-p set of the fine-tuned model, its own log-prob.")
@click.option("--temperature", type=float, default=0.0, show_default=True,
              help="0 is greedy.")
@click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print the scores as JSON.")
@click.option("--plot", "plot_path", type=click.Path(path_type=Path),
              help="Draw FILE.png or FILE.svg: accuracy and format against beta, declines "
              "against lambda, a bar chart of the other targets (needs eft-local[plot]).")
@parallel_option(what="questions")
def evaluate(targets: tuple[str, ...], models: tuple[str, ...], formula: str | None,
             questions_path: Path | None, limit: int | None,
             paper: bool, max_tokens: int, decline_text: str | None, no_speculative: bool,
             single_turn: bool, conservative_top_p: float | None, temperature: float,
             seed: int, as_json: bool, plot_path: Path | None, n_parallel: int,
             kv_unified: bool) -> None:
    """Score presets, formulas (PRESET:FORMULA, PRESET@beta=X), GGUF files or engines'
    URLs on a question set, side by side."""
    if plot_path is not None:
        from eft_local import plots

        plots.require(plot_path)
    settings = SamplerSettings(temperature=temperature, seed=seed,
                               conservative_top_p=conservative_top_p)
    config = load_config()
    specs = list(targets) + (list(PAPER_TARGETS) if paper else [])
    if not specs and not models:
        specs = [config.get(None).name]
    parsed = [parse_target(s, config) for s in specs]
    if models:
        parsed.append(Target(label="--model", preset=preset_from_paths(list(models),
                                                                       formula=formula)))
    questions = load_questions(questions_path or DEFAULT_QUESTIONS, limit)
    if decline_text is None and questions_path is None:
        decline_text = FAMILY_DECLINE
    categories = sorted({q.category for q in questions if q.category})
    total = len(parsed) * len(questions) * (1 if single_turn else 2)
    with click.progressbar(length=total, label="evaluating", file=sys.stderr) as bar:
        scores = evaluate_targets(
            parsed, questions, max_tokens=max_tokens, decline_text=decline_text,
            multi_turn=not single_turn,
            options=LoadOptions(speculative=not no_speculative, n_seq=n_parallel,
                                kv_unified=kv_unified),
            settings=settings, on_answer=lambda: bar.update(1))
    if as_json:
        click.echo(json.dumps({"questions": str(questions_path or DEFAULT_QUESTIONS),
                               "n_questions": len(questions),
                               "scores": [s.to_dict() for s in scores]}, indent=2))
    else:
        click.echo(render_table(scores, categories))
    if plot_path is not None:
        plots.scores_plot(scores, plot_path)
        click.echo(f"plot: {plot_path}", err=True)
