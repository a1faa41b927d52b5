"""Run training in this process, or as a torchrun job when `train.nproc_per_node` > 1."""

from __future__ import annotations

import json
from pathlib import Path

from configs import PipelineConfig, save_config
from engines.torch_engine.trainer import TrainResult, train
from engines.torchrun import in_distributed_job, run_torchrun


def launch(cfg: PipelineConfig, run_id: str | None, tracking_uri: str | None) -> TrainResult:
    nproc = cfg.train.nproc_per_node
    if in_distributed_job() or nproc == 1:
        return train(cfg, run_id, tracking_uri)
    cfg_path = save_config(cfg, cfg.train_dir, "launch_config.yaml")
    args = ["--config", str(cfg_path)]
    if run_id:
        args += ["--run-id", run_id, "--tracking-uri", tracking_uri or ""]
    run_torchrun("engines.torch_engine.trainer", args, nproc)
    return TrainResult(**json.loads((Path(cfg.train_dir) / "losses.json").read_text()))
