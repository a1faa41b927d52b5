"""A killed flowspeed leaves no MLflow run RUNNING forever: the next start closes the runs of dead
processes as KILLED and never touches a live one, and a killed training's run is continued by the
resume, so its steps stay on one step axis in one run.

Owners are real processes: a `sleep` that is running, or one that was SIGKILLed (its pid and start
time are what a dead flowspeed leaves in its run's tags). The end-to-end case SIGKILLs a real
`flowspeed train` after its first checkpoint and resumes it with a real MLflow server, which is also
stopped and restarted while the resumed training runs (an outage mid-training, end to end).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
from flowspeed.configs import PipelineConfig
from flowspeed.engines.torch_engine.checkpoint import list_checkpoints
from flowspeed.engines.tracking import runs
from flowspeed.engines.tracking.tracker import ensure_experiment, tracking_uri
from mlflow import MlflowClient

from tests.conftest import make_config
from tests.faults.mlflow_helpers import argv_config, finish, flowspeed_argv, reap, stage_runs, start, steps, tail
from tests.faults.mlflow_helpers import wait_until as wait_for
from tests.servers import Server


@pytest.fixture
def owners() -> Iterator[dict[str, dict[str, str]]]:
    """Owner tags of a live process and of one that was SIGKILLed (what a killed flowspeed leaves)."""
    live = subprocess.Popen(["sleep", "600"])
    dead = subprocess.Popen(["sleep", "600"])

    def tags(proc: subprocess.Popen) -> dict[str, str]:
        started = repr(psutil.Process(proc.pid).create_time())
        return {runs.OWNER_HOST: socket.gethostname(), runs.OWNER_PID: str(proc.pid), runs.OWNER_STARTED: started}

    out = {"live": tags(live), "dead": tags(dead)}
    dead.send_signal(signal.SIGKILL)
    dead.wait()
    yield out
    live.kill()
    live.wait()


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory, mlflow_db: Path) -> str:
    """One SQLite store for the module's in-process tests (its schema made once a session), an experiment each."""
    path = tmp_path_factory.mktemp("store") / "mlflow.db"
    shutil.copyfile(mlflow_db, path)
    return f"sqlite:///{path}"


def _run(client: MlflowClient, exp: str, stage: str, owner: dict[str, str] | None) -> str:
    return client.create_run(exp, tags={"flowspeed.stage": stage, **(owner or {})}).info.run_id


def _status(client: MlflowClient, run_id: str) -> str:
    return client.get_run(run_id).info.status


def test_the_next_start_closes_the_runs_of_dead_owners_only(
    tmp_path: Path, demo_manifest: Path, store: str, owners: dict[str, dict[str, str]]
) -> None:
    cfg = make_config(tmp_path, demo_manifest, f"tracking.tracking_uri={store}", "tracking.experiment=reaper")
    client = MlflowClient(tracking_uri(cfg))
    exp = ensure_experiment(client, cfg)
    dead = {stage: _run(client, exp, stage, owners["dead"]) for stage in ("pipeline", "prep", "eval")}
    live = _run(client, exp, "train", owners["live"])  # another flowspeed, still training
    elsewhere = _run(client, exp, "train", owners["dead"] | {runs.OWNER_HOST: "another-node"})  # unknowable
    legacy = _run(client, exp, "train", None)  # no owner recorded (older flowspeed, another tool)
    # A dead run whose final status waits in the journal (the server was away at its end): it is
    # delivered, not overruled.
    finished = _run(client, exp, "eval", owners["dead"])
    folder = runs.journal_dir(cfg)
    folder.mkdir(parents=True)
    row = {"run_id": finished, "uri": tracking_uri(cfg), "kind": "status", "status": "FINISHED", "end_time": 1}
    (folder / f"{finished}{runs.JOURNAL_SUFFIX}").write_text(json.dumps(row) + "\n")

    runs.ready(cfg)

    for run_id in dead.values():
        assert _status(client, run_id) == "KILLED"
        assert "is gone" in client.get_run(run_id).data.tags["flowspeed.closed_because"]
    for run_id in (live, elsewhere, legacy):
        assert _status(client, run_id) == "RUNNING"
    assert _status(client, finished) == "FINISHED"
    assert not list(folder.iterdir())


def test_a_killed_trainings_run_is_continued_under_the_new_parent(
    tmp_path: Path, demo_manifest: Path, store: str, owners: dict[str, dict[str, str]]
) -> None:
    cfg = make_config(tmp_path, demo_manifest, f"tracking.tracking_uri={store}", "tracking.experiment=continue")
    uri = tracking_uri(cfg)
    client = MlflowClient(uri)
    exp = ensure_experiment(client, cfg)
    killed = _run(client, exp, "train", owners["dead"])
    train_dir = cfg.train_dir
    (train_dir / "checkpoints" / "step-00000002").mkdir(parents=True)
    (train_dir / "checkpoints" / "step-00000002" / "trainer_state.pt").write_bytes(b"")
    assert list_checkpoints(train_dir)
    record = {"run_id": killed, "uri": uri, **owners["dead"]}
    (train_dir / runs.RUN_RECORD).write_text(json.dumps(record))
    parent = _run(client, exp, "pipeline", runs.owner_tags())

    assert runs.continue_train_run(cfg, train_dir, parent, {"flowspeed.prefect.flow_run_id": "new"}) == killed
    run = client.get_run(killed)
    assert run.info.status == "RUNNING"
    assert run.data.tags["mlflow.parentRunId"] == parent
    assert run.data.tags[runs.RESUMES] == "1"
    assert run.data.tags[runs.OWNER_PID] == str(os.getpid())
    assert run.data.tags["flowspeed.prefect.flow_run_id"] == "new"

    # Recorded as ours now: a live owner (another flowspeed training here) is never taken over.
    runs.record_train_run(train_dir, uri, killed)
    assert runs.continue_train_run(cfg, train_dir, parent, {}) is None
    # Dead again; a finished training (final/ written) starts a new run instead.
    (train_dir / runs.RUN_RECORD).write_text(json.dumps(record))
    (train_dir / "final").mkdir()
    assert runs.continue_train_run(cfg, train_dir, parent, {}) is None
    (train_dir / "final").rmdir()
    client.set_terminated(killed, "FINISHED")
    assert runs.continue_train_run(cfg, train_dir, parent, {}) is None


@pytest.mark.slow
def test_a_sigkilled_flowspeed_train_is_continued_in_one_run(
    tmp_path: Path, prepped: PipelineConfig, mlflow_server: Server, owners: dict[str, dict[str, str]]
) -> None:
    """SIGKILL `flowspeed train` after its first checkpoint; a run of a dead pipeline and one of a live
    flowspeed are in the experiment too. The rerun resumes the training in the same MLflow run, with
    the server stopped and started again while it trains: one train run, FINISHED, every step once;
    the dead run KILLED, the live one untouched."""
    uri, experiment, work = mlflow_server.url, "killed-runs", tmp_path / "work"
    argv = flowspeed_argv("train", work, prepped, experiment)
    train_dir = argv_config(work, prepped, experiment).train_dir
    log = tmp_path / "flowspeed.log"
    killed = start(argv, uri, log)
    wait_for(lambda: bool(list_checkpoints(train_dir)), killed, log, "first checkpoint")
    killed.send_signal(signal.SIGKILL)  # the flowspeed process alone, as `kill -9` or the OOM killer does
    killed.wait()
    reap(killed)
    (first,) = stage_runs(uri, experiment, "train")
    assert first.info.status == "RUNNING"  # what a kill leaves: the next start must deal with it

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment).experiment_id
    dead_pipeline = _run(client, exp, "pipeline", owners["dead"])
    live_other = _run(client, exp, "eval", owners["live"])

    resumed = start(argv, uri, log)
    try:
        wait_for(lambda: client.get_run(first.info.run_id).data.tags.get(runs.RESUMES) == "1", resumed, log,
                 "the killed run continued")  # fmt: skip
        mlflow_server.stop()  # mid-training outage: the tracker buffers, the stage's calls keep what fails
        wait_for(lambda: len(list_checkpoints(train_dir)) >= 2, resumed, log, "a checkpoint after the resume")
        mlflow_server.start()
        assert finish(resumed, log) == 0, tail(log)
    finally:
        reap(resumed)
        if mlflow_server.proc.poll() is not None:
            mlflow_server.start()

    (train,) = stage_runs(uri, experiment, "train")
    assert train.info.run_id == first.info.run_id, tail(log)
    assert train.info.status == "FINISHED"
    assert train.data.tags[runs.RESUMES] == "1"
    assert "flowspeed.export_path" in train.data.tags
    for key in ("train/loss", "train/lr"):
        assert steps(uri, train.info.run_id, key) == [1, 2, 3, 4, 5, 6], key
    assert _status(client, dead_pipeline) == "KILLED"
    assert _status(client, live_other) == "RUNNING"
