"""A killed flowspeed leaves no process behind; SIGTERM ends it as Ctrl-C does.

Real children on the embedded defaults (no PREFECT_API_URL, a sqlite MLflow store): `flowspeed run`
and `flowspeed train` with 2 torchrun ranks. Every descendant is recorded with psutil while the run
goes (the embedded Prefect API server, the torchrun agent, its ranks); after a SIGKILL of the
flowspeed process alone (as `kill -9` or the OOM killer gives), none of them may live on and the
Prefect server's port must be free. Before the fix, the Prefect server and the torchrun job (still
training, holding the checkpoint folder) outlived the kill, and a SIGTERM killed flowspeed outright
(status -15, no message) or went unnoticed while it waited on an unreachable MLflow server.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import psutil
import pytest
from flowspeed.configs import PipelineConfig, load_config

from tests.conftest import REPO
from tests.faults.conftest import CLI_PREFECT_HOME

TRAINER = "flowspeed.engines.torch_engine.trainer"
PREFECT_SERVER = "prefect.server.api.server:create_app"
BOUND_S = 60.0  # how long the dead may take to go: a torchrun agent stops its ranks with a grace period


def _env(prefect_home: Path, **extra: str) -> dict[str, str]:
    """The embedded defaults: no Prefect or MLflow server configured (a shared Prefect database folder
    only saves creating one per test)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_"))}
    return env | {"PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PREFECT_HOME": str(prefect_home), **extra}


class Child:
    """`flowspeed ...` in its own session, its descendants recorded as they appear."""

    def __init__(self, args: list[str], env: dict[str, str], log: Path) -> None:
        self.log = log
        with open(log, "wb") as out:
            self.proc = subprocess.Popen([sys.executable, "-m", "flowspeed.flows.cli", *args], cwd=REPO, env=env,
                                         stdout=out, stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip
        self.seen: dict[int, psutil.Process] = {}

    def record(self) -> None:
        with contextlib.suppress(psutil.NoSuchProcess):
            for p in psutil.Process(self.proc.pid).children(recursive=True):
                self.seen.setdefault(p.pid, p)

    def cmdlines(self) -> list[str]:
        out = []
        for p in self.seen.values():
            with contextlib.suppress(psutil.Error):
                out.append(" ".join(p.cmdline()))
        return out

    def wait_for(self, ready: Callable[[], bool], what: str, timeout_s: float = 400) -> None:
        deadline = time.monotonic() + timeout_s
        while True:
            self.record()
            if ready():
                self.record()
                return
            if self.proc.poll() is not None:
                raise AssertionError(f"flowspeed ended ({self.proc.returncode}) before {what}:\n{self.tail()}")
            if time.monotonic() > deadline:
                raise AssertionError(f"no {what} within {timeout_s:.0f} s:\n{self.tail()}")
            time.sleep(0.1)

    def survivors(self) -> list[str]:
        """Recorded descendants still running after up to BOUND_S (zombies are dead: nobody reaps them
        in a container without an init)."""
        deadline = time.monotonic() + BOUND_S
        while True:
            alive = []
            for p in self.seen.values():
                with contextlib.suppress(psutil.NoSuchProcess):
                    if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                        alive.append(f"{p.pid}: {' '.join(p.cmdline())[:160]}")
            if not alive or time.monotonic() > deadline:
                return alive
            time.sleep(0.2)

    def server_port(self) -> int:
        (line,) = [c for c in self.cmdlines() if PREFECT_SERVER in c]
        args = line.split()
        return int(args[args.index("--port") + 1])

    def tail(self, chars: int = 4000) -> str:
        return self.log.read_text(errors="replace")[-chars:]

    def cleanup(self) -> None:
        """Whatever the outcome, leave nothing running (the test failing on old code must not leak)."""
        for p in [*self.seen.values()]:
            with contextlib.suppress(psutil.Error):
                p.kill()
        with contextlib.suppress(ProcessLookupError):
            self.proc.kill()
        self.proc.wait()


def _port_free(port: int) -> bool:
    """Nobody listens on it (connections of the dead server lingering in TIME_WAIT do not count)."""
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _ranks_training(child: Child, train_dir: Path | None = None) -> Callable[[], bool]:
    """Both ranks up (and, given `train_dir`, past their first checkpoint: the checkpoint folder in use)."""

    def ready() -> bool:
        ranks = sum(TRAINER in c and "torch.distributed.run" not in c for c in child.cmdlines())
        return ranks >= 2 and (train_dir is None or any((train_dir / "checkpoints").glob("step-*")))

    return ready


def _training_sets(prepped: PipelineConfig) -> list[str]:
    """Two gloo ranks on the session's prepped cache, long enough never to finish on their own."""
    return [f"data.manifest={prepped.data.manifest}", f"data.cache_dir={prepped.cache_dir}",
            "train.nproc_per_node=2", "train.max_steps=100000", "train.checkpoint_every=2", "train.batch_size=1",
            "train.gpu_slots.enabled=false", "train.val_fraction=0"]  # fmt: skip


def _training(prepped: PipelineConfig) -> list[str]:
    return [arg for s in _training_sets(prepped) for arg in ("--set", s)]


@pytest.fixture(scope="module")
def prefect_home() -> Path:
    """The fault tests' CLI children's Prefect home: its database is migrated once per session."""
    return CLI_PREFECT_HOME


@pytest.fixture(scope="module")
def mlflow_store(tmp_path_factory: pytest.TempPathFactory) -> str:
    """An embedded sqlite store shared by the tests after the first (its schema is made once)."""
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"


@pytest.mark.slow
def test_a_sigkilled_run_leaves_no_process_behind(
    tmp_path: Path, prepped: PipelineConfig, prefect_home: Path, mlflow_db: Path
) -> None:
    work = tmp_path / "work"
    work.mkdir()
    shutil.copyfile(mlflow_db, work / "mlflow.db")  # the store the run opens there, its schema made once a session
    child = Child(["run", "configs/quickstart.yaml", "--workdir", str(work), *_training(prepped)],
                  _env(prefect_home), tmp_path / "run.log")  # fmt: skip
    try:
        train_dir = load_config(REPO / "configs" / "quickstart.yaml", _training_sets(prepped), work).train_dir
        child.wait_for(_ranks_training(child, train_dir), "training on 2 ranks")
        port = child.server_port()
        assert sum(TRAINER in c for c in child.cmdlines()) >= 2 and any(PREFECT_SERVER in c for c in child.cmdlines())
        child.proc.send_signal(signal.SIGKILL)
        assert child.proc.wait(timeout=30) == -signal.SIGKILL
        alive = child.survivors()
        assert alive == [], "outlived the SIGKILLed flowspeed run:\n" + "\n".join(alive)
        assert _port_free(port), f"the Prefect server's port {port} is still taken"
    finally:
        child.cleanup()


class BlackHole:
    """An MLflow "server" that accepts connections and never answers: a hung or firewalled host."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.port = self.sock.getsockname()[1]
        self.connected = threading.Event()
        self.held: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        with contextlib.suppress(OSError):
            while True:
                conn, _ = self.sock.accept()
                self.held.append(conn)
                self.connected.set()

    def close(self) -> None:
        for conn in [*self.held, self.sock]:
            conn.close()


@pytest.mark.slow
def test_sigterm_is_honoured_while_waiting_on_an_unreachable_mlflow(
    tmp_path: Path, prepped: PipelineConfig, prefect_home: Path
) -> None:
    hole = BlackHole()
    env = _env(prefect_home, MLFLOW_TRACKING_URI=f"http://127.0.0.1:{hole.port}")
    sets = ["--set", f"data.manifest={prepped.data.manifest}", "--set", f"data.cache_dir={prepped.cache_dir}"]
    child = Child(["prep", "configs/quickstart.yaml", "--workdir", str(tmp_path / "work"), *sets], env,
                  tmp_path / "prep.log")  # fmt: skip
    try:
        child.wait_for(hole.connected.is_set, "a connection to the MLflow server")
        time.sleep(0.3)  # into the read that never returns
        child.proc.send_signal(signal.SIGTERM)
        rc = child.proc.wait(timeout=BOUND_S)
        log = child.tail()
        assert rc == 128 + signal.SIGTERM, f"exit status {rc}, not 143:\n{log}"
        assert "interrupted: finished shards and checkpoints are kept; run again to resume" in log, log
        assert child.survivors() == []
    finally:
        child.cleanup()
        hole.close()


_POOL = """
import multiprocessing, os, sys, time
from concurrent.futures import ProcessPoolExecutor
from flowspeed.engines.common.lifetime import exit_with_parent

if __name__ == "__main__":
    ex = ProcessPoolExecutor(max_workers=2, mp_context=multiprocessing.get_context("spawn"),
                             initializer=exit_with_parent if sys.argv[1] == "watch" else None)
    print(sorted({f.result() for f in [ex.submit(os.getpid) for _ in range(4)]}), flush=True)
    time.sleep(600)
"""


@pytest.mark.parametrize("watch", [True, False], ids=["exit_with_parent", "plain-pool"])
def test_spawned_pool_workers_exit_with_their_killed_parent(tmp_path: Path, watch: bool) -> None:
    """Prefect's process task runner (data.task_runner: process) spawns a ProcessPoolExecutor; its workers
    wait on their task queue forever once the parent is SIGKILLed, unless the pool's initializer is
    `exit_with_parent` (the plain pool is the control: it must leave its workers behind)."""
    script = tmp_path / "pool.py"
    script.write_text(_POOL)
    parent = subprocess.Popen([sys.executable, str(script), "watch" if watch else "plain"], cwd=REPO,
                              stdout=subprocess.PIPE, text=True, start_new_session=True)  # fmt: skip
    workers: list[psutil.Process] = []
    try:
        assert parent.stdout is not None and parent.stdout.readline().startswith("[")
        workers = psutil.Process(parent.pid).children(recursive=True)
        assert len(workers) >= 2
        parent.send_signal(signal.SIGKILL)
        parent.wait(timeout=30)
        deadline = time.monotonic() + (BOUND_S if watch else 5.0)
        while time.monotonic() < deadline:
            alive = [p for p in workers if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
            if not alive:
                break
            time.sleep(0.2)
        assert (alive == []) is watch, f"alive after the parent's SIGKILL: {[p.pid for p in alive]}"
    finally:
        for p in workers:
            with contextlib.suppress(psutil.Error):
                p.kill()
        with contextlib.suppress(ProcessLookupError):
            parent.kill()
        parent.wait()
