"""``eft-local serve``: the OpenAI-compatible server (needs the ``server`` extra)."""

from __future__ import annotations

import re
import socket
import time
from pathlib import Path
from typing import Any

import click
from click.core import ParameterSource

from eft_local.cli.options import (
    context_option,
    model_options,
    parallel_option,
    sampling_options,
)
from eft_local.errors import EftError
from eft_local.files import read_user_text
from eft_local.server.guard import CorsPolicy, is_loopback
from eft_local.text import printable

KEY_ENV = "EFT_LOCAL_API_KEY"
HINT = "eft-local serve needs Starlette and uvicorn: pip install 'eft-local[server]'"


SLOTS = 2
"""``serve``'s default ``-np``: a second request (another user, or a chat client's title
request after an answer) starts at once and takes the other slot, so neither waits for the
other's whole answer and the conversation's cached prefix survives it."""


def _log(message: str) -> None:
    stamp = time.strftime("%H:%M:%S")
    click.echo(printable(f"{stamp} {message}"), err=True)


def looks_like_key(value: str) -> bool:
    """True for a value that may be a secret (``sk-...``, or 16 letters and digits mixed
    without a separator, as random keys have and names have not): never echoed."""
    value = value.strip()
    return value.startswith(("sk-", "hf_", "Bearer ")) or any(
        sum(c.isdigit() for c in run) >= 2 and sum(c.isalpha() for c in run) >= 2
        for run in re.findall(r"[A-Za-z0-9]{16,}", value))


def server_key(api_key: str | None, key_file: Path | None,
               source: ParameterSource | None = None) -> str | None:
    """The server's API key from ``--api-key`` (or :data:`KEY_ENV`) or ``--api-key-file``;
    a warning when it was typed on the command line (other users see it in ps). Messages
    never show the key, nor a file name that looks like one."""
    if api_key is not None and key_file is not None:
        raise click.UsageError(f"give --api-key (or {KEY_ENV}) or --api-key-file, not both")
    where = f"--api-key or {KEY_ENV}"
    if key_file is not None:
        if looks_like_key(str(key_file)) and not key_file.exists():
            raise EftError("--api-key-file: no such file, and the value looks like a key (not "
                           "shown); give the path of a file that holds the key")
        lines = read_user_text(key_file, what="key file", limit=4096).split()
        if len(lines) != 1:
            raise EftError(f"{key_file}: a key file holds the key alone on one line (it "
                           f"holds {len(lines)} words)")
        api_key, where = lines[0], str(key_file)
    elif api_key is not None and source == ParameterSource.COMMANDLINE:
        click.echo(f"warning: --api-key on the command line can be read by every user of this "
                   f"machine (ps); prefer --api-key-file FILE or {KEY_ENV}", err=True)
    if api_key is None:
        return None
    api_key = api_key.strip()
    if not api_key:
        raise EftError(f"the API key ({where}) is empty: give one, or none to serve without")
    if not all(33 <= ord(c) < 127 for c in api_key):
        raise EftError(f"the API key ({where}) holds spaces or characters other than printable "
                       "ASCII (not shown); a Bearer token cannot carry them")
    return api_key


def listen(host: str, port: int) -> socket.socket:
    """A socket listening on ``host:port`` (before any model loads; connections wait until
    the server starts); a one-line error if not."""
    try:
        family, kind, proto, _name, address = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM)[0]
        sock = socket.socket(family, kind, proto)
    except OSError as exc:
        raise EftError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(2048)  # connections queue from now on, before uvicorn starts
    except OSError as exc:
        sock.close()
        raise EftError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    return sock


@click.command()
@click.argument("preset_arg", required=False, metavar="[PRESET]")
@click.option("--preset", "pinned", metavar="NAME",
              help="Serve only this preset (requests naming another get 404).")
@model_options
@sampling_options
@context_option
@parallel_option(default=SLOTS, what="requests")
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to listen on (another than loopback wants an API key).")
@click.option("--port", type=click.IntRange(0, 65535), default=8080, show_default=True)
@click.option("--allowed-host", "allowed_hosts", multiple=True, metavar="NAME",
              help="Also answer requests whose Host header is NAME (repeatable; '*': any). "
              "IP addresses, localhost and the --host name are always answered.")
@click.option("--cors", "cors", multiple=True, metavar="ORIGIN",
              help="Let web pages from ORIGIN (scheme://host[:port]; repeatable; '*': any "
              "page) call the server from the browser. Off by default: any page you visit "
              "could otherwise use the server.")
@click.option("--api-key-file", type=click.Path(path_type=Path), metavar="FILE",
              help="Require 'Authorization: Bearer KEY', KEY being FILE's one line.")
@click.option("--api-key", envvar=KEY_ENV, metavar="KEY",
              help=f"Require 'Authorization: Bearer KEY'. Other users see it in ps: prefer "
              f"--api-key-file or the environment variable {KEY_ENV}.")
@click.option("--max-queue", type=click.IntRange(1, 10_000), default=16, show_default=True,
              help="Requests that may wait for a free slot; more get 503.")
@click.option("--max-body", type=click.IntRange(1024, 1 << 30), default=8 << 20,
              show_default=True, help="Largest request body in bytes; larger get 413.")
@click.option("--allow-download", is_flag=True,
              help="Download a preset's missing hub files when it is named (without it, only "
              "presets whose files are present are listed and loaded).")
@click.option("--max-logprobs", type=click.IntRange(0, 1 << 24), default=20,
              show_default=True,
              help="Most log-probs per position a /v1/completions request may ask for "
              "(OpenAI's limit is 20; a remote eft-local role with top_k K needs K).")
@click.option("--reasoning-format", type=click.Choice(["deepseek", "none"]),
              default="deepseek", show_default=True,
              help="Where a chat reply's <think> block goes (templates that use one): "
              "deepseek, message.reasoning_content (and delta.reasoning_content); none, it "
              "stays in the content. A request's reasoning_format overrides it.")
def serve(preset_arg: str | None, pinned: str | None, host: str, port: int,
          allowed_hosts: tuple[str, ...], cors: tuple[str, ...], api_key_file: Path | None,
          api_key: str | None, max_queue: int, max_body: int, allow_download: bool,
          max_logprobs: int, reasoning_format: str, **opts: Any) -> None:
    """Serve the emulated model over an OpenAI-compatible HTTP API (and Ollama's).

    Endpoints: /v1/chat/completions, /v1/completions (echo + logprobs scores a text),
    /v1/models, /tokenize, /detokenize, /tokenizer_info, /health, / (the playground:
    a web page showing each token's mix, in colour), Ollama's /api/chat, /api/generate,
    /api/tags, /api/show, /api/ps and /api/version (for Ollama's clients; presets are
    listed as PRESET:latest), and /eft/rows and /eft/vocab, which
    make a model of this server an exact remote role of another eft-local
    (-m large_base=http://HOST:PORT). Requests may name any
    preset whose files are present (it is loaded on demand, one set at a time) unless
    --preset or --model pins one; model names like PRESET@beta=1.5 and an "eft" object in
    the body set the knobs per request. The sampling options are the defaults of every
    request. -np requests decode side by side (each in its own slot: a KV sequence of
    every model, with its own context), more wait in arrival order. Ctrl-C stops it:
    running requests end at their next token, waiting ones get 503.

    Against web pages (DNS rebinding, blind cross-site POSTs), a request must name this
    server in its Host header (an IP address, localhost, the --host name, names given with
    --allowed-host; beyond loopback also this machine's name, *.local and *.internal) and
    send JSON bodies as 'Content-Type: application/json'; a web page of another origin
    may call it only when --cors names that origin.
    """
    try:
        from eft_local.server.app import ServerOptions, create_app
        from eft_local.server.guard import HostPolicy
        from eft_local.server.net import HttpLimits, make_server
    except ImportError as exc:
        if (exc.name or "").split(".")[0] in ("starlette", "uvicorn", "anyio", "h11"):
            raise EftError(HINT) from None
        raise
    from eft_local.cli.options import open_session
    from eft_local.presets import load_config
    from eft_local.server.worker import Worker

    if opts.get("parse_special"):
        raise click.UsageError("--parse-special is not available for serve (clients send "
                               "untrusted messages)")
    if pinned and preset_arg and pinned != preset_arg:
        raise click.UsageError(f"give the preset once: {preset_arg!r} or --preset {pinned!r}")
    source = click.get_current_context().get_parameter_source("api_key")
    api_key = server_key(api_key, api_key_file, source)
    origins = CorsPolicy.parse(cors)
    if preset_arg and looks_like_key(preset_arg):
        from eft_local.presets import load_config

        if preset_arg not in load_config().presets:
            raise click.UsageError("unknown preset (its name is not shown: it looks like an "
                                   f"API key; give a key with --api-key-file FILE or {KEY_ENV})")
    if not api_key and not is_loopback(host):
        click.echo(f"warning: listening on {host} without --api-key: anyone who can reach "
                   f"port {port} can use the models", err=True)
    if not api_key and origins.any_origin:
        click.echo("warning: --cors '*' without --api-key: every web page you visit can use "
                   "the models and read their answers", err=True)
    sock = listen(host, port)
    try:
        session = open_session(pinned or preset_arg, {**opts, "allow_download": allow_download})
    except BaseException:
        sock.close()
        raise
    config = None if opts.get("models") else load_config()
    runner = Worker(config, session.preset, pinned=bool(pinned or opts.get("models")),
                    params=session.params, sampling=session.sampling, options=session.options,
                    max_queue=max_queue, log=_log)
    runner.adopt(session)
    options = ServerOptions(api_key=api_key, max_body=max_body, max_tokens=opts["max_tokens"],
                            system=opts.get("system"), stop=tuple(opts.get("stop") or ()),
                            seed=opts.get("seed"), max_logprobs=max_logprobs,
                            context_overflow=opts.get("context_overflow") or "truncate",
                            hosts=HostPolicy.for_server(host, allowed_hosts), cors=origins,
                            reasoning_format=reasoning_format)
    app = create_app(runner, options, log=_log)
    runner.start()
    server = make_server(app, runner, log=_log,
                         limits=HttpLimits(max_connections=max(64, max_queue + 16)))
    url = base_url(sock)
    if not is_loopback(host) or allowed_hosts:
        _log(options.hosts.describe())
    if origins.enabled:
        _log(origins.describe())
    _log(f"serving {session.preset.name!r} on {url}/v1 (OpenAI API; Ollama's at {url}/api; "
         f"the playground page at {url}/; Ctrl-C stops)")
    try:
        server.run(sockets=[sock])
    finally:
        runner.stop()
        sock.close()
    _log("stopped")


def base_url(sock: socket.socket) -> str:
    """``http://HOST:PORT`` of a bound socket: the port it got (``--port 0``), an IPv6
    address in brackets."""
    host, port = sock.getsockname()[:2]
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"
