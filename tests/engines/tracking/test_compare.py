"""`flowspeed compare`: the newest pipeline runs of an experiment with their stage metrics."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from flowspeed.engines.tracking.compare import compare_runs
from mlflow import MlflowClient


def test_rows_are_newest_first_with_pipeline_and_train_metrics(tmp_path: Path) -> None:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    exp = client.create_experiment("demo", artifact_location=(tmp_path / "art").as_uri())
    for i, (loss, sps) in enumerate([(1.5, 10.0), (1.2, 12.0)]):
        tags = {"flowspeed.stage": "pipeline", "flowspeed.family": "cogvideox", "flowspeed.model": "tiny",
                "flowspeed.parallel_layout": f"nproc={i + 1}", "flowspeed.config_hash": f"h{i}"}  # fmt: skip
        parent = client.create_run(exp, run_name=f"run{i}", tags=tags).info.run_id
        client.log_metric(parent, "eval/val_loss", loss)
        train = client.create_run(exp, tags={"flowspeed.stage": "train", "mlflow.parentRunId": parent}).info.run_id
        client.log_metric(train, "perf/samples_per_s", sps)
        client.create_run(exp, tags={"flowspeed.stage": "eval", "mlflow.parentRunId": parent})  # not a row
        time.sleep(0.01)  # distinct start times
    rows = compare_runs(uri, "demo", last=5)
    assert [r["name"] for r in rows] == ["run1", "run0"]
    assert rows[0]["eval/val_loss"] == 1.2 and rows[0]["perf/samples_per_s"] == 12.0
    assert rows[1]["layout"] == "nproc=1" and "eval/clip_score" not in rows[1]
    assert [r["name"] for r in compare_runs(uri, "demo", last=1)] == ["run1"]
    with pytest.raises(ValueError, match="experiments there: .*demo"):
        compare_runs(uri, "nope")
