"""The libraries stay plain: `configs`, `datasets_prep`, `engines` and `evaluation` never import Prefect
(only `tasks` wraps them as Prefect tasks and `flows` composes those), so they run inside a torchrun
rank, a notebook or another orchestrator without a Prefect API, and their import cost stays theirs."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LIBRARIES = ("configs", "datasets_prep", "engines", "evaluation")


def imported_modules(path: Path) -> set[str]:
    """Every module a file imports, at module level or inside a function."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.add(node.module)
    return names


@pytest.mark.parametrize("package", LIBRARIES)
def test_libraries_never_import_prefect_or_the_layers_above(package: str) -> None:
    offenders = {
        str(path.relative_to(ROOT)): sorted(
            m
            for m in imported_modules(path)
            if m.split(".")[0] == "prefect" or m.split(".")[:2] in (["flowspeed", "tasks"], ["flowspeed", "flows"])
        )
        for path in sorted((ROOT / package).rglob("*.py"))
    }
    offenders = {k: v for k, v in offenders.items() if v}
    assert not offenders, f"{package} must stay a plain library (no Prefect, tasks or flows): {offenders}"


def test_the_check_sees_function_level_imports(tmp_path: Path) -> None:
    f = tmp_path / "m.py"
    f.write_text("def f():\n    from prefect import task\n    import flowspeed.flows.cli\n")
    assert {"prefect", "flowspeed.flows.cli"} <= imported_modules(f)
