"""eft-local bench: runs end to end on tiny models and reports against the large model."""

from __future__ import annotations

import numpy as np
from click.testing import CliRunner

from eft_local import bench
from eft_local.cli import main


def test_coupling_of_identical_rows_is_perfect_and_the_race_beats_inverse_cdf() -> None:
    pairs = bench.synthetic_pairs(vocab=3000, n=30)
    best, race, inverse = bench.coupling(pairs, seeds=10)
    assert 0 < inverse < race <= best + 0.05
    best, race, inverse = bench.coupling([(p, p) for p, _ in pairs[:5]], seeds=5)
    assert np.isclose(best, 1.0, atol=1e-5) and race == inverse == 1.0


def test_bench_end_to_end(family, monkeypatch) -> None:
    monkeypatch.setattr(bench, "SAMPLER_VOCABS", (1000,))
    result = CliRunner().invoke(main, ["bench", *family.trio(), "--repeats", "1",
                                       "--max-tokens", "4", "--prompt-tokens", "16",
                                       "--threads", "2"])
    assert result.exit_code == 0, result.output
    out = result.output
    assert "load average" in out and "machine:" in out
    assert "large_base alone, 1 thread(s)" in out and "large_base alone, 2 thread(s)" in out
    assert "(chosen)" in out and "x best large alone" in out
    assert "speculative / plain (chosen schedule)" in out
    assert "time to first token" in out and "overhead per step" in out
    assert "vocab    1000 zipf  T=1" in out
