"""Files eft-local writes: whole or not at all, and only over files of its own kind.

:func:`atomic_path` gives a temporary name beside the target; the target appears (renamed
over) only when the writing block ends without an error, and the temporary is removed on
any failure, Ctrl-C included. :func:`cache_dir` is where caches live.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from eft_local.errors import EftError


def cache_dir(*parts: str) -> Path:
    """``$XDG_CACHE_HOME/eft-local/<parts>`` (``~/.cache`` by default)."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base, "eft-local", *parts)


def check_target(path: Path) -> None:
    """Refuse an output path that exists and is not a regular file (a FIFO, a device, a
    folder, a symbolic link): renaming over it would replace something that is not ours."""
    if path.is_symlink():
        raise EftError(f"{path}: is a symbolic link (writing would replace the link); give "
                       "the path it points to, or another output")
    if path.exists() and not path.is_file():
        kind = "a directory" if path.is_dir() else "not a regular file"
        raise EftError(f"{path}: {kind}; give another output")


def temporary_name(path: Path) -> Path:
    """The hidden name beside ``path`` that :func:`atomic_path` writes first."""
    return path.with_name(f".{path.name}.{os.getpid()}.part")


@contextmanager
def atomic_path(path: str | Path, *, mode: int | None = None) -> Iterator[Path]:
    """Yield a temporary path beside ``path`` to write; on a clean exit it replaces
    ``path`` (with permissions ``mode`` when given), on any exception it is removed."""
    path = Path(path)
    check_target(path)
    tmp = temporary_name(path)
    try:
        yield tmp
        if mode is not None:
            os.chmod(tmp, mode)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write(path: str | Path, data: bytes | str, *, what: str = "the file") -> None:
    """Write ``data`` to ``path`` whole or not at all; a one-line error naming ``what``."""
    path = Path(path)
    try:
        with atomic_path(path) as tmp:
            if isinstance(data, str):
                tmp.write_text(data, encoding="utf-8")
            else:
                tmp.write_bytes(data)
    except OSError as exc:
        raise EftError(f"{path}: cannot write {what} ({exc.strerror or exc})") from None
