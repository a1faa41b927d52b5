"""Reading torch.distributed.checkpoint (DCP) state without letting the files run code.

DCP's own reader unpickles `.metadata` with a plain `pickle.load` and its planner loads non-tensor
values (optimizer hyperparameters) with `weights_only=False`: a tampered checkpoint would run code on
resume, export or eval. `SafeReader` admits only the classes checkpoint metadata is made of and
`SafePlanner` loads values with `weights_only=True`. torch's CheckpointException derives from
BaseException; `dcp_load` turns it into a `CheckpointError` that names the checkpoint in one line.
"""

from __future__ import annotations

import collections
import dataclasses
import enum
import io
import pathlib
import pickle
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import metadata as dcp_metadata
from torch.distributed.checkpoint import planner as dcp_planner
from torch.distributed.checkpoint._traverse import set_element
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.filesystem import _StorageInfo
from torch.distributed.checkpoint.planner import ReadItem


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be read or written, as an ordinary exception.

    torch's CheckpointException derives from BaseException (it slips past `except Exception`, so
    Prefect reports a crash and the CLI a page of per-rank tracebacks); this names the checkpoint and
    the first rank's cause in one line instead.
    """


def checkpoint_error(exc: BaseException, path: Path, action: str) -> CheckpointError:
    """`exc` (a CheckpointException or any other failure) as one line naming the checkpoint."""
    cause = first_cause(exc)
    if isinstance(cause, CheckpointError):  # already names the file
        return cause
    return CheckpointError(f"could not {action} checkpoint {path} ({describe(exc)})")


def first_cause(exc: BaseException) -> BaseException:
    """The first failing rank's own exception inside a CheckpointException (`exc` itself otherwise)."""
    if isinstance(exc, CheckpointException) and exc.failures:
        failure = exc.failures[min(exc.failures)]  # (the rank's exception, its stack summary)
        return failure[0] if isinstance(failure, tuple) else failure
    return exc


def describe(exc: BaseException) -> str:
    """One line for any checkpoint failure: a CheckpointException's str() is every rank's full traceback."""
    cause = first_cause(exc)
    where = f"rank {min(exc.failures)}: " if cause is not exc else ""
    return f"{where}{type(cause).__name__}: {str(cause).strip() or repr(cause)}"


def _metadata_globals() -> dict[tuple[str, str], Any]:
    """Every global a DCP `.metadata` pickle legitimately names (found by unpickling real checkpoints of
    models, optimizers and EMA in fp32/bf16, ours and megatron's): the metadata and plan dataclasses,
    dtypes, sizes and paths. Constructing any of them runs no code of the file's choosing."""
    allowed: dict[tuple[str, str], Any] = {
        (obj.__module__, name): obj
        for name, obj in vars(dcp_metadata).items()
        if isinstance(obj, type) and obj.__module__ == dcp_metadata.__name__
    }
    # megatron's dist checkpoints also keep the save plans: plain dataclasses and enums of the planner module
    allowed.update(
        {
            (obj.__module__, name): obj
            for name, obj in vars(dcp_planner).items()
            if isinstance(obj, type)
            and obj.__module__ == dcp_planner.__name__
            and (dataclasses.is_dataclass(obj) or issubclass(obj, enum.Enum))
        }
    )
    allowed[(_StorageInfo.__module__, "_StorageInfo")] = _StorageInfo
    allowed[("torch", "Size")] = torch.Size
    allowed[("torch.serialization", "_get_layout")] = torch.serialization._get_layout
    for name in dir(torch):
        if isinstance(getattr(torch, name, None), torch.dtype | torch.memory_format | torch.layout):
            allowed[("torch", name)] = getattr(torch, name)
    for name in ("PosixPath", "WindowsPath", "PurePosixPath", "PureWindowsPath"):
        allowed[("pathlib", name)] = getattr(pathlib, name)
    allowed[("collections", "OrderedDict")] = collections.OrderedDict
    return allowed


_ALLOWED_GLOBALS = _metadata_globals()


class _MetadataUnpickler(pickle.Unpickler):
    def __init__(self, file: io.BufferedIOBase, source: Path) -> None:
        super().__init__(file)
        self.source = source

    def find_class(self, module: str, name: str) -> Any:  # noqa: ANN401
        try:
            return _ALLOWED_GLOBALS[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(
                f"{self.source} names {module}.{name}, which checkpoint metadata never holds: the file was "
                "tampered with or is not a checkpoint's; nothing in it was run"
            ) from None


def read_metadata(state_dir: Path) -> dcp_metadata.Metadata:
    """A DCP checkpoint's `.metadata`, unpickled with only the metadata classes allowed."""
    path = Path(state_dir) / ".metadata"
    try:
        with open(path, "rb") as f:
            meta = _MetadataUnpickler(f, path).load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError) as exc:
        raise CheckpointError(f"{path} is not readable checkpoint metadata ({type(exc).__name__}: {exc})") from exc
    except OSError as exc:
        raise CheckpointError(f"cannot read {path}: {exc}") from exc
    if not isinstance(meta, dcp_metadata.Metadata):
        raise CheckpointError(f"{path} holds a {type(meta).__name__}, not checkpoint metadata")
    return meta


class SafeReader(dcp.FileSystemReader):
    """DCP's file reader with `.metadata` read by `read_metadata` instead of a plain `pickle.load`."""

    def read_metadata(self) -> dcp_metadata.Metadata:  # no **kwargs: DCP then never tries per-rank metadata
        meta = read_metadata(Path(self.path))
        if meta.storage_meta is None:
            meta.storage_meta = dcp_metadata.StorageMeta()
        meta.storage_meta.load_id = self.load_id
        return meta


class SafePlanner(DefaultLoadPlanner):
    """Non-tensor values (optimizer hyperparameters) loaded with `weights_only=True`, not DCP's False."""

    def load_bytes(self, read_item: ReadItem, value: io.BytesIO) -> None:
        obj = torch.load(value, weights_only=True)
        if self.flatten_state_dict:
            set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], obj)
        else:
            self.state_dict[read_item.dest_index.fqn] = obj


def dcp_load(state: dict[str, Any], ckpt: Path) -> None:
    """Collective: `dcp.load` of `ckpt/state` through the safe reader and planner; errors as CheckpointError."""
    read_metadata(ckpt / "state")  # its own clear error first, not DCP's logged fallback tracebacks
    try:
        dcp.load(
            state,
            storage_reader=SafeReader(str(ckpt / "state")),
            planner=SafePlanner(),
            no_dist=not dist.is_initialized(),
        )
    except (Exception, CheckpointException) as exc:
        raise checkpoint_error(exc, ckpt, "load") from exc


def check_state_dir(state_dir: Path) -> dcp_metadata.Metadata:
    """Read a DCP folder's metadata safely and load each of its non-tensor values with `weights_only=True`.

    For DCP folders another library loads (megatron-core's planner keeps DCP's `weights_only=False`):
    once every value loads here, the same bytes load there without running anything.
    """
    meta = read_metadata(state_dir)
    for index, info in meta.storage_data.items():
        if not isinstance(meta.state_dict_metadata.get(index.fqn), dcp_metadata.BytesStorageMetadata):
            continue
        shard = Path(state_dir) / info.relative_path
        try:
            with open(shard, "rb") as f:
                f.seek(info.offset)
                torch.load(io.BytesIO(f.read(info.length)), weights_only=True)
        except Exception as exc:  # noqa: BLE001  (any failure means megatron must not unpickle it)
            raise CheckpointError(
                f"{shard}: the value of {index.fqn} was refused ({type(exc).__name__}: {str(exc).strip()[:300]})"
            ) from exc
    return meta
