"""--plot for explore and eval: valid PNG/SVG files with the expected points and panels, and a
one-line hint when matplotlib is missing."""

from __future__ import annotations

import json
import re
import struct
import sys
from pathlib import Path

import pytest

from eft_local import plots
from eft_local.evaluate import Scorecard
from tests.clihelp import assert_one_line_error, run, stdout
from tests.test_explore import TEXT, WINDOW


def assert_png(path: Path) -> tuple[int, int]:
    """A PNG signature and header; returns (width, height)."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert data[12:16] == b"IHDR" and data[-8:-4] == b"IEND"
    width, height = struct.unpack(">II", data[16:24])
    assert width > 100 and height > 100
    return width, height


def svg_points(path: Path) -> int:
    """Markers inside the SVG group that holds one per combination."""
    text = path.read_text()
    assert text.lstrip().startswith("<?xml") and text.rstrip().endswith("</svg>")
    found = re.search(rf'<g id="{plots.POINTS_GID}">(.*?)</g>', text, re.S)
    assert found, "no point group"
    return len(re.findall(r"<(?:use|path) ", found.group(1)))  # a marker is either


@pytest.fixture
def explore_args(family, tmp_path) -> list[str]:
    text = tmp_path / "text.txt"
    text.write_text(TEXT)
    return ["explore", "-m", f"large_base={family.large_base}",
            "-m", f"small_ft={family.small_ft}", "-m", f"small_ft={family.padded}",
            "-m", f"small_base={family.small_base}", "-m", f"small_base={family.mismatched}",
            "--text", str(text), "--window", str(WINDOW), "--decode-tokens", "4",
            "--threads", "1", "--cache-dir", str(tmp_path / "cache"), "--json"]


@pytest.mark.parametrize("suffix", ["svg", "png"])
def test_explore_plot_has_one_point_per_combination(explore_args, tmp_path, suffix) -> None:
    out = tmp_path / f"explore.{suffix}"
    result = run([*explore_args, "--plot", str(out)])
    assert result.exit_code == 0, result.output
    rows = json.loads(stdout(result))["rows"]
    assert len(rows) == 2  # two combinations with the mismatched small_base are skipped
    if suffix == "svg":
        assert svg_points(out) == len(rows)
    else:
        assert_png(out)
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def _score(label: str, correct: int, compliant: int, declined: int = 0) -> Scorecard:
    return Scorecard(label=label, formula="", n=10, correct=correct, compliant=compliant,
                 declined=declined, by_category={"year": {"n": 5, "correct": 1,
                                                          "declined": declined}})


def test_paper_plot_has_the_three_panels(tmp_path) -> None:
    scores = [_score(name, i, 10) for i, name in enumerate(
        ["tiny-small-ft", "tiny-large-base", "tiny-large-ft", "tiny-up", "tiny-down"])]
    scores += [_score(f"tiny-up@beta={b}", 9, 9) for b in ("0", "0.5", "1", "1.5", "2")]
    scores += [_score(f"tiny-mix@lam={x}", 8, 10, d) for x, d in (("0", 5), ("0.5", 2),
                                                                  ("1", 0))]
    out = tmp_path / "paper.svg"
    assert plots.scores_plot(scores, out) == 3
    text = out.read_text()
    assert len(re.findall(r'<g id="axes_\d+">', text)) == 3
    for title in ("beta sweep", "lambda sweep", "targets"):
        assert f"<!-- {title} -->" in text
    assert plots.scores_plot(scores[:5], tmp_path / "bars.png") == 1
    assert_png(tmp_path / "bars.png")


def test_eval_plot_writes_a_png(family, tmp_path) -> None:
    questions = tmp_path / "q.jsonl"
    questions.write_text('{"prompt": "hello", "expected": "there"}\n')
    out = tmp_path / "eval.png"
    result = run(["eval", str(family.small_ft), str(family.large_base), "--questions",
                  str(questions), "--max-tokens", "3", "--single-turn", "--plot", str(out)])
    assert result.exit_code == 0, result.output
    assert_png(out)


@pytest.mark.parametrize("command", [["explore", "-m", "a=nowhere.gguf"],
                                     ["eval", "nowhere.gguf"]])
def test_plot_without_matplotlib_is_a_one_line_hint(monkeypatch, tmp_path, command) -> None:
    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    out = tmp_path / "x.png"
    result = run([*command, "--plot", str(out)])
    # checked before anything else: the missing model file is not what it reports
    assert_one_line_error(result, "pip install 'eft-local[plot]'")
    assert not out.exists()


def test_plot_refuses_other_formats_before_running(tmp_path) -> None:
    assert_one_line_error(run(["eval", "nowhere.gguf", "--plot", str(tmp_path / "x.pdf")]),
                          ".png or .svg")
    assert_one_line_error(run(["eval", "nowhere.gguf", "--plot",
                               str(tmp_path / "no" / "x.png")]), "does not exist")
