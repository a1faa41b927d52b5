"""A torch-engine rank that SIGKILLs itself once, for tests/engines/test_elastic.py.

    ELASTIC_TEST_KILL="RANK:STEP,RANK:STEP" torchrun ... -m tests.engines.elastic_rank --config ...

In attempt k of the job (TORCHELASTIC_RESTART_COUNT=k) the k-th RANK:STEP applies: rank RANK dies by SIGKILL right
after the optimizer applied step STEP, before the loop logs or checkpoints it, what the OOM killer or a lost node
does to one rank. Every other rank, and every rank of an attempt past the list, trains as the torch engine's own
entry point does. The kill point is a wrapped method installed here, in the rank: product code has no test hooks.
"""

from __future__ import annotations

import os
import signal
import sys

from flowspeed.engines.torch_engine import trainer

KILL_ENV = "ELASTIC_TEST_KILL"
train = trainer.train  # what engines/launch.py calls in process; the ranks run `main`


def install_kill_point() -> None:
    kills = [k for k in os.environ.get(KILL_ENV, "").split(",") if k]
    attempt = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    if attempt >= len(kills):
        return
    rank, at = (int(x) for x in kills[attempt].split(":"))
    if int(os.environ.get("RANK", "0")) != rank:
        return
    optimizer_step = trainer.TorchBackend.optimizer_step

    def step_then_die(self: trainer.TorchBackend, step: int) -> trainer.OptimizerOutput:
        out = optimizer_step(self, step)
        if step + 1 == at:  # no cleanup, no atexit, no finally (tests/faults/conftest.py's `die`, without
            sys.stderr.flush()  # importing the suite's conftest into a rank)
            os.kill(os.getpid(), signal.SIGKILL)
        return out

    trainer.TorchBackend.optimizer_step = step_then_die


def main() -> None:
    install_kill_point()
    trainer.main()


if __name__ == "__main__":
    main()
