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
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flowspeed.engines.common.io import file_digest
from flowspeed.engines.common.torchrun import DistributedJobFailed
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


# Retries are for failures that may pass on their own: the network, a server, a busy or stale file
# system. Everything else (a config, checkpoint or data error, a bug) fails the same way again, so a
# retry only delays the message (and, for training, reloads the model to fail again).
TRANSIENT_ERRNOS = frozenset({
    errno.EAGAIN, errno.EBUSY, errno.EINTR, errno.ETIMEDOUT, errno.ESTALE, errno.EPIPE, errno.ECONNRESET,
    errno.ECONNREFUSED, errno.ECONNABORTED, errno.EHOSTUNREACH, errno.EHOSTDOWN, errno.ENETUNREACH,
    errno.ENETDOWN, errno.ENETRESET,
})  # fmt: skip
# A failed torchrun job carries its rank's error as text: transient when the network or a peer went away.
_RANK_TRANSIENT = re.compile(
    r"\b(ConnectionError|ConnectionResetError|ConnectionRefusedError|ConnectionAbortedError|TimeoutError"
    r"|DistNetworkError|DistStoreError|Connection reset by peer|Connection refused|timed out)\b"
)
_RANK_PERMANENT = re.compile(
    r"\b(ValueError|ConfigError|KeyError|TypeError|FileNotFoundError|PermissionError|NotImplementedError"
    r"|CheckpointError|CheckpointException|CheckpointMismatch|ImportError|ModuleNotFoundError|AssertionError)\b"
)


# Never retried, whatever they wrap: the config, the data or the code is wrong (ValueError covers
# ConfigError and CheckpointMismatch; a missing file or permission is not fixed by waiting).
PERMANENT: tuple[type[BaseException], ...] = (
    ValueError, LookupError, TypeError, NotImplementedError, AssertionError, ImportError, FileNotFoundError,
    PermissionError, IsADirectoryError, NotADirectoryError, FileExistsError,
)  # fmt: skip


def _loaded(module: str, name: str) -> tuple[type[BaseException], ...]:
    """An exception class of a library, only if that library is loaded (otherwise nothing raised it):
    deciding on a retry imports neither mlflow nor requests."""
    mod = sys.modules.get(module)
    cls = getattr(mod, name, None) if mod is not None else None
    return (cls,) if isinstance(cls, type) and issubclass(cls, BaseException) else ()


def _status(exc: BaseException) -> int | None:
    """The HTTP status of an MLflow or requests error, when it has one."""
    if hasattr(exc, "get_http_status_code"):
        return int(exc.get_http_status_code())
    response = getattr(exc, "response", None)
    return getattr(response, "status_code", None)


def _transient_here(exc: BaseException) -> bool:
    if isinstance(exc, DistributedJobFailed):
        text = str(exc)
        return bool(_RANK_TRANSIENT.search(text)) and not _RANK_PERMANENT.search(text)
    if isinstance(exc, _loaded("flowspeed.engines.tracking.runs", "TrackingServerUnreachable")):
        return True  # the MLflow server does not answer (yet)
    http = _loaded("mlflow.exceptions", "MlflowException") + _loaded("requests.exceptions", "HTTPError")
    if isinstance(exc, http):
        status = _status(exc)
        return status is not None and (status >= 500 or status == 429)  # server away or busy; a 4xx is final
    if isinstance(exc, _loaded("requests.exceptions", "ConnectionError") + _loaded("requests.exceptions", "Timeout")):
        return True
    if isinstance(exc, ConnectionError | TimeoutError):
        return True
    dist = _loaded("torch.distributed", "DistNetworkError") + _loaded("torch.distributed", "DistStoreError")
    if isinstance(exc, dist):
        return True  # a collective's peer or the rendezvous store went away
    return isinstance(exc, OSError) and exc.errno in TRANSIENT_ERRNOS


def is_transient(exc: BaseException) -> bool:
    """A network or OS timeout, a server that is away or busy, a stale or busy file system, a torchrun job
    whose rank lost its peers: worth a retry. A config, checkpoint or data error never is (a full disk
    neither: a retry only repeats the write), nor anything unrecognised. Looks at the exception and what it
    was raised from."""
    if not isinstance(exc, Exception):  # Ctrl-C, SystemExit, torch's CheckpointException
        return False
    if isinstance(exc, PERMANENT + _loaded("flowspeed.engines.common.safe_load", "CheckpointError")):
        return False  # a checkpoint that cannot be read or written stays so
    seen: list[BaseException] = []
    e: BaseException | None = exc
    while e is not None and not any(e is s for s in seen):
        if _transient_here(e):
            return True
        seen.append(e)
        e = e.__cause__
    return False


def retry_if_transient(task: Any, task_run: Any, state: Any) -> bool:
    """Prefect `retry_condition_fn`: retry only what `is_transient` accepts."""
    try:
        state.result()
    except BaseException as exc:  # noqa: BLE001 - classified, not handled
        return is_transient(exc)
    return False
