"""Command-line pieces shared by the commands of several modules: option types, the
model and sampling options, opening a session from them, and reading a prompt.

:mod:`eft_local.cli.main`, :mod:`eft_local.cli.repl` and :mod:`eft_local.cli.score` import this
module; it imports none of them, so no command module imports the group that registers it.
"""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import click

from eft_local import limits
from eft_local.errors import EftError
from eft_local.files import read_user_text
from eft_local.text import printable

if TYPE_CHECKING:
    from eft_local.session import Session

F = TypeVar("F", bound=Callable[..., Any])


# -- option types and shared options ----------------------------------------------------------
class Number(click.ParamType):
    """A finite float, optionally bounded; ``open_low``/``open_high`` exclude the bound."""

    name = "number"

    def __init__(self, low: float | None = None, high: float | None = None, *,
                 open_low: bool = False, open_high: bool = False) -> None:
        self.low, self.high, self.open_low, self.open_high = low, high, open_low, open_high

    def convert(self, value: Any, param: click.Parameter | None,
                ctx: click.Context | None) -> float:
        try:
            number = float(value)
        except (TypeError, ValueError):
            self.fail(f"{value!r} is not a number", param, ctx)
        if not math.isfinite(number):
            self.fail(f"{value!r} is not a finite number", param, ctx)
        too_low = self.low is not None and (
            number <= self.low if self.open_low else number < self.low)
        too_high = self.high is not None and (
            number >= self.high if self.open_high else number > self.high)
        if too_low or too_high:
            self.fail(f"{value} is not in {self.describe()}", param, ctx)
        return number

    def describe(self) -> str:
        """The allowed range, e.g. ``(0, 1]``."""
        low = "(" if self.open_low or self.low is None else "["
        high = ")" if self.open_high or self.high is None else "]"
        lo = "-inf" if self.low is None else f"{self.low:g}"
        hi = "inf" if self.high is None else f"{self.high:g}"
        return f"{low}{lo}, {hi}{high}"


def _apply(options: list[Callable[[F], F]], func: F) -> F:
    for option in reversed(options):
        func = option(func)
    return func


def model_options(func: F) -> F:
    """Which models and formula, and how to load them (chat, generate, and friends)."""
    return _apply([
        click.option("--model", "-m", "models", multiple=True, metavar="ROLE=PATH",
                     help="A GGUF file for a role, instead of a preset (repeatable). "
                     "large_base, small_ft and small_base give up-scaling by default."),
        click.option("--formula", metavar="TEXT",
                     help="Mixing formula: up, down, amplified, interpolate, or an "
                     "expression such as 'large_base + beta * (small_ft - small_base)'."),
        click.option("--beta", type=Number(-limits.PARAM_LIMIT, limits.PARAM_LIMIT),
                     help="Weight of the formula's delta."),
        click.option("--lambda", "lam", type=Number(-limits.PARAM_LIMIT, limits.PARAM_LIMIT),
                     help="Interpolation between two fine-tuned deltas."),
        click.option("--n-ctx", type=click.IntRange(0, limits.N_CTX_MAX),
                     help="Context size in tokens (0: the models' training context)."),
        click.option("--threads", type=click.IntRange(1, limits.max_threads()),
                     help="CPU threads in all (split across models with --parallel; at most "
                     f"{limits.THREADS_PER_CORE} per core)."),
        click.option("--gpu-layers", type=click.IntRange(-1, limits.N_GPU_LAYERS_MAX),
                     help="Layers to offload to the GPU (-1: all; default all if supported)."),
        click.option("-fa", "--flash-attn", type=click.Choice(["auto", "on", "off"]),
                     help="llama.cpp's flash attention (default auto, llama.cpp's choice). "
                     "off: with -np N, each sequence's logits are exactly those it gets "
                     "alone, at some prompt speed (docs/threads-and-gpus.md)."),
        click.option("--no-speculative", is_flag=True,
                     help="Decode token by token, without drafting with the small model."),
        click.option("--draft-k", type=click.IntRange(min=1),
                     help="Speculative block size (default: adaptive)."),
        click.option("--sequential", is_flag=True, hidden=True, expose_value=False,
                     callback=_retired),
        click.option("--schedule", type=click.Choice(["auto", "lanes", "large-first",
                                                      "sequential"]),
                     help="Decode schedule (default auto: measured once per machine and "
                     "model set, then cached)."),
        click.option("--verbose", "-v", is_flag=True,
                     help="Say which file loads where and which decode schedule was chosen "
                     "(warnings and notes are always shown)."),
    ], func)


def _retired(_ctx: click.Context, _param: click.Parameter, value: bool) -> None:
    if value:
        raise click.UsageError("--sequential is retired: it only repeated --schedule "
                               "sequential (the decode schedule); -np/--parallel N now sets "
                               "how many sequences run at once")


def parallel_option(default: int = 1, what: str = "records") -> Callable[[F], F]:
    """``-np/--parallel N``: sequences decoded side by side (slots); ``-kvu/--kv-unified``:
    one KV cache for all of them."""
    slots = click.option("-np", "--parallel", "n_parallel",
                         type=click.IntRange(1, limits.N_SEQ_MAX), default=default,
                         show_default=True, help=f"How many {what} run at once, each in its "
                         "own sequence of every model (its own --n-ctx context).")
    unified = click.option("-kvu", "--kv-unified", "kv_unified", is_flag=True,
                           help="One KV cache shared by the -np sequences (llama-server's "
                           "-kvu) instead of a cache stream each: sequences with idle slots "
                           "between them still decode in one pass, but each one's output "
                           "then depends slightly on what else is cached.")

    def both(f: F) -> F:
        return slots(unified(f))

    return both


class BiasPair(click.ParamType):
    """``ID=BIAS``: a token id and the number added to its score (``-inf`` bans it)."""

    name = "ID=BIAS"

    def convert(self, value: Any, param: click.Parameter | None,
                ctx: click.Context | None) -> tuple[int, float]:
        if isinstance(value, tuple):
            return value
        token, eq, bias = str(value).partition("=")
        try:
            pair = int(token), float(bias)
        except ValueError:
            pair = None
        if not eq or pair is None or pair[0] < 0 or not (-100 <= pair[1] <= 100
                                                          or pair[1] == -math.inf):
            self.fail(f"{value!r} is not ID=BIAS (a token id, a bias in [-100, 100] or "
                      "-inf to ban it), e.g. 15043=-100", param, ctx)
        return pair  # type: ignore[return-value]


penalty_options = [
    click.option("--repeat-penalty", type=Number(0, open_low=True),
                 help="Divide (multiply, when negative) the score of each token among the "
                 "last --repeat-last-n by this (1: off; 1.1 is a common choice)."),
    click.option("--repeat-last-n", type=click.IntRange(min=-1),
                 help="Tokens the repetition penalties look back at (default 64; -1: the "
                 "whole context, prompt included; 0: off)."),
    click.option("--frequency-penalty", type=Number(-2, 2),
                 help="Subtract this times each token's count in the last --repeat-last-n "
                 "tokens, in [-2, 2]."),
    click.option("--presence-penalty", type=Number(-2, 2),
                 help="Subtract this from each token seen in the last --repeat-last-n "
                 "tokens, in [-2, 2]."),
    click.option("--dry-multiplier", type=Number(0),
                 help="DRY: a token that would extend a repeat of n tokens loses "
                 "multiplier * base^(n - allowed length) (0: off; 0.8 is common)."),
    click.option("--dry-base", type=Number(1), help="DRY's base, >= 1 (default 1.75)."),
    click.option("--dry-allowed-length", type=click.IntRange(min=0),
                 help="DRY: repeats up to this many tokens are free (default 2)."),
    click.option("--dry-penalty-last-n", type=click.IntRange(min=-1),
                 help="DRY: tokens it looks back at (default 64; -1: the whole context)."),
    click.option("--dry-sequence-breaker", "dry_sequence_breakers", multiple=True,
                 metavar="TEXT", help="A text that repeats never reach across (repeatable; "
                 "replaces the defaults \\n : \" *; 'none': no breakers)."),
    click.option("--logit-bias", "logit_bias", multiple=True, type=BiasPair(),
                 help="Add BIAS to token ID's score (repeatable; -inf bans it), "
                 "e.g. --logit-bias 15043=-100."),
]
"""The penalties on the mix (llama.cpp's options of the same names)."""


def sampling_options(func: F) -> F:
    """Sampler settings, reply length and system prompt."""
    return _apply([
        click.option("--temperature", "-t", type=Number(0, limits.TEMPERATURE_RANGE[1]),
                     help="0 = greedy (default 1)."),
        click.option("--top-p", type=Number(0, 1, open_low=True), help="Nucleus mass, in (0, 1]."),
        click.option("--top-k", type=click.IntRange(min=0), help="Keep the k best (0: off)."),
        click.option("--min-p", type=Number(0, 1, open_high=True),
                     help="Drop tokens below this fraction of the best one, in [0, 1)."),
        click.option("--conservative-top-p", type=Number(0, 1, open_low=True),
                     help="Conservative decoding: outside the fine-tuned model's top-p set, "
                     "keep its own log-prob."),
        click.option("--seed", type=click.IntRange(min=0), help="Random seed (default 0)."),
        *penalty_options,
        click.option("--max-tokens", type=click.IntRange(min=1), default=512,
                     show_default=True, help="Longest reply in tokens."),
        click.option("--system", metavar="TEXT", help="System prompt."),
        click.option("--stop", multiple=True, metavar="TEXT",
                     help="End the reply before this text (repeatable)."),
        click.option("--parse-special", is_flag=True,
                     help="Read control-token text in messages (<|im_end|>...) as control "
                     "tokens, not as plain text (unsafe with untrusted input)."),
    ], func)


def context_option(func: F) -> F:
    """What a chat longer than the context does (chat and serve)."""
    return click.option(
        "--context-overflow", type=click.Choice(["truncate", "error"]),
        help="A chat longer than the context: drop its oldest whole turns, keeping the "
        "system prompt and the newest message (truncate, the default), or refuse it "
        "(error).")(func)


_SAMPLING = ("temperature", "top_p", "top_k", "min_p", "seed", "conservative_top_p",
             "repeat_penalty", "repeat_last_n", "frequency_penalty", "presence_penalty",
             "dry_multiplier", "dry_base", "dry_allowed_length", "dry_penalty_last_n")


def sampling_settings(opts: Mapping[str, Any]) -> dict[str, Any]:
    """The sampler settings the options give (those not given are left out)."""
    out = {name: opts[name] for name in _SAMPLING if opts.get(name) is not None}
    breakers = tuple(opts.get("dry_sequence_breakers") or ())
    if breakers:
        out["dry_sequence_breakers"] = () if breakers == ("none",) else breakers
    if opts.get("logit_bias"):
        out["logit_bias"] = tuple(opts["logit_bias"])
    return out


def open_session(preset: str | None, opts: Mapping[str, Any]) -> Session:
    """Load a session from a preset name or ``--model`` pairs and the shared options."""
    from eft_local.session import LoadOptions, SamplerSettings, load_session

    if preset and opts.get("models"):
        raise EftError(f"give a preset ({preset!r}) or --model ROLE=PATH, not both")
    params = {name: opts[name] for name in ("beta", "lam") if opts.get(name) is not None}
    sampling = SamplerSettings(**sampling_settings(opts))
    options = LoadOptions(n_ctx=opts.get("n_ctx"), n_threads=opts.get("threads"),
                          n_gpu_layers=opts.get("gpu_layers"),
                          n_seq=opts.get("n_parallel") or 1,
                          kv_unified=bool(opts.get("kv_unified")),
                          flash_attn=opts.get("flash_attn") or "auto",
                          speculative=not opts.get("no_speculative"),
                          draft_k=opts.get("draft_k"), schedule=opts.get("schedule"),
                          download=opts.get("allow_download", True))
    session = load_session(preset, models=tuple(opts.get("models") or ()),
                           formula=opts.get("formula"), params=params, sampling=sampling,
                           options=options,
                           progress=progress_printer(bool(opts.get("verbose"))))
    session.update(stop=tuple(opts.get("stop") or ()),
                   parse_special=bool(opts.get("parse_special")),
                   context_overflow=opts.get("context_overflow"))
    return session


GRAMMAR_LIMIT = 8 << 20
"""Largest grammar or JSON schema file read (8 MiB)."""


def grammar_changes(schema_path: Path | None, grammar_path: Path | None, *,
                    note: Callable[[str], None] | None = None) -> dict[str, str]:
    """The settings change of ``--json-schema FILE`` or ``--grammar FILE``: read and checked
    (errors name the file); a schema keyword the grammar cannot enforce is a ``note:`` line
    on stderr (or goes to ``note``)."""
    if schema_path and grammar_path:
        raise click.UsageError("give --json-schema or --grammar, not both")
    path = schema_path or grammar_path
    if path is None:
        return {}
    from eft_local.session import Settings

    text = read_user_text(path, limit=GRAMMAR_LIMIT)
    if not text.strip():
        raise EftError(f"{path}: the file is empty")
    key = "json_schema" if schema_path else "grammar"
    try:
        return {"grammar": Settings.grammar_of(**{key: text}, note=lambda message: (
            note or schema_note)(f"{path}: {message}"))}
    except EftError as exc:
        raise EftError(f"{path}: {exc}") from None


def schema_to_check(schema_path: Path | None) -> dict[str, Any] | None:
    """The schema of ``--json-schema FILE`` (read and checked by :func:`grammar_changes`
    first) when a finished reply must be checked against it: it uses a keyword the grammar
    cannot hold (:mod:`eft_local.schema_check`); None otherwise."""
    from eft_local.schema_check import needs_check

    if schema_path is None:
        return None
    schema = json.loads(read_user_text(schema_path, limit=GRAMMAR_LIMIT))
    return schema if needs_check(schema) else None


def broken_schema(message: str) -> None:
    """Say on stderr how a finished reply breaks its JSON schema."""
    click.echo(f"note: the reply does not follow the JSON schema: {printable(message)}",
               err=True)


def schema_note(message: str) -> None:
    """Print a JSON schema's note (a keyword the grammar cannot enforce) on stderr."""
    click.echo(f"note: {printable(message)}", err=True)


def progress_printer(verbose: bool) -> Callable[[str], None]:
    """Print a session's progress lines on stderr: notices always, details with
    ``verbose``."""
    from eft_local.session import is_notice

    def say(message: str) -> None:
        if verbose or is_notice(message):
            click.echo(printable(message), err=True)

    return say


def write(text: str) -> None:
    """Write streamed text to stdout as is (no ANSI stripping) and flush."""
    sys.stdout.write(text)
    sys.stdout.flush()


# -- positional arguments and stdin ---------------------------------------------------------
def split_args(args: tuple[str, ...], opts: Mapping[str, Any], *, batch: bool
                ) -> tuple[str | None, str | None]:
    """(preset, prompt) from generate's positional arguments."""
    if len(args) > 2:
        raise click.UsageError("expected at most two arguments: [PRESET] [PROMPT]")
    with_models = bool(opts.get("models"))
    if batch:
        from eft_local.presets import load_config

        prompt_given = len(args) > (0 if with_models else 1) or (
            args and not with_models and args[0] not in load_config().presets)
        if prompt_given:
            raise click.UsageError("a PROMPT and --input exclude each other (--input reads the "
                                   "prompts from the file)")
        return (args[0] if args else None), None
    if len(args) == 2:
        return args[0], args[1]
    if not args:
        return None, None
    if with_models:
        return None, args[0]
    from eft_local.presets import load_config

    return (args[0], None) if args[0] in load_config().presets else (None, args[0])


def stdin_prompt() -> str:
    """The prompt piped on stdin, less the one newline that ``echo`` adds."""
    if sys.stdin.isatty():
        raise EftError("no prompt: give PROMPT as an argument or pipe it on stdin")
    buffer = getattr(sys.stdin, "buffer", None)
    if buffer is None:
        text = sys.stdin.read()
    else:
        data = buffer.read()
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise EftError(f"stdin is not valid UTF-8: byte 0x{data[exc.start]:02x} at offset "
                           f"{exc.start} ({exc.reason}); convert it first, e.g. "
                           "iconv -f latin1 -t utf-8") from None
    return text[:-1] if text.endswith("\n") else text
