"""Fault-injection helpers: run a Python child the way a user's process runs, kill it with a real
SIGKILL, and check that nothing it started lives on.

A child runs in a session of its own, so everything it starts (torchrun ranks, data workers, a Prefect
server) can be found afterwards by its session id even after it was re-parented to init: a SIGKILL of
the child alone, as the OOM killer or `kill -9` gives, is exactly what must not leave orphans.
Kill points are installed by the child itself (a wrapped function that SIGKILLs its own process at
the chosen moment) or from outside with `kill_when`; product code has no test hooks.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import psutil
import pytest

from tests.conftest import _SESSION_TMP, REPO
from tests.servers import Server

# The Prefect home of every `flowspeed` CLI child of these tests: the embedded Prefect API migrates a fresh
# database on its first start (seconds of CPU) and skips that on a database it has set up (its stamp), so one
# home for the session costs one migration instead of one per test (or per workdir).
CLI_PREFECT_HOME = _SESSION_TMP / "cli-prefect-home"


def python_child(target: str, *args: str, log: Path, env: dict[str, str] | None = None) -> subprocess.Popen:
    """Start `python -c 'from module import function; function(*args)'` for `target="module:function"`,
    in the repository root and a new session, with stdout and stderr going to `log`."""
    module, func = target.split(":")
    return python_code(f"import sys; from {module} import {func}; {func}(*sys.argv[1:])", *args, log=log, env=env)


def python_code(code: str, *args: str, log: Path, env: dict[str, str] | None = None) -> subprocess.Popen:
    """Start `python -c code args...` like `python_child` (repository root, new session, output to `log`)."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "wb") as out:
        return subprocess.Popen(
            [sys.executable, "-c", code, *args],
            cwd=REPO,
            env={**os.environ, **(env or {})},
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def die() -> None:
    """For kill points inside a child: SIGKILL this very process (no cleanup, no atexit, no finally)."""
    sys.stdout.flush()
    sys.stderr.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def log_tail(log: Path, chars: int = 4000) -> str:
    return log.read_text(errors="replace")[-chars:] if log.is_file() else "(no log)"


def wait_killed(proc: subprocess.Popen, log: Path, timeout_s: float = 300.0) -> None:
    """Wait for a child that is meant to die by SIGKILL; fail with its log if it ended another way
    (a kill point never reached, an error before it) or did not end."""
    try:
        rc = proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        raise AssertionError(f"the child did not reach its kill point in {timeout_s:.0f} s:\n{log_tail(log)}") from None
    assert rc == -signal.SIGKILL, f"the child exited with {rc}, not by SIGKILL:\n{log_tail(log)}"


def kill_when(proc: subprocess.Popen, ready: Callable[[], bool], log: Path, timeout_s: float = 300.0) -> None:
    """SIGKILL `proc` (the child alone, not its session) once `ready()` holds, e.g. a marker file exists
    or a line appeared in its log; fails if the child ends or `timeout_s` passes first."""
    deadline = time.monotonic() + timeout_s
    while not ready():
        if proc.poll() is not None:
            raise AssertionError(f"the child ended ({proc.returncode}) before its kill point:\n{log_tail(log)}")
        if time.monotonic() > deadline:
            proc.kill()
            proc.wait()
            raise AssertionError(f"the kill point was not reached in {timeout_s:.0f} s:\n{log_tail(log)}")
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()


def session_survivors(sid: int) -> list[psutil.Process]:
    """Live processes (zombies aside) of session `sid`: what a killed child started and left behind."""
    found = []
    for p in psutil.process_iter(["status"]):
        try:
            if os.getsid(p.pid) == sid and p.info["status"] != psutil.STATUS_ZOMBIE:
                found.append(p)
        except (ProcessLookupError, PermissionError, psutil.Error):
            continue
    return found


def assert_no_survivors(proc: subprocess.Popen, settle_s: float = 10.0) -> None:
    """No process of the killed child's session is alive. Processes that are on their way out (a
    parent-death signal, a closed pipe) get `settle_s`; anything still there after that is a leak."""
    deadline = time.monotonic() + settle_s
    while (left := session_survivors(proc.pid)) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not left, "the killed child left processes behind: " + "; ".join(_describe(p) for p in left)


def _describe(p: psutil.Process) -> str:
    try:
        return f"pid {p.pid} {' '.join(p.cmdline())[:200]}"
    except psutil.Error:
        return f"pid {p.pid} (gone while being listed)"


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """One real `mlflow server` (SQLite store, loopback port) for the fault modules; a test that stops
    it for an outage starts it again before it ends."""
    from tests.faults.mlflow_helpers import shared_server

    server = shared_server(tmp_path_factory.mktemp("mlflow-server"))
    yield server
    server.stop()
