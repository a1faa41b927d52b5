"""Parallelism, recomputation and compile, applied to an unmodified model from outside.

    model = build on the meta device
    parallelize(model, mesh, dims, train_cfg)   # TP -> CP -> AC -> compile -> FSDP2 / DDP (CP "dsp": after AC)
    materialize(model, full_state_dict_on_rank0, device)

The order matters and is the one torchtitan documents: tensor parallel rewrites Linear layers into
DTensor shards, context parallel wraps attention, activation checkpointing and compile wrap whole
blocks, and FSDP2 shards what is left last so that each block is one all-gather/reduce-scatter unit.
Model code never sees any of it: diffusers/transformers classes are used as shipped.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch
import torch.distributed as dist
from flowspeed.configs.schema import TrainConfig
from flowspeed.engines.common.device import torch_dtype
from flowspeed.engines.torch_engine.parallel_dims import Meshes, ParallelDims
from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.nn.parallel import DistributedDataParallel
from torch.utils._pytree import tree_map_only
from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

# Where each library keeps its repeated blocks: diffusers DiTs and UNets; transformers decoders,
# VLM language models and vision towers, encoder-decoder (Whisper) stacks.
BLOCK_LISTS = (
    "transformer_blocks", "single_transformer_blocks", "down_blocks", "up_blocks",
    "model.layers", "layers", "model.language_model.layers", "model.visual.blocks", "visual.blocks",
    "model.encoder.layers", "model.decoder.layers", "model.vision_tower.vision_model.encoder.layers",
    "blocks", "spatial_blocks", "temporal_blocks",  # OpenSora's STDiT / STDiT3 (engines/models/dits)
    "transformer.blocks", "transformer_2.blocks",  # Wan2.2 A14B's expert pair trained together (wan.WanExpertPair)
)  # fmt: skip


# Blocks a forward calls a data-dependent number of times: a VLM's vision tower runs once for the images,
# once for the videos, or not at all, so ranks holding different media would issue different FSDP
# all-gathers (a collective mismatch). They stay in the root's unit, gathered once per forward.
MEDIA_BLOCK_LISTS = ("model.visual.blocks", "visual.blocks")


def block_lists(model: nn.Module, skip: tuple[str, ...] = ()) -> list[nn.ModuleList]:
    """The model's repeated-block containers: the unit of sharding, recomputation and compile."""
    found = []
    skipped = [_at(model, path) for path in skip]
    for path in BLOCK_LISTS:
        mod = _at(model, path)
        if isinstance(mod, nn.ModuleList) and len(mod) and all(mod is not f for f in found + skipped):
            found.append(mod)
    if not found and not skipped:
        raise ValueError(
            f"{type(model).__name__} has none of the block lists {BLOCK_LISTS}; the engine shards, recomputes "
            "and compiles per block, so register where this model keeps its blocks in BLOCK_LISTS"
        )
    return found


def _at(model: nn.Module, path: str) -> nn.Module | None:
    mod: nn.Module | None = model
    for part in path.split("."):
        mod = getattr(mod, part, None)
    return mod


# Selective recomputation keeps what is expensive to recompute (matmuls, attention) and recomputes
# the cheap, memory-heavy rest (norms, activations, elementwise ops): most of full AC's memory saving
# at a fraction of its extra compute.
_SAVE_OPS = {
    torch.ops.aten.mm.default,
    torch.ops.aten.addmm.default,
    torch.ops.aten.bmm.default,
    torch.ops.aten.baddbmm.default,
    torch.ops.aten.convolution.default,
    torch.ops.aten._scaled_dot_product_flash_attention.default,
    torch.ops.aten._scaled_dot_product_efficient_attention.default,
    torch.ops.aten._scaled_dot_product_cudnn_attention.default,
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default,
}


def _sac_policy(ctx, op, *args, **kwargs) -> CheckpointPolicy:  # noqa: ANN001
    return CheckpointPolicy.MUST_SAVE if op in _SAVE_OPS else CheckpointPolicy.PREFER_RECOMPUTE


def apply_ac(model: nn.Module, mode: str) -> None:
    """Wrap every block in activation checkpointing: "full" recomputes it all, "selective" all but matmuls."""
    if mode == "none":
        return
    if mode not in ("full", "selective"):
        raise ValueError(f"unknown activation_checkpointing {mode!r}; use none, full or selective")
    for blocks in block_lists(model):
        for i, block in enumerate(blocks):
            if mode == "full":
                blocks[i] = checkpoint_wrapper(block, preserve_rng_state=True)
            else:
                ctx = partial(create_selective_checkpoint_contexts, _sac_policy)
                blocks[i] = checkpoint_wrapper(block, context_fn=ctx, preserve_rng_state=True)


def compile_cache(cache_dir: Path | None, default: Path) -> Path:
    """Inductor's on-disk caches survive the process, so the second run of a job skips most of the
    first compile (15-40 s per block type on CPU here, minutes for large models on GPU).

    A configured directory wins; otherwise an inherited TORCHINDUCTOR_CACHE_DIR, else `default`.
    """
    chosen = cache_dir or Path(os.environ.get("TORCHINDUCTOR_CACHE_DIR") or default)
    chosen.mkdir(parents=True, exist_ok=True)
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(chosen.resolve())
    os.environ.setdefault("TORCHINDUCTOR_FX_GRAPH_CACHE", "1")
    os.environ.setdefault("TORCHINDUCTOR_AUTOGRAD_CACHE", "1")
    return chosen


@torch.compiler.disable  # eager, so the block's graph sees its result: compiling it would recompile it instead
def _contiguous_inputs(_: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    return tree_map_only(torch.Tensor, lambda t: t.contiguous(), (args, kwargs))


def apply_compile(model: nn.Module, backend: str | Callable = "inductor") -> None:
    """Regional compile: each block compiled in place (nn.Module.compile keeps state-dict keys), so
    identical blocks share one graph and a recompile never covers the whole model.

    Dynamo guards on strides, and a model often hands its first block views (CogVideoX slices text and
    video out of one tensor) but later blocks fresh contiguous outputs: one more graph for the same code.
    An eager pre-hook gives every block contiguous inputs (a copy only where one was a view)."""
    for blocks in block_lists(model):
        for block in blocks:
            block.register_forward_pre_hook(_contiguous_inputs, with_kwargs=True)
            block.compile(fullgraph=False, backend=backend)


def apply_fsdp(model: nn.Module, dp_mesh: DeviceMesh, param_dtype: str, reduce_dtype: str, reshard: bool) -> None:
    """FSDP2 per block, then the root (embeddings, final norm and head). A 2-D mesh is HSDP:
    shard within dp_shard, replicate across dp_replicate."""
    mp = MixedPrecisionPolicy(param_dtype=torch_dtype(param_dtype), reduce_dtype=torch_dtype(reduce_dtype))
    for blocks in block_lists(model, skip=MEDIA_BLOCK_LISTS):
        for i, block in enumerate(blocks):
            # The last block's params are needed again at once by backward: keep them gathered.
            fully_shard(block, mesh=dp_mesh, mp_policy=mp, reshard_after_forward=reshard and i < len(blocks) - 1)
    fully_shard(model, mesh=dp_mesh, mp_policy=mp, reshard_after_forward=reshard)


def parallelize(model: nn.Module, mesh: Meshes | None, dims: ParallelDims, cfg: TrainConfig) -> nn.Module:
    """Apply the configured layout in order, on the meta device; DDP comes after `materialize`."""
    if dims.tp > 1:
        from flowspeed.engines.torch_engine.tensor_parallel import apply_tp

        apply_tp(model, mesh["tp"], sequence_parallel=cfg.parallel.sequence_parallel)
    dsp = dims.cp > 1 and cfg.parallel.cp_mode == "dsp"
    if dims.cp > 1 and not dsp:
        from flowspeed.engines.torch_engine.context_parallel import apply_context_parallel

        apply_context_parallel(model, mesh["cp"], cfg.parallel.cp_mode)
    apply_ac(model, cfg.activation_checkpointing)
    if dsp:  # after AC: its all-to-all hooks then sit on the checkpoint wrappers, outside the recomputed region
        from flowspeed.engines.torch_engine.dsp import apply_dsp

        apply_dsp(model, mesh["cp"])
    if cfg.compile:
        apply_compile(model)
    if dims.fsdp:
        dp_mesh = mesh["dp_replicate", "dp_shard"] if dims.dp_replicate > 1 else mesh["dp_shard"]
        f = cfg.fsdp
        apply_fsdp(model, dp_mesh, f.param_dtype, f.reduce_dtype, f.reshard_after_forward)
    return model


def materialize(model: nn.Module, full: nn.Module | None, device: torch.device) -> None:
    """Give a meta-device (and possibly sharded) model real storage and rank 0's weights.

    Rank 0 holds `full`, the model loaded the ordinary way (pretrained files or a seeded preset) on
    CPU; every other rank passes None. Parameters and persistent buffers arrive through DCP's
    broadcast into each rank's shard; non-persistent buffers (rotary tables, position grids), which
    no state dict carries, are copied on rank 0 and broadcast one by one.
    """
    model.to_empty(device=device)
    sd = full.state_dict() if full is not None else {}
    opts = StateDictOptions(full_state_dict=True, broadcast_from_rank0=dist.is_initialized(), strict=True)
    set_model_state_dict(model, sd, options=opts)
    persistent = {_plain(k) for k in model.state_dict()}
    source = {_plain(k): b for k, b in full.named_buffers()} if full is not None else {}
    for name, buf in model.named_buffers():
        if _plain(name) in persistent:
            continue
        if full is not None:
            buf.copy_(source[_plain(name)])
        if dist.is_initialized():
            dist.broadcast(buf, src=0)


def wrap_data_parallel(model: nn.Module, mesh: Meshes | None, dims: ParallelDims) -> nn.Module:
    """DDP for pure replication (after materialize: DDP broadcasts real weights at construction)."""
    if not dims.ddp:
        return model
    if dims.tp > 1 or dims.cp > 1:
        raise ValueError(
            "tensor/context parallel with pure replication (dp_replicate > 1, dp_shard = 1) is not supported: "
            "DDP cannot wrap DTensor parameters; set dp_shard > 1 (FSDP2/HSDP) for the data-parallel ranks"
        )
    return DistributedDataParallel(model, process_group=mesh["dp_replicate"].get_group())


def _plain(name: str) -> str:
    """A name as the unwrapped model spells it (the checkpoint wrapper adds a prefix)."""
    return name.replace("_checkpoint_wrapped_module.", "")
