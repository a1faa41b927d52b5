"""The embedded Prefect API, started and owned by flowspeed so that it dies with it.

Without PREFECT_API_URL, Prefect starts its "ephemeral" API server as a child process on the first
client call and stops it from an atexit hook; a `kill -9` of flowspeed skips that hook and the server
lives on (250 MB and a port) until someone finds it. Prefect offers no way to pass a death signal to
that child, so flowspeed starts the same server itself (the same uvicorn command and ephemeral
settings: no UI, no background services, the database under PREFECT_HOME) with `PR_SET_PDEATHSIG`,
and points PREFECT_API_URL at it. Started before the heavy imports, it boots while torch loads.

FLOWSPEED_EMBEDDED_PREFECT_API names that URL, so code that treats the ephemeral API specially
(GPU slots: it never expires leases) can tell it from a real server. Nothing here imports Prefect.
"""

from __future__ import annotations

import atexit
import importlib.util
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from flowspeed.engines.common.lifetime import die_with_parent, stop

MARKER = "FLOWSPEED_EMBEDDED_PREFECT_API"


class EmbeddedServerError(RuntimeError):
    pass


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class EmbeddedPrefectServer:
    """One uvicorn process serving Prefect's API on a free loopback port; `wait()` before first use."""

    def __init__(self) -> None:
        self.proc: subprocess.Popen | None = None
        self.port = 0
        self.ready = False

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
        self.proc = subprocess.Popen(cmd, env=env, stdin=subprocess.DEVNULL, preexec_fn=die_with_parent())
        atexit.register(self.stop)
        return self

    def wait(self, timeout_s: float) -> None:
        """Block until the API answers /health (the database is created and migrated on a first run)."""
        if self.ready:
            return
        assert self.proc is not None
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise EmbeddedServerError(
                    f"the embedded Prefect API server exited with status {self.proc.returncode} while starting "
                    f"(database under PREFECT_HOME={os.environ.get('PREFECT_HOME')}); its error is printed above"
                )
            try:
                with urllib.request.urlopen(f"{self.api_url}/health", timeout=2) as response:
                    if response.status == 200:
                        self.ready = True
                        return
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.1)
        raise EmbeddedServerError(
            f"the embedded Prefect API server did not answer within {timeout_s:.0f} s "
            "(PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS); a busy machine's first run creates its database"
        )

    def stop(self) -> None:
        if self.proc is not None:
            stop(self.proc, grace_s=5)  # what Prefect's own atexit stop allows
            self.proc = None


def _api_url_configured() -> bool:
    """PREFECT_API_URL in the environment, the active Prefect profile, or a prefect.toml / pyproject.toml
    in the working directory: then that server is meant, not an embedded one."""
    import tomllib

    if os.environ.get("PREFECT_API_URL"):
        return True
    home = Path(os.environ.get("PREFECT_HOME", "~/.prefect")).expanduser()
    profiles = Path(os.environ.get("PREFECT_PROFILES_PATH", home / "profiles.toml")).expanduser()
    try:
        if profiles.is_file():
            data = tomllib.loads(profiles.read_text())
            active = os.environ.get("PREFECT_PROFILE") or data.get("active", "ephemeral")
            if data.get("profiles", {}).get(active, {}).get("PREFECT_API_URL"):
                return True
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
