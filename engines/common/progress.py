"""Progress reporting that libraries call and front-ends render (rich in the CLI, logs elsewhere).

In a Prefect deployment the `flowspeed` logger is one of Prefect's extra loggers
(`PREFECT_LOGGING_EXTRA_LOGGERS=flowspeed`, prefect.yaml), so these lines land in the flow run's logs.
Prefect gives such a logger its API handler but no level, and the root's WARNING would drop them: this
module sets INFO there. A torchrun job's rank 0 is another process, outside the flow run: `relay_progress`
has it append the lines to a file that the launching process reads back into its own `flowspeed` logger.
"""

from __future__ import annotations

import contextvars
import logging
import os
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Protocol

log = logging.getLogger("flowspeed")
if "flowspeed" in os.environ.get("PREFECT_LOGGING_EXTRA_LOGGERS", "").replace(" ", "").split(","):
    log.setLevel(logging.INFO)

RELAY_ENV = "FLOWSPEED_PROGRESS_FILE"  # set by relay_progress for the torchrun job it launches
if os.environ.get(RELAY_ENV) and os.environ.get("RANK") == "0":  # rank 0 of that job: its lines to the file
    _to_file = logging.FileHandler(os.environ[RELAY_ENV], encoding="utf-8")
    _to_file.setFormatter(logging.Formatter("%(message)s"))
    log.addHandler(_to_file)
    log.setLevel(logging.INFO)


class Reporter(Protocol):
    def start(self, name: str, total: int) -> None: ...
    def advance(self, name: str, n: int = 1) -> None: ...
    def finish(self, name: str) -> None: ...


class LogReporter:
    """Logs every ~10%: enough to see a long stage move in a Prefect log without flooding it."""

    def __init__(self) -> None:
        self._state: dict[str, list[int]] = {}

    def start(self, name: str, total: int) -> None:
        self._state[name] = [0, max(total, 1), 0]
        log.info("%s: 0/%d", name, total)

    def advance(self, name: str, n: int = 1) -> None:
        st = self._state.setdefault(name, [0, 1, 0])
        st[0] += n
        pct = 100 * st[0] // st[1]
        if pct >= st[2] + 10 or st[0] == st[1]:
            st[2] = pct
            log.info("%s: %d/%d", name, st[0], st[1])

    def finish(self, name: str) -> None:
        self._state.pop(name, None)


_current: Reporter = LogReporter()


def reporter() -> Reporter:
    return _current


@contextmanager
def use_reporter(r: Reporter):
    global _current
    prev, _current = _current, r
    try:
        yield r
    finally:
        _current = prev


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}h{rest // 60:02d}m" if hours else f"{rest // 60}m{rest % 60:02d}s"


def log_train_step(step: int, end_step: int, loss: float, samples_per_s: float, step_times: Sequence[float]) -> None:
    """The line a flow run's log shows every `train.log_every` steps (rank 0). ETA: the steps left times the
    mean of the last 20 step times, so a slow first step (compilation, warm-up) fades out of it."""
    recent = list(step_times[-20:])
    eta = (end_step - step) * sum(recent) / len(recent) if recent else 0.0
    log.info("train step %d/%d: loss %.4f, %.1f samples/s, ETA %s", step, end_step, loss, samples_per_s,
             _duration(eta))  # fmt: skip


@contextmanager
def relay_progress(path: Path, poll_s: float = 0.5) -> Iterator[None]:
    """Around launching a torchrun job: its rank 0 appends its progress lines to `path` (told by the
    environment the job inherits), and a thread logs each line here, in this process's run context (a
    Prefect task's: the line is in its flow run's logs). Does nothing where no one reads INFO lines of the
    `flowspeed` logger (the CLI draws its own progress bars)."""
    if not log.isEnabledFor(logging.INFO):
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("")  # this launch's lines only (a log, appended to by one writer: no atomic write needed)
    done = threading.Event()

    def follow() -> None:
        with open(path, encoding="utf-8") as lines:
            partial = ""
            while True:
                finished = done.is_set()  # read once more after the job ended: its last lines
                partial += lines.read()
                *whole, partial = partial.split("\n")
                for line in whole:
                    if line.strip():
                        log.info("%s", line)
                if finished:
                    return
                done.wait(poll_s)  # wakes at once when the job ends: the stage does not wait out a poll

    thread = threading.Thread(target=contextvars.copy_context().run, args=(follow,), name="progress-relay",
                              daemon=True)  # fmt: skip
    previous = os.environ.get(RELAY_ENV)
    os.environ[RELAY_ENV] = str(path)
    thread.start()
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop(RELAY_ENV, None)
        else:
            os.environ[RELAY_ENV] = previous
        done.set()
        thread.join(timeout=10)
