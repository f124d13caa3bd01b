"""The package's import graph has no circle: every module of ``fbnprune/`` and the modules
it imports (at any place in the file, TYPE_CHECKING blocks and functions included)."""

from __future__ import annotations

import ast
from pathlib import Path

from conftest import REPO

PACKAGE = REPO / "fbnprune"


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """Module -> the fbnprune modules it imports (``from a import b`` counts ``a.b`` when
    that is a module, else ``a``)."""
    modules = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                for alias in node.names:
                    child = f"{node.module}.{alias.name}"
                    targets.append(child if child in modules else node.module)
            graph[name] |= {t for t in targets if t in modules and t != name}
    return graph


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph[node]):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                component.append(top)
                if top == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_the_walk_finds_a_planted_circle() -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert circles(graph) == [["a", "b", "c"]]
    assert circles({"a": {"b"}, "b": set()}) == []


def test_no_import_circles_in_the_package() -> None:
    graph = import_graph()
    assert "fbnprune.pipeline" in graph and graph["fbnprune.pipeline"]
    found = circles(graph)
    assert not found, "import circles: " + "; ".join(" <-> ".join(c) for c in found)


def room(module: str) -> str:
    """The folder (``fbnprune.heal``) or root module (``fbnprune.plan``) a module is in."""
    return ".".join(module.split(".")[:2])


def test_no_circles_between_folders() -> None:
    """A folder imports another only if that one does not import it back, through any path:
    the stage families, rundir, data, models and recipe stand in layers."""
    rooms: dict[str, set[str]] = {}
    for module, imported in import_graph().items():
        rooms.setdefault(room(module), set()).update(
            room(m) for m in imported if room(m) != room(module)
        )
    assert {"fbnprune.collect", "fbnprune.heal", "fbnprune.verdict"} <= set(rooms)
    found = circles(rooms)
    assert not found, "folders that import each other: " + "; ".join(" <-> ".join(c) for c in found)


# base names that stand for the same thing in every package
SHARED_NAMES = {"__init__", "stage", "errors"}


def test_no_two_modules_share_a_base_name() -> None:
    by_name: dict[str, list[str]] = {}
    for path in PACKAGE.rglob("*.py"):
        if path.stem not in SHARED_NAMES and "templates" not in path.parts:
            by_name.setdefault(path.stem, []).append(str(path.relative_to(PACKAGE)))
    twice = {name: paths for name, paths in by_name.items() if len(paths) > 1}
    assert not twice, f"modules that share a base name: {twice}"


# a stage's folder, where its name is taken: ``fbnprune.prune`` is the in-memory function
FAMILY = {"prune": "pruning"}


def test_every_stage_family_has_its_stage_module() -> None:
    from fbnprune.pipeline import STAGES

    for stage in STAGES:
        assert (PACKAGE / FAMILY.get(stage, stage) / "stage.py").is_file(), stage


def test_old_import_paths_are_the_new_modules() -> None:
    import importlib

    from fbnprune.moved import FORWARDED, MODULES, PACKAGES

    for old, new in MODULES.items():
        assert old != new
        assert importlib.import_module(old) is importlib.import_module(new), old
    for package in PACKAGES:
        assert importlib.import_module(package).__path__ == []
    for package, homes in FORWARDED.items():
        forwarded = importlib.import_module(package)
        for name, home in homes.items():
            assert getattr(forwarded, name) is getattr(importlib.import_module(home), name)
    from fbnprune.stages import pipeline  # a module of a package that is gone

    assert pipeline.run_pipeline is importlib.import_module("fbnprune.pipeline").run_pipeline
    import fbnprune.collect

    try:
        fbnprune.collect.no_such_name  # noqa: B018
    except AttributeError as exc:
        assert "no_such_name" in str(exc)
    else:
        raise AssertionError("a name the old module never had was served")
