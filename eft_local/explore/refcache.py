"""The reference's distributions over a text, cached on disk.

One compressed ``.npz`` per key: per scored position the top-k ids and log-probs and the
remaining mass (:class:`eft_local.quality.TopK`), the reference's own NLL, and the text's
tokens. The key hashes everything the distributions depend on: the files' contents, the
formula, the knobs, the text, top-k, the window and the context sizes. Files are written
atomically; a damaged cache file counts as absent.
"""

from __future__ import annotations

import hashlib
import io
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from eft_local.errors import EftError
from eft_local.explore.metrics import TopK
from eft_local.files import atomic_write, cache_dir

CACHE_VERSION = 1


def token_chunks(tokens: Sequence[int], window: int, bos: int | None) -> list[list[int]]:
    """The text cut into model inputs of at most ``window`` tokens, BOS first if given;
    every input holds at least two tokens (one prediction)."""
    step = window - (bos is not None)
    if step < 2:
        raise EftError(f"window {window}: too small to predict anything")
    head = [] if bos is None else [bos]
    return [head + list(tokens[i:i + step]) for i in range(0, len(tokens), step)
            if len(head) + len(tokens[i:i + step]) >= 2]


@dataclass(frozen=True)
class Reference:
    """The reference's compressed distributions over the text: ``dist`` and ``nll`` hold
    one entry per predicted token of :meth:`chunks`, in order."""

    tokens: np.ndarray
    window: int
    bos: int  # -1: none
    dist: TopK
    nll: np.ndarray
    meta: Mapping[str, object] = field(default_factory=dict)

    def chunks(self) -> list[list[int]]:
        """The model inputs the distributions were computed on."""
        return token_chunks(self.tokens.tolist(), self.window, None if self.bos < 0 else self.bos)


def default_cache_dir() -> Path:
    """$XDG_CACHE_HOME/eft-local/explore (~/.cache by default)."""
    return cache_dir("explore")


class ReferenceCache:
    """Reference distributions on disk, one ``.npz`` per key."""

    def __init__(self, directory: Path | None = None) -> None:
        self.dir = Path(directory) if directory is not None else default_cache_dir()

    def file_hash(self, path: Path) -> str:
        """SHA-256 of a file's bytes, remembered by (path, size, modification time)."""
        st = path.stat()
        memo_path = self.dir / "hashes.json"
        try:
            memo = json.loads(memo_path.read_text())
            if not isinstance(memo, dict):
                memo = {}
        except (OSError, ValueError):
            memo = {}
        ident = f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}"
        if ident not in memo:
            digest = hashlib.sha256()
            with path.open("rb") as fh:
                for block in iter(lambda: fh.read(1 << 20), b""):
                    digest.update(block)
            memo[ident] = digest.hexdigest()
            self._write(memo_path, json.dumps(memo).encode())
        return str(memo[ident])

    def key(self, files: Mapping[str, Path | str], text: str, **recipe: object) -> str:
        """A name for the distributions of ``files`` over ``text`` made by ``recipe``
        (formula, knobs, top-k, window...: any JSON-ready values)."""
        parts = {"version": CACHE_VERSION,
                 "files": {role: p if isinstance(p, str) else self.file_hash(Path(p))
                           for role, p in files.items()},  # a str is a remote engine's URL
                 "text": hashlib.sha256(text.encode("utf-8")).hexdigest(), **recipe}
        return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:32]

    def path(self, key: str) -> Path:
        """Where the distributions of ``key`` live."""
        return self.dir / f"{key}.npz"

    def load(self, key: str) -> Reference | None:
        """The cached reference, or None."""
        path = self.path(key)
        if not path.is_file():
            return None
        try:
            with np.load(path, allow_pickle=False) as data:
                return Reference(tokens=data["tokens"], window=int(data["window"]),
                                 bos=int(data["bos"]), nll=data["nll"],
                                 dist=TopK(data["ids"], data["logprobs"], data["rest"]),
                                 meta=json.loads(str(data["meta"])))
        except (OSError, ValueError, KeyError, EOFError):
            return None

    def save(self, key: str, ref: Reference) -> Path:
        """Store ``ref`` under ``key``."""
        buf = io.BytesIO()
        np.savez_compressed(buf, tokens=ref.tokens, window=ref.window, bos=ref.bos,
                            nll=ref.nll, ids=ref.dist.ids, logprobs=ref.dist.logprobs,
                            rest=ref.dist.rest, meta=json.dumps(dict(ref.meta)))
        path = self.path(key)
        self._write(path, buf.getvalue())
        return path

    def _write(self, path: Path, data: bytes) -> None:
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise EftError(f"{self.dir}: cannot create the cache folder ({exc})") from None
        atomic_write(path, data, what="the cache")
