"""The stage flows. Each opens its MLflow run (nested under `parent_run_id` inside a pipeline),
calls its task, logs what the stage produced, and closes the run as FINISHED or FAILED.

    flowspeed prep configs/quickstart.yaml      # or train / eval / run
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from flowspeed.configs import PipelineConfig
from flowspeed.configs.catalog import FAMILIES
from flowspeed.engines.common.io import atomic_write_text, file_digest
from flowspeed.engines.tracking import runs
from flowspeed.engines.tracking.environment import pip_requirements
from flowspeed.engines.tracking.tracker import UNDELIVERED_DIR, tracking_uri
from flowspeed.evaluation.labels import random_init_tags
from flowspeed.tasks import tracking as tr
from flowspeed.tasks.caching import run_cached
from flowspeed.tasks.registry import init_model
from flowspeed.tasks.stages import (
    evaluate_model,
    make_task_runner,
    merge_prep_task,
    prep_latents,
    prep_slice_task,
    train_model,
)
from prefect import flow, unmapped
from prefect.exceptions import TerminationSignal


def in_stage_run(
    cfg: PipelineConfig,
    stage: str,
    parent: str | None,
    body: Callable[[str], dict[str, Any]],
    train_dir: Path | None = None,
) -> dict[str, Any]:
    """The stage's work inside its MLflow run. The server is checked first (an unreachable one fails in
    seconds with what to do, or is waited for: `tracking.server_wait_s`); once the work is done, an
    outage no longer fails the stage: `flowspeed.tasks.tracking` keeps what it could not record for
    `flowspeed sync-metrics`. `train_dir`: the train stage, whose killed run the resume continues."""
    runs.ready(cfg)
    run_id = tr.start_run(cfg, stage, parent, train_dir)
    try:
        out = body(run_id)
    except BaseException as exc:
        # Ctrl-C or SIGTERM: KILLED, as MLflow's own API marks interrupted runs; never masks the
        # stage's error (an outage here goes to the journal).
        tr.end_run(cfg, run_id, "KILLED" if isinstance(exc, KeyboardInterrupt | TerminationSignal) else "FAILED")
        raise
    tr.end_run(cfg, run_id, "FINISHED")
    return {**out, "mlflow_run_id": run_id}


@flow(name="prep-slices", log_prints=True)
def prep_slices(cfg: PipelineConfig) -> dict[str, Any]:
    """Map the manifest's slices over the configured task runner, then merge them into one index (the merge
    publishes config.yaml with the outputs, so a failed prep leaves the previous one)."""
    n = cfg.data.slices
    futures = prep_slice_task.map(unmapped(cfg), range(n), unmapped(n))
    states = [f.wait() or f.state for f in futures]
    for state in states:
        state.result()  # raises the first slice's error
    out = merge_prep_task(cfg, n)
    out["cache_hit"] = all(state.name == "Cached" for state in states)
    return out


def _prep_result(cfg: PipelineConfig) -> dict[str, Any]:
    if cfg.data.slices > 1 and cfg.data.nproc_per_node == 1:
        return prep_slices.with_options(task_runner=make_task_runner(cfg))(cfg)
    return run_cached(prep_latents, cfg=cfg)


@flow(name="prep", log_prints=True)
def prep(cfg: PipelineConfig, parent_run_id: str | None = None) -> dict[str, Any]:
    """Manifest -> latent cache, with rejects recorded and finished work skipped."""

    def body(run_id: str) -> dict[str, Any]:
        res = _prep_result(cfg)
        reuse, res["reused_from_run"] = runs.reuse_tags(
            Path(res["prep_dir"]), run_id, res.get("samples_digest"), res["cache_hit"]
        )
        if not res["cache_hit"]:  # a reused prep did no work here: its counts and speed belong to the run that did
            counts = ("num_records", "num_samples", "num_rejected", "num_cached", "num_encoded", "encoder_calls")
            speed = ("seconds", "clips_per_s", "frames_per_s")
            metrics = {f"prep/{k}": res[k] for k in counts + speed}
            metrics |= {f"prep/rejected/{code}": n for code, n in res["rejected_by_reason"].items()}
            tr.log_metrics(cfg, run_id, metrics)
        tr.log_dataset(cfg, run_id, Path(res["samples"]), context="prep")
        for name in ("rejects", "samples"):
            tr.log_artifacts(cfg, run_id, Path(res[name]), "prep")
        tr.log_prep_preview(cfg, run_id, Path(res["prep_dir"]))  # contact sheet, samples and rejects tables
        tr.set_tags(
            cfg,
            run_id,
            {
                **reuse,
                "flowspeed.prep_dir": Path(res["prep_dir"]).resolve(),
                "flowspeed.prep_hash": cfg.prep_hash(),
                "flowspeed.prefect_cache_hit": res["cache_hit"],
                "flowspeed.dataset_digest": file_digest(Path(res["samples"])),
            },
        )
        return res

    return in_stage_run(cfg, "prep", parent_run_id, body)


def _init_source(cfg: PipelineConfig, resolved: str) -> str:
    t = cfg.model.transformer
    return (
        resolved if resolved != "config" else (f"pretrained:{t.pretrained}" if t.pretrained else f"preset:{t.preset}")
    )


_MODELS_DIR = Path(__file__).resolve().parents[1] / "engines" / "models"
_SERVING = _MODELS_DIR.parent / "tracking" / "serving.py"
_ENVIRONMENT = _MODELS_DIR.parent / "tracking" / "environment.py"


def _mlmodel_key(cfg: PipelineConfig, final: Path) -> str | None:
    """What the export's MLmodel and serving settings are written from: the config's data/eval/model sections,
    the export's own marker file (a retrain rewrites it), the code that writes them (serving and the family
    modules) and the installed versions its requirements.txt pins. None: not known without the family (not in
    the catalog) or no export yet; then always rewrite."""
    facts = FAMILIES.get(cfg.model.family)
    marker = facts.export_files(final)[0] if facts is not None else None
    if marker is None or not marker.is_file():
        return None
    code = [_SERVING, _ENVIRONMENT, *sorted(_MODELS_DIR.glob("*.py"))]
    parts = {
        "cfg": cfg.model_dump(mode="json", include={"data", "eval", "model"}),
        "export": [str(marker.resolve()), marker.stat().st_mtime_ns],
        "code": [file_digest(p) for p in code if p.is_file()],
        "requirements": pip_requirements(),
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def _ensure_mlmodel(final: Path, cfg: PipelineConfig) -> None:
    """Write the export's MLmodel (flowspeed.engines.tracking.serving.write_mlmodel) unless the one there was
    written from
    the same key: a cached (no-op) train stage then imports neither the family nor torch. The key lives beside
    the export, not in it, so the model logged to MLflow is unchanged."""
    key = _mlmodel_key(cfg, final)
    stamp = final.parent / f".{final.name}.mlmodel-key"
    if key is not None and (final / "MLmodel").is_file() and stamp.is_file() and stamp.read_text() == key:
        return
    from flowspeed.engines.tracking.serving import write_mlmodel  # torch, pandas, the family: when used

    write_mlmodel(final, cfg)
    if key is not None:
        atomic_write_text(stamp, key)


@flow(name="train", log_prints=True)
def train(cfg: PipelineConfig, parent_run_id: str | None = None) -> dict[str, Any]:
    """Cached latents -> checkpoints and a diffusers export; per-step metrics go to this MLflow run (the
    same run across a kill and its resume)."""
    runs.ready(cfg)
    # Resolved before the run opens: the training dir (keyed by champion and data) says which killed
    # run this continues, and a new champion is a new input for the cached task, so it retrains. (The
    # pipeline resolves before calling this flow; then this is a no-op and the tag says where it started.)
    start_cfg, init_from = init_model(cfg)

    def body(run_id: str) -> dict[str, Any]:
        tr.set_tags(cfg, run_id, {"flowspeed.init_from": _init_source(start_cfg, init_from)})
        res = run_cached(train_model, cfg=start_cfg, run_id=run_id, tracking_uri=tracking_uri(cfg))
        # Metrics that training could not deliver while MLflow was away: sent now if the server is back.
        runs.deliver_training_metrics(cfg, start_cfg.train_dir / UNDELIVERED_DIR)
        # A reused model: this run logs no training metrics; the per-step ones live in the run that produced it.
        res["reused_from_run"] = res.get("run_id") if res["cache_hit"] else None
        reuse = {runs.REUSED: "true", runs.REUSED_FROM: res.get("run_id") or "unknown"} if res["cache_hit"] else {}
        tr.set_tags(cfg, run_id, reuse or {runs.REUSED: "false"})
        tr.log_dataset(cfg, run_id, cfg.prep_dir / "samples.jsonl", context="training")
        final = Path(res["final_dir"]).resolve()
        _ensure_mlmodel(final, start_cfg)  # the export is also an MLflow pyfunc model with a signature
        tr.set_tags(
            cfg,
            run_id,
            {
                "flowspeed.checkpoint_path": Path(res["checkpoint"]).resolve() if res["checkpoint"] else "",
                "flowspeed.export_path": final,
            },
        )
        if tr.should_log_model(cfg, final):
            tr.log_artifacts(cfg, run_id, final, "model")
        else:  # too big to copy: a pointer model (MLmodel + where the weights are) is what gets registered
            from flowspeed.engines.tracking.serving import write_pointer_model  # torch, pandas: when used

            tr.log_artifacts(cfg, run_id, write_pointer_model(final, cfg.workdir / ".pointer-model" / run_id), "model")
        return res

    return in_stage_run(cfg, "train", parent_run_id, body, train_dir=start_cfg.train_dir)


def pin_eval_model(cfg: PipelineConfig) -> PipelineConfig:
    """`eval.model: models:/NAME@ALIAS` -> `models:/NAME/<its version now>`: the result (and the eval
    cache key) names the version read, and a moved alias is a new input, not a cache hit."""
    model = cfg.eval.model
    if not model or not model.startswith("models:/") or "@" not in model:
        return cfg
    from flowspeed.engines.tracking.registry import resolve_version

    name, version = resolve_version(tracking_uri(cfg), model)
    return cfg.model_copy(update={"eval": cfg.eval.model_copy(update={"model": f"models:/{name}/{version}"})})


def eval_digest(eval_dir: Path) -> str | None:
    """What identifies an eval's outputs for `runs.producer_of`: its metrics.json (None before there is one)."""
    metrics = eval_dir / "metrics.json"
    return file_digest(metrics) if metrics.is_file() else None


@flow(name="evaluate", log_prints=True)
def evaluate(cfg: PipelineConfig, parent_run_id: str | None = None) -> dict[str, Any]:
    """Validation loss, sample videos and CLIP score for the exported model."""

    def body(run_id: str) -> dict[str, Any]:
        cfg_ = pin_eval_model(cfg)
        if cfg_.eval.model:
            tr.set_tags(cfg, run_id, {"flowspeed.eval_model": cfg_.eval.model})
        res = run_cached(evaluate_model, cfg=cfg_)
        digest = eval_digest(Path(res["eval_dir"]))
        reuse, res["reused_from_run"] = runs.reuse_tags(Path(res["eval_dir"]), run_id, digest, res["cache_hit"])
        if not res["cache_hit"]:  # a reused eval's scores are the producing run's: not logged again as new
            tr.log_metrics(cfg, run_id, res["metrics"])
        # which weights each scorer had: a random-init CLIP, FID or FVD is never a real score (labels.py)
        info = {f"flowspeed.eval.{k}": v for k, v in (res.get("info") or {}).items()}
        tr.set_tags(cfg, run_id, {**reuse, **info, **random_init_tags(res.get("info") or {})})
        for kind in ("videos", "samples"):  # generated media, or a text family's answers
            if (Path(res["eval_dir"]) / kind).is_dir():
                tr.log_artifacts(cfg, run_id, Path(res["eval_dir"]) / kind, kind)
        tr.log_artifacts(cfg, run_id, Path(res["eval_dir"]) / "metrics.json")
        tr.log_table(cfg, run_id, _eval_rows(cfg, res), "eval_samples.json")
        for path in sorted((Path(res["eval_dir"]) / "samples").glob("benchmark_*.jsonl")):  # one table per benchmark
            rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
            tr.log_table(cfg, run_id, rows, f"eval_{path.stem}.json")
        return res

    return in_stage_run(cfg, "eval", parent_run_id, body)


def _eval_rows(cfg: PipelineConfig, res: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per eval sample, for MLflow's table view: prompt -> generated file, or the answers."""
    for name in ("responses.jsonl", "generation.jsonl"):
        rows = Path(res["eval_dir"]) / "samples" / name
        if rows.is_file():
            return [json.loads(line) for line in rows.read_text().splitlines() if line.strip()]
    return [{"prompt": p, "sample": Path(v).name} for p, v in zip(cfg.eval.prompts, res["videos"], strict=False)]
