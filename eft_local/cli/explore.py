"""``eft-local explore``: the command over :mod:`eft_local.explore.explorer`."""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import click

from eft_local import limits
from eft_local.cli.batch import err_line as say
from eft_local.cli.options import model_options
from eft_local.errors import EftError
from eft_local.explore.candidates import (
    Source,
    candidates_for,
    combinations,
    largest,
    source_name,
)
from eft_local.explore.explorer import (
    DEFAULT_TOP_K,
    DEFAULT_WINDOW,
    Explorer,
    Row,
    Settings,
    Skipped,
    mark_pareto,
    read_ids,
    read_text,
)
from eft_local.limits import size_text
from eft_local.presets import is_url
from eft_local.text import printable


def render(rows: Sequence[Row], skipped: Sequence[Skipped], roles: Sequence[str]) -> str:
    """A Markdown table sorted by quality, Pareto-optimal rows marked, then the skipped."""
    questions = any(r.accuracy is not None for r in rows)
    head = ["", "combination (" + " / ".join(roles) + ")", "KL mean", "KL p99", "top-1",
            "ppl", "tok/s", "spec tok/s", "TTFT ms", "memory", "RSS", "files"]
    head += ["accuracy", "format"] if questions else []
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        q = r.quality
        spec = f"{r.speculative_tokens_per_second:.0f}" if (
            r.speculative_tokens_per_second) else "-"
        cells = ["*" if r.pareto else "", r.label + (" (reference)" if r.is_reference else ""),
                 f"{q.kl_mean:.2e}", f"{q.kl_p99:.2e}", f"{q.top1_agreement:.4f}",
                 f"{q.perplexity:.3f}", f"{r.tokens_per_second:.0f}", spec,
                 f"{1e3 * r.first_token_seconds:.1f}", size_text(r.memory_bytes),
                 size_text(r.rss_bytes), size_text(r.model_bytes)]
        if questions:
            cells += [f"{r.accuracy:.3f}" if r.accuracy is not None else "-",
                      f"{r.format_rate:.3f}" if r.format_rate is not None else "-"]
        lines.append("| " + " | ".join(printable(c) for c in cells) + " |")
    lines.append("")
    lines.append("* Pareto-optimal: no other row is at least as close to the reference "
                 "(KL mean), as fast (the better of tok/s and spec tok/s) and as small "
                 "(memory), and better on one of them.")
    for s in skipped:
        lines.append(printable(f"skipped {s.label}: {s.reason}"))
    return "\n".join(lines)


@click.command("explore")
@click.argument("preset", required=False)
@model_options
@click.option("--variant", "variants", multiple=True, metavar="ROLE=PATH",
              help="With a preset: another candidate file for a role (repeatable; shell "
              "globs welcome).")
@click.option("--reference", "references", multiple=True, metavar="ROLE=PATH",
              help="The reference's file for a role (default: the largest candidate).")
@click.option("--max-combinations", type=click.IntRange(min=1),
              help="Evaluate at most N combinations, chosen to cover every file.")
@click.option("--text", "text_path", type=click.Path(path_type=Path),
              help="UTF-8 text to compare on (default: a bundled sample: held-out text of "
              "the family's world, or English for other models).")
@click.option("--token-ids", "ids_path", type=click.Path(path_type=Path),
              help="Compare on these token ids instead of a text (a JSON list: for "
              "vocabularies that spell no text, like bench's random-weight shapes).")
@click.option("--top-k", type=click.IntRange(1, 1 << 20), default=DEFAULT_TOP_K,
              show_default=True, help="Reference log-probs kept per position (the rest is "
              "one bucket).")
@click.option("--window", type=click.IntRange(2, limits.N_CTX_MAX), default=DEFAULT_WINDOW,
              show_default=True, help="Tokens per evaluation window (at most the context).")
@click.option("--decode-tokens", type=click.IntRange(1, 4096), default=64, show_default=True,
              help="Longest reply per prompt when measuring decode speed.")
@click.option("--questions", "questions_path", type=click.Path(path_type=Path),
              is_flag=False, flag_value="-",
              help="Also run the eval scorer (accuracy, format); without FILE: the bundled "
              "held-out questions.")
@click.option("--limit", type=click.IntRange(min=1), help="Use only the first N questions.")
@click.option("--cache-dir", type=click.Path(path_type=Path),
              help="Where reference distributions are cached (default: "
              "~/.cache/eft-local/explore).")
@click.option("--json", "as_json", is_flag=True, help="Print the results as JSON.")
@click.option("--plot", "plot_path", type=click.Path(path_type=Path),
              help="Draw KL against tokens/s into FILE.png or FILE.svg (needs "
              "eft-local[plot]).")
def explore(preset: str | None, variants: tuple[str, ...], references: tuple[str, ...],
            max_combinations: int | None, text_path: Path | None, ids_path: Path | None,
            top_k: int, window: int,
            decode_tokens: int, questions_path: Path | None, limit: int | None,
            cache_dir: Path | None, as_json: bool, plot_path: Path | None,
            **opts: Any) -> None:
    """Rank combinations of candidate files (repeat -m ROLE=PATH per alternative, or a
    preset plus --variant ROLE=PATH) by closeness to a reference combination, speed and
    memory."""
    from eft_local.evaluate import DEFAULT_QUESTIONS, FAMILY_DECLINE, load_questions
    from eft_local.session import LoadOptions

    if plot_path is not None:
        from eft_local import plots

        plots.require(plot_path)
    template, candidates = candidates_for(preset, opts.get("models") or (), variants,
                                          formula=opts.get("formula"))
    reference = largest(candidates, _pairs(references))
    combos = combinations(candidates, first=reference, limit=max_combinations)
    questions, decline = (), None
    if questions_path is not None:
        bundled = str(questions_path) == "-"
        questions = tuple(load_questions(DEFAULT_QUESTIONS if bundled else questions_path,
                                         limit))
        decline = FAMILY_DECLINE if bundled else None
    if text_path and ids_path:
        raise click.UsageError("give --text or --token-ids, not both")
    ids = read_ids(ids_path) if ids_path else None
    settings = Settings(text=read_text(text_path) if text_path else None,
                        text_name=str(ids_path or text_path), top_k=top_k, token_ids=ids,
                        window=window, decode_tokens=decode_tokens, questions=questions,
                        decline_text=decline)
    params = {k: opts[k] for k in ("beta", "lam") if opts.get(k) is not None}
    options = LoadOptions(n_ctx=opts.get("n_ctx"), n_threads=opts.get("threads"),
                          n_gpu_layers=opts.get("gpu_layers"),
                          speculative=not opts.get("no_speculative"),
                          draft_k=opts.get("draft_k"), schedule=opts.get("schedule"))

    explorer = Explorer(template, reference, settings, params=params, options=options,
                        cache_dir=cache_dir, say=say)
    say(f"text: {explorer.text_source}; {len(combos)} combination(s); reference: "
        + ", ".join(f"{r}={source_name(p)}" for r, p in reference.files.items()))
    explorer.prepare(combos)
    results: list[Row | Skipped] = []
    with click.progressbar(length=len(combos), label="exploring", file=sys.stderr,
                           item_show_func=lambda c: c.label if c is not None else None
                           ) as bar:
        for combo in combos:
            bar.current_item = combo  # shown while it runs (update(0, ...) draws nothing)
            bar.render_progress()
            results.append(explorer.run(combo))
            bar.update(1)
    rows = mark_pareto([r for r in results if isinstance(r, Row)])
    skipped = [r for r in results if isinstance(r, Skipped)]
    for s in skipped:
        say(f"skipped {s.label}: {s.reason}")
    if as_json:
        click.echo(json.dumps({
            "reference": {r: str(p) for r, p in reference.files.items()},
            "reference_source": explorer.ref_source, "text": explorer.text_source,
            "formula": template.formula.text, "params": explorer.params,
            "rows": [r.to_dict() for r in rows],
            "skipped": [{"label": s.label, "files": s.files, "reason": s.reason}
                        for s in skipped]}, indent=2))
    else:
        click.echo(render(rows, skipped, [r for r in candidates if len(candidates[r]) > 1]))
    if plot_path is not None and rows:
        from eft_local import plots

        plots.explore_plot(rows, plot_path)
        say(f"plot: {plot_path}")
    if not rows:
        raise EftError("no combination could be evaluated (see the skipped lines above)")


def _pairs(pairs: Sequence[str]) -> dict[str, Source]:
    out: dict[str, Source] = {}
    for pair in pairs:
        role, sep, path = pair.partition("=")
        if not sep or not role.strip() or not path.strip():
            raise EftError(f"--reference {pair!r}: expected ROLE=PATH")
        out[role.strip()] = (path.strip() if is_url(path) else
                             Path(path.strip()).expanduser())
    return out
