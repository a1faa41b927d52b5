"""A real MLflow tracking server (SQLite backend, loopback port) that tests stop and start around
`flowspeed` CLI runs, and the helpers those tests share.

One server serves the whole session (a first start migrates a fresh database: tens of seconds on a
busy 2-core machine); each test uses an experiment of its own. Its job runner is off: it starts a
dozen worker processes that these tests never use.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from flowspeed.configs import PipelineConfig, load_config
from mlflow import MlflowClient

from tests.conftest import REPO
from tests.servers import BIN, Server, base_env, free_port

_SERVER: dict[str, Server] = {}


def shared_server(folder: Path) -> Server:
    """The session's server, started on first use (`stop()`/`start()` again: an outage and its end)."""
    if "s" not in _SERVER:
        port = free_port()
        argv = [str(BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
                "--backend-store-uri", f"sqlite:///{folder / 'mlflow.db'}",
                "--artifacts-destination", str(folder / "mlflow-artifacts")]  # fmt: skip
        env = base_env(folder) | {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
        _SERVER["s"] = Server("mlflow", argv, env, f"http://127.0.0.1:{port}/health", folder).start()
    server = _SERVER["s"]
    if server.proc is None or server.proc.poll() is not None:
        server.start()  # a test that failed while it was stopped
    return server


def _sets(prepped: PipelineConfig, experiment: str, *overrides: str) -> list[str]:
    return [f"data.manifest={prepped.data.manifest}", f"data.output_dir={prepped.prep_dir}",
            f"data.cache_dir={prepped.cache_dir}", "train.max_steps=6", "train.checkpoint_every=2", "train.log_every=1",
            f"tracking.experiment={experiment}", "train.gpu_slots.enabled=false", *overrides]  # fmt: skip


def flowspeed_argv(command: str, workdir: Path, prepped: PipelineConfig, experiment: str, *overrides: str) -> list[str]:
    """The tiny quickstart on the session's prepped data (data.output_dir: no prep of its own), 6 steps,
    a checkpoint every 2, a metric every step."""
    argv = [sys.executable, "-m", "flowspeed.flows.cli", command, "configs/quickstart.yaml", "--workdir", str(workdir)]
    for s in _sets(prepped, experiment, *overrides):
        argv += ["--set", s]
    return argv


def argv_config(workdir: Path, prepped: PipelineConfig, experiment: str, *overrides: str) -> PipelineConfig:
    """The config `flowspeed_argv` runs: where its training folder is (keyed by the config)."""
    return load_config(REPO / "configs" / "quickstart.yaml", _sets(prepped, experiment, *overrides), workdir)


def cli_env(uri: str) -> dict[str, str]:
    """No Prefect setting of this session but the CLI children's shared Prefect home (migrated once)."""
    from tests.faults.conftest import CLI_PREFECT_HOME

    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_"))}
    return env | {"PREFECT_SERVER_ANALYTICS_ENABLED": "false", "MLFLOW_TRACKING_URI": uri, "OMP_NUM_THREADS": "1",
                  "PREFECT_HOME": str(CLI_PREFECT_HOME)}  # fmt: skip


def start(argv: list[str], uri: str, log: Path) -> subprocess.Popen:
    """A `flowspeed` child in a session of its own, stdout and stderr to `log`."""
    with open(log, "ab") as out:
        return subprocess.Popen(argv, cwd=REPO, env=cli_env(uri), stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)  # fmt: skip


def finish(proc: subprocess.Popen, log: Path, timeout_s: float = 300) -> int:
    try:
        return proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        reap(proc)
        raise AssertionError(f"flowspeed did not end in {timeout_s:.0f} s:\n{tail(log)}") from None


def reap(proc: subprocess.Popen) -> None:
    """Whatever the child's session still runs (its ephemeral Prefect server after a SIGKILL): not for
    these tests to judge (tests/faults/test_orphans*), only to clean up."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def tail(log: Path, chars: int = 4000) -> str:
    return log.read_text(errors="replace")[-chars:] if log.is_file() else "(no log)"


def wait_until(ok: Callable[[], bool], proc: subprocess.Popen, log: Path, what: str, timeout_s: float = 300) -> None:
    deadline = time.monotonic() + timeout_s
    while not ok():
        if proc.poll() is not None:
            raise AssertionError(f"flowspeed ended ({proc.returncode}) before {what}:\n{tail(log)}")
        if time.monotonic() > deadline:
            reap(proc)
            raise AssertionError(f"no {what} in {timeout_s:.0f} s:\n{tail(log)}")
        time.sleep(0.1)


def stage_runs(uri: str, experiment: str, stage: str) -> list:
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id]) if exp else []
    return [r for r in runs if r.data.tags.get("flowspeed.stage") == stage]


def steps(uri: str, run_id: str, key: str = "train/loss") -> list[int]:
    """Every logged step of a metric, repeats included (sorted)."""
    return sorted(m.step for m in MlflowClient(uri).get_metric_history(run_id, key))
