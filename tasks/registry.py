"""The registry stage: register the pipeline's export as a model version and apply the gates.

The decision (alias, reasons) goes on the MLflow run as tags, on the model version as tags, and to
Prefect as a markdown artifact, so it is readable from either UI without opening logs.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from flowspeed.configs import PipelineConfig
from flowspeed.engines.common.io import file_digest
from flowspeed.engines.tracking.registry import champion_version, register_and_promote, version_metrics
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
    measured = measure_champion(cfg, client, metrics)  # before the gates read the champion's tags
    decision = register_and_promote(uri, name, source, source_run, metrics, reg.gates)
    if measured:  # the gate's verdict reads the measured value: say where it came from, on the version too
        decision.reasons = measured + decision.reasons
        joined = "; ".join(decision.reasons)[:4900]
        client.set_model_version_tag(name, decision.version, "flowspeed.gate_reasons", joined)
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


def measure_champion(cfg: PipelineConfig, client: MlflowClient, metrics: dict[str, float]) -> list[str]:
    """Give the champion the gate metrics it was never measured on, so a gate compares instead of waving the
    candidate through: a champion trained by SFT has no `eval/reward`, and a post-training run gated on a reward
    gain must beat the champion's reward, not its absence. The champion's export is evaluated with this run's eval
    config (its `eval.model` pointing at the champion's local copy, the one `train.init_from: champion` trains
    from), and each value becomes the champion version's `metric.<name>` tag, so the next run reads it instead of
    evaluating again. Metrics the champion has are left as they are. Returns the reasons to show before the gates'."""
    name = cfg.registered_model
    champion = champion_version(client, name)
    if champion is None:
        return []
    has = version_metrics(client, name, champion)
    # Only what an eval measures (not train/final_loss); and a candidate without the value fails its gate anyway.
    gated = dict.fromkeys(g.metric for g in cfg.tracking.registry.gates)
    missing = [m for m in gated if m.startswith("eval/") and m not in has and m in metrics]
    if not missing:
        return []
    from flowspeed.engines.tracking.registry import fetch_version
    from flowspeed.engines.tracking.serving import weights_dir
    from flowspeed.evaluation.run import run_eval  # torch and the family: only when a champion is measured

    local = weights_dir(fetch_version(tracking_uri(cfg), name, champion, cfg.workdir / ".champion" / name))
    # the same eval section but what it reads; its own folder (eval_dir is keyed by eval.model), not this run's
    eval_cfg = cfg.model_copy(update={"eval": cfg.eval.model_copy(update={"model": str(local), "output_dir": None})})
    found = run_eval(eval_cfg).metrics
    reasons = []
    for metric in missing:
        value = found.get(metric)
        if value is None or math.isnan(value):  # the gate then keeps its old verdict for a champion without it
            reasons.append(f"{metric}: the champion (version {champion}) has no value, and its eval with this run's "
                           f"eval config gave none ({eval_cfg.eval_dir})")  # fmt: skip
            continue
        client.set_model_version_tag(name, champion, f"metric.{metric}", repr(float(value)))
        client.set_model_version_tag(name, champion, f"flowspeed.measured.{metric}", str(eval_cfg.eval_dir))
        reasons.append(f"{metric}: the champion (version {champion}) had no value; measured now with this run's "
                       f"eval config: {value:.6g} ({eval_cfg.eval_dir})")  # fmt: skip
    return reasons


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
