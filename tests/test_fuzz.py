"""Fuzzing in a child process (tests/fuzz_driver.py): random and mutated GGUF headers,
models.toml texts, formulas, JSONL batches and REPL commands through the public commands,
and HTTP bodies to /v1/chat/completions and /v1/completions of a server on a loopback port.
No signal, no traceback, no "internal error", exit status 0/1/2, nothing lost from output;
every HTTP answer 200/400/404/413 in strict JSON, never a 500."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = 100  # per input kind, 50 per HTTP endpoint: about 30 s on two busy cores


def test_fuzz_public_entry_points(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "EFT_LOCAL_CONFIG": str(tmp_path /
                                                                            "models.toml"),
           "HF_HUB_OFFLINE": "1", "HOME": str(tmp_path), "XDG_DATA_HOME": str(tmp_path),
           "XDG_CONFIG_HOME": str(tmp_path)}
    env.pop("EFT_LOCAL_DEBUG", None)
    proc = subprocess.run([sys.executable, "-m", "tests.fuzz_driver", str(tmp_path),
                           str(EXAMPLES)], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)
    case = tmp_path / "current-case"
    last = case.read_text() if case.exists() else "none"
    assert proc.returncode == 0, (
        f"exit {proc.returncode} (negative: killed by that signal); last case: {last}\n"
        f"{proc.stderr[-6000:]}")
    assert "fuzz: all passed" in proc.stderr
