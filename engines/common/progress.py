"""Progress reporting that libraries call and front-ends render (rich in the CLI, logs elsewhere)."""

from __future__ import annotations

import logging
from contextlib import contextmanager
from typing import Protocol

log = logging.getLogger("flowspeed")


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
