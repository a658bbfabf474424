"""``eft-local explore`` and ``quantize``: quality against a NumPy computation from each model
alone, the reference cache, incompatible variants, combinations, Pareto marks."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from eft_local import backend
from eft_local.errors import EftError
from eft_local.explore import metrics as quality
from eft_local.explore.candidates import Combination, combinations, largest
from eft_local.explore.explorer import (
    ENGLISH_TEXT,
    FAMILY_TEXT,
    Explorer,
    Row,
    Settings,
    Skipped,
    default_text,
)
from eft_local.presets import FAMILY_DIR, preset_from_paths
from eft_local.session import LoadOptions
from tests.clihelp import assert_one_line_error, run, stdout
from tests.ggufs import write_model

TEXT = ("hello there, the other hill in the north. " * 6).strip()
WINDOW = 48
OPTIONS = LoadOptions(n_threads=1)


@pytest.fixture(scope="module")
def variants(family, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Q8_0 copies of the test trio, and a copy of large_base to overwrite later."""
    d = tmp_path_factory.mktemp("variants")
    out = {f"{name}_q8": backend.quantize_gguf(getattr(family, name), d / f"{name}.Q8_0.gguf",
                                               "q8_0")
           for name in ("large_base", "small_ft", "small_base")}
    return out


def explorer(template_pairs: list[str], reference: Combination, cache: Path, *,
             text: str = TEXT, top_k: int = 4096, beta: float = 1.5, **kwargs) -> Explorer:
    template = preset_from_paths(template_pairs)
    settings = Settings(text=text, top_k=top_k, window=WINDOW, decode_tokens=4, prompts=2,
                        prompt_tokens=8)
    return Explorer(template, reference, settings, params={"beta": beta}, options=OPTIONS,
                    cache_dir=cache, **kwargs)


def trio(large: Path, ft: Path, base: Path) -> Combination:
    return Combination({"large_base": large, "small_ft": ft, "small_base": base})


# -- an independent computation: each model alone, float64, full vocabulary -----------------
def alone_logprobs(paths: dict[str, Path], weights: dict[str, float], text: str
                   ) -> tuple[np.ndarray, np.ndarray]:
    """Mixed log-probs (positions, vocab) and the next tokens, each model evaluated alone."""
    mixed, targets = None, None
    for role, path in paths.items():
        model = backend.LlamaModel(path, n_ctx=256, n_threads=1)
        try:
            tokens = model.tokenize(text, add_bos=False, special=True)
            rows, nexts = [], []
            for i in range(0, len(tokens), WINDOW):
                chunk = tokens[i:i + WINDOW]
                if len(chunk) < 2:
                    continue
                model.rewind(0)
                logits = model.eval(chunk, all_logits=True).astype(np.float64)
                rows.append(logits[:-1])
                nexts += chunk[1:]
        finally:
            model.close()
        logits = np.concatenate(rows)
        logp = logits - np.log(np.exp(logits - logits.max(1, keepdims=True)).sum(
            1, keepdims=True)) - logits.max(1, keepdims=True)
        mixed = weights[role] * logp + (0 if mixed is None else mixed)
        targets = np.asarray(nexts)
    assert mixed is not None
    mixed = mixed - mixed.max(1, keepdims=True)
    return mixed - np.log(np.exp(mixed).sum(1, keepdims=True)), targets  # type: ignore


def test_kl_and_agreement_match_each_model_evaluated_alone(family, variants, tmp_path) -> None:
    ref = trio(family.large_base, family.small_ft, family.small_base)
    cand = trio(variants["large_base_q8"], family.small_ft, variants["small_base_q8"])
    ex = explorer(family.pairs(), ref, tmp_path / "cache")
    ex.prepare([cand])
    row = ex.run(cand)
    assert isinstance(row, Row), row
    weights = {"large_base": 1.0, "small_ft": 1.5, "small_base": -1.5}
    p, targets = alone_logprobs(dict(ref.files), weights, TEXT)
    q, _ = alone_logprobs(dict(cand.files), weights, TEXT)
    kl = (np.exp(p) * (p - q)).sum(1)
    assert row.quality.positions == len(kl)
    assert row.quality.kl_mean == pytest.approx(kl.mean(), abs=1e-4)
    assert row.quality.kl_p99 == pytest.approx(np.percentile(kl, 99), abs=1e-4)
    assert kl.mean() > 1e-4  # Q8_0 really moved the mix: the comparison is not vacuous
    agree = (p.argmax(1) == q.argmax(1)).mean()
    assert row.quality.top1_agreement == pytest.approx(agree, abs=1e-4)
    ppl = np.exp(-q[np.arange(len(targets)), targets].mean())
    assert row.quality.perplexity == pytest.approx(ppl, rel=1e-4)


def test_top_k_kl_is_the_coarsened_kl_and_never_above_the_full_one() -> None:
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(2, 50, 40)) * 3
    p, q = (x - np.log(np.exp(x).sum(1, keepdims=True)) for x in logits)
    full = (np.exp(p) * (p - q)).sum(1)
    for k in (1, 5, 40):
        ref = quality.top_k(p.astype(np.float32), k)
        got = quality.kl_topk(ref, q.astype(np.float32))
        ids = np.argsort(-p, axis=1)[:, :k]
        ps, qs = np.take_along_axis(p, ids, 1), np.take_along_axis(q, ids, 1)
        rest_p, rest_q = 1 - np.exp(ps).sum(1), 1 - np.exp(qs).sum(1)
        with np.errstate(divide="ignore", invalid="ignore"):
            coarse = (np.exp(ps) * (ps - qs)).sum(1) + np.where(
                rest_p > 1e-9, rest_p * np.log(np.maximum(rest_p, 1e-300) / rest_q), 0)
        assert got == pytest.approx(coarse, abs=1e-4)
        assert np.all(got <= full + 1e-4)
    assert got == pytest.approx(full, abs=1e-4)  # k = the whole vocabulary: exact


def test_a_combination_against_itself_has_kl_0_and_agreement_1(family, tmp_path) -> None:
    ref = trio(family.large_base, family.small_ft, family.small_base)
    first = explorer(family.pairs(), ref, tmp_path, top_k=16)
    first.prepare([ref])
    computed = first.run(ref)  # computes the reference, then compares with it
    again = explorer(family.pairs(), ref, tmp_path, top_k=16)
    again.prepare([ref])
    cached = again.run(ref)  # a fresh evaluation against the cached distributions
    assert again.ref_source == "cache"
    for row in (computed, cached):
        assert isinstance(row, Row) and row.is_reference
        assert row.quality.kl_mean == 0.0 and row.quality.kl_p99 == 0.0
        assert row.quality.top1_agreement == 1.0


def _loads(monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    """Record every model file llama.cpp loads with weights."""
    loaded: list[Path] = []
    real = backend.LlamaModel.__init__

    def spy(self, path, **kwargs):
        loaded.append(Path(path).resolve())
        real(self, path, **kwargs)

    monkeypatch.setattr(backend.LlamaModel, "__init__", spy)
    return loaded


def test_reference_cache_is_reused_and_invalidated(family, variants, tmp_path, monkeypatch
                                                   ) -> None:
    large = tmp_path / "large_reference.gguf"
    shutil.copyfile(family.large_base, large)
    ref = trio(large, family.small_ft, family.small_base)
    cand = trio(variants["large_base_q8"], family.small_ft, family.small_base)
    loaded = _loads(monkeypatch)
    cache = tmp_path / "cache"

    def explore_once(**kwargs) -> tuple[str, bool, float]:
        loaded.clear()
        ex = explorer(family.pairs(), ref, cache, top_k=32, **kwargs)
        ex.prepare([cand])
        row = ex.run(cand)
        assert isinstance(row, Row), row
        return ex.ref_source, large.resolve() in loaded, row.quality.kl_mean

    assert explore_once()[:2] == ("computed", True)
    source, reference_loaded, kl = explore_once()
    assert (source, reference_loaded) == ("cache", False)
    assert explore_once(text=TEXT + " more")[:2] == ("computed", True)
    assert explore_once(beta=0.5)[:2] == ("computed", True)
    assert explore_once()[:2] == ("cache", False)
    write_model(large, seed=11, n_embd=64)  # the same name, other weights
    source, reference_loaded, kl_new = explore_once()
    assert (source, reference_loaded) == ("computed", True)
    assert kl_new != kl


def test_incompatible_variant_is_skipped_and_the_others_finish(family, variants, tmp_path
                                                               ) -> None:
    text = tmp_path / "text.txt"
    text.write_text(TEXT)
    result = run(["explore", "-m", f"large_base={family.large_base}",
                  "-m", f"small_ft={family.small_ft}", "-m", f"small_ft={family.mismatched}",
                  "-m", f"small_base={family.small_base}",
                  "-m", f"small_base={variants['small_base_q8']}",
                  "--text", str(text), "--window", str(WINDOW), "--decode-tokens", "4",
                  "--threads", "1", "--cache-dir", str(tmp_path / "c"), "--json"])
    assert result.exit_code == 0, result.output
    out = json.loads(stdout(result))
    assert len(out["rows"]) == 2 and len(out["skipped"]) == 2
    for skipped in out["skipped"]:
        assert skipped["files"]["small_ft"] == str(family.mismatched)
        assert "incompatible" in skipped["reason"]
    assert "skipped mismatched" in result.stderr
    assert {r["files"]["small_ft"] for r in out["rows"]} == {str(family.small_ft)}
    assert any(r["is_reference"] and r["kl_mean"] == 0 for r in out["rows"])


def test_table_sorted_by_quality_with_pareto_marks(family, variants, tmp_path) -> None:
    text = tmp_path / "text.txt"
    text.write_text(TEXT)
    result = run(["explore", "-m", f"large_base={family.large_base}",
                  "-m", f"large_base={variants['large_base_q8']}",
                  "-m", f"small_ft={family.small_ft}", "-m", f"small_base={family.small_base}",
                  "--text", str(text), "--window", str(WINDOW), "--decode-tokens", "4",
                  "--threads", "1", "--cache-dir", str(tmp_path / "c")])
    assert result.exit_code == 0, result.output
    lines = [line for line in stdout(result).splitlines() if line.startswith("| ")]
    assert lines[0].startswith("|  | combination (large_base)")
    assert len(lines) == 3
    assert lines[1].startswith("| * | large_base (reference) | 0.00e+00 ")  # closest: Pareto
    assert "Q8_0" in lines[2]


def _row(kl: float, speed: float, memory: int) -> Row:
    q = quality.Quality(kl_mean=kl, kl_p99=kl, top1_agreement=1.0, perplexity=1.0,
                        positions=1)
    return Row(label=f"{kl}-{speed}-{memory}", files={}, quality=q, tokens_per_second=speed,
               speculative_tokens_per_second=None, first_token_seconds=0.0,
               model_bytes=memory, kv_bytes=0, rss_bytes=0)


def test_pareto_marks_rows_no_other_row_dominates() -> None:
    from eft_local.explore.explorer import mark_pareto

    rows = mark_pareto([_row(0.3, 30, 40), _row(0.0, 10, 100), _row(0.1, 20, 100),
                        _row(0.2, 15, 50), _row(0.3, 15, 60), _row(0.3, 40, 200),
                        _row(0.1, 20, 90), _row(0.4, 30, 40)])
    marks = {r.label: r.pareto for r in rows}
    assert [r.quality.kl_mean for r in rows] == [0.0, 0.1, 0.1, 0.2, 0.3, 0.3, 0.3, 0.4]
    assert marks == {"0.0-10-100": True,   # the closest
                     "0.1-20-100": False,  # 0.1-20-90: as close, as fast, smaller
                     "0.1-20-90": True,
                     "0.2-15-50": True,    # smaller than every row closer than it
                     "0.3-15-60": False,   # 0.2-15-50 is closer, as fast and smaller
                     "0.3-40-200": True,   # the fastest
                     "0.3-30-40": True,    # the smallest (with 0.4-30-40, which it beats)
                     "0.4-30-40": False}


def dominated_brute_force(points: list[tuple[float, float, float]], i: int) -> bool:
    """Some other row at least as good on every axis (KL lower, speed higher, memory lower)
    and strictly better on one."""
    k, s, m = points[i]
    for j, (k2, s2, m2) in enumerate(points):
        as_good = k2 <= k and s2 >= s and m2 <= m
        if j != i and as_good and (k2, s2, m2) != (k, s, m):
            return True
    return False


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.sampled_from([0.0, 1e-5, 0.1, 0.2, float("inf")]),
                          st.sampled_from([0.0, 10.0, 20.0, 30.0]),
                          st.sampled_from([40, 50, 100])), max_size=8))
def test_pareto_is_the_set_of_undominated_rows(points) -> None:
    assert quality.pareto(points) == [not dominated_brute_force(points, i)
                                      for i in range(len(points))]


def test_max_combinations_covers_every_file() -> None:
    cands = {"a": [Path("a1"), Path("a2"), Path("a3")], "b": [Path("b1"), Path("b2")],
             "c": [Path("c1")]}
    everything = combinations(cands)
    assert len(everything) == 6
    first = largest({r: [p] for r, p in [("a", Path("a3")), ("b", Path("b1")),
                                         ("c", Path("c1"))]})
    chosen = combinations(cands, first=first, limit=3)
    assert len(chosen) == 3
    assert chosen[0].key() == first.key()
    used = {p for c in chosen for p in c.files.values()}
    assert used == {p for paths in cands.values() for p in paths}
    assert len({c.key() for c in chosen}) == 3
    assert [c.label for c in everything][:2] == ["a1 / b1", "a1 / b2"]
    tags = combinations({"x": [Path("d/big.Q8_0.gguf"), Path("big.Q4_K_M.gguf"),
                               Path("big.gguf")], "y": [Path("small_ft.gguf")]})
    assert [c.label for c in tags] == ["Q8_0", "Q4_K_M", "big"]
    with pytest.raises(Exception, match="at least 3"):
        combinations(cands, limit=2)


POOL = [Path(f"m{i}.gguf") for i in range(7)]
"""File names the drawn candidates share, so that one path may serve several roles."""


@st.composite
def candidate_sets(draw: st.DrawFn) -> tuple[dict[str, list[Path]], Combination | None, int]:
    """Roles with 1-5 distinct files each (paths shared between roles), a ``first`` that is
    one of the combinations, none, or a foreign one, and a limit >= the widest role."""
    n_roles = draw(st.integers(1, 4))
    cands = {f"r{i}": draw(st.lists(st.sampled_from(POOL), min_size=1, max_size=5,
                                    unique=True)) for i in range(n_roles)}
    total = int(np.prod([len(v) for v in cands.values()]))
    kind = draw(st.sampled_from(["member", "none", "foreign"]))
    first = None
    if kind == "member":
        first = Combination({r: draw(st.sampled_from(v)) for r, v in cands.items()})
    elif kind == "foreign":
        first = Combination({r: Path("elsewhere.gguf") for r in cands})
    widest = max(len(v) for v in cands.values())
    return cands, first, draw(st.integers(widest, total + 2))


@settings(max_examples=300, deadline=None)
@given(candidate_sets())
@example(({"small_ft": [Path("ft.gguf"), Path("ft.Q8_0.gguf")],
           "small_base": [Path("base.gguf"), Path("base.Q6_K.gguf"), Path("base.Q4_K_M.gguf"),
                          Path("base.Q8_0.gguf")]},
          Combination({"small_ft": Path("ft.gguf"), "small_base": Path("base.gguf")}), 4))
def test_max_combinations_are_distinct_cover_every_file_and_lead_with_first(drawn) -> None:
    cands, first, limit = drawn
    total = int(np.prod([len(v) for v in cands.values()]))
    chosen = combinations(cands, first=first, limit=limit)
    assert len(chosen) == min(limit, total)
    assert len({c.key() for c in chosen}) == len(chosen)  # no combination twice
    for c in chosen:
        assert list(c.files) == list(cands)
        assert all(p in cands[r] for r, p in c.files.items())
    for role, files in cands.items():  # every file of every role
        assert {c.files[role] for c in chosen} == set(files)
    if first is not None and all(first.files[r] in v for r, v in cands.items()):
        assert chosen[0].key() == first.key()


@given(candidate_sets())
@settings(max_examples=50, deadline=None)
def test_max_combinations_below_the_widest_role_is_one_line(drawn) -> None:
    cands, first, _ = drawn
    widest = max(len(v) for v in cands.values())
    for limit in range(widest):
        with pytest.raises(EftError, match=f"at least {widest}") as info:
            combinations(cands, first=first, limit=limit)
        assert "\n" not in str(info.value)


def test_reference_defaults_to_the_largest_file_of_each_role(family, variants) -> None:
    cands = {"large_base": [variants["large_base_q8"], family.large_base],
             "small_ft": [family.small_ft]}
    assert largest(cands).files == {"large_base": family.large_base,
                                    "small_ft": family.small_ft}
    assert largest(cands, {"large_base": variants["large_base_q8"]}).files[
        "large_base"] == variants["large_base_q8"]


def test_default_text_follows_the_vocabulary(family) -> None:
    fam = backend.read_vocab(FAMILY_DIR / "small_ft.gguf")
    assert default_text(fam.texts) == FAMILY_TEXT
    assert default_text(backend.read_vocab(family.small_ft).texts) == ENGLISH_TEXT
    assert FAMILY_TEXT.is_file() and ENGLISH_TEXT.is_file()


def test_explore_with_a_preset_and_variants(family, variants, tmp_path, isolated_home) -> None:
    (isolated_home / "models.toml").write_text(f"""
[presets.mine]
formula = "up"
models.large_base = {{ path = "{family.large_base}" }}
models.small_ft = {{ path = "{family.small_ft}" }}
models.small_base = {{ path = "{family.small_base}" }}
""")
    text = tmp_path / "t.txt"
    text.write_text(TEXT)
    glob = str(Path(variants["small_ft_q8"]).parent / "small_*.Q8_0.gguf")
    result = run(["explore", "mine", "--variant", f"small_ft={glob}", "--text", str(text),
                  "--window", str(WINDOW), "--decode-tokens", "4", "--threads", "1",
                  "--cache-dir", str(tmp_path / "c"), "--json"])
    assert result.exit_code == 0, result.output
    rows = json.loads(stdout(result))["rows"]
    # the glob matched small_ft.Q8_0 and small_base.Q8_0: both are small_ft candidates
    assert len(rows) == 3
    assert_one_line_error(run(["explore", "mine", "--variant", f"nobody={glob}"]),
                          "no role 'nobody'")


@pytest.mark.parametrize("args, words", [
    (["-m", "large_base=/nowhere/*.gguf"], ["no file matches"]),
    (["-m", "large_base"], ["expected ROLE=PATH"]),
    (["--variant", "small_ft=x.gguf", "-m", "small_ft=a.gguf"], ["--variant goes with"]),
    (["-m", "a=x.gguf", "--plot", "out.jpg"], [".png or .svg"]),
    (["-m", "a=x.gguf", "-m", "a=y.gguf", "--max-combinations", "1"], ["at least 2"]),
])
def test_explore_bad_input_is_one_line(args: list[str], words: list[str]) -> None:
    assert_one_line_error(run(["explore", *args]), *words)


# -- quantize ---------------------------------------------------------------------------------
def test_quantize_writes_a_smaller_loadable_file(family, tmp_path) -> None:
    folder = tmp_path / "out"
    folder.mkdir()
    out = folder / "ft.q4.gguf"
    result = run(["quantize", str(family.small_base), str(out), "Q4_0"])
    assert result.exit_code == 0, result.output
    assert 0 < out.stat().st_size < family.small_base.stat().st_size
    model = backend.LlamaModel(out, n_threads=1)
    try:
        assert model.eval([5, 6], all_logits=True).shape[0] == 2
    finally:
        model.close()
    assert [p.name for p in folder.iterdir()] == ["ft.q4.gguf"]  # no temporary file left


@pytest.mark.parametrize("kind, extra, words", [
    ("Q9_9", [], ["unknown quantization type 'Q9_9'", "Q4_K_M"]),
    ("q8_0", ["--threads", "-1"], ["--threads"]),
])
def test_quantize_bad_type_is_one_line(family, tmp_path, kind, extra, words) -> None:
    folder = tmp_path / "out"
    folder.mkdir()
    result = run(["quantize", str(family.small_base), str(folder / "x.gguf"), kind, *extra])
    assert_one_line_error(result, *words)
    assert list(folder.iterdir()) == []


def test_quantize_refuses_requantizing_unless_allowed(family, variants, tmp_path) -> None:
    folder = tmp_path / "out"
    folder.mkdir()
    out = folder / "again.gguf"
    result = run(["quantize", str(variants["small_ft_q8"]), str(out), "q4_0"])
    assert_one_line_error(result, "already quantized (q8_0)", "--allow-requantize")
    assert list(folder.iterdir()) == []
    result = run(["quantize", str(variants["small_ft_q8"]), str(out), "q4_0",
                  "--allow-requantize"])
    assert result.exit_code == 0, result.output
    assert [p.name for p in folder.iterdir()] == ["again.gguf"]


@pytest.mark.parametrize("target", ["missing/x.gguf", "", "same"])
def test_quantize_bad_output_is_one_line(family, tmp_path, target) -> None:
    folder = tmp_path / "out"
    folder.mkdir()
    src = folder / "src.gguf"
    shutil.copyfile(family.small_ft, src)
    dst = {"missing/x.gguf": folder / "missing" / "x.gguf", "": folder, "same": src}[target]
    assert_one_line_error(run(["quantize", str(src), str(dst), "q8_0"]), str(dst))
    assert [p.name for p in folder.iterdir()] == ["src.gguf"]
    assert src.read_bytes() == family.small_ft.read_bytes()


def test_skipped_is_a_record_not_an_exception(family, tmp_path) -> None:
    ref = trio(family.large_base, family.small_ft, family.small_base)
    ex = explorer(family.pairs(), ref, tmp_path)
    broken = trio(family.large_base, family.corrupt, family.small_base)
    out = ex.run(broken)
    assert isinstance(out, Skipped) and "corrupt.gguf" in out.reason


def test_questions_run_the_eval_scorer_per_combination(family, variants, tmp_path) -> None:
    from eft_local.evaluate import Target, load_questions, run_target
    from eft_local.sampler import SamplerSettings
    from eft_local.session import Session

    text = tmp_path / "text.txt"
    text.write_text(TEXT)
    questions = tmp_path / "q.jsonl"
    questions.write_text('{"prompt": "hello", "expected": "there"}\n'
                         '{"prompt": "the hill", "expected": "north"}\n')
    args = ["explore", "-m", f"large_base={family.large_base}",
            "-m", f"large_base={variants['large_base_q8']}",
            "-m", f"small_ft={family.small_ft}", "-m", f"small_base={family.small_base}",
            "--text", str(text), "--window", str(WINDOW), "--decode-tokens", "4",
            "--threads", "1", "--cache-dir", str(tmp_path / "c"), "--questions",
            str(questions)]
    result = run([*args, "--json"])
    assert result.exit_code == 0, result.output
    rows = json.loads(stdout(result))["rows"]
    for row in rows:  # the same scores as eval's scorer on a session of those files
        preset = preset_from_paths([f"{r}={p}" for r, p in row["files"].items()])
        with Session(preset, sampling=SamplerSettings(temperature=0.0),
                     options=OPTIONS) as session:
            score = run_target(session, Target("x", preset), load_questions(questions),
                               max_tokens=24, decline_text=None, multi_turn=False)
        assert (row["accuracy"], row["format_rate"]) == (score.accuracy, score.format_rate)
    table = stdout(run(args))
    assert table.splitlines()[0].endswith("| accuracy | format |")


def test_a_text_too_short_fails_in_one_line_naming_it(family, tmp_path) -> None:
    text = tmp_path / "short.txt"
    text.write_text("a")
    result = run(["explore", "-m", f"m={family.small_ft}", "-m", f"m={family.small_base}",
                  "--text", str(text), "--threads", "1", "--cache-dir", str(tmp_path / "c")])
    assert_one_line_error(result, str(text), "1 token(s)", "reference")
