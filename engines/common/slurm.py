"""Slurm for the training stage: the batch script of one allocation, and sbatch / squeue / sacct / scancel.

`train.launcher: slurm` asks Slurm for `train.nnodes` nodes at once (one `sbatch`), so every node starts
together and the scheduler, not a person setting `node_rank` per node, decides where the job runs. Each node
runs one `srun` task: torchrun with `train.nproc_per_node` ranks, joined by the c10d rendezvous on the
allocation's first node and keyed by the job id (a requeued job gets a fresh rendezvous).

`$SLURM_NODEID` differs per node, so it must be expanded by the shell srun starts on each node, never by
the batch shell (which runs on the first node only: every node would claim node rank 0): the torchrun
command is a `bash -c '...'` script in single quotes, with the Python and the trainer's arguments passed
as its positional parameters so no value of ours is ever re-parsed by a shell.

The Slurm commands run through subprocess, so a machine without Slurm fails with what to do instead of a
`FileNotFoundError`. No Prefect here: the Prefect side (tagging the MLflow run, waiting, cancelling on a
cancelled flow) is `flowspeed.tasks.slurm`.
"""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from flowspeed.configs import PipelineConfig
from flowspeed.engines.common.torchrun import ELASTIC_ENV, elastic_args, torchrun_command

# Job states after which the job never runs again (squeue drops the job; sacct / scontrol keep the state).
# Everything else (PENDING, CONFIGURING, RUNNING, COMPLETING, SUSPENDED, REQUEUED, RESIZING, ...) is waited on.
TERMINAL = frozenset(
    {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "PREEMPTED", "OUT_OF_MEMORY", "BOOT_FAIL",
     "DEADLINE", "REVOKED", "SPECIAL_EXIT"}
)  # fmt: skip
RDZV_ENV = "FLOWSPEED_RDZV_ENDPOINT"  # host:port of the rendezvous, set by the batch shell for every node
_SAFE = re.compile(r"^[\w.,:=/+$@%-]+$")  # what may sit unquoted inside the single-quoted per-node script
_COMMAND_TIMEOUT_S = 120.0  # a slurmctld that does not answer in this long is reported, not waited on forever


class SlurmError(RuntimeError):
    """A Slurm command is missing or refused (no Slurm here, a bad partition, an unreachable controller)."""


class SlurmJobFailed(RuntimeError):
    """The job ended in a state other than COMPLETED."""


@dataclass(frozen=True)
class JobStatus:
    job_id: str
    state: str  # the base state: "CANCELLED by 1000" -> "CANCELLED"
    nodes: str = ""  # Slurm's node list (`node[01-02]`); "" while pending or when no source says
    exit_code: str = ""  # "exit:signal" as sacct / scontrol give it, "" while the job lives

    @property
    def terminal(self) -> bool:
        return self.state in TERMINAL


def gpus_per_node(cfg: PipelineConfig) -> int:
    """`train.slurm.gpus_per_node`, else one GPU per rank; 0 (no GPU request) on CPU, and on Ascend, whose
    NPUs are a site's gres (`train.slurm.sbatch_args: [--gres=npu:8]`), not Slurm GPUs."""
    t = cfg.train
    if t.slurm.gpus_per_node is not None:
        return t.slurm.gpus_per_node
    return 0 if t.device.startswith(("cpu", "npu")) else t.nproc_per_node


def batch_script(cfg: PipelineConfig, module: str, args: list[str], python: str | None = None,
                 workdir: Path | None = None, log: Path | None = None) -> str:  # fmt: skip
    """The sbatch script of the training stage: `#SBATCH` lines from `train.nnodes` and `train.slurm`, then one
    srun task per node running torchrun `-m module args`. `workdir`: where the job runs (relative paths of the
    config resolve there; default this process's), `log`: the job's stdout and stderr (default
    `<train_dir>/slurm-<job id>.out`)."""
    t, s = cfg.train, cfg.train.slurm
    workdir = Path(workdir or Path.cwd()).resolve()
    log = Path(log or Path(cfg.train_dir) / "slurm-%j.out")
    log = log if log.is_absolute() else workdir / log
    options = [f"--job-name={s.job_name or f'flowspeed-train-{cfg.model.family}'}", f"--nodes={t.nnodes}",
               "--ntasks-per-node=1"]  # fmt: skip
    if gpus := gpus_per_node(cfg):
        options.append(f"--gpus-per-node={gpus}")
    named = {"cpus-per-task": s.cpus_per_task, "mem": s.mem, "time": s.time, "partition": s.partition,
             "account": s.account, "qos": s.qos}  # fmt: skip
    options += [f"--{k}={v}" for k, v in named.items() if v is not None]
    options += [f"--chdir={workdir}", f"--output={log}", *s.sbatch_args]
    lines = ["#!/bin/bash", *(f"#SBATCH {o}" for o in options)]
    lines += [f"# flowspeed train stage ({cfg.model.family}): {t.nnodes} node(s) x {t.nproc_per_node} rank(s), "
              "one torchrun per node, c10d rendezvous on the first node", "set -eo pipefail"]  # fmt: skip
    if s.cpus_per_task is not None:  # srun of Slurm 22.05-23.02 does not inherit --cpus-per-task from sbatch
        lines.append(f"export SRUN_CPUS_PER_TASK={s.cpus_per_task}")
    lines += s.setup
    lines += ['head_node=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)',
              f'export {RDZV_ENV}="$head_node:{s.port}"']  # fmt: skip
    rdzv = {"nnodes": "$SLURM_NNODES", "node_rank": "$SLURM_NODEID", "endpoint": f"${RDZV_ENV}", "id": "$SLURM_JOB_ID"}
    elastic = elastic_args(t)  # the agent restarts a failed group on the nodes it holds (engines/launch.py)
    if elastic is not None:
        lines += [f"export {k}={v}" for k, v in ELASTIC_ENV.items()]
    per_node = torchrun_command(module, [], t.nproc_per_node, rdzv=rdzv, elastic=elastic)[1:]  # [0]: "$0"
    unsafe = [tok for tok in per_node if not _SAFE.match(tok)]
    if unsafe:
        raise ValueError(f"cannot put {unsafe} into the per-node command unquoted")
    inner = " ".join(['exec "$0"', *per_node, '"$@"'])
    launcher = [python or s.python or sys.executable, *args]
    lines += ['srun --nodes="$SLURM_NNODES" --ntasks-per-node=1 --kill-on-bad-exit=1 \\',
              f"  bash -c '{inner}' \\", f"  {shlex.join(launcher)}"]  # fmt: skip
    return "\n".join(lines) + "\n"


def _slurm(cmd: list[str], what: str) -> subprocess.CompletedProcess[str]:
    """Run a Slurm client command; a missing one or a refusal is a SlurmError that says which and why."""
    if shutil.which(cmd[0]) is None:
        raise SlurmError(
            f"{cmd[0]} is not on PATH, so the training stage cannot be {what}: train.launcher: slurm runs where the "
            "Slurm client commands are (a login node, or a Prefect worker on one); elsewhere set train.launcher: local"
        )
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=_COMMAND_TIMEOUT_S, check=False)
    except subprocess.TimeoutExpired as exc:
        raise SlurmError(
            f"`{shlex.join(cmd)}` did not answer in {_COMMAND_TIMEOUT_S:.0f} s (slurmctld busy or away)"
        ) from exc


def _refused(cmd: list[str], proc: subprocess.CompletedProcess[str]) -> SlurmError:
    why = (proc.stderr or proc.stdout).strip() or f"exit status {proc.returncode}"
    return SlurmError(f"`{shlex.join(cmd)}` failed: {why}")


def sbatch(script: Path) -> str:
    """Submit `script`; the job id (`sbatch --parsable` prints `id` or `id;cluster`)."""
    cmd = ["sbatch", "--parsable", str(script)]
    proc = _slurm(cmd, "submitted")
    job_id = proc.stdout.strip().split(";")[0]
    if proc.returncode != 0 or not job_id.isdigit():
        raise _refused(cmd, proc)
    return job_id


def scancel(job_id: str) -> None:
    cmd = ["scancel", job_id]
    proc = _slurm(cmd, "cancelled")
    if proc.returncode != 0:
        raise _refused(cmd, proc)


def _base(state: str) -> str:
    return state.split()[0].rstrip("+") if state.strip() else ""  # "CANCELLED by 1000", "CANCELLED+"


def status(job_id: str) -> JobStatus:
    """Where the job is: squeue while it is queued or running; once it has left the queue, sacct (accounting),
    else scontrol (the controller remembers a finished job for MinJobAge, 300 s by default)."""
    cmd = ["squeue", "-h", "-j", job_id, "-o", "%T|%N"]
    proc = _slurm(cmd, "watched")
    line = proc.stdout.strip().splitlines()[0] if proc.returncode == 0 and proc.stdout.strip() else ""
    if line:
        state, _, nodes = line.partition("|")
        return JobStatus(job_id, _base(state), nodes.strip())
    if proc.returncode != 0 and "invalid job id" not in (proc.stderr + proc.stdout).lower():
        raise _refused(cmd, proc)
    tried = [f"`{shlex.join(cmd)}`: not in the queue"]
    if shutil.which("sacct"):
        cmd = ["sacct", "-j", job_id, "-n", "-P", "-X", "-o", "State,ExitCode,NodeList"]
        proc = _slurm(cmd, "watched")
        rows = [r.split("|") for r in proc.stdout.strip().splitlines() if r.strip()] if proc.returncode == 0 else []
        if rows and len(rows[0]) == 3:
            state, code, nodes = rows[0]
            return JobStatus(job_id, _base(state), "" if nodes == "None assigned" else nodes, code)
        tried.append(f"`{shlex.join(cmd)}`: {(proc.stderr or proc.stdout).strip() or 'no record'}")
    cmd = ["scontrol", "show", "job", job_id]
    proc = _slurm(cmd, "watched")
    fields = dict(re.findall(r"(\w+)=(\S*)", proc.stdout)) if proc.returncode == 0 else {}
    if "JobState" in fields:
        nodes = fields.get("NodeList", "")
        return JobStatus(
            job_id, _base(fields["JobState"]), "" if nodes == "(null)" else nodes, fields.get("ExitCode", "")
        )
    tried.append(f"`{shlex.join(cmd)}`: {(proc.stderr or proc.stdout).strip() or 'no record'}")
    raise SlurmError(f"Slurm job {job_id} is known to none of squeue, sacct, scontrol: " + "; ".join(tried))


def wait(job_id: str, poll_s: float, on_change: Callable[[JobStatus], None] | None = None,
         sleep: Callable[[float], None] = time.sleep) -> JobStatus:  # fmt: skip
    """Poll until the job ends; `on_change` sees every new (state, nodes). An exception raised in here (Ctrl-C,
    SIGTERM, a cancelled flow) leaves the job alone: cancelling is the caller's decision."""
    last: tuple[str, str] | None = None
    while True:
        st = status(job_id)
        if (st.state, st.nodes) != last:
            last = (st.state, st.nodes)
            if on_change is not None:
                on_change(st)
        if st.terminal:
            return st
        sleep(poll_s)


def log_tail(log: Path, lines: int = 40) -> str:
    """The end of the job's output (torchrun's Root Cause report when a rank failed), for the error message."""
    from flowspeed.engines.common.torchrun import root_cause

    try:
        text = log.read_text(errors="replace")
    except OSError as exc:
        return f"(no job output at {log}: {exc.strerror})"
    tail = "".join(text.splitlines(keepends=True)[-400:])
    return root_cause(tail) if "Root Cause" in tail else "\n".join(tail.strip().splitlines()[-lines:])
