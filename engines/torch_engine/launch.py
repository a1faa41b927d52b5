"""Run training in this process, or as a torchrun job when the layout spans several ranks.

One node: `torchrun --standalone`. Several nodes: the same command on every node with
`train.nnodes`, `train.node_rank` and `train.rdzv_endpoint` (c10d rendezvous), e.g. one Prefect task
per node from a work pool whose workers sit on those nodes (see README, "Multi-node training").
"""

from __future__ import annotations

import json
from pathlib import Path

from configs import PipelineConfig, save_config
from engines.models import get_family
from engines.torch_engine.parallel_dims import ParallelDims
from engines.torch_engine.trainer import TrainResult, train
from engines.torchrun import in_distributed_job, run_torchrun


def validate_layout(cfg: PipelineConfig) -> ParallelDims:
    """Fail in milliseconds, before any process starts or model loads, on a layout the ranks can't form."""
    t = cfg.train
    p = t.parallel
    if t.nnodes > 1 and not t.rdzv_endpoint:
        raise ValueError(f"train.nnodes={t.nnodes} needs train.rdzv_endpoint (host:port reachable from every node)")
    if t.node_rank >= t.nnodes:
        raise ValueError(f"train.node_rank={t.node_rank} must be below train.nnodes={t.nnodes}")
    if p.pp_schedule == "interleaved_1f1b" and p.pp_virtual_stages < 2:
        raise ValueError("train.parallel.pp_schedule=interleaved_1f1b needs pp_virtual_stages >= 2")
    if t.lora.enabled and p.tp > 1:
        raise ValueError(
            "train.lora with train.parallel.tp > 1 is not supported: the TP plans shard the very projections "
            "LoRA wraps; shard a LoRA run with FSDP (parallel.dp_shard) instead"
        )
    get_family(cfg.model.family).frozen_prefixes(cfg.model)  # refuses a freeze the family cannot honour
    return ParallelDims(p.dp_replicate, p.dp_shard, p.cp, p.tp, p.pp, t.nnodes * t.nproc_per_node)


def launch(cfg: PipelineConfig, run_id: str | None, tracking_uri: str | None) -> TrainResult:
    t = cfg.train
    megatron = t.engine == "megatron"
    if megatron:
        # megatron-core keeps its parallel state in module globals (and, on CPU, patches them): always a
        # torchrun job of its own, never inside this (possibly long-lived) worker process.
        from engines.megatron.trainer import train as train_megatron
        from engines.megatron.trainer import validate

        validate(cfg)
        if in_distributed_job():  # already a rank of a torchrun job (a multi-node task): train here
            return train_megatron(cfg, run_id, tracking_uri)
    elif in_distributed_job():
        return train(cfg, run_id, tracking_uri)
    else:
        validate_layout(cfg)
    if t.nproc_per_node * t.nnodes == 1 and not megatron:
        return train(cfg, run_id, tracking_uri)
    cfg_path = save_config(cfg, cfg.train_dir, "launch_config.yaml")
    args = ["--config", str(cfg_path)]
    if run_id:
        args += ["--run-id", run_id, "--tracking-uri", tracking_uri or ""]
    rdzv = None
    if t.nnodes > 1:
        rdzv = {"nnodes": t.nnodes, "node_rank": t.node_rank, "endpoint": t.rdzv_endpoint, "id": t.rdzv_id}
    module = "engines.megatron.trainer" if megatron else "engines.torch_engine.trainer"
    run_torchrun(module, args, t.nproc_per_node, rdzv=rdzv)
    return TrainResult(**json.loads((Path(cfg.train_dir) / "losses.json").read_text()))
