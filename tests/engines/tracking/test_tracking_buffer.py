"""The training tracker survives an MLflow outage: metrics queue, arrive once, or wait on disk.

These use a real SQLite store behind a client whose calls fail for a while (the transport error a
stopped server gives); tests/flows/test_team_mode.py stops and restarts a real MLflow server.
"""

from __future__ import annotations

import json
import shutil
import threading
import time
from pathlib import Path

import pytest
import requests
from flowspeed.engines.tracking.tracker import Tracker, replay_undelivered
from mlflow import MlflowClient


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


@pytest.fixture
def store(tmp_path: Path, mlflow_db: Path) -> tuple[str, str]:
    """This test's own store (a copy of the session's empty one, tests/conftest.py) and a run in it: (uri, run_id)."""
    shutil.copyfile(mlflow_db, tmp_path / "mlflow.db")
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


def test_metrics_logged_during_an_outage_arrive_once_when_it_ends(tmp_path: Path, store: tuple[str, str]) -> None:
    uri, run_id = store
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


def test_a_batch_sent_twice_is_stored_once(tmp_path: Path, store: tuple[str, str]) -> None:
    """A reply lost after the server committed makes the sender repeat the batch: no duplicate rows."""
    uri, run_id = store
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


def test_an_outage_past_the_grace_period_leaves_a_file_that_sync_delivers(
    tmp_path: Path, store: tuple[str, str]
) -> None:
    uri, run_id = store
    # a champion finetune's training folder, the deepest a workdir holds: `sync-metrics WORKDIR` finds it
    folder = tmp_path / "train" / "cogvideox-0123abcd" / "from-m-v1-0123abcd" / "mlflow-undelivered"
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

    from flowspeed.flows.cli import app
    from typer.testing import CliRunner

    out = CliRunner().invoke(app, ["sync-metrics", str(tmp_path)])
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


def test_a_batch_the_server_refuses_is_dropped_without_stalling_the_rest(
    tmp_path: Path, store: tuple[str, str]
) -> None:
    """A 4xx answer is not an outage: resending cannot help, so that batch goes and the queue moves on."""
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

    uri, run_id = store
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


def _journal_steps(folder: Path, key: str = "train/loss") -> list[int]:
    rows = [json.loads(line) for p in folder.glob("*.jsonl") for line in p.read_text().splitlines()]
    return sorted(r["step"] for r in rows if r.get("metric") == key)


def test_identical_rows_are_stored_once_by_the_sqlite_store(store: tuple[str, str]) -> None:
    """What `persist` relies on when a row it wrote to the journal is delivered as well: the SQL store
    keeps one row per (key, timestamp, step, value), in one batch or across batches."""
    from mlflow.entities import Metric

    uri, run_id = store
    client = MlflowClient(uri)
    rows = [Metric("train/loss", 0.25, 1000, 1), Metric("train/loss", 0.5, 1000, 2)]
    client.log_batch(run_id, metrics=rows)
    client.log_batch(run_id, metrics=rows + [Metric("train/loss", 0.75, 1000, 3)])
    client.log_batch(run_id, metrics=[rows[0], rows[0]])
    assert [(m.step, m.value) for m in client.get_metric_history(run_id, "train/loss")] == [
        (1, 0.25), (2, 0.5), (3, 0.75)
    ]  # fmt: skip


def test_persist_delivers_or_journals_before_a_checkpoint_without_waiting_out_an_outage(
    tmp_path: Path, store: tuple[str, str]
) -> None:
    """`persist` (called before a checkpoint is published): with the server up, everything is in the
    run when it returns; with the server hanging, it gives up after `persist_wait_s` and the rows are
    fsync'ed to the journal; during a known outage it does not wait at all. The journaled rows are
    still sent when the server answers, and the run holds every step once."""
    uri, run_id = store
    folder = tmp_path / "undelivered"
    tracker = Tracker(uri, run_id, flush_every=100, undelivered_dir=folder, grace_s=60, max_backoff_s=0.2,
                      persist_wait_s=0.5)  # fmt: skip
    for step in (1, 2):
        tracker.log_metrics({"train/loss": 1.0 / step}, step)
    assert tracker.persist() == 0
    assert _steps(uri, run_id, "train/loss") == [1, 2] and not folder.exists()

    real, release = tracker.client.log_batch, threading.Event()

    def hanging(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202 - a server that takes the call and stalls
        release.wait(timeout=60)
        return real(*args, **kwargs)

    tracker.client.log_batch = hanging  # type: ignore[method-assign]
    for step in (3, 4):
        tracker.log_metrics({"train/loss": 1.0 / step}, step)
    assert tracker.persist() == 2  # returned without the server: steps 3 and 4 are on disk
    assert _journal_steps(folder) == [3, 4]
    release.set()
    _wait_for(lambda: _steps(uri, run_id, "train/loss") == [1, 2, 3, 4])  # and still delivered

    outage = Outage(tracker.client)
    tracker.client.log_batch = outage  # type: ignore[method-assign]
    outage.real = real
    outage.down.set()
    tracker.log_metrics({"train/loss": 0.2}, 5)
    tracker.flush()
    _wait_for(lambda: outage.failed >= 1)  # the sender knows the server is away
    tracker.log_metrics({"train/loss": 1 / 6}, 6)
    assert tracker.persist() == 2 and _journal_steps(folder) == [3, 4, 5, 6]
    outage.down.clear()
    assert tracker.close() == 0
    assert _steps(uri, run_id, "train/loss") == [1, 2, 3, 4, 5, 6]  # journaled and sent: once
    assert not folder.joinpath(f"{run_id}.jsonl").exists()  # close handed the journal over, nothing to sync
    assert replay_undelivered(folder) == (0, 0)


def test_a_resumed_run_logs_only_the_steps_its_mlflow_run_does_not_hold(tmp_path: Path, store: tuple[str, str]) -> None:
    """A run killed after delivering steps 1..5 resumes from its step-2 checkpoint into the same MLflow
    run: steps 3..5 are not logged again (they hold the same values), 6..8 are. The same resume into a
    new run logs everything it computes."""
    uri, run_id = store
    killed = Tracker(uri, run_id, flush_every=1, grace_s=30)
    for step in range(1, 6):
        killed.log_metrics({"train/loss": 1.0 / step, "train/lr": 0.1}, step)
    _wait_for(lambda: _steps(uri, run_id, "train/lr") == [1, 2, 3, 4, 5])

    resumed = Tracker(uri, run_id, flush_every=2, undelivered_dir=tmp_path / "undelivered", grace_s=30)
    for step in range(3, 9):
        resumed.log_metrics({"train/loss": 1.0 / step, "train/lr": 0.1}, step)
    assert resumed.close() == 0
    for key in ("train/loss", "train/lr"):
        assert _steps(uri, run_id, key) == list(range(1, 9))

    new_run = MlflowClient(uri).create_run(MlflowClient(uri).get_run(run_id).info.experiment_id).info.run_id
    fresh = Tracker(uri, new_run, flush_every=2, grace_s=30)
    for step in range(3, 9):
        fresh.log_metrics({"train/loss": 1.0 / step}, step)
    assert fresh.close() == 0
    assert _steps(uri, new_run, "train/loss") == list(range(3, 9))


def test_steps_in_the_journal_are_not_logged_again_and_replay_keeps_one_row_per_step(
    tmp_path: Path, store: tuple[str, str]
) -> None:
    """A run killed while the server was away left steps 1..4 in its journal (a cut-short last line
    too). The resume from step 2 does not log 3 and 4 again; the journal, replayed, fills them in; a
    journal row of a step the run already holds (another timestamp) is skipped."""
    uri, run_id = store
    folder = tmp_path / "undelivered"
    folder.mkdir()
    rows = [{"run_id": run_id, "uri": uri, "metric": "train/loss", "value": 1.0 / s, "timestamp": 1000 + s,
             "step": s} for s in range(1, 5)]  # fmt: skip
    (folder / f"{run_id}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"run_id": "cut')
    resumed = Tracker(uri, run_id, flush_every=1, undelivered_dir=folder, grace_s=30)
    for step in range(3, 7):
        resumed.log_metrics({"train/loss": 1.0 / step}, step)
    assert resumed.close() == 0
    assert _steps(uri, run_id, "train/loss") == [1, 2, 3, 4, 5, 6]
    history = {m.step: m.timestamp for m in MlflowClient(uri).get_metric_history(run_id, "train/loss")}
    assert [history[s] for s in (1, 2, 3, 4)] == [1001, 1002, 1003, 1004]  # the killed run's rows

    (folder / "again.jsonl").write_text(json.dumps({**rows[0], "step": 6, "timestamp": 5}) + "\n")
    assert replay_undelivered(folder) == (1, 0)
    assert _steps(uri, run_id, "train/loss") == [1, 2, 3, 4, 5, 6]


def test_batches_end_at_step_boundaries(tmp_path: Path, store: tuple[str, str]) -> None:
    """log_batch takes 1000 metrics: a kill between two calls must not leave half a step in the run
    (the resume skips whole steps by their train/loss)."""
    uri, run_id = store
    tracker = Tracker(uri, run_id, flush_every=100, grace_s=30)
    real, sent = tracker.client.log_batch, []

    def record(run_id: str, metrics=(), tags=()):  # noqa: ANN001, ANN202
        sent.append(sorted({m.step for m in metrics}))
        return real(run_id, metrics=metrics, tags=tags)

    tracker.client.log_batch = record  # type: ignore[method-assign]
    for step in range(1, 5):  # 4 steps x 300 metrics: 1200, more than one call holds
        tracker.log_metrics({f"m{i}": float(i) for i in range(300)}, step)
    assert tracker.close() == 0
    assert sent == [[1, 2, 3], [4]]
    assert _steps(uri, run_id, "m299") == [1, 2, 3, 4]
