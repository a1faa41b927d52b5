"""Run training in this process, or as a torchrun job when the layout spans several ranks.

One node: `torchrun --standalone`. Several nodes: the same command on every node with
`train.nnodes`, `train.node_rank` and `train.rdzv_endpoint` (c10d rendezvous), e.g. one Prefect task
per node from a work pool whose workers sit on those nodes (see README, "Multi-node training").
"""

from __future__ import annotations

import json
from pathlib import Path

from configs import PipelineConfig, save_config
from engines.common.torchrun import in_distributed_job, run_torchrun
from engines.models import get_family
from engines.torch_engine.parallel_dims import ParallelDims
from engines.torch_engine.trainer import TrainResult, train


def validate_layout(cfg: PipelineConfig) -> ParallelDims:
    """Fail in milliseconds, before any process starts or model loads, on a layout the ranks can't form."""
    from configs.validate import check_layout  # the rules load_config applies too: one place for both engines

    check_layout(cfg)
    get_family(cfg.model.family).frozen_prefixes(cfg.model)  # refuses a freeze the family cannot honour
    t, p = cfg.train, cfg.train.parallel
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
