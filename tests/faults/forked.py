"""Children forked from a fork server that imported torch, MLflow and the training code once,
instead of a new interpreter importing them again for every child (seconds each).

`forked_child` is `tests.faults.conftest.python_child` without that start: the child is still a fresh
process (forked from the server, not from this test process: it inherits none of its threads, state or
files), in a session of its own, and what kills it is a real SIGKILL. `run` is its entry. This module
imports nothing heavy, so that the fork server loads it without side effects.
"""

from __future__ import annotations

import importlib
import multiprocessing
import multiprocessing.process
import os
import signal
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

# What a forked child's training needs (`forked_child`): torch, MLflow, and the tiny quickstart
# family's diffusers, transformers and peft, imported once in the fork server instead of in every child.
FORK_PRELOAD = [__name__, "torch", "mlflow", "flowspeed.configs", "flowspeed.engines.launch",
                "flowspeed.engines.tracking.tracker", "flowspeed.engines.torch_engine.launch",
                "flowspeed.engines.torch_engine.trainer", "flowspeed.engines.torch_engine.setup",
                "flowspeed.engines.torch_engine.lora", "flowspeed.engines.models.cogvideox",
                "flowspeed.engines.export"]  # fmt: skip


class ForkedChild:
    """A child forked from multiprocessing's fork server, with the part of `subprocess.Popen` these helpers
    use (pid, poll, wait, kill, send_signal, returncode; a signal's death is -signum, as Popen reports it)."""

    def __init__(self, process: multiprocessing.process.BaseProcess) -> None:
        self.process = process
        self.pid = process.pid
        self.args = process.name

    @property
    def returncode(self) -> int | None:
        return self.process.exitcode

    def poll(self) -> int | None:
        return self.process.exitcode

    def wait(self, timeout: float | None = None) -> int:
        self.process.join(timeout)
        if self.process.exitcode is None:
            raise subprocess.TimeoutExpired(self.args, timeout or 0.0)
        return self.process.exitcode

    def send_signal(self, sig: int) -> None:
        if self.process.exitcode is None:
            os.kill(self.pid, sig)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)


def start_fork_server() -> None:
    """Start the fork server now (it imports FORK_PRELOAD in its own process, while the caller goes on)."""
    from multiprocessing import forkserver

    multiprocessing.set_forkserver_preload(FORK_PRELOAD)
    forkserver.ensure_running()


def forked_child(target: str, *args: str, log: Path, env: dict[str, str] | None = None) -> ForkedChild:
    """`python_child` without a new interpreter: the child is forked from a fork server that has imported
    torch, MLflow and the training code once (seconds per child otherwise), then runs `module:function(*args)`
    in the repository root, in a new session, with stdout and stderr going to `log`. A fresh process all
    the same: nothing of this test process is inherited, and its SIGKILL is a real one."""
    start_fork_server()
    log.parent.mkdir(parents=True, exist_ok=True)
    ctx = multiprocessing.get_context("forkserver")
    proc = ctx.Process(target=run, args=(target, args, str(log), str(REPO), {**os.environ, **(env or {})}),
                       name=target, daemon=False)  # fmt: skip
    proc.start()
    return ForkedChild(proc)


def run(target: str, args: tuple[str, ...], log: str, cwd: str, env: dict[str, str]) -> None:
    """In the forked child: a session of its own, stdout and stderr to `log`, `cwd` and `env` as given,
    then `module:function(*args)`, as `python -c` would run it."""
    os.setsid()
    os.chdir(cwd)
    os.environ.clear()
    os.environ.update(env)
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    module, func = target.split(":")
    try:
        getattr(importlib.import_module(module), func)(*args)
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
