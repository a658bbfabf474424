"""Candidate files per role, and the combinations of them that ``explore`` evaluates.

Candidates come from repeated ``ROLE=PATH`` options (globs expanded) or from a preset's own
files plus ``--variant`` files. A combination takes one file per role; labels name each file
by what distinguishes it from the other candidates of its role (``Q4_K_M``).
"""

from __future__ import annotations

import glob
import itertools
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from eft_local import hub
from eft_local.errors import EftError
from eft_local.presets import (
    ModelSpec,
    Preset,
    hide_keys,
    is_url,
    load_config,
    preset_from_paths,
    public_url,
    remote_spec,
    shown,
)

Source = Path | str
"""A candidate: a GGUF file, or a remote engine's URL (a ``str``, options after ``#``)."""


def ident(source: Source) -> str:
    """A candidate's identity: the resolved file, or the URL with its options."""
    return source if isinstance(source, str) else str(source.resolve())


def source_name(source: Source) -> str:
    """A candidate's short name: the file name, or the URL without user or password."""
    if isinstance(source, str):
        base, _, options = source.partition("#")
        return public_url(base) + (f"#{hide_keys(options)}" if options else "")
    return source.name


@dataclass(frozen=True)
class Combination:
    """One file (or remote engine) per role."""

    files: Mapping[str, Source]
    label: str = ""

    def key(self) -> tuple[str, ...]:
        """Identity: the resolved files (URLs) in role order."""
        return tuple(ident(p) for p in self.files.values())


def expand(pairs: Sequence[str], option: str = "--model") -> dict[str, list[Source]]:
    """``ROLE=PATH`` strings (repeated roles are alternatives, PATH may be a glob or an
    engine's URL) to the candidate files of each role, in order, without duplicates."""
    out: dict[str, list[Source]] = {}
    for pair in pairs:
        role, sep, pattern = pair.partition("=")
        role, pattern = role.strip(), pattern.strip()
        where = f"{option} {hide_keys(repr(pair))}"
        if not sep or not role or not pattern:
            raise EftError(f"{where}: expected ROLE=PATH, e.g. small_ft=model.gguf")
        if not role.isidentifier():
            raise EftError(f"{where}: role {shown(role)} must be a plain name")
        if is_url(pattern):
            remote_spec(role, pattern, f"{option} {role}=...")  # checked now, not later
            out[role] = _distinct([*out.get(role, []), pattern])
            continue
        pattern = os.path.expanduser(pattern)
        found = sorted(glob.glob(pattern)) if glob.has_magic(pattern) else [pattern]
        if not found:
            raise EftError(f"{option} {pair!r}: no file matches {pattern!r}")
        out[role] = _distinct([*out.get(role, []), *map(Path, found)])
    return out


def candidates_for(preset: str | None, models: Sequence[str], variants: Sequence[str], *,
                   formula: str | None = None) -> tuple[Preset, dict[str, list[Source]]]:
    """The template preset (formula, knobs, load options) and the candidate files of each
    role: ``models`` (``ROLE=PATH``, repeated roles are alternatives), or a preset's files
    plus ``variants``."""
    if preset and models:
        raise EftError(f"give a preset ({preset!r}) or --model ROLE=PATH alternatives, "
                       "not both")
    if models:
        if variants:
            raise EftError("--variant goes with a preset; with --model, repeat -m ROLE=PATH "
                           "for each alternative")
        candidates = expand(models)
        template = preset_from_paths([f"{r}={paths[0]}" for r, paths in candidates.items()],
                                     formula=formula)
        return template, candidates
    template = load_config().get(preset)
    if formula:
        template = template.with_formula(formula)
    candidates: dict[str, list[Source]] = {
        role: [_spec_url(spec) if spec.remote else hub.resolve(spec)]
        for role, spec in template.models.items()}
    for role, paths in expand(variants, "--variant").items():
        if role not in candidates:
            raise EftError(f"--variant {role}=...: preset {template.name!r} has no role "
                           f"{role!r} (its roles: {', '.join(candidates)})")
        candidates[role] = _distinct([*candidates[role], *paths])
    return template, candidates


def combinations(candidates: Mapping[str, Sequence[Source]], *,
                 first: Combination | None = None,
                 limit: int | None = None) -> list[Combination]:
    """Every combination, ``first`` leading when it is one of them; or, with ``limit``
    below their number, ``limit`` distinct ones (``first`` still leading) that use every
    file of every role at least once. A limit below the widest role's count is an error."""
    roles = list(candidates)
    files = {r: _distinct(candidates[r]) for r in roles}
    every = [Combination(dict(zip(roles, chosen, strict=True)))
             for chosen in itertools.product(*(files[r] for r in roles))]
    lead = _index_of(first, files) if first is not None else None
    if lead is not None:  # the product enumerates in mixed radix, last role fastest
        at = 0
        for r in roles:
            at = at * len(files[r]) + lead[r]
        every.insert(0, every.pop(at))
    combos = every
    if limit is not None and limit < len(every):
        widest = max((len(f) for f in files.values()), default=0)
        if limit < widest:
            raise EftError(f"--max-combinations {limit}: covering every file needs at least "
                           f"{widest} (a role has {widest} candidates)")
        # ``widest`` diagonal combinations from the leading one: the i-th takes each role's
        # file ``i`` places after the leading one's (cycling), so together they use every
        # file, and they are distinct since the widest role's files differ in each
        start = lead or {r: 0 for r in roles}
        combos = [Combination({r: files[r][(start[r] + i) % len(files[r])] for r in roles})
                  for i in range(widest)]
        seen = {c.key() for c in combos}
        combos += [c for c in every if c.key() not in seen][:limit - widest]
    tags = _tags(files)
    return [replace(c, label=" / ".join(tags[r][str(p)] for r, p in c.files.items()
                                        if len(files[r]) > 1) or "single")
            for c in combos]


def _distinct(paths: Sequence[Source]) -> list[Source]:
    """``paths`` in order, each file (URL) once (by resolved path)."""
    out: list[Source] = []
    for p in paths:
        if all(ident(p) != ident(q) for q in out):
            out.append(p)
    return out


def _index_of(combo: Combination, files: Mapping[str, Sequence[Source]]
              ) -> dict[str, int] | None:
    """The position of ``combo``'s file in each role's list, or None when it is not one of
    the combinations of ``files``."""
    if set(combo.files) != set(files):
        return None
    out = {}
    for role, paths in files.items():
        want = ident(combo.files[role])
        found = [i for i, p in enumerate(paths) if ident(p) == want]
        if not found:
            return None
        out[role] = found[0]
    return out


def _tags(candidates: Mapping[str, Sequence[Source]]) -> dict[str, dict[str, str]]:
    """A short name per file: its stem without the leading name parts (up to a ``.``, ``_``
    or ``-``) that all of its role's files share; ``remote`` and its options for a URL."""
    out: dict[str, dict[str, str]] = {}
    for role, all_files in candidates.items():
        files = [p for p in all_files if isinstance(p, Path)]
        out[role] = {str(p): _remote_tag(p) for p in all_files if isinstance(p, str)}
        stems = [p.name.removesuffix(".gguf") for p in files]
        prefix = os.path.commonprefix(stems) if len(stems) > 1 else ""
        while prefix and not all(len(s) == len(prefix) or s[len(prefix)] in "._-"
                                 for s in stems):  # whole name parts only
            prefix = prefix[:-1]
        out[role].update({str(p): (s[len(prefix):].strip("._-") or s)
                          for p, s in zip(files, stems, strict=True)})
    return out


def _remote_tag(url: str) -> str:
    """``remote`` and the options after ``#`` (``remote api=openai top_k=20``)."""
    options = url.partition("#")[2]
    return " ".join(["remote", *filter(None, options.split("&"))])


def _spec_url(spec: ModelSpec) -> str:
    """A remote model spec as the URL candidate that names it."""
    options = [f"{k}={v}" for k, v in (("api", spec.api), ("model", spec.model),
                                       ("top_k", spec.top_k), ("key", spec.api_key_env),
                                       ("timeout", spec.timeout)) if v is not None]
    return f"{spec.url}#{'&'.join(options)}" if options else str(spec.url)


def largest(candidates: Mapping[str, Sequence[Source]],
            overrides: Mapping[str, Source] | None = None) -> Combination:
    """The reference by default: the largest file of each role (``overrides`` win; a
    remote engine counts as smallest: its size is not known)."""
    files = {}
    for role, paths in candidates.items():
        if overrides and role in overrides:
            files[role] = overrides[role]
            continue
        sizes: list[tuple[int, int, Source]] = []
        for i, p in enumerate(paths):
            try:
                size = -1 if isinstance(p, str) else p.stat().st_size
            except OSError:
                size = -1
            sizes.append((size, -i, p))
        files[role] = max(sizes, key=lambda x: (x[0], x[1]))[2]
    extra = set(overrides or {}) - set(candidates)
    if extra:
        raise EftError(f"--reference: role {sorted(extra)[0]!r} is not among the models "
                       f"({', '.join(candidates)})")
    return Combination(files, label="reference")


def preset_for(template: Preset, combo: Combination) -> Preset:
    """``template`` (formula, knobs, load options) with the files of ``combo``."""
    models = {}
    for role, path in combo.files.items():
        if isinstance(path, str):
            models[role] = remote_spec(role, path, f"{role}=...")
            continue
        spec = template.models.get(role) or ModelSpec(role=role)
        models[role] = replace(spec, path=path, hf_repo=None, hf_file=None, revision=None,
                               url=None, api=None, model=None, top_k=None, api_key_env=None,
                               timeout=None)
    return replace(template, name=combo.label or "combination", models=models)


