"""Several trainings, one after another, in one torchrun job: a test module's multi-rank runs at one job start.

    runs = {"ddp": cfg1, "fsdp2": cfg2}            # each a config with its own workdir
    job_error = run_together(runs, nproc=2)        # in the test process (a module fixture)
    res = result(runs, "ddp", job_error)           # in each test: its run's TrainResult, or a failure naming it

The job is `python -m torch.distributed.run --standalone --nproc_per_node N -m tests.engines.torch_engine.runs_job
CONFIG...`; each CONFIG is a run's launch_config.yaml, checked and saved as engines/launch.py does before it starts
torchrun. Each run is its engine's own `train` (its own mesh or megatron parallel state, model, sampler,
checkpoints), which writes losses.json into its train_dir as a launched run does and `result` reads it as launch()
does. The process group is made by the first run and reused by the next (init_process_group is a no-op when the
group exists); megatron's parallel state is torn down after each megatron run. Two ranks importing an engine are
most of a tiny run's time, and this pays for them once. A run that fails writes its traceback to
`failed-rank<N>.txt` in its train_dir and ends the job: its test fails with it, the later runs' tests say they did
not start.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import traceback
from pathlib import Path

import pytest
from flowspeed.configs import PipelineConfig, load_config, save_config
from flowspeed.engines.common.torchrun import DistributedJobFailed, run_torchrun
from flowspeed.engines.launch import ENGINES, _function
from flowspeed.engines.loop import TrainResult


def run_together(runs: dict[str, PipelineConfig], nproc: int) -> str:
    """Check and save every run's config, then train them all in one torchrun job of `nproc` ranks; the job's
    error ('' when it succeeded)."""
    paths = []
    for name, cfg in runs.items():
        assert cfg.train.nproc_per_node == nproc and cfg.train.nnodes == 1, name
        _function(ENGINES[cfg.train.engine].validate)(cfg)
        paths.append(str(save_config(cfg, cfg.train_dir, "launch_config.yaml")))
    try:
        run_torchrun("tests.engines.torch_engine.runs_job", paths, nproc)
    except DistributedJobFailed as exc:
        return str(exc)
    return ""


def result(runs: dict[str, PipelineConfig], name: str, job_error: str) -> TrainResult:
    """The run's TrainResult, as launch() returns it; else the test fails naming the run and why."""
    train_dir = runs[name].train_dir
    losses = train_dir / "losses.json"
    if not losses.is_file():
        failed = "\n".join(p.read_text() for p in sorted(train_dir.glob("failed-rank*.txt")))
        why = failed or f"it did not start: an earlier run of the job failed\n{job_error}"
        pytest.fail(f"the run {name!r} did not finish in the shared torchrun job:\n{why}")
    return TrainResult(**json.loads(losses.read_text()))


def main() -> None:
    import torch.distributed as dist

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        for path in sys.argv[1:]:
            cfg = load_config(Path(path))
            engine = cfg.train.engine
            try:
                _function(f"{ENGINES[engine].module}:train")(cfg)
                if engine == "megatron":  # its parallel state lives in module globals: the next run makes its own
                    from megatron.core import parallel_state

                    parallel_state.destroy_model_parallel()
            except BaseException:
                (cfg.train_dir / f"failed-rank{os.environ['RANK']}.txt").write_text(traceback.format_exc())
                raise
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    from torch.distributed.elastic.multiprocessing.errors import record

    record(main)()
