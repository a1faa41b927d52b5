"""The embedded Prefect API, started and owned by flowspeed so that it dies with it.

Without PREFECT_API_URL, Prefect starts its "ephemeral" API server as a child process on the first
client call and stops it from an atexit hook; a `kill -9` of flowspeed skips that hook and the server
lives on (250 MB and a port) until someone finds it. Prefect offers no way to pass a death signal to
that child, so flowspeed starts the same server itself (the same uvicorn command and ephemeral
settings: no UI, no background services, the database under PREFECT_HOME) with `PR_SET_PDEATHSIG`,
and points PREFECT_API_URL at it. Started before the heavy imports, it boots while the CLI imports.

A rerun's wait for it is most of a cached run's wall time, so three things keep the start short:
- a database this Prefect has already migrated (and registered its block types in) is not migrated
  again: the first start writes a stamp beside it (Prefect's version, the installed packages, the
  database's alembic revision), and a later start with the same stamp sets Prefect's own
  `server.database.migrate_on_start` and `server.register_blocks_on_start` off (0.4-1 s, and the import
  of every Prefect collection: prefect-dask loads dask.distributed);
- the first API request is sent from a thread as soon as the server answers /health: FastAPI builds
  its routes' state on the first request (~1 s here), and that now overlaps the CLI's imports;
- `flow_settings()`: flows run against it send no heartbeats. A heartbeat tells a server that the
  flow's process is alive; this server dies with that process, so nothing can ever read one, and
  Prefect joins each flow's heartbeat thread (sleeping in 1 s steps) when the flow ends.

FLOWSPEED_EMBEDDED_PREFECT_API names that URL, so code that treats the ephemeral API specially
(GPU slots: it never expires leases) can tell it from a real server. Nothing here imports Prefect
(`flow_settings` does, when called, after the imports).
"""

from __future__ import annotations

import atexit
import contextlib
import importlib.util
import json
import os
import socket
import sqlite3
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from flowspeed.engines.common.io import atomic_write_text
from flowspeed.engines.common.lifetime import die_with_parent, stop

MARKER = "FLOWSPEED_EMBEDDED_PREFECT_API"
STAMP = ".flowspeed-database-ready.json"  # beside the database: what the last full start migrated it to
# Prefect's own switches for the start-up work an already-migrated database does not need.
_SKIP_SETUP = {
    "PREFECT_SERVER_DATABASE_MIGRATE_ON_START": "false",
    "PREFECT_SERVER_REGISTER_BLOCKS_ON_START": "false",
    "PREFECT_SERVER_MEMOIZE_BLOCK_AUTO_REGISTRATION": "false",  # its check imports every collection
}


class EmbeddedServerError(RuntimeError):
    pass


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _database() -> Path | None:
    """The embedded API's sqlite file (Prefect's default, under PREFECT_HOME); None when a database URL is
    configured: then its migrations are Prefect's business alone."""
    names = ("PREFECT_SERVER_DATABASE_CONNECTION_URL", "PREFECT_API_DATABASE_CONNECTION_URL")
    if any(os.environ.get(n) or _profile().get(n) for n in names):
        return None
    return Path(os.environ.get("PREFECT_HOME", "~/.prefect")).expanduser() / "prefect.db"


def _setup_key(database: Path) -> dict[str, Any] | None:
    """What a migrated database was set up by: Prefect's version, the installed packages (a new collection
    brings block types; any install changes its site-packages folder) and the database's alembic revision.
    None while there is no migrated database."""
    from importlib.metadata import PackageNotFoundError, version

    if not database.is_file():
        return None
    try:
        with contextlib.closing(sqlite3.connect(f"{database.resolve().as_uri()}?mode=ro", uri=True, timeout=5)) as db:
            revision = [row[0] for row in db.execute("SELECT version_num FROM alembic_version")]
        prefect = version("prefect")
    except (sqlite3.Error, PackageNotFoundError):
        return None
    site = {p: os.stat(p).st_mtime_ns for p in sys.path if p.endswith(("site-packages", "dist-packages")) and
            os.path.isdir(p)}  # fmt: skip
    return {"prefect": prefect, "revision": revision, "site": site}


def _already_set_up(database: Path | None) -> bool:
    """The last full start left a stamp that still describes this database and these packages."""
    if database is None:
        return False
    try:
        stamp = json.loads((database.parent / STAMP).read_text())
    except (OSError, ValueError):
        return False
    return stamp == _setup_key(database)


class EmbeddedPrefectServer:
    """One uvicorn process serving Prefect's API on a free loopback port; `wait()` before first use."""

    def __init__(self) -> None:
        self.proc: subprocess.Popen | None = None
        self.port = 0
        self.ready = False
        self.database: Path | None = None  # set when this start migrates it: the stamp is written once it answers
        self._answered = threading.Event()  # /health answered and the first API request was served

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/api"

    def start(self) -> EmbeddedPrefectServer:
        """Launch (from the main thread: the death signal is tied to the thread that starts the child)."""
        spec = importlib.util.find_spec("prefect")  # finds the package without importing it (1-2 s)
        if spec is None or not spec.submodule_search_locations:
            raise EmbeddedServerError("Prefect is not installed")
        app_dir = Path(next(iter(spec.submodule_search_locations))).parent
        self.port = _free_port()
        cmd = [sys.executable, "-m", "uvicorn", "--app-dir", str(app_dir), "--factory",
               "prefect.server.api.server:create_app", "--host", "127.0.0.1", "--port", str(self.port),
               "--log-level", "error", "--lifespan", "on"]  # fmt: skip
        # What Prefect's SubprocessASGIServer sets: no UI, the ephemeral set of services.
        env = {**os.environ, "PREFECT_UI_ENABLED": "0", "PREFECT__SERVER_EPHEMERAL": "1", "PREFECT__SERVER_FINAL": "1"}
        database = _database()
        if _already_set_up(database):
            env = {**_SKIP_SETUP, **env}  # a setting the user gave wins
        else:
            self.database = database
        self.proc = subprocess.Popen(cmd, env=env, stdin=subprocess.DEVNULL, preexec_fn=die_with_parent())
        atexit.register(self.stop)
        threading.Thread(target=self._first_requests, args=(self.proc,), name="prefect-api-start", daemon=True).start()
        return self

    def _first_requests(self, proc: subprocess.Popen) -> None:
        """Poll /health, then send the request Prefect's client sends first (its version check): the server
        builds its routes then, while the CLI still imports, instead of on the flow's first call."""
        while proc.poll() is None:
            try:
                with urllib.request.urlopen(f"{self.api_url}/health", timeout=2) as response:
                    if response.status == 200:
                        break
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.1)
        else:
            return
        with contextlib.suppress(urllib.error.URLError, OSError):  # only a warm-up: the client asks again
            urllib.request.urlopen(f"{self.api_url}/admin/version", timeout=60).close()
        self._answered.set()

    def wait(self, timeout_s: float) -> None:
        """Block until the API answers (the database is created and migrated on a first run)."""
        if self.ready:
            return
        assert self.proc is not None
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self._answered.wait(0.05):
                self.ready = True
                self._stamp()
                return
            if self.proc.poll() is not None:
                raise EmbeddedServerError(
                    f"the embedded Prefect API server exited with status {self.proc.returncode} while starting "
                    f"(database under PREFECT_HOME={os.environ.get('PREFECT_HOME')}); its error is printed above"
                )
        raise EmbeddedServerError(
            f"the embedded Prefect API server did not answer within {timeout_s:.0f} s "
            "(PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS); a busy machine's first run creates its database"
        )

    def _stamp(self) -> None:
        """After a full start (migrations and block types done before the server answers): the next start
        on the same database and packages skips them."""
        key = _setup_key(self.database) if self.database is not None else None
        if key is not None:
            with contextlib.suppress(OSError):  # a read-only home: every start stays a full one
                atomic_write_text(self.database.parent / STAMP, json.dumps(key, sort_keys=True))

    def stop(self) -> None:
        if self.proc is not None:
            stop(self.proc, grace_s=5)  # what Prefect's own atexit stop allows
            self.proc = None


def _profile() -> dict[str, Any]:
    """The active Prefect profile's settings ({} without a profiles file or one that cannot be read)."""
    import tomllib

    home = Path(os.environ.get("PREFECT_HOME", "~/.prefect")).expanduser()
    profiles = Path(os.environ.get("PREFECT_PROFILES_PATH", home / "profiles.toml")).expanduser()
    try:
        if not profiles.is_file():
            return {}
        data = tomllib.loads(profiles.read_text())
        active = os.environ.get("PREFECT_PROFILE") or data.get("active", "ephemeral")
        found = data.get("profiles", {}).get(active, {})
    except (OSError, tomllib.TOMLDecodeError, AttributeError):
        return {}
    return found if isinstance(found, dict) else {}


def _api_url_configured() -> bool:
    """PREFECT_API_URL in the environment, the active Prefect profile, or a prefect.toml / pyproject.toml
    in the working directory: then that server is meant, not an embedded one."""
    import tomllib

    if os.environ.get("PREFECT_API_URL") or _profile().get("PREFECT_API_URL"):
        return True
    try:
        if Path("prefect.toml").is_file() and tomllib.loads(Path("prefect.toml").read_text()).get("api", {}).get("url"):
            return True
        if Path("pyproject.toml").is_file():
            tool = tomllib.loads(Path("pyproject.toml").read_text()).get("tool", {}).get("prefect", {})
            return bool(tool.get("api", {}).get("url"))
    except (OSError, tomllib.TOMLDecodeError, AttributeError):
        return False
    return False


def start_embedded_server() -> EmbeddedPrefectServer | None:
    """Start the server and point this process (and every child) at it, unless a Prefect server is
    configured or ephemeral mode is switched off. Call before Prefect is imported."""
    if _api_url_configured():
        return None
    if os.environ.get("PREFECT_SERVER_ALLOW_EPHEMERAL_MODE", "true").lower() in ("0", "false", "no", "off"):
        return None
    if "prefect" in sys.modules:  # its settings are read already; Prefect's own ephemeral server then
        return None
    server = EmbeddedPrefectServer().start()
    os.environ["PREFECT_API_URL"] = os.environ[MARKER] = server.api_url
    # Flow-run links point where `prefect server start` serves the same database, not at this process.
    os.environ.setdefault("PREFECT_UI_URL", "http://127.0.0.1:4200")
    return server


def embedded_api_in_use() -> bool:
    """This process's flows report to the API `start_embedded_server` started (not to a configured server)."""
    return bool(os.environ.get(MARKER)) and os.environ.get(MARKER) == os.environ.get("PREFECT_API_URL")


@contextlib.contextmanager
def flow_settings() -> Iterator[None]:
    """Prefect settings for the flows this process runs against the embedded API: no flow-run heartbeats
    (`flows.heartbeat_frequency` None, which the environment cannot express, only raise). Heartbeats let
    a server mark a flow whose process died as crashed; the embedded server dies with that process, so
    none would ever be read, while each flow's end waits up to a second for its heartbeat thread. Against
    a configured server nothing changes."""
    if not embedded_api_in_use():
        yield
        return
    from prefect.settings import PREFECT_FLOWS_HEARTBEAT_FREQUENCY, temporary_settings

    with temporary_settings(updates={PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None}):
        yield
