"""Child processes that cannot outlive flowspeed.

A `kill -9` of flowspeed runs none of its cleanup, so every process it starts must notice on its own
that its parent is gone: a torchrun agent left behind keeps training (its ranks hold the checkpoint
directory and the GPUs), an embedded Prefect server keeps its port and 250 MB. Two ways, by what can
run code in the child:

- `die_with_parent()`: a `preexec_fn` for `subprocess.Popen` that asks the kernel (Linux
  `PR_SET_PDEATHSIG`) to send the child a signal when its parent dies, however it dies. The kernel
  sends it when the *thread* that started the child ends, so call Popen from a thread that waits
  for the child (or the main thread).
- `exit_with_parent()`: for workers we do not fork ourselves (a process pool's initializer): a daemon
  thread that exits the worker once its parent process is gone.

And how our own processes end: `exit_without_teardown()` (the CLI, every torchrun rank through `run_rank()`).

No Prefect here: `engines` never imports it.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import ctypes.util
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from typing import NoReturn

_PR_SET_PDEATHSIG = 1


def _prctl() -> Callable[..., int] | None:
    """libc's prctl, looked up in the parent: a preexec_fn should not load libraries after fork."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
        return libc.prctl
    except (OSError, AttributeError):
        return None


def die_with_parent(sig: int = signal.SIGTERM) -> Callable[[], None] | None:
    """A `preexec_fn` that makes the child receive `sig` when this process dies (None where the
    kernel cannot: not Linux). SIGTERM lets torchrun's agent stop its ranks and uvicorn shut down."""
    prctl = _prctl()
    if prctl is None:
        return None
    parent = os.getpid()

    def preexec() -> None:
        prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0)
        if os.getppid() != parent:  # the parent died between fork and prctl: nobody will signal us
            os.kill(os.getpid(), sig)

    return preexec


def exit_with_parent(parent_pid: int | None = None, poll_s: float = 1.0) -> None:
    """Start a daemon thread that ends this process once its parent process has exited (its parent
    pid changes to a reaper's). For pool workers: their executor may spawn them from a short-lived
    thread, which rules out PR_SET_PDEATHSIG (tied to the spawning thread, not the process).

    The parent is the one multiprocessing recorded when it spawned us (a worker still starting when
    its parent dies must not take the reaper for its parent), else `parent_pid`, else today's."""
    import multiprocessing

    spawner = multiprocessing.parent_process()
    parent = parent_pid or (spawner.pid if spawner is not None and spawner.pid else os.getppid())

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(poll_s)
        os._exit(128 + signal.SIGTERM)

    threading.Thread(target=watch, name="exit-with-parent", daemon=True).start()


def stop(proc: subprocess.Popen, grace_s: float = 10.0) -> None:
    """SIGTERM, then SIGKILL after `grace_s`: the child's own shutdown (torchrun stops its ranks) first."""
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        proc.terminate()
    try:
        proc.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        proc.wait(timeout=grace_s)


def exit_without_teardown(code: int) -> NoReturn:
    """End this process the way Python's own shutdown starts (non-daemon threads joined, atexit hooks run: an
    embedded Prefect API stopped, logs flushed; stdout/stderr flushed), then `os._exit(code)`: no interpreter
    finalization and no C++ static destructors.

    Why skip them: after torch and diffusers are loaded, finalization is seconds of freeing memory the kernel reclaims
    at once anyway. And it is where a torchrun rank can die after its work is done. torch keeps process groups alive
    past `destroy_process_group()` (DTensor's sharding caches hold the device meshes and so their groups; a
    `torch.distributed.nn` imported after the group was made holds the world group in its default arguments), so
    gloo's worker threads still run while the interpreter finalizes. A worker that drops a finished collective late
    (a loaded CPU) frees the last reference to an output tensor whose Python object must then be freed too; it asks
    for the GIL, Python ends the finalizing process's other threads with `pthread_exit`, and the unwind through C++
    calls std::terminate: "terminate called without an active exception", SIGABRT after the work is written, and
    torchrun fails the whole job (a core dump of a 2-rank gloo run showed exactly that stack: runLoop ->
    ~AsyncAllgatherWork -> THPVariable_dealloc -> take_gil -> PyThread_exit_thread, the main thread in
    Py_FinalizeEx)."""
    shutdown = getattr(threading, "_shutdown", None)  # what Py_Finalize calls first: joins non-daemon threads
    if shutdown is None:  # not CPython: its own exit
        raise SystemExit(code)
    shutdown()
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(code)


def run_rank(main: Callable[[], object]) -> NoReturn:
    """A torchrun rank's `__main__`: `main()` (torchrun's `@record` around it writes a failure's error file for the
    agent's report), then `exit_without_teardown`: 0, or 1 after the traceback Python would have printed (an
    argparse `SystemExit` keeps its code)."""
    try:
        main()
        code = 0
    except SystemExit as exc:
        if exc.code is None or isinstance(exc.code, int):
            code = exc.code or 0
        else:
            print(exc.code, file=sys.stderr)
            code = 1
    except BaseException:
        sys.excepthook(*sys.exc_info())
        code = 1
    exit_without_teardown(code)
