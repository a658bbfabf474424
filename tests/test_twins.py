"""No twins: one definition per public name and per function body in eft_local/.

Issue 26 found functions and classes defined twice in different modules (``is_remote``,
``schema_grammar``, the ``Constraint`` protocol), each copy free to drift from the other. Two
cheap AST scans keep a new twin from arriving silently: a public top-level function or class
name defined in two modules, and a function (or method) whose arguments and body, docstring
aside, are the same as another's. A name shared on purpose is listed below with the modules
allowed to define it, so a third definition still fails.
"""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "eft_local"

SHARED_NAMES: dict[str, set[str]] = {
    # different things in different namespaces, each called by its module's name:
    "quantize": {"cli/main.py", "session.py"},  # the CLI command over the library function
    "render": {"templates.py", "cli/explore.py"},  # a chat template; explore's Markdown table
    "scan": {"ggufscan.py", "utf8.py"},  # a GGUF file's header; bytes through UTF-8 states
    "Settings": {"settings.py", "explore/explorer.py"},  # one call's; one exploration's
}
"""Public top-level names more than one module may define, and which modules."""

SHARED_BODIES: list[set[str]] = [
    # a context manager's protocol: `return self` and `self.close()`
    {"session.py:__enter__", "records.py:__enter__"},
    {"session.py:__exit__", "records.py:__exit__"},
]
"""Groups of functions allowed to have the same arguments and body (``module:name``)."""


def modules() -> dict[str, ast.Module]:
    return {p.relative_to(PACKAGE).as_posix(): ast.parse(p.read_text(encoding="utf-8"))
            for p in sorted(PACKAGE.rglob("*.py"))}


def public_definitions(trees: dict[str, ast.Module]) -> dict[str, set[str]]:
    """Public top-level function and class name -> the modules defining it."""
    found: dict[str, set[str]] = defaultdict(set)
    for path, tree in trees.items():
        for node in tree.body:
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef) and (
                    not node.name.startswith("_")):
                found[node.name].add(path)
    return found


def same_bodies(trees: dict[str, ast.Module]) -> list[set[str]]:
    """Groups (``module:name``) of functions with equal arguments and body, docstring aside;
    protocol stubs (a body of ``...`` or ``pass``) are not compared."""
    found: dict[str, set[str]] = defaultdict(set)
    for path, tree in trees.items():
        for node in ast.walk(tree):
            if not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                continue
            body = node.body
            if ast.get_docstring(node, clean=False) is not None:
                body = body[1:]
            if all(isinstance(s, ast.Pass) or (isinstance(s, ast.Expr) and isinstance(
                    s.value, ast.Constant) and s.value.value is Ellipsis) for s in body):
                continue
            key = ast.dump(node.args) + "".join(ast.dump(s) for s in body)
            found[key].add(f"{path}:{node.name}")
    return [group for group in found.values() if len(group) > 1]


def test_no_public_name_is_defined_in_two_modules() -> None:
    twins = {name: paths for name, paths in public_definitions(modules()).items()
             if len(paths) > 1 and not paths <= SHARED_NAMES.get(name, set())}
    assert not twins, ("defined in more than one module (keep one and import it, or list a "
                       f"deliberate case in SHARED_NAMES with why): {twins}")


def test_no_function_body_is_written_twice() -> None:
    twins = [group for group in same_bodies(modules())
             if not any(group <= allowed for allowed in SHARED_BODIES)]
    assert not twins, f"the same function written twice (keep one and import it): {twins}"


def test_the_scans_see_a_twin() -> None:
    """The scans themselves: a name and a body copied into another module are both found."""
    source = "def helper(x):\n    y = x + 1\n    return y\n"
    trees = {"a.py": ast.parse(source), "b/c.py": ast.parse(source.replace("helper", "other")),
             "d.py": ast.parse(source + "class _Private:\n    pass\n")}
    assert public_definitions(trees)["helper"] == {"a.py", "d.py"}
    assert "_Private" not in public_definitions(trees)
    assert same_bodies(trees) == [{"a.py:helper", "b/c.py:other", "d.py:helper"}]
    stubs = {"a.py": ast.parse("def f(x): ...\n"), "b.py": ast.parse("def f(x):\n    pass\n"),
             "c.py": ast.parse("def f(x): ...\n")}
    assert same_bodies(stubs) == []
