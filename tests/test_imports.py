"""The package's import graph: layers that import only downward, no cycle, and the CLI and
the server reaching the engine only through the session's public API.

Lazily registered CLI commands (``main.register("x", "eft_local.cli.mod:attr")``) count as
imports. docs/how-it-works.md walks the same layers.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "eft_local"

LAYERS: dict[str, int] = {
    # the base: no model, no NumPy state
    "errors": 0, "limits": 0, "text": 0, "files": 0, "interrupts": 0, "formula": 0, "ggufscan": 0,
    "gbnf": 0, "ranges": 0, "schema_check": 0,
    # pure pieces the engine is made of
    "sampler": 1, "vocab": 1, "presets": 1, "chat": 1, "templates": 1, "gguf_writer": 1,
    "plots": 1, "utf8": 1, "callshape": 1, "penalties": 1,
    "kvshift": 1,
    "schedule.shapes": 1, "schedule.watch": 1, "schedule.blocks": 1, "schedule.lanes": 1,
    # models and their files (local: backend; remote engines: remote/)
    "backend": 2, "backend.library": 2, "backend.model": 2, "backend.sequences": 2,
    "backend.tools": 2, "hub": 2, "schema": 2, "settings": 2, "loading": 2, "synthetic": 2,
    "structured": 2,
    "remote.http": 2, "remote.exact": 2, "remote.topk": 2, "remote.vocab": 2,
    "remote.llamaserver": 2, "remote.openai": 2, "remote.model": 2, "remote.io": 2,
    "remote.deadlines": 2,
    # the decode loop over N models
    "engine": 3,
    # what drives the engine
    "speculative": 4, "scoring": 4, "schedule.tuning": 4, "batch": 4,
    # the public API
    "session": 5, "request": 5, "prompts": 5, "many": 5,
    # libraries over the session
    "records": 6, "evaluate": 6, "bench": 6,
    "explore.candidates": 6, "explore.metrics": 6, "explore.refcache": 6,
    "explore.explorer": 6,
    "server.protocol": 6, "server.exact": 6, "server.chat_answers": 6, "server.worker": 6,
    "server.handlers": 6, "server.page": 6, "server.replies": 6,
    "server.app": 6, "server.net": 6, "server.guard": 6, "server.options": 6, "server.shapes": 6,
    "server.ollama": 6, "server.ollama_protocol": 6,
    # the command line
    "cli.main": 7, "cli.options": 7, "cli.batch": 7, "cli.repl": 7,
    "cli.score": 7, "cli.serve": 7, "cli.explore": 7, "cli.eval": 7, "cli.bench": 7,
    "__init__": 8, "__main__": 8,
    # the folders themselves (their __init__ holds a docstring, or re-exports, as backend's)
    "schedule": 1, "remote": 2, "explore": 6, "server": 6, "cli": 7,
}
"""Every module's layer: a module imports only modules of its layer or below."""

ENGINE_ROOM = {"engine", "batch", "speculative", "scoring", "sampler", "penalties", "backend",
               "backend.library", "backend.model", "backend.sequences", "backend.tools",
               "vocab", "ggufscan",
               "gguf_writer", "schedule.shapes", "schedule.watch", "schedule.blocks",
               "schedule.lanes", "schedule.tuning"}
"""What the CLI and the server may not import: they reach it through the session."""


def module_name(path: Path) -> str:
    """``eft_local/server/app.py`` -> ``server.app``; ``eft_local/backend/__init__.py`` ->
    ``backend`` (a folder whose ``__init__`` re-exports its modules' names)."""
    rel = path.relative_to(PACKAGE).with_suffix("")
    parts = rel.parts[:-1] if len(rel.parts) > 1 and rel.parts[-1] == "__init__" else rel.parts
    return ".".join(parts)


def _target(name: str, modules: set[str]) -> str | None:
    """The package module that ``eft_local.<name>`` (or a name inside it) is."""
    parts = name.split(".")
    for n in range(len(parts), 0, -1):
        candidate = ".".join(parts[:n])
        if candidate in modules:
            return candidate
    return None


def import_graph() -> dict[str, set[str]]:
    """Module -> the package modules it imports anywhere in its file, plus the modules of
    the commands it registers by name."""
    paths = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    modules = {m for m in paths if not m.endswith("__init__") or m == "__init__"}
    graph = {}
    for name, path in paths.items():
        if name not in modules:
            continue
        text = path.read_text("utf-8")
        deps: set[str] = set()
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("eft_local"):
                base = node.module[len("eft_local."):] if node.module != "eft_local" else ""
                for alias in node.names:
                    found = _target(f"{base}.{alias.name}".strip("."), modules)
                    found = found or (_target(base, modules) if base else None)
                    if found:
                        deps.add(found)
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name.startswith("eft_local."):
                        found = _target(alias.name[len("eft_local."):], modules)
                        if found:
                            deps.add(found)
        deps.update(re.findall(r'register\(\s*"[^"]+",\s*"eft_local\.([\w.]+):', text))
        graph[name] = (deps & modules) - {name}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a list of modules, or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: finished
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for dep in sorted(graph[node]):
            if state.get(dep) == 1:
                return path[path.index(dep):] + [dep]
            if dep not in state and (found := visit(dep)):
                return found
        path.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (found := visit(start)):
            return found
    return None


def test_the_package_has_no_import_cycle() -> None:
    graph = import_graph()
    assert {"cli.main", "cli.repl", "cli.options", "server.app", "engine"} <= set(graph)
    assert "cli.repl" in graph["cli.main"]  # registered by name: counted
    cycle = find_cycle(graph)
    assert cycle is None, " -> ".join(cycle)


def test_every_module_has_a_layer() -> None:
    assert set(import_graph()) == set(LAYERS)


def test_no_module_imports_upward() -> None:
    upward = [f"{m} (layer {LAYERS[m]}) imports {d} (layer {LAYERS[d]})"
              for m, deps in import_graph().items() for d in sorted(deps)
              if LAYERS[d] > LAYERS[m]]
    assert not upward, "; ".join(upward)


def test_the_cli_and_the_server_reach_the_engine_only_through_the_session() -> None:
    leaks = [f"{m} imports {d}" for m, deps in import_graph().items()
             if m.startswith(("cli.", "server.")) for d in sorted(deps & ENGINE_ROOM)]
    assert not leaks, "; ".join(leaks)


def test_only_the_backend_imports_llama_cpp() -> None:
    importers = sorted(module_name(p) for p in PACKAGE.rglob("*.py")
                       if re.search(r"^\s*(import llama_cpp|from llama_cpp)",
                                    p.read_text("utf-8"), re.M))
    assert importers == ["backend.library"]


def test_no_module_is_over_600_lines() -> None:
    long = {module_name(p): n for p in PACKAGE.rglob("*.py")
            if (n := len(p.read_text("utf-8").splitlines())) > 600}
    assert not long


def test_the_cycle_finder_finds_one() -> None:
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None
