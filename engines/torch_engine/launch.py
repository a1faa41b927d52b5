"""What the torch engine refuses before any process starts (engines/launch.py calls it)."""

from __future__ import annotations

from flowspeed.configs import PipelineConfig
from flowspeed.engines.models import get_family
from flowspeed.engines.torch_engine.parallel_dims import ParallelDims


def validate_layout(cfg: PipelineConfig) -> ParallelDims:
    """Fail in milliseconds, before any process starts or model loads, on a layout the ranks can't form."""
    from flowspeed.configs.validate import check_layout  # the rules load_config applies too: one place for both engines

    check_layout(cfg)
    get_family(cfg.model.family).frozen_prefixes(cfg.model)  # refuses a freeze the family cannot honour
    t, p = cfg.train, cfg.train.parallel
    return ParallelDims(p.dp_replicate, p.dp_shard, p.cp, p.tp, p.pp, t.nnodes * t.nproc_per_node)
