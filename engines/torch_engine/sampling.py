"""Parallel sampling: one video made by several ranks, for eval and serving (`eval.parallel`).

Why: a generation eval (or a served request) on a real video DiT spends minutes per sample in one device's denoiser
calls, and splitting *prompts* across ranks does not shorten any one of them. Two splits of a single sample do:

- **CFG parallel** (`cfg: 2`): a guided sampler calls the denoiser on a doubled batch (unconditional ++ conditional
  halves); rank c of the cfg group runs half c and the halves are all-gathered back, so every rank continues the
  sampler with the full doubled output. It is a batch split inside one call, exact for any per-sample denoiser
  (no batch statistics at inference), so it needs no knowledge of which half is which. A call whose batch does not
  split (a family without a doubled batch: Flux's embedded guidance, HunyuanVideo) runs whole on every rank.
- **Context parallel** (`cp`): the training engine's plans (engines/torch_engine/context_parallel.py: diffusers'
  `_cp_plan` for Flux and Wan, ours for CogVideoX, HunyuanVideo (1.5), LTX and the video DiTs flowspeed defines; DSP
  for STDiT3) split each call's token sequence; every CP rank gets the full output back.

Ranks form a (dp, cfg, cp) mesh, cp innermost: the cfg x cp ranks of one dp group are consecutive, make the same
sample from the same seed and inputs, and its first rank writes it (evaluation/sharded.py `Ranks.group`). Both splits
are applied from outside the module (forward hooks, diffusers' CP hooks), through `GeneratingFamily.ready`, so every
family's `generate` — a diffusers pipeline or our own sampler — runs unchanged.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

log = logging.getLogger(__name__)

#: keyword inputs that are never batched even when their first size equals the batch (Flux's (S, 3) position ids)
UNBATCHED = frozenset({"img_ids", "txt_ids", "image_rotary_emb", "rotary_emb", "joint_attention_kwargs",
                       "attention_kwargs", "return_dict"})  # fmt: skip
#: the first-positional or keyword input whose first size is the call's batch
BATCH_INPUTS = ("hidden_states", "sample", "x")


@dataclass(frozen=True)
class SamplingLayout:
    dp: int = 1
    cfg: int = 1
    cp: int = 1
    cp_mode: str = "ulysses"

    @property
    def group(self) -> int:
        """Ranks that make one sample together."""
        return self.cfg * self.cp

    @property
    def world(self) -> int:
        return self.dp * self.group

    def describe(self) -> str:
        return f"dp{self.dp} x cfg{self.cfg} x cp{self.cp}" + (f" ({self.cp_mode})" if self.cp > 1 else "")


def sampling_mesh(layout: SamplingLayout, device: torch.device) -> DeviceMesh | None:
    """The (dp, cfg, cp) mesh of this job, None for one rank. Every rank must call it (collective)."""
    if layout.world == 1:
        return None
    world = dist.get_world_size() if dist.is_initialized() else 1
    if world != layout.world:
        raise ValueError(f"sampling layout {layout.describe()} needs {layout.world} ranks, this job has {world}")
    return init_device_mesh(device.type, (layout.dp, layout.cfg, layout.cp), mesh_dim_names=("dp", "cfg", "cp"))


def _batch_size(args: tuple, kwargs: dict) -> int | None:
    if args and isinstance(args[0], torch.Tensor):
        return args[0].shape[0]
    for name in BATCH_INPUTS:
        if isinstance(kwargs.get(name), torch.Tensor):
            return kwargs[name].shape[0]
    return None


def _split(value: Any, n: int, size: int, rank: int) -> Any:
    """Rank `rank`'s 1/size of every tensor batched by n (first dim n), through dicts (SDXL's added_cond_kwargs)."""
    if isinstance(value, torch.Tensor) and value.ndim > 0 and value.shape[0] == n:
        return value.chunk(size)[rank].contiguous()
    if isinstance(value, dict):
        return {k: _split(v, n, size, rank) for k, v in value.items()}
    return value


def _gather(value: Any, group: dist.ProcessGroup, size: int) -> Any:
    """The cfg group's outputs concatenated along the batch, through tuples and diffusers' output dataclasses."""
    if isinstance(value, torch.Tensor):
        parts = [torch.empty_like(value) for _ in range(size)]
        dist.all_gather(parts, value.contiguous(), group=group)
        return torch.cat(parts)
    if isinstance(value, tuple):
        return type(value)(_gather(v, group, size) for v in value)
    if isinstance(value, dict):  # diffusers' BaseOutput is an OrderedDict dataclass
        return type(value)(**{k: _gather(v, group, size) for k, v in value.items()})
    return value


def apply_cfg_parallel(model: nn.Module, group: dist.ProcessGroup) -> None:
    """In place. Afterwards each call of `model` on a batch divisible by the group size runs 1/size of the batch on
    each rank of `group` and returns the whole output on every rank; other calls run whole (logged once)."""
    size, rank = dist.get_world_size(group), dist.get_rank(group)
    split_calls: list[bool] = []  # a stack: the post-hook gathers only what its pre-hook split
    warned: list[bool] = []

    def pre(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        n = _batch_size(args, kwargs)
        if n is None or n % size:
            if not warned:
                warned.append(True)
                name = type(module).__name__
                log.warning("cfg parallel: %s called on a batch of %s, not divisible by %d: it runs whole on "
                            "every cfg rank (no doubled guidance batch to split)", name, n, size)  # fmt: skip
            split_calls.append(False)
            return args, kwargs
        split_calls.append(True)
        args = tuple(_split(a, n, size, rank) for a in args)
        kwargs = {k: v if k in UNBATCHED else _split(v, n, size, rank) for k, v in kwargs.items()}
        return args, kwargs

    def post(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        return _gather(output, group, size) if split_calls.pop() else output

    model.register_forward_pre_hook(pre, with_kwargs=True)
    model.register_forward_hook(post, with_kwargs=True)


class SamplingSetup:
    """What `registry.sampling_setup` applies to each denoiser a `generate` loads: CFG and context parallelism on this
    job's mesh, then `extra` (the step cache). One object per eval, so a kept-loaded denoiser is set up once."""

    def __init__(
        self, layout: SamplingLayout, mesh: DeviceMesh | None, extra: Callable[[nn.Module], None] | None = None
    ) -> None:
        self.layout, self.mesh, self.extra = layout, mesh, extra

    def __call__(self, model: nn.Module) -> None:
        if self.mesh is not None and self.layout.cp > 1:
            from flowspeed.engines.torch_engine.context_parallel import apply_context_parallel

            apply_context_parallel(model, self.mesh["cp"], self.layout.cp_mode)
        if self.mesh is not None and self.layout.cfg > 1:
            apply_cfg_parallel(model, self.mesh["cfg"].get_group())
        if self.extra is not None:
            self.extra(model)
