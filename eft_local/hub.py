"""Model files from Hugging Face: the normal hub cache, a progress bar, clear errors."""

from __future__ import annotations

import os
from pathlib import Path

from eft_local.config import ModelSpec
from eft_local.errors import EftError


def cached_path(spec: ModelSpec) -> Path | None:
    """The local file for ``spec`` if it is already present (no network), else None."""
    if spec.path is not None:
        return spec.path if spec.path.is_file() else None
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(spec.hf_repo, spec.hf_file, revision=spec.revision)
    return Path(found) if isinstance(found, str) else None


def resolve(spec: ModelSpec, *, download: bool = True) -> Path:
    """A local path for ``spec``, downloading into the hub cache when needed and allowed."""
    if spec.path is not None:
        return spec.path
    local = cached_path(spec)
    if local is not None:
        return local
    offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes")
    if not download or offline:
        raise EftError(f"{spec.role}: {spec.describe()} is not downloaded yet"
                       + (" and HF_HUB_OFFLINE is set" if offline else "")
                       + "; run `eft-local pull` for its preset")
    return download_file(spec)


def download_file(spec: ModelSpec) -> Path:
    """Download one hub file with huggingface-hub's progress bar; errors are one line."""
    from huggingface_hub import errors as hf_errors
    from huggingface_hub import hf_hub_download

    try:
        return Path(hf_hub_download(spec.hf_repo, spec.hf_file, revision=spec.revision))
    except hf_errors.RepositoryNotFoundError:
        why = f"repository {spec.hf_repo!r} not found (or gated: log in with `hf auth login`)"
    except hf_errors.RevisionNotFoundError:
        why = f"revision {spec.revision!r} not found in {spec.hf_repo!r}"
    except hf_errors.LocalEntryNotFoundError:
        why = "not in the cache and the hub cannot be reached"
    except hf_errors.EntryNotFoundError:
        why = f"file {spec.hf_file!r} not found in {spec.hf_repo!r}"
    except (hf_errors.HfHubHTTPError, OSError) as exc:
        why = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    raise EftError(f"{spec.role}: download of {spec.describe()} failed: {why}")
