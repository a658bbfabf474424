"""models.toml: the shipped presets, a user file over them, and errors that say where."""

from __future__ import annotations

from pathlib import Path

import pytest

from eft_local.errors import EftError
from eft_local.formula import PARAMETERS, parse_formula
from eft_local.presets import (
    FAMILY_DIR,
    default_conservative_role,
    load_config,
    preset_from_paths,
    shipped_config_path,
    user_config_path,
)


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def test_shipped_presets_parse_and_default_is_the_bundled_up_scaling() -> None:
    config = load_config(user=Path("/nonexistent/models.toml"))
    preset = config.get(None)
    assert preset.name == "tiny-up"
    assert preset.formula.roles == ("large_base", "small_ft", "small_base")
    assert all(spec.path.parent == FAMILY_DIR for spec in preset.models.values())
    assert config.get("tiny-down").template_role == "large_ft"
    qwen = config.get("qwen2.5-up").models["small_base"]
    assert qwen.hf_repo and qwen.hf_file.endswith(".gguf") and qwen.path is None
    assert shipped_config_path().is_file()


def test_user_file_adds_and_overrides(tmp_path: Path) -> None:
    user = write(tmp_path / "user.toml", """
default = "mine"
[presets.mine]
formula = "large_base + beta * (chat - base)"
beta = 1.5
ft_role = "chat"
[presets.mine.models]
large_base = { path = "big.gguf", n_gpu_layers = 0, n_ctx = 1024 }
chat = "chat.gguf"
base = { path = "/abs/base.gguf" }
[presets.tiny-up]
formula = "small_ft"
[presets.tiny-up.models]
small_ft = { path = "x.gguf" }
""")
    config = load_config(user=user)
    mine = config.get(None)
    assert mine.name == "mine" and mine.params["beta"] == 1.5
    assert mine.models["large_base"].path == tmp_path / "big.gguf"
    assert mine.models["large_base"].n_ctx == 1024
    assert mine.models["chat"].path == tmp_path / "chat.gguf"
    assert mine.models["base"].path == Path("/abs/base.gguf")
    assert config.get("tiny-up").formula.text == "small_ft"
    assert config.files[-1] == user


def test_env_var_points_at_the_user_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                                         ) -> None:
    monkeypatch.setenv("EFT_LOCAL_CONFIG", str(tmp_path / "custom.toml"))
    assert user_config_path() == tmp_path / "custom.toml"
    with pytest.raises(EftError, match="custom.toml: config file not found"):
        load_config()
    monkeypatch.delenv("EFT_LOCAL_CONFIG")
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path))
    assert user_config_path() == tmp_path / "eft-local" / "models.toml"


@pytest.mark.parametrize("body,message", [
    ("default = 3", "'default' must be a preset name"),
    ("colour = 1", "unknown top-level key 'colour'"),
    ("[presets.p]\nformula='up'", "needs a [presets.p.models] table"),
    ("[presets.p]\nfoo=1\n[presets.p.models]\na='a.gguf'", "preset 'p': unknown key 'foo'"),
    ("[presets.p]\nformula='a*b'\n[presets.p.models]\na='a.gguf'\nb='b.gguf'", "not linear"),
    ("[presets.p]\nformula='a+c'\n[presets.p.models]\na='a.gguf'", "role 'c'"),
    ("[presets.p]\nbeta='x'\nformula='a'\n[presets.p.models]\na='a.gguf'",
     "beta must be a number"),
    ("[presets.p]\nformula='a'\n[presets.p.models]\na={path='a', hf='b'}",
     "model 'a': give exactly one of path, bundled, hf or url"),
    ("[presets.p]\nformula='a'\n[presets.p.models]\na={hf='o/r'}", "needs file ="),
    ("[presets.p]\nformula='a'\n[presets.p.models]\na={path='a', n_ctx=-5}",
     "n_ctx must be an integer in [0, "),
    ("[presets.p]\nformula='a'\n[presets.p.models]\na={path='a', n_threads=true}",
     "n_threads must be an integer in [1, "),
    ("[presets.p]\nformula='a'\nft_role='z'\n[presets.p.models]\na='a.gguf'",
     "ft_role 'z' is not one of its models"),
    ("default = 'nope'", "default preset 'nope' is not defined"),
    ("[presets.p\n", "invalid TOML"),
])
def test_bad_config_errors_name_file_and_key(tmp_path: Path, body: str, message: str) -> None:
    user = write(tmp_path / "bad.toml", body)
    with pytest.raises(EftError) as err:
        load_config(user=user)
    assert message in str(err.value)
    assert "bad.toml" in str(err.value)
    assert "\n" not in str(err.value)


def test_unknown_preset_lists_known_ones() -> None:
    with pytest.raises(EftError, match=r"unknown preset 'nope' \(known: .*tiny-up"):
        load_config(user=Path("/nonexistent.toml")).get("nope")


def test_models_from_the_command_line() -> None:
    p = preset_from_paths(["large_base=a.gguf", "small_ft=b.gguf", "small_base=c.gguf"])
    assert p.formula.text.startswith("large_base + beta") and p.template_role == "small_ft"
    single = preset_from_paths(["chat=x.gguf"])
    assert single.formula.roles == ("chat",) and single.template_role == "chat"
    custom = preset_from_paths(["a=1.gguf", "b_ft=2.gguf"], formula="a + 0.5*b_ft")
    assert custom.template_role == "b_ft"
    for bad, message in [(["nopath"], "expected ROLE=PATH"), (["a=x", "a=y"], "given twice"),
                         (["a b=x"], "plain name"), (["a=x", "b=y"], "give --formula")]:
        with pytest.raises(EftError, match=message):
            preset_from_paths(bad)


def test_role_keys_default_alias_and_explicit(tmp_path: Path) -> None:
    config = load_config(user=Path("/nonexistent.toml"))
    down = config.get("tiny-down")
    assert (down.template_role, down.draft_role, down.conservative_role) == (
        "large_ft", None, None)  # draft and conservative follow the knobs
    user = write(tmp_path / "user.toml", """
[presets.old]
formula = "large_base + beta * (chat - base)"
ft_role = "chat"
[presets.old.models]
large_base = "big.gguf"
chat = "chat.gguf"
base = "base.gguf"
[presets.new]
formula = "up"
template_role = "large_base"
draft_role = "small_base"
conservative_role = "small_ft"
[presets.new.models]
large_base = "big.gguf"
small_ft = "chat.gguf"
small_base = "base.gguf"
""")
    config = load_config(user=user)
    old, new = config.get("old"), config.get("new")
    assert (old.template_role, old.draft_role, old.conservative_role) == ("chat", None, "chat")
    assert (new.template_role, new.draft_role, new.conservative_role) == (
        "large_base", "small_base", "small_ft")


@pytest.mark.parametrize("line,message", [
    ("draft_role = 'z'", "preset 'p': draft_role 'z' is not one of its models (a, b_ft)"),
    ("conservative_role = 3", "preset 'p': conservative_role 3 is not one of its models"),
    ("template_role = 'zz'", "preset 'p': template_role 'zz' is not one of its models"),
    ("template_role = 'a'\nft_role = 'a'", "give template_role or its old name ft_role"),
])
def test_bad_role_keys_name_file_preset_and_key(tmp_path: Path, line: str, message: str
                                                ) -> None:
    user = write(tmp_path / "bad.toml",
                 f"[presets.p]\nformula='a + b_ft'\n{line}\n[presets.p.models]\n"
                 "a='a.gguf'\nb_ft='b.gguf'\n")
    with pytest.raises(EftError) as err:
        load_config(user=user)
    assert message in str(err.value) and "bad.toml" in str(err.value)


@pytest.mark.parametrize("formula,params,expected", [
    ("up", {}, "small_ft"),
    ("down", {}, "large_ft"),
    ("amplified", {"beta": 1.5}, "small_ft"),
    ("interpolate", {"lam": 0.5}, "small_ft"),
    ("interpolate", {"lam": 0.0}, "small_ft_alt"),
    ("large_base + beta * (chat - base)", {}, "chat"),
    ("large_ft", {}, "large_ft"),
])
def test_default_conservative_role_is_the_fine_tuned_model_of_the_delta(
        formula: str, params: dict, expected: str) -> None:
    f = parse_formula(formula)
    assert default_conservative_role(f, {**PARAMETERS, **params}) == expected
