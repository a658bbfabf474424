"""Model files from Hugging Face: the normal hub cache, a progress bar, clear errors."""

from __future__ import annotations

import os
from pathlib import Path

from eft_local.errors import EftError
from eft_local.presets import ModelSpec

NETWORK_MODULES = ("httpx", "httpx2", "httpcore", "requests", "urllib3", "h11", "ssl")
"""Where connection errors come from (huggingface-hub does not wrap all of them)."""

CONNECT_SECONDS = 5.0
"""How long the first request to the hub may take before the download is given up."""


def cached_path(spec: ModelSpec) -> Path | None:
    """The local file for ``spec`` if it is already present (no network), else None
    (always None for a remote model)."""
    if spec.remote:
        return None
    if spec.path is not None:
        try:
            return spec.path if spec.path.is_file() else None
        except OSError:  # e.g. a name too long for the file system
            return None
    from huggingface_hub import try_to_load_from_cache

    try:
        found = try_to_load_from_cache(spec.hf_repo, spec.hf_file, revision=spec.revision)
    except ValueError as exc:  # HFValidationError: a repo id or revision the hub refuses
        raise EftError(f"{spec.role}: {spec.describe()}: {_first_line(exc)}") from None
    return Path(found) if isinstance(found, str) else None


def resolve(spec: ModelSpec, *, download: bool = True) -> Path:
    """A local path for ``spec``, downloading into the hub cache when needed and allowed."""
    if spec.remote:
        raise EftError(f"{spec.role}: {spec.describe()} is a remote model, not a file")
    if spec.path is not None:
        return spec.path
    local = cached_path(spec)
    if local is not None:
        return local
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        raise EftError(f"{spec.role}: {spec.describe()} is not downloaded yet and "
                       "HF_HUB_OFFLINE is set (unset it to download the file)")
    if not download:
        raise EftError(f"{spec.role}: {spec.describe()} is not downloaded yet; run "
                       "`eft-local pull` for its preset")
    return download_file(spec)


def download_file(spec: ModelSpec) -> Path:
    """Download one hub file with huggingface-hub's progress bar; errors are one line.

    One quick request first (no retries, a short timeout), so that an unreachable hub fails
    in seconds with one line instead of a minute of retry messages; a stalled body ends at
    huggingface-hub's read timeout (HF_HUB_DOWNLOAD_TIMEOUT, 10 s by default).
    """
    from huggingface_hub import errors as hf_errors
    from huggingface_hub import get_hf_file_metadata, hf_hub_download, hf_hub_url
    from huggingface_hub.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # no retry chatter: the outcome is one line
    try:
        url = hf_hub_url(spec.hf_repo, spec.hf_file, revision=spec.revision)
        get_hf_file_metadata(url, timeout=CONNECT_SECONDS)
        return Path(hf_hub_download(spec.hf_repo, spec.hf_file, revision=spec.revision))
    except hf_errors.RepositoryNotFoundError:
        why = f"repository {spec.hf_repo!r} not found (or gated: log in with `hf auth login`)"
    except hf_errors.RevisionNotFoundError:
        why = f"revision {spec.revision!r} not found in {spec.hf_repo!r}"
    except hf_errors.LocalEntryNotFoundError:
        why = "not in the cache and the hub cannot be reached"
    except hf_errors.EntryNotFoundError:
        why = f"file {spec.hf_file!r} not found in {spec.hf_repo!r}"
    except (hf_errors.HfHubHTTPError, OSError, ValueError) as exc:
        why = _first_line(exc)
    except Exception as exc:
        if type(exc).__module__.split(".")[0] not in NETWORK_MODULES:
            raise
        why = f"the connection failed ({type(exc).__name__}: {_first_line(exc)})"
    raise EftError(f"{spec.role}: download of {spec.describe()} failed: {why}")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
