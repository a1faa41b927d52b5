"""Launch a module as a torchrun job and surface a failing rank's error.

torchrun's `@record` puts each failed rank's traceback in the agent's "Root Cause" report on
stderr; we tee stderr through and lift that report into the raised error, so a Prefect task (and
the CLI) shows why rank 1 died instead of "exit status 1".

torchrun cannot outlive us: it gets SIGTERM when flowspeed dies, even by SIGKILL (its agent then stops
the ranks), and is stopped the same way when an exception (Ctrl-C, SIGTERM, a failed MLflow call)
leaves this function.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from collections import deque

from flowspeed.engines.common.lifetime import die_with_parent, stop


class DistributedJobFailed(RuntimeError):
    pass


def root_cause(stderr_tail: str) -> str:
    """The `Root Cause` block of torchrun's failure report, else the last lines of stderr."""
    marker = stderr_tail.rfind("Root Cause")
    if marker != -1:
        return stderr_tail[marker:].strip()[:4000]
    return "\n".join(stderr_tail.strip().splitlines()[-25:])


def in_distributed_job() -> bool:
    """True inside a rank of an outer launcher (torchrun, srun): run the work here, launch nothing."""
    return "WORLD_SIZE" in os.environ


def torchrun_command(module: str, args: list[str], nproc: int, rdzv: dict | None = None) -> list[str]:
    """`--standalone` on one node; on several, a c10d rendezvous every node's launcher joins."""
    if rdzv is None:
        where = ["--standalone"]
    else:
        where = [f"--nnodes={rdzv['nnodes']}", f"--node_rank={rdzv['node_rank']}", "--rdzv_backend=c10d",
                 f"--rdzv_endpoint={rdzv['endpoint']}", f"--rdzv_id={rdzv['id']}"]  # fmt: skip
    return [sys.executable, "-m", "torch.distributed.run", *where, f"--nproc_per_node={nproc}", "-m", module, *args]


def run_torchrun(module: str, args: list[str], nproc: int, rdzv: dict | None = None) -> None:
    cmd = torchrun_command(module, args, nproc, rdzv)
    env = dict(os.environ)
    # CPU ranks share the machine's cores; one thread each keeps gloo ranks from oversubscribing.
    env.setdefault("OMP_NUM_THREADS", "1")
    tail: deque[str] = deque(maxlen=400)
    # Started and waited for by this thread: PR_SET_PDEATHSIG fires when the starting thread ends.
    proc = subprocess.Popen(
        cmd, stderr=subprocess.PIPE, text=True, env=env, cwd=os.getcwd(), preexec_fn=die_with_parent()
    )

    stopping = threading.Event()

    def pump() -> None:
        assert proc.stderr is not None
        for line in proc.stderr:
            tail.append(line)
            if not stopping.is_set():  # once we stop the job, its agent's shutdown traceback is noise
                sys.stderr.write(line)

    t = threading.Thread(target=pump, daemon=True)
    t.start()
    try:
        rc = proc.wait()
    except BaseException:  # Ctrl-C, SIGTERM: its agent gets 30 s to stop the ranks, then SIGKILL
        stopping.set()
        stop(proc, grace_s=30)
        raise
    t.join(timeout=10)
    if rc != 0:
        raise DistributedJobFailed(
            f"torchrun {module} with {nproc} ranks exited with status {rc}.\n{root_cause(''.join(tail))}"
        )
