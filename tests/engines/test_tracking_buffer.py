"""The training tracker survives an MLflow outage: metrics queue, arrive once, or wait on disk.

These use a real SQLite store behind a client whose calls fail for a while (the transport error a
stopped server gives); tests/flows/test_team_mode.py stops and restarts a real MLflow server.
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest
import requests
from mlflow import MlflowClient

from engines.tracking import Tracker, replay_undelivered


class Outage:
    """Makes `client.log_batch` raise ConnectionError while `down` is set, and counts the calls."""

    def __init__(self, client: MlflowClient) -> None:
        self.real = client.log_batch
        self.down = threading.Event()
        self.failed = 0
        client.log_batch = self  # type: ignore[method-assign]

    def __call__(self, *args, **kwargs):  # noqa: ANN002, ANN003, ANN204
        if self.down.is_set():
            self.failed += 1
            raise requests.exceptions.ConnectionError("Connection refused (test outage)")
        return self.real(*args, **kwargs)


def _store(tmp_path: Path) -> tuple[str, str]:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    run = client.create_run(client.create_experiment("outage"))
    return uri, run.info.run_id


def _steps(uri: str, run_id: str, key: str) -> list[int]:
    return sorted(m.step for m in MlflowClient(uri).get_metric_history(run_id, key))


def _wait_for(ok, timeout: float = 30.0) -> None:  # noqa: ANN001
    deadline = time.monotonic() + timeout
    while not ok():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def test_metrics_logged_during_an_outage_arrive_once_when_it_ends(tmp_path: Path) -> None:
    uri, run_id = _store(tmp_path)
    tracker = Tracker(uri, run_id, flush_every=2, undelivered_dir=tmp_path / "undelivered", grace_s=60,
                      max_backoff_s=0.2)  # fmt: skip
    outage = Outage(tracker.client)
    for step in range(1, 7):
        tracker.log_metrics({"train/loss": 1.0 / step, "perf/samples_per_s": 10.0}, step)
    _wait_for(lambda: _steps(uri, run_id, "train/loss") == list(range(1, 7)))
    outage.down.set()
    for step in range(7, 21):  # the steps go on: nothing here waits for the server
        tracker.log_metrics({"train/loss": 1.0 / step, "perf/samples_per_s": 10.0}, step)
    tracker.set_tags({"checkpoint_step": 20})
    threading.Timer(1.0, outage.down.clear).start()  # the server comes back while close() waits
    assert tracker.close() == 0
    assert outage.failed >= 1
    for key in ("train/loss", "perf/samples_per_s"):
        assert _steps(uri, run_id, key) == list(range(1, 21))  # every step, none twice
    assert MlflowClient(uri).get_run(run_id).data.tags["checkpoint_step"] == "20"
    assert not (tmp_path / "undelivered").exists()


def test_a_batch_sent_twice_is_stored_once(tmp_path: Path) -> None:
    """A reply lost after the server committed makes the sender repeat the batch: no duplicate rows."""
    uri, run_id = _store(tmp_path)
    tracker = Tracker(uri, run_id, flush_every=100, grace_s=30)
    real = tracker.client.log_batch
    calls = {"n": 0}

    def commit_then_lose_reply(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        real(*args, **kwargs)
        calls["n"] += 1
        if calls["n"] == 1:
            raise requests.exceptions.ReadTimeout("reply lost")

    tracker.client.log_batch = commit_then_lose_reply  # type: ignore[method-assign]
    for step in range(1, 6):
        tracker.log_metrics({"train/loss": 0.5}, step)
    assert tracker.close() == 0 and calls["n"] == 2
    assert _steps(uri, run_id, "train/loss") == [1, 2, 3, 4, 5]


def test_an_outage_past_the_grace_period_leaves_a_file_that_sync_delivers(tmp_path: Path) -> None:
    uri, run_id = _store(tmp_path)
    folder = tmp_path / "train" / "mlflow-undelivered"
    tracker = Tracker(uri, run_id, flush_every=3, undelivered_dir=folder, grace_s=0.5, max_backoff_s=0.1)
    outage = Outage(tracker.client)
    tracker.log_metrics({"train/loss": 1.0}, 1)
    tracker.flush()
    _wait_for(lambda: _steps(uri, run_id, "train/loss") == [1])  # delivered before the server goes away
    outage.down.set()
    for step in range(2, 11):
        tracker.log_metrics({"train/loss": 1.0 / step}, step)
    tracker.set_tags({"checkpoint_path": "/ckpt/step-10"})
    left = tracker.close()
    (path,) = folder.glob("*.jsonl")
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert left == len(rows) and {r["step"] for r in rows if "metric" in r} >= set(range(2, 11))
    assert _steps(uri, run_id, "train/loss") == [1]  # the rest never reached the store

    from typer.testing import CliRunner

    from flows.cli import app

    out = CliRunner().invoke(app, ["sync-metrics", str(folder.parent)])
    assert out.exit_code == 0, out.output
    assert f"delivered {len(rows)}" in out.output
    assert _steps(uri, run_id, "train/loss") == list(range(1, 11))
    assert MlflowClient(uri).get_run(run_id).data.tags["checkpoint_path"] == "/ckpt/step-10"
    assert not path.exists()
    assert replay_undelivered(folder) == (0, 0)  # idempotent: nothing left to send


def test_sync_keeps_the_file_while_the_server_is_still_away(tmp_path: Path) -> None:
    folder = tmp_path / "undelivered"
    folder.mkdir()
    row = {"run_id": "0" * 32, "uri": "http://127.0.0.1:9", "metric": "train/loss", "value": 1.0,
           "timestamp": 1, "step": 1}  # fmt: skip
    (folder / "r.jsonl").write_text(json.dumps(row) + "\n")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
        assert replay_undelivered(folder) == (0, 1)
    assert (folder / "r.jsonl").is_file()


def test_a_batch_the_server_refuses_is_dropped_without_stalling_the_rest(tmp_path: Path) -> None:
    """A 4xx answer is not an outage: resending cannot help, so that batch goes and the queue moves on."""
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

    uri, run_id = _store(tmp_path)
    tracker = Tracker(uri, run_id, flush_every=100, undelivered_dir=tmp_path / "undelivered", grace_s=30)
    real = tracker.client.log_batch

    def refuse_tags(run_id: str, metrics=(), tags=()):  # noqa: ANN001, ANN202
        if tags:
            raise MlflowException("tag refused", error_code=INVALID_PARAMETER_VALUE)
        return real(run_id, metrics=metrics, tags=tags)

    tracker.client.log_batch = refuse_tags  # type: ignore[method-assign]
    tracker.log_metrics({"train/loss": 1.0}, 1)
    tracker.flush()
    tracker.set_tags({"bad": "x"})
    for step in range(2, 5):
        tracker.log_metrics({"train/loss": 1.0 / step}, step)
    assert tracker.close() == 0  # nothing left for the undelivered file, and close did not wait out the grace
    assert _steps(uri, run_id, "train/loss") == [1, 2, 3, 4]
    assert "bad" not in MlflowClient(uri).get_run(run_id).data.tags
    assert not (tmp_path / "undelivered").exists()
