"""Team mode against real servers: a PostgreSQL-backed MLflow tracking server and Prefect server on
loopback ports, a process worker, deployments from prefect.yaml, the registry gates, an MLflow
outage in the middle of training, and both UIs rendered by headless Chromium.

Only environment variables differ from the embedded defaults (MLFLOW_TRACKING_URI, PREFECT_API_URL).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
import urllib.parse
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from mlflow import MlflowClient

from tests.conftest import REPO
from tests.servers import Server, base_env, database, mlflow_server, prefect_server, require_postgres

pytestmark = pytest.mark.slow
BIN = Path(sys.executable).parent


@dataclass
class Team:
    folder: Path
    ml: Server
    pf: Server
    env: dict[str, str]
    prep_dir: Path

    def run(self, *argv: str, timeout: int = 600, env: dict[str, str] | None = None) -> str:
        out = subprocess.run(argv, env=env or self.env, cwd=REPO, capture_output=True, text=True, timeout=timeout)
        assert out.returncode == 0, f"{argv}\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
        return out.stdout

    def prefect(self, *args: str) -> str:
        return self.run(str(BIN / "prefect"), *args)

    def flowspeed(self, *args: str, timeout: int = 600) -> str:
        return self.run(str(BIN / "flowspeed"), *args, timeout=timeout)

    @property
    def client(self) -> MlflowClient:
        return MlflowClient(self.ml.url)  # type: ignore[attr-defined]


@pytest.fixture(scope="module")
def team(tmp_path_factory: pytest.TempPathFactory) -> Team:
    require_postgres()
    folder = tmp_path_factory.mktemp("team")
    with database("flowspeed_mlflow") as mlflow_db, database("flowspeed_prefect") as prefect_db:
        ml, pf = mlflow_server(folder, mlflow_db), prefect_server(folder, prefect_db)
        try:
            ml.start()
            pf.start()
            env = base_env(folder) | {
                "MLFLOW_TRACKING_URI": ml.url,  # type: ignore[attr-defined]
                "PREFECT_API_URL": f"{pf.url}/api",  # type: ignore[attr-defined]
                # Fail an HTTP call in seconds rather than minutes: the tracker has its own retry loop.
                "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
                "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
            }
            yield Team(folder, ml, pf, env, folder / "prep")
        finally:
            ml.stop()
            pf.stop()


def _cfg(team: Team, name: str, manifest: Path, **sections: Any) -> dict[str, Any]:
    cfg: dict[str, Any] = {
        "workdir": str(team.folder / name),
        "data": {"manifest": str(manifest), "output_dir": str(team.prep_dir)},
        "model": {"max_text_length": 32},
        "train": {"max_steps": 3, "checkpoint_every": 3, "gpu_slots": {"name": "gpu-team-node"}},
        "eval": {"prompts": ["a red circle"]},
        "tracking": {"experiment": "team-deployed", "system_metrics": True, "system_metrics_interval_s": 1},
    }
    for key, value in sections.items():
        cfg[key] = {**cfg.get(key, {}), **value}
    return cfg


@pytest.fixture(scope="module")
def deployed(team: Team, demo_manifest: Path) -> dict[str, Any]:
    """prefect.yaml deployed to the server; the pipeline deployment run by a process worker."""
    team.prefect("work-pool", "create", "local", "--type", "process")
    team.prefect("--no-prompt", "deploy", "--all")
    params = {"cfg": _cfg(team, "deployed", demo_manifest)}
    created = team.prefect("deployment", "run", "pipeline/flowspeed-pipeline", "--params", json.dumps(params))
    flow_run_id = created.split("UUID:")[1].split()[0]
    team.prefect("worker", "start", "--pool", "local", "--run-once")
    return {"flow_run_id": flow_run_id, "state": team.prefect("flow-run", "inspect", flow_run_id)}


def _runs(team: Team, experiment: str) -> dict[str, Any]:
    exp = team.client.get_experiment_by_name(experiment)
    assert exp is not None, f"no experiment {experiment} on the MLflow server"
    return {r.data.tags["flowspeed.stage"]: r for r in team.client.search_runs([exp.experiment_id])}


def test_deployed_pipeline_runs_on_a_worker_into_the_mlflow_server(team: Team, deployed: dict[str, Any]) -> None:
    assert "COMPLETED" in deployed["state"]
    assert "retries=1" in deployed["state"]  # the work pool's job variables gave the flow run its retry
    for name in ("prep/flowspeed-prep", "train/flowspeed-train", "evaluate/flowspeed-evaluate"):
        assert "local" in team.prefect("deployment", "inspect", name)
    schedules = team.prefect("deployment", "schedule", "ls", "pipeline/flowspeed-nightly-finetune")
    assert "0 2 * * *" in schedules and "False" in schedules  # deployed paused

    runs = _runs(team, "team-deployed")
    assert set(runs) == {"pipeline", "prep", "train", "eval"}
    assert all(r.info.status == "FINISHED" for r in runs.values())
    train = runs["train"]
    history = team.client.get_metric_history(train.info.run_id, "train/loss")
    assert sorted(m.step for m in history) == [1, 2, 3]
    assert any(k.startswith("system/cpu_utilization") for k in train.data.metrics), sorted(train.data.metrics)
    assert train.data.tags["prefect.flow_run_url"].startswith(team.pf.url)  # type: ignore[attr-defined]
    assert train.data.tags["flowspeed.parallel_layout"].startswith("nnodes=1")
    artifacts = {a.path for a in team.client.list_artifacts(runs["eval"].info.run_id)}
    assert {"eval_samples.json", "videos", "metrics.json"} <= artifacts  # in the server's artifact store
    model = {a.path for a in team.client.list_artifacts(train.info.run_id, "model")}
    assert "model/MLmodel" in model and "model/model_index.json" in model
    gcl = team.prefect("global-concurrency-limit", "inspect", "gpu-team-node")
    assert "gpu-team-node" in gcl and "limit" in gcl.lower()


def test_registry_gates_and_incremental_data_on_the_servers(team: Team, demo_manifest: Path) -> None:
    """First run: champion. A diverging learning rate: challenger, champion stays. A finetune of the
    champion on one new clip (which alone is encoded): better, so champion moves to it."""
    registry = {"enabled": True, "model_name": "team-nightly"}
    common = {"tracking": {"experiment": "team-gates", "registry": registry, "system_metrics": False},
              "train": {"max_steps": 10, "checkpoint_every": 10, "gpu_slots": {"name": "gpu-team-node"}}}  # fmt: skip

    def pipeline(name: str, **extra: Any) -> dict[str, Any]:
        cfg = _cfg(team, name, demo_manifest, **common)
        for key, value in extra.items():
            cfg[key] = {**cfg[key], **value}
        path = team.folder / f"{name}.yaml"
        path.write_text(json.dumps(cfg))
        team.flowspeed("run", str(path))
        (run,) = [r for r in team.client.search_runs(
            [team.client.get_experiment_by_name("team-gates").experiment_id],
            f"tags.`flowspeed.stage` = 'pipeline' and attributes.run_name LIKE '{name}-%'")]  # fmt: skip
        return run.data.tags | {f"metric:{k}": v for k, v in run.data.metrics.items()}

    # The first version's model stays in its export folder (a big model is not copied into the artifact
    # store): the registry points at the folder; the later ones point at the train run's artifacts.
    first = pipeline("gate-a", tracking={**common["tracking"], "log_model": "never"})
    assert first["flowspeed.registry.alias"] == "champion" and first["flowspeed.registry.version"] == "1"
    worse = pipeline("gate-b", train={**common["train"], "lr": 0.5})
    assert worse["flowspeed.registry.alias"] == "challenger", worse["flowspeed.registry.reasons"]
    assert worse["metric:eval/val_loss"] > first["metric:eval/val_loss"]
    assert str(team.client.get_model_version_by_alias("team-nightly", "champion").version) == "1"

    incoming = team.folder / "incoming"
    incoming.mkdir()
    shutil.copy(next(demo_manifest.parent.glob("videos/*.mp4")), incoming / "tonight.mp4")
    (incoming / "tonight.txt").write_text("a clip that arrived today")
    better = pipeline("gate-c", train={**common["train"], "init_from": "champion"},
                      data={"incoming": str(incoming)})  # fmt: skip
    assert better["flowspeed.init_from"] == "models:/team-nightly@champion (version 1)"
    exp = team.client.get_experiment_by_name("team-gates").experiment_id
    (prep_run,) = team.client.search_runs([exp], "tags.`flowspeed.stage` = 'prep' and run_name LIKE 'gate-c-%'")
    assert prep_run.data.metrics["prep/num_encoded"] == 1  # only the new clip
    assert better["flowspeed.registry.alias"] == "champion", better["flowspeed.registry.reasons"]
    assert str(team.client.get_model_version_by_alias("team-nightly", "champion").version) == "3"
    import mlflow.artifacts
    from mlflow.models import Model

    source = team.client.get_model_version("team-nightly", "3").source  # the train run's model artifact
    mlmodel = mlflow.artifacts.download_artifacts(artifact_uri=f"{source}/MLmodel", tracking_uri=team.ml.url,
                                                  dst_path=str(team.folder / "v3"))  # fmt: skip
    signature = Model.load(mlmodel).signature  # the registered version is a pyfunc model with a signature
    assert signature is not None and "prompt" in signature.inputs.input_names()


def test_training_survives_an_mlflow_outage_and_every_metric_arrives_once(team: Team, demo_manifest: Path) -> None:
    steps = 2000  # 20-30 ms each: training is still stepping while the server is away, even on a fast machine
    cfg = _cfg(team, "outage", demo_manifest,
               train={"max_steps": steps, "checkpoint_every": steps, "metrics_flush_every": 5,
                      "gpu_slots": {"name": "gpu-team-node"}},
               tracking={"experiment": "team-outage", "system_metrics": False})  # fmt: skip
    path = team.folder / "outage.yaml"
    path.write_text(json.dumps(cfg))
    team.flowspeed("prep", str(path))
    proc = subprocess.Popen([str(BIN / "flowspeed"), "train", str(path)], env=team.env, cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)  # fmt: skip
    try:
        client, deadline = team.client, time.monotonic() + 300
        while True:  # wait for the first steps to reach the server, then take it away
            exp = client.get_experiment_by_name("team-outage")
            runs = client.search_runs([exp.experiment_id], "tags.`flowspeed.stage` = 'train'") if exp else []
            if runs and len(client.get_metric_history(runs[0].info.run_id, "train/loss")) >= 3:
                break
            assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read() if proc.stdout else ""
            time.sleep(0.2)
        run_id = runs[0].info.run_id
        team.ml.stop()
        down = time.time() * 1000
        time.sleep(8)
        assert proc.poll() is None, "training stopped when the MLflow server went away"
        up = time.time() * 1000
        team.ml.start()
        out, _ = proc.communicate(timeout=600)
        assert proc.returncode == 0, out[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()
    run = client.get_run(run_id)
    per_step = [k for k in run.data.metrics if k.startswith(("train/", "perf/"))]
    assert "train/loss" in per_step
    for key in per_step:
        got = sorted(m.step for m in client.get_metric_history(run_id, key))
        assert got == sorted(set(got)), f"{key}: a step logged twice"
    history = client.get_metric_history(run_id, "train/loss")
    assert sorted(m.step for m in history) == list(range(1, steps + 1))
    during = [m.step for m in history if down < m.timestamp < up]
    assert len(during) >= 2, "no step was logged while the server was down: the outage was not exercised"
    assert run.info.status == "FINISHED"


def _dom(url: str) -> str:
    """The page after its scripts ran (the UIs are single-page apps that fetch from their APIs)."""
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("needs Debian's chromium (apt-get install chromium); .ci/run installs it")
    out = subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu", "--virtual-time-budget=30000",
                          "--dump-dom", url], capture_output=True, text=True, timeout=120)  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout


def test_the_uis_show_the_compared_runs_and_the_deployments(team: Team, deployed: dict[str, Any]) -> None:
    assert "COMPLETED" in deployed["state"]
    runs = _runs(team, "team-deployed")
    ids = [r.info.run_id for r in runs.values()]
    experiment = runs["pipeline"].info.experiment_id
    query = urllib.parse.urlencode({"runs": json.dumps(ids), "experiments": json.dumps([experiment])})
    page = _dom(f"{team.ml.url}/#/compare-runs?{query}")  # type: ignore[attr-defined]
    assert "Compare" in page
    for run in runs.values():
        assert run.info.run_name in page
    page = _dom(f"{team.pf.url}/deployments")  # type: ignore[attr-defined]
    for name in ("flowspeed-pipeline", "flowspeed-nightly-finetune", "flowspeed-train"):
        assert name in page
