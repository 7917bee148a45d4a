"""The package's layers: imports point one way (no circles), and the light modules stay light."""

from __future__ import annotations

import ast
from pathlib import Path

import sbmoe

PACKAGE = Path(sbmoe.__file__).parent


def import_graph() -> dict[str, set[str]]:
    """Module -> the sbmoe modules it imports, at module level or inside functions."""
    graph = {}
    for path in sorted(PACKAGE.glob("*.py")):
        name = path.stem
        imported = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("sbmoe"):
                parts = node.module.split(".")
                if len(parts) > 1:
                    imported.add(parts[1])
                else:  # from sbmoe import x
                    imported.update(
                        alias.name for alias in node.names if (PACKAGE / f"{alias.name}.py").exists()
                    )
            elif isinstance(node, ast.Import):
                imported.update(
                    alias.name.split(".")[1] for alias in node.names if alias.name.startswith("sbmoe.")
                )
        graph[name] = imported - {name, "__init__"}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, str] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = "open"
        stack.append(node)
        for target in sorted(graph.get(node, ())):
            if state.get(target) == "open":
                return [*stack[stack.index(target) :], target]
            if target not in state and (cycle := visit(target)):
                return cycle
        stack.pop()
        state[node] = "done"
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_no_import_circle_anywhere_in_the_package():
    graph = import_graph()
    assert "cli" in graph and "training" in graph  # the scan sees the package
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph) or [])


def test_find_cycle_finds_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_lower_layers_never_import_higher_ones():
    graph = import_graph()
    higher = {"cli", "training", "experiments", "report", "demo"}
    for low in ("config", "errors", "runtime", "io", "index", "runs", "evaluation", "data", "moe_head"):
        assert not graph[low] & higher, f"{low} imports {sorted(graph[low] & higher)}"
    for search_layer in ("index", "shards", "retrieval", "evaluation", "encoding", "cache"):
        assert "training" not in graph[search_layer], f"{search_layer} imports training"
