"""One import namespace: the repository's top-level folders install as `flowspeed.*`, so a project
with its own `configs` or `tasks` package neither shadows flowspeed nor is shadowed by it."""

from __future__ import annotations

import tomllib
from pathlib import Path

from tests.test_layering import imported_modules

ROOT = Path(__file__).resolve().parents[1]
FOLDERS = ("flows", "tasks", "engines", "datasets_prep", "evaluation", "configs")


def test_every_package_folder_is_in_the_wheel() -> None:
    """setuptools cannot discover packages under a mapped name, so the list is explicit: a new
    sub-package left out of it would be missing from every wheel while the editable install works."""
    tool = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    on_disk = {
        "flowspeed." + ".".join(init.parent.relative_to(ROOT).parts)
        for folder in FOLDERS
        for init in (ROOT / folder).rglob("__init__.py")
    }
    assert set(tool["packages"]) == on_disk
    assert tool["package-dir"] == {f"flowspeed.{f}": f for f in FOLDERS}


def test_no_code_imports_a_bare_top_level_name() -> None:
    """`import engines` works from the repository root only; installed, it is `flowspeed.engines`."""
    offenders = {
        str(path.relative_to(ROOT)): sorted(m for m in imported_modules(path) if m.split(".")[0] in FOLDERS)
        for folder in (*FOLDERS, "tests", "benchmarks")
        for path in sorted((ROOT / folder).rglob("*.py"))
    }
    assert not {k: v for k, v in offenders.items() if v}
