"""Files eft-local reads and writes.

Reading: :func:`read_user_bytes` and :func:`read_user_text` read a file the user named
(a transcript, a grammar, a batch input...): a regular file only, within a size limit, in
pieces between which Ctrl-C and SIGTERM land. A FIFO, a device (``/dev/zero``), a directory
or a socket is refused before anything is read, and opening it never blocks.

Writing: whole or not at all, and only over files of its own kind. :func:`atomic_path`
gives a temporary name beside the target; the target appears (renamed over) only when the
writing block ends without an error, and the temporary is removed on any failure, Ctrl-C
included. :func:`cache_dir` is where caches live.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from eft_local.errors import EftError

TEXT_LIMIT = 64 << 20
"""Largest file :func:`read_user_text` reads unless told otherwise (64 MiB)."""

_PIECE = 1 << 20
"""Bytes per read: a signal is handled between two pieces."""


def _kind(mode: int) -> str:
    """What a file that is not a regular file is, in words."""
    if stat.S_ISDIR(mode):
        return "is a directory"
    if stat.S_ISFIFO(mode):
        return "is a FIFO (named pipe)"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "is a device"
    if stat.S_ISSOCK(mode):
        return "is a socket"
    return "is a special file"


def _size(n: int) -> str:
    return f"{n / (1 << 20):.1f} MiB" if n >= 1 << 20 else f"{n} bytes"


def read_user_bytes(path: str | Path, *, what: str = "file", limit: int = TEXT_LIMIT) -> bytes:
    """The bytes of the regular file ``path``, at most ``limit`` of them; a one-line
    :class:`EftError` naming the file and ``what`` it is otherwise (missing, unreadable,
    not a regular file, too large).

    The file is looked at before it is opened (a device is never opened), opened without
    blocking (a FIFO that no one writes to cannot hang it) and looked at again through the
    open descriptor; it is read in pieces of 1 MiB, so an interrupt lands within one piece.
    """
    path = Path(path)
    try:
        before = os.stat(path)
    except FileNotFoundError:
        raise EftError(f"{path}: {what} not found") from None
    except OSError as exc:
        raise EftError(f"{path}: cannot read the {what} ({exc.strerror or exc})") from None
    if not stat.S_ISREG(before.st_mode):
        raise EftError(f"{path}: {_kind(before.st_mode)}, not a regular file; give the {what} "
                       "as a regular file")
    flags = os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_NOCTTY", 0)
    try:
        fd = os.open(path, flags)
    except OSError as exc:
        raise EftError(f"{path}: cannot read the {what} ({exc.strerror or exc})") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):  # replaced since the first look
            raise EftError(f"{path}: {_kind(st.st_mode)}, not a regular file; give the "
                           f"{what} as a regular file")
        too_big = (f"{path}: the {what} is over the limit of {_size(limit)}"
                   " for this kind of file; split it or give a smaller one")
        if st.st_size > limit:
            raise EftError(too_big.replace("is over", f"is {_size(st.st_size)}, over"))
        pieces, size = [], 0
        while True:
            try:
                piece = os.read(fd, min(_PIECE, limit + 1 - size))
            except OSError as exc:
                raise EftError(f"{path}: cannot read the {what} ({exc.strerror or exc})"
                               ) from None
            if not piece:
                break
            pieces.append(piece)
            size += len(piece)
            if size > limit:  # it grew while being read
                raise EftError(too_big)
        return b"".join(pieces)
    finally:
        os.close(fd)


def read_user_text(path: str | Path, *, what: str = "file", limit: int = TEXT_LIMIT) -> str:
    """:func:`read_user_bytes` decoded as UTF-8 (a one-line error names the first byte that
    is not)."""
    data = read_user_bytes(path, what=what, limit=limit)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise EftError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start}); convert "
                       "it first, e.g. iconv -f latin1 -t utf-8") from None


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
