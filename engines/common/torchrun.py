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
import uuid
from collections import deque
from typing import Any

from flowspeed.engines.common.lifetime import die_with_parent, stop


class DistributedJobFailed(RuntimeError):
    pass


# What an elastic torchrun job needs in its environment (every node's agent): with the agent's rendezvous TCPStore
# shared with the ranks (torch's default since 2.5), a restarted group can read the dead group's keys (gloo/NCCL
# peer addresses) and fail to connect to them (pytorch/pytorch#135712, #167288). Unshared, each round's rank 0
# serves a fresh store.
ELASTIC_ENV = {"TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}


def elastic_args(train: Any) -> dict[str, int] | None:
    """`train.elastic` as `torchrun_command`'s `elastic` ({max_restarts, min_nodes, max_nodes}; the node range
    defaults to `train.nnodes`), None without it: one rule for every launcher (local, Kubernetes pods, Slurm)."""
    e = getattr(train, "elastic", None)
    if e is None:
        return None
    return {"max_restarts": e.max_restarts, "min_nodes": e.min_nodes or train.nnodes,
            "max_nodes": e.max_nodes or train.nnodes}  # fmt: skip


def torchrun_layout(train: Any) -> tuple[dict[str, Any] | None, dict[str, int] | None]:
    """The (rdzv, elastic) arguments `run_torchrun` gets for a `train` config section: a c10d rendezvous when the
    job spans nodes (or is elastic with an endpoint), and the elastic agent's settings. The train stage's launcher and
    a Kubernetes pod joining it both build torchrun from here, so they always agree."""
    elastic = elastic_args(train)
    rdzv = None
    if train.nnodes > 1 or (elastic is not None and train.rdzv_endpoint):
        rdzv = {"nnodes": train.nnodes, "node_rank": train.node_rank, "endpoint": train.rdzv_endpoint,
                "id": train.rdzv_id}  # fmt: skip
    return rdzv, elastic


def root_cause(stderr_tail: str) -> str:
    """The `Root Cause` block of torchrun's failure report, else the last lines of stderr."""
    marker = stderr_tail.rfind("Root Cause")
    if marker != -1:
        return stderr_tail[marker:].strip()[:4000]
    return "\n".join(stderr_tail.strip().splitlines()[-25:])


def in_distributed_job() -> bool:
    """True inside a rank of an outer launcher (torchrun, srun): run the work here, launch nothing."""
    return "WORLD_SIZE" in os.environ


def torchrun_command(
    module: str, args: list[str], nproc: int, rdzv: dict | None = None, elastic: dict | None = None
) -> list[str]:
    """`--standalone` on one node; on several, a c10d rendezvous every node's launcher joins.

    `elastic` ({max_restarts, min_nodes, max_nodes}) asks torchrun's agent to restart the whole group when a
    rank fails: always a c10d rendezvous (on one node a local store on a free port, as `--standalone` makes),
    `--nnodes=min:max` so a group may form within the range, and no `--node_rank`: the rendezvous assigns the
    ranks, which is what lets a restarted group form again after a node is gone."""
    if elastic is not None:
        lo, hi = elastic["min_nodes"], elastic["max_nodes"]
        endpoint, rdzv_id = (rdzv["endpoint"], rdzv["id"]) if rdzv is not None else ("localhost:0", uuid.uuid4().hex)
        where = [f"--nnodes={lo}:{hi}", "--rdzv_backend=c10d", f"--rdzv_endpoint={endpoint}", f"--rdzv_id={rdzv_id}",
                 f"--max-restarts={elastic['max_restarts']}"]  # fmt: skip
    elif rdzv is None:
        where = ["--standalone"]
    else:
        where = [f"--nnodes={rdzv['nnodes']}", f"--node_rank={rdzv['node_rank']}", "--rdzv_backend=c10d",
                 f"--rdzv_endpoint={rdzv['endpoint']}", f"--rdzv_id={rdzv['id']}"]  # fmt: skip
    return [sys.executable, "-m", "torch.distributed.run", *where, f"--nproc_per_node={nproc}", "-m", module, *args]


def run_torchrun(
    module: str, args: list[str], nproc: int, rdzv: dict | None = None, elastic: dict | None = None
) -> None:
    cmd = torchrun_command(module, args, nproc, rdzv, elastic)
    env = dict(os.environ)
    # CPU ranks share the machine's cores; one thread each keeps gloo ranks from oversubscribing.
    env.setdefault("OMP_NUM_THREADS", "1")
    if elastic is not None:
        env.update(ELASTIC_ENV)
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
