"""Real team-mode servers for tests: PostgreSQL databases, an MLflow tracking server and a Prefect
server, each on a free loopback port, started and stopped by the fixtures that use them.

Where no PostgreSQL answers on 127.0.0.1:5432 (a laptop), the tests that need it skip with that
reason; the project's machines and CI run one with trust auth.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

PG = {"host": "127.0.0.1", "port": 5432, "user": "postgres"}
BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _admin():  # noqa: ANN202
    import psycopg2

    conn = psycopg2.connect(dbname="postgres", connect_timeout=3, **PG)
    conn.autocommit = True
    return conn


def require_postgres() -> None:
    try:
        _admin().close()
    except Exception as exc:  # noqa: BLE001 - no server, wrong auth: the same "not here"
        pytest.skip(f"team-mode tests need PostgreSQL on 127.0.0.1:5432 with trust auth for user postgres ({exc})")


@contextmanager
def database(prefix: str) -> Iterator[str]:
    """A fresh, uniquely named database, dropped afterwards (even after a failure)."""
    name = f"{prefix}_{uuid.uuid4().hex[:10]}"
    conn = _admin()
    with conn.cursor() as cur:
        cur.execute(f'CREATE DATABASE "{name}"')
    try:
        yield name
    finally:
        with conn.cursor() as cur:
            cur.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        conn.close()


def wait_http(url: str, proc: subprocess.Popen, log: Path, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            urllib.request.urlopen(url, timeout=2)
            return
        except OSError:
            pass
        if proc.poll() is not None:
            raise RuntimeError(f"{url}: the server exited ({proc.returncode}):\n{log.read_text()[-3000:]}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"{url} did not answer in {timeout:.0f} s:\n{log.read_text()[-3000:]}")
        time.sleep(0.5)


class Server:
    """One server process; `stop()` and `start()` again on the same port (an outage and its end)."""

    def __init__(self, name: str, argv: list[str], env: dict[str, str], health: str, folder: Path) -> None:
        self.name, self.argv, self.env, self.health = name, argv, env, health
        self.log = folder / f"{name}.log"
        self.proc: subprocess.Popen | None = None

    def start(self) -> Server:
        with open(self.log, "a") as out:
            self.proc = subprocess.Popen(self.argv, env=self.env, stdout=out, stderr=subprocess.STDOUT,
                                         start_new_session=True)  # fmt: skip
        wait_http(self.health, self.proc, self.log)
        return self

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        os.killpg(self.proc.pid, 15)  # the server and its workers
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, 9)
            self.proc.wait()


def base_env(folder: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_"))}
    env |= {"PREFECT_HOME": str(folder / "prefect-home"), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}  # fmt: skip
    return env


def mlflow_server(folder: Path, db: str, port: int | None = None) -> Server:
    port = port or free_port()
    argv = [str(BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
            "--backend-store-uri", f"postgresql+psycopg2://postgres@127.0.0.1:5432/{db}",
            "--artifacts-destination", str(folder / "mlflow-artifacts")]  # fmt: skip
    server = Server("mlflow", argv, base_env(folder), f"http://127.0.0.1:{port}/health", folder)
    server.url = f"http://127.0.0.1:{port}"  # type: ignore[attr-defined]
    return server


def prefect_server(folder: Path, db: str, port: int | None = None) -> Server:
    port = port or free_port()
    env = base_env(folder) | {
        "PREFECT_API_DATABASE_CONNECTION_URL": f"postgresql+asyncpg://postgres@127.0.0.1:5432/{db}",
        "PREFECT_API_URL": f"http://127.0.0.1:{port}/api",
    }
    argv = [str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)]
    server = Server("prefect", argv, env, f"http://127.0.0.1:{port}/api/health", folder)
    server.url = f"http://127.0.0.1:{port}"  # type: ignore[attr-defined]
    return server
