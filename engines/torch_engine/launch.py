"""Run training in this process or as a torchrun job, and surface a failing rank's error.

torchrun's `@record` puts each failed rank's traceback in the agent's "Root Cause" report on
stderr; we tee stderr through and lift that report into the raised error, so a Prefect task (and
the CLI) shows why rank 1 died instead of "exit status 1".
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from collections import deque
from pathlib import Path

from configs import PipelineConfig, save_config
from engines.torch_engine.trainer import TrainResult, train


class TrainingFailed(RuntimeError):
    pass


def root_cause(stderr_tail: str) -> str:
    """The `Root Cause` block of torchrun's failure report, else the last lines of stderr."""
    marker = stderr_tail.rfind("Root Cause")
    if marker != -1:
        block = stderr_tail[marker:]
        return block.strip()[:4000]
    return "\n".join(stderr_tail.strip().splitlines()[-25:])


def launch(cfg: PipelineConfig, run_id: str | None, tracking_uri: str | None) -> TrainResult:
    nproc = cfg.train.nproc_per_node
    if "WORLD_SIZE" in os.environ or nproc == 1:
        # Already a rank of an outer launcher (torchrun, srun), or single process: train here.
        return train(cfg, run_id, tracking_uri)
    cfg_path = save_config(cfg, cfg.train_dir, "launch_config.yaml")
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={nproc}",
        "-m",
        "engines.torch_engine.trainer",
        "--config",
        str(cfg_path),
    ]
    if run_id:
        cmd += ["--run-id", run_id, "--tracking-uri", tracking_uri or ""]
    env = dict(os.environ)
    # CPU ranks share the machine's cores; one thread each keeps gloo ranks from oversubscribing.
    env.setdefault("OMP_NUM_THREADS", "1")
    tail: deque[str] = deque(maxlen=400)
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True, env=env, cwd=os.getcwd())

    def pump() -> None:
        assert proc.stderr is not None
        for line in proc.stderr:
            tail.append(line)
            sys.stderr.write(line)

    t = threading.Thread(target=pump, daemon=True)
    t.start()
    rc = proc.wait()
    t.join(timeout=10)
    if rc != 0:
        raise TrainingFailed(f"torchrun with {nproc} ranks exited with status {rc}.\n{root_cause(''.join(tail))}")
    return _result_from_disk(cfg)


def _result_from_disk(cfg: PipelineConfig) -> TrainResult:
    data = json.loads((Path(cfg.train_dir) / "losses.json").read_text())
    return TrainResult(**data)
