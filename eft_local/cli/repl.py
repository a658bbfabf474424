"""The chat REPL (``eft-local chat``): streamed replies, knobs changed live by slash commands.

Interactive use gets readline editing and a history file in the user data directory. When
stdin is not a terminal (a pipe, or click's CliRunner in tests) each line read is echoed
after the prompt, so the output reads as a transcript.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from contextlib import closing, suppress
from pathlib import Path
from typing import Any

import click

from eft_local.chat import Conversation
from eft_local.cli.options import (
    context_option,
    grammar_changes,
    model_options,
    open_session,
    sampling_options,
    write,
)
from eft_local.errors import EftError
from eft_local.limits import size_text
from eft_local.session import Session
from eft_local.text import printable

PROMPT = ">>> "
MORE = "... "
BLOCK = '"""'
"""A line starting with this opens a multi-line message; a line ending with it closes it."""
ReadLine = Callable[[str], "str | None"]

HELP = [
    ("/beta X", "weight of the formula's delta (0 = first model alone, 1 = EFT)"),
    ("/lambda X", "interpolation between two fine-tuned deltas"),
    ("/temp X", "temperature (0 = greedy)"),
    ("/topp X", "top-p, in (0, 1]"),
    ("/topk N", "top-k (0 = off)"),
    ("/minp X", "min-p, in [0, 1)"),
    ("/seed N", "random seed"),
    ("/repeat X", "repeat penalty over the last /lastn tokens (1 = off)"),
    ("/lastn N", "tokens the repetition penalties look at (-1 = all, 0 = off)"),
    ("/freq X", "frequency penalty, in [-2, 2] (0 = off)"),
    ("/presence X", "presence penalty, in [-2, 2] (0 = off)"),
    ("/dry X", "DRY multiplier: penalise extending a repeat (0 = off)"),
    ("/bias ID=X|off", "add X to token ID's score (-inf bans it); off removes every bias"),
    ("/max N", "longest reply in tokens"),
    ("/system TEXT", "set the system prompt (no TEXT: remove it)"),
    ("/overflow MODE", "a chat longer than the context: truncate (drop the oldest turns) "
     "or error"),
    ("/grammar FILE|off", "replies follow a GBNF grammar (a .json file: a JSON schema)"),
    ("/reset", "forget the conversation (the system prompt stays)"),
    ("/save FILE", "write the transcript as JSON"),
    ("/load FILE", "continue a saved transcript"),
    ("/stats", "tokens/s and time per model"),
    ("/why", "top tokens of each model and of the mix at the last step"),
    ("/help", "this list"),
    ('"""', 'a multi-line message, ended by another """ (or end lines with \\)'),
    ("/quit", "leave (Ctrl-D works too; Ctrl-C stops a reply)"),
]
ALIASES = {"lam": "lambda", "temperature": "temp", "exit": "quit", "q": "quit", "?": "help",
           "frequency": "freq"}


# -- line input and history ------------------------------------------------------------------
def user_data_dir() -> Path:
    """$XDG_DATA_HOME/eft-local, else ~/.local/share/eft-local."""
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "eft-local"


def history_path() -> Path:
    """Where the chat's line history is kept."""
    return user_data_dir() / "chat_history"


def enable_history(path: Path) -> Callable[[], None]:
    """Turn on readline editing with history from ``path``; returns the function that saves
    it (a no-op when readline is missing or the file cannot be written)."""
    try:
        import readline
    except ImportError:
        return lambda: None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.is_file():
            readline.read_history_file(str(path))
    except OSError:
        pass
    readline.set_history_length(1000)

    def save() -> None:
        with suppress(OSError):
            readline.write_history_file(str(path))

    return save


def interactive() -> bool:
    """True when both stdin and stdout are terminals."""
    return sys.stdin.isatty() and sys.stdout.isatty()


def read_line(prompt: str) -> str | None:
    """One line of input (None at end of input); piped input is echoed after the prompt.

    At a terminal, lines that arrive together with it (a paste) are joined to it, so a
    pasted paragraph is one message.
    """
    if sys.stdin.isatty():
        try:
            line = input(prompt)
            while _more_input_waiting():
                line += "\n" + input("")
            return line
        except EOFError:
            return None
    write(prompt)
    line = sys.stdin.readline()
    if not line:
        return None
    line = line.rstrip("\r\n")
    write(line + "\n")
    return line


def _more_input_waiting(seconds: float = 0.02) -> bool:
    """True when more typed-ahead input is already there (the rest of a paste)."""
    try:
        import select

        return bool(select.select([sys.stdin], [], [], seconds)[0])
    except (ImportError, OSError, ValueError):
        return False


# -- output helpers --------------------------------------------------------------------------
def say(text: str) -> None:
    """One line of REPL output on stdout."""
    write(text + "\n")


def error(message: object) -> None:
    """One error line on stderr; the session goes on."""
    click.echo(f"error: {printable(str(message))}", err=True)


def banner(session: Session) -> str:
    """Which preset, which models (role: file), the formula with numbers, and sampling."""
    preset = session.preset
    lines = [f"preset: {preset.name}" + (f" ({preset.description})" if preset.description
                                         else "")]
    lines += [f"  {role}: {model.path}" for role, model in session.models.items()]
    lines.append(f"vocabulary: {session.report.verdict}")
    lines.append(f"formula: {session.formula.text}")
    used = ", ".join(f"{p}={session.params[p]:g}" for p in session.formula.params)
    lines.append(f"  = {session.describe()}" + (f"  ({used})" if used else ""))
    lines.append(f"sampling: {sampling_text(session)}")
    lines.append("type /help for commands, /quit or Ctrl-D to leave")
    return "\n".join(map(printable, lines))


def sampling_text(session: Session) -> str:
    """The sampler settings on one line."""
    s = session.sampling
    text = (f"temperature {s.temperature:g}, top-p {s.top_p:g}, top-k {s.top_k}, "
            f"min-p {s.min_p:g}, seed {s.seed}")
    if s.conservative_top_p is not None:
        text += f", conservative top-p {s.conservative_top_p:g}"
    if s.repeat_last_n and (s.repeat_penalty != 1 or s.frequency_penalty or s.presence_penalty):
        text += (f", repeat penalty {s.repeat_penalty:g}, frequency {s.frequency_penalty:g}, "
                 f"presence {s.presence_penalty:g} over the last {s.repeat_last_n} tokens")
    if s.dry_multiplier and s.dry_penalty_last_n:
        text += f", DRY {s.dry_multiplier:g}"
    if s.logit_bias:
        text += ", logit bias " + " ".join(f"{t}={b:g}" for t, b in s.logit_bias)
    return text


def _value(arg: str, command: str, kind: type[float] | type[int]) -> float | int:
    """Parse a slash command's argument as ``kind``; one-line errors name the command."""
    noun, example = ("an integer", "1") if kind is int else ("a number", "0.5")
    if not arg:
        raise EftError(f"/{command} needs a value, e.g. /{command} {example}")
    try:
        return kind(arg)
    except ValueError:
        raise EftError(f"/{command}: {arg!r} is not {noun}") from None


def _number(arg: str, command: str) -> float:
    return float(_value(arg, command, float))


def _integer(arg: str, command: str) -> int:
    return int(_value(arg, command, int))


# -- the loop --------------------------------------------------------------------------------
class Repl:
    """Read lines; answer messages with the session; run slash commands."""

    def __init__(self, session: Session, *, max_tokens: int = 512,
                 read: ReadLine = read_line) -> None:
        self.session = session
        self.max_tokens = max_tokens
        self.read = read
        self.saved: list[dict[str, str]] = []
        """The turns as last saved or loaded (to tell an unsaved conversation)."""

    def run(self) -> None:
        """Until /quit or end of input (Ctrl-D)."""
        while True:
            try:
                line = self.read_message()
            except KeyboardInterrupt:
                write("\n")
                continue
            if line is None:
                write("\n")
                return
            line = line.strip()
            if not line:
                continue
            if not self.handle(line):
                return

    def read_message(self) -> str | None:
        """One input: a line; lines ending in a backslash continue onto the next; a block
        between two lines of triple quotes is one message. None at end of input."""
        line = self.read(PROMPT)
        if line is None:
            return None
        if line.strip().startswith(BLOCK):
            first = line.strip()[len(BLOCK):]
            if first.endswith(BLOCK) and first:
                return first[: -len(BLOCK)]
            lines = [first] if first else []
            while (more := self.read(MORE)) is not None:
                if more.rstrip().endswith(BLOCK):
                    lines.append(more.rstrip()[: -len(BLOCK)])
                    break
                lines.append(more)
            return "\n".join(lines).strip("\n")
        lines = []
        while line is not None and line.endswith("\\"):
            lines.append(line[:-1])
            line = self.read(MORE)
        return "\n".join([*lines, line or ""])

    def handle(self, line: str) -> bool:
        """Run one input line; False when the user asked to quit."""
        if not line.startswith("/"):
            self.answer(line)
            return True
        name, _, arg = line[1:].partition(" ")
        name = ALIASES.get(name.lower(), name.lower())
        if name == "quit":
            return False
        command = getattr(self, f"cmd_{name}", None)
        if command is None:
            error(f"unknown command /{name} (try /help)")
            return True
        try:
            command(arg.strip())
        except EftError as exc:
            error(exc)
        except KeyboardInterrupt:
            say("[interrupted]")
        except Exception as exc:  # noqa: BLE001 - no command may end the session
            error(f"/{name} failed: {type(exc).__name__}: {exc}")
        return True

    def answer(self, message: str) -> None:
        """Stream the reply to ``message``; Ctrl-C stops it and keeps what was said."""
        finish, started = None, False
        try:
            with closing(self.session.chat(message, max_tokens=self.max_tokens)) as chunks:
                for chunk in chunks:
                    if chunk.notice:
                        say(f"[{chunk.notice}]")
                    started = started or bool(chunk.text)  # before: a Ctrl-C may land
                    write(chunk.text)  # right after the write, and the line must end
                    finish = chunk.finish or finish
        except KeyboardInterrupt:
            write("\n" if started else "")
            say("[interrupted]")
            return
        except Exception as exc:  # noqa: BLE001 - the conversation goes on
            write("\n" if started else "")
            error(exc if isinstance(exc, EftError) else f"{type(exc).__name__}: {exc}")
            return
        write("\n")
        if finish == "length":
            say(f"[stopped at {self.max_tokens} tokens]")
        elif finish == "context":
            say("[stopped: the context is full]")

    # -- slash commands: cmd_<name>(arg) ---------------------------------------------------
    def _param(self, name: str, command: str, arg: str) -> None:
        self.session.set_param(name, _number(arg, command))
        key = "lam" if name == "lambda" else name
        unused = "" if key in self.session.formula.params else " (not used by this formula)"
        say(f"{key} = {self.session.params[key]:g}: {self.session.describe()}{unused}")

    def _sampling(self, field: str, value: float | int) -> None:
        self.session.set_sampling(**{field: value})
        say(f"{field} = {getattr(self.session.sampling, field):g}")

    def cmd_beta(self, arg: str) -> None:
        self._param("beta", "beta", arg)

    def cmd_lambda(self, arg: str) -> None:
        self._param("lambda", "lambda", arg)

    def cmd_temp(self, arg: str) -> None:
        self._sampling("temperature", _number(arg, "temp"))

    def cmd_topp(self, arg: str) -> None:
        self._sampling("top_p", _number(arg, "topp"))

    def cmd_topk(self, arg: str) -> None:
        self._sampling("top_k", _integer(arg, "topk"))

    def cmd_minp(self, arg: str) -> None:
        self._sampling("min_p", _number(arg, "minp"))

    def cmd_seed(self, arg: str) -> None:
        self._sampling("seed", _integer(arg, "seed"))

    def cmd_repeat(self, arg: str) -> None:
        self._sampling("repeat_penalty", _number(arg, "repeat"))

    def cmd_lastn(self, arg: str) -> None:
        self._sampling("repeat_last_n", _integer(arg, "lastn"))

    def cmd_freq(self, arg: str) -> None:
        self._sampling("frequency_penalty", _number(arg, "freq"))

    def cmd_presence(self, arg: str) -> None:
        self._sampling("presence_penalty", _number(arg, "presence"))

    def cmd_dry(self, arg: str) -> None:
        self._sampling("dry_multiplier", _number(arg, "dry"))

    def cmd_bias(self, arg: str) -> None:
        if arg.lower() == "off":
            self.session.set_sampling(logit_bias=())
            say("logit bias off")
            return
        token, eq, bias = arg.partition("=")
        try:
            pair = int(token), float(bias)
        except ValueError:
            pair = None
        if not eq or pair is None:
            raise EftError("/bias needs ID=BIAS (a token id and a number, -inf bans it), "
                           "e.g. /bias 15043=-100, or /bias off")
        old = dict(self.session.sampling.logit_bias)
        old[pair[0]] = pair[1]
        self.session.set_sampling(logit_bias=old)
        say("logit bias " + " ".join(f"{t}={b:g}" for t, b in
                                     self.session.sampling.logit_bias))

    def cmd_max(self, arg: str) -> None:
        value = _integer(arg, "max")
        if value < 1:
            raise EftError(f"/max: {value} must be >= 1")
        self.max_tokens = value
        say(f"max tokens = {value}")

    def cmd_system(self, arg: str) -> None:
        self.session.conversation.system = arg or None
        say("system prompt set" if arg else "system prompt removed")

    def cmd_overflow(self, arg: str) -> None:
        if not arg:
            raise EftError("/overflow needs truncate or error, e.g. /overflow error")
        self.session.update(context_overflow=arg)
        say(f"context overflow = {self.session.defaults.context_overflow}")

    def cmd_grammar(self, arg: str) -> None:
        if not arg:
            say("grammar: " + ("on" if self.session.defaults.grammar else "off"))
            return
        if arg.lower() == "off":
            self.session.update(grammar="")
            say("grammar off: replies are free text")
            return
        path = Path(arg).expanduser()
        json_schema = path.suffix.lower() == ".json"
        self.session.update(**grammar_changes(path if json_schema else None,
                                              None if json_schema else path,
                                              note=lambda message: say(f"note: {message}")))
        say(f"replies follow the {'JSON schema' if json_schema else 'grammar'} in {arg}")

    def cmd_reset(self, _arg: str) -> None:
        self.session.reset()
        say("conversation cleared")

    def cmd_save(self, arg: str) -> None:
        if not arg:
            raise EftError("/save needs a file name")
        conv = self.session.conversation
        conv.save(arg, extra={"preset": self.session.preset.name,
                              "formula": self.session.describe(),
                              "params": dict(self.session.params)})
        self.saved = [dict(t) for t in conv.turns]
        say(f"saved {len(conv.turns)} turns to {arg}")

    def cmd_load(self, arg: str) -> None:
        if not arg:
            raise EftError("/load needs a file name")
        loaded = Conversation.load(arg)
        old = self.session.conversation.turns
        self.session.conversation = loaded
        replaced = (f" (replaced an unsaved conversation of {len(old)} turns)"
                    if old and old != self.saved else "")
        self.saved = [dict(t) for t in loaded.turns]
        say(f"loaded {len(loaded.turns)} turns from {arg}{replaced}")

    def cmd_stats(self, _arg: str) -> None:
        for line in stats_lines(self.session.stats()):
            say(line)

    def cmd_why(self, arg: str) -> None:
        k = _integer(arg, "why") if arg else 5
        if k < 1:
            raise EftError(f"/why: {k} must be >= 1")
        top = self.session.why(k)
        if not top:
            say("nothing generated yet")
            return
        width = max(len(name) for name in top)
        for name in [*(n for n in top if n != "mix"), "mix"]:
            tokens = "  ".join(f"{text!r} {p:.3f}" for text, p in top[name])
            say(f"{name + ':':<{width + 1}} {tokens}")

    def cmd_help(self, _arg: str) -> None:
        width = max(len(usage) for usage, _ in HELP)
        for usage, text in HELP:
            say(f"{usage:<{width}}  {text}")


def stats_lines(stats: dict[str, Any]) -> list[str]:
    """Session.stats() for people."""
    first = stats["first_token_seconds"]
    per_model = ", ".join(f"{role} {sec:.3f} s" for role, sec in
                          stats["seconds_per_model"].items())
    return [f"generated {stats['generated_tokens']} tokens at "
            f"{stats['tokens_per_second']:.1f} tokens/s (prefill {stats['prefill_tokens']} "
            "tokens" + (f", first token after {first:.3f} s)" if first is not None else ")"),
            f"time per model: {per_model or 'none yet'}",
            f"sampler: {stats['sampler_ms_per_token']:.3f} ms/token"] + (
        [f"speculative: {stats['accepted_tokens']}/{stats['drafted_tokens']} drafted tokens "
         f"accepted ({stats['acceptance_rate']:.0%})"] if stats.get("drafted_tokens") else []
    ) + remote_lines(stats) + [schedule_line(stats), memory_line(stats)]


def memory_line(stats: dict[str, Any]) -> str:
    """The KV cache each slot holds, per model."""
    kv = ", ".join(f"{role} {size_text(n)}" for role, n in
                   stats.get("kv_bytes_per_slot", {}).items() if n)
    return f"slots: {stats.get('slots', 1)} ({stats.get('running', 0)} running)" + (
        f"; KV cache per slot: {kv}" if kv else "")


def remote_lines(stats: dict[str, Any]) -> list[str]:
    """One line per remote role: round trips, network time and bytes."""
    return [f"remote {role}: {r['requests']} request(s), {r['ms_per_request']:.1f} ms each "
            f"({r['network_ms_per_request']:.1f} ms network), {r['bytes_per_token']:.0f} "
            f"bytes and {r['ms_per_token']:.1f} ms per token, {r['tokens_per_request']:.2f} "
            f"token(s) per request" + (f", {r['retries']} retries" if r["retries"] else "")
            + (f", prefix resent {r['resent']} time(s)" if r["resent"] else "")
            for role, r in stats.get("remote", {}).items()]


def schedule_line(stats: dict[str, Any]) -> str:
    """The decode schedule, with its speed against the largest model alone when measured."""
    line = (f"schedule: {stats['schedule']} ({stats['schedule_stages']}) on "
            f"{stats['threads']} thread(s)")
    if "schedule_measured_ratio" in stats:
        line += (f"; x{stats['schedule_predicted_ratio']:.2f} predicted, "
                 f"x{stats['schedule_measured_ratio']:.2f} measured at load against the "
                 f"largest model alone ({stats['large_alone_ms']:.1f} ms/token at "
                 f"{stats['large_alone_threads']} thread(s))")
    elif stats.get("schedule_reason"):
        line += f"; {stats['schedule_reason']}"
    if "schedule_probes" in stats:
        line += (f"; watched while decoding: {stats['schedule_probes']} probe(s), "
                 f"{stats['schedule_switches']} switch(es)")
    return line


# -- the command ----------------------------------------------------------------------------
@click.command()
@click.argument("preset", required=False)
@model_options
@sampling_options
@context_option
def chat(preset: str | None, **opts: Any) -> None:
    """Chat with the mixed model; slash commands change the mix live (/help)."""
    with open_session(preset, opts) as session:
        session.conversation.system = opts["system"]
        say(banner(session))
        save_history = enable_history(history_path()) if interactive() else None
        try:
            Repl(session, max_tokens=opts["max_tokens"]).run()
        finally:
            if save_history:
                save_history()
