"""The layout's rules, read from the code (issue 25): no import circle, the library never imports the command
line or the service, and no function is longer than 80 lines. Imports inside functions count too."""

from __future__ import annotations

import ast
from pathlib import Path

import networkx as nx
import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = SRC / "moleflow"
MAX_FUNCTION_LINES = 80


def module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _resolve(module: str, is_package: bool, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    base = module.split(".") if is_package else module.split(".")[:-1]
    base = base[:len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def import_graph() -> nx.DiGraph:
    """moleflow module -> the moleflow modules it imports (a name imported from a package counts as its
    submodule when there is one)."""
    files = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph = nx.DiGraph()
    graph.add_nodes_from(files)
    for module, path in files.items():
        is_package = path.name == "__init__.py"
        for node in ast.walk(ast.parse(path.read_text())):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = _resolve(module, is_package, node)
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in files else base for a in node.names]
            for target in targets:
                while target and target not in files:
                    target = target.rpartition(".")[0]
                if target.startswith("moleflow") and target != module:
                    graph.add_edge(module, target)
    return graph


def test_no_import_circle():
    graph = import_graph()
    graph.remove_node("moleflow")  # the package's face re-exports; nothing inside imports it for its names
    circles = [sorted(c) for c in nx.strongly_connected_components(graph) if len(c) > 1]
    assert not circles, f"import circles: {circles}"


@pytest.mark.parametrize("upper", ["moleflow.cli", "moleflow.serve"])
def test_the_library_never_imports_the_command_line_or_the_service(upper):
    graph = import_graph()
    allowed = ("moleflow.cli",) if upper == "moleflow.serve" else ()
    wrong = sorted((a, b) for a, b in graph.edges
                   if (b == upper or b.startswith(upper + ".")) and not a.startswith(upper)
                   and not a.startswith(allowed) and a != "moleflow")
    assert not wrong, f"lower layers import {upper}: {wrong}"


def test_no_function_is_longer_than_80_lines():
    long = []
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    long.append(f"{path.relative_to(SRC)}:{node.lineno} {node.name} ({lines} lines)")
    assert not long, long
