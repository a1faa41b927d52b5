"""The evaluation package is layered: its modules import each other without a circle (counting imports inside
functions, which a lazy import would otherwise hide), and it asks a family what it can do (`family.can`),
never its class or kind."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "evaluation"
PREFIX = ["flowspeed", "evaluation"]


def _modules() -> dict[str, ast.Module]:
    return {p.stem: ast.parse(p.read_text(), str(p)) for p in sorted(PACKAGE.glob("*.py"))}


def _imported(tree: ast.Module, names: set[str]) -> set[str]:
    """The evaluation modules a module imports, at any depth: `import flowspeed.evaluation.x`,
    `from flowspeed.evaluation.x import y`, `from flowspeed.evaluation import x`, `from .x import y`,
    `from . import x`."""
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                parts = alias.name.split(".")
                if parts[:2] == PREFIX and len(parts) > 2:
                    found.add(parts[2])
        elif isinstance(node, ast.ImportFrom):
            parts = (node.module or "").split(".")
            if node.level == 0 and parts[:2] != PREFIX:
                continue
            sub = parts[2:] if node.level == 0 else [p for p in parts if p]
            if sub:
                found.add(sub[0])
            else:  # `from flowspeed.evaluation import x`: x is a module when the package has it
                found |= {a.name for a in node.names if a.name in names}
    return found & names


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    names = set(modules) - {"__init__"}
    return {m: _imported(tree, names) - {m} for m, tree in modules.items() if m in names}


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle as a path (first module repeated at the end), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        path.append(m)
        for n in sorted(graph[m]):
            if state.get(n) == 1:
                return path[path.index(n) :] + [n]
            if n not in state and (found := visit(n)):
                return found
        path.pop()
        state[m] = 2
        return None

    for m in sorted(graph):
        if m not in state and (found := visit(m)):
            return found
    return None


def test_the_cycle_finder_sees_a_circle_through_a_function_level_import() -> None:
    tree = ast.parse("def f():\n    from flowspeed.evaluation.b import x\n")
    graph = {"a": _imported(tree, {"a", "b"}), "b": {"a"}}
    assert _cycle(graph) == ["a", "b", "a"]
    assert _imported(ast.parse("from flowspeed.evaluation import b as m\nfrom .a import y\n"), {"a", "b"}) == {"a", "b"}


def test_evaluation_modules_import_each_other_without_a_circle() -> None:
    graph = _graph()
    assert graph["run"] and "sequence_eval" in graph["run"]  # the walk sees the package's real imports
    assert _cycle(graph) is None, f"import circle in evaluation/: {' -> '.join(_cycle(graph) or [])}"
    assert not [m for m, deps in graph.items() if "run" in deps], (
        "flowspeed.evaluation.run is the top: nothing imports it"
    )


def test_eval_asks_families_for_capabilities_not_class_or_kind() -> None:
    for name, tree in _modules().items():
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and node.attr == "kind" and "family" in ast.unparse(node.value):
                raise AssertionError(f"evaluation/{name}.py:{node.lineno} reads family.kind: ask family.can(...)")
            if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "isinstance":
                cls = ast.unparse(node.args[1])
                assert "Family" not in cls, f"evaluation/{name}.py:{node.lineno} tests isinstance(..., {cls})"
