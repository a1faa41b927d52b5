"""Who holds a GPU slot: one record per holder beside the Prefect limit, so a dead holder can be found.

Prefect hands slots out as leases that the holder renews and the server's lease repossessor revokes
once renewals stop. The ephemeral API (flowspeed without PREFECT_API_URL, and the tests) runs no
repossessor and keeps leases in the memory of a server that dies with the holder, so a SIGKILLed
training kept its slots forever and every resume queued behind it. The records here tie each slot to
the holder's process (host, pid, process start time): a waiting run checks them, releases what a
dead process on this node held, and names the live holder it is waiting for.
"""

from __future__ import annotations

import json
import os
import socket
import time
import uuid
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path

import psutil
from flowspeed.engines.common.processes import process_alive
from prefect.settings import get_current_settings


@dataclass(frozen=True)
class Holder:
    token: str
    limit: str
    occupy: int
    host: str
    pid: int
    started: float  # the process's start time: a reused pid is not mistaken for the holder
    since: float  # when it took the slots (epoch seconds)
    flow_run: str | None
    task_run: str | None

    def describe(self) -> str:
        since = datetime.fromtimestamp(self.since, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
        run = f"flow run {self.flow_run}" if self.flow_run else "no flow run"
        return f"pid {self.pid} on {self.host} ({run}, {self.occupy} slot(s) since {since})"

    def is_alive(self) -> bool:
        """Only a holder on this node can be checked; one elsewhere counts as alive (its lease covers it)."""
        return process_alive(self.host, self.pid, self.started)


def holders_dir(limit: str) -> Path:
    """Node-local: PREFECT_HOME is where the ephemeral API's database lives, so records sit beside it."""
    return Path(get_current_settings().home) / "gpu-slot-holders" / limit


def _run_ids() -> tuple[str | None, str | None]:
    from prefect.context import FlowRunContext, TaskRunContext

    flow_ctx, task_ctx = FlowRunContext.get(), TaskRunContext.get()
    flow_run = flow_ctx.flow_run.id if flow_ctx and flow_ctx.flow_run else None
    if flow_run is None and task_ctx is not None:
        flow_run = task_ctx.task_run.flow_run_id
    return (str(flow_run) if flow_run else None), (str(task_ctx.task_run.id) if task_ctx else None)


def record(limit: str, occupy: int) -> Path:
    """Write this process's record (temp file + rename: a reader never sees half of one)."""
    flow_run, task_run = _run_ids()
    me = Holder(
        token=uuid.uuid4().hex,
        limit=limit,
        occupy=occupy,
        host=socket.gethostname(),
        pid=os.getpid(),
        started=psutil.Process().create_time(),
        since=time.time(),
        flow_run=flow_run,
        task_run=task_run,
    )
    folder = holders_dir(limit)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{me.token}.json"
    tmp = folder / f".{me.token}.tmp"
    tmp.write_text(json.dumps(asdict(me)))
    os.replace(tmp, path)
    return path


def read_holders(limit: str) -> list[tuple[Path, Holder]]:
    out = []
    for path in sorted(holders_dir(limit).glob("*.json")):
        try:
            out.append((path, Holder(**json.loads(path.read_text()))))
        except (OSError, ValueError, TypeError):
            continue  # removed while listing, or not a record: nothing to act on
    return sorted(out, key=lambda ph: ph[1].since)


def claim(path: Path) -> bool:
    """Take a dead holder's record for release; exactly one of several waiting runs wins the rename."""
    try:
        os.replace(path, path.with_suffix(f".released-by-{os.getpid()}"))
    except FileNotFoundError:
        return False
    path.with_suffix(f".released-by-{os.getpid()}").unlink(missing_ok=True)
    return True
