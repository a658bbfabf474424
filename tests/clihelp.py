"""Helpers for the CLI tests: run a command, and compute the expected text via the API."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from click.testing import CliRunner, Result

from eft_local.cli.main import main
from eft_local.sampler import SamplerSettings
from eft_local.session import LoadOptions, Session, load_session

THREADS = ["--threads", "1"]


def run(args: Sequence[str], input: str | None = None) -> Result:
    """Invoke ``eft-local ARGS`` in-process (stdout and stderr kept apart)."""
    return CliRunner().invoke(main, list(args), input=input)


def stdout(result: Result) -> str:
    """Exactly what the command wrote to stdout (no newline normalisation)."""
    return result.stdout_bytes.decode("utf-8")


def api_session(pairs: list[str], **settings: object) -> Session:
    """The session the CLI builds from ``--model`` pairs, made through the library."""
    return load_session(models=pairs, sampling=SamplerSettings(**settings),  # type: ignore[arg-type]
                        options=LoadOptions(n_threads=1))


def assert_one_line_error(result: Result, *words: str) -> None:
    """Non-zero exit, exactly one ``error:`` line on stderr naming ``words``, no traceback."""
    assert result.exit_code != 0, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), \
        repr(result.exception)
    err = result.stderr.splitlines()
    errors = [line for line in err if line.startswith("error: ")]
    assert len(errors) == 1, result.stderr
    assert err[-1] == errors[0]
    assert "Traceback" not in result.output
    assert "internal error" not in errors[0], errors[0]  # a bug, not the user's mistake
    for word in words:
        assert word in errors[0], errors[0]


def write_presets(path: Path, text: str) -> None:
    """Write a user models.toml (the autouse fixture points EFT_LOCAL_CONFIG at ``path``)."""
    path.write_text(text, encoding="utf-8")
