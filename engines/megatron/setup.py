"""Joining megatron-core's parallel state in a rank that already has a torch.distributed process group."""

from __future__ import annotations

import torch
from flowspeed.engines.common.extras import require


def init_model_parallel(tp: int = 1, pp: int = 1, vpp: int | None = None, cp: int = 1, seed: int = 1234) -> None:
    """megatron-core's TP/PP/CP groups and its per-TP-rank RNG streams. On CPU ranks the CUDA-only parts
    of megatron-core are patched first (engines/megatron/cpu_compat.py); GPU runs never load that."""
    require("megatron.core", "train.engine: megatron")  # the `megatron` extra
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    if not torch.cuda.is_available():
        from flowspeed.engines.megatron import cpu_compat

        cpu_compat.apply()
    world = torch.distributed.get_world_size()
    if world % (tp * pp * cp):
        raise ValueError(f"tp={tp} x pp={pp} x cp={cp} does not divide the world size {world}")
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        virtual_pipeline_model_parallel_size=vpp,
        context_parallel_size=cp,
    )
    model_parallel_cuda_manual_seed(seed)
