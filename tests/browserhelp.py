"""A headless Debian chromium driven by Playwright for Python (never Playwright's own
browser download): shared by the playground tests and ``docs/screenshots.py``."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                 "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]
"""Offline, quiet and unprivileged: no sandbox (containers run as root), no GPU, no
background traffic."""


def chromium_path() -> str | None:
    """The system chromium: ``$EFT_LOCAL_CHROMIUM``, else ``chromium`` on the PATH, else
    Debian's /usr/bin/chromium; None when there is none."""
    for candidate in (os.environ.get("EFT_LOCAL_CHROMIUM"), shutil.which("chromium"),
                      "/usr/bin/chromium"):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    return None


def launch(playwright: Any, user_data_dir: Path, **options: Any) -> Any:
    """A persistent browser context on a fresh ``user_data_dir`` (one browser; pages are
    cheap)."""
    path = chromium_path()
    if path is None:
        raise RuntimeError("no chromium binary (apt-get install chromium)")
    return playwright.chromium.launch_persistent_context(
        str(user_data_dir), executable_path=path, headless=True, args=CHROMIUM_ARGS,
        **options)
