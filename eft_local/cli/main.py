"""The ``eft-local`` command line: thin Click commands over the session API.

Each command parses its options, calls the library and prints. Every failure is one line
on stderr and a non-zero exit status (see :class:`EftGroup`). Options shared by several
commands are decorators in :mod:`eft_local.cli.options`; other modules' commands are registered
at the bottom of this file and imported only when used (they import cliopts, never this
module, so the imports have no cycle).
"""

from __future__ import annotations

import importlib
import json
import os
import sys
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from eft_local import __version__, limits
from eft_local.cli.options import (
    broken_schema,
    grammar_changes,
    model_options,
    open_session,
    parallel_option,
    sampling_options,
    schema_to_check,
    split_args,
    stdin_prompt,
    write,
)
from eft_local.errors import EftError
from eft_local.interrupts import Terminated, handled
from eft_local.limits import size_text
from eft_local.text import printable

if TYPE_CHECKING:
    from eft_local.presets import Preset
    from eft_local.session import Session


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
    commands lazily (``register``): a missing optional dependency fails only its command."""

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
            with handled():  # Ctrl-C and SIGTERM reach us even inside llama.cpp calls
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
        except Terminated:
            fail("terminated", 143)
        except BrokenPipeError:
            sys.stderr = open(os.devnull, "w")  # noqa: SIM115 - nothing left to tell anyone
            sys.exit(1)
        except OSError as exc:  # the file system said no: a name too long, a full disk...
            where = f"{exc.filename}: " if exc.filename else ""
            fail(f"{where}{exc.strerror or exc}")
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
    from eft_local.loading import kv_estimate
    from eft_local.presets import load_config

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
            state = "remote" if spec.remote else (
                f"present, {size_text(local.stat().st_size)}" if local else "missing")
            kv = kv_estimate(local, spec.n_ctx) if local else None
            if kv is not None:
                state += f", KV {size_text(kv[0])} per slot at n_ctx {kv[1]}"
            click.echo(printable(f"  {role:<{width}}  {spec.describe()}  [{state}]"))


@main.command()
@click.argument("preset", required=False)
def pull(preset: str | None) -> None:
    """Download the preset's missing model files into the Hugging Face cache."""
    from eft_local import hub
    from eft_local.presets import load_config

    chosen = load_config().get(preset)
    missing = [f"{role}: {spec.path}" for role, spec in chosen.models.items()
               if spec.path is not None and not spec.path.is_file()]
    if missing:
        raise EftError(f"preset {chosen.name!r}: local file(s) missing, nothing to download "
                       f"for them: {'; '.join(missing)}")
    for role, spec in chosen.models.items():
        if spec.remote:
            click.echo(printable(f"{role}: remote ({spec.describe()}), nothing to download"))
            continue
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
    from eft_local.presets import is_url, load_config, preset_from_paths

    if models and targets:
        raise EftError("give --model ROLE=PATH pairs or plain paths/a preset, not both")
    is_path = len(targets) > 1 or (targets and (targets[0].endswith(".gguf") or is_url(targets[0])
                                               or Path(targets[0]).exists()))
    if is_path:
        roles = (UPSCALING_ROLES if len(targets) == len(UPSCALING_ROLES)
                 else [f"model{i}" for i in range(1, len(targets) + 1)])
        models = tuple(f"{role}={path}" for role, path in zip(roles, targets, strict=True))
    if models:
        first = models[0].partition("=")[0].strip()
        return preset_from_paths(list(models), formula=first if first.isidentifier() else None)
    return load_config().get(targets[0] if targets else None)


# -- quantize -------------------------------------------------------------------------------
@main.command()
@click.argument("source", metavar="IN", type=click.Path(path_type=Path))
@click.argument("output", metavar="OUT", type=click.Path(path_type=Path))
@click.argument("kind", metavar="TYPE")
@click.option("--allow-requantize", is_flag=True,
              help="Accept an input that is already quantized (its precision is lost twice).")
@click.option("--threads", type=click.IntRange(0, limits.max_threads()), default=0,
              help="Quantizer threads (0: all cores).")
def quantize(source: Path, output: Path, kind: str, allow_requantize: bool,
             threads: int) -> None:
    """Write a quantized copy IN -> OUT with llama.cpp's quantizer: TYPE is Q8_0, Q6_K,
    Q5_K_M, Q4_K_M, Q4_0, f16... OUT appears only when complete."""
    from eft_local.session import quantize as run

    run(source, output, kind, allow_requantize=allow_requantize, n_threads=threads)
    click.echo(printable(f"{output}: {kind} ({size_text(source.stat().st_size)} -> "
                         f"{size_text(output.stat().st_size)})"))


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
@click.option("--json-schema", "schema_path", type=click.Path(dir_okay=False, path_type=Path),
              help="JSON schema file: the reply is JSON that follows it (constrained "
              "sampling with llama.cpp's grammar engine).")
@click.option("--grammar", "grammar_path", type=click.Path(dir_okay=False, path_type=Path),
              help="GBNF grammar file (llama.cpp's format, start rule root) the reply follows.")
@parallel_option(what="records of --input")
def generate(args: tuple[str, ...], raw: bool, as_json: bool, input_path: Path | None,
             output_path: Path | None, skip_errors: bool, schema_path: Path | None,
             grammar_path: Path | None, **opts: Any) -> None:
    """Generate one reply for PROMPT (or stdin), or a JSONL batch with --input.

    The reply is streamed to stdout; --json prints one JSON record instead. With
    --json-schema or --grammar every token is drawn among those the grammar allows.

    With one argument and no --model, it is the preset if such a preset exists, else the
    prompt (for the default preset).
    """
    preset, prompt = split_args(args, opts, batch=input_path is not None)
    constraint = grammar_changes(schema_path, grammar_path)
    check = schema_to_check(schema_path)  # what only the finished reply can be checked for
    if input_path is None:
        if output_path is not None or skip_errors or opts["n_parallel"] > 1:
            flag = ("--output" if output_path else "--skip-errors" if skip_errors
                    else "-np/--parallel")
            raise click.UsageError(f"{flag} needs --input")
        prompt = prompt if prompt is not None else stdin_prompt()
        if not prompt.strip():
            raise EftError("empty prompt")
        with open_session(preset, opts) as session:
            session.update(**constraint)
            _generate_one(session, prompt, raw=raw, as_json=as_json, system=opts["system"],
                          max_tokens=opts["max_tokens"], check=check)
        return
    from eft_local.cli.batch import BatchDefaults, generate_batch
    from eft_local.records import check_paths

    check_paths(input_path, output_path)
    defaults = BatchDefaults(raw=raw, system=opts["system"], max_tokens=opts["max_tokens"],
                             diagnostics=as_json, check=check)
    with open_session(preset, opts) as session:
        session.update(**constraint)
        generate_batch(session, input_path, output_path, defaults,
                       retry_errors=not skip_errors, parallel=opts["n_parallel"])


def _generate_one(session: Session, prompt: str, *, raw: bool, as_json: bool,
                  system: str | None, max_tokens: int,
                  check: Mapping[str, Any] | None = None) -> None:
    """Stream one reply to stdout, or print it as a JSON record; a reply that breaks what
    its schema's grammar could not hold (``check``) is said on stderr (and in the record's
    ``schema_violations``)."""
    from eft_local.records import result_record
    from eft_local.schema_check import violations

    if as_json:
        result = session.generate(prompt, raw=raw, system=system, max_tokens=max_tokens,
                                  diagnostics=True)
        record = result_record(session, result, diagnostics=True, remote=True)
        broken = violations(check, result.text) if check else []
        if broken:
            record["schema_violations"] = broken
        click.echo(json.dumps(record, ensure_ascii=False))
        for message in broken:
            broken_schema(message)
        return
    finish, text = None, []
    for chunk in session.complete(prompt, raw=raw, system=system, max_tokens=max_tokens):
        write(chunk.text)
        text.append(chunk.text)
        finish = chunk.finish or finish
    write("\n")
    for message in violations(check, "".join(text)) if check else []:
        broken_schema(message)
    if finish == "context":
        click.echo(f"note: stopped because the context ({session.engine.n_ctx} tokens) is full",
                   err=True)


# -- commands from other modules: one line each (imported on first use) ----------------------
main.register("chat", "eft_local.cli.repl:chat")
main.register("eval", "eft_local.cli.eval:evaluate")
main.register("bench", "eft_local.cli.bench:bench")
main.register("score", "eft_local.cli.score:score")
main.register("explore", "eft_local.cli.explore:explore")
main.register("serve", "eft_local.cli.serve:serve")
