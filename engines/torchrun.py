"""Launch a module as a torchrun job and surface a failing rank's error.

torchrun's `@record` puts each failed rank's traceback in the agent's "Root Cause" report on
stderr; we tee stderr through and lift that report into the raised error, so a Prefect task (and
the CLI) shows why rank 1 died instead of "exit status 1".
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from collections import deque


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
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True, env=env, cwd=os.getcwd())

    def pump() -> None:
        assert proc.stderr is not None
        for line in proc.stderr:
            tail.append(line)
            sys.stderr.write(line)

    t = threading.Thread(target=pump, daemon=True)
    t.start()
    rc = proc.wait()
    t.join(timeout=10)
    if rc != 0:
        raise DistributedJobFailed(
            f"torchrun {module} with {nproc} ranks exited with status {rc}.\n{root_cause(''.join(tail))}"
        )
