"""MLflow tracking shared by the stages and the training ranks.

Only rank 0 talks to MLflow; other ranks get `NullTracker`. Per-step metrics are buffered and sent
with `log_batch`: one call per ~20 steps instead of one per scalar (1000 scalars one by one cost
~3.6 s on SQLite and ~14 s over HTTP, which would dominate a small training step).

A training run must outlive its tracking server: the rank-0 `Tracker` hands batches to a sender
thread, so a step never waits on HTTP. While the server is unreachable the batches stay queued and
are retried with backoff; when it returns they are delivered in order. Each metric keeps the
timestamp it was recorded with, and MLflow's SQL store drops a row identical in (key, timestamp,
step, value), so a batch whose reply was lost and is sent again is not stored twice. If the server
is still away when training ends (after `grace_s`), what is left goes to a JSONL file beside the
training output and `replay_undelivered` delivers it later (the train flow tries right away).
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections import deque
from pathlib import Path
from typing import Any

from mlflow import MlflowClient
from mlflow.entities import Metric, RunTag
from mlflow.exceptions import MlflowException

from configs import PipelineConfig

log = logging.getLogger(__name__)

UNDELIVERED_DIR = "mlflow-undelivered"


def tracking_uri(cfg: PipelineConfig) -> str:
    """Config beats MLFLOW_TRACKING_URI beats a SQLite store under the workdir."""
    if cfg.tracking.tracking_uri:
        return cfg.tracking.tracking_uri
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    return f"sqlite:///{(cfg.workdir / 'mlflow.db').resolve()}"


def ensure_experiment(client: MlflowClient, cfg: PipelineConfig) -> str:
    exp = client.get_experiment_by_name(cfg.tracking.experiment)
    if exp is not None:
        return exp.experiment_id
    artifacts = None
    if client.tracking_uri.startswith("sqlite:"):
        # A local store keeps its artifacts beside it, under the workdir, not in the cwd.
        artifacts = (cfg.workdir / "mlartifacts").resolve().as_uri()
    return client.create_experiment(cfg.tracking.experiment, artifact_location=artifacts)


def _refused(exc: MlflowException) -> bool:
    """A 4xx answer other than 429: the request itself is wrong, not the server away."""
    status = exc.get_http_status_code()
    return 400 <= status < 500 and status != 429


class Tracker:
    """Buffered, outage-tolerant logging into one existing MLflow run (see the module docstring)."""

    def __init__(
        self,
        uri: str,
        run_id: str,
        flush_every: int = 20,
        *,
        undelivered_dir: Path | None = None,
        grace_s: float = 300.0,
        max_backoff_s: float = 30.0,
    ) -> None:
        self.client = MlflowClient(uri)
        self.uri = uri
        self.run_id = run_id
        self.flush_every = flush_every
        self.undelivered_dir = undelivered_dir
        self.grace_s = grace_s
        self.max_backoff_s = max_backoff_s
        self._buffer: list[Metric] = []
        self._steps_since_flush = 0
        self._pending: deque[tuple[list[Metric], list[RunTag]]] = deque()
        self._cond = threading.Condition()
        self._closing = False
        self._current: list[tuple[list[Metric], list[RunTag]]] = []
        self._abandoned = False
        self._outage_since: float | None = None
        self.undelivered = 0
        self._sender = threading.Thread(target=self._send_loop, name=f"mlflow-sender-{run_id[:8]}", daemon=True)
        self._sender.start()

    # -- the training side: never blocks on the network --------------------------------------------
    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        ts = int(time.time() * 1000)
        self._buffer.extend(Metric(k, float(v), ts, step) for k, v in metrics.items())
        self._steps_since_flush += 1
        if self._steps_since_flush >= self.flush_every:
            self.flush()

    def flush(self) -> None:
        """Queue what is buffered (log_batch takes at most 1000 metrics per call)."""
        with self._cond:
            while self._buffer:
                chunk, self._buffer = self._buffer[:1000], self._buffer[1000:]
                self._pending.append((chunk, []))
            self._cond.notify_all()
        self._steps_since_flush = 0

    def set_tags(self, tags: dict[str, Any]) -> None:
        # Tag values are capped at 5000 characters by the stores.
        batch = [RunTag(k, str(v)[:5000]) for k, v in tags.items()]
        with self._cond:
            self._pending.append(([], batch))
            self._cond.notify_all()

    def log_artifacts(self, local: Path, artifact_path: str | None = None) -> None:
        """Synchronous, and skipped with a warning when the server is away: artifacts (profiles) are
        also on local disk, and a lost upload must not fail a finished training run."""
        try:
            if Path(local).is_dir():
                self.client.log_artifacts(self.run_id, str(local), artifact_path)
            else:
                self.client.log_artifact(self.run_id, str(local), artifact_path)
        except Exception as exc:  # noqa: BLE001 - any transport or server error
            log.warning("could not upload %s to MLflow run %s (%s); it stays at %s", local, self.run_id, exc, local)

    def close(self) -> int:
        """Deliver everything (waiting up to `grace_s` for an absent server); returns how many
        metrics and tags had to go to the undelivered file instead."""
        self.flush()
        deadline = time.monotonic() + self.grace_s
        with self._cond:
            self._closing = True
            self._cond.notify_all()
            while (self._pending or self._current) and time.monotonic() < deadline:
                self._cond.wait(timeout=min(1.0, max(0.0, deadline - time.monotonic())))
            # What is still queued, plus a batch hanging in HTTP retries (a copy: the stores dedupe).
            left = list(self._current) + list(self._pending)
            self._pending.clear()
            self._abandoned = bool(left)
            self._cond.notify_all()
        if left:
            self.undelivered = self._write_undelivered(left)
        return self.undelivered

    # -- the sender thread ---------------------------------------------------------------------------
    def _send_loop(self) -> None:
        backoff = 1.0
        while True:
            with self._cond:
                while not self._pending and not self._closing:
                    self._cond.wait()
                if not self._pending or self._abandoned:
                    return
                self._current = list(self._pending)
                self._pending.clear()
            try:
                while self._current:
                    metrics, tags = self._current[0]
                    try:
                        self.client.log_batch(self.run_id, metrics=metrics, tags=tags)
                    except MlflowException as exc:
                        if not _refused(exc):
                            raise
                        # The server answered "no" (deleted run, a value it rejects): resending cannot
                        # help, and holding the batch would stall everything queued behind it.
                        log.error("MLflow refused %d metrics/tags of run %s, dropped: %s",
                                  len(metrics) + len(tags), self.run_id, exc.message)  # fmt: skip
                    with self._cond:
                        self._current = self._current[1:]
                        self._cond.notify_all()
            except Exception as exc:  # noqa: BLE001 - connection refused, timeouts, 5xx: all "try later"
                with self._cond:
                    if self._abandoned:  # close() gave up and wrote these to the undelivered file
                        return
                    self._pending.extendleft(reversed(self._current))  # keep the order
                    self._current = []
                    if self._outage_since is None:
                        self._outage_since = time.monotonic()
                        log.warning("MLflow at %s unreachable (%s); buffering metrics and retrying", self.uri, exc)
                    self._cond.notify_all()
                    self._cond.wait(timeout=backoff)
                backoff = min(backoff * 2, self.max_backoff_s)
                continue
            backoff = 1.0
            if self._outage_since is not None:
                log.warning("MLflow is back after %.0f s; the buffered metrics are delivered",
                            time.monotonic() - self._outage_since)  # fmt: skip
                self._outage_since = None

    def _write_undelivered(self, left: list[tuple[list[Metric], list[RunTag]]]) -> int:
        rows = [{"metric": m.key, "value": m.value, "timestamp": m.timestamp, "step": m.step} for ms, _ in left
                for m in ms] + [{"tag": t.key, "value": t.value} for _, ts in left for t in ts]  # fmt: skip
        if self.undelivered_dir is None:
            log.error("MLflow unreachable at the end of run %s: %d metrics/tags lost (no undelivered_dir)",
                      self.run_id, len(rows))  # fmt: skip
            return len(rows)
        path = self.undelivered_dir / f"{self.run_id}.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a") as f:  # appends: a second outage in a resumed run adds to the first
            f.write("".join(json.dumps({"run_id": self.run_id, "uri": self.uri, **r}) + "\n" for r in rows))
            f.flush()
            os.fsync(f.fileno())
        log.error("MLflow at %s still unreachable after %.0f s: %d metrics/tags written to %s; "
                  "`flowspeed sync-metrics %s` delivers them", self.uri, self.grace_s, len(rows), path,
                  path.parent)  # fmt: skip
        return len(rows)


class NullTracker(Tracker):
    """What ranks other than 0 (and runs without tracking) get: every call is a no-op."""

    def __init__(self) -> None:
        self._buffer = []
        self.undelivered = 0

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        pass

    def flush(self) -> None:
        pass

    def set_tags(self, tags: dict[str, Any]) -> None:
        pass

    def log_artifacts(self, local: Path, artifact_path: str | None = None) -> None:
        pass

    def close(self) -> int:
        return 0


def make_tracker(
    uri: str | None,
    run_id: str | None,
    rank: int,
    flush_every: int = 20,
    *,
    undelivered_dir: Path | None = None,
    grace_s: float = 300.0,
) -> Tracker:
    if rank != 0 or not run_id or not uri:
        return NullTracker()
    return Tracker(uri, run_id, flush_every, undelivered_dir=undelivered_dir, grace_s=grace_s)


def replay_undelivered(folder: Path) -> tuple[int, int]:
    """Send what `Tracker.close` could not, file by file; a file is removed once all of it is in.
    Returns (rows delivered, rows still waiting). Safe to repeat: the SQL stores skip rows they have."""
    delivered = waiting = 0
    for path in sorted(Path(folder).glob("*.jsonl")):
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        if not rows:
            path.unlink()
            continue
        uri, run_id = rows[0]["uri"], rows[0]["run_id"]
        metrics = [Metric(r["metric"], r["value"], r["timestamp"], r["step"]) for r in rows if "metric" in r]
        tags = [RunTag(r["tag"], r["value"]) for r in rows if "tag" in r]
        client = MlflowClient(uri)
        try:
            for i in range(0, len(metrics), 1000):
                client.log_batch(run_id, metrics=metrics[i : i + 1000])
            for i in range(0, len(tags), 100):
                client.log_batch(run_id, tags=tags[i : i + 100])
        except Exception as exc:  # noqa: BLE001
            log.warning("MLflow at %s still unreachable (%s): %s kept for later", uri, exc, path)
            waiting += len(rows)
            continue
        path.unlink()
        delivered += len(rows)
    return delivered, waiting


def start_system_metrics(cfg: PipelineConfig, uri: str | None, run_id: str | None) -> Any:
    """MLflow's own system-metrics sampler (psutil; GPUs through nvidia-ml-py when it is installed),
    one per node: its local rank 0 samples, tagged `node<k>` when there are several nodes."""
    if not (cfg.tracking.system_metrics and uri and run_id) or int(os.environ.get("LOCAL_RANK", 0)) != 0:
        return None
    from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

    node = f"node{cfg.train.node_rank}" if cfg.train.nnodes > 1 else None
    monitor = SystemMetricsMonitor(
        run_id,
        sampling_interval=cfg.tracking.system_metrics_interval_s,
        resume_logging=True,  # a resumed run continues the system/* step count instead of overwriting it
        node_id=node,
        tracking_uri=uri,
    )
    monitor.start()
    return monitor


def stop_system_metrics(monitor: Any, timeout_s: float = 30.0) -> None:
    """Stop the sampler without letting a hanging final upload (server away) hold up the run's end."""
    if monitor is None:
        return

    def finish() -> None:
        monitor.finish()
        # MLflow's sampler drops the samples of its last, unfinished interval; a run shorter than one
        # interval would have none. Publish them (the sampler thread has ended: no race).
        try:
            last = monitor.aggregate_metrics()
            if last:
                monitor.publish_metrics(last)
                monitor.mlflow_logger.flush()
        except Exception as exc:  # noqa: BLE001 - a lost sample must not fail the run
            log.warning("could not log the last system metrics sample: %s", exc)

    stopper = threading.Thread(target=finish, name="system-metrics-stop", daemon=True)
    stopper.start()
    stopper.join(timeout_s)
