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

A run can also be killed (SIGKILL: no `close`). So before a checkpoint is published the trainer calls
`persist`: every metric logged so far is delivered, or (server slow or away: the wait is short and
bounded) appended and fsync'ed to that same file, and stays queued too. What a checkpoint covers is
then never lost, whatever happens next; a row in the file that was also delivered is harmless (the
stores drop the identical row, and `replay_undelivered` skips steps the run already holds).

A resume continues the same MLflow run from its checkpoint step, and the killed process may have
delivered steps after it. Resumes are bit-identical, so those values are the ones the resumed run
would log: the sender asks the run once for the last step of `progress_key` (and reads the file
above), and drops metrics of steps up to it. Each step is in the run once; a new run gets them all.
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
from urllib.parse import urlsplit

from flowspeed.configs import PipelineConfig
from mlflow import MlflowClient
from mlflow.entities import Metric, RunTag
from mlflow.exceptions import MlflowException

log = logging.getLogger(__name__)

UNDELIVERED_DIR = "mlflow-undelivered"
PROGRESS_KEY = "train/loss"


MLFLOW_CREDENTIALS = "set MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD (or ~/.mlflow/credentials)"


def refuse_credentials_in_url(url: str, what: str, instead: str) -> str:
    """URLs are printed, tagged on runs, written to files and passed to ranks on their command line
    (visible in `ps`): a password in one would leak everywhere. Credentials belong in the environment."""
    parts = urlsplit(url)
    try:
        userinfo = parts.username is not None or parts.password is not None
    except ValueError:  # an unparsable netloc: leave it to the client to refuse
        return url
    if userinfo:
        host = f"{parts.hostname}:{parts.port}" if parts.port else parts.hostname
        raise ValueError(f"{what} ({parts.scheme}://{host}{parts.path}) carries credentials in the URL, which "
                         f"flowspeed would print and store in run tags and files. Remove them from the URL and "
                         f"{instead}.")  # fmt: skip
    return url


def tracking_uri(cfg: PipelineConfig) -> str:
    """Config beats MLFLOW_TRACKING_URI beats a SQLite store under the workdir."""
    uri = cfg.tracking.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return refuse_credentials_in_url(uri, "the MLflow tracking URI", MLFLOW_CREDENTIALS)
    return f"sqlite:///{(cfg.workdir / 'mlflow.db').resolve()}"


# MLflow 3's UI opens an experiment on what its kind says: without this tag it lands on the GenAI traces
# overview; with it, on the runs and their metric charts (the UI's ExperimentKind values; the Python client
# has no constant for it).
EXPERIMENT_KIND_TAG, EXPERIMENT_KIND = "mlflow.experimentKind", "custom_model_development"


def ensure_experiment(client: MlflowClient, cfg: PipelineConfig) -> str:
    """The config's experiment, created if new, tagged as model development (an existing one without a kind
    gets the tag; a kind someone set is left alone)."""
    exp = client.get_experiment_by_name(cfg.experiment)
    if exp is not None:
        if EXPERIMENT_KIND_TAG not in exp.tags:
            client.set_experiment_tag(exp.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
        return exp.experiment_id
    artifacts = None
    if client.tracking_uri.startswith("sqlite:"):
        # A local store keeps its artifacts beside it, under the workdir, not in the cwd.
        artifacts = (cfg.workdir / "mlartifacts").resolve().as_uri()
    tags = {EXPERIMENT_KIND_TAG: EXPERIMENT_KIND}
    return client.create_experiment(cfg.experiment, artifact_location=artifacts, tags=tags)


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
        persist_wait_s: float = 10.0,
        progress_key: str = PROGRESS_KEY,
    ) -> None:
        self.client = MlflowClient(uri)
        self.uri = uri
        self.run_id = run_id
        self.flush_every = flush_every
        self.undelivered_dir = undelivered_dir
        self.grace_s = grace_s
        self.max_backoff_s = max_backoff_s
        self.persist_wait_s = persist_wait_s
        self.progress_key = progress_key
        self._buffer: list[Metric] = []
        self._steps_since_flush = 0
        self._pending: deque[_Batch] = deque()
        self._cond = threading.Condition()
        self._closing = False
        self._current: list[_Batch] = []
        self._abandoned = False
        self._outage_since: float | None = None
        self.undelivered = 0
        # Steps this run already holds (see the module docstring): from the undelivered file now, from
        # the server once the sender reaches it (None until then: nothing is sent before it is known).
        self._journal_step = self._journaled_progress()
        self.skip_through: int | None = None
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
        """Queue what is buffered. log_batch takes at most 1000 metrics per call; chunks end at a step
        boundary where they can, so a kill between two calls leaves whole steps in the run (the resume
        skips steps by their train/loss, and a step cut in half would lose its other metrics)."""
        with self._cond:
            while self._buffer:
                cut = min(len(self._buffer), 1000)
                if cut < len(self._buffer):
                    last = self._buffer[cut].step
                    while cut > 1 and self._buffer[cut - 1].step == last:
                        cut -= 1
                    if self._buffer[cut - 1].step == last:  # one step of over 1000 metrics: split it
                        cut = 1000
                chunk, self._buffer = self._buffer[:cut], self._buffer[cut:]
                self._pending.append(_Batch(chunk, []))
            self._cond.notify_all()
        self._steps_since_flush = 0

    def log_event(self, metrics: dict[str, float], step: int) -> None:
        """Metrics that mark something happening to the run, not a step's values (an elastic restart count): sent
        even for a step the run already holds, which `log_metrics` would drop as a killed attempt's re-log."""
        self.flush()  # after what was logged before it
        ts = int(time.time() * 1000)
        with self._cond:
            self._pending.append(_Batch([Metric(k, float(v), ts, step) for k, v in metrics.items()], [], keep=True))
            self._cond.notify_all()

    def set_tags(self, tags: dict[str, Any]) -> None:
        # Tag values are capped at 5000 characters by the stores.
        batch = [RunTag(k, str(v)[:5000]) for k, v in tags.items()]
        with self._cond:
            self._pending.append(_Batch([], batch))
            self._cond.notify_all()

    def persist(self) -> int:
        """Make everything logged so far survive a kill: delivered, or fsync'ed to the undelivered file.

        Called before a checkpoint is published, so the steps it covers are never lost (a resume starts
        after them and does not log them again). Waits up to `persist_wait_s` for the sender, and not
        at all while the server is known to be away: an outage must not stall training at every
        checkpoint. Rows written to the file stay queued and are still sent when the server returns.
        Returns how many metrics/tags went to the file.
        """
        self.flush()
        deadline = time.monotonic() + self.persist_wait_s
        with self._cond:
            while (self._pending or self._current) and self._outage_since is None:
                left_s = deadline - time.monotonic()
                if left_s <= 0:
                    break
                self._cond.wait(timeout=min(1.0, left_s))
            batches = [b for b in [*self._current, *self._pending] if not b.journaled]
            for b in batches:
                b.journaled = True
        if not batches:
            return 0
        n = self._write_undelivered(batches)
        log.warning("MLflow at %s has not taken the metrics up to this checkpoint yet: %d metrics/tags kept in %s "
                    "until it does", self.uri, n, self.undelivered_dir)  # fmt: skip
        return n

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
            fresh = [b for b in left if not b.journaled]  # `persist` already wrote the others
            self.undelivered = len(self._rows(left))
            if fresh:
                self._write_undelivered(fresh)
            log.error("MLflow at %s still unreachable after %.0f s: %d metrics/tags are in %s; "
                      "`flowspeed sync-metrics %s` delivers them", self.uri, self.grace_s, self.undelivered,
                      self.undelivered_dir, self.undelivered_dir)  # fmt: skip
        elif self.undelivered_dir is not None and (path := self.undelivered_dir / f"{self.run_id}.jsonl").is_file():
            # Everything reached the server, which is up: hand it what `persist` (here or in a killed
            # run this one resumes) kept on disk too, rather than leave it for `sync-metrics`.
            _replay_file(path)
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
                if self.skip_through is None:
                    self.skip_through = max(self._journal_step, self._delivered_progress())
                    if self.skip_through:
                        log.info("MLflow run %s already holds steps up to %d: those are not logged again",
                                 self.run_id, self.skip_through)  # fmt: skip
                while self._current:
                    batch = self._current[0]
                    metrics = [m for m in batch.metrics if batch.keep or m.step > self.skip_through]
                    try:
                        if metrics or batch.tags:
                            self.client.log_batch(self.run_id, metrics=metrics, tags=batch.tags)
                    except MlflowException as exc:
                        if not _refused(exc):
                            raise
                        # The server answered "no" (deleted run, a value it rejects): resending cannot
                        # help, and holding the batch would stall everything queued behind it.
                        log.error("MLflow refused %d metrics/tags of run %s, dropped: %s",
                                  len(metrics) + len(batch.tags), self.run_id, exc.message)  # fmt: skip
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

    def _delivered_progress(self) -> int:
        """The last step of `progress_key` the run holds (0 for none). Raises while the server is away,
        which the sender treats like a failed send: it retries. A run the server refuses to show (a
        deleted one) counts as empty: its batches will be refused and dropped anyway."""
        try:
            history = self.client.get_metric_history(self.run_id, self.progress_key)
        except MlflowException as exc:
            if not _refused(exc):
                raise
            return 0
        return max((m.step for m in history), default=0)

    def _journaled_progress(self) -> int:
        """The last step of `progress_key` in this run's undelivered file (0 for none)."""
        if self.undelivered_dir is None:
            return 0
        path = self.undelivered_dir / f"{self.run_id}.jsonl"
        if not path.is_file():
            return 0
        steps = [r["step"] for r in _read_rows(path) if r.get("metric") == self.progress_key]
        return max(steps, default=0)

    def _rows(self, batches: list[_Batch]) -> list[dict[str, Any]]:
        """The undelivered-file rows of `batches`, less the steps the run already holds."""
        skip = max(self.skip_through or 0, self._journal_step)
        metrics = [m for b in batches for m in b.metrics if b.keep or m.step > skip]
        return [{"metric": m.key, "value": m.value, "timestamp": m.timestamp, "step": m.step} for m in metrics] + [
            {"tag": t.key, "value": t.value} for b in batches for t in b.tags
        ]

    def _write_undelivered(self, batches: list[_Batch]) -> int:
        """Append `batches` to the run's undelivered file and fsync it; rows of steps the run already
        holds are left out. Returns how many rows that was."""
        rows = self._rows(batches)
        if not rows:
            return 0
        if self.undelivered_dir is None:
            log.error("MLflow unreachable: %d metrics/tags of run %s lost (no undelivered_dir)", len(rows),
                      self.run_id)  # fmt: skip
            return len(rows)
        path = self.undelivered_dir / f"{self.run_id}.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a") as f:  # appends: a second outage in a resumed run adds to the first
            f.write("".join(json.dumps({"run_id": self.run_id, "uri": self.uri, **r}) + "\n" for r in rows))
            f.flush()
            os.fsync(f.fileno())
        _fsync_dir(path.parent)  # a new file's name must survive a crash too
        return len(rows)


class _Batch:
    """One queued log_batch call; `journaled` once `persist` has written it to the undelivered file; `keep`: its
    metrics are sent whatever steps the run already holds (`Tracker.log_event`)."""

    __slots__ = ("metrics", "tags", "journaled", "keep")

    def __init__(self, metrics: list[Metric], tags: list[RunTag], keep: bool = False) -> None:
        self.metrics, self.tags, self.journaled, self.keep = metrics, tags, False, keep


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _read_rows(path: Path) -> list[dict[str, Any]]:
    """The rows of an undelivered file. A last line cut short by a kill mid-append is skipped (it was
    never fsync'ed, so `persist` had not returned: its rows are still in the run or the resume)."""
    rows = []
    for line in path.read_text().splitlines():
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                log.warning("skipping a cut-short line in %s", path)
    return rows


class NullTracker(Tracker):
    """What ranks other than 0 (and runs without tracking) get: every call is a no-op."""

    def __init__(self) -> None:
        self._buffer = []
        self.undelivered = 0

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        pass

    def flush(self) -> None:
        pass

    def log_event(self, metrics: dict[str, float], step: int) -> None:
        pass

    def set_tags(self, tags: dict[str, Any]) -> None:
        pass

    def persist(self) -> int:
        return 0

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
    """Send what `Tracker.close` or `Tracker.persist` wrote, file by file; a file is removed once all of
    it is in. Returns (rows delivered, rows still waiting). Safe to repeat: rows of a (key, step) the
    run already holds are skipped (the sender may have delivered them after `persist` wrote them, or a
    resume may have logged that step again, with another timestamp, while the server was away)."""
    delivered = waiting = 0
    for path in sorted(Path(folder).glob("*.jsonl")):
        sent, left = _replay_file(path)
        delivered, waiting = delivered + sent, waiting + left
    return delivered, waiting


def _replay_file(path: Path) -> tuple[int, int]:
    rows = _read_rows(path)
    if not rows:
        path.unlink()
        return 0, 0
    uri, run_id = rows[0]["uri"], rows[0]["run_id"]
    client = MlflowClient(uri)
    try:
        held = {
            key: {m.step for m in client.get_metric_history(run_id, key)}
            for key in {r["metric"] for r in rows if "metric" in r}
        }
        metrics = []
        for r in rows:  # a (key, step) once: its first row, unless the run already holds that step
            if "metric" in r and r["step"] not in held[r["metric"]]:
                held[r["metric"]].add(r["step"])
                metrics.append(Metric(r["metric"], r["value"], r["timestamp"], r["step"]))
        tags = [RunTag(r["tag"], r["value"]) for r in rows if "tag" in r]
        for i in range(0, len(metrics), 1000):
            client.log_batch(run_id, metrics=metrics[i : i + 1000])
        for i in range(0, len(tags), 100):
            client.log_batch(run_id, tags=tags[i : i + 100])
    except Exception as exc:  # noqa: BLE001
        log.warning("MLflow at %s still unreachable (%s): %s kept for later", uri, exc, path)
        return 0, len(rows)
    path.unlink()
    return len(rows), 0


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
