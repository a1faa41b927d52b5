"""The registry stage: register the pipeline's export as a model version and apply the gates.

The decision (alias, reasons) goes on the MLflow run as tags, on the model version as tags, and to
Prefect as a markdown artifact, so it is readable from either UI without opening logs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from flowspeed.configs import PipelineConfig
from flowspeed.engines.common.io import file_digest
from flowspeed.engines.tracking.registry import register_and_promote
from flowspeed.engines.tracking.tracker import tracking_uri
from flowspeed.tasks.caching import retry_if_transient
from mlflow import MlflowClient
from prefect import task
from prefect.artifacts import create_markdown_artifact
from prefect.runtime import flow_run


def model_source(client: MlflowClient, train_run_id: str | None, export_dir: Path) -> tuple[str, str | None]:
    """(source, the run that holds it): the model's copy in the train run's artifacts when that stage
    logged it, else the export folder (a path the registry's readers must share) and no run; a
    tracking server accepts a version's source only inside the artifacts of the run it names."""
    if train_run_id and client.list_artifacts(train_run_id, "model"):
        return client.get_run(train_run_id).info.artifact_uri.rstrip("/") + "/model", train_run_id
    return Path(export_dir).resolve().as_uri(), None


@task(name="register-model", retries=2, retry_delay_seconds=2, retry_condition_fn=retry_if_transient)
def register_model(
    cfg: PipelineConfig, run_id: str, train_run_id: str | None, export_dir: str, metrics: dict[str, float]
) -> dict[str, Any]:
    reg = cfg.tracking.registry
    name = cfg.registered_model
    uri = tracking_uri(cfg)
    client = MlflowClient(uri)
    source, source_run = model_source(client, train_run_id, Path(export_dir))
    decision = register_and_promote(uri, name, source, source_run, metrics, reg.gates)
    client.set_model_version_tag(name, decision.version, "flowspeed.pipeline_run_id", run_id)
    client.set_tag(run_id, "flowspeed.registry.model", name)
    client.set_tag(run_id, "flowspeed.registry.version", decision.version)
    client.set_tag(run_id, "flowspeed.registry.alias", decision.alias)
    client.set_tag(run_id, "flowspeed.registry.reasons", "; ".join(decision.reasons)[:4900])
    if flow_run.id:
        create_markdown_artifact(decision.markdown(), key="registry-decision",
                                 description=f"{name} v{decision.version}: {decision.alias}")  # fmt: skip
    return {"model": name, "version": decision.version, "alias": decision.alias, "reasons": decision.reasons,
            "champion_before": decision.champion_before, "source": source}  # fmt: skip


@task(name="resolve-init-model", retries=2, retry_delay_seconds=2, retry_condition_fn=retry_if_transient)
def resolve_init_model(cfg: PipelineConfig) -> tuple[PipelineConfig, str]:
    """`train.init_from: champion` -> the config with model.transformer pointing at the champion's
    weights, and where they came from. No champion yet: the configured model, said so."""
    if cfg.train.init_from != "champion":
        return cfg, "config"
    from flowspeed.configs import ComponentConfig
    from flowspeed.engines.models import get_family
    from flowspeed.engines.tracking.registry import fetch_champion
    from flowspeed.engines.tracking.serving import weights_dir

    name = cfg.registered_model
    found = fetch_champion(tracking_uri(cfg), name, cfg.workdir / ".champion" / name)
    if found is None:
        return cfg, f"config (no champion of {name} yet)"
    version, local = found
    local = weights_dir(local)  # a pointer model's weights stay where its training wrote them
    subfolder = get_family(cfg.model.family).denoiser_subfolder or None
    champion = ComponentConfig(pretrained=str(local), subfolder=subfolder, preset=None,
                               trust_remote_code=cfg.model.transformer.trust_remote_code)  # fmt: skip
    model = cfg.model.model_copy(update={"transformer": champion})
    # A training dir per (champion, data): a rerun of the same finetune resumes in it, a new champion
    # or new data starts fresh instead of "resuming" the last night's finished run.
    samples = cfg.prep_dir / "samples.jsonl"
    data = file_digest(samples)[:8] if samples.is_file() else "nodata"
    out = cfg.train_dir / f"from-{name}-v{version}-{data}"
    train = cfg.train.model_copy(update={"init_from": "config", "output_dir": out})
    # The data stays what prep made for the configured model: its folder is keyed by the model section.
    prepped = cfg.data.model_copy(update={"output_dir": cfg.prep_dir, "cache_dir": cfg.cache_dir})
    resolved = cfg.model_copy(update={"model": model, "train": train, "data": prepped})
    return resolved, f"models:/{name}@champion (version {version})"


def init_model(cfg: PipelineConfig) -> tuple[PipelineConfig, str]:
    """`resolve_init_model`, run as a Prefect task (retries, a task run to read) only when there is a champion to
    look up: a config that trains from itself resolves to itself, without a task run's API calls on every rerun."""
    if cfg.train.init_from != "champion":
        return cfg, "config"
    return resolve_init_model(cfg)
