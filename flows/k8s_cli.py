"""`flowspeed k8s template|join`: the training stage as an indexed Kubernetes Job (flows/k8s.py renders it).

    flowspeed k8s template CONFIG --nodes 2 --gpus-per-node 8 --image REGISTRY/flowspeed:0.1.0 --kind pool \\
        --out train-pool.json          # prefect work-pool create train-pool --type kubernetes --base-job-template
    flowspeed k8s template CONFIG --nodes 2 --gpus-per-node 8 --image ... --kind job | kubectl apply -f -

`join` is what pods 1..N-1 of a pool's Job run (never by hand). Mounted on the main app as
`app.add_typer(k8s_app, name="k8s")`.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Annotated

import typer

k8s_app = typer.Typer(no_args_is_help=True, help="Kubernetes: the training stage as an indexed Job of N pods.")

ConfigArg = Annotated[Path, typer.Argument(help="pipeline YAML or recipe, e.g. configs/quickstart.yaml")]
SetOpt = Annotated[list[str] | None, typer.Option("--set", "-s", help="override, e.g. --set train.max_steps=20")]


def _refuse(message: str) -> None:
    typer.echo(message, err=True)
    raise typer.Exit(1)


@k8s_app.command("template")
def template(
    config: ConfigArg,
    nodes: Annotated[int, typer.Option("--nodes", help="pods of the indexed Job (train.nnodes)")],
    gpus_per_node: Annotated[int, typer.Option("--gpus-per-node", help="devices per pod (train.nproc_per_node)")],
    image: Annotated[str, typer.Option("--image", help="the flowspeed image every pod runs (see Dockerfile)")],
    set_: SetOpt = None,
    kind: Annotated[
        str, typer.Option("--kind", help="job (kubectl) | pool, pool-service, stage-pool, params (Prefect)")
    ] = "pool",
    out: Annotated[Path | None, typer.Option("--out", "-o", help="file to write (default: stdout)")] = None,
    name: Annotated[str, typer.Option("--name", help="the Job's (kind job) or the pool's name")] = "flowspeed-train",
    namespace: Annotated[str, typer.Option("--namespace", help="Kubernetes namespace")] = "default",
    accelerator: Annotated[str, typer.Option("--accelerator", help="nvidia (nvidia.com/gpu) | ascend")] = "nvidia",
    pvc: Annotated[str, typer.Option("--pvc", help="PersistentVolumeClaim (ReadWriteMany) every pod mounts")] = (
        "flowspeed-shared"
    ),
    mount_path: Annotated[str, typer.Option("--mount-path", help="where the claim is mounted: the pods' cwd")] = (
        "/shared"
    ),
    port: Annotated[int, typer.Option("--port", help="c10d rendezvous port on pod 0")] = 29400,
    mlflow_uri: Annotated[
        str | None, typer.Option("--mlflow-uri", help="MLflow server the pods log to (default: MLFLOW_TRACKING_URI)")
    ] = None,
    prefect_api_url: Annotated[
        str | None, typer.Option("--prefect-api-url", help="Prefect API of kind job (default: PREFECT_API_URL)")
    ] = None,
    service_account: Annotated[str, typer.Option("--service-account", help="the pods' service account")] = "",
    shm_size: Annotated[str, typer.Option("--shm-size", help="/dev/shm size limit, e.g. 64Gi (default: none)")] = "",
) -> None:
    """Render the work pool base job template or the Job + Service manifests that train CONFIG on N pods."""
    from flowspeed.configs.loader import ConfigError, load_config
    from flowspeed.engines.common.io import atomic_write_text
    from flowspeed.flows.k8s import KINDS, K8sLayout, render, train_config

    if kind not in KINDS:
        _refuse(f"--kind {kind!r}: use one of {', '.join(KINDS)}")
    mlflow = mlflow_uri if mlflow_uri is not None else os.environ.get("MLFLOW_TRACKING_URI", "")
    prefect = prefect_api_url if prefect_api_url is not None else os.environ.get("PREFECT_API_URL", "")
    if kind in ("job", "pool", "stage-pool", "params") and not mlflow.startswith(("http://", "https://")):
        _refuse(
            "the pods need an MLflow server (a local sqlite store would stay inside one pod): pass --mlflow-uri "
            "http://MLFLOW_HOST:5000 or export MLFLOW_TRACKING_URI (README, Team mode)"
        )
    if kind == "job" and not prefect.startswith(("http://", "https://")):
        _refuse("kind job: the pods report to a Prefect server: pass --prefect-api-url or export PREFECT_API_URL")
    try:
        cfg = load_config(config, set_ or [], check=False)
        layout = K8sLayout(
            nodes=nodes,
            gpus_per_node=gpus_per_node,
            image=image,
            name=name,
            namespace=namespace,
            accelerator=accelerator,
            pvc=pvc,
            mount_path=mount_path,
            port=port,
            mlflow_tracking_uri=mlflow,
            prefect_api_url=prefect,
            service_account=service_account,
            shm_size=shm_size,
        )
        text = render(cfg, layout, kind)
    except (ConfigError, FileNotFoundError, ValueError) as exc:
        _refuse(str(exc))
    if out is None:
        typer.echo(text, nl=False)
        return
    atomic_write_text(out, text)
    typer.echo(f"wrote {out}", err=True)
    if kind == "pool":
        # the deployment's config must name the same world and rendezvous as the pool's Job
        typer.echo(
            f"the training deployment's cfg needs: train.nnodes={nodes} train.nproc_per_node={gpus_per_node} "
            f"train.rdzv_endpoint={layout.rdzv_endpoint} workdir={train_config(cfg, layout).workdir} "
            f"(`--kind params` writes that cfg for `prefect deploy ... --params`)",
            err=True,
        )


@k8s_app.command("join")
def join(
    wait_s: Annotated[
        float, typer.Option("--wait-s", help="how long to wait for pod 0's rendezvous (its flow run starting)")
    ] = 1800.0,
) -> None:
    """Pods 1..N-1 of a pool's Job: train the flow run's config as node JOB_COMPLETION_INDEX (pod 0 runs the flow)."""
    from flowspeed.configs import save_config
    from flowspeed.engines.common.torchrun import run_torchrun
    from flowspeed.engines.launch import ENGINES, _function
    from flowspeed.flows.k8s import join_config, torchrun_layout, wait_for_rendezvous
    from flowspeed.tasks.registry import init_model
    from prefect import get_client

    flow_run_id = os.environ.get("PREFECT__FLOW_RUN_ID")
    if not flow_run_id:
        _refuse("no PREFECT__FLOW_RUN_ID: `flowspeed k8s join` runs inside a pod a Prefect Kubernetes worker started")
    try:
        with get_client(sync_client=True) as client:
            params = client.read_flow_run(flow_run_id).parameters
        cfg = join_config(
            params, int(os.environ.get("FLOWSPEED_NODE_RANK", "-1")), int(os.environ.get("FLOWSPEED_NNODES", "0"))
        )
    except ValueError as exc:
        _refuse(str(exc))
    start_cfg, _ = init_model(cfg)  # the same champion pod 0's flow resolved
    t = start_cfg.train
    engine = ENGINES[t.engine]
    _function(engine.validate)(start_cfg)
    # written in the pod, not in train_dir: pod 0 writes its own launch_config.yaml there on the shared volume
    cfg_path = save_config(start_cfg, Path(tempfile.mkdtemp(prefix="flowspeed-join-")), "launch_config.yaml")

    def flow_run_over() -> str | None:
        with get_client(sync_client=True) as client:
            state = client.read_flow_run(flow_run_id).state
        return f"pod 0's flow run is {state.name}" if state is not None and state.is_final() else None

    if reason := wait_for_rendezvous(t.rdzv_endpoint or "", wait_s, poll_s=5.0, finished=flow_run_over):
        typer.echo(f"not joining: {reason} (nothing for this node to train)", err=True)
        return
    rdzv, elastic = torchrun_layout(start_cfg)
    run_torchrun(engine.module, ["--config", str(cfg_path)], t.nproc_per_node, rdzv=rdzv, elastic=elastic)
