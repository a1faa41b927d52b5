"""prefect.yaml against a real Prefect server: deploy, run through a process worker, Completed."""

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

from configs import PipelineConfig
from tests.conftest import REPO

PREFECT = [sys.executable, "-m", "prefect"]


def test_every_deployment_has_a_valid_config_and_the_nightly_one_is_paused() -> None:
    import importlib

    spec = yaml.safe_load((REPO / "prefect.yaml").read_text())
    deps = {d["name"]: d for d in spec["deployments"]}
    assert set(deps) == {"flowspeed-pipeline", "flowspeed-prep", "flowspeed-train", "flowspeed-evaluate",
                         "flowspeed-nightly-finetune"}  # fmt: skip
    for dep in deps.values():
        module, func = dep["entrypoint"].removesuffix(".py").replace("/", ".").split(":")
        assert hasattr(importlib.import_module(module.replace(".py", "")), func), dep["entrypoint"]
        cfg = PipelineConfig.model_validate(dep["parameters"]["cfg"])  # the run form's defaults validate
        assert cfg.model.family == "cogvideox" and dep["work_pool"]["name"] == "local"
    nightly = deps["flowspeed-nightly-finetune"]
    (schedule,) = nightly["schedules"]
    assert schedule["cron"] == "0 2 * * *" and schedule["active"] is False
    cfg = PipelineConfig.model_validate(nightly["parameters"]["cfg"])
    assert cfg.train.init_from == "champion" and cfg.tracking.registry.enabled and cfg.data.incoming


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_deployment_runs_on_a_process_worker(tmp_path: Path, demo_manifest: Path) -> None:
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_"))}
    env |= {
        "PREFECT_HOME": str(tmp_path / "prefect"),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_API_URL": f"http://127.0.0.1:{port}/api",
        "HF_HUB_OFFLINE": "1",
    }
    server = subprocess.Popen(
        [*PREFECT, "server", "start", "--port", str(port)],
        env=env,
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.time() + 120
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/api/health", timeout=2)
                break
            except OSError:
                assert time.time() < deadline, "prefect server did not start"
                time.sleep(0.5)

        def prefect(*args: str, timeout: int = 300) -> str:
            out = subprocess.run([*PREFECT, *args], env=env, cwd=REPO, capture_output=True, text=True, timeout=timeout)
            assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
            return out.stdout

        prefect("work-pool", "create", "local", "--type", "process")
        prefect("--no-prompt", "deploy", "--all")
        for name in ("prep/flowspeed-prep", "train/flowspeed-train", "evaluate/flowspeed-evaluate"):
            assert "local" in prefect("deployment", "inspect", name)  # registered, on the process pool
        schedules = prefect("deployment", "schedule", "ls", "pipeline/flowspeed-nightly-finetune")
        assert "0 2 * * *" in schedules and "False" in schedules  # deployed paused
        params = {
            "cfg": {
                "workdir": str(tmp_path / "work"),
                "data": {"manifest": str(demo_manifest)},
                "model": {"max_text_length": 32},
                "train": {"max_steps": 3},
                "eval": {"prompts": ["a red circle"]},
            }
        }
        created = prefect("deployment", "run", "pipeline/flowspeed-pipeline", "--params", json.dumps(params))
        flow_run_id = created.split("UUID:")[1].split()[0]
        prefect("worker", "start", "--pool", "local", "--run-once")
        state = prefect("flow-run", "inspect", flow_run_id)
        assert "COMPLETED" in state
        assert (tmp_path / "work" / "train" / "final" / "model_index.json").is_file()
        assert (tmp_path / "work" / "mlflow.db").is_file()
    finally:
        server.terminate()
        server.wait(timeout=30)
