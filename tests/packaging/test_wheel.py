"""What `pip install flowspeed` gives a user: the built wheel, in a fresh venv, run from a project directory
that has its own `configs` and `tasks` packages (common in ML projects; the reason for the flowspeed.*
namespace). Recipes, the demo data and the quickstart must work from the installed package alone."""

from __future__ import annotations

import concurrent.futures
import json
import subprocess
import sys
from pathlib import Path

import pytest
from flowspeed.configs.recipes import recipes

from tests.packaging.conftest import ROOT, venv_env

# Run from the project directory, so its own packages are importable, as a user's script or notebook there
# has them: the user's `configs`/`tasks` are imported first, then flowspeed's CLI runs in the same process.
# Every flowspeed.* module loaded is recorded at exit (the CLI ends through atexit hooks, not a teardown).
WRAPPER = """
import atexit, json, sys
import configs, tasks  # the user's own packages, loaded before flowspeed

def record():
    mods = {n: getattr(m, "__file__", None) for n, m in list(sys.modules.items()) if n.split(".")[0] == "flowspeed"}
    user = {"configs": getattr(sys.modules["configs"], "OWNER", None), "tasks": sys.modules["tasks"].__file__}
    with open("modules.json", "w") as f:
        json.dump({"flowspeed": mods, "user": user}, f)

atexit.register(record)
sys.argv = ["flowspeed", *sys.argv[1:]]
from flowspeed.flows.cli import main
main()
"""


def _flowspeed(python: Path, cwd: Path, *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """The venv's installed `flowspeed` console script (the entry point pip wrote from the wheel)."""
    cmd = [str(python.parent / "flowspeed"), *args]
    out = subprocess.run(cmd, cwd=cwd, env=venv_env(), capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, f"{' '.join(args)}: {out.stdout[-2000:]}{out.stderr[-4000:]}"
    return out


@pytest.mark.slow
def test_the_wheel_runs_the_quickstart_recipe_beside_a_users_own_configs_package(
    wheel_venv: Path, tmp_path: Path
) -> None:
    project = tmp_path / "project"
    (project / "configs").mkdir(parents=True)
    (project / "configs" / "__init__.py").write_text('OWNER = "the user"\n')
    (project / "tasks").mkdir()
    (project / "tasks" / "__init__.py").write_text("")

    with concurrent.futures.ThreadPoolExecutor(2) as pool:  # two independent commands: both at once
        listing = pool.submit(_flowspeed, wheel_venv, project, "recipes", "list")
        demo = pool.submit(_flowspeed, wheel_venv, project, "demo-data", "runs/demo", "--num-videos", "4",
                           "--num-images", "2")  # fmt: skip
        listed = listing.result().stdout
        demo.result()
    names = {line.split()[0] for line in listed.splitlines() if line.strip()}
    assert names == set(recipes())  # package data: every recipe of the checkout made it into the wheel
    assert {"quickstart", "sd3-t2i", "qwen2_vl-sft", "eval/sd3", "published/opensora-v1.2"} <= names

    assert (project / "runs" / "demo" / "data.jsonl").is_file()

    # the quickstart recipe by name (no configs/ file here: the user's configs/ is a Python package), at its
    # smallest: 2 steps, 1 prompt, 1 denoising step
    (project / "run_flowspeed.py").write_text(WRAPPER)
    small = [
        "train.max_steps=2",
        "train.checkpoint_every=2",
        "eval.num_inference_steps=1",
        "eval.prompts=[a red circle]",
    ]
    cmd = [str(wheel_venv), "run_flowspeed.py", "run", "quickstart", *(a for s in small for a in ("--set", s))]
    out = subprocess.run(cmd, cwd=project, env=venv_env(), capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, f"{out.stdout[-2000:]}{out.stderr[-4000:]}"
    exports = list(project.glob("runs/**/final/model_index.json"))
    assert len(exports) == 1, f"one diffusers export under {project / 'runs'}: {exports}"
    (metrics,) = project.glob("runs/**/eval/*/metrics.json")
    evaluated = json.loads(metrics.read_text())
    assert evaluated["metrics"]["eval/val_loss"] > 0 and len(evaluated["videos"]) == 1

    loaded = json.loads((project / "modules.json").read_text())
    files = {name: f for name, f in loaded["flowspeed"].items() if f}
    assert {"flowspeed.flows.cli", "flowspeed.configs.recipes", "flowspeed.configs.loader"} <= files.keys()
    site = wheel_venv.parent.parent / "lib"
    outside = {name: f for name, f in files.items() if not Path(f).is_relative_to(site)}
    assert not outside, f"flowspeed modules not from the wheel: {outside}"
    assert not any(str(ROOT) in f for f in files.values())
    assert loaded["user"] == {"configs": "the user", "tasks": str(project / "tasks" / "__init__.py")}


def test_the_dev_venv_keeps_its_editable_install(wheel_venv: Path) -> None:
    """Building and installing the wheel never touches the dev venv: flowspeed there is still this checkout."""
    where = "import flowspeed.flows.cli as c; print(c.__file__)"
    assert wheel_venv.exists()
    out = subprocess.run([sys.executable, "-c", where], capture_output=True, text=True, cwd="/", check=True)
    assert Path(out.stdout.strip()) == ROOT / "flows" / "cli.py"
