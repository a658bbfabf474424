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
from eft_local.config import ModelSpec, Preset, load_config, preset_from_paths
from eft_local.errors import EftError


@dataclass(frozen=True)
class Combination:
    """One file per role."""

    files: Mapping[str, Path]
    label: str = ""

    def key(self) -> tuple[str, ...]:
        """Identity: the resolved files in role order."""
        return tuple(str(p.resolve()) for p in self.files.values())


def expand(pairs: Sequence[str], option: str = "--model") -> dict[str, list[Path]]:
    """``ROLE=PATH`` strings (repeated roles are alternatives, PATH may be a glob) to the
    candidate files of each role, in order, without duplicates."""
    out: dict[str, list[Path]] = {}
    for pair in pairs:
        role, sep, pattern = pair.partition("=")
        role, pattern = role.strip(), pattern.strip()
        if not sep or not role or not pattern:
            raise EftError(f"{option} {pair!r}: expected ROLE=PATH, e.g. small_ft=model.gguf")
        if not role.isidentifier():
            raise EftError(f"{option} {pair!r}: role {role!r} must be a plain name")
        pattern = os.path.expanduser(pattern)
        found = sorted(glob.glob(pattern)) if glob.has_magic(pattern) else [pattern]
        if not found:
            raise EftError(f"{option} {pair!r}: no file matches {pattern!r}")
        known = out.setdefault(role, [])
        for name in found:
            path = Path(name)
            if all(path.resolve() != p.resolve() for p in known):
                known.append(path)
    return out


def candidates_for(preset: str | None, models: Sequence[str], variants: Sequence[str], *,
                   formula: str | None = None) -> tuple[Preset, dict[str, list[Path]]]:
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
    candidates = {role: [hub.resolve(spec)] for role, spec in template.models.items()}
    for role, paths in expand(variants, "--variant").items():
        if role not in candidates:
            raise EftError(f"--variant {role}=...: preset {template.name!r} has no role "
                           f"{role!r} (its roles: {', '.join(candidates)})")
        known = candidates[role]
        known += [p for p in paths if all(p.resolve() != q.resolve() for q in known)]
    return template, candidates


def combinations(candidates: Mapping[str, Sequence[Path]], *, first: Combination | None = None,
                 limit: int | None = None) -> list[Combination]:
    """Every combination (``first`` leading when it is one of them), or ``limit`` of them
    chosen so that each candidate file appears in at least one."""
    roles = list(candidates)
    every = [dict(zip(roles, files, strict=True))
             for files in itertools.product(*(candidates[r] for r in roles))]
    combos = [Combination(files) for files in every]
    if first is not None:
        lead = [c for c in combos if c.key() == first.key()]
        combos = lead + [c for c in combos if c.key() != first.key()]
    if limit is not None and limit < len(combos):
        widest = max(len(candidates[r]) for r in roles)
        if limit < widest:
            raise EftError(f"--max-combinations {limit}: covering every file needs at least "
                           f"{widest} (a role has {widest} candidates)")
        chosen: list[Combination] = [combos[0]]
        for i in range(len(chosen), widest):  # the i-th file of each role (cycling)
            files = {r: candidates[r][i % len(candidates[r])] for r in roles}
            chosen.append(Combination(files))
        seen = {c.key() for c in chosen}
        for c in combos:
            if len(chosen) >= limit:
                break
            if c.key() not in seen:
                chosen.append(c)
                seen.add(c.key())
        covered = {str(p.resolve()) for c in chosen for p in c.files.values()}
        missing = [p for r in roles for p in candidates[r] if str(p.resolve()) not in covered]
        for path in missing:  # only when combos[0] and the cycle overlap; swap one in
            role = next(r for r in roles if path in candidates[r])
            chosen[-1] = Combination({**chosen[-1].files, role: path})
        combos = chosen[:limit]
    tags = _tags(candidates)
    return [replace(c, label=" / ".join(tags[r][str(p)] for r, p in c.files.items()
                                        if len(candidates[r]) > 1) or "single")
            for c in combos]


def _tags(candidates: Mapping[str, Sequence[Path]]) -> dict[str, dict[str, str]]:
    """A short name per file: its stem without the leading name parts (up to a ``.``, ``_``
    or ``-``) that all of its role's files share."""
    out: dict[str, dict[str, str]] = {}
    for role, files in candidates.items():
        stems = [p.name.removesuffix(".gguf") for p in files]
        prefix = os.path.commonprefix(stems) if len(stems) > 1 else ""
        while prefix and not all(len(s) == len(prefix) or s[len(prefix)] in "._-"
                                 for s in stems):  # whole name parts only
            prefix = prefix[:-1]
        out[role] = {str(p): (s[len(prefix):].strip("._-") or s)
                     for p, s in zip(files, stems, strict=True)}
    return out


def largest(candidates: Mapping[str, Sequence[Path]],
            overrides: Mapping[str, Path] | None = None) -> Combination:
    """The reference by default: the largest file of each role (``overrides`` win)."""
    files = {}
    for role, paths in candidates.items():
        if overrides and role in overrides:
            files[role] = overrides[role]
            continue
        sizes = []
        for p in paths:
            try:
                sizes.append((p.stat().st_size, -paths.index(p), p))
            except OSError:
                sizes.append((-1, -paths.index(p), p))
        files[role] = max(sizes)[2]
    extra = set(overrides or {}) - set(candidates)
    if extra:
        raise EftError(f"--reference: role {sorted(extra)[0]!r} is not among the models "
                       f"({', '.join(candidates)})")
    return Combination(files, label="reference")


def preset_for(template: Preset, combo: Combination) -> Preset:
    """``template`` (formula, knobs, load options) with the files of ``combo``."""
    models = {}
    for role, path in combo.files.items():
        spec = template.models.get(role) or ModelSpec(role=role)
        models[role] = replace(spec, path=path, hf_repo=None, hf_file=None, revision=None)
    return replace(template, name=combo.label or "combination", models=models)


