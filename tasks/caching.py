"""Cache policies keyed on inputs and source files, refused when promised outputs are gone.

A key on inputs alone replays a stale path after someone deletes the output. The key cannot
include the outputs themselves (they do not exist before the first run, so the first re-run would
always miss); instead `run_cached` refreshes the cache entry whenever an output is missing.
Sources are hashed by content when small (manifests, sample lists: rewritten with the same bytes
by an idempotent stage) and by (size, mtime) when large (media, weights).

Outputs present are not always outputs *of this entry*: prep on manifest A, then B, then A again
finds A's key cached while samples.jsonl holds B's rows. A policy's `current(inputs, result)` says
whether the files on disk are still the ones the cached result describes; when not, it reruns.
"""

from __future__ import annotations

import errno
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flowspeed.engines.common.io import file_digest
from prefect.cache_policies import INPUTS, CachePolicy
from prefect.context import TaskRunContext
from prefect.utilities.hashing import hash_objects

PathsFn = Callable[[dict[str, Any]], list[Path]]
SMALL_FILE = 16 * 2**20


def source_fingerprint(path: Path) -> tuple[str, Any]:
    try:
        st = path.stat()
    except OSError:
        return (str(path), None)
    if st.st_size <= SMALL_FILE:
        return (str(path), file_digest(path))
    return (str(path), (st.st_size, st.st_mtime_ns))


@dataclass
class FilesPolicy(CachePolicy):
    sources: PathsFn | None = None
    outputs: PathsFn | None = None
    exclude: tuple[str, ...] = ()  # inputs that do not change the output (a tracking run id)
    current: Callable[[dict[str, Any], dict[str, Any]], bool] | None = None  # outputs still the result's?

    def compute_key(
        self, task_ctx: TaskRunContext, inputs: dict[str, Any], flow_parameters: dict[str, Any], **kwargs: Any
    ) -> str | None:
        policy = INPUTS
        for name in self.exclude:
            policy = policy - name
        base = policy.compute_key(task_ctx, inputs, flow_parameters, **kwargs)
        srcs = self.sources(inputs) if self.sources else []
        return hash_objects(base, [source_fingerprint(p) for p in srcs], raise_on_failure=True)

    def missing_outputs(self, inputs: dict[str, Any]) -> list[Path]:
        return [p for p in (self.outputs(inputs) if self.outputs else []) if not p.exists()]


def files_policy(
    sources: PathsFn | None = None,
    outputs: PathsFn | None = None,
    exclude: tuple[str, ...] = (),
    current: Callable[[dict[str, Any], dict[str, Any]], bool] | None = None,
) -> FilesPolicy:
    return FilesPolicy(sources=sources, outputs=outputs, exclude=exclude, current=current)


def run_cached(task: Any, **inputs: Any) -> dict[str, Any]:
    """Run a task, refreshing its cache entry when an output it promised is missing.

    Returns the task's dict result plus `cache_hit`, so reports never present reused counts as new work.
    """
    policy = task.cache_policy
    refresh = isinstance(policy, FilesPolicy) and bool(policy.missing_outputs(inputs))
    state = task.with_options(refresh_cache=refresh)(**inputs, return_state=True)
    out = dict(state.result())
    stale = isinstance(policy, FilesPolicy) and policy.current is not None and not policy.current(inputs, out)
    if state.name == "Cached" and stale:
        state = task.with_options(refresh_cache=True)(**inputs, return_state=True)  # outputs rewritten since
        out = dict(state.result())
    out["cache_hit"] = state.name == "Cached"
    return out


# Errors that say the input or config is wrong: retrying cannot fix them, only delay the message.
USER_ERRORS = (ValueError, FileNotFoundError, KeyError, TypeError, NotImplementedError)


def retry_if_transient(task: Any, task_run: Any, state: Any) -> bool:
    """Prefect `retry_condition_fn`: retry I/O hiccups and crashed ranks, not a bad config."""
    try:
        state.result()
    except USER_ERRORS:
        return False
    except OSError as exc:  # a full disk or quota is not transient: a retry only repeats the write
        return exc.errno not in (errno.ENOSPC, errno.EDQUOT)
    except BaseException:
        return True
    return True
