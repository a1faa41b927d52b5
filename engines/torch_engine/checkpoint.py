"""Sharded, atomic, self-describing checkpoints with torch.distributed.checkpoint (DCP).

    <train_dir>/checkpoints/step-00000010/
        state/                DCP: model + optimizer (+ EMA), each rank writing its own shards
        trainer_state.pt      step, LR schedule, sampler position, layout, model args (weights_only)
        rng/rank-00000.pt     every rank's RNG states
        config.yaml           the resolved config that made it

DCP stores tensors by fully qualified name with their global shapes, so a checkpoint written by 2
FSDP ranks loads into 1 process, or into a TP layout, and DCP reshards on read. All ranks write
into one temp directory whose name rank 0 chose; rank 0 renames it after a barrier, so `latest()`
never sees half a checkpoint, even when a rank dies mid-write.

Nothing a checkpoint holds can run code when read: DCP state goes through `safe_load.dcp_load`, the
other files are read with `weights_only=True` or as YAML. `latest_intact` skips a damaged newest one.
"""

from __future__ import annotations

import logging
import os
import random
import re
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_model_state_dict,
    set_state_dict,
)

from configs import PipelineConfig, save_config
from engines.common.device import accelerator_rng_state, set_accelerator_rng_state
from engines.common.io import default_modes
from engines.torch_engine.safe_load import CheckpointError, checkpoint_error, dcp_load, read_metadata

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


def rng_state() -> dict[str, Any]:
    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]],
    }
    acc = accelerator_rng_state()
    if acc is not None:
        state["accelerator"] = acc
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    np_state = state["numpy"]
    np.random.set_state((np_state[0], np.asarray(np_state[1], dtype=np.uint32), *np_state[2:]))
    if "accelerator" in state:
        set_accelerator_rng_state(state["accelerator"])


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


def app_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer, ema: dict | None) -> dict[str, Any]:
    """What DCP saves: keyed by unwrapped parameter names, sharded tensors as DTensors."""
    model_sd, optim_sd = get_state_dict(model, optimizer)
    state: dict[str, Any] = {"model": model_sd, "optim": optim_sd}
    if ema is not None:
        state["ema"] = ema
    return state


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


def _save_file(obj: Any, path: Path) -> None:
    """torch.save through a Python file: a full disk raises OSError(ENOSPC) naming the file, where
    torch's own path writer reports only "unexpected pos N vs M"."""
    with open(path, "wb") as f:
        torch.save(obj, f)


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


def save(
    train_dir: Path,
    step: int,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    lr_scheduler: Any,
    data_state: dict[str, Any],
    cfg: PipelineConfig,
    keep: int,
    *,
    extra: dict[str, Any] | None = None,
    ema: dict[str, torch.Tensor] | None = None,
    async_save: bool = False,
    group: Any = None,
) -> PendingCheckpoint:
    """Collective: every rank calls it, then `.wait()` on the result: at once, or later with
    `async_save`, where DCP writes in the background (over `group`, a gloo group of its own) while
    training goes on. The state is staged to host memory before this returns, so later steps cannot
    change what is written."""
    rank, world = _rank_world()
    root = checkpoint_dir(train_dir)
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:08d}"
    tmp = shared_tmp(root, final.name)
    device = next(model.parameters()).device
    pending = PendingCheckpoint(tmp, final, keep, device)
    try:
        state = app_state(model, optimizer, ema)
        if async_save:
            pending.future = dcp.async_save(
                state, checkpoint_id=str(tmp / "state"), process_group=group, no_dist=world == 1
            )
        else:
            dcp.save(state, checkpoint_id=str(tmp / "state"), no_dist=world == 1)
        (tmp / "rng").mkdir(exist_ok=True)
        _save_file(rng_state(), tmp / "rng" / f"rank-{rank:05d}.pt")
        if rank == 0:
            trainer_state = {
                "step": step,
                "data": data_state,
                "lr_scheduler": lr_scheduler.state_dict(),
                "world_size": world,
                **(extra or {}),
            }
            _save_file(trainer_state, tmp / "trainer_state.pt")
            save_config(cfg, tmp)
    except BaseException as exc:
        pending.error = exc
    return pending


def load(
    ckpt: Path,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    lr_scheduler: Any,
    ema: dict[str, torch.Tensor] | None = None,
) -> dict[str, Any]:
    """Restore in place into whatever layout the model has now; returns the trainer state.

    RNG states come back only when the layout has as many ranks as the one that saved: a resumed
    run on another layout continues correctly but not bit-for-bit.
    """
    state = torch.load(ckpt / "trainer_state.pt", weights_only=True, map_location="cpu")
    target = app_state(model, optimizer, ema)
    dcp_load(target, ckpt)
    set_state_dict(model, optimizer, model_state_dict=target["model"], optim_state_dict=target["optim"])
    lr_scheduler.load_state_dict(state["lr_scheduler"])
    rank, world = _rank_world()
    rng_file = ckpt / "rng" / f"rank-{rank:05d}.pt"
    if world == state.get("world_size", 1) and rng_file.is_file():
        set_rng_state(torch.load(rng_file, weights_only=True))
    return {**state, "step": int(state["step"]), "samples_seen": int(state["data"]["samples_seen"])}


def load_model_weights(ckpt: Path, model: torch.nn.Module, *, ema: bool = False) -> None:
    """Only the weights of a checkpoint, into a model of any layout (collective when distributed).

    With `ema`, the EMA copies replace the trained weights they shadow (all of them, or only the
    adapters of a LoRA run); other weights keep the checkpoint's values.
    """
    sd = get_model_state_dict(model)
    dcp_load({"model": sd}, ckpt)
    if ema:
        meta = read_metadata(ckpt / "state").state_dict_metadata
        names = [k[len("ema.") :] for k in meta if k.startswith("ema.")]
        if not names:
            raise ValueError(f"{ckpt} holds no EMA weights (train.ema.enabled was off when it was written)")
        dcp_load({"ema": {n: sd[n] for n in names}}, ckpt)
    set_model_state_dict(model, sd)


def full_model_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Collective: the unsharded weights on rank 0's CPU (empty on other ranks), for export."""
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def clean_partial(train_dir: Path) -> None:
    """What a killed run left half-made: unpublished or half-discarded checkpoints, and an export's
    temp or set-aside `final/` (`.final.*`)."""
    root = checkpoint_dir(train_dir)
    if root.is_dir():
        for p in root.glob(".step-*"):
            shutil.rmtree(p, ignore_errors=True)
    for p in Path(train_dir).glob(".final.*"):
        shutil.rmtree(p, ignore_errors=True)
