"""Kubernetes manifests for a config's training stage: an indexed Job of N pods around one rendezvous.

Two ways to run it, rendered by `flowspeed k8s template` from the same pod spec:

- `--kind pool`: a Prefect Kubernetes work pool's base job template (`prefect work-pool create --type kubernetes
  --base-job-template FILE`). Each flow run of the training deployment becomes an indexed Job of `nnodes` pods.
  Pod 0 executes the flow run (Prefect's `{{ command }}`): the train stage opens its MLflow run and starts torchrun
  as node 0. Pods 1..N-1 run `flowspeed k8s join`, which reads the same flow run's `cfg` parameter from the Prefect
  API and starts torchrun as node JOB_COMPLETION_INDEX, so every node trains exactly the config the flow run was
  given (one Prefect flow run, one MLflow run; c10d orders nodes by host name, so global rank 0, the one that talks
  to MLflow, is on pod 0). The pool's rendezvous endpoint is a headless Service (`--kind pool-service`, applied
  once) that selects the pool's index-0 pod: one training run at a time per pool (its concurrency limit is 1).
- `--kind job`: plain manifests for `kubectl apply` (a ConfigMap with the resolved config, a headless Service, the
  indexed Job). Every pod runs `flowspeed train` with `train.node_rank` = its completion index: the README's
  "same stage on every node", one per pod.

`--kind stage-pool` is the single-pod template the prep and eval stages (and a one-node training) run on;
`--kind params` the deployments' `cfg` parameter: the config with the layout's world, rendezvous and a workdir on
the shared claim (`prefect deploy ... --params "$(cat FILE)"`).

Pure data: no Prefect or Kubernetes import, so it renders (and is tested) anywhere.
"""

from __future__ import annotations

import copy
import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import yaml
from flowspeed.configs import PipelineConfig
from flowspeed.configs.loader import dump_config

KINDS = ("job", "pool", "pool-service", "stage-pool", "params")
# The Kubernetes extended resource each accelerator's device plugin advertises (NVIDIA's and Huawei's plugins).
ACCELERATORS = {"nvidia": "nvidia.com/gpu", "ascend": "huawei.com/Ascend910"}
# The pod label the Job controller puts on every pod of an Indexed Job (Kubernetes >= 1.28); the rendezvous
# Service selects index 0 with it, so its DNS name is pod 0's address whatever name the Job was given.
INDEX_LABEL = "batch.kubernetes.io/job-completion-index"
INDEX_ANNOTATION = "batch.kubernetes.io/job-completion-index"
CONFIG_MOUNT = "/etc/flowspeed"
_NAME = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")


@dataclass(frozen=True)
class K8sLayout:
    """Where and how the pods run. Every field is a `flowspeed k8s template` option."""

    nodes: int
    gpus_per_node: int
    image: str
    name: str = "flowspeed-train"
    namespace: str = "default"
    accelerator: str = "nvidia"
    pvc: str = "flowspeed-shared"
    mount_path: str = "/shared"
    port: int = 29400
    mlflow_tracking_uri: str = ""
    prefect_api_url: str = ""
    service_account: str = ""
    shm_size: str = ""  # /dev/shm size limit (NCCL/HCCL and the data loader's workers); "" = no limit

    def __post_init__(self) -> None:
        problems = []
        if self.nodes < 1:
            problems.append(f"--nodes {self.nodes}: at least 1")
        if self.gpus_per_node < 1:
            problems.append(f"--gpus-per-node {self.gpus_per_node}: at least 1 (one rank per device)")
        if self.accelerator not in ACCELERATORS:
            problems.append(f"--accelerator {self.accelerator!r}: one of {', '.join(ACCELERATORS)}")
        if not _NAME.match(self.name) or len(self.name) > 50:
            problems.append(f"--name {self.name!r}: lowercase letters, digits and '-', at most 50 characters")
        if not self.image:
            problems.append("--image: the image every pod runs (see Dockerfile)")
        if not 1024 <= self.port <= 65535:
            problems.append(f"--port {self.port}: 1024..65535")
        if problems:
            raise ValueError("k8s template: " + "; ".join(problems))

    @property
    def service(self) -> str:
        return f"{self.name}-rdzv"

    @property
    def rdzv_endpoint(self) -> str:
        """The Service's cluster DNS name: every pod, in any namespace setup, resolves it to pod 0."""
        return f"{self.service}.{self.namespace}.svc:{self.port}"


def train_config(cfg: PipelineConfig, layout: K8sLayout) -> PipelineConfig:
    """The config every pod trains: the layout's world and rendezvous written into `train.*` (node_rank 0; each pod
    sets its own), checked as a run would check it, so a layout that cannot run fails here and not on N nodes."""
    from flowspeed.configs.validate import config_problems, explain

    train = cfg.train.model_copy(
        update={
            "nnodes": layout.nodes,
            "nproc_per_node": layout.gpus_per_node,
            "node_rank": 0,
            "rdzv_endpoint": layout.rdzv_endpoint if layout.nodes > 1 else None,
        }
    )
    # a relative workdir would be resolved against each pod's cwd: anchor it on the shared claim, where every pod
    # (and the next run) finds the cache, the checkpoints and the export
    workdir = cfg.workdir if cfg.workdir.is_absolute() else PurePosixPath(layout.mount_path) / cfg.workdir
    out = cfg.model_copy(update={"train": train, "workdir": Path(workdir)})
    if problems := config_problems(out):
        raise ValueError(f"the config at {layout.nodes} x {layout.gpus_per_node} ranks: {explain(problems, 'k8s')}")
    return out


def _env(layout: K8sLayout, mlflow: str, prefect: str | None, nnodes: bool = True) -> list[dict[str, Any]]:
    env: list[dict[str, Any]] = [
        # The node rank, from the annotation the Job controller sets (JOB_COMPLETION_INDEX is the same value;
        # declared here so `$(FLOWSPEED_NODE_RANK)` in args is expanded by Kubernetes itself).
        {
            "name": "FLOWSPEED_NODE_RANK",
            "valueFrom": {"fieldRef": {"fieldPath": f"metadata.annotations['{INDEX_ANNOTATION}']"}},
        },
        {"name": "MLFLOW_TRACKING_URI", "value": mlflow},
        # flowspeed's progress lines (prep counts, step lines) into the flow run's logs, as prefect.yaml sets them
        {"name": "PREFECT_LOGGING_EXTRA_LOGGERS", "value": "flowspeed"},
    ]
    if nnodes:
        env.insert(1, {"name": "FLOWSPEED_NNODES", "value": str(layout.nodes)})
    if prefect is not None:
        env.append({"name": "PREFECT_API_URL", "value": prefect})
    return env


def _pod_spec(
    layout: K8sLayout,
    container: dict[str, Any],
    gpus: int | str,
    extra_volumes: list[dict[str, Any]] | None = None,
    service_account: str | None = None,
) -> dict[str, Any]:
    extra_volumes = extra_volumes or []
    resource = ACCELERATORS[layout.accelerator]
    shm: dict[str, Any] = {"medium": "Memory"}
    if layout.shm_size:
        shm["sizeLimit"] = layout.shm_size
    container = {
        **container,
        # the workdir in a config is relative: it lands on the shared volume, as do cache, checkpoints and exports
        "workingDir": layout.mount_path,
        # extended resources are requested in limits (requests default to them); the device plugin picks devices
        "resources": {"limits": {resource: gpus}},
        "volumeMounts": [
            {"name": "shared", "mountPath": layout.mount_path},
            {"name": "dshm", "mountPath": "/dev/shm"},
            *[{"name": v["name"], "mountPath": CONFIG_MOUNT, "readOnly": True} for v in extra_volumes],
        ],
        "ports": [{"name": "rdzv", "containerPort": layout.port}],
    }
    spec: dict[str, Any] = {
        "restartPolicy": "Never",
        "containers": [container],
        "volumes": [
            {"name": "shared", "persistentVolumeClaim": {"claimName": layout.pvc}},
            {"name": "dshm", "emptyDir": shm},
            *extra_volumes,
        ],
    }
    if service_account:
        spec["serviceAccountName"] = service_account
    return spec


def rendezvous_service(layout: K8sLayout, selector: dict[str, str]) -> dict[str, Any]:
    """Headless (no virtual IP, the name resolves straight to pod 0), published before the pod is ready: torchrun
    on pod 0 must find its own address behind the name to host the c10d store."""
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": layout.service, "namespace": layout.namespace, "labels": {"app": "flowspeed"}},
        "spec": {
            "clusterIP": "None",
            "publishNotReadyAddresses": True,
            "selector": {**selector, INDEX_LABEL: "0"},
            "ports": [{"name": "rdzv", "port": layout.port, "targetPort": layout.port}],
        },
    }


def job_manifests(cfg: PipelineConfig, layout: K8sLayout) -> list[dict[str, Any]]:
    """ConfigMap (the resolved config), headless Service, indexed Job: `kubectl apply -f` runs the training stage."""
    cfg = train_config(cfg, layout)
    labels = {"app": "flowspeed", "flowspeed.io/job": layout.name}
    config_map = {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": f"{layout.name}-config", "namespace": layout.namespace, "labels": labels},
        "data": {"config.yaml": dump_config(cfg)},
    }
    container = {
        "name": "train",
        "image": layout.image,
        "command": ["flowspeed"],
        "args": ["train", f"{CONFIG_MOUNT}/config.yaml", "--set", "train.node_rank=$(FLOWSPEED_NODE_RANK)"],
        "env": _env(layout, layout.mlflow_tracking_uri, layout.prefect_api_url),
    }
    config_volume = {"name": "config", "configMap": {"name": f"{layout.name}-config"}}
    pod = _pod_spec(layout, container, layout.gpus_per_node, [config_volume], layout.service_account or None)
    pod["subdomain"] = layout.service
    job = {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": layout.name, "namespace": layout.namespace, "labels": labels},
        "spec": {
            "completionMode": "Indexed",
            "completions": layout.nodes,
            "parallelism": layout.nodes,
            # a lost pod fails the Job: restarts belong to torchrun's elastic agent (train.elastic), which resumes
            # every rank from the newest checkpoint, not to the Job controller starting one pod alone
            "backoffLimit": 0,
            "template": {"metadata": {"labels": labels}, "spec": pod},
        },
    }
    return [config_map, rendezvous_service(layout, labels), job]


def _var(kind: str, default: Any, description: str, **more: Any) -> dict[str, Any]:
    """A variable of the pool's schema; no default (rather than null) where Prefect or the cluster picks one."""
    return {"type": kind, **({"default": default} if default is not None else {}), "description": description, **more}


def _pool_variables(layout: K8sLayout, nodes: bool) -> dict[str, Any]:
    props = {
        "name": _var("string", None, "Name given to the Job (Prefect fills in the flow run's)"),
        "namespace": _var("string", layout.namespace, "Namespace of the Job (the rendezvous Service's, too)"),
        "image": _var("string", layout.image, "The flowspeed image (Dockerfile at the repository root)"),
        "image_pull_policy": _var(
            "string", "IfNotPresent", "Image pull policy", enum=["IfNotPresent", "Always", "Never"]
        ),
        "service_account_name": _var("string", layout.service_account or None, "Service account of the pods"),
        "finished_job_ttl": _var("integer", 3600, "Seconds a finished Job is kept (its pods' logs with it)"),
        "env": _var("object", {}, "Environment of the flow run (Prefect's own settings are added by the worker)"),
        "labels": _var("object", {}, "Labels of the Job"),
        "command": _var("string", None, "Command that executes the flow run (Prefect's default)"),
        "gpus_per_node": _var(
            "integer", layout.gpus_per_node, f"{ACCELERATORS[layout.accelerator]} per pod", minimum=0
        ),
        "pvc": _var("string", layout.pvc, "PersistentVolumeClaim shared by every pod (ReadWriteMany)"),
        "mlflow_tracking_uri": _var("string", layout.mlflow_tracking_uri, "MLflow server every pod logs to"),
        "job_watch_timeout_seconds": _var("integer", None, "Seconds the worker waits for each Job event (none: ever)"),
        # pods pulling a CUDA image onto fresh nodes take minutes, beyond Prefect's default of 60 s
        "pod_watch_timeout_seconds": _var("integer", 600, "Seconds the worker waits for the pods to start"),
    }
    if nodes:
        props["nnodes"] = _var(
            "integer", layout.nodes, "Pods of the indexed Job: must equal the flow run's train.nnodes", minimum=1
        )
    return {"type": "object", "properties": props}


def _pool_manifest(layout: K8sLayout, nodes: bool) -> dict[str, Any]:
    selector = {"app": "flowspeed", "flowspeed.io/pool": layout.name}
    container: dict[str, Any] = {
        # prefect-kubernetes fills the first container named prefect-job (its validator requires the name)
        "name": "prefect-job",
        "image": "{{ image }}",
        "imagePullPolicy": "{{ image_pull_policy }}",
        # the worker adds PREFECT_API_URL and the flow run's id; FLOWSPEED_NNODES is set in the shell line below, where
        # `{{ nnodes }}` is text (an env value must be a string, and a whole placeholder becomes the integer)
        "env": _env(layout, "{{ mlflow_tracking_uri }}", None, nnodes=False),
        "args": "{{ command }}",
    }
    if nodes:
        # pod 0 executes the flow run; the others join its torchrun rendezvous as node JOB_COMPLETION_INDEX
        container["command"] = [
            "/bin/sh",
            "-c",
            "export FLOWSPEED_NNODES={{ nnodes }}; "
            'if [ "$FLOWSPEED_NODE_RANK" = 0 ]; then exec "$@"; else exec flowspeed k8s join; fi',
            "flowspeed-node",
        ]
    pod = _pod_spec(layout, container, "{{ gpus_per_node }}")
    pod["volumes"][0]["persistentVolumeClaim"]["claimName"] = "{{ pvc }}"
    pod["serviceAccountName"] = "{{ service_account_name }}"
    # prefect-kubernetes' manifest check wants these two keys in the pod spec (its own default has them there);
    # the API server drops them as unknown fields. The Job's real parallelism is spec.parallelism below.
    pod["parallelism"] = 1
    pod["completions"] = 1
    spec: dict[str, Any] = {
        "backoffLimit": 0,
        "ttlSecondsAfterFinished": "{{ finished_job_ttl }}",
        "template": {"metadata": {"labels": selector}, "spec": pod},
    }
    if nodes:
        spec = {"completionMode": "Indexed", "completions": "{{ nnodes }}", "parallelism": "{{ nnodes }}", **spec}
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"labels": "{{ labels }}", "namespace": "{{ namespace }}", "generateName": "{{ name }}-"},
        "spec": spec,
    }


def pool_template(layout: K8sLayout, nodes: bool = True) -> dict[str, Any]:
    """The base job template `prefect work-pool create --type kubernetes --base-job-template FILE` takes."""
    return {
        "job_configuration": {
            "command": "{{ command }}",
            "env": "{{ env }}",
            "labels": "{{ labels }}",
            "name": "{{ name }}",
            "namespace": "{{ namespace }}",
            "job_manifest": _pool_manifest(layout, nodes),
            "cluster_config": None,
            "job_watch_timeout_seconds": "{{ job_watch_timeout_seconds }}",
            "pod_watch_timeout_seconds": "{{ pod_watch_timeout_seconds }}",
            "stream_output": True,
        },
        "variables": _pool_variables(layout, nodes),
    }


def pool_service(layout: K8sLayout) -> dict[str, Any]:
    """The pool's rendezvous: its index-0 pod, whichever flow run's Job it belongs to."""
    return rendezvous_service(layout, {"app": "flowspeed", "flowspeed.io/pool": layout.name})


class _Dumper(yaml.SafeDumper):
    """Manifests a person reads: no `&id001` anchors for repeated label dicts, the config as a literal block."""

    def ignore_aliases(self, data: Any) -> bool:
        return True


def _str(dumper: yaml.SafeDumper, text: str) -> yaml.ScalarNode:
    return dumper.represent_scalar("tag:yaml.org,2002:str", text, style="|" if "\n" in text else None)


_Dumper.add_representer(str, _str)


def to_yaml(docs: list[dict[str, Any]]) -> str:
    return yaml.dump_all(docs, Dumper=_Dumper, sort_keys=False)


def render(cfg: PipelineConfig, layout: K8sLayout, kind: str) -> str:
    """The text `flowspeed k8s template` writes: YAML documents for kubectl, JSON for `prefect work-pool create`."""
    if kind == "job":
        return to_yaml(job_manifests(cfg, layout))
    if kind == "pool-service":
        return to_yaml([pool_service(layout)])
    if kind in ("pool", "stage-pool"):
        if kind == "pool":
            train_config(cfg, layout)  # the layout must be one the config can run
        return json.dumps(pool_template(layout, nodes=kind == "pool"), indent=2) + "\n"
    if kind == "params":
        # the deployments' parameters: `prefect deploy ... --params "$(cat FILE)"` (train, prep and evaluate alike)
        return json.dumps({"cfg": train_config(cfg, layout).model_dump(mode="json")}, indent=2) + "\n"
    raise ValueError(f"--kind {kind!r}: one of {', '.join(KINDS)}")


def torchrun_layout(cfg: PipelineConfig) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
    """The (rdzv, elastic) arguments the train stage gives torchrun for this config (engines/common/torchrun.py, the
    one rule), so a joining pod runs the agent exactly as pod 0's train stage does. With `train.elastic` the
    rendezvous is pod 0's store, so the group survives the loss of any pod but pod 0."""
    from flowspeed.engines.common.torchrun import torchrun_layout as layout

    return layout(cfg.train)


def wait_for_rendezvous(
    endpoint: str, timeout_s: float, poll_s: float = 2.0, finished: Callable[[], str | None] | None = None
) -> str | None:
    """Block until pod 0's c10d store answers at `endpoint` (None), or `finished()` names why it never will (that
    reason: pod 0's flow run ended without training, a cache hit or a failure before torchrun). Pod 0 starts
    torchrun only after its flow run has started (Prefect, the MLflow run, a champion lookup): torchrun's own client
    would give up after 60 s, so a joining pod waits here first. A name that does not resolve yet (pod 0 not
    scheduled) is waited for too."""
    import socket
    import time

    host, _, port = endpoint.rpartition(":")
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with socket.create_connection((host, int(port)), timeout=poll_s):
                return None
        except OSError as exc:
            if finished is not None and (reason := finished()):
                return reason
            if time.monotonic() >= deadline:
                raise TimeoutError(
                    f"no rendezvous at {endpoint} after {timeout_s:.0f} s ({exc}): is pod 0 running its flow run, "
                    f"and does the Service select it? (kubectl get pods,endpoints -l app=flowspeed)"
                ) from exc
            time.sleep(poll_s)


def join_config(params: dict[str, Any], node_rank: int, nnodes: int) -> PipelineConfig:
    """The config a joining pod trains: the flow run's `cfg` parameter as node `node_rank`. Refuses a flow run whose
    world does not match the Job's pod count (the rendezvous would wait for nodes that never come)."""
    if "cfg" not in params:
        raise ValueError(
            "this flow run has no `cfg` parameter (a recipe run?): deploy the train stage "
            "(`train/flowspeed-train`, flows/stages.py:train) to the multi-node pool"
        )
    raw = copy.deepcopy(params["cfg"])
    cfg = PipelineConfig.model_validate(raw)
    if cfg.train.nnodes != nnodes:
        raise ValueError(
            f"the flow run's train.nnodes={cfg.train.nnodes} but the Job has {nnodes} pods: set the deployment's "
            f"train.nnodes (and train.rdzv_endpoint, `flowspeed k8s template --kind pool` prints both) or the "
            f"work pool's nnodes variable so they agree"
        )
    if not cfg.train.rdzv_endpoint:
        raise ValueError(
            "the flow run's config has no train.rdzv_endpoint: `flowspeed k8s template --kind pool` prints it"
        )
    if not 0 < node_rank < nnodes:
        raise ValueError(f"node rank {node_rank}: a joining pod is one of 1..{nnodes - 1} (pod 0 runs the flow)")
    return cfg.model_copy(update={"train": cfg.train.model_copy(update={"node_rank": node_rank})})
