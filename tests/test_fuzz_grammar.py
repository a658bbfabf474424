"""Fuzzing of JSON schemas and GBNF grammars in a child process (tests/fuzz_grammar_driver.py):
llama-cpp-python's converter and llama.cpp's grammar parser and sampler behind eft-local's
bounds, in a thread with a small stack. A crash (a signal), a refusal that is not one line,
or a set-up that stalls is a failed test, not a dead suite."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = 150  # schemas and grammars each: about 10 s on two busy cores


def test_fuzz_schemas_and_grammars(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HOME": str(tmp_path),
           "XDG_CONFIG_HOME": str(tmp_path), "EFT_LOCAL_CONFIG": str(tmp_path / "models.toml")}
    env.pop("EFT_LOCAL_DEBUG", None)
    proc = subprocess.run([sys.executable, "-m", "tests.fuzz_grammar_driver", str(tmp_path),
                           str(EXAMPLES)], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)
    case = tmp_path / "current-case"
    last = case.read_text()[:3000] if case.exists() else "none"
    assert proc.returncode == 0, (
        f"exit {proc.returncode} (negative: killed by that signal); last case: {last}\n"
        f"{proc.stderr[-6000:]}")
    assert "fuzz: all passed" in proc.stderr
