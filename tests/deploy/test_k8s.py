"""The Kubernetes manifests `flowspeed k8s template` renders: valid against the Kubernetes API schema (the offline
OpenAPI schemas kubernetes-validate ships, strict: an unknown or misspelt field fails), and the torchrun command each
pod ends up running gives the config's world size and one rendezvous, pod 0's address behind the headless Service.
The torchrun line is not read from the manifest's text but rebuilt the way `engines.launch` builds it from the pod's
config and `--set`, then parsed back by torchrun's own argument parser: what a pod would really run."""

from __future__ import annotations

import json
import shlex
import socket
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml
from flowspeed.configs import load_config
from flowspeed.engines.common.torchrun import torchrun_command
from flowspeed.engines.launch import ENGINES
from flowspeed.flows.k8s import (
    INDEX_LABEL,
    K8sLayout,
    job_manifests,
    join_config,
    pool_template,
    render,
    torchrun_layout,
    train_config,
    wait_for_rendezvous,
)
from prefect.server.schemas.actions import WorkPoolCreate
from prefect.utilities.templating import apply_values
from torch.distributed.run import get_args_parser
from typer.testing import CliRunner

ROOT = Path(__file__).resolve().parents[2]
QUICKSTART = ROOT / "configs" / "quickstart.yaml"
K8S_VERSION = kubernetes_validate.latest_version()
LAYOUT = K8sLayout(
    nodes=2,
    gpus_per_node=8,
    image="registry.example/flowspeed:0.1.0",
    mlflow_tracking_uri="http://mlflow.flowspeed.svc:5000",
    prefect_api_url="http://prefect.flowspeed.svc:4200/api",
)


def validate(doc: dict) -> None:
    kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


def torchrun_of(pod_config: Path, args: list[str], node_rank: int):
    """What `flowspeed train <config> --set ...` in pod `node_rank` launches, parsed by torchrun itself."""
    overrides = [
        args[i + 1].replace("$(FLOWSPEED_NODE_RANK)", str(node_rank)) for i, a in enumerate(args) if a == "--set"
    ]
    cfg = load_config(pod_config, overrides)
    rdzv, elastic = torchrun_layout(cfg)
    module = ENGINES[cfg.train.engine].module
    cmd = torchrun_command(module, ["--config", "x.yaml"], cfg.train.nproc_per_node, rdzv, elastic)
    return cfg, get_args_parser().parse_args(cmd[cmd.index("torch.distributed.run") + 1 :])


def test_job_manifests_validate_and_give_the_configs_world_and_rendezvous(tmp_path: Path) -> None:
    cfg = load_config(QUICKSTART, ["train.parallel.dp_shard=-1"], check=False)
    docs = list(yaml.safe_load_all(render(cfg, LAYOUT, "job")))
    assert [d["kind"] for d in docs] == ["ConfigMap", "Service", "Job"]
    for doc in docs:
        validate(doc)
    config_map, service, job = docs
    spec = job["spec"]
    assert (spec["completionMode"], spec["completions"], spec["parallelism"]) == ("Indexed", 2, 2)
    pod = spec["template"]["spec"]
    (container,) = pod["containers"]
    assert container["resources"]["limits"] == {"nvidia.com/gpu": 8}
    assert pod["volumes"][0]["persistentVolumeClaim"]["claimName"] == LAYOUT.pvc
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["MLFLOW_TRACKING_URI"] == LAYOUT.mlflow_tracking_uri
    assert env["PREFECT_API_URL"] == LAYOUT.prefect_api_url
    # the Service is headless and selects exactly pod 0 of this Job: its DNS name is the one rendezvous
    assert service["spec"]["clusterIP"] == "None"
    selector = service["spec"]["selector"]
    assert selector[INDEX_LABEL] == "0"
    pod_labels = {**spec["template"]["metadata"]["labels"], INDEX_LABEL: "0"}  # the Job controller adds the index
    assert all(pod_labels.get(k) == v for k, v in selector.items())
    endpoint = (
        f"{service['metadata']['name']}.{service['metadata']['namespace']}.svc:{service['spec']['ports'][0]['port']}"
    )

    pod_config = tmp_path / "config.yaml"
    pod_config.write_text(config_map["data"]["config.yaml"])
    assert container["command"] == ["flowspeed"] and container["args"][:2] == ["train", "/etc/flowspeed/config.yaml"]
    seen_ranks = []
    for node_rank in range(spec["completions"]):
        pod_cfg, run = torchrun_of(pod_config, container["args"], node_rank)
        assert pod_cfg.workdir.is_relative_to(LAYOUT.mount_path)  # cache and checkpoints on the shared claim
        nnodes = int(str(run.nnodes).split(":")[-1])
        assert nnodes * int(run.nproc_per_node) == 16 == pod_cfg.train.nnodes * pod_cfg.train.nproc_per_node
        assert (run.rdzv_backend, run.rdzv_endpoint, run.rdzv_id) == ("c10d", endpoint, cfg.train.rdzv_id)
        assert run.standalone is False
        seen_ranks.append(run.node_rank)
    assert seen_ranks == [0, 1]


def drop_nulls(doc):
    """JSON null is an unset field to the API server (what the kubernetes client sends for a None)."""
    if isinstance(doc, dict):
        return {k: drop_nulls(v) for k, v in doc.items() if v is not None}
    return [drop_nulls(v) for v in doc] if isinstance(doc, list) else doc


def test_pool_template_renders_a_valid_indexed_job_for_prefect() -> None:
    template = json.loads(render(load_config(QUICKSTART, check=False), LAYOUT, "pool"))
    WorkPoolCreate(name="train-pool", type="kubernetes", base_job_template=template)  # the API's own check
    variables = template["variables"]["properties"]
    jsonschema.validate({k: v["default"] for k, v in variables.items() if "default" in v}, template["variables"])
    values = {k: v.get("default") for k, v in variables.items()}
    values |= {"name": "train-run", "command": "prefect flow-run execute", "labels": {}, "env": {}}
    job = apply_values(template["job_configuration"]["job_manifest"], values)  # Prefect's own substitution
    pod = job["spec"]["template"]["spec"]
    # prefect-kubernetes' manifest check: the first container is prefect-job, and its two pod-spec keys are there
    assert pod["containers"][0]["name"] == "prefect-job" and (pod["parallelism"], pod["completions"]) == (1, 1)
    assert (job["spec"]["completions"], job["spec"]["parallelism"], job["spec"]["completionMode"]) == (2, 2, "Indexed")
    container = pod["containers"][0]
    assert container["resources"]["limits"] == {"nvidia.com/gpu": 8}
    assert {"name": "MLFLOW_TRACKING_URI", "value": LAYOUT.mlflow_tracking_uri} in container["env"]
    # what the worker does next: its env (API URL, flow run id) first, the args split from the command
    worker_env = [{"name": "PREFECT_API_URL", "value": LAYOUT.prefect_api_url}, {"name": "PREFECT__FLOW_RUN_ID"}]
    container["env"] = [*worker_env, *container["env"]]
    container["args"] = shlex.split(container["args"])
    job["metadata"]["generateName"] = "train-run-"
    for key in ("parallelism", "completions"):  # the API server drops these unknown pod-spec keys
        pod.pop(key)
    validate(drop_nulls(job))
    validate(yaml.safe_load(render(load_config(QUICKSTART, check=False), LAYOUT, "pool-service")))
    # pod 0 executes the flow run (the shell's "$@" is Prefect's command), the others join with the Job's width
    script = container["command"][2]
    assert script.startswith("export FLOWSPEED_NNODES=2;")
    assert 'exec "$@"' in script and "flowspeed k8s join" in script

    single = apply_values(pool_template(LAYOUT, nodes=False)["job_configuration"]["job_manifest"], values)
    single_pod = single["spec"]["template"]["spec"]
    assert "completionMode" not in single["spec"] and "command" not in single_pod["containers"][0]
    for key in ("parallelism", "completions"):
        single_pod.pop(key)
    single_pod["containers"][0]["args"] = ["prefect", "flow-run", "execute"]
    single["metadata"]["generateName"] = "stage-run-"
    validate(drop_nulls(single))


def test_join_takes_the_flow_runs_config_and_refuses_a_mismatched_world() -> None:
    cfg = load_config(QUICKSTART, ["train.nnodes=2", f"train.rdzv_endpoint={LAYOUT.rdzv_endpoint}"], check=False)
    params = {"cfg": json.loads(cfg.model_dump_json())}
    joined = join_config(params, 1, 2)
    assert (joined.train.node_rank, joined.train.rdzv_endpoint) == (1, LAYOUT.rdzv_endpoint)
    with pytest.raises(ValueError, match="train.nnodes=2 but the Job has 3 pods"):
        join_config(params, 1, 3)
    with pytest.raises(ValueError, match="no `cfg` parameter"):
        join_config({"recipe": "quickstart"}, 1, 2)


def test_a_joining_pod_waits_for_pod_zeros_store() -> None:
    with socket.create_server(("127.0.0.1", 0)) as server:
        port = server.getsockname()[1]
        wait_for_rendezvous(f"127.0.0.1:{port}", timeout_s=5, poll_s=0.05)
    with pytest.raises(TimeoutError, match="is pod 0 running"):
        wait_for_rendezvous(f"127.0.0.1:{port}", timeout_s=0.2, poll_s=0.05)
    # pod 0's flow run ended without starting torchrun (a cache hit): the joining pod stops waiting
    reason = wait_for_rendezvous(f"127.0.0.1:{port}", timeout_s=60, poll_s=0.05, finished=lambda: "Completed")
    assert reason == "Completed"


def test_cli_renders_and_refuses(tmp_path: Path) -> None:
    from flowspeed.flows.cli import app

    runner = CliRunner()
    base = ["k8s", "template", str(QUICKSTART), "--nodes", "2", "--gpus-per-node", "8", "--image", LAYOUT.image]
    out = tmp_path / "pool.json"
    res = runner.invoke(app, [*base, "--mlflow-uri", LAYOUT.mlflow_tracking_uri, "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert json.loads(out.read_text())["variables"]["properties"]["nnodes"]["default"] == 2
    res = runner.invoke(app, [*base, "--kind", "params", "--mlflow-uri", LAYOUT.mlflow_tracking_uri])
    assert res.exit_code == 0, res.output
    train = json.loads(res.stdout)["cfg"]["train"]
    assert (train["nnodes"], train["nproc_per_node"], train["rdzv_endpoint"]) == (2, 8, LAYOUT.rdzv_endpoint)
    res = runner.invoke(app, [*base, "--kind", "job", "--mlflow-uri", "", "--prefect-api-url", "http://p:4200/api"])
    assert res.exit_code == 1 and "--mlflow-uri" in res.output
    res = runner.invoke(app, [*base, "--mlflow-uri", "http://m:5000", "--accelerator", "tpu"])
    assert res.exit_code == 1 and "--accelerator 'tpu'" in res.output
    # a layout the config cannot run is refused here, not on 16 ranks: tp=3 does not divide 16
    res = runner.invoke(app, [*base, "--mlflow-uri", "http://m:5000", "--set", "train.parallel.tp=3"])
    assert res.exit_code == 1 and "tp=3" in res.output


def test_ascend_requests_npus() -> None:
    layout = K8sLayout(nodes=2, gpus_per_node=8, image="x", accelerator="ascend", mlflow_tracking_uri="http://m:5000")
    job = job_manifests(load_config(QUICKSTART, check=False), layout)[2]
    validate(job)
    assert job["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"] == {"huawei.com/Ascend910": 8}


def test_shipped_templates_are_what_the_command_renders() -> None:
    """deploy/k8s/ holds the quickstart's rendering for 2 x 8 GPUs: regenerated, not hand-edited (see its README)."""
    shipped = ROOT / "deploy" / "k8s"
    cfg = load_config(QUICKSTART, check=False)
    for kind, name in (
        ("pool", "train-pool.json"),
        ("stage-pool", "stage-pool.json"),
        ("pool-service", "rdzv-service.yaml"),
    ):
        assert (shipped / name).read_text() == render(cfg, SHIPPED, kind), f"regenerate deploy/k8s/{name}"


SHIPPED = K8sLayout(
    nodes=2,
    gpus_per_node=8,
    image="registry.example/flowspeed:0.1.0",
    namespace="flowspeed",
    mlflow_tracking_uri="http://mlflow.flowspeed.svc:5000",
)


@pytest.mark.parametrize("elastic", [[], ["train.elastic.max_restarts=1"]])
def test_a_joining_pod_starts_torchrun_as_the_train_stage_does(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, elastic: list[str]
) -> None:
    """`flowspeed k8s join` builds torchrun's rendezvous from `torchrun_layout`; pod 0's train stage from
    `engines.launch.launch`. The arguments launch() hands its torchrun call are captured (no process starts) and
    must be the ones a joining pod would use, plain and elastic."""
    import flowspeed.engines.launch as launch_module

    layout = K8sLayout(nodes=2, gpus_per_node=2, image="x", mlflow_tracking_uri="http://m:5000")
    cfg = train_config(load_config(QUICKSTART, ["train.device=cpu", *elastic], tmp_path, check=False), layout)
    seen = {}

    class Launched(Exception):
        pass

    def capture(module: str, args: list[str], nproc: int, rdzv: dict | None = None, elastic: dict | None = None):
        seen.update(module=module, nproc=nproc, rdzv=rdzv, elastic=elastic)
        raise Launched  # stop launch() here: nothing ran

    monkeypatch.setattr(launch_module, "run_torchrun", capture)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with pytest.raises(Launched):
        launch_module.launch(cfg, None, None)
    assert (seen["rdzv"], seen["elastic"]) == torchrun_layout(cfg)
    assert seen["rdzv"]["endpoint"] == layout.rdzv_endpoint and seen["nproc"] == 2
    assert (seen["elastic"] is None) == (not elastic)
