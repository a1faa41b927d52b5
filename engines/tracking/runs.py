"""The life of a stage's MLflow run around its work: a server checked before, closed or continued after a kill,
and what an outage at the end kept from it delivered later.

Three things went wrong without this:

- With MLFLOW_TRACKING_URI pointing at a stopped server, MLflow's client retried each request with
  exponential backoff for minutes, silently. `ready` probes the server first (seconds), and either
  fails with one paragraph or, with `tracking.server_wait_s`, waits with a message every few seconds;
  `bound_http_retries` caps what every later request may wait.
- A SIGKILLed flowspeed left its runs RUNNING forever. Each run carries its owner (host, pid, process
  start time) as tags; the next start in the experiment closes as KILLED the runs whose owner on this
  host is dead (the liveness check of `flowspeed.tasks.gpu_slot_holders`), never one whose owner still runs. A
  killed training's run is instead continued by the resume: the train stage records its run id in the
  training dir (`mlflow-run.json`), and `continue_train_run` reopens it, so a resumed training's steps
  stay on one step axis.
- The calls after the work (tags, dataset, artifacts, tables, the terminal status) failed a finished
  stage when the server was away. `flowspeed.tasks.tracking` now keeps what it could not send in a journal,
  `<workdir>/mlflow-undelivered/<run_id>.journal` (JSON lines, in order: the status comes last), and
  `sync_undelivered` delivers it: `flowspeed sync-metrics <workdir>`, or the next start in the workdir.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import psutil
from flowspeed.configs import PipelineConfig
from flowspeed.engines.common.io import atomic_write_text
from flowspeed.engines.common.processes import process_alive
from flowspeed.engines.tracking.tracker import UNDELIVERED_DIR, _refused, replay_undelivered, tracking_uri
from mlflow import MlflowClient
from mlflow.entities import Dataset, DatasetInput, InputTag, Metric, RunTag
from mlflow.exceptions import MlflowException

RUN_RECORD = "mlflow-run.json"
JOURNAL_SUFFIX = ".journal"
OWNER_HOST, OWNER_PID, OWNER_STARTED = "flowspeed.owner.host", "flowspeed.owner.pid", "flowspeed.owner.started"
RESUMES = "flowspeed.resumes"
# A stage whose result came from Prefect's cache did no work in this run: it says so, and which run did it.
PRODUCER_RECORD = "mlflow-producer.json"
REUSED, REUSED_FROM = "flowspeed.reused", "flowspeed.reused_from_run"

# What one MLflow HTTP request may cost at most, unless the environment says otherwise: MLflow's
# defaults (7 retries, backoff factor 2, 120 s timeout) let one call to a stopped server take minutes.
HTTP_BOUNDS = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "30",
}
PROBE_TIMEOUT_S = 5.0
WAIT_MESSAGE_EVERY_S = 5.0

_away: set[str] = set()  # servers a call found unreachable since their last good probe
_swept: set[tuple[str, str]] = set()  # (uri, workdir) whose journal and dead runs this process handled
_warned: set[str] = set()


class TrackingServerUnreachable(RuntimeError):
    """The configured MLflow server does not answer; the message says how to fix that."""


def say(message: str) -> None:
    """To the terminal (above any progress bars) whatever the log level: Prefect's console handler is
    quiet by default, and these are messages a user must see."""
    sys.stderr.write(message.rstrip() + "\n")
    sys.stderr.flush()


def bound_http_retries() -> None:
    """Cap MLflow's HTTP retries for this process and the training ranks it starts (they inherit it)."""
    for key, value in HTTP_BOUNDS.items():
        os.environ.setdefault(key, value)


def is_transport_error(exc: BaseException) -> bool:
    """Server away (refused, reset, timed out, 5xx, 429): worth keeping for later. A 4xx refusal is not:
    sending it again would be refused again."""
    if isinstance(exc, MlflowException):
        return not _refused(exc)
    if isinstance(exc, FileNotFoundError):  # a local file that is gone: not the server
        return False
    import requests

    return isinstance(exc, requests.RequestException | ConnectionError | TimeoutError | OSError)


def mark_away(uri: str) -> None:
    _away.add(uri)


def is_away(uri: str) -> bool:
    """A call found this server unreachable and a quick probe says it still is: the rest of the stage's
    calls go to the journal at once instead of each waiting out its retries."""
    if uri not in _away:
        return False
    if probe(uri, timeout=2.0) is None:
        _away.discard(uri)
        return False
    return True


def flush_run_journal(cfg: PipelineConfig, run_id: str) -> bool:
    """Before a run's terminal status: deliver what an outage earlier in the stage kept back for it, so
    a short outage heals by the stage's end. True when nothing of the run is left waiting."""
    path = journal_dir(cfg) / f"{run_id}{JOURNAL_SUFFIX}"
    if not path.is_file():
        return True
    if is_away(tracking_uri(cfg)):
        return False
    delivered, waiting = replay_journal(path.parent, only=path.name)
    if delivered and not waiting:
        say(f"MLflow is back: the {delivered} record(s) of run {run_id} kept during the outage are delivered")
    return waiting == 0


# -- the server before a stage ---------------------------------------------------------------------------
def probe(uri: str, timeout: float = PROBE_TIMEOUT_S) -> str | None:
    """None when the tracking server answers (any HTTP answer below 500, even 401/404: someone is
    there), else why not. Local stores (sqlite, file) need no probe."""
    if not uri.startswith(("http://", "https://")):
        return None
    url = uri.rstrip("/") + "/health"
    try:
        with urllib.request.urlopen(url, timeout=timeout):
            return None
    except urllib.error.HTTPError as exc:
        return None if exc.code < 500 else f"HTTP {exc.code} from {url}"
    except (OSError, ValueError) as exc:  # refused, unresolvable, timed out
        reason = getattr(exc, "reason", exc)
        return f"{type(reason).__name__}: {reason}" if not isinstance(reason, str) else reason


def unreachable_message(uri: str, why: str, waited_s: float) -> str:
    waited = f" (waited {waited_s:.0f} s)" if waited_s else ""
    return (
        f"the MLflow tracking server at {uri} is unreachable{waited}: {why}. Start it (e.g. `mlflow server "
        f"--host 127.0.0.1 --port {_port(uri)} --backend-store-uri sqlite:///mlflow.db`), fix "
        "tracking.tracking_uri / MLFLOW_TRACKING_URI, or unset MLFLOW_TRACKING_URI to track into the local "
        "SQLite store under the workdir. To wait for a server that is restarting, set tracking.server_wait_s."
    )


def _port(uri: str) -> str:
    from urllib.parse import urlparse

    parsed = urlparse(uri)
    return str(parsed.port or (443 if parsed.scheme == "https" else 5000))


def wait_for_server(uri: str, wait_s: float) -> None:
    """Probe; if the server is away, fail at once (wait_s 0) or probe again every second, saying so
    every few seconds, for up to wait_s. Sleeps in the calling thread in short slices, so Ctrl-C and
    SIGTERM end the wait."""
    why = probe(uri)
    if why is None:
        _away.discard(uri)
        return
    start = last_said = time.monotonic()
    if wait_s > 0:
        say(f"waiting up to {wait_s:.0f} s for the MLflow tracking server at {uri} ({why})")
    while wait_s > 0 and time.monotonic() - start < wait_s:
        time.sleep(min(1.0, max(0.0, wait_s - (time.monotonic() - start))))
        why = probe(uri, timeout=min(PROBE_TIMEOUT_S, 2.0))
        if why is None:
            say(f"the MLflow tracking server at {uri} answers after {time.monotonic() - start:.0f} s")
            _away.discard(uri)
            return
        if time.monotonic() - last_said >= WAIT_MESSAGE_EVERY_S:
            last_said = time.monotonic()
            say(f"still waiting for the MLflow tracking server at {uri}: {time.monotonic() - start:.0f} of "
                f"{wait_s:.0f} s ({why}); Ctrl-C to stop")  # fmt: skip
    raise TrackingServerUnreachable(unreachable_message(uri, why, time.monotonic() - start if wait_s else 0.0))


def ready(cfg: PipelineConfig) -> None:
    """Before a stage opens its run: bounded HTTP, a server that answers, and, once per process and
    workdir, last outages' journal delivered and runs of dead flowspeed processes closed."""
    bound_http_retries()
    uri = tracking_uri(cfg)
    wait_for_server(uri, cfg.tracking.server_wait_s)
    key = (uri, str(cfg.workdir.resolve()))
    if key in _swept:
        return
    _swept.add(key)
    delivered, waiting = sync_undelivered(cfg.workdir)
    if delivered or waiting:
        say(f"MLflow records kept during an earlier outage: {delivered} delivered now, {waiting} still waiting")
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(cfg.experiment)
    if exp is not None:
        close_dead_runs(client, exp.experiment_id, skip=pending_runs(cfg.workdir))


# -- owners: who keeps a run open ------------------------------------------------------------------------
def owner_tags() -> dict[str, str]:
    """This process as the run's owner: host, pid and start time (a reused pid is not the owner)."""
    return {
        OWNER_HOST: socket.gethostname(),
        OWNER_PID: str(os.getpid()),
        OWNER_STARTED: repr(psutil.Process().create_time()),
    }


def owner_alive(tags: dict[str, str]) -> bool:
    """Dead only when provably so: on this host, and the pid gone or now another process. A run without
    owner tags (older flowspeed, another tool) or owned elsewhere counts as alive."""
    try:
        host, pid, started = tags[OWNER_HOST], int(tags[OWNER_PID]), float(tags[OWNER_STARTED])
    except (KeyError, ValueError):
        return True
    return process_alive(host, pid, started)


def close_dead_runs(client: MlflowClient, experiment_id: str, skip: set[str] = frozenset()) -> list[str]:
    """Close as KILLED the experiment's RUNNING runs owned by dead processes on this host."""
    host = socket.gethostname().replace("'", "")
    query = f"attributes.status = 'RUNNING' and tags.`{OWNER_HOST}` = '{host}'"
    closed = []
    for run in client.search_runs([experiment_id], query, max_results=1000):
        rid = run.info.run_id
        if rid in skip or owner_alive(run.data.tags):
            continue
        note = (f"closed as KILLED by flowspeed pid {os.getpid()}: its owner, pid {run.data.tags[OWNER_PID]} on "
                f"{host}, is gone (killed)")  # fmt: skip
        client.set_tag(rid, "flowspeed.closed_because", note)
        client.set_terminated(rid, "KILLED")
        closed.append(f"{rid[:8]} ({run.data.tags.get('flowspeed.stage', '?')})")
    if closed:
        say(f"closed {len(closed)} MLflow run(s) left RUNNING by a killed flowspeed as KILLED: {', '.join(closed)}")
    return [c.split()[0] for c in closed]


# -- a killed training's run, continued ---------------------------------------------------------------------
def record_train_run(train_dir: Path, uri: str, run_id: str) -> None:
    """Beside the checkpoints: which run this training logs to, and who runs it (temp file + rename)."""
    train_dir.mkdir(parents=True, exist_ok=True)
    rec = {"run_id": run_id, "uri": uri, **owner_tags()}
    tmp = train_dir / f".{RUN_RECORD}.{os.getpid()}.tmp"
    tmp.write_text(json.dumps(rec, indent=2))
    os.replace(tmp, train_dir / RUN_RECORD)


def continue_train_run(
    cfg: PipelineConfig, train_dir: Path, parent_run_id: str | None, flow_tags: dict[str, str]
) -> str | None:
    """The recorded run of a training that was killed (checkpoints, no `final/`), reopened as RUNNING,
    nested under this pipeline and counted in `flowspeed.resumes`; None when there is none to continue:
    no record, another server, a finished run, a live owner (another flowspeed trains here), a deleted run."""
    path = train_dir / RUN_RECORD
    try:
        rec = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    uri = tracking_uri(cfg)
    if rec.get("uri") != uri or (train_dir / "final").exists():  # finished: a rerun never imports torch here
        return None
    from flowspeed.engines.torch_engine.checkpoint import list_checkpoints

    if not list_checkpoints(train_dir):
        return None
    if owner_alive(rec):
        return None
    client = MlflowClient(uri)
    try:
        run = client.get_run(rec["run_id"])
    except MlflowException as exc:
        if is_transport_error(exc):
            raise
        return None  # gone from the store: a new run
    exp = client.get_experiment_by_name(cfg.experiment)
    if (run.info.lifecycle_stage != "active" or run.info.status == "FINISHED"
            or exp is None or run.info.experiment_id != exp.experiment_id):  # fmt: skip
        return None
    resumes = int(run.data.tags.get(RESUMES, "0") or 0) + 1
    tags = {**flow_tags, **owner_tags(), RESUMES: str(resumes)}
    if parent_run_id:
        tags["mlflow.parentRunId"] = parent_run_id
    client.log_batch(run.info.run_id, tags=[RunTag(k, v) for k, v in tags.items()])
    client.update_run(run.info.run_id, status="RUNNING")
    say(f"continuing MLflow run {run.info.run_id} of the interrupted training (resume {resumes}; it was "
        f"{run.info.status})")  # fmt: skip
    return run.info.run_id


# -- reuse: which run made a cached stage result ---------------------------------------------------------------
def record_producer(folder: Path, run_id: str, digest: str) -> None:
    """Beside a stage's outputs: the MLflow run that made them, and the digest of the file that identifies them
    (samples.jsonl, metrics.json). Kept out of the cached result: Prefect's cache key and stored result stay
    what they were, and a rerun that reuses them can still name the run that did the work."""
    atomic_write_text(folder / PRODUCER_RECORD, json.dumps({"run_id": run_id, "digest": digest}))


def producer_of(folder: Path, digest: str | None) -> str | None:
    """The run `record_producer` named for these outputs; None when unknown (older outputs, or the file
    rewritten since by a run outside a stage flow)."""
    try:
        rec = json.loads((folder / PRODUCER_RECORD).read_text())
    except (OSError, ValueError):
        return None
    return rec.get("run_id") if digest and rec.get("digest") == digest else None


def reuse_tags(folder: Path, run_id: str, digest: str | None, cache_hit: bool) -> tuple[dict[str, str], str | None]:
    """(tags, the producing run) for a stage run: a stage that did the work records itself as the producer; a
    reused one is tagged `flowspeed.reused=true` and `flowspeed.reused_from_run=<the run that did it>`."""
    if not cache_hit:
        if digest:
            record_producer(folder, run_id, digest)
        return {REUSED: "false"}, None
    source = producer_of(folder, digest)
    return {REUSED: "true", REUSED_FROM: source or "unknown (made before flowspeed recorded it)"}, source


def parent_of(uri: str, run_id: str | None) -> str | None:
    """The pipeline run a stage run is nested under (its `mlflow.parentRunId`); None when it has none or the
    server cannot say now (a rerun is never failed for a label)."""
    if not run_id or is_away(uri):
        return None
    try:
        return MlflowClient(uri).get_run(run_id).data.tags.get("mlflow.parentRunId")
    except Exception:  # noqa: BLE001 - away, or a deleted run: the tag falls back to the stage run
        return None


# -- the journal of what an outage kept back ------------------------------------------------------------------
def journal_dir(cfg: PipelineConfig) -> Path:
    return cfg.workdir / UNDELIVERED_DIR


def journal(cfg: PipelineConfig, run_id: str, rows: list[dict[str, Any]], exc: BaseException) -> None:
    """Append rows for later delivery (fsynced: they are the only record), and say once per run where
    they are and what delivers them."""
    uri = tracking_uri(cfg)
    folder = journal_dir(cfg)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{run_id}{JOURNAL_SUFFIX}"
    with open(path, "a") as f:
        f.write("".join(json.dumps({"run_id": run_id, "uri": uri, **r}, default=str) + "\n" for r in rows))
        f.flush()
        os.fsync(f.fileno())
    mark_away(uri)
    if run_id not in _warned:
        _warned.add(run_id)
        say(f"warning: MLflow at {uri} is unreachable ({_short(exc)}); what run {run_id} could not record "
            f"(tags, artifacts, its final status) is kept in {path}. `{sync_command(cfg, folder)}` "
            "delivers it once the server is back (so does the next flowspeed start in this workdir).")  # fmt: skip


def _short(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return text[:200]


def sync_command(cfg: PipelineConfig, folder: Path) -> str:
    """`flowspeed sync-metrics <workdir>` covers the workdir's journal and its training dirs; a
    training dir elsewhere (train.output_dir) is named itself."""
    inside = folder.resolve().is_relative_to(cfg.workdir.resolve())
    return f"flowspeed sync-metrics {cfg.workdir if inside else folder}"


def deliver_training_metrics(cfg: PipelineConfig, folder: Path) -> None:
    """After training: send what the tracker wrote to `folder` during an outage, if the server is back;
    otherwise say once where it waits (the tracker's own message goes to the log, not the terminal)."""
    if not any(Path(folder).glob("*.jsonl")):
        return
    uri = tracking_uri(cfg)
    why = probe(uri)
    if why is not None:
        mark_away(uri)
        say(f"warning: MLflow at {uri} is unreachable ({why}); the training metrics it missed are kept in "
            f"{folder}. `{sync_command(cfg, folder)}` delivers them once the server is back.")  # fmt: skip
        return
    delivered, waiting = replay_undelivered(folder)
    if delivered or waiting:
        say(
            f"training metrics kept during an MLflow outage: {delivered} delivered now, {waiting} still waiting"
            + (f" (`{sync_command(cfg, folder)}` sends them later)" if waiting else "")
        )


def pending_runs(workdir: Path) -> set[str]:
    """Runs with journal rows still waiting: their status is on its way, not for the reaper to decide."""
    return {p.name.removesuffix(JOURNAL_SUFFIX) for p in (workdir / UNDELIVERED_DIR).glob(f"*{JOURNAL_SUFFIX}")}


def _deliver(client: MlflowClient, run_id: str, row: dict[str, Any]) -> None:
    kind = row["kind"]
    if kind == "tag":
        client.log_batch(run_id, tags=[RunTag(row["key"], row["value"])])
    elif kind == "metric":
        client.log_batch(run_id, metrics=[Metric(row["key"], row["value"], row["timestamp"], row["step"])])
    elif kind == "artifact":
        local = Path(row["path"])
        if local.is_dir():
            client.log_artifacts(run_id, str(local), row.get("artifact_path"))
        elif local.is_file():
            client.log_artifact(run_id, str(local), row.get("artifact_path"))
        else:
            say(f"warning: {local} is gone; it cannot be uploaded to MLflow run {run_id}")
    elif kind == "table":
        client.log_table(run_id, data=row["data"], artifact_file=row["artifact_file"])
    elif kind == "dataset":
        ds = DatasetInput(Dataset(**row["dataset"]), tags=[InputTag("mlflow.data.context", row["context"])])
        client.log_inputs(run_id, datasets=[ds])
    elif kind == "status":
        client.set_terminated(run_id, row["status"], end_time=row.get("end_time"))
    else:
        say(f"warning: unknown journal row kind {kind!r} for run {run_id}, skipped")


def replay_journal(folder: Path, only: str | None = None) -> tuple[int, int]:
    """Deliver journal files in order; a file goes once all of it is in, and on an outage what is left
    of it stays (rewritten by temp + rename). A row the server refuses (4xx: deleted run) is dropped
    with a message. Returns (rows delivered, rows still waiting); `only`: one file name."""
    delivered = waiting = 0
    for path in sorted(Path(folder).glob(only or f"*{JOURNAL_SUFFIX}")):
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        done = 0
        try:
            for row in rows:
                client = MlflowClient(row["uri"])
                try:
                    _deliver(client, row["run_id"], row)
                except MlflowException as exc:
                    if is_transport_error(exc):
                        raise
                    say(f"warning: MLflow refused a {row['kind']} of run {row['run_id']}, dropped: {exc.message}")
                done += 1
        except Exception as exc:  # noqa: BLE001 - transport errors: keep the rest for later
            if not is_transport_error(exc):
                raise
            left = rows[done:]
            tmp = path.with_suffix(".tmp")
            tmp.write_text("".join(json.dumps(r) + "\n" for r in left))
            os.replace(tmp, path)
            say(f"MLflow still unreachable ({_short(exc)}): {len(left)} records kept in {path}")
            delivered += done
            waiting += len(left)
            continue
        path.unlink()
        delivered += done
    return delivered, waiting


def sync_undelivered(path: Path) -> tuple[int, int]:
    """Everything an outage kept back under `path` (a workdir, a training dir or an mlflow-undelivered
    folder): the stages' journals and the training metrics `flowspeed.engines.tracking.tracker` wrote. What
    `flowspeed sync-metrics` runs."""
    bound_http_retries()  # a server still away: a few seconds per file, not minutes
    path = Path(path)
    if path.name == UNDELIVERED_DIR:
        folders = [path]
    else:  # the workdir's own, a training dir's (train/<family>-<digest>/), a champion finetune's (its from-*/)
        patterns = (UNDELIVERED_DIR, *(f"{'*/' * depth}{UNDELIVERED_DIR}" for depth in (1, 2, 3)))
        folders = sorted({p for pat in patterns for p in path.glob(pat) if p.is_dir()})
    delivered = waiting = 0
    for folder in folders:
        # Training metrics first: a journal's last row may close the run they belong to.
        d, w = replay_undelivered(folder)
        d2, w2 = replay_journal(folder)
        delivered, waiting = delivered + d + d2, waiting + w + w2
    return delivered, waiting
