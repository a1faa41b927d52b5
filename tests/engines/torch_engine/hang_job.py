"""A 2-rank job whose rank 1 hangs before a collective (run by test_engine_features via torchrun).

python -m torch.distributed.run --nproc_per_node 2 -m tests.engines.torch_engine.hang_job TIMEOUT_S
"""

from __future__ import annotations

import sys
import time

import torch
import torch.distributed as dist
from flowspeed.configs import PipelineConfig
from flowspeed.engines.torch_engine.setup import init_distributed
from torch.distributed.elastic.multiprocessing.errors import record


@record
def main() -> None:
    cfg = PipelineConfig.model_validate({"train": {"collective_timeout_s": int(sys.argv[1]), "device": "cpu"}})
    env = init_distributed(cfg)
    if env.rank == 1:
        time.sleep(600)  # a stuck data loader, a deadlocked rank
    dist.all_reduce(torch.ones(1))


if __name__ == "__main__":
    main()
