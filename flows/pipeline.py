"""The whole chain as one flow: prep -> train -> evaluate, each a subflow with a nested MLflow run.

flowspeed run configs/quickstart.yaml
# or, deployed: prefect deploy --all (see prefect.yaml), then run `pipeline/flowspeed-pipeline`
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from flowspeed.configs import PipelineConfig
from flowspeed.engines.common.io import file_digest
from flowspeed.engines.tracking import runs
from flowspeed.engines.tracking.tracker import tracking_uri
from flowspeed.flows.stages import evaluate, in_stage_run, prep, train
from flowspeed.tasks import tracking as tr
from flowspeed.tasks.registry import init_model, register_model
from prefect import flow
from prefect.runtime import flow_run


def _register(cfg: PipelineConfig, run_id: str, out: dict[str, Any], metrics: dict[str, float]) -> dict[str, Any]:
    """Register the export; with the server away the trained, evaluated model is not failed for it: the
    registry decision needs the server (champion, gates), so it is skipped with what to run later."""
    uri = tracking_uri(cfg)
    try:
        if runs.is_away(uri):
            raise ConnectionError(f"{uri} was unreachable a moment ago")
        return register_model(cfg, run_id, out["train"].get("mlflow_run_id"), out["train"]["final_dir"], metrics)
    except Exception as exc:
        if not runs.is_transport_error(exc):
            raise
        runs.mark_away(uri)
        runs.say(f"warning: MLflow at {uri} is unreachable, so the model was not registered ({exc}). Once the "
                 "server is back, `flowspeed run` with the same config registers it (training and eval are "
                 "reused from the cache).")  # fmt: skip
        return {"skipped": f"MLflow unreachable: {exc}"}


@flow(name="pipeline", log_prints=True)
def pipeline(cfg: PipelineConfig) -> dict[str, Any]:
    def body(run_id: str) -> dict[str, Any]:
        out = {"prep": prep(cfg, run_id)}
        run_cfg, init_from = init_model(cfg)  # after prep: the training dir is keyed by champion and data
        tr.set_tags(cfg, run_id, {"flowspeed.init_from": init_from})
        out |= {"train": train(run_cfg, run_id), "eval": evaluate(run_cfg, run_id)}
        metrics = dict(out["eval"]["metrics"])
        losses = out["train"].get("losses") or []
        if losses:
            metrics["train/final_loss"] = losses[-1]
        tr.log_metrics(cfg, run_id, metrics)
        tags = {"checkpoint_path": out["train"]["checkpoint"], "export_path": out["train"]["final_dir"],
                "flowspeed.dataset_digest": file_digest(Path(out["prep"]["samples"]))}  # fmt: skip
        tr.set_tags(cfg, run_id, tags)
        if cfg.tracking.registry.enabled:  # a new version; `champion` moves only if the gates pass
            out["registry"] = _register(cfg, run_id, out, metrics)
        return out

    out = in_stage_run(cfg, "pipeline", None, body)
    out["prefect_flow_run_id"] = str(flow_run.id)
    out["tracking_uri"] = tracking_uri(cfg)
    return out
