"""Where training checkpoints live and how they are published, whichever engine writes them.

    <train_dir>/checkpoints/step-00000010/   one directory a checkpoint, named by its step

Every rank writes into one temp directory rank 0 chose (`shared_tmp`); `PendingCheckpoint.wait()` has
the ranks agree that their parts landed, then rank 0 publishes it by one rename and prunes old ones, so
`latest()` never sees half a checkpoint. The torch engine fills it with DCP state (`state/`,
engines/torch_engine/checkpoint.py), the megatron engine with dist_checkpointing (`megatron/`);
`verify` and `latest_intact` read either without loading tensors.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from flowspeed.configs import PipelineConfig
from flowspeed.configs.resume import mismatch_message, resume_conflicts
from flowspeed.engines.common.io import default_modes
from flowspeed.engines.common.safe_load import CheckpointError, checkpoint_error, read_metadata
from torch.distributed.checkpoint.api import CheckpointException

STEP_RE = re.compile(r"^step-(\d{8})$")
log = logging.getLogger(__name__)


def checkpoint_dir(train_dir: Path) -> Path:
    return Path(train_dir) / "checkpoints"


def list_checkpoints(train_dir: Path) -> list[Path]:
    root = checkpoint_dir(train_dir)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if STEP_RE.match(p.name) and (p / "trainer_state.pt").is_file()]
    return sorted(found, key=lambda p: int(STEP_RE.match(p.name).group(1)))


def latest(train_dir: Path) -> Path | None:
    ckpts = list_checkpoints(train_dir)
    return ckpts[-1] if ckpts else None


def verify(ckpt: Path) -> None:
    """Raise CheckpointError unless every file a resume reads is there and whole.

    A checkpoint is published by one rename, but a disk that fills up or a copy cut short can still
    truncate a file afterwards; this is cheap (metadata and sizes, no tensor data) so `latest_intact`
    can fall back to the previous checkpoint instead of failing the resume.
    """
    for pt in [ckpt / "trainer_state.pt", *sorted((ckpt / "rng").glob("rank-*.pt"))]:
        try:
            torch.load(pt, weights_only=True, map_location="cpu")
        except Exception as exc:  # noqa: BLE001  (any unreadable file makes the checkpoint unusable)
            raise CheckpointError(f"{pt} is unreadable ({type(exc).__name__}: {exc})") from exc
    sizes: dict[Path, int] = {}
    dirs = [d for d in (ckpt / "state", ckpt / "megatron") if d.is_dir()]  # ours, or the megatron engine's
    if not dirs:
        raise CheckpointError(f"{ckpt} has neither state/ nor megatron/: it is not a whole checkpoint")
    for state_dir, info in ((d, i) for d in dirs for i in read_metadata(d).storage_data.values()):
        shard = state_dir / info.relative_path
        if shard not in sizes:
            sizes[shard] = shard.stat().st_size if shard.is_file() else -1
        if sizes[shard] < info.offset + info.length:
            state = "missing" if sizes[shard] < 0 else f"cut short ({sizes[shard]} bytes)"
            raise CheckpointError(f"{shard} is {state}: the metadata needs {info.offset + info.length} bytes")


class CheckpointMismatch(ValueError):
    """A checkpoint written for another model or layout than the config resuming it (a config error:
    never retried)."""


def check_resumable(ckpt: Path, cfg: PipelineConfig) -> None:
    """Refuse `ckpt` unless the config that wrote it (its config.yaml) agrees with `cfg` on what the state
    depends on (flowspeed.configs.resume.STATE_KEYS), naming both values of each difference."""
    conflicts = resume_conflicts(ckpt, cfg)
    if conflicts:
        raise CheckpointMismatch(mismatch_message(ckpt, conflicts))


def latest_intact(train_dir: Path) -> Path | None:
    """The newest checkpoint that `verify` accepts, warning about each newer one it skips.

    None only when there are no checkpoints: if every one is damaged, starting over would silently
    throw the run's progress away, so that is an error naming them.
    """
    ckpts = list_checkpoints(train_dir)
    problems = []
    for candidate in reversed(ckpts):
        try:
            verify(candidate)
        except CheckpointError as exc:
            log.warning("skipping damaged checkpoint %s: %s", candidate, exc)
            problems.append(str(exc))
            continue
        return candidate
    if ckpts:
        raise CheckpointError(
            f"no intact checkpoint under {checkpoint_dir(train_dir)} to resume from: {'; '.join(problems)}. "
            "Set train.resume=never to start over, or restore the checkpoints."
        )
    return None


def _rank_world() -> tuple[int, int]:
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def shared_tmp(root: Path, name: str) -> Path:
    """One temp directory for all ranks: rank 0 makes it and tells the others its name."""
    rank, world = _rank_world()
    holder = [str(tempfile.mkdtemp(prefix=f".{name}.", dir=root)) if rank == 0 else ""]
    if world > 1:
        dist.broadcast_object_list(holder, src=0)
    return Path(holder[0])


class PendingCheckpoint:
    """A checkpoint whose shards may still be on their way to disk (async save).

    `wait()` is collective: every rank confirms its part, then rank 0 publishes the directory with
    one rename (or deletes it if any rank failed) and prunes old checkpoints.
    """

    def __init__(self, tmp: Path, final: Path, keep: int, device: torch.device, future: Any = None) -> None:
        self.tmp, self.final, self.keep, self.device, self.future = tmp, final, keep, device, future
        self.error: BaseException | None = None

    def wait(self) -> Path:
        rank, world = _rank_world()
        ok = torch.ones(1, device=self.device)  # on the device: NCCL/HCCL reduce device tensors only
        if self.future is not None and self.error is None:
            try:
                self.future.result()
            except BaseException as exc:  # reported after the ranks agree, so none waits forever
                self.error = exc
        if self.error is not None:
            ok.zero_()
        if world > 1:
            dist.all_reduce(ok, op=dist.ReduceOp.MIN)
        published = ok.item() == 1
        if rank == 0:
            if published:
                default_modes(self.tmp)  # the umask's modes, not mkdtemp's owner-only ones
                if self.final.exists():  # a re-run of the same step: replace it whole
                    discard(self.final)
                os.replace(self.tmp, self.final)
                for old in list_checkpoints(self.final.parent.parent)[: -self.keep]:
                    discard(old)
            else:
                shutil.rmtree(self.tmp, ignore_errors=True)
        if isinstance(self.error, CheckpointException):  # a BaseException: one line, not every rank's traceback
            raise checkpoint_error(self.error, self.final, "write") from self.error
        if self.error is not None:
            raise self.error
        if not published:
            raise RuntimeError(f"another rank failed while writing checkpoint {self.final}; nothing was published")
        return self.final


def discard(ckpt: Path) -> None:
    """Delete a published checkpoint: first renamed to a `.step-*` name (one atomic step out of the
    listing), then removed. A process killed halfway through the removal leaves no half checkpoint under
    a published name, which, without its trainer_state.pt, no listing, prune or resume would ever see
    again (a model's worth of disk kept forever); `clean_partial` deletes the rest at the next start."""
    aside = ckpt.with_name(f".{ckpt.name}.discard-{os.getpid()}-{time.monotonic_ns()}")
    try:
        os.replace(ckpt, aside)
    except FileNotFoundError:  # already gone
        return
    shutil.rmtree(aside, ignore_errors=True)


def clean_partial(train_dir: Path) -> None:
    """What a killed run left half-made: unpublished or half-discarded checkpoints, and an export's
    temp or set-aside `final/` (`.final.*`)."""
    root = checkpoint_dir(train_dir)
    if root.is_dir():
        for p in root.glob(".step-*"):
            shutil.rmtree(p, ignore_errors=True)
    for p in Path(train_dir).glob(".final.*"):
        shutil.rmtree(p, ignore_errors=True)
