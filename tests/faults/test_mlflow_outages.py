"""MLflow outages at the start and at the end of a stage, against a real tracking server.

Down from the start, a run used to sit silent for 10+ minutes in MLflow's HTTP retries: now the
server is probed first, and the run fails in seconds with what to do, or (tracking.server_wait_s)
waits saying so every few seconds, and SIGTERM ends the wait. Away at the end, a finished training
used to be reported failed and its run left RUNNING: now what could not be recorded is kept in the
workdir's journal and `flowspeed sync-metrics <workdir>` delivers it.
An outage in the middle of a training is in tests/faults/test_killed_runs.py (the resumed training
runs through one) and, for the tracker alone, tests/engines/tracking/test_tracking_buffer.py.
"""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import pytest
from flowspeed.configs import PipelineConfig
from flowspeed.engines.torch_engine.checkpoint import list_checkpoints
from flowspeed.engines.tracking import runs
from mlflow import MlflowClient

from tests.conftest import REPO, make_config
from tests.faults.mlflow_helpers import (
    argv_config,
    cli_env,
    finish,
    flowspeed_argv,
    reap,
    stage_runs,
    start,
    steps,
    tail,
)
from tests.faults.mlflow_helpers import wait_until as wait_for
from tests.servers import Server, free_port


def test_an_unreachable_server_fails_the_start_with_what_to_do(tmp_path: Path, demo_manifest: Path) -> None:
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    cfg = make_config(tmp_path, demo_manifest, f"tracking.tracking_uri={url}")
    with pytest.raises(runs.TrackingServerUnreachable) as err:
        runs.ready(cfg)
    msg = str(err.value)
    assert url in msg and "mlflow server" in msg and "unset MLFLOW_TRACKING_URI" in msg
    assert "tracking.server_wait_s" in msg and "\n" not in msg  # one paragraph


@pytest.mark.slow
def test_waiting_for_a_server_says_so_and_sigterm_ends_it(tmp_path: Path, prepped: PipelineConfig) -> None:
    url = f"http://127.0.0.1:{free_port()}"
    log = tmp_path / "flowspeed.log"
    argv = flowspeed_argv("train", tmp_path / "work", prepped, "waiting", "tracking.server_wait_s=600")
    proc = start(argv, url, log)
    try:
        wait_for(lambda: "still waiting for the MLflow tracking server" in tail(log), proc, log, "a waiting message")
        assert url in tail(log)
        proc.send_signal(signal.SIGTERM)
        assert finish(proc, log, timeout_s=120) == 128 + signal.SIGTERM, tail(log)
        assert "interrupted: finished shards and checkpoints are kept" in tail(log)
    finally:
        reap(proc)
    train_dir = argv_config(tmp_path / "work", prepped, "waiting", "tracking.server_wait_s=600").train_dir
    assert not (train_dir / "checkpoints").exists()  # it never started training


@pytest.mark.slow
def test_a_finished_training_survives_mlflow_going_away_before_its_end(
    tmp_path: Path, prepped: PipelineConfig, mlflow_server: Server
) -> None:
    """The server stops after the first checkpoint and stays away to the end (outage_grace_s=0: no
    waiting for it). The training finishes and says what delivers the rest; with the server back,
    the sync leaves the run as an uninterrupted one: FINISHED, every step once, tags, model, dataset."""
    uri, experiment, work = mlflow_server.url, "away-at-the-end", tmp_path / "work"
    log = tmp_path / "flowspeed.log"
    proc = start(flowspeed_argv("train", work, prepped, experiment, "tracking.outage_grace_s=0"), uri, log)
    train_dir = argv_config(work, prepped, experiment, "tracking.outage_grace_s=0").train_dir
    try:
        wait_for(lambda: bool(list_checkpoints(train_dir)), proc, log, "first checkpoint")
        mlflow_server.stop()
        rc = finish(proc, log)
    finally:
        reap(proc)
        mlflow_server.start()
    assert rc == 0, tail(log)
    assert f"flowspeed sync-metrics {work}" in log.read_text()
    (run,) = stage_runs(uri, experiment, "train")
    assert run.info.status == "RUNNING"  # its status waits in the journal with the rest
    assert (work / "mlflow-undelivered" / f"{run.info.run_id}{runs.JOURNAL_SUFFIX}").is_file()

    sync = subprocess.run([sys.executable, "-m", "flowspeed.flows.cli", "sync-metrics", str(work)], cwd=REPO,
                          env=cli_env(uri), capture_output=True, text=True, timeout=300)  # fmt: skip
    assert sync.returncode == 0 and "0 still waiting" in sync.stdout, sync.stdout + sync.stderr
    client = MlflowClient(uri)
    run = client.get_run(run.info.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.tags["flowspeed.export_path"] == str((train_dir / "final").resolve())
    assert run.data.tags["flowspeed.checkpoint_path"].endswith("step-00000006")
    for key in ("train/loss", "train/lr"):
        assert steps(uri, run.info.run_id, key) == [1, 2, 3, 4, 5, 6], key
    assert {a.path for a in client.list_artifacts(run.info.run_id, "model")} >= {"model/MLmodel"}
    assert [d.dataset.name for d in run.inputs.dataset_inputs]
    assert not list((work / "mlflow-undelivered").glob("*")) and runs.sync_undelivered(work) == (0, 0)
