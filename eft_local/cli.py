"""The ``eft-local`` command line: thin Click commands over the session API.

Each command parses its options, calls the library and prints. Every failure is one line
on stderr and a non-zero exit status (see :class:`EftGroup`). Options shared by several
commands are decorators (:func:`model_options`, :func:`sampling_options`); other modules'
commands are registered at the bottom of this file and imported only when used.
"""

from __future__ import annotations

import importlib
import json
import math
import os
import sys
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import click

from eft_local import __version__, limits
from eft_local.errors import EftError
from eft_local.text import printable

if TYPE_CHECKING:
    from eft_local.config import Preset
    from eft_local.session import Session

F = TypeVar("F", bound=Callable[..., Any])


# -- errors: one line, never a traceback ----------------------------------------------------
def one_line(message: str) -> str:
    """Collapse a message onto one line."""
    return "; ".join(part.strip() for part in str(message).splitlines() if part.strip())


def fail(message: str, code: int = 1) -> None:
    """Print ``error: message`` on stderr and exit with ``code``."""
    click.echo(f"error: {printable(one_line(message))}", err=True)
    sys.exit(code)


class EftGroup(click.Group):
    """A group whose commands fail with one line on stderr, and that imports some of its
    commands lazily (``register``), so command modules may import this one."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.lazy: dict[str, str] = {}

    def register(self, name: str, target: str) -> None:
        """Add the command ``module:attribute``, imported when first used."""
        self.lazy[name] = target

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted({*super().list_commands(ctx), *self.lazy})

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name not in self.commands and name in self.lazy:
            module, _, attr = self.lazy[name].partition(":")
            try:
                command = getattr(importlib.import_module(module), attr)
            except (ImportError, AttributeError) as exc:
                command = _unavailable(name, f"{type(exc).__name__}: {exc}")
            self.add_command(command, name)
        return super().get_command(ctx, name)

    def main(self, args: Sequence[str] | None = None, prog_name: str | None = None,
             complete_var: str | None = None, standalone_mode: bool = True,
             **extra: Any) -> Any:
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, False, **extra)
        warnings.showwarning = _warning_line
        try:
            code = super().main(args, prog_name, complete_var, False, **extra)
        except click.UsageError as exc:
            where = f" (see '{exc.ctx.command_path} --help')" if exc.ctx else ""
            fail(exc.format_message() + where, exc.exit_code)
        except click.ClickException as exc:
            fail(exc.format_message(), exc.exit_code)
        except EftError as exc:
            fail(str(exc))
        except (click.Abort, KeyboardInterrupt):
            fail("interrupted", 130)
        except BrokenPipeError:
            sys.stderr = open(os.devnull, "w")  # noqa: SIM115 - nothing left to tell anyone
            sys.exit(1)
        except Exception as exc:  # a bug: still one line, the traceback on request
            if os.environ.get("EFT_LOCAL_DEBUG"):
                raise
            fail(f"internal error: {type(exc).__name__}: {exc} "
                 "(set EFT_LOCAL_DEBUG=1 for the traceback)")
        sys.exit(code if isinstance(code, int) else 0)


def _warning_line(message: Warning | str, category: type[Warning], *_args: Any,
                  **_kwargs: Any) -> None:
    """Python warnings as one ``warning:`` line, never with a source line."""
    click.echo(f"warning: {printable(one_line(str(message)))}", err=True)


def _unavailable(name: str, why: str) -> click.Command:
    """A stand-in for a command whose module cannot be imported: it fails with ``why``."""

    def callback(**_: Any) -> None:
        raise EftError(f"command {name!r} is unavailable ({why})")

    return click.Command(name, callback=callback, help=f"(unavailable: {why})",
                         context_settings={"ignore_unknown_options": True,
                                           "allow_extra_args": True})


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
        click.option("--no-speculative", is_flag=True,
                     help="Decode token by token, without drafting with the small model."),
        click.option("--draft-k", type=click.IntRange(min=1),
                     help="Speculative block size (default: adaptive)."),
        click.option("--parallel/--sequential", default=None,
                     help="Evaluate the models in parallel threads (default) or in turn."),
        click.option("--schedule", type=click.Choice(["auto", "lanes", "large-first",
                                                      "sequential"]),
                     help="Decode schedule (default auto: measured once per machine and "
                     "model set, then cached; --sequential means sequential)."),
    ], func)


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
        click.option("--max-tokens", type=click.IntRange(min=1), default=512,
                     show_default=True, help="Longest reply in tokens."),
        click.option("--system", metavar="TEXT", help="System prompt."),
        click.option("--stop", multiple=True, metavar="TEXT",
                     help="End the reply before this text (repeatable)."),
        click.option("--parse-special", is_flag=True,
                     help="Read control-token text in messages (<|im_end|>...) as control "
                     "tokens, not as plain text (unsafe with untrusted input)."),
    ], func)


_SAMPLING = ("temperature", "top_p", "top_k", "min_p", "seed", "conservative_top_p")


def open_session(preset: str | None, opts: Mapping[str, Any]) -> Session:
    """Load a session from a preset name or ``--model`` pairs and the shared options."""
    from eft_local.sampler import SamplerSettings
    from eft_local.session import LoadOptions, load_session

    if preset and opts.get("models"):
        raise EftError(f"give a preset ({preset!r}) or --model ROLE=PATH, not both")
    params = {name: opts[name] for name in ("beta", "lam") if opts.get(name) is not None}
    settings = SamplerSettings(**{name: opts[name] for name in _SAMPLING
                                  if opts.get(name) is not None})
    options = LoadOptions(n_ctx=opts.get("n_ctx"), n_threads=opts.get("threads"),
                          n_gpu_layers=opts.get("gpu_layers"),
                          parallel=opts.get("parallel") is not False,
                          speculative=not opts.get("no_speculative"),
                          draft_k=opts.get("draft_k"), schedule=opts.get("schedule"))
    session = load_session(preset, models=tuple(opts.get("models") or ()),
                           formula=opts.get("formula"), params=params, settings=settings,
                           options=options,
                           progress=lambda msg: click.echo(printable(msg), err=True))
    session.stop = tuple(opts.get("stop") or ())
    session.parse_special = bool(opts.get("parse_special"))
    return session


def write(text: str) -> None:
    """Write streamed text to stdout as is (no ANSI stripping) and flush."""
    sys.stdout.write(text)
    sys.stdout.flush()


def size_text(n_bytes: int) -> str:
    """A file size for people: 12.3 MiB, 4.1 GiB."""
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n_bytes >= scale:
            return f"{n_bytes / scale:.1f} {unit}"
    return f"{n_bytes} B"


# -- the group ------------------------------------------------------------------------------
@click.group(cls=EftGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, "--version", "-V", prog_name="eft-local")
def main() -> None:
    """Emulated fine-tuning (EFT) on local GGUF models.

    Per token: log p = log p_large_base + beta * (log p_small_ft - log p_small_base),
    renormalised (or any other formula over named models).
    """


# -- models, pull, check --------------------------------------------------------------------
@main.command()
def models() -> None:
    """List presets: formula, models, whether each file is present locally and its size."""
    from eft_local import hub
    from eft_local.config import load_config

    config = load_config()
    if not config.presets:
        click.echo("no presets defined (add some to " + ", ".join(map(str, config.files)) + ")")
    for i, (name, preset) in enumerate(config.presets.items()):
        if i:
            click.echo()
        mark = " (default)" if name == config.default else ""
        click.echo(printable(f"{name}{mark}: {preset.description}".rstrip(": ")))
        click.echo(printable(
            f"  formula: {preset.formula.text}  = {preset.formula.describe(preset.params)}"))
        width = max(len(role) for role in preset.models)
        for role, spec in preset.models.items():
            local = hub.cached_path(spec)
            state = f"present, {size_text(local.stat().st_size)}" if local else "missing"
            click.echo(printable(f"  {role:<{width}}  {spec.describe()}  [{state}]"))


@main.command()
@click.argument("preset", required=False)
def pull(preset: str | None) -> None:
    """Download the preset's missing model files into the Hugging Face cache."""
    from eft_local import hub
    from eft_local.config import load_config

    chosen = load_config().get(preset)
    missing = [f"{role}: {spec.path}" for role, spec in chosen.models.items()
               if spec.path is not None and not spec.path.is_file()]
    if missing:
        raise EftError(f"preset {chosen.name!r}: local file(s) missing, nothing to download "
                       f"for them: {'; '.join(missing)}")
    for role, spec in chosen.models.items():
        local = hub.cached_path(spec)
        if local is None:
            click.echo(printable(f"{role}: downloading {spec.describe()}"), err=True)
            local = hub.resolve(spec, download=True)
        click.echo(printable(f"{role}: present ({local}, {size_text(local.stat().st_size)})"))


@main.command()
@click.argument("targets", nargs=-1, metavar="[PRESET | PATH...]")
@click.option("--model", "-m", "models", multiple=True, metavar="ROLE=PATH",
              help="A GGUF file for a role (repeatable).")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
def check(targets: tuple[str, ...], models: tuple[str, ...], as_json: bool) -> None:
    """Check that models share one token space (reads vocabularies only).

    Give a preset name, --model ROLE=PATH pairs, or plain GGUF paths: three plain paths are
    large_base, small_ft and small_base in that order; otherwise they are model1, model2...
    and the first is taken as the fine-tuned model. Exits 1 when the models are incompatible.
    """
    from eft_local.session import check_models

    preset = _check_preset(targets, models)
    report = check_models(preset)
    if as_json:
        click.echo(json.dumps({"preset": preset.name, **report.to_dict()}, indent=2,
                              ensure_ascii=False))
    else:
        click.echo(printable(f"preset: {preset.name}"))
        for role, spec in preset.models.items():
            click.echo(printable(f"  {role}: {spec.describe()}"))
        click.echo(report.render())
    if not report.ok:
        sys.exit(1)


UPSCALING_ROLES = ["large_base", "small_ft", "small_base"]


def _check_preset(targets: tuple[str, ...], models: tuple[str, ...]) -> Preset:
    """The preset ``check`` looks at: named, from --model pairs, or from plain paths."""
    from eft_local.config import load_config, preset_from_paths

    if models and targets:
        raise EftError("give --model ROLE=PATH pairs or plain paths/a preset, not both")
    is_path = len(targets) > 1 or (targets and (targets[0].endswith(".gguf")
                                               or Path(targets[0]).exists()))
    if is_path:
        roles = (UPSCALING_ROLES if len(targets) == len(UPSCALING_ROLES)
                 else [f"model{i}" for i in range(1, len(targets) + 1)])
        models = tuple(f"{role}={path}" for role, path in zip(roles, targets, strict=True))
    if models:
        first = models[0].partition("=")[0].strip()
        return preset_from_paths(list(models), formula=first if first.isidentifier() else None)
    return load_config().get(targets[0] if targets else None)


# -- generate -------------------------------------------------------------------------------
@main.command()
@click.argument("args", nargs=-1, metavar="[PRESET] [PROMPT]")
@model_options
@sampling_options
@click.option("--raw", is_flag=True,
              help="Use the prompt as the whole context (no chat template).")
@click.option("--json", "as_json", is_flag=True,
              help="Print a JSON record with per-token diagnostics.")
@click.option("--input", "input_path", type=click.Path(dir_okay=False, path_type=Path),
              help="JSONL file of prompts: {\"id\", \"prompt\", \"system\", \"raw\", "
              "\"max_tokens\"} per line.")
@click.option("--output", "output_path", type=click.Path(dir_okay=False, path_type=Path),
              help="JSONL results, appended as each prompt finishes; a rerun skips done ids "
              "and retries those that ended in an error.")
@click.option("--skip-errors", is_flag=True,
              help="With --output: a rerun also skips prompts whose result was an error.")
def generate(args: tuple[str, ...], raw: bool, as_json: bool, input_path: Path | None,
             output_path: Path | None, skip_errors: bool, **opts: Any) -> None:
    """Generate one reply for PROMPT (or stdin), or a JSONL batch with --input.

    The reply is streamed to stdout; --json prints one JSON record instead.

    With one argument and no --model, it is the preset if such a preset exists, else the
    prompt (for the default preset).
    """
    preset, prompt = _split_args(args, opts, batch=input_path is not None)
    if input_path is None:
        if output_path is not None or skip_errors:
            raise click.UsageError(f"{'--output' if output_path else '--skip-errors'} needs "
                                   "--input")
        prompt = prompt if prompt is not None else _stdin_prompt()
        if not prompt.strip():
            raise EftError("empty prompt")
        with open_session(preset, opts) as session:
            _generate_one(session, prompt, raw=raw, as_json=as_json, system=opts["system"],
                          max_tokens=opts["max_tokens"])
        return
    from eft_local.batch import BatchDefaults, check_paths, run_batch

    check_paths(input_path, output_path)
    defaults = BatchDefaults(raw=raw, system=opts["system"], max_tokens=opts["max_tokens"],
                             diagnostics=as_json)
    with open_session(preset, opts) as session:
        run_batch(session, input_path, output_path, defaults, retry_errors=not skip_errors)


def _split_args(args: tuple[str, ...], opts: Mapping[str, Any], *, batch: bool
                ) -> tuple[str | None, str | None]:
    """(preset, prompt) from generate's positional arguments."""
    if len(args) > 2:
        raise click.UsageError("expected at most two arguments: [PRESET] [PROMPT]")
    with_models = bool(opts.get("models"))
    if batch:
        from eft_local.config import load_config

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
    from eft_local.config import load_config

    return (args[0], None) if args[0] in load_config().presets else (None, args[0])


def _stdin_prompt() -> str:
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


def _generate_one(session: Session, prompt: str, *, raw: bool, as_json: bool,
                  system: str | None, max_tokens: int) -> None:
    """Stream one reply to stdout, or print it as a JSON record."""
    from eft_local.batch import result_record

    if as_json:
        result = session.generate(prompt, raw=raw, system=system, max_tokens=max_tokens,
                                  diagnostics=True)
        click.echo(json.dumps(result_record(session, result, diagnostics=True),
                              ensure_ascii=False))
        return
    finish = None
    for chunk in session.complete(prompt, raw=raw, system=system, max_tokens=max_tokens):
        write(chunk.text)
        finish = chunk.finish or finish
    write("\n")
    if finish == "context":
        click.echo(f"note: stopped because the context ({session.engine.n_ctx} tokens) is full",
                   err=True)


# -- commands from other modules: one line each (imported on first use) ----------------------
main.register("chat", "eft_local.repl:chat")
main.register("eval", "eft_local.evaluate:evaluate")
main.register("bench", "eft_local.bench:bench")
main.register("score", "eft_local.score_cli:score")
