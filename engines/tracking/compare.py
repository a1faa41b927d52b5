"""Side-by-side numbers for the last runs of an experiment (`flowspeed compare`).

One row per pipeline run, newest first: what it trained (family, recipe, model, layout, config hash) and how
it did (final loss, held-out loss, CLIP score or answer match, throughput and MFU from its train
stage). The same runs compare in the MLflow UI: select them in the experiment and press Compare.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from mlflow import MlflowClient

# metric -> where it lives: the pipeline run itself, or its nested train run
COLUMNS: dict[str, str] = {
    "train/final_loss": "pipeline",
    "eval/val_loss": "pipeline",
    "eval/clip_score": "pipeline",
    "eval/exact_match": "pipeline",
    "perf/samples_per_s": "train",
    "perf/tokens_per_s": "train",
    "perf/mfu": "train",
}


def compare_runs(uri: str, experiment: str, last: int = 10) -> list[dict[str, Any]]:
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        known = ", ".join(sorted(e.name for e in client.search_experiments())) or "none"
        raise ValueError(f"no MLflow experiment {experiment!r} at {uri}; experiments there: {known}")
    runs = client.search_runs(
        [exp.experiment_id], "tags.`flowspeed.stage` = 'pipeline'", order_by=["attributes.start_time DESC"],
        max_results=last,
    )  # fmt: skip
    rows = []
    for run in runs:
        train = client.search_runs(
            [exp.experiment_id],
            f"tags.`mlflow.parentRunId` = '{run.info.run_id}' and tags.`flowspeed.stage` = 'train'",
            max_results=1,
        )
        tags = run.data.tags
        row: dict[str, Any] = {
            "run_id": run.info.run_id,
            "name": run.info.run_name,
            "started": datetime.fromtimestamp(run.info.start_time / 1000, UTC).strftime("%Y-%m-%d %H:%M"),
            "status": run.info.status,
            "family": tags.get("flowspeed.family", ""),
            "recipe": tags.get("flowspeed.recipe", ""),  # recipes sharing a workdir share its experiment
            "model": tags.get("flowspeed.model", ""),
            "layout": tags.get("flowspeed.parallel_layout", ""),
            "config_hash": tags.get("flowspeed.config_hash", ""),
        }
        for metric, where in COLUMNS.items():
            source = run if where == "pipeline" else (train[0] if train else None)
            if source is not None and metric in source.data.metrics:
                row[metric] = source.data.metrics[metric]
        rows.append(row)
    return rows
