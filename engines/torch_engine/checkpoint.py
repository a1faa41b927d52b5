"""Sharded, atomic, self-describing checkpoints with torch.distributed.checkpoint (DCP).

    <train_dir>/checkpoints/step-00000010/
        state/                DCP: model + optimizer (+ EMA), each rank writing its own shards
        trainer_state.pt      step, LR schedule, sampler position, layout, model args (weights_only)
        rng/rank-00000.pt     every rank's RNG states
        config.yaml           the resolved config that made it

DCP stores tensors by fully qualified name with their global shapes, so a checkpoint written by 2
FSDP ranks loads into 1 process, or into a TP layout, and DCP reshards on read. Publishing (one temp
directory for all ranks, one rename after they agree, pruning) and finding checkpoints are the same for
both engines: engines/common/checkpoints.py, whose names this module re-exports.

Nothing a checkpoint holds can run code when read: DCP state goes through `safe_load.dcp_load`, the
other files are read with `weights_only=True` or as YAML. `latest_intact` skips a damaged newest one.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed.checkpoint as dcp
from flowspeed.configs import PipelineConfig, save_config
from flowspeed.engines.common.checkpoints import (  # noqa: F401  (the publishing side, engine-neutral; re-exported for callers)
    STEP_RE,
    PendingCheckpoint,
    _rank_world,
    checkpoint_dir,
    clean_partial,
    discard,
    latest,
    latest_intact,
    list_checkpoints,
    shared_tmp,
    verify,
)
from flowspeed.engines.common.device import accelerator_rng_state, set_accelerator_rng_state
from flowspeed.engines.common.safe_load import CheckpointError, dcp_load, read_metadata  # noqa: F401  (re-exported)
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_model_state_dict,
    set_state_dict,
)


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


def app_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer, ema: dict | None) -> dict[str, Any]:
    """What DCP saves: keyed by unwrapped parameter names, sharded tensors as DTensors."""
    model_sd, optim_sd = get_state_dict(model, optimizer)
    state: dict[str, Any] = {"model": model_sd, "optim": optim_sd}
    if ema is not None:
        state["ema"] = ema
    return state


def _save_file(obj: Any, path: Path) -> None:
    """torch.save through a Python file: a full disk raises OSError(ENOSPC) naming the file, where
    torch's own path writer reports only "unexpected pos N vs M"."""
    with open(path, "wb") as f:
        torch.save(obj, f)


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
