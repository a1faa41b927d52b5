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

    @classmethod
    def of(cls, section: Any, world: int) -> SamplingLayout:
        """The layout an `eval.parallel` section (EvalParallelConfig) gives `world` ranks; its ValueError when the
        degrees do not fit."""
        return cls(*section.layout(world), section.cp_mode)

    @property
    def group(self) -> int:
        """Ranks that make one sample together."""
        return self.cfg * self.cp

    @property
    def world(self) -> int:
        return self.dp * self.group

    def describe(self) -> str:
        return f"dp{self.dp} x cfg{self.cfg} x cp{self.cp}" + (f" ({self.cp_mode})" if self.cp > 1 else "")


def contiguous_block(n: int, parts: int, index: int) -> range:
    """Part `index` of n items split into `parts` contiguous blocks whose sizes differ by at most one: how eval ranks
    and served dp groups share samples, so a block generated from `seed + start` seeds item i with `seed + i`."""
    base, extra = divmod(n, parts)
    start = index * base + min(index, extra)
    return range(start, start + base + (1 if index < extra else 0))


def sampling_mesh(layout: SamplingLayout, device: torch.device) -> DeviceMesh | None:
    """The (dp, cfg, cp) mesh of this job, None for one rank. Every rank must call it (collective)."""
    if layout.world == 1:
        return None
    world = dist.get_world_size() if dist.is_initialized() else 1
    if world != layout.world:
        raise ValueError(f"sampling layout {layout.describe()} needs {layout.world} ranks, this job has {world}")
    return init_device_mesh(device.type, (layout.dp, layout.cfg, layout.cp), mesh_dim_names=("dp", "cfg", "cp"))


def _batch_input(args: tuple, kwargs: dict) -> torch.Tensor | None:
    """The call's latents: its first positional tensor or its `hidden_states` / `sample` / `x`."""
    if args and isinstance(args[0], torch.Tensor):
        return args[0]
    for name in BATCH_INPUTS:
        if isinstance(kwargs.get(name), torch.Tensor):
            return kwargs[name]
    return None


def _batch_size(args: tuple, kwargs: dict) -> int | None:
    latents = _batch_input(args, kwargs)
    return None if latents is None else latents.shape[0]


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


def _tensors(value: Any) -> list[torch.Tensor]:
    """The tensors of a denoiser output (a tensor, a tuple, diffusers' output dataclass), in order."""
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (tuple, list)):
        return [t for v in value for t in _tensors(v)]
    if isinstance(value, dict):
        return [t for v in value.values() for t in _tensors(v)]
    return []


def _empty_like(value: Any) -> Any:
    """A placeholder with `value`'s structure and shapes, filled in place later (`_Pairs`)."""
    if isinstance(value, torch.Tensor):
        return torch.empty_like(value)
    if isinstance(value, tuple):
        return type(value)(_empty_like(v) for v in value)
    if isinstance(value, dict):
        return type(value)(**{k: _empty_like(v) for k, v in value.items()})
    return value


class _Pairs:
    """CFG parallelism for a pipeline that calls the denoiser twice per step, conditional then unconditional on the
    same latents (diffusers' Wan and HunyuanVideo 1.5 pipelines; the family says so, `registry.paired_guidance`).

    cfg rank 0 computes the first call of each pair and rank 1 the second; each returns a placeholder for the call it
    skips, and at the second call the two outputs are exchanged and copied into the placeholders in place. That is
    exact because such a pipeline combines the two outputs only after both calls, holding the first output's tensor.
    The first pair runs whole on both ranks: it gives the output's shapes for the placeholders. A call that breaks the
    pattern (a second call on other latents or timestep) raises instead of guiding with a placeholder, and
    `paired_guidance` checks on exit that no pair was left half done."""

    def __init__(self, forward: Callable[..., Any], group: dist.ProcessGroup) -> None:
        self.forward, self.group = forward, group
        self.rank = dist.get_rank(group)
        self.shapes: dict[tuple, Any] = {}  # (latent shape, dtype) -> an output of the same shapes
        self.pending: tuple[torch.Tensor, Any, Any] | None = None  # (latents, timestep, first output or None)

    def __call__(self, latents: torch.Tensor, args: tuple, kwargs: dict, checks: list) -> Any:
        timestep = kwargs.get("timestep", args[1] if len(args) > 1 else None)
        if self.pending is None:
            key = (tuple(latents.shape), latents.dtype)
            if self.check_done not in checks:
                checks.append(self.check_done)
            if key not in self.shapes:  # the first pair: both calls whole on both ranks, shapes learned
                out = self.forward(*args, **kwargs)
                self.shapes[key] = out
                self.pending = (latents, timestep, None)
                return out
            out = self.forward(*args, **kwargs) if self.rank == 0 else _empty_like(self.shapes[key])
            self.pending = (latents, timestep, out)
            return out
        first_latents, first_timestep, first = self.pending
        self.pending = None
        same_t = timestep is first_timestep or (
            isinstance(timestep, torch.Tensor) and isinstance(first_timestep, torch.Tensor)
            and timestep.shape == first_timestep.shape and torch.equal(timestep, first_timestep)
        )  # fmt: skip
        if latents is not first_latents or not same_t:
            raise RuntimeError(
                "cfg parallel: this pipeline was expected to call the denoiser in pairs (conditional, then "
                "unconditional on the same latents and timestep), but the second call differs; the family's "
                "paired-guidance setting does not match its pipeline: use eval.parallel.cfg: 1"
            )
        if first is None:
            return self.forward(*args, **kwargs)
        out = self.forward(*args, **kwargs) if self.rank == 1 else _empty_like(first)
        mine = _tensors(first if self.rank == 0 else out)
        for i, tensor in enumerate(mine):
            parts = [torch.empty_like(tensor) for _ in range(2)]
            dist.all_gather(parts, tensor.contiguous(), group=self.group)
            # rank 0 receives the second call's output, rank 1 the first's (into what the pipeline already holds)
            (_tensors(out)[i] if self.rank == 0 else _tensors(first)[i]).copy_(parts[1 - self.rank])
        return out

    def check_done(self) -> None:
        if self.pending is not None:
            self.pending = None
            raise RuntimeError(
                "cfg parallel: the pipeline made the first call of a conditional/unconditional pair and no second one "
                "(guidance switched off for some steps?): its output was a placeholder; use eval.parallel.cfg: 1"
            )


def apply_cfg_parallel(model: nn.Module, group: dist.ProcessGroup) -> None:
    """In place. Afterwards a call of `model` on a batch divisible by the group size runs 1/size of the batch on each
    rank of `group` and returns the whole output on every rank; inside `registry.paired_guidance` the calls of a
    conditional/unconditional pair run on the two ranks (`_Pairs`); other calls run whole (logged once).

    It wraps the module's forward from the inside (installed before diffusers' context-parallel hooks, which then
    wrap it), so it can skip a call, which a forward hook cannot."""
    from flowspeed.engines.models.registry import paired_guidance_checks

    size, rank = dist.get_world_size(group), dist.get_rank(group)
    inner = model.forward
    pairs = _Pairs(inner, group) if size == 2 else None
    warned: list[bool] = []

    def forward(*args: Any, **kwargs: Any) -> Any:
        n = _batch_size(args, kwargs)
        if n is not None and n % size == 0:
            args = tuple(_split(a, n, size, rank) for a in args)
            kwargs = {k: v if k in UNBATCHED else _split(v, n, size, rank) for k, v in kwargs.items()}
            return _gather(inner(*args, **kwargs), group, size)
        checks = paired_guidance_checks()
        latents = _batch_input(args, kwargs)
        if checks is not None and pairs is not None and latents is not None:
            return pairs(latents, args, kwargs, checks)
        if not warned:
            warned.append(True)
            log.warning(
                "cfg parallel: %s called on a batch of %s, not divisible by %d and not a conditional/"
                "unconditional pair: it runs whole on every cfg rank",
                type(model).__name__,
                n,
                size,
            )
        return inner(*args, **kwargs)

    model.forward = forward


class SamplingSetup:
    """What `registry.sampling_setup` applies to each denoiser a `generate` loads: CFG and context parallelism on this
    job's mesh, then `extra` (the step cache). One object per eval, so a kept-loaded denoiser is set up once."""

    def __init__(
        self, layout: SamplingLayout, mesh: DeviceMesh | None, extra: Callable[[nn.Module], None] | None = None
    ) -> None:
        self.layout, self.mesh, self.extra = layout, mesh, extra

    def __call__(self, model: nn.Module) -> None:
        if self.mesh is not None and self.layout.cfg > 1:  # first: its forward wrapper sits inside diffusers' hooks
            apply_cfg_parallel(model, self.mesh["cfg"].get_group())
        if self.mesh is not None and self.layout.cp > 1:
            from flowspeed.engines.torch_engine.context_parallel import apply_context_parallel

            apply_context_parallel(model, self.mesh["cp"], self.layout.cp_mode)
        if self.extra is not None:
            self.extra(model)
