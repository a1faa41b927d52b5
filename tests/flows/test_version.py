"""`flowspeed --version` names the installed distribution's version (what a bug report or a run record needs)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path


def _flowspeed() -> str:
    return shutil.which("flowspeed", path=str(Path(sys.executable).parent)) or "flowspeed"


def test_version_prints_the_installed_version_and_exits_zero() -> None:
    out = subprocess.run([_flowspeed(), "--version"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == f"flowspeed {version('flowspeed')}"


def test_the_commands_are_still_listed_beside_the_option() -> None:
    out = subprocess.run([_flowspeed(), "--help"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "--version" in out.stdout and "demo-data" in out.stdout and "run" in out.stdout
