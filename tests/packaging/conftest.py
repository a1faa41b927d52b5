"""`wheel_venv`: a fresh virtualenv with the freshly built flowspeed wheel installed, for tests of what a
user gets from `pip install flowspeed` (recipes as package data, the console script, pyfunc models served
with only flowspeed installed), as opposed to the editable install the rest of the suite runs against.

Installing torch, diffusers, mlflow, ... into a new venv takes many minutes, too slow for CI. So the venv
shares the dev venv's third-party packages through a `.pth` file holding one plain path line (the dev
site-packages): `site` adds that directory to sys.path but does not process the `.pth` files inside it,
so the dev venv's editable-install finder (`__editable__.flowspeed-*.pth`) stays inactive and every
`flowspeed.*` module comes from the wheel. The wheel goes in before that `.pth` exists (`pip --python`,
`--no-deps`): pip then sees nothing of the dev venv and can neither uninstall nor touch its flowspeed.

    def test_something(wheel_venv: Path) -> None:
        subprocess.run([wheel_venv, "-m", "flowspeed.flows.cli", "--help"], cwd=tmp_path, env=venv_env())
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
# what `python -m build` needs of the source tree: the folders pyproject maps into flowspeed.*, the metadata
SOURCES = ("flows", "tasks", "engines", "datasets_prep", "evaluation", "configs", "pyproject.toml", "README.md")


def venv_env(**extra: str) -> dict[str, str]:
    """The environment for a command in the wheel venv: no PYTHONPATH (which could bring the repository
    back), no tracking/orchestration server inherited from the caller."""
    env = {k: v for k, v in os.environ.items() if k not in {"PYTHONPATH", "MLFLOW_TRACKING_URI", "PREFECT_API_URL"}}
    return {**env, **extra}


def _run(cmd: list[str | Path], **kw: object) -> None:
    out = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, **kw)  # type: ignore[call-overload]
    if out.returncode != 0:
        command = " ".join(map(str, cmd))
        raise RuntimeError(f"{command} failed ({out.returncode}):\n{out.stdout[-3000:]}{out.stderr[-3000:]}")


def build_wheel(out_dir: Path) -> Path:
    """The flowspeed wheel from a copy of the sources, so the build's `build/` and `*.egg-info` never land in
    the working tree that other runs share. No build isolation: the build backend (setuptools, a pyproject
    requirement the dev extra installs) is taken from this venv instead of being installed again."""
    src = out_dir / "src"
    for name in SOURCES:
        if (ROOT / name).is_dir():
            ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info")
            shutil.copytree(ROOT / name, src / name, ignore=ignore)
        else:
            shutil.copy2(ROOT / name, src / name)
    _run([sys.executable, "-m", "build", "--wheel", "--no-isolation", "--outdir", out_dir / "dist", src])
    (wheel,) = (out_dir / "dist").glob("flowspeed-*.whl")
    return wheel


def make_wheel_venv(root: Path) -> Path:
    """A venv under `root` with the built wheel installed and the dev venv's third-party packages visible;
    returns its python."""
    wheel = build_wheel(root)
    venv = root / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", venv])
    python = venv / "bin" / "python"
    # `--python` runs this pip against the new interpreter, which does not see the dev venv yet.
    _run([sys.executable, "-m", "pip", "--python", python, "install", "--no-deps", "--no-index", "--quiet", wheel])
    where = "import sysconfig; print(sysconfig.get_paths()['purelib'])"
    purelib = Path(subprocess.check_output([python, "-c", where], text=True).strip())
    (purelib / "flowspeed_dev_site.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    return python


@pytest.fixture(scope="session")
def wheel_venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The python of a fresh venv with the freshly built flowspeed wheel installed (see the module docstring)."""
    return make_wheel_venv(tmp_path_factory.mktemp("wheel-venv"))
