"""Real team-mode servers for tests, configured as the README's "Team mode" commands: PostgreSQL
databases owned by a dedicated role with a password, an MLflow tracking server running the
basic-auth app and a Prefect server requiring an API auth string, each on a free loopback port,
started and stopped by the fixtures that use them.

Secrets travel the way the README says: the servers' database password through libpq's password
file (MLflow) and PREFECT_SERVER_DATABASE_PASSWORD (Prefect), never inside a URL or on a command
line; the clients' credentials through MLFLOW_TRACKING_USERNAME/PASSWORD and PREFECT_API_AUTH_STRING.

Where no PostgreSQL answers on 127.0.0.1:5432 (a laptop), the tests that need it skip with that
reason; the project's machines and CI run one with trust auth for user postgres (the fixtures'
administration account). Trust auth also means that server does not check the role's password:
the tests prove that every client authenticates to MLflow and Prefect, and that the servers run as
the dedicated role; a password-checking PostgreSQL would also check the password the same
settings carry.
"""

from __future__ import annotations

import base64
import configparser
import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

PG = {"host": "127.0.0.1", "port": 5432, "user": "postgres"}
BIN = Path(sys.executable).parent
REPO = Path(__file__).resolve().parents[1]
MLFLOW_AUTH_TEMPLATE = REPO / "deploy" / "mlflow-basic-auth.ini"


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


@dataclass(frozen=True)
class Role:
    """A PostgreSQL login role with a password, as a team's servers would use (not the superuser)."""

    name: str
    password: str


@contextmanager
def db_role(prefix: str) -> Iterator[Role]:
    """A fresh login role with a random password, dropped afterwards (after its databases)."""
    role = Role(f"{prefix}_{uuid.uuid4().hex[:10]}", secrets.token_urlsafe(18))
    with _created(f"CREATE ROLE \"{role.name}\" LOGIN PASSWORD '{role.password}'",
                  f'DROP ROLE IF EXISTS "{role.name}"'):  # fmt: skip
        yield role


@contextmanager
def database(prefix: str, owner: Role | None = None) -> Iterator[str]:
    """A fresh, uniquely named database (owned by `owner`), dropped afterwards (even after a failure)."""
    name = f"{prefix}_{uuid.uuid4().hex[:10]}"
    with _created(f'CREATE DATABASE "{name}"' + (f' OWNER "{owner.name}"' if owner else ""),
                  f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'):  # fmt: skip
        yield name


@contextmanager
def _created(create: str, drop: str) -> Iterator[None]:
    """Run `create` as the admin, and `drop` afterwards, even after a failure."""
    conn = _admin()
    with conn.cursor() as cur:
        cur.execute(create)
    try:
        yield
    finally:
        with conn.cursor() as cur:
            cur.execute(drop)
        conn.close()


def connected_roles(db: str) -> set[str]:
    """Which roles hold connections to a database now (the servers keep pooled connections open)."""
    conn = _admin()
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT DISTINCT usename FROM pg_stat_activity WHERE datname = %s", (db,))
            return {row[0] for row in cur.fetchall()}
    finally:
        conn.close()


def wait_http(url: str, proc: subprocess.Popen, log: Path, timeout: float = 180) -> None:
    """Until the server answers its health route (unauthenticated by design on both servers)."""
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


def http_status(url: str, data: bytes | None = None, headers: dict[str, str] | None = None) -> int:
    """The HTTP status of one request (a 4xx is an answer here, not an error)."""
    request = urllib.request.Request(url, data=data, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=30) as resp:
            return resp.status
    except urllib.error.HTTPError as exc:
        return exc.code


def basic_auth(user_colon_password: str) -> str:
    """The Authorization header value both servers accept (MLflow: user:password; Prefect: its string)."""
    return "Basic " + base64.b64encode(user_colon_password.encode()).decode()


class Server:
    """One server process; `stop()` and `start()` again on the same port (an outage and its end)."""

    def __init__(self, name: str, argv: list[str], env: dict[str, str], health: str, folder: Path) -> None:
        self.name, self.argv, self.env, self.health = name, argv, env, health
        self.log = folder / f"{name}.log"
        self.proc: subprocess.Popen | None = None
        self.url = health.split("/", 3)[0] + "//" + health.split("/", 3)[2]

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
    """This environment without any MLflow/Prefect setting (nor libpq's), so a test states them all."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_", "PG"))}
    env |= {"PREFECT_HOME": str(folder / "prefect-home"), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}  # fmt: skip
    return env


@dataclass(frozen=True)
class Secrets:
    """What a team's servers and clients share, generated per test module. Client env: `client_env`."""

    mlflow_admin_password: str
    mlflow_user: str
    mlflow_password: str
    prefect_auth_string: str

    @classmethod
    def generate(cls) -> Secrets:
        return cls(secrets.token_urlsafe(18), "flowspeed-ci", secrets.token_urlsafe(18),
                   f"flowspeed:{secrets.token_urlsafe(18)}")  # fmt: skip

    def client_env(self) -> dict[str, str]:
        return {"MLFLOW_TRACKING_USERNAME": self.mlflow_user, "MLFLOW_TRACKING_PASSWORD": self.mlflow_password,
                "PREFECT_API_AUTH_STRING": self.prefect_auth_string}  # fmt: skip

    def values(self) -> list[str]:
        """Every secret, to check that none is ever printed or stored."""
        return [self.mlflow_admin_password, self.mlflow_password, self.prefect_auth_string,
                self.prefect_auth_string.split(":", 1)[1]]  # fmt: skip


def _pgpass(folder: Path, role: Role) -> Path:
    """libpq's password file (mode 0600, or libpq ignores it): the MLflow server's database password."""
    path = folder / "pgpass"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as out:
        out.write(f"{PG['host']}:{PG['port']}:*:{role.name}:{role.password}\n")
    return path


def _auth_ini(folder: Path, auth_db: str, role: Role) -> Path:
    """deploy/mlflow-basic-auth.ini with the test's auth database: the README's file, not a copy of it.

    Unless that file sets it, the server also caches a verified credential for ten minutes (MLflow's
    `auth_cache_ttl_seconds`, off by default): without it every request re-runs werkzeug's scrypt
    password check, 0.2-0.7 s of CPU on a 2-core CI machine, and one pipeline run makes hundreds of
    requests with the same account. A wrong or missing password is never a cache hit (the key is the
    user and an HMAC of the password), so the 401 checks still reach the password store."""
    config = configparser.ConfigParser()
    config.read(MLFLOW_AUTH_TEMPLATE)
    config["mlflow"]["database_uri"] = f"postgresql+psycopg2://{role.name}@{PG['host']}:{PG['port']}/{auth_db}"
    config["mlflow"].setdefault("auth_cache_ttl_seconds", "600")
    path = folder / "mlflow-basic-auth.ini"
    with open(path, "w") as out:
        config.write(out)
    return path


def mlflow_server(folder: Path, db: str, auth_db: str, role: Role, keys: Secrets, port: int | None = None) -> Server:
    """`mlflow server --app-name basic-auth` on PostgreSQL as the README starts it (on loopback)."""
    port = port or free_port()
    argv = [str(BIN / "mlflow"), "server", "--app-name", "basic-auth", "--host", "127.0.0.1", "--port", str(port),
            "--workers", "1",
            "--backend-store-uri", f"postgresql+psycopg2://{role.name}@{PG['host']}:{PG['port']}/{db}",
            "--artifacts-destination", str(folder / "mlflow-artifacts")]  # fmt: skip
    env = base_env(folder) | {
        "MLFLOW_AUTH_CONFIG_PATH": str(_auth_ini(folder, auth_db, role)),
        "MLFLOW_AUTH_ADMIN_PASSWORD": keys.mlflow_admin_password,
        "MLFLOW_FLASK_SERVER_SECRET_KEY": secrets.token_hex(16),
        "PGPASSFILE": str(_pgpass(folder, role)),
        # MLflow's job runner (GenAI scorers, trace roll-ups: nothing flowspeed calls) is 8 more processes that
        # each import MLflow, ~10 s of CPU at every start on a 2-core machine; tests/faults' server has it off too.
        "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
    }
    return Server("mlflow", argv, env, f"http://127.0.0.1:{port}/health", folder)


def create_mlflow_user(server: Server, keys: Secrets) -> None:
    """The account flowspeed uses (not the admin), created by the admin through the auth app's REST API."""
    body = json.dumps({"username": keys.mlflow_user, "password": keys.mlflow_password}).encode()
    headers = {"Authorization": basic_auth(f"admin:{keys.mlflow_admin_password}"), "Content-Type": "application/json"}
    status = http_status(f"{server.url}/api/2.0/mlflow/users/create", body, headers)
    assert status == 200, f"creating the MLflow user {keys.mlflow_user}: HTTP {status} (see {server.log})"


def prefect_server(folder: Path, db: str, role: Role, keys: Secrets, port: int | None = None) -> Server:
    """`prefect server start` on PostgreSQL with an API auth string, as the README starts it (on loopback)."""
    port = port or free_port()
    env = base_env(folder) | {
        "PREFECT_SERVER_DATABASE_DRIVER": "postgresql+asyncpg",
        "PREFECT_SERVER_DATABASE_HOST": PG["host"],
        "PREFECT_SERVER_DATABASE_PORT": str(PG["port"]),
        "PREFECT_SERVER_DATABASE_USER": role.name,
        "PREFECT_SERVER_DATABASE_PASSWORD": role.password,
        "PREFECT_SERVER_DATABASE_NAME": db,
        "PREFECT_SERVER_API_AUTH_STRING": keys.prefect_auth_string,
        "PREFECT_API_URL": f"http://127.0.0.1:{port}/api",
        "PREFECT_API_AUTH_STRING": keys.prefect_auth_string,  # the server's own CLI talks to its API
    }
    argv = [str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)]
    return Server("prefect", argv, env, f"http://127.0.0.1:{port}/api/health", folder)


#: A `render` expression: the DOM, then a comment listing the images the browser has loaded and decoded
#: (`naturalWidth` > 0): an <img> in the DOM whose file failed or is still on its way is not listed.
DOM_AND_LOADED_IMAGES = (
    "document.documentElement.outerHTML + '<!-- loaded images: ' + [...document.images]"
    ".filter(i => i.complete && i.naturalWidth > 0).map(i => i.src).join(' ') + ' -->'"
)


def render(
    url: str,
    until: Callable[[str], bool],
    headers: dict[str, str] | None = None,
    timeout: float = 90,
    *,
    expression: str = "document.documentElement.outerHTML",
    screenshot: Path | None = None,
    size: tuple[int, int] = (1280, 1600),
) -> str:
    """The DOM of a single-page app once `until(dom)` holds (or at `timeout`), in headless Chromium
    driven over the DevTools protocol, which is what lets a test log in: `headers` go with every
    request the page makes. That is how both UIs authenticate: MLflow's with the basic-auth header a
    browser sends after its login prompt, Prefect's with the header its login form makes the UI add
    (`Authorization: Basic base64(auth string)`).

    `expression` (JavaScript) is what is polled and handed to `until` (default: the DOM; see
    `DOM_AND_LOADED_IMAGES`); `screenshot`: a PNG of the page at that moment; `size`: the window, tall
    enough that lazily drawn parts (MLflow's charts) are in view."""
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("needs Debian's chromium (apt-get install chromium); .ci/run installs it")
    from websockets.sync.client import connect

    profile = tempfile.mkdtemp(prefix="flowspeed-chromium-")
    proc = subprocess.Popen([chromium, "--headless", "--no-sandbox", "--disable-gpu", "--remote-debugging-port=0",
                             f"--user-data-dir={profile}", "about:blank"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)  # fmt: skip
    try:
        port_file, deadline = Path(profile) / "DevToolsActivePort", time.monotonic() + 60
        while not port_file.exists() or not port_file.read_text().strip():
            assert proc.poll() is None and time.monotonic() < deadline, "chromium did not open its DevTools port"
            time.sleep(0.2)
        port = port_file.read_text().split()[0]
        while True:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=10) as resp:
                pages = [t for t in json.load(resp) if t["type"] == "page"]
            if pages:
                break
            assert time.monotonic() < deadline, "chromium opened no page"
            time.sleep(0.2)
        with connect(pages[0]["webSocketDebuggerUrl"], max_size=None, open_timeout=30) as ws:
            counter = iter(range(1, 1_000_000))

            def call(method: str, **params: object) -> dict:
                msg_id = next(counter)
                ws.send(json.dumps({"id": msg_id, "method": method, "params": params}))
                while True:
                    msg = json.loads(ws.recv(timeout=60))
                    if msg.get("id") == msg_id:
                        assert "error" not in msg, f"{method}: {msg['error']}"
                        return msg.get("result", {})

            call("Network.enable")
            width, height = size
            call("Emulation.setDeviceMetricsOverride", width=width, height=height, deviceScaleFactor=1, mobile=False)
            if headers:
                call("Network.setExtraHTTPHeaders", headers=headers)
            call("Page.navigate", url=url)
            deadline = time.monotonic() + timeout
            while True:
                # Mid-navigation the old document is gone and the new one not there yet: no value.
                got = call("Runtime.evaluate", expression=expression, returnByValue=True)
                dom = got.get("result", {}).get("value") or ""
                if until(dom) or time.monotonic() > deadline:
                    if screenshot is not None:
                        png = call("Page.captureScreenshot", format="png")["data"]
                        screenshot.parent.mkdir(parents=True, exist_ok=True)
                        screenshot.write_bytes(base64.b64decode(png))
                    return dom
                time.sleep(0.5)
    finally:
        os.killpg(proc.pid, 9)
        proc.wait()
        shutil.rmtree(profile, ignore_errors=True)
