"""Atomic, self-describing checkpoints: safetensors weights + a weights_only-loadable trainer state.

    <train_dir>/checkpoints/step-00000010/
        model.safetensors     the denoiser (unwrapped from DDP)
        trainer_state.pt      optimizer, LR scheduler, step, sampler state, RNG states
        config.yaml           the resolved config that made it

A checkpoint directory is written under a temp name and renamed: `latest()` never sees half of one.
"""

from __future__ import annotations

import os
import random
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from configs import PipelineConfig, save_config

STEP_RE = re.compile(r"^step-(\d{8})$")


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


def rng_state() -> dict[str, Any]:
    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]],
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    np_state = state["numpy"]
    np.random.set_state((np_state[0], np.asarray(np_state[1], dtype=np.uint32), *np_state[2:]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save(
    train_dir: Path,
    step: int,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    lr_scheduler: Any,
    data_state: dict[str, int],
    cfg: PipelineConfig,
    keep: int,
) -> Path:
    root = checkpoint_dir(train_dir)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:08d}"
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=root))
    try:
        state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
        save_file(state, str(tmp / "model.safetensors"))
        torch.save(
            {
                "step": step,
                "data": data_state,
                "optimizer": optimizer.state_dict(),
                "lr_scheduler": lr_scheduler.state_dict(),
                "rng": rng_state(),
            },
            tmp / "trainer_state.pt",
        )
        save_config(cfg, tmp)
        if final.exists():  # a re-run of the same step: replace it whole
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for old in list_checkpoints(train_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load(ckpt: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, lr_scheduler: Any) -> dict[str, Any]:
    """Restore in place; returns {"step", "data", "samples_seen"}. Never unpickles code (weights_only=True)."""
    model.load_state_dict(load_file(str(ckpt / "model.safetensors")))
    state = torch.load(ckpt / "trainer_state.pt", weights_only=True, map_location="cpu")
    optimizer.load_state_dict(state["optimizer"])
    lr_scheduler.load_state_dict(state["lr_scheduler"])
    set_rng_state(state["rng"])
    return {"step": int(state["step"]), "data": state["data"], "samples_seen": int(state["data"]["samples_seen"])}


def clean_partial(train_dir: Path) -> None:
    root = checkpoint_dir(train_dir)
    if root.is_dir():
        for p in root.glob(".step-*"):
            shutil.rmtree(p, ignore_errors=True)
