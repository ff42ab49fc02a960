"""The package's modules import one another without a circle, not even under TYPE_CHECKING."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGES = [Path(__file__).resolve().parents[2] / name for name in ("whisperd", "whisperctl")]


def import_graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for package in PACKAGES:
        for path in package.glob("*.py"):
            name = f"{package.name}.{path.stem}"
            deps: set[str] = set()
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                    if node.module in ("whisperd", "whisperctl"):  # from whisperd import protocol
                        deps.update(f"{node.module}.{alias.name}" for alias in node.names)
                    else:
                        deps.add(node.module)
                elif isinstance(node, ast.Import):
                    deps.update(alias.name for alias in node.names)
            graph[name] = {d for d in deps if d != name}
    return {name: {d for d in deps if d in graph} for name, deps in graph.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    found: list[list[str]] = []
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        path.append(node)
        for dep in sorted(graph[node]):
            if state.get(dep) == 1:
                found.append([*path[path.index(dep) :], dep])
            elif dep not in state:
                visit(dep, path)
        path.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [])
    return found


def test_the_cycle_finder_finds_a_cycle() -> None:
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == [["a", "b", "c", "a"]]


def test_no_import_cycles() -> None:
    graph = import_graph()
    assert "whisperd.daemon" in graph and "whisperd.registry" in graph["whisperd.daemon"]
    assert cycles(graph) == []


def test_only_the_wiring_knows_the_daemon() -> None:
    importers = {name for name, deps in import_graph().items() if "whisperd.daemon" in deps}
    assert importers == {"whisperd.app"}
