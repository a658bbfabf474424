"""The eft-local command line: generate, check, models, pull, and every bad input."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from click.testing import CliRunner

from eft_local import __version__
from eft_local import presets as config
from eft_local.cli.main import main
from tests.clihelp import THREADS, api_session, assert_one_line_error, run, stdout, write_presets

GREEDY = ["-t", "0", "--max-tokens", "6", *THREADS]


@pytest.fixture
def presets(family, isolated_home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
            ) -> Path:
    """Only our own presets: an empty shipped file and a user file naming the family."""
    shipped = tmp_path / "shipped.toml"
    shipped.write_text("")
    monkeypatch.setattr(config, "shipped_config_path", lambda: shipped)
    user = isolated_home / "models.toml"
    write_presets(user, f"""
default = "tiny"

[presets.tiny]
description = "the test trio"
formula = "up"
beta = 1.5
models.large_base = {{ path = "{family.large_base}" }}
models.small_ft = {{ path = "{family.small_ft}" }}
models.small_base = {{ path = "{family.small_base}" }}

[presets.partial]
description = "one file is missing"
models.large_base = {{ path = "{tmp_path / 'nowhere.gguf'}" }}
models.small_ft = {{ path = "{family.small_ft}" }}
models.small_base = {{ hf = "nobody/nothing-GGUF", file = "nothing.gguf" }}

[presets.clash]
models.large_base = {{ path = "{family.large_base}" }}
models.small_ft = {{ path = "{family.mismatched}" }}
models.small_base = {{ path = "{family.small_base}" }}
""")
    return user


def test_version() -> None:
    result = run(["--version"])
    assert result.exit_code == 0
    assert stdout(result) == f"eft-local, version {__version__}\n"


# -- generate --------------------------------------------------------------------------------
def test_generate_prompt_argument_is_one_chat_turn(family) -> None:
    result = run(["generate", *family.trio(), *GREEDY, "Hello there"])
    assert result.exit_code == 0, result.output
    with api_session(family.pairs(), temperature=0) as s:
        expected = s.generate("Hello there", raw=False, max_tokens=6).text
    assert stdout(result) == expected + "\n"


def test_generate_is_quiet_by_default_and_says_more_with_verbose(family) -> None:
    args = ["generate", *family.trio(), "--threads", "2", "--max-tokens", "2", "hello"]
    first = run(args)  # measures the decode schedule: one note, nothing else
    assert first.exit_code == 0, first.output
    assert [line.split(":")[0] for line in first.stderr.splitlines()] == ["note"]
    again = run(args)  # the schedule is cached: not a word
    assert again.exit_code == 0 and again.stderr == ""
    verbose = run([*args, "-v"])
    lines = verbose.stderr.splitlines()
    assert any(line.startswith("loading large_base: ") for line in lines), lines
    assert any(line.startswith("schedule ") for line in lines), lines


def test_generate_raw_prompt_from_stdin_with_seed(family) -> None:
    args = ["generate", *family.trio(), "--raw", "--seed", "7", "--top-k", "20",
            "--max-tokens", "6", *THREADS]
    result = run(args, input="Once upon a time\n")  # as `echo` would pipe it
    assert result.exit_code == 0, result.output
    with api_session(family.pairs(), seed=7, top_k=20) as s:
        expected = s.generate("Once upon a time", raw=True, max_tokens=6).text
    assert stdout(result) == expected + "\n"


def test_generate_says_when_the_context_is_full(family) -> None:
    result = run(["generate", *family.trio(), *THREADS, "--raw", "--max-tokens", "50",
                  "x" * 250])
    assert result.exit_code == 0, result.output
    assert result.stderr.splitlines()[-1] == (
        "note: stopped because the context (256 tokens) is full")


def test_generate_with_beta_and_system(family) -> None:
    result = run(["generate", *family.trio(), *GREEDY, "--beta", "2", "--system", "Be brief",
                  "Hi"])
    assert result.exit_code == 0, result.output
    with api_session(family.pairs(), temperature=0) as s:
        s.set_param("beta", 2.0)
        expected = s.generate("Hi", raw=False, system="Be brief", max_tokens=6).text
    assert stdout(result) == expected + "\n"


@pytest.mark.parametrize("extra", [["--no-speculative"], ["--draft-k", "3"],
                                   ["--schedule", "lanes"]])
def test_decoding_switches_give_the_same_text(family, extra: list[str]) -> None:
    args = ["generate", *family.trio(), "--seed", "11", "--max-tokens", "12", *THREADS, "Hi"]
    plain = run(args)
    switched = run([*args, *extra])
    assert switched.exit_code == 0, switched.output
    assert stdout(switched) == stdout(plain) != "\n"


def test_every_option_reaches_the_library(monkeypatch, tmp_path) -> None:
    from eft_local import session
    from eft_local.errors import EftError
    from eft_local.sampler import SamplerSettings

    seen: dict = {}

    def fake_load_session(preset, **kwargs):
        seen.update(kwargs, preset=preset)
        raise EftError("stop here")

    monkeypatch.setattr(session, "load_session", fake_load_session)
    result = run(["chat", "-m", "small_ft=a.gguf", "-m", "x=b.gguf", "--formula", "small_ft",
                  "--beta", "0.5", "--lambda", "0.3", "--temperature", "0.7", "--top-p", "0.9",
                  "--top-k", "40", "--min-p", "0.05", "--conservative-top-p", "0.8",
                  "--seed", "9", "--n-ctx", "512", "--threads", "2", "--gpu-layers", "0",
                  "--no-speculative", "--draft-k", "4", "--schedule", "lanes",
                  "--repeat-penalty", "1.1", "--repeat-last-n", "-1", "--frequency-penalty",
                  "0.5", "--presence-penalty", "-0.5", "--dry-multiplier", "0.8", "--dry-base",
                  "2", "--dry-allowed-length", "3", "--dry-penalty-last-n", "128",
                  "--dry-sequence-breaker", "\n", "--dry-sequence-breaker", "##",
                  "--logit-bias", "15=-100", "--logit-bias", "7=-inf"])
    assert_one_line_error(result, "stop here")
    assert seen["preset"] is None
    assert seen["models"] == ("small_ft=a.gguf", "x=b.gguf")
    assert seen["formula"] == "small_ft"
    assert seen["params"] == {"beta": 0.5, "lam": 0.3}
    assert seen["sampling"] == SamplerSettings(
        temperature=0.7, top_p=0.9, top_k=40, min_p=0.05, conservative_top_p=0.8, seed=9,
        repeat_penalty=1.1, repeat_last_n=-1, frequency_penalty=0.5, presence_penalty=-0.5,
        dry_multiplier=0.8, dry_base=2.0, dry_allowed_length=3, dry_penalty_last_n=128,
        dry_sequence_breakers=("\n", "##"), logit_bias={15: -100, 7: -math.inf})
    assert seen["options"] == session.LoadOptions(n_ctx=512, n_threads=2, n_gpu_layers=0,
                                                  parallel=True, speculative=False, draft_k=4,
                                                  schedule="lanes")
    seen.clear()
    (tmp_path / "in.jsonl").write_text('{"prompt": "hi"}\n')
    result = run(["generate", "--input", str(tmp_path / "in.jsonl"), "-np", "3"])
    assert_one_line_error(result, "stop here")
    assert seen["options"].n_seq == 3


def test_the_retired_sequential_flag_says_what_replaced_it(tmp_path) -> None:
    """Issue 23: --parallel/--sequential only repeated --schedule; -np/--parallel N now sets
    the sequences at once."""
    result = run(["chat", "--sequential"])
    assert_one_line_error(result, "--sequential is retired", "--schedule sequential",
                          "-np/--parallel")
    assert_one_line_error(run(["generate", "-np", "2", "hello"]), "-np/--parallel needs --input")
    assert_one_line_error(run(["serve", "-np", "0"]), "-np")


def test_help_lists_every_command() -> None:
    result = run(["--help"])
    assert result.exit_code == 0
    listed = [line.split()[0] for line in stdout(result).split("Commands:")[1].splitlines()
              if line.strip()]
    assert {"chat", "check", "generate", "models", "pull"} <= set(listed)
    assert listed == sorted(listed)
    assert "unavailable" not in stdout(result)


def test_a_command_that_cannot_be_imported_fails_in_one_line(monkeypatch) -> None:
    monkeypatch.setitem(main.lazy, "ghost", "eft_local.no_such_module:ghost")
    monkeypatch.delitem(main.commands, "ghost", raising=False)
    try:
        assert "ghost" in stdout(run(["--help"]))
        assert_one_line_error(run(["ghost", "--anything"]), "'ghost' is unavailable",
                              "no_such_module")
    finally:
        main.commands.pop("ghost", None)


def test_generate_json_diagnostics(family) -> None:
    result = run(["generate", *family.trio(), "--json", "--seed", "3", "--max-tokens", "8",
                  *THREADS, "Hi"])
    assert result.exit_code == 0, result.output
    record = json.loads(stdout(result))
    with api_session(family.pairs(), seed=3) as s:
        expected = s.generate("Hi", raw=False, max_tokens=8, diagnostics=True)
        texts = [s.token_text(step.token) for step in expected.steps]
    assert record["text"] == expected.text
    assert record["finish"] == expected.finish
    assert record["prompt_tokens"] == expected.prompt_tokens
    assert record["formula"] == "1*large_base + 1*small_ft - 1*small_base"
    assert [t["token"] for t in record["tokens"]] == [st.token for st in expected.steps]
    assert [t["text"] for t in record["tokens"]] == texts
    for tok, step in zip(record["tokens"], expected.steps, strict=True):
        assert set(tok["p_models"]) == {"large_base", "small_ft", "small_base"}
        assert tok["p_mix"] == pytest.approx(step.p_mix)
        assert tok["p_models"] == pytest.approx(dict(step.p_models))
        assert tok["differs"] == (step.ref_token != step.token)
        assert tok["ref_token"] == step.ref_token


def test_generate_preset_and_prompt(presets, family) -> None:
    both = run(["generate", "tiny", "Hi", *GREEDY])
    only_prompt = run(["generate", "Hi", *GREEDY])  # not a preset name: the default preset
    only_preset = run(["generate", "tiny", *GREEDY], input="Hi")
    with api_session(family.pairs(), temperature=0) as s:
        s.set_param("beta", 1.5)
        expected = s.generate("Hi", raw=False, max_tokens=6).text + "\n"
    assert stdout(both) == stdout(only_prompt) == stdout(only_preset) == expected


# -- check -----------------------------------------------------------------------------------
def test_check_aligned_trio(family) -> None:
    result = run(["check", *family.trio()])
    assert result.exit_code == 0, result.output
    out = stdout(result)
    assert out.splitlines()[-1] == "verdict: aligned"
    assert f"  small_ft: {family.small_ft}" in out


def test_check_three_plain_paths_are_the_upscaling_roles(family) -> None:
    result = run(["check", str(family.large_base), str(family.padded), str(family.small_base)])
    assert result.exit_code == 0, result.output
    out = stdout(result)
    assert out.startswith(f"preset: command-line\n  large_base: {family.large_base}\n"
                          f"  small_ft: {family.padded}\n  small_base: {family.small_base}\n")
    assert "small_ft: 29 rows beyond the common range (masked)" in out
    assert out.splitlines()[-1] == "verdict: aligned on a common range"


def test_check_plain_paths_common_range(family) -> None:
    result = run(["check", str(family.small_ft), str(family.padded)])
    assert result.exit_code == 0, result.output
    out = stdout(result)
    assert "model2: 29 rows beyond the common range (masked)" in out
    assert out.splitlines()[-1] == "verdict: aligned on a common range"


def test_check_incompatible_exits_1(family) -> None:
    result = run(["check", str(family.small_ft), str(family.mismatched)])
    assert result.exit_code == 1
    out = stdout(result)
    assert out.splitlines()[-1] == "verdict: incompatible"
    assert "id 60:" in out


def test_check_json_and_preset(presets, family) -> None:
    result = run(["check", "clash", "--json"])
    assert result.exit_code == 1
    report = json.loads(stdout(result))
    assert report["preset"] == "clash"
    assert report["verdict"] == "incompatible"
    assert report["normal_mismatches"] == 2
    assert set(report["models"]) == {"large_base", "small_ft", "small_base"}
    assert run(["check"]).exit_code == 0  # the default preset: tiny


# -- models and pull -------------------------------------------------------------------------
def test_models_lists_presets_with_local_state(presets, family, tmp_path) -> None:
    result = run(["models"])
    assert result.exit_code == 0, result.output
    lines = stdout(result).splitlines()
    assert lines[0] == "tiny (default): the test trio"
    assert lines[1] == ("  formula: large_base + beta * (small_ft - small_base)"
                        "  = 1*large_base + 1.5*small_ft - 1.5*small_base")
    size = family.large_base.stat().st_size / 2**10
    from eft_local.backend import LlamaModel
    from eft_local.limits import size_text

    loaded = LlamaModel(family.large_base)  # the KV per slot that loading estimates
    kv, n_ctx = size_text(loaded.kv_bytes_per_seq), loaded.n_ctx
    loaded.close()
    assert lines[2] == (f"  large_base  {family.large_base}  [present, {size:.1f} KiB, "
                        f"KV {kv} per slot at n_ctx {n_ctx}]")
    assert f"  large_base  {tmp_path / 'nowhere.gguf'}  [missing]" in lines
    assert "  small_base  hf:nobody/nothing-GGUF/nothing.gguf  [missing]" in lines
    assert any(line.startswith("clash: ") or line == "clash" for line in lines)


def _put_in_hub_cache(repo: str, filename: str, data: bytes) -> Path:
    """Lay a file out the way huggingface_hub's cache does (refs/main -> snapshot)."""
    from huggingface_hub import constants

    root = Path(constants.HF_HUB_CACHE) / f"models--{repo.replace('/', '--')}"
    commit = "0" * 40
    (root / "refs").mkdir(parents=True, exist_ok=True)
    (root / "refs" / "main").write_text(commit)
    snap = root / "snapshots" / commit
    snap.mkdir(parents=True, exist_ok=True)
    (snap / filename).write_bytes(data)
    return snap / filename


def test_pull_uses_the_cache_and_never_the_network(presets, family, monkeypatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    write_presets(presets, f"""
[presets.hub]
formula = "small_ft + beta * (small_ft - small_base)"
models.small_ft = {{ path = "{family.small_ft}" }}
models.small_base = {{ hf = "tests/cached-GGUF", file = "sb.gguf" }}
""")
    missing = run(["pull", "hub"])
    assert_one_line_error(missing, "small_base", "not downloaded yet", "HF_HUB_OFFLINE")
    cached = _put_in_hub_cache("tests/cached-GGUF", "sb.gguf", family.small_base.read_bytes())
    result = run(["pull", "hub"])
    assert result.exit_code == 0, result.output
    assert f"small_base: present ({cached}" in stdout(result)
    listing = stdout(run(["models"]))
    assert "hf:tests/cached-GGUF/sb.gguf  [present" in listing


def test_pull_missing_local_file_fails_before_any_download(presets, monkeypatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert_one_line_error(run(["pull", "partial"]), "nowhere.gguf", "nothing to download")


# -- bad input: one line on stderr, non-zero exit, never a traceback --------------------------
def _bad_cases(family) -> dict[str, tuple[list[str], str | None, tuple[str, ...]]]:
    trio = family.trio()
    return {
        "missing file": (["generate", "-m", "small_ft=/nonexistent/x.gguf", "Hi"], None,
                         ("not found",)),
        "corrupt file": (["generate", "-m", f"small_ft={family.corrupt}", "Hi"], None,
                         ("corrupt.gguf",)),
        "not a gguf": (["check", str(family.not_gguf)], None, ("not a GGUF file",)),
        "bad --model": (["generate", "-m", "small_ft", "Hi"], None, ("ROLE=PATH",)),
        "roles without formula": (["generate", "-m", f"a={family.small_ft}",
                                   "-m", f"b={family.small_base}", "Hi"], None, ("--formula",)),
        "bad formula": (["generate", *trio, "--formula", "small_ft * small_base", "Hi"], None,
                        ("not linear",)),
        "nan temperature": (["generate", *trio, "-t", "nan", "Hi"], None, ("--temperature",)),
        "negative temperature": (["generate", *trio, "-t", "-1", "Hi"], None,
                                 ("--temperature",)),
        "top-p above 1": (["generate", *trio, "--top-p", "1.5", "Hi"], None, ("--top-p",)),
        "top-p zero": (["generate", *trio, "--top-p", "0", "Hi"], None, ("(0, 1]",)),
        "min-p one": (["chat", *trio, "--min-p", "1"], "", ("--min-p",)),
        "infinite beta": (["chat", *trio, "--beta", "inf"], "", ("--beta",)),
        "zero max tokens": (["generate", *trio, "--max-tokens", "0", "Hi"], None,
                            ("--max-tokens",)),
        "unknown option": (["generate", "--frobnicate", "Hi"], None, ("--frobnicate",)),
        "unknown preset": (["chat", "nonesuch"], "", ("unknown preset 'nonesuch'",)),
        "preset and --model": (["generate", "tiny", "Hi", *trio], None, ("not both",)),
        "prompt too long": (["generate", *trio, *THREADS, "--raw", "x" * 300], None,
                            ("300 tokens", "context")),
        "empty stdin prompt": (["generate", *trio, *THREADS], "  \n", ("empty prompt",)),
        "incompatible models": (["generate", "-m", f"large_base={family.large_base}",
                                 "-m", f"small_ft={family.mismatched}",
                                 "-m", f"small_base={family.small_base}", "Hi"], None,
                                ("incompatible",)),
        "missing input file": (["generate", *trio, "--input", "/nonexistent/in.jsonl"], None,
                               ("input file not found",)),
        "input is a directory": (["generate", *trio, "--input", str(family.corrupt.parent)],
                                 None, ("is a directory",)),
        "output in missing dir": (["generate", *trio, "--input", str(family.not_gguf),
                                   "--output", "/nonexistent/dir/out.jsonl"], None,
                                  ("does not exist",)),
        "output without input": (["generate", *trio, "--output", "out.jsonl", "Hi"], None,
                                 ("--input",)),
        "check: incompatible args": (["check", str(family.small_ft), "-m", "a=b.gguf"], None,
                                     ("not both",)),
        "zero repeat penalty": (["generate", *trio, "--repeat-penalty", "0", "Hi"], None,
                                ("--repeat-penalty",)),
        "frequency penalty above 2": (["generate", *trio, "--frequency-penalty", "3", "Hi"],
                                      None, ("--frequency-penalty", "[-2, 2]")),
        "bad logit bias": (["generate", *trio, "--logit-bias", "15:-100", "Hi"], None,
                           ("--logit-bias", "ID=BIAS")),
        "logit bias too large": (["generate", *trio, "--logit-bias", "15=500", "Hi"], None,
                                 ("--logit-bias", "[-100, 100]")),
        "logit bias beyond the vocabulary": (["generate", *trio, *THREADS, "--logit-bias",
                                              "99999=1", "Hi"], None,
                                             ("logit_bias", "99999", "outside the vocabulary")),
    }


BAD_CASES = [
    "missing file", "corrupt file", "not a gguf", "bad --model", "roles without formula",
    "bad formula", "nan temperature", "negative temperature", "top-p above 1", "top-p zero",
    "min-p one", "infinite beta", "zero max tokens", "unknown option", "unknown preset",
    "preset and --model", "prompt too long", "empty stdin prompt", "incompatible models",
    "missing input file", "input is a directory", "output in missing dir", "output without input",
    "check: incompatible args", "zero repeat penalty", "frequency penalty above 2",
    "bad logit bias", "logit bias too large", "logit bias beyond the vocabulary",
]


def test_bad_case_list_is_complete(family) -> None:
    assert sorted(BAD_CASES) == sorted(_bad_cases(family))


@pytest.mark.parametrize("case", BAD_CASES)
def test_bad_input_is_one_line(case: str, presets, family) -> None:
    args, stdin, words = _bad_cases(family)[case]
    result = run(args, input=stdin)
    assert_one_line_error(result, *words)
    assert stdout(result) == ""


def test_invalid_utf8_on_stdin_is_one_line_naming_the_offset(family) -> None:
    result = CliRunner().invoke(main, ["generate", *family.trio(), *THREADS],
                                input=b"caf\xe9 hi")
    assert_one_line_error(result, "stdin is not valid UTF-8", "byte 0xe9 at offset 3")
    assert "loading" not in result.stderr  # refused before any model loads
