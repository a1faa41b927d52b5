"""MLflow runs per stage: a parent run per pipeline and a nested run per stage, linked to Prefect.

Uses `MlflowClient` with explicit run ids rather than the fluent API's thread-local active run,
because Prefect may run tasks on other threads than the flow.
"""

from __future__ import annotations

import functools
import logging
import os
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import mlflow
from flowspeed.configs import PipelineConfig, flatten, save_config
from flowspeed.engines.tracking import runs
from flowspeed.engines.tracking.tracker import ensure_experiment, tracking_uri
from flowspeed.tasks.caching import retry_if_transient
from mlflow import MlflowClient
from mlflow.entities import DatasetInput, InputTag, Metric, Param, RunTag
from prefect import get_run_logger, task
from prefect.artifacts import create_link_artifact
from prefect.exceptions import MissingContextError
from prefect.runtime import flow_run


def ui_link(uri: str, experiment_id: str, run_id: str) -> str:
    """The run in the MLflow UI: at FLOWSPEED_MLFLOW_UI_URL when set (the address browsers reach: a proxy,
    another host or port), else at the tracking server's own URL, else where `mlflow ui` serves a local
    store by default (127.0.0.1:5000; the CLI prints the `mlflow ui` command for a sqlite store)."""
    base = os.environ.get("FLOWSPEED_MLFLOW_UI_URL") or (uri if uri.startswith("http") else "http://127.0.0.1:5000")
    return f"{base.rstrip('/')}/#/experiments/{experiment_id}/runs/{run_id}"


def prefect_run_url(flow_run_id: str) -> str:
    """The flow run in the Prefect UI: the configured UI, the API server's, or `prefect server start`'s
    default (where the ephemeral API's database, under the workdir, can be browsed afterwards)."""
    ui = os.environ.get("PREFECT_UI_URL")
    if not ui and os.environ.get("PREFECT_API_URL"):
        ui = os.environ["PREFECT_API_URL"].rstrip("/").removesuffix("/api")
    return f"{(ui or 'http://127.0.0.1:4200').rstrip('/')}/runs/flow-run/{flow_run_id}"


def _model_source(cfg: PipelineConfig) -> str:
    t = cfg.model.transformer
    return Path(t.pretrained).name if t.pretrained else str(t.preset)


def run_label(cfg: PipelineConfig) -> str:
    """`tracking.run_name`, else what tells runs apart in a list: workdir, family, model, lr, steps."""
    if cfg.tracking.run_name:
        return cfg.tracking.run_name
    lora = "-lora" if cfg.train.lora.enabled else ""
    return (f"{cfg.workdir.name}-{cfg.model.family}-{_model_source(cfg)}{lora}"
            f"-lr{cfg.train.lr:g}-{cfg.train.max_steps}steps")  # fmt: skip


def run_tags(cfg: PipelineConfig) -> dict[str, str]:
    """What a run is, searchable in MLflow: `tags.flowspeed.family = 'flux'`, same config hash, commit."""
    p, t = cfg.train.parallel, cfg.train
    layout = (f"nnodes={t.nnodes} nproc={t.nproc_per_node} dp_replicate={p.dp_replicate} dp_shard={p.dp_shard} "
              f"tp={p.tp} cp={p.cp} pp={p.pp}")  # fmt: skip
    tags = {
        "flowspeed.config_hash": cfg.config_hash(),
        "flowspeed.family": cfg.model.family,
        "flowspeed.model": _model_source(cfg),
        "flowspeed.variant": _model_source(cfg),  # with family and recipe: what tells a shared workdir's runs apart
        "flowspeed.recipe": cfg.tracking.recipe or "",
        "flowspeed.engine": cfg.train.engine,
        "flowspeed.parallel_layout": layout,
        "flowspeed.device": t.device,
    }
    commit = git_commit()
    if commit:
        tags["mlflow.source.git.commit"] = commit  # the MLflow UI shows this one on the run page
    return tags


@functools.lru_cache(maxsize=1)
def git_commit() -> str | None:
    """The checkout's commit (+"-dirty" with uncommitted changes), or None outside a git checkout."""
    repo = Path(__file__).resolve().parents[1]
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True, timeout=10)
        if head.returncode != 0:
            return None
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=repo,
                               capture_output=True, text=True, timeout=10).stdout.strip()  # fmt: skip
    except (OSError, subprocess.TimeoutExpired):
        return None
    return head.stdout.strip() + ("-dirty" if dirty else "")


@task(name="start-mlflow-run", retries=2, retry_delay_seconds=2, retry_condition_fn=retry_if_transient)
def start_run(cfg: PipelineConfig, stage: str, parent_run_id: str | None = None, train_dir: Path | None = None) -> str:
    """Open the run, log the resolved config (params + artifact), tag the Prefect flow run. With
    `train_dir` (the train stage), continue the run of a training there that was killed, and record
    the run there for the next resume."""
    uri = tracking_uri(cfg)
    client = MlflowClient(uri)
    exp = ensure_experiment(client, cfg)
    flow_tags = {"flowspeed.prefect.flow_run_id": str(flow_run.id or ""),
                 "flowspeed.prefect.flow_run_name": str(flow_run.name or "")}  # fmt: skip
    if flow_run.id:
        flow_tags["flowspeed.prefect.flow_run_url"] = prefect_run_url(str(flow_run.id))
    if train_dir is not None:
        run_id = runs.continue_train_run(cfg, train_dir, parent_run_id, flow_tags)
        if run_id is not None:
            runs.record_train_run(train_dir, uri, run_id)
            _link(uri, exp, run_id, stage)
            return run_id
    tags = {"flowspeed.stage": stage, **flow_tags, **run_tags(cfg), **runs.owner_tags()}
    if parent_run_id:
        tags["mlflow.parentRunId"] = parent_run_id
    name = f"{run_label(cfg)}-{stage}"
    run = client.create_run(exp, run_name=name, tags=tags)
    run_id = run.info.run_id
    params = [Param(k, v) for k, v in flatten(cfg).items()]
    for i in range(0, len(params), 100):  # log_batch takes at most 100 params per call
        client.log_batch(run_id, params=params[i : i + 100])
    cfg_dir = cfg.workdir / ".mlflow-config" / run_id
    client.log_artifact(run_id, str(save_config(cfg, cfg_dir)))
    if train_dir is not None:
        runs.record_train_run(train_dir, uri, run_id)
    _link(uri, exp, run_id, stage)
    return run_id


def _link(uri: str, exp: str, run_id: str, stage: str) -> None:
    if flow_run.id:
        create_link_artifact(
            ui_link(uri, exp, run_id),
            link_text=f"MLflow run {run_id[:8]} ({stage})",
            key=f"mlflow-{stage}",
            description=f"MLflow run of the {stage} stage",
        )


def _tolerant(cfg: PipelineConfig, run_id: str, rows: Callable[[], list[dict[str, Any]]],
              call: Callable[[], Any]) -> None:  # fmt: skip
    """Make a call that records finished work; if the server is away (now, or an earlier call of this
    process found it so), keep `rows` in the journal instead of failing the stage. A 4xx refusal is a
    real error and raises."""
    uri = tracking_uri(cfg)
    if runs.is_away(uri):
        runs.journal(cfg, run_id, rows(), ConnectionError(f"{uri} was unreachable a moment ago"))
        return
    try:
        call()
    except Exception as exc:
        if not runs.is_transport_error(exc):
            raise
        runs.journal(cfg, run_id, rows(), exc)


@task(name="end-mlflow-run", retries=2, retry_delay_seconds=2, retry_condition_fn=retry_if_transient)
def end_run(cfg: PipelineConfig, run_id: str, status: str = "FINISHED") -> None:
    """The terminal status; with the server away it waits in the journal (after the rows before it)."""
    end = int(time.time() * 1000)
    if not runs.flush_run_journal(cfg, run_id):  # rows of this run still wait: the status goes after them
        runs.journal(cfg, run_id, [{"kind": "status", "status": status, "end_time": end}],
                     ConnectionError(f"{tracking_uri(cfg)} is unreachable"))  # fmt: skip
        return
    _tolerant(cfg, run_id, lambda: [{"kind": "status", "status": status, "end_time": end}],
              lambda: MlflowClient(tracking_uri(cfg)).set_terminated(run_id, status=status, end_time=end))  # fmt: skip


def log_metrics(cfg: PipelineConfig, run_id: str, metrics: dict[str, float], step: int = 0) -> None:
    ts = int(time.time() * 1000)
    batch = [Metric(k, float(v), ts, step) for k, v in metrics.items()]

    def call() -> None:
        client = MlflowClient(tracking_uri(cfg))
        for i in range(0, len(batch), 1000):  # log_batch takes at most 1000 metrics per call
            client.log_batch(run_id, metrics=batch[i : i + 1000])

    rows = [{"kind": "metric", "key": m.key, "value": m.value, "timestamp": m.timestamp, "step": m.step} for m in batch]
    _tolerant(cfg, run_id, lambda: rows, call)


def log_dataset(cfg: PipelineConfig, run_id: str, samples_path: Path, context: str) -> None:
    """The prep output as an MLflow dataset input: lineage from manifest to cache to model."""
    import pandas as pd

    rows = pd.read_json(samples_path, lines=True) if samples_path.stat().st_size else pd.DataFrame()
    cols = [c for c in ("key", "source", "content_hash", "caption", "prep_hash", "encoder", "shard") if c in rows]
    ds = mlflow.data.from_pandas(
        rows[cols],
        source=str(Path(cfg.data.manifest).resolve()),
        name=f"{Path(cfg.data.manifest).parent.name}-{cfg.prep_hash()}",
    )
    entity = ds._to_mlflow_entity()
    fields = {k: getattr(entity, k) for k in ("name", "digest", "source_type", "source", "schema", "profile")}
    _tolerant(
        cfg,
        run_id,
        lambda: [{"kind": "dataset", "dataset": fields, "context": context}],
        lambda: MlflowClient(tracking_uri(cfg)).log_inputs(
            run_id, datasets=[DatasetInput(entity, tags=[InputTag("mlflow.data.context", context)])]
        ),
    )


def set_tags(cfg: PipelineConfig, run_id: str, tags: dict[str, Any]) -> None:
    batch = [RunTag(k, str(v)[:5000]) for k, v in tags.items()]
    _tolerant(cfg, run_id, lambda: [{"kind": "tag", "key": t.key, "value": t.value} for t in batch],
              lambda: MlflowClient(tracking_uri(cfg)).log_batch(run_id, tags=batch))  # fmt: skip


def log_table(
    cfg: PipelineConfig, run_id: str, rows: list[dict[str, Any]], artifact_file: str, image_column: str | None = None
) -> None:
    """Rows as an MLflow table artifact: the UI's evaluation view lists and compares them across runs.
    `image_column`: a column of PNG paths, logged as pictures (MLflow stores a column of PIL images as artifacts
    beside the table and the UI shows them); with the server away the journal keeps the paths (the sync logs
    them as text)."""
    if not rows:
        return
    columns = list(dict.fromkeys(k for r in rows for k in r))
    data = {c: [r.get(c) for r in rows] for c in columns}
    row = {"kind": "table", "data": data, "artifact_file": artifact_file}

    def call() -> None:
        sent = data
        if image_column is not None:
            from PIL import Image

            images = []
            for path in data[image_column]:
                with Image.open(path) as img:
                    images.append(img.convert("RGB"))  # a loaded copy: the file is closed before the upload
            sent = {**data, image_column: images}
        MlflowClient(tracking_uri(cfg)).log_table(run_id, data=sent, artifact_file=artifact_file)

    _tolerant(cfg, run_id, lambda: [row], call)


def log_prep_preview(cfg: PipelineConfig, run_id: str, prep_dir: Path) -> None:
    """What prep took and refused, to look at in the MLflow UI: the contact sheet (`prep/contact_sheet*.png`),
    the samples with thumbnails (`prep_samples.json`) and the rejects with their reasons (`prep_rejects.json`),
    drawn by flowspeed.datasets_prep.preview (reused as drawn while the prep outputs are unchanged).
    Pictures are for people: failing to draw or log them is a warning and the tag `flowspeed.prep_preview`,
    never a failed prep."""
    from flowspeed.datasets_prep.preview import media_roots, render_prep

    try:
        pv = render_prep(prep_dir, cfg.data.decoder, media_roots(cfg))
        for page in pv.pages:
            log_artifacts(cfg, run_id, page, "prep")
        log_table(cfg, run_id, pv.samples, "prep_samples.json", image_column="thumbnail")
        log_table(cfg, run_id, pv.rejects, "prep_rejects.json")
    except Exception as exc:  # noqa: BLE001 - the prep itself succeeded; its pictures are optional
        why = f"failed: {type(exc).__name__}: {exc}"
        try:
            get_run_logger().warning("prep preview %s", why)
        except MissingContextError:  # called outside a flow run
            logging.getLogger("flowspeed").warning("prep preview %s", why)
        set_tags(cfg, run_id, {"flowspeed.prep_preview": why})
        return
    shown = f"{len(pv.tiles)} of {pv.total_samples} samples, {len(pv.rejects)} rejects, {len(pv.pages)} sheet(s)"
    set_tags(cfg, run_id, {"flowspeed.prep_preview": shown})


def log_artifacts(cfg: PipelineConfig, run_id: str, local: Path, artifact_path: str | None = None) -> None:
    """Upload a file or folder; with the server away the journal keeps its path (the files stay where
    they are) and the sync uploads them from there."""

    def call() -> None:
        client = MlflowClient(tracking_uri(cfg))
        if Path(local).is_dir():
            client.log_artifacts(run_id, str(local), artifact_path)
        else:
            client.log_artifact(run_id, str(local), artifact_path)

    row = {"kind": "artifact", "path": str(Path(local).resolve()), "artifact_path": artifact_path}
    _tolerant(cfg, run_id, lambda: [row], call)


def should_log_model(cfg: PipelineConfig, model_dir: Path, limit: int = 512 * 2**20) -> bool:
    """Copying a 10 GB export into the artifact store doubles storage; past `limit` the
    `flowspeed.export_path` tag is the record (auto), unless the config says always/never."""
    mode = cfg.tracking.log_model
    if mode != "auto":
        return mode == "always"
    return sum(p.stat().st_size for p in model_dir.rglob("*") if p.is_file()) < limit
