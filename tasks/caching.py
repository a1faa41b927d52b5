"""A cache policy that also checks outputs: a key on inputs alone would replay a deleted path.

The key covers the task's inputs, the stat (size, mtime) of the files it reads, and the stat of the
files it promised to write. Delete or touch an output, edit a source, and the task runs again.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prefect.cache_policies import INPUTS, CachePolicy
from prefect.context import TaskRunContext
from prefect.utilities.hashing import hash_objects

PathsFn = Callable[[dict[str, Any]], list[Path]]


def _stat(path: Path) -> tuple[str, int, int] | tuple[str, None]:
    try:
        st = path.stat()
    except OSError:
        return (str(path), None)
    return (str(path), st.st_size, st.st_mtime_ns)


@dataclass
class FilesPolicy(CachePolicy):
    sources: PathsFn | None = None
    outputs: PathsFn | None = None
    exclude: tuple[str, ...] = ()  # inputs that do not change the output (a tracking run id)

    def compute_key(
        self, task_ctx: TaskRunContext, inputs: dict[str, Any], flow_parameters: dict[str, Any], **kwargs: Any
    ) -> str | None:
        outs = self.outputs(inputs) if self.outputs else []
        if any(not p.exists() for p in outs):
            return None  # an output is missing: never a cache hit
        srcs = self.sources(inputs) if self.sources else []
        policy = INPUTS
        for name in self.exclude:
            policy = policy - name
        base = policy.compute_key(task_ctx, inputs, flow_parameters, **kwargs)
        return hash_objects(base, [_stat(p) for p in srcs], [_stat(p) for p in outs], raise_on_failure=True)


def files_policy(
    sources: PathsFn | None = None, outputs: PathsFn | None = None, exclude: tuple[str, ...] = ()
) -> FilesPolicy:
    return FilesPolicy(sources=sources, outputs=outputs, exclude=exclude)
