"""Everything a training process sets up before its first step, in one place.

`init_distributed` joins the process group (flowspeed.engines.common.device.init_process_group: NCCL, HCCL or gloo,
with the configured collective timeout), `build_model` makes the sharded model from rank 0's weights,
`Ema` keeps shadow weights in the parameters' own (sharded) layout, and `step_profiler` records a
step window with torch.profiler.
"""

from __future__ import annotations

import os
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from flowspeed.configs import PipelineConfig
from flowspeed.configs.schema import ProfileConfig
from flowspeed.engines.common.device import (
    init_process_group,
    profiler_activities,
    profiler_module,
    resolve_device,
    set_current,
)
from flowspeed.engines.models.registry import ModelFamily, seeded_init
from flowspeed.engines.torch_engine.lora import apply_lora, load_adapter
from flowspeed.engines.torch_engine.parallel_dims import Meshes, ParallelDims, dp_coordinates
from flowspeed.engines.torch_engine.parallelize import (
    _plain,
    compile_cache,
    materialize,
    parallelize,
    wrap_data_parallel,
)
from torch import nn
from torch.distributed.tensor import DTensor


@dataclass
class Env:
    rank: int
    world: int
    device: torch.device
    dims: ParallelDims
    mesh: Meshes | None
    dp_rank: int
    dp_world: int


def init_distributed(cfg: PipelineConfig) -> Env:
    """Validate the layout against the world size first: a wrong one fails before any model loads."""
    t = cfg.train
    world = int(os.environ.get("WORLD_SIZE", 1))
    rank = int(os.environ.get("RANK", 0))
    p = t.parallel
    dims = ParallelDims(p.dp_replicate, p.dp_shard, p.cp, p.tp, p.pp, world)
    device = resolve_device(t.device)
    if world > 1:
        init_process_group(device, t.collective_timeout_s)
    else:
        set_current(device)
    mesh = dims.build_mesh(device.type) if world > 1 else None
    dp_rank, dp_world = dp_coordinates(mesh) if mesh is not None else (0, 1)
    return Env(rank, world, device, dims, mesh, dp_rank, dp_world)


def build_model(
    family: ModelFamily, cfg: PipelineConfig, model_args: dict[str, int], env: Env, *, frozen: bool = False
) -> nn.Module:
    """Rank 0 loads the weights the ordinary way on CPU (pretrained files or a seeded preset); every
    rank builds the same architecture on the meta device, shards it, then receives its shards of
    rank 0's weights. Only rank 0 ever holds the whole model, and only in host memory.

    `frozen`: the starting model without adapters, every parameter frozen, in the same layout but never wrapped
    for gradient reduction: a preference method's reference model (engines/methods/reference.py)."""
    t = cfg.train
    if frozen:
        t = t.model_copy(update={"lora": t.lora.model_copy(update={"enabled": False, "init_from": None})})
        cfg = cfg.model_copy(update={"train": t})
    if t.compile:
        compile_cache(t.compile_cache_dir, cfg.workdir / ".cache" / "inductor")
    full = family.load_transformer(cfg.model, **model_args) if env.rank == 0 else None
    if full is not None:
        family.set_trainable(full, cfg.model)  # e.g. a VLM's frozen vision tower; LoRA then freezes the rest
    if full is not None and t.lora.enabled:
        with seeded_init(t.seed):  # the adapters' random init is the same on every layout
            apply_lora(full, t.lora, family.lora_targets, family.lora_exclude)
        if t.lora.init_from:  # an adapter trained elsewhere; the other ranks receive it with rank 0's weights
            load_adapter(full, t.lora.init_from, getattr(family, "pipeline_cls", None), family.denoiser_subfolder)
    if full is not None and frozen:
        full.requires_grad_(False)
    if env.world == 1:
        parallelize(full, None, env.dims, t)
        return full.to(env.device)
    spec = [(type(full), full.config) if full is not None else None]
    dist.broadcast_object_list(spec, src=0)
    cls, config = spec[0]
    with torch.device("meta"):  # diffusers: from_config; transformers: _from_config
        model = cls._from_config(config) if hasattr(cls, "_from_config") else cls.from_config(config)
        family.set_trainable(model, cfg.model)  # requires_grad is not in a state dict: every rank sets it
        if t.lora.enabled:
            apply_lora(model, t.lora, family.lora_targets, family.lora_exclude)
        if frozen:
            model.requires_grad_(False)
    parallelize(model, env.mesh, env.dims, t)
    materialize(model, full, env.device)
    del full
    return model if frozen else wrap_data_parallel(model, env.mesh, env.dims)


def unwrap(model: nn.Module) -> nn.Module:
    """The model under a DDP wrapper (FSDP2, TP and AC wrap in place or per block)."""
    return getattr(model, "module", model)


@contextmanager
def grad_sync(model: nn.Module, enabled: bool):
    """Skip the gradient all-reduce / reduce-scatter on all but the last accumulation micro-batch."""
    if hasattr(model, "set_requires_gradient_sync"):  # FSDP2
        model.set_requires_gradient_sync(enabled)
        yield
    elif hasattr(model, "no_sync") and not enabled:  # DDP
        with model.no_sync():
            yield
    else:
        yield


def full_value(t: torch.Tensor) -> torch.Tensor:
    """A DTensor's global value (collective), or the tensor itself."""
    return t.full_tensor() if isinstance(t, DTensor) else t


class Ema:
    """Exponential moving average of the trainable weights, kept in each parameter's own layout
    (FSDP shards / TP shards), so it costs one extra copy of this rank's shard and no communication."""

    def __init__(self, model: nn.Module, decay: float) -> None:
        self.decay = decay
        self.params = {_plain(n): p for n, p in unwrap(model).named_parameters() if p.requires_grad}
        self.shadow = {n: p.detach().clone() for n, p in self.params.items()}

    @torch.no_grad()
    def update(self) -> None:
        for n, p in self.params.items():
            self.shadow[n].lerp_(p.detach(), 1.0 - self.decay)


def step_profiler(cfg: ProfileConfig, device: torch.device, out_dir: Path, rank: int) -> AbstractContextManager:
    """A profiler over steps [start, start + warmup + active), one Chrome trace per rank."""
    if not cfg.enabled:
        return nullcontext()
    prof = profiler_module(device)
    out_dir.mkdir(parents=True, exist_ok=True)

    def on_ready(p: Any) -> None:
        p.export_chrome_trace(str(out_dir / f"rank-{rank:05d}.json"))

    return prof.profile(
        activities=profiler_activities(device),
        schedule=prof.schedule(wait=cfg.start_step, warmup=cfg.warmup_steps, active=cfg.active_steps, repeat=1),
        on_trace_ready=on_ready,
        record_shapes=cfg.record_shapes,
        profile_memory=cfg.profile_memory,
    )
