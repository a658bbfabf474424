"""The README and docs/ hold together (issue 26): every relative link in README.md and
docs/*.md reaches a file, every ``#anchor`` a heading of that file (GitHub's slugs), every
page of docs/ is listed in docs/index.md, and every docs page or README section that the
code, the tests, the benchmarks, CI and the training scripts name exists."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
DOCS = ROOT / "docs"
PAGES = [README, *sorted(DOCS.glob("*.md"))]
CODE_DIRS = ("eft_local", "tests", "benchmarks", ".ci", "training")

FENCE = re.compile(r"^\s*(```|~~~)")
HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")
INLINE_CODE = re.compile(r"(`+).*?\1")
LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\[\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
DOC_MENTION = re.compile(r"(?<![\w/.-])docs/[\w./-]+?\.md(?:#[\w-]+)?")
README_SECTION = re.compile(r"README(?:\.md)?(?:'s)?,?\s+(?:section\s+)?\"([^\"]+)\"")
README_ANCHOR = re.compile(r"README\.md#([\w-]+)")


def prose_lines(text: str) -> list[tuple[int, str]]:
    """(line number, line) of the lines outside fenced code blocks."""
    out, fenced = [], False
    for number, line in enumerate(text.splitlines(), 1):
        if FENCE.match(line):
            fenced = not fenced
            continue
        if not fenced:
            out.append((number, line))
    return out


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lowercase, every character but letters, digits, '-',
    '_' and spaces dropped (backticks, colons, apostrophes, dots...), each space a '-'."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """The anchors GitHub gives the headings of ``path`` (a repeated one gets -1, -2...)."""
    seen: dict[str, int] = {}
    out = set()
    for _, line in prose_lines(path.read_text("utf-8")):
        match = HEADING.match(line)
        if not match:
            continue
        base = slug(match.group(2))
        n = seen.get(base, 0)
        seen[base] = n + 1
        out.add(base if n == 0 else f"{base}-{n}")
    return out


def target_problem(source: Path, target: str) -> str | None:
    """Why ``target``, a link or mention made in ``source``, leads nowhere; None if it is
    fine. Web addresses are not followed."""
    if re.match(r"^[a-z][a-z0-9+.-]*:", target):
        return None
    part, _, anchor = target.partition("#")
    path = (source.parent / part).resolve() if part else source
    if not path.exists():
        return f"no file {part}"
    if anchor and path.suffix == ".md" and anchor not in anchors(path):
        return f"no heading #{anchor} in {path.name}"
    return None


def dead_links(pages: list[Path]) -> list[str]:
    """Every relative link of ``pages`` that reaches no file or no heading, as
    ``page:line: target (why)``."""
    dead = []
    for page in pages:
        for number, line in prose_lines(page.read_text("utf-8")):
            for target in LINK.findall(INLINE_CODE.sub("", line)):
                why = target_problem(page, target)
                if why:
                    dead.append(f"{page.name}:{number}: {target} ({why})")
    return dead


def test_every_link_of_the_readme_and_the_docs_reaches_a_file_and_a_heading() -> None:
    assert len(PAGES) > 10
    assert dead_links(PAGES) == []


def test_the_checker_finds_a_dead_file_and_a_dead_anchor(tmp_path: Path) -> None:
    """The check above can fail: a missing file, a missing heading, and a repeated heading's
    second anchor are told apart from good links."""
    (tmp_path / "a.md").write_text(
        "# A page\n\n## Serving: the OpenAI API\n\n## Twice\n\n## Twice\n\n"
        "[ok](b.md#llamacpps-llama-server) [ok](#serving-the-openai-api) [ok](#twice-1)\n"
        "[gone](c.md) [gone](b.md#no-such-heading) [gone](#twice-2) "
        "[web](https://example.org/x.md)\n\n```sh\n# not a heading [nor a link](d.md)\n```\n"
        "`[in code](e.md)`\n", "utf-8")
    (tmp_path / "b.md").write_text("# llama.cpp's llama-server\n", "utf-8")
    dead = dead_links([tmp_path / "a.md", tmp_path / "b.md"])
    assert [d.split(" (")[0] for d in dead] == [
        "a.md:10: c.md", "a.md:10: b.md#no-such-heading", "a.md:10: #twice-2"]


@pytest.mark.parametrize(("heading", "anchor"), [
    ("Which file for which role? `eft-local explore`",
     "which-file-for-which-role-eft-local-explore"),
    ("Does it work? The paper's effect, in miniature",
     "does-it-work-the-papers-effect-in-miniature"),
    ("In the server: response_format, grammars and tools",
     "in-the-server-response_format-grammars-and-tools"),
    ("n_ctx 2048 (the family: 256, its training context)",
     "n_ctx-2048-the-family-256-its-training-context"),
])
def test_slugs_follow_github(heading: str, anchor: str) -> None:
    assert slug(heading) == anchor


def test_every_docs_page_is_listed_in_the_index() -> None:
    listed = set(re.findall(r"\]\(([\w-]+\.md)", (DOCS / "index.md").read_text("utf-8")))
    pages = {p.name for p in DOCS.glob("*.md")} - {"index.md"}
    assert pages - listed == set()


def code_files() -> list[Path]:
    files = []
    for folder in CODE_DIRS:
        files += [p for p in (ROOT / folder).rglob("*") if p.is_file()
                  and p.suffix in ("", ".py", ".sh", ".toml", ".md", ".html")
                  and "__pycache__" not in p.parts]
    return [p for p in files if p != Path(__file__).resolve()]


def test_docs_pages_and_readme_sections_named_in_code_exist() -> None:
    """``docs/x.md#anchor`` in eft_local/, tests/, benchmarks/, .ci/ and training/ names an
    existing page and heading; ``README "Section"`` and ``README.md#anchor`` a heading of the
    README."""
    readme = anchors(README)
    dead = []
    for path in code_files():
        text = path.read_text("utf-8", errors="replace")
        where = path.relative_to(ROOT)
        for mention in DOC_MENTION.findall(text):
            why = target_problem(ROOT / "x", mention)
            if why:
                dead.append(f"{where}: {mention} ({why})")
        for title in README_SECTION.findall(re.sub(r"\s+", " ", text)):
            if slug(title) not in readme:
                dead.append(f"{where}: README section {title!r} (no such heading)")
        for anchor in README_ANCHOR.findall(text):
            if anchor not in readme:
                dead.append(f"{where}: README.md#{anchor} (no such heading)")
    assert dead == []
