"""Team mode against real servers, secured as the README's "Team mode" commands: a PostgreSQL-backed
MLflow tracking server running the basic-auth app and a Prefect server requiring an API auth
string, both on databases of a dedicated role with a password, on loopback ports; a process worker,
deployments from prefect.yaml, the registry gates, and both UIs rendered by headless Chromium, logged
in. (An MLflow server stopped and restarted in the middle of a `flowspeed train` is in
tests/faults/test_killed_runs.py, on a SQLite-backed server: the tracker does not depend on the store.)

Only environment variables differ from the embedded defaults: MLFLOW_TRACKING_URI and PREFECT_API_URL
point at the servers, MLFLOW_TRACKING_USERNAME/PASSWORD and PREFECT_API_AUTH_STRING carry the
credentials. Every command's output is checked for the secrets: none may ever be printed.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import urllib.parse
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any
from uuid import UUID

import pytest
from mlflow import MlflowClient

from tests.conftest import REPO
from tests.servers import (
    DOM_AND_LOADED_IMAGES,
    Secrets,
    Server,
    base_env,
    basic_auth,
    connected_roles,
    create_mlflow_user,
    database,
    db_role,
    http_status,
    mlflow_server,
    prefect_server,
    render,
    require_postgres,
)

if TYPE_CHECKING:
    from prefect.client.orchestration import SyncPrefectClient

pytestmark = pytest.mark.slow
BIN = Path(sys.executable).parent
POOL = "team-pool"  # not prefect.toml's default `local`: named by PREFECT_DEFAULT_WORK_POOL_NAME at deploy time


def _screenshot(team: Team, name: str) -> Path:
    """Where a UI's screenshot goes: FLOWSPEED_SCREENSHOTS_DIR when set (kept for a look, e.g. a CI artifact),
    else the module's folder."""
    return Path(os.environ.get("FLOWSPEED_SCREENSHOTS_DIR") or team.folder / "screenshots") / name


@dataclass
class Team:
    folder: Path
    ml: Server
    pf: Server
    env: dict[str, str]
    prep_dir: Path
    keys: Secrets
    databases: dict[str, str]

    def run(self, *argv: str, timeout: int = 600, env: dict[str, str] | None = None, ok: bool = True) -> str:
        out = subprocess.run(argv, env=env or self.env, cwd=REPO, capture_output=True, text=True, timeout=timeout)
        self.assert_no_secret(out.stdout + out.stderr, argv)
        if ok:
            assert out.returncode == 0, f"{argv}\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
            return out.stdout
        assert out.returncode != 0, f"{argv} succeeded:\n{out.stdout[-3000:]}"
        return out.stdout + out.stderr

    def assert_no_secret(self, text: str, what: object) -> None:
        for secret in self.keys.values():
            assert secret not in text, f"{what} printed a credential"

    def prefect(self, *args: str) -> str:
        return self.run(str(BIN / "prefect"), *args)

    def flowspeed(self, *args: str, timeout: int = 600) -> str:
        return self.run(str(BIN / "flowspeed"), *args, timeout=timeout)

    @property
    def client(self) -> MlflowClient:
        return MlflowClient(self.ml.url)

    def prefect_client(self) -> SyncPrefectClient:
        """Prefect's client on the server with the auth string: one in-process reader for the checks
        instead of a `prefect ... inspect` command each (every Prefect CLI start costs seconds of CPU)."""
        from prefect.client.orchestration import SyncPrefectClient

        return SyncPrefectClient(f"{self.pf.url}/api", auth_string=self.keys.prefect_auth_string)


def _start_together(*servers: Server) -> None:
    """Both servers boot at once (each takes tens of seconds on a busy 2-core machine)."""
    import concurrent.futures

    with concurrent.futures.ThreadPoolExecutor(len(servers)) as pool:
        for done in [pool.submit(server.start) for server in servers]:
            done.result()


@pytest.fixture(scope="module")
def team(tmp_path_factory: pytest.TempPathFactory) -> Team:
    require_postgres()
    folder = tmp_path_factory.mktemp("team")
    keys = Secrets.generate()
    with (
        db_role("flowspeed") as role,
        database("flowspeed_mlflow", role) as mlflow_db,
        database("flowspeed_mlflow_auth", role) as auth_db,
        database("flowspeed_prefect", role) as prefect_db,
    ):
        ml = mlflow_server(folder, mlflow_db, auth_db, role, keys)
        pf = prefect_server(folder, prefect_db, role, keys)
        saved = {k: os.environ.get(k) for k in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD")}
        try:
            _start_together(ml, pf)
            create_mlflow_user(ml, keys)
            env = (
                base_env(folder)
                | keys.client_env()
                | {
                    "MLFLOW_TRACKING_URI": ml.url,
                    "PREFECT_API_URL": f"{pf.url}/api",
                    # Fail an HTTP call in seconds rather than minutes: the tracker has its own retry loop.
                    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
                    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
                }
            )
            # The tests' own MlflowClient reads its credentials where flowspeed does: the environment.
            os.environ.update({k: env[k] for k in saved})
            databases = {"mlflow": mlflow_db, "mlflow_auth": auth_db, "prefect": prefect_db, "role": role.name}
            yield Team(folder, ml, pf, env, folder / "prep", keys, databases)
        finally:
            for key, value in saved.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value
            ml.stop()
            pf.stop()


def _cfg(team: Team, name: str, manifest: Path, **sections: Any) -> dict[str, Any]:
    cfg: dict[str, Any] = {
        "workdir": str(team.folder / name),
        "data": {"manifest": str(manifest), "output_dir": str(team.prep_dir)},
        "model": {"max_text_length": 32},
        "train": {"max_steps": 3, "checkpoint_every": 3, "gpu_slots": {"name": "gpu-team-node"}},
        "eval": {"prompts": ["a red circle"], "num_inference_steps": 1},  # one sample, one denoising step
        "tracking": {"experiment": "team-deployed", "system_metrics": True, "system_metrics_interval_s": 1},
    }
    for key, value in sections.items():
        cfg[key] = {**cfg.get(key, {}), **value}
    return cfg


def _recipe_overrides(team: Team, manifest: Path) -> list[str]:
    """`--set` items for the recipe deployment's second recipe: tiny, and with samples at its checkpoint
    (the suite turns them off by default), so its MLflow run page has an image to show."""
    return [f"data.manifest={manifest}", "data.max_samples=4", "model.max_text_length=32", "train.max_steps=2",
            "train.checkpoint_every=2", "train.gpu_slots.name=gpu-team-node", "eval.prompts=[a red circle]",
            "eval.num_inference_steps=1",
            "tracking.experiment=team-recipe", "tracking.samples.enabled=true"]  # fmt: skip


@pytest.fixture(scope="module")
def deployed(team: Team, demo_manifest: Path) -> dict[str, Any]:
    """prefect.yaml deployed to the server into a work pool of another name than the default; two runs
    taken by one poll of a process worker: the pipeline deployment with a full typed config, and the
    recipe deployment with a second recipe picked by name plus `--set` style overrides."""
    team.prefect("work-pool", "create", POOL, "--type", "process")
    team.run(str(BIN / "prefect"), "--no-prompt", "deploy", "--all",
             env=team.env | {"PREFECT_DEFAULT_WORK_POOL_NAME": POOL})  # fmt: skip
    params = {"cfg": _cfg(team, "deployed", demo_manifest)}
    created = team.prefect("deployment", "run", "pipeline/flowspeed-pipeline", "--params", json.dumps(params))
    flow_run_id = created.split("UUID:")[1].split()[0]
    recipe_params = {"recipe": "sd3-quickstart", "overrides": _recipe_overrides(team, demo_manifest),
                     "workdir": str(team.folder / "recipe")}  # fmt: skip
    with team.prefect_client() as client:  # as the run form or `prefect deployment run --param` would
        recipe_dep = client.read_deployment_by_name("recipe/flowspeed-recipe")
        recipe_run_id = client.create_flow_run_from_deployment(recipe_dep.id, parameters=recipe_params).id
    team.prefect("worker", "start", "--pool", POOL, "--run-once")
    with team.prefect_client() as client:
        flow_run = client.read_flow_run(UUID(flow_run_id))
        recipe_run = client.read_flow_run(recipe_run_id)
    team.assert_no_secret(flow_run.model_dump_json() + recipe_run.model_dump_json(), "the deployed flow runs")
    return {"flow_run_id": flow_run_id, "flow_run": flow_run, "recipe_run": recipe_run,
            "recipe_deployment_id": str(recipe_dep.id)}  # fmt: skip


def _runs(team: Team, experiment: str) -> dict[str, Any]:
    exp = team.client.get_experiment_by_name(experiment)
    assert exp is not None, f"no experiment {experiment} on the MLflow server"
    return {r.data.tags["flowspeed.stage"]: r for r in team.client.search_runs([exp.experiment_id])}


def test_deployed_pipeline_runs_on_a_worker_into_the_mlflow_server(team: Team, deployed: dict[str, Any]) -> None:
    assert deployed["flow_run"].state.is_completed(), deployed["flow_run"].state
    assert deployed["flow_run"].empirical_policy.retries == 1  # the work pool's job variables gave it its retry
    with team.prefect_client() as client:
        for name in ("prep/flowspeed-prep", "train/flowspeed-train", "evaluate/flowspeed-evaluate",
                     "recipe/flowspeed-recipe"):  # fmt: skip
            assert client.read_deployment_by_name(name).work_pool_name == POOL, name
        nightly = client.read_deployment_by_name("pipeline/flowspeed-nightly-finetune")
        gcl = client.read_global_concurrency_limit_by_name("gpu-team-node")
    (schedule,) = nightly.schedules
    assert schedule.schedule.cron == "0 2 * * *" and schedule.active is False  # deployed paused

    runs = _runs(team, "team-deployed")
    assert set(runs) == {"pipeline", "prep", "train", "eval"}
    for run in runs.values():  # nothing of the credentials in what a run records
        team.assert_no_secret(json.dumps([run.data.tags, run.data.params]), f"the {run.info.run_name} run")
    assert all(r.info.status == "FINISHED" for r in runs.values())
    train = runs["train"]
    history = team.client.get_metric_history(train.info.run_id, "train/loss")
    assert sorted(m.step for m in history) == [1, 2, 3]
    assert any(k.startswith("system/cpu_utilization") for k in train.data.metrics), sorted(train.data.metrics)
    assert train.data.tags["flowspeed.prefect.flow_run_url"].startswith(team.pf.url)
    assert train.data.tags["flowspeed.parallel_layout"].startswith("nnodes=1")
    artifacts = {a.path for a in team.client.list_artifacts(runs["eval"].info.run_id)}
    assert {"eval_samples.json", "videos", "metrics.json"} <= artifacts  # in the server's artifact store
    model = {a.path for a in team.client.list_artifacts(train.info.run_id, "model")}
    assert "model/MLmodel" in model and "model/model_index.json" in model
    assert gcl.name == "gpu-team-node" and gcl.limit >= 1


def test_a_second_recipe_runs_through_the_recipe_deployment(team: Team, deployed: dict[str, Any]) -> None:
    """The recipe deployment ran sd3-quickstart (not its default) with overrides; its flow-run logs show
    prep counts and the training steps (step, loss, samples/s, ETA), and it left a summary table and a
    link to its MLflow run, at the tracking server's address."""
    from prefect.client.schemas.filters import ArtifactFilter, LogFilter

    run = deployed["recipe_run"]
    assert run.state.is_completed(), run.state
    assert run.parameters["recipe"] == "sd3-quickstart"
    runs = _runs(team, "team-recipe")
    assert set(runs) == {"pipeline", "prep", "train", "eval"}
    assert runs["train"].data.tags["flowspeed.family"] == "sd3" and runs["train"].data.params["train.max_steps"] == "2"
    assert runs["pipeline"].data.tags["flowspeed.recipe"] == "sd3-quickstart"

    def messages(stage: str) -> list[str]:
        flow_run_id = runs[stage].data.tags["flowspeed.prefect.flow_run_id"]  # the stage's (sub)flow run
        log_filter = LogFilter(flow_run_id={"any_": [flow_run_id]})
        with team.prefect_client() as client:
            return [log.message for log in client.read_logs(log_filter=log_filter, limit=200)]

    prep, train = messages("prep"), messages("train")
    assert any(re.fullmatch(r"encode: (\d+)/\1", m) for m in prep), prep  # the prep counts, to the last
    steps = [m for m in train if m.startswith("train step ")]
    assert re.fullmatch(r"train step 2/2: loss \d+\.\d{4}, \d+\.\d samples/s, ETA 0m00s", steps[-1]), train
    assert len(steps) == 2, steps  # train.log_every: 1

    with team.prefect_client() as client:
        pipeline_run = runs["pipeline"].data.tags["flowspeed.prefect.flow_run_id"]  # the recipe flow's subflow
        artifacts = client.read_artifacts(artifact_filter=ArtifactFilter(flow_run_id={"any_": [pipeline_run]}))
    by_key = {a.key: a for a in artifacts}
    table = by_key["flowspeed-run-summary"]
    assert table.type == "table"
    rows = {r["item"]: r["value"] for r in (json.loads(table.data) if isinstance(table.data, str) else table.data)}
    assert rows["MLflow run"] == runs["pipeline"].info.run_id and rows["family"] == "sd3"
    assert re.fullmatch(r"\d+ \(\d+ encoded, 0 cached, \d+ rejected -> .*rejects.*\)", rows["samples"]), rows
    assert re.fullmatch(r"\d+\.\d{4} -> \d+\.\d{4} over 2 steps", rows["loss"]) and "eval/val_loss" in rows
    link = by_key["mlflow-pipeline"]
    url = f"{team.ml.url}/#/experiments/{runs['pipeline'].info.experiment_id}/runs/{rows['MLflow run']}"
    assert link.type == "markdown" and f"({url})" in link.data, link.data  # no FLOWSPEED_MLFLOW_UI_URL: the server
    team.assert_no_secret(json.dumps([a.model_dump(mode="json") for a in artifacts]), "the artifacts")


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


def test_the_servers_refuse_calls_without_credentials(team: Team) -> None:
    """The README's servers answer only with credentials, and hold their databases as the dedicated
    role (not the superuser). Health routes stay open by design (probes, load balancers)."""
    keys = team.keys
    search = f"{team.ml.url}/api/2.0/mlflow/experiments/search?max_results=1"
    assert http_status(search) == 401
    assert http_status(search, headers={"Authorization": basic_auth(f"{keys.mlflow_user}:wrong")}) == 401
    assert (
        http_status(search, headers={"Authorization": basic_auth(f"{keys.mlflow_user}:{keys.mlflow_password}")}) == 200
    )
    flows, as_json = f"{team.pf.url}/api/flows/filter", {"Content-Type": "application/json"}
    assert http_status(flows, b"{}", as_json) == 401
    assert http_status(flows, b"{}", as_json | {"Authorization": basic_auth("flowspeed:wrong")}) == 401
    assert http_status(flows, b"{}", as_json | {"Authorization": basic_auth(keys.prefect_auth_string)}) == 200
    for db in ("mlflow", "mlflow_auth", "prefect"):  # each server keeps pooled connections open
        assert connected_roles(team.databases[db]) == {team.databases["role"]}, db


def test_flowspeed_takes_the_credentials_from_the_environment(team: Team, deployed: dict[str, Any]) -> None:
    """`flowspeed compare` against the server: with the environment's credentials it lists the deployed
    pipeline run; without them it fails in one paragraph that says MLflow refused (no secret printed:
    `Team.run` checks every command's output)."""
    import concurrent.futures

    assert deployed["flow_run"].state.is_completed()
    anonymous = {k: v for k, v in team.env.items() if not k.startswith("MLFLOW_TRACKING_")} | {
        "MLFLOW_TRACKING_URI": team.ml.url
    }
    with concurrent.futures.ThreadPoolExecutor(2) as pool:  # two independent commands: both at once
        listed = pool.submit(team.flowspeed, "compare", "team-deployed", "--json")
        refusal = pool.submit(team.run, str(BIN / "flowspeed"), "compare", "team-deployed", env=anonymous, ok=False)
        rows, refused = json.loads(listed.result()), refusal.result()
    assert [r["status"] for r in rows] == ["FINISHED"]
    assert "401" in refused or "not authenticated" in refused.lower(), refused[-2000:]
    assert "Traceback" not in refused


def test_the_uis_show_the_compared_runs_and_the_deployments(team: Team, deployed: dict[str, Any]) -> None:
    """Both UIs, logged in: every request of the page carries the Authorization header the UI's login
    sends (MLflow: the account; Prefect: the auth string). Without it, the Prefect UI shows its login."""
    assert deployed["flow_run"].state.is_completed()
    runs = _runs(team, "team-deployed")
    ids = [r.info.run_id for r in runs.values()]
    names = [r.info.run_name for r in runs.values()]
    experiment = runs["pipeline"].info.experiment_id
    query = urllib.parse.urlencode({"runs": json.dumps(ids), "experiments": json.dumps([experiment])})
    user = {"Authorization": basic_auth(f"{team.keys.mlflow_user}:{team.keys.mlflow_password}")}
    page = render(f"{team.ml.url}/#/compare-runs?{query}", lambda dom: all(n in dom for n in names), headers=user)
    assert "Compare" in page
    for name in names:
        assert name in page

    deployments = ("flowspeed-pipeline", "flowspeed-nightly-finetune", "flowspeed-train")
    login = {"Authorization": basic_auth(team.keys.prefect_auth_string)}
    page = render(f"{team.pf.url}/deployments", lambda dom: all(n in dom for n in deployments), headers=login)
    for name in deployments:
        assert name in page
    # The recipe deployment's run form: a dropdown of the shipped recipes (pydantic Literal -> JSON schema
    # enum -> the UI's select), its default chosen, and the overrides list; screenshots beside the test's logs.
    form = f"{team.pf.url}/deployments/deployment/{deployed['recipe_deployment_id']}/run"
    page = render(form, lambda dom: "<select" in dom and 'value="sd3-quickstart"' in dom, headers=login,
                  screenshot=_screenshot(team, "prefect-recipe-run-form.png"))  # fmt: skip
    (select,) = [s for s in re.findall(r"<select.*?</select>", page, re.S) if 'value="sd3-quickstart"' in s]
    options = re.findall(r'<option[^>]*value="([^"]+)"', select)
    assert {"quickstart", "sd3-quickstart", "flux-t2i", "published/opensora-v1.2"} <= set(options), options
    assert not any(o.startswith("eval/") for o in options)  # eval presets are `flowspeed eval`'s
    assert re.search(r'<option[^>]*selected[^>]*value="quickstart"', select), select[:500]
    assert "overrides" in page and "Add item" in page
    assert _screenshot(team, "prefect-recipe-run-form.png").stat().st_size > 10_000

    # The MLflow run page of the recipe's train run: the sample logged at its checkpoint (log_image, key
    # `samples`) is in the page as an image the browser loaded from the artifact store.
    train = _runs(team, "team-recipe")["train"]
    charts = f"{team.ml.url}/#/experiments/{train.info.experiment_id}/runs/{train.info.run_id}/model-metrics"
    in_view = "(document.querySelector('img[src*=\"get-artifact\"]')?.scrollIntoView(), " + DOM_AND_LOADED_IMAGES + ")"
    page = render(charts, lambda dom: re.search(r"loaded images: [^>]*get-artifact\?path=images%2Fsamples", dom),
                  headers=user, expression=in_view, size=(1280, 2400),
                  screenshot=_screenshot(team, "mlflow-train-run-samples.png"))  # fmt: skip
    loaded = page[page.rindex("<!-- loaded images: ") :]
    sample = rf"get-artifact\?path=images%2Fsamples%2Bstep%2B2%2B[^ ]*run_uuid={train.info.run_id}"  # step 2's
    assert re.search(sample, loaded), loaded
    assert _screenshot(team, "mlflow-train-run-samples.png").stat().st_size > 10_000

    # Without the auth string the UI's code loads (static files are public) but shows only its login form.
    page = render(f"{team.pf.url}/deployments", lambda dom: "Authentication failed" in dom and "Login" in dom)
    assert "Authentication failed" in page and "Login" in page and "flowspeed-pipeline" not in page
