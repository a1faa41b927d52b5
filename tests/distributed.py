"""Run a function on N real CPU ranks (gloo) and collect what each returns.

    results = run_ranks(fn, 2, arg1, arg2)   # fn(rank, world, *args) on every rank; [ret0, ret1]

The function must be importable (module level) because ranks are spawned processes. Collectives are
real: each rank joins a gloo process group through a TCP store on a free local port. A rank ends its own
child processes before it exits, and run_ranks fails if any of them outlived it.
"""

from __future__ import annotations

import os
import socket
import sys
import tempfile
import traceback
import warnings
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import psutil
import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _end_children() -> list[tuple[int, float]]:
    """End this rank's child processes (pid, start time): megatron-core's dist checkpointing starts multiprocessing
    helpers (a Manager's server) whose finalizers the rank's os._exit skips, so they would live on as orphans."""
    children = psutil.Process().children(recursive=True)
    ended = []
    for child in children:
        try:
            ended.append((child.pid, child.create_time()))
            child.terminate()
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(children, timeout=10)
    for child in alive:
        child.kill()
    psutil.wait_procs(alive, timeout=10)
    return ended


def _alive(pid: int, started: float) -> bool:
    try:
        proc = psutil.Process(pid)
        return proc.create_time() == started and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _entry(rank: int, world: int, port: int, out: str, fn: Callable[..., Any], args: tuple) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank)
    )
    torch.set_num_threads(1)
    # A rank that dies must not leave its peer waiting forever in a collective.
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=180))
    try:
        result: Any = ("ok", fn(rank, world, *args))
        dist.barrier()  # no collective still in flight when the group goes away
    except BaseException as exc:  # the parent re-raises it with the rank's traceback
        result = ("error", f"rank {rank}: {exc!r}\n{traceback.format_exc()}")
    torch.save((*result, _end_children()), Path(out) / f"rank{rank}.pt")
    dist.destroy_process_group()
    # Skip interpreter teardown: gloo's and functional collectives' C++ threads can abort the process
    # ("terminate called without an active exception") while being destroyed at exit.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def run_ranks(fn: Callable[..., Any], world: int, *args: Any) -> list[Any]:
    with tempfile.TemporaryDirectory() as out:
        try:
            mp.start_processes(_entry, args=(world, _free_port(), out, fn, args), nprocs=world, start_method="spawn")
        except mp.ProcessExitedException:
            # A rank that died before reporting is a failure; one that reported and then crashed in
            # process teardown has delivered its result, which the caller's assertions judge.
            if not all((Path(out) / f"rank{r}.pt").is_file() for r in range(world)):
                raise
            warnings.warn("a rank crashed after reporting its result (process teardown)", stacklevel=2)
        results = [torch.load(Path(out) / f"rank{r}.pt", weights_only=False) for r in range(world)]
    errors = [msg for kind, msg, _ in results if kind == "error"]
    survivors = {r: [pid for pid, started in ended if _alive(pid, started)] for r, (_, _, ended) in enumerate(results)}
    errors += [f"rank {r}'s child processes {pids} outlived it" for r, pids in survivors.items() if pids]
    if errors:
        raise AssertionError("\n".join(errors))
    return [value for _, value, _ in results]
