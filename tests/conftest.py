"""Shared fixtures: tiny GGUF families written into temporary folders, and a home directory
that is never the real one."""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pytest

# Before llama.cpp (and its OpenMP runtime) is loaded: on a busy machine, spinning OpenMP
# workers make each tiny decode take hundreds of milliseconds instead of one.
os.environ.setdefault("OMP_WAIT_POLICY", "passive")
# huggingface_hub reads its cache location once, when imported: never the real cache.
os.environ["HF_HOME"] = tempfile.mkdtemp(prefix="eft-local-hf-")
# Tests never reach the internet: the hub client refuses network access outright.
os.environ["HF_HUB_OFFLINE"] = "1"

from tests.ggufs import write_model  # noqa: E402


@dataclass(frozen=True)
class Family:
    """Model files for the tests (read-only: shared by every test of a session)."""

    large_base: Path
    small_ft: Path
    small_base: Path
    padded: Path        # the small_ft vocabulary plus unused [PAD] rows
    mismatched: Path    # two normal tokens swapped
    corrupt: Path       # GGUF magic, truncated body
    not_gguf: Path      # some other file

    def trio(self) -> list[str]:
        """``--model`` options for up-scaling with the aligned trio."""
        return ["-m", f"large_base={self.large_base}", "-m", f"small_ft={self.small_ft}",
                "-m", f"small_base={self.small_base}"]

    def pairs(self) -> list[str]:
        """``ROLE=PATH`` strings for the aligned trio (for load_session)."""
        return self.trio()[1::2]


@pytest.fixture(scope="session")
def family(tmp_path_factory: pytest.TempPathFactory) -> Family:
    """An aligned trio, a padded vocabulary, a mismatched one, and two broken files."""
    d = tmp_path_factory.mktemp("ggufs")
    large = write_model(d / "large_base.gguf", seed=1, n_embd=64)
    corrupt = d / "corrupt.gguf"
    corrupt.write_bytes(large.read_bytes()[:4096])
    not_gguf = d / "notes.gguf"
    not_gguf.write_text("not a model\n")
    return Family(
        large_base=large,
        small_ft=write_model(d / "small_ft.gguf", seed=2),
        small_base=write_model(d / "small_base.gguf", seed=3),
        padded=write_model(d / "padded.gguf", seed=4, pad_to=300),
        mismatched=write_model(d / "mismatched.gguf", seed=5, swap=(60, 61)),
        corrupt=corrupt,
        not_gguf=not_gguf,
    )


@pytest.fixture(autouse=True)
def isolated_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """HOME, the XDG folders and the user's models.toml all live under ``tmp_path``."""
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    for name, sub in (("XDG_CONFIG_HOME", ".config"), ("XDG_DATA_HOME", ".local/share"),
                      ("XDG_CACHE_HOME", ".cache")):
        monkeypatch.setenv(name, str(home / sub))
    user_config = home / "models.toml"
    user_config.write_text("")
    monkeypatch.setenv("EFT_LOCAL_CONFIG", str(user_config))
    return home
