"""Is a recorded process still alive? GPU-slot holders and MLflow run owners are recorded as (host, pid,
process start time), so a crashed holder can be told from a live one and a reused pid is not mistaken for it."""

from __future__ import annotations

import socket

import psutil


def process_alive(host: str, pid: int, started: float) -> bool:
    """Is the process (host, pid, start time) still running? A pid reused by a later process has another
    start time. One on another host cannot be checked from here and counts as alive."""
    if host != socket.gethostname():
        return True
    try:
        proc = psutil.Process(pid)
        return abs(proc.create_time() - started) < 1.0 and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
    except psutil.Error:
        return True  # exists but unreadable (another user's): not ours to call dead
