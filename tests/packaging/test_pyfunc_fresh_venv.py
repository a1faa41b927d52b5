"""The quickstart export as an MLflow pyfunc model: its environment as MLflow reads it, and predictions served from a
fresh venv that has only the flowspeed wheel installed (`wheel_venv`, tests/packaging/conftest.py).

The export comes from the trainer's own `export_weights` on the untrained tiny quickstart model plus the train
stage's `write_mlmodel`: serving depends on the layout and the environment files, not on what the weights learned.
"""

from __future__ import annotations

import json
import os
import platform
import signal
import socket
import subprocess
import time
import urllib.request
from importlib.metadata import version
from pathlib import Path

import mlflow
import pytest
import yaml
from flowspeed.configs import PipelineConfig
from flowspeed.datasets_prep.probe import probe
from flowspeed.engines.export import export_weights, plain_model
from flowspeed.engines.models import get_family
from flowspeed.engines.models.cogvideox import TEXT_PRESETS, VAE_PRESETS
from flowspeed.engines.tracking.serving import write_mlmodel, write_pointer_model
from packaging.requirements import Requirement
from packaging.version import Version

from tests.packaging.conftest import venv_env

ARGS = {"text_embed_dim": TEXT_PRESETS["tiny"]["d_model"], "latent_channels": VAE_PRESETS["tiny"]["latent_channels"]}
PREDICT = """
import json, sys
import flowspeed.engines.tracking.serving as serving
import mlflow.pyfunc, pandas as pd
model = mlflow.pyfunc.load_model(sys.argv[1])
params = {"num_inference_steps": 1, "output_dir": sys.argv[2]}
out = model.predict(pd.DataFrame({"prompt": ["a red circle"]}), params=params)
print(json.dumps({"loader": serving.__file__, "paths": out["path"].tolist()}))
"""


@pytest.fixture(scope="module")
def quickstart_model(prepped: PipelineConfig, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The quickstart's `final/` with its MLmodel, as the train stage leaves it (read-only for the tests)."""
    family = get_family(prepped.model.family)
    final = tmp_path_factory.mktemp("quickstart-model") / "final"
    export_weights(family, prepped, ARGS, plain_model(family, prepped, ARGS).state_dict(), final)
    write_mlmodel(final, prepped)
    return final


def test_mlmodel_names_its_environment_pinned_as_installed(quickstart_model: Path, tmp_path: Path) -> None:
    info = mlflow.models.get_model_info(str(quickstart_model))
    env = info.flavors["python_function"]["env"]
    assert env == {"conda": "conda.yaml", "virtualenv": "python_env.yaml"}
    # MLflow's own reader of the requirements (what `mlflow models serve` and load_model's check use).
    reqs = Path(mlflow.pyfunc.get_model_dependencies(str(quickstart_model))).read_text().split()
    assert reqs[0] == f"flowspeed=={version('flowspeed')}"
    pins = {Requirement(r).name.lower(): Requirement(r) for r in reqs[1:]}
    assert {"torch", "diffusers", "transformers", "mlflow", "pandas", "cloudpickle"} <= pins.keys()
    for name, req in pins.items():  # each pinned exactly to what is installed (without a local label)
        assert str(req.specifier) == f"=={Version(version(name)).public}", name
    python_env = yaml.safe_load((quickstart_model / env["virtualenv"]).read_text())
    assert python_env["python"] == platform.python_version()
    assert python_env["dependencies"] == ["-r requirements.txt"]
    conda = yaml.safe_load((quickstart_model / env["conda"]).read_text())
    assert [d for d in conda["dependencies"] if isinstance(d, dict)][0]["pip"] == reqs
    # What a tracking server registers for a large export: the same description and environment, no weights.
    pointer = write_pointer_model(quickstart_model, tmp_path / "pointer")
    assert Path(mlflow.pyfunc.get_model_dependencies(str(pointer))).read_text().split() == reqs


def _serve(python: Path, model: Path, cwd: Path) -> tuple[subprocess.Popen, int]:
    """`mlflow models serve --env-manager local` in the venv of `python`, on a free port (not waited for).

    The server runs `uvicorn` from PATH: a pip-installed venv has that console script; `wheel_venv` shares the
    dev packages without their scripts, so a one-line stand-in runs uvicorn on the venv's own python."""
    bin_dir = cwd / "bin"
    bin_dir.mkdir()
    (bin_dir / "uvicorn").write_text(f'#!/bin/sh\nexec "{python}" -m uvicorn "$@"\n')
    (bin_dir / "uvicorn").chmod(0o755)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [python, "-m", "mlflow", "models", "serve", "-m", model, "--env-manager", "local",
           "--host", "127.0.0.1", "-p", str(port)]  # fmt: skip
    env = venv_env(PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    with (cwd / "serve.log").open("w") as log:  # the child keeps its own copy of the descriptor
        server = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    return server, port


def _wait_up(server: subprocess.Popen, port: int, log: Path, timeout_s: float = 180) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        assert server.poll() is None, log.read_text()[-3000:]
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=2).close()
            return
        except OSError:
            assert time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.5)


def _post(url: str, payload: dict) -> dict:
    req = urllib.request.Request(url, json.dumps(payload).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=120) as resp:
        return json.loads(resp.read())


@pytest.mark.slow
def test_fresh_venv_loads_predicts_and_serves(
    wheel_venv: Path, quickstart_model: Path, prepped: PipelineConfig, tmp_path: Path
) -> None:
    frames = (prepped.data.num_frames, prepped.data.height, prepped.data.width)
    server, port = _serve(wheel_venv, quickstart_model, tmp_path)  # boots while load_model + predict run
    try:
        # load_model + predict, from a directory that is not the repository
        out = subprocess.run([wheel_venv, "-c", PREDICT, quickstart_model, tmp_path / "out"], cwd=tmp_path,
                             env=venv_env(), capture_output=True, text=True, timeout=300)  # fmt: skip
        assert out.returncode == 0, out.stderr[-3000:]
        got = json.loads(out.stdout.strip().splitlines()[-1])
        assert Path(got["loader"]).is_relative_to(wheel_venv.parent.parent)  # the wheel's module, not the checkout's
        assert "mismatches between the model's dependencies" not in out.stderr  # requirements.txt fits the venv
        (video,) = map(Path, got["paths"])
        info = probe(video)
        assert (info.num_frames, info.height, info.width) == frames

        _wait_up(server, port, tmp_path / "serve.log")
        params = {"num_inference_steps": 1, "output_dir": str(tmp_path / "served")}
        body = _post(f"http://127.0.0.1:{port}/invocations",
                     {"dataframe_records": [{"prompt": "a blue square"}], "params": params})  # fmt: skip
    finally:
        os.killpg(server.pid, signal.SIGTERM)  # the server and the uvicorn it started
        server.wait(timeout=30)
    (row,) = body["predictions"]
    assert row["prompt"] == "a blue square" and Path(row["path"]).is_relative_to(tmp_path / "served")
    info = probe(Path(row["path"]))
    assert (info.num_frames, info.height, info.width) == frames
