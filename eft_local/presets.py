"""Presets: ``models.toml`` (shipped) plus an optional user file, as frozen dataclasses.

Everything is validated once, here; errors name the file, the preset and the key.
"""

from __future__ import annotations

import math
import os
import re
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlsplit, urlunsplit

from eft_local.errors import EftError
from eft_local.files import read_user_text
from eft_local.formula import PARAMETERS, Formula, parse_formula
from eft_local.limits import N_CTX_MAX, N_GPU_LAYERS_MAX, PARAM_LIMIT, max_threads

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

PACKAGE_DIR = Path(__file__).resolve().parent
FAMILY_DIR = PACKAGE_DIR / "family"
ENV_CONFIG = "EFT_LOCAL_CONFIG"
_LOAD_KEYS = {"n_ctx": (0, N_CTX_MAX), "n_gpu_layers": (-1, N_GPU_LAYERS_MAX),
              "n_threads": (1, None), "n_batch": (1, N_CTX_MAX)}
"""Load options per model: (lowest, highest) value; None: max_threads() on this machine."""
ROLE_KEYS = ("template_role", "draft_role", "conservative_role")
"""What a role does besides its weight: chat template, tokenizer and stop tokens; drafting
for speculative decoding; the reference of conservative decoding."""
_PRESET_KEYS = {"description", "formula", "models", "ft_role", "chat_template", *ROLE_KEYS,
                *PARAMETERS}


@dataclass(frozen=True)
class ModelSpec:
    """Where one role's model comes from, and how to load it.

    Exactly one source: ``path`` (a local file), ``hf_repo`` + ``hf_file`` (+ revision), or
    ``url`` (an engine serving it: ``api`` llama-server, openai or eft-local, detected when
    None; ``model`` the name it serves it under; ``top_k`` log-probs per position asked
    of engines that give only the top K; ``api_key_env`` the environment variable holding
    its key; ``timeout`` seconds to wait for an answer). Load options left as None take the
    runtime's defaults.
    """

    role: str
    path: Path | None = None
    hf_repo: str | None = None
    hf_file: str | None = None
    revision: str | None = None
    n_ctx: int | None = None
    n_gpu_layers: int | None = None
    n_threads: int | None = None
    n_batch: int | None = None
    url: str | None = None
    api: str | None = None
    model: str | None = None
    top_k: int | None = None
    api_key_env: str | None = None
    timeout: float | None = None

    @property
    def remote(self) -> bool:
        """True when an engine at :attr:`url` serves this role."""
        return self.url is not None

    def describe(self) -> str:
        """The source as one short string (a URL without its user name or password)."""
        if self.url is not None:
            extra = [f"api={self.api}" if self.api else "",
                     f"model={self.model}" if self.model else "",
                     f"top_k={self.top_k}" if self.top_k else ""]
            extra_text = ", ".join(e for e in extra if e)
            return hide_keys(public_url(self.url) + (f" ({extra_text})" if extra_text else ""))
        if self.path is not None:
            return str(self.path)
        rev = f"@{self.revision}" if self.revision else ""
        return f"hf:{self.hf_repo}/{self.hf_file}{rev}"


@dataclass(frozen=True)
class Preset:
    """A named combination: models by role and the formula that mixes them.

    ``template_role``: chat template, tokenizer and stop tokens. ``draft_role``: the model
    that drafts for speculative decoding (None: the cheapest model with a non-zero weight,
    chosen when generating). ``conservative_role``: whose top-p set conservative decoding
    keeps (None: the fine-tuned model with the largest positive weight).
    """

    name: str
    models: Mapping[str, ModelSpec]
    formula: Formula
    template_role: str
    description: str = ""
    params: Mapping[str, float] = field(default_factory=lambda: dict(PARAMETERS))
    chat_template: str | None = None
    origin: str = ""
    draft_role: str | None = None
    conservative_role: str | None = None

    def with_formula(self, text: str) -> Preset:
        """The same models mixed by another formula."""
        return replace(self, formula=parse_formula(text, roles=tuple(self.models)))


@dataclass(frozen=True)
class Config:
    """All presets known, and which one is the default."""

    presets: Mapping[str, Preset]
    default: str | None
    files: tuple[Path, ...]

    def get(self, name: str | None) -> Preset:
        """The named preset (or the default); a clear error lists the known names."""
        name = name or self.default
        if name is None:
            raise EftError("no preset given and no default preset is configured")
        if name not in self.presets:
            known = ", ".join(sorted(self.presets)) or "none"
            raise EftError(f"unknown preset {name!r} (known: {known})")
        return self.presets[name]


def shipped_config_path() -> Path:
    """The bundled models.toml: inside the wheel, or at the repository root."""
    inside = PACKAGE_DIR / "models.toml"
    return inside if inside.is_file() else PACKAGE_DIR.parent / "models.toml"


def user_config_path() -> Path:
    """$EFT_LOCAL_CONFIG, else $XDG_CONFIG_HOME/eft-local/models.toml (~/.config default)."""
    if os.environ.get(ENV_CONFIG):
        return Path(os.environ[ENV_CONFIG]).expanduser()
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "eft-local" / "models.toml"


def load_config(shipped: Path | None = None, user: Path | None = None) -> Config:
    """Read the shipped presets, then the user's file (if it exists) over them."""
    shipped = shipped or shipped_config_path()
    user_required = user is None and bool(os.environ.get(ENV_CONFIG))  # named on purpose
    user = user or user_config_path()
    presets: dict[str, Preset] = {}
    default = None
    files = []
    for path, required in ((shipped, True), (user, user_required)):
        if not path.is_file():
            if required:
                raise EftError(f"{path}: config file not found")
            continue
        data = _read_toml(path)
        presets.update(_parse_presets(data, path))
        default = data.get("default", default)
        files.append(path)
    if default is not None and default not in presets:
        raise EftError(f"{files[-1]}: default preset {default!r} is not defined")
    return Config(presets=presets, default=default, files=tuple(files))


def _read_toml(path: Path) -> dict[str, Any]:
    text = read_user_text(path, what="config file", limit=8 << 20)
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise EftError(f"{path}: invalid TOML ({exc})") from None


def _parse_presets(data: Mapping[str, Any], path: Path) -> dict[str, Preset]:
    extra = set(data) - {"default", "presets"}
    if extra:
        raise EftError(f"{path}: unknown top-level key {sorted(extra)[0]!r}")
    if "default" in data and not isinstance(data["default"], str):
        raise EftError(f"{path}: 'default' must be a preset name (string)")
    tables = data.get("presets", {})
    if not isinstance(tables, dict):
        raise EftError(f"{path}: [presets] must be a table")
    return {name: parse_preset(name, table, path) for name, table in tables.items()}


def parse_preset(name: str, table: Any, path: Path) -> Preset:
    """Validate one ``[presets.NAME]`` table."""
    where = f"{path}: preset {name!r}"
    if not isinstance(table, dict):
        raise EftError(f"{where} must be a table")
    unknown = set(table) - _PRESET_KEYS
    if unknown:
        raise EftError(f"{where}: unknown key {sorted(unknown)[0]!r}")
    models_table = table.get("models")
    if not isinstance(models_table, dict) or not models_table:
        raise EftError(f"{where}: needs a [presets.{name}.models] table with at least one role")
    models = {role: parse_model(role, spec, f"{where}, model {role!r}", path.parent)
              for role, spec in models_table.items()}
    try:
        formula = parse_formula(str(table.get("formula", "up")), roles=tuple(models))
    except EftError as exc:
        raise EftError(f"{where}: {exc}") from None
    params = dict(PARAMETERS)
    for key in PARAMETERS:
        if key in table:
            params[key] = _number(table[key], f"{where}: {key}")
    roles = _parse_roles(table, tuple(models), where)
    template = table.get("chat_template")
    if template is not None and not isinstance(template, str):
        raise EftError(f"{where}: chat_template must be a string")
    return Preset(name=name, models=models, formula=formula,
                  description=str(table.get("description", "")), params=params,
                  chat_template=template, origin=str(path), **roles)


def _parse_roles(table: Mapping[str, Any], models: tuple[str, ...], where: str
                 ) -> dict[str, Any]:
    """template_role, draft_role, conservative_role. ``ft_role``, the old single key, is an
    alias of template_role and the default conservative_role (the fine-tuned model it
    named); draft_role keeps its default (the cheapest model with weight)."""
    if "ft_role" in table and "template_role" in table:
        raise EftError(f"{where}: give template_role or its old name ft_role, not both")
    out: dict[str, Any] = {}
    if "ft_role" in table and "conservative_role" not in table:
        table = {**table, "conservative_role": table["ft_role"]}  # what ft_role meant there
    for key in ROLE_KEYS:
        source = "ft_role" if key == "template_role" and "ft_role" in table else key
        value = table.get(source)
        if value is None:
            out[key] = default_template_role(models) if key == "template_role" else None
            continue
        if not isinstance(value, str) or value not in models:
            raise EftError(f"{where}: {source} {value!r} is not one of its models "
                           f"({', '.join(models)})")
        out[key] = value
    return out


def parse_model(role: str, spec: Any, where: str, base_dir: Path) -> ModelSpec:
    """Validate one model entry: a table with a source and optional load options."""
    if isinstance(spec, str):
        spec = {"url": spec} if is_url(spec) else {"path": spec}
    if not isinstance(spec, dict):
        raise EftError(f"{where}: must be a table such as {{ path = \"model.gguf\" }}")
    unknown = set(spec) - {"path", "bundled", "hf", "file", "revision", *_LOAD_KEYS,
                           *REMOTE_KEYS}
    if unknown:
        raise EftError(f"{where}: unknown key {sorted(unknown)[0]!r}")
    sources = [k for k in ("path", "bundled", "hf", "url") if k in spec]
    if len(sources) != 1:
        raise EftError(f"{where}: give exactly one of path, bundled, hf or url (got "
                       f"{', '.join(sources) or 'none'})")
    if "url" in spec:
        local = sorted(set(spec) & {*_LOAD_KEYS, "file", "revision"})
        if local:
            raise EftError(f"{where}: {local[0]} does not apply to a remote model (set it on "
                           "the engine that serves it)")
        if not isinstance(spec["url"], str) or "#" in spec["url"]:
            raise EftError(f"{where}: url must be a string such as \"http://host:8080\" "
                           "(options as keys: api, model, top_k, api_key_env, timeout)")
        return remote_spec(role, spec["url"], where, {k: v for k, v in spec.items()
                                                      if k != "url"})
    extra = sorted(set(spec) & (REMOTE_KEYS - {"url"}))
    if extra:
        raise EftError(f"{where}: {extra[0]} goes with url = \"http://...\" (a remote model)")
    options = {}
    for key, (low, high) in _LOAD_KEYS.items():
        if key in spec:
            value = spec[key]
            high = max_threads() if high is None else high
            if (not isinstance(value, int) or isinstance(value, bool)
                    or not low <= value <= high):
                raise EftError(f"{where}: {key} must be an integer in [{low}, {high}], "
                               f"got {value!r}")
            options[key] = value
    if "hf" in spec:
        if not isinstance(spec.get("file"), str) or not spec["file"].strip():
            raise EftError(f"{where}: an hf source needs file = \"name.gguf\"")
        check_repo_id(spec["hf"], where)
        revision = spec.get("revision")
        if revision is not None and (not isinstance(revision, str) or not revision.strip()):
            raise EftError(f"{where}: revision must be a branch, tag or commit name, "
                           f"got {revision!r}")
        return ModelSpec(role=role, hf_repo=spec["hf"], hf_file=spec["file"],
                         revision=revision, **options)
    if "bundled" in spec:
        path = FAMILY_DIR / str(spec["bundled"])
    else:
        path = Path(str(spec["path"])).expanduser()
        path = path if path.is_absolute() else base_dir / path
    return ModelSpec(role=role, path=path, **options)


APIS = ("llama-server", "openai", "eft-local")
"""How eft-local talks to a remote engine (see :mod:`eft_local.remote`)."""
REMOTE_KEYS = {"url", "api", "model", "top_k", "api_key_env", "timeout"}
TOP_K_MAX = 1 << 24
TIMEOUT_MAX = 3600.0


def is_url(text: str) -> bool:
    """True for a model source that is an engine's address (``http://`` or ``https://``)."""
    return text.strip().lower().startswith(("http://", "https://"))


_KEY_SHAPED = re.compile(
    r"(?<![A-Za-z0-9])(?:"
    r"(?:sk|pk|rk|hf|ghp|gho|ghu|ghs|ghr|github_pat|glpat|xox[abprs])[-_]"
    r"(?=[A-Za-z0-9_\-]*[0-9])[A-Za-z0-9_\-]{6,}"
    r"|AKIA[0-9A-Z]{12,}|AIza[0-9A-Za-z_\-]{20,}"
    r"|[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}"
    r"|(?=[A-Za-z0-9]*[0-9])(?=[A-Za-z0-9]*[A-Za-z])[A-Za-z0-9]{20,}"
    r")(?![A-Za-z0-9])")
"""What an API key looks like: a known prefix (``sk-``, ``hf_``, ``ghp_``...) before a tail
with a digit, a UUID, or a run of 20 or more letters and digits with both in it."""
HIDDEN = "[hidden]"


def hide_keys(text: str) -> str:
    """``text`` with every value that looks like an API key replaced by ``[hidden]``: what
    an error or log line about a remote engine shows."""
    return _KEY_SHAPED.sub(HIDDEN, text)


def shown(value: Any) -> str:
    """``repr(value)`` for a message, unless it looks like a key (then it is not shown)."""
    text = repr(value)
    return "a value that looks like a key (not shown)" if hide_keys(text) != text else text


def public_url(url: str) -> str:
    """``url`` without a user name or password, query or options, and with nothing that
    looks like a key: what messages show (also for text that is no valid URL)."""
    base = url.split("#", 1)[0].split("?", 1)[0]
    try:
        parts = urlsplit(base)
        host = parts.hostname or ""
    except ValueError:  # an unclosed [ipv6 address: still no user name or password
        return hide_keys(re.sub(r"//[^/]*@", "//", base))
    if ":" in host:
        host = f"[{host}]"
    try:
        port = parts.port
    except ValueError:
        port = None
    netloc = host + (f":{port}" if port else "")
    return hide_keys(urlunsplit((parts.scheme, netloc, parts.path, "", "")))


def remote_spec(role: str, url: str, where: str, options: Mapping[str, Any] | None = None
                ) -> ModelSpec:
    """A remote model: ``url`` (options after ``#`` as ``key=value&...`` on the command
    line: ``api``, ``model``, ``top_k``, ``key`` or ``api_key_env``, ``timeout``) or the
    keys of a models.toml table in ``options``."""
    base, _, fragment = url.strip().partition("#")
    opts: dict[str, Any] = dict(options or {})
    for name, value in parse_qsl(fragment, keep_blank_values=True):
        name = {"key": "api_key_env"}.get(name, name)
        if name not in REMOTE_KEYS - {"url"}:
            raise EftError(f"{where}: unknown remote option {shown(name)} after '#' (known: "
                           "api, model, top_k, key, timeout)")
        opts[name] = _option_value(name, value, where)
    try:
        parts = urlsplit(base)
    except ValueError as exc:  # http://[::1:8080 (an unclosed IPv6 address)
        raise EftError(f"{where}: {public_url(base)!r} is not a valid URL ({exc})") from None
    try:
        parts.port  # noqa: B018 - raises on a bad port
    except ValueError:
        raise EftError(f"{where}: {public_url(base)!r} has an invalid port") from None
    if parts.scheme.lower() not in ("http", "https") or not parts.hostname:
        raise EftError(f"{where}: {public_url(base)!r} is not an http:// or https:// URL "
                       "with a host")
    if parts.username or parts.password:
        raise EftError(f"{where}: put no user name or password in the URL; give the "
                       "engine's key in an environment variable (api_key_env, or #key=NAME)")
    api = opts.get("api")
    if api is not None and api not in APIS:
        raise EftError(f"{where}: api {shown(api)} is not one of {', '.join(APIS)}")
    for name, kind in (("model", str), ("api_key_env", str)):
        value = opts.get(name)
        if value is not None and (not isinstance(value, kind) or not value.strip()):
            raise EftError(f"{where}: {name} must be a non-empty string, got {shown(value)}")
    env = opts.get("api_key_env")
    if env is not None and hide_keys(env) != env:
        raise EftError(f"{where}: key/api_key_env names the environment variable that holds "
                       "the key, not the key itself (the value looks like a key: not shown); "
                       "export KEY_NAME=... and give #key=KEY_NAME")
    if env is not None and not env.replace("_", "a").isalnum():
        raise EftError(f"{where}: api_key_env {shown(env)} is not an environment variable "
                       "name")
    top_k = opts.get("top_k")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int)
                              or not 1 <= top_k <= TOP_K_MAX):
        raise EftError(f"{where}: top_k must be an integer in [1, {TOP_K_MAX}], got "
                       f"{shown(top_k)}")
    timeout = opts.get("timeout")
    if timeout is not None and (isinstance(timeout, bool)
                                or not isinstance(timeout, (int, float))
                                or not 0 < timeout <= TIMEOUT_MAX):
        raise EftError(f"{where}: timeout must be seconds in (0, {TIMEOUT_MAX:g}], got "
                       f"{shown(timeout)}")
    return ModelSpec(role=role, url=base.rstrip("/"), api=api, model=opts.get("model"),
                     top_k=top_k, api_key_env=env,
                     timeout=None if timeout is None else float(timeout))


def _option_value(name: str, value: str, where: str) -> Any:
    """A URL option's text as the type models.toml would give it."""
    if name == "top_k":
        if not value.isdigit():
            raise EftError(f"{where}: top_k={shown(value)} is not a whole number")
        return int(value)
    if name == "timeout":
        try:
            return float(value)
        except ValueError:
            raise EftError(f"{where}: timeout={shown(value)} is not a number of seconds"
                           ) from None
    return value


_REPO_ID = re.compile(r"(?:[A-Za-z0-9_.-]+/)?[A-Za-z0-9_.-]{1,96}")


def check_repo_id(repo: Any, where: str) -> None:
    """A Hugging Face repo id as the hub accepts it: ``owner/name`` of letters, digits and
    ``-_.``, neither starting nor ending with ``-`` or ``.``, without ``--`` or ``..``."""
    ok = (isinstance(repo, str) and _REPO_ID.fullmatch(repo) is not None
          and "--" not in repo and ".." not in repo and not repo.endswith(".git")
          and not any(part[:1] in "-." or part[-1:] in "-." for part in repo.split("/")))
    if not ok:
        raise EftError(f"{where}: hf = {repo!r} is not a Hugging Face repo id (owner/name: "
                       "letters, digits, '-', '_' and '.')")


def is_fine_tuned(role: str) -> bool:
    """A role named as a fine-tuned model: ``ft`` is one of its ``_``-separated parts."""
    return "ft" in role.split("_")


def default_template_role(roles: tuple[str, ...]) -> str:
    """small_ft if present, else the first fine-tuned role, else the first."""
    if "small_ft" in roles:
        return "small_ft"
    return next((r for r in roles if is_fine_tuned(r)), roles[0])


def default_conservative_role(formula: Formula, params: Mapping[str, float]) -> str:
    """The fine-tuned model of the formula's delta under these knobs: the fine-tuned role
    (see :func:`is_fine_tuned`) with the largest positive weight (small_ft for up-scaling,
    large_ft for down-scaling); without one, the positive role that ``beta`` scales up;
    else the role with the largest weight. Equal weights: the first role."""
    weights = formula.weights(params)
    positive = [r for r, w in weights.items() if w > 0]
    pool = [r for r in positive if is_fine_tuned(r)]
    if not pool and "beta" in formula.params:
        one, zero = (formula.weights({**params, "beta": b}) for b in (1.0, 0.0))
        pool = [r for r in positive if one[r] > zero[r]]
    pool = pool or positive or list(weights)
    return max(pool, key=lambda r: weights[r])


def preset_from_paths(pairs: list[str], *, formula: str | None = None) -> Preset:
    """A preset from ``ROLE=PATH`` strings given on the command line."""
    models: dict[str, ModelSpec] = {}
    for pair in pairs:
        role, sep, path = pair.partition("=")
        where = f"--model {hide_keys(repr(pair))}"
        if not sep or not role.strip() or not path.strip():
            raise EftError(f"{where}: expected ROLE=PATH, e.g. small_ft=model.gguf")
        if not role.isidentifier():
            raise EftError(f"{where}: role {shown(role)} must be a plain name")
        if role in models:
            raise EftError(f"{where}: role {role!r} given twice")
        if is_url(path):
            models[role] = remote_spec(role, path, f"--model {role}=...")
            continue
        models[role] = ModelSpec(role=role, path=Path(path).expanduser())
    roles = tuple(models)
    if formula is None:
        formula = "up" if {"large_base", "small_ft", "small_base"} <= set(roles) else None
        if formula is None and len(roles) == 1:
            formula = roles[0]
        if formula is None:
            raise EftError(f"roles {', '.join(roles)}: give --formula (the default up-scaling "
                           "needs large_base, small_ft and small_base)")
    return Preset(name="command-line", models=models,
                  formula=parse_formula(formula, roles=roles),
                  template_role=default_template_role(roles),
                  description="models given with --model")


def _number(value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise EftError(f"{where} must be a number, got {value!r}")
    if not math.isfinite(value) or abs(value) > PARAM_LIMIT:
        raise EftError(f"{where} must be a finite number in [-{PARAM_LIMIT:g}, "
                       f"{PARAM_LIMIT:g}], got {value!r}")
    return float(value)
