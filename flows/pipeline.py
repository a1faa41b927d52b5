"""The whole chain as one flow: prep -> train -> evaluate, each a subflow with a nested MLflow run.

flowspeed run configs/quickstart.yaml
# or, deployed: prefect deploy --all (see prefect.yaml), then run `pipeline/flowspeed-pipeline`

A rerun with nothing to do (every stage's result in Prefect's cache, its outputs present and current)
is decided before any stage flow starts and recorded on the pipeline's own runs: its Prefect flow run
holds the three stage tasks, each in state Cached, and its MLflow run the paths, which stages were reused
and the runs that did their work. No stage flow or nested MLflow run is opened for it: three flow runs and
three MLflow runs per rerun that only repeated the first run's record (and re-uploaded its model and
samples) were most of a no-op rerun's time.

A reused stage's figures are never logged again as metrics of the new run (a metric says "this run measured
this"): a pipeline run logs `train/final_loss` only when its train stage trained and the eval metrics only
when its eval stage evaluated. What it reused it names in tags: `flowspeed.reused` (true when every stage
was reused), `flowspeed.reused_stages`, `flowspeed.reused_from_run` (the pipeline run that produced the
reused model: its metrics are the figures) and `flowspeed.reused_from_run.<stage>` (the stage runs).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from flowspeed.configs import PipelineConfig
from flowspeed.engines.common.io import file_digest
from flowspeed.engines.tracking import runs
from flowspeed.engines.tracking.tracker import UNDELIVERED_DIR, tracking_uri
from flowspeed.evaluation.labels import random_init_tags
from flowspeed.flows.stages import _ensure_mlmodel, eval_digest, evaluate, in_stage_run, pin_eval_model, prep, train
from flowspeed.flows.summary import publish_summary
from flowspeed.tasks import tracking as tr
from flowspeed.tasks.caching import FilesPolicy, run_cached
from flowspeed.tasks.registry import init_model, register_model
from flowspeed.tasks.stages import evaluate_model, prep_latents, train_model
from prefect import flow
from prefect.results import get_result_store
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
        skipped = f"MLflow unreachable: {exc}"
        tr.set_tags(cfg, run_id, {"flowspeed.registry.skipped": skipped})  # journaled: the server is away
        return {"skipped": skipped}


def _cached(task: Any, **inputs: Any) -> dict[str, Any] | None:
    """The result `run_cached(task, **inputs)` would take from Prefect's cache, found without running anything:
    the key the task's own cache policy computes, looked up in Prefect's result store, with the outputs it
    promised present and still the ones the result describes. None when the task would run."""
    policy = task.cache_policy
    try:
        if not isinstance(policy, FilesPolicy) or policy.missing_outputs(inputs):
            return None
        key = policy.compute_key(None, inputs, {})  # FilesPolicy keys on the inputs and source files only
    except Exception:  # noqa: BLE001 - as Prefect's task engine does: no key, the task runs (its stage flow reports)
        return None
    store = get_result_store().update_for_task(task)
    if key is None or not store.exists(key):
        return None
    result = store.read(key).result
    if not isinstance(result, dict) or (policy.current is not None and not policy.current(inputs, result)):
        return None
    return result


def _all_reused(cfg: PipelineConfig, run_id: str) -> dict[str, Any] | None:
    """Every stage's result from Prefect's cache, or None (nothing done) when any stage has work, or when the
    stage flows must run anyway: a sliced prep (its own flow maps the slices) and the registry (a version's
    source is the model its train run logged in this tracking store).

    The checks go in stage order on the files they read: a cached prep rewrites nothing, so the train
    check sees the samples the train stage would. Then the same three tasks run in this flow run, as
    Prefect cache hits, and the train stage's upkeep is done here: the export's MLmodel rewritten if its
    inputs changed, training metrics an MLflow outage kept delivered."""
    if cfg.tracking.registry.enabled or (cfg.data.slices > 1 and cfg.data.nproc_per_node == 1):
        return None
    if _cached(prep_latents, cfg=cfg) is None:
        return None
    run_cfg, init_from = init_model(cfg)
    train_inputs = {"cfg": run_cfg, "run_id": run_id, "tracking_uri": tracking_uri(cfg)}
    eval_cfg = pin_eval_model(run_cfg)
    if _cached(train_model, **train_inputs) is None or _cached(evaluate_model, cfg=eval_cfg) is None:
        return None
    out = {"prep": run_cached(prep_latents, cfg=cfg), "train": run_cached(train_model, **train_inputs),
           "eval": run_cached(evaluate_model, cfg=eval_cfg)}  # fmt: skip
    runs.deliver_training_metrics(cfg, run_cfg.train_dir / UNDELIVERED_DIR)
    _ensure_mlmodel(Path(out["train"]["final_dir"]).resolve(), run_cfg)  # the train stage's MLmodel upkeep
    # No stage run here: the runs that did the work are the ones beside the outputs (or, for train, in its result).
    out["prep"]["reused_from_run"] = runs.producer_of(Path(out["prep"]["prep_dir"]), out["prep"].get("samples_digest"))
    eval_dir = Path(out["eval"]["eval_dir"])
    out["eval"]["reused_from_run"] = runs.producer_of(eval_dir, eval_digest(eval_dir))
    out["train"]["reused_from_run"] = out["train"].get("run_id")
    tags = {
        "flowspeed.init_from": init_from,
        "flowspeed.prefect_cache_hit": all(res["cache_hit"] for res in out.values()),
        "flowspeed.prep_dir": Path(out["prep"]["prep_dir"]).resolve(),
    }
    if eval_cfg.eval.model:
        tags["flowspeed.eval_model"] = eval_cfg.eval.model
    tr.set_tags(cfg, run_id, tags)
    return out


def _reuse_tags(cfg: PipelineConfig, out: dict[str, Any]) -> dict[str, str]:
    """What the pipeline run reused and from which runs: the stages' producers and the pipeline run that produced
    the reused model (the parent of its train run; the train run itself when it ran on its own)."""
    stages = [s for s in ("prep", "train", "eval") if out[s].get("cache_hit")]
    tags = {runs.REUSED: str(len(stages) == 3).lower(), "flowspeed.reused_stages": ",".join(stages)}
    for stage in stages:
        tags[f"{runs.REUSED_FROM}.{stage}"] = out[stage].get("reused_from_run") or "unknown"
    if "train" in stages:
        train_run = out["train"].get("run_id")
        tags[runs.REUSED_FROM] = runs.parent_of(tracking_uri(cfg), train_run) or train_run or "unknown"
    return tags


@flow(name="pipeline", log_prints=True)
def pipeline(cfg: PipelineConfig) -> dict[str, Any]:
    def body(run_id: str) -> dict[str, Any]:
        out = _all_reused(cfg, run_id)
        if out is None:
            out = {"prep": prep(cfg, run_id)}
            run_cfg, init_from = init_model(cfg)  # after prep: the training dir is keyed by champion and data
            tr.set_tags(cfg, run_id, {"flowspeed.init_from": init_from})
            out |= {"train": train(run_cfg, run_id), "eval": evaluate(run_cfg, run_id)}
        metrics = dict(out["eval"]["metrics"])  # the model's figures, for the registry's gates
        losses = out["train"].get("losses") or []
        if losses:
            metrics["train/final_loss"] = losses[-1]
        # Logged only what this run measured: a reused stage's figures stay on the run that produced them.
        new = {} if out["eval"].get("cache_hit") else dict(out["eval"]["metrics"])
        if losses and not out["train"].get("cache_hit"):
            new["train/final_loss"] = losses[-1]
        if new:
            tr.log_metrics(cfg, run_id, new)
        tags = {"flowspeed.checkpoint_path": out["train"]["checkpoint"],
                "flowspeed.export_path": out["train"]["final_dir"],
                "flowspeed.dataset_digest": file_digest(Path(out["prep"]["samples"])),
                **random_init_tags(out["eval"].get("info") or {}), **_reuse_tags(cfg, out)}  # fmt: skip
        tr.set_tags(cfg, run_id, tags)
        if cfg.tracking.registry.enabled:  # a new version; `champion` moves only if the gates pass
            out["registry"] = _register(cfg, run_id, out, metrics)
        return out

    out = in_stage_run(cfg, "pipeline", None, body)
    out["prefect_flow_run_id"] = str(flow_run.id)
    out["tracking_uri"] = tracking_uri(cfg)
    publish_summary(cfg, out)  # the table and MLflow link in this flow run's Artifacts tab
    return out
