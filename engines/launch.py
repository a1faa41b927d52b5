"""Run training with the engine `train.engine` names, in this process or as a torchrun job.

One node: `torchrun --standalone`. Several nodes: the same command on every node with
`train.nnodes`, `train.node_rank` and `train.rdzv_endpoint` (c10d rendezvous), e.g. one Prefect task
per node from a work pool whose workers sit on those nodes (see README, "Multi-node training").
With `train.elastic`, torchrun's elastic agent: a c10d rendezvous over min:max nodes that restarts the
whole group when a rank dies, each attempt resuming from the newest checkpoint (engines/loop.py).

Each engine is a module with `train(cfg, run_id, tracking_uri)` and a torchrun entry point (`main`),
plus the checks that refuse a layout before any process starts. This launcher knows only their names.
"""

from __future__ import annotations

import importlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from flowspeed.configs import PipelineConfig, save_config
from flowspeed.engines.common.progress import relay_progress
from flowspeed.engines.common.torchrun import in_distributed_job, run_torchrun, torchrun_layout
from flowspeed.engines.loop import TrainResult


@dataclass(frozen=True)
class Engine:
    module: str  # `train()` and the torchrun entry point
    validate: str  # "module:function" that refuses what cannot run, in milliseconds
    # megatron-core keeps its parallel state in module globals (and, on CPU, patches them): always a torchrun
    # job of its own, never inside this (possibly long-lived) worker process
    in_process: bool


ENGINES = {
    "torch": Engine(
        "flowspeed.engines.torch_engine.trainer", "flowspeed.engines.torch_engine.launch:validate_layout", True
    ),
    "megatron": Engine("flowspeed.engines.megatron.trainer", "flowspeed.engines.megatron.trainer:validate", False),
}


def _function(ref: str) -> Callable:
    module, name = ref.split(":")
    return getattr(importlib.import_module(module), name)


def launch(cfg: PipelineConfig, run_id: str | None, tracking_uri: str | None) -> TrainResult:
    t = cfg.train
    engine = ENGINES[t.engine]
    train = _function(f"{engine.module}:train")
    if in_distributed_job():  # already a rank of a torchrun job (a multi-node task): train here
        return train(cfg, run_id, tracking_uri)
    _function(engine.validate)(cfg)
    # one rank trains in this process, unless it is elastic: a restart needs torchrun's agent around it
    if t.nproc_per_node * t.nnodes == 1 and engine.in_process and t.elastic is None:
        return train(cfg, run_id, tracking_uri)
    cfg_path = save_config(cfg, cfg.train_dir, "launch_config.yaml")
    args = ["--config", str(cfg_path)]
    if run_id:
        args += ["--run-id", run_id, "--tracking-uri", tracking_uri or ""]
    rdzv, elastic = torchrun_layout(t)  # elastic restarts resume from the newest checkpoint (engines/loop.py)
    with relay_progress(cfg.train_dir / "progress.log"):  # rank 0's step lines into this process's log
        run_torchrun(engine.module, args, t.nproc_per_node, rdzv=rdzv, elastic=elastic)
    return TrainResult(**json.loads((Path(cfg.train_dir) / "losses.json").read_text()))
