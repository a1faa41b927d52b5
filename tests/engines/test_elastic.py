"""Elastic training (`train.elastic`): a rank SIGKILLed mid-run, torchrun's agent restarts the group, and the
job ends where an uninterrupted run ends, bit for bit, on one MLflow step axis.

2 real gloo ranks under real torchrun (c10d rendezvous), the tiny quickstart family, 6 steps with a checkpoint every
2. One job is killed twice, at two kill points drawn from a fixed seed after the first checkpoint, so one run of
three attempts (`--max-restarts=2`) covers both cases in the time of one more attempt instead of two more jobs:
the first attempt loses rank 1 (rank 0, the one that logs, is then stopped by the agent wherever it is), the
restarted one loses rank 0 itself, cutting its MLflow sender off mid-run. A rank kills itself right after the
optimizer applied its step (tests/engines/elastic_rank.py: the torch engine's entry point with a wrapped method).
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

import psutil
import pytest
import torch
from flowspeed.configs import PipelineConfig
from flowspeed.engines import launch as launch_module
from flowspeed.engines.common.checkpoints import list_checkpoints
from flowspeed.engines.common.torchrun import torchrun_command
from flowspeed.engines.loop import resume_path
from flowspeed.engines.tracking.tracker import ensure_experiment, tracking_uri
from mlflow import MlflowClient
from safetensors.torch import load_file

from tests.conftest import REPO, make_config, on_prepped
from tests.engines import elastic_rank

STEPS, EVERY = 6, 2
SEED = 25  # the kill steps: drawn from the steps after the first checkpoint, reproducibly
_rng = random.Random(SEED)
_first = _rng.randrange(EVERY + 1, STEPS)
# the restarted attempt resumes from the checkpoint before the first kill, and is killed after it too
_second = _rng.randrange((_first - 1) // EVERY * EVERY + 1, STEPS)
KILLS = [(1, _first), (0, _second)]  # (rank, step) of attempt 0, then of attempt 1


def _resumed_from(step: int) -> int:
    """The checkpoint an attempt killed right after `step` leaves as the newest (one every EVERY steps)."""
    return (step - 1) // EVERY * EVERY


def _config(workdir: Path, prepped: PipelineConfig, *extra: str) -> PipelineConfig:
    return on_prepped(
        workdir,
        prepped,
        "train.nproc_per_node=2",
        f"train.max_steps={STEPS}",
        f"train.checkpoint_every={EVERY}",
        "train.metrics_flush_every=1",  # rank 0 sends every step at once: a kill leaves steps past the checkpoint
        *extra,
    )


def _weights(final: Path) -> dict[str, dict[str, torch.Tensor]]:
    files = sorted(final.rglob("*.safetensors"))
    assert files, f"no safetensors under {final}"
    return {str(f.relative_to(final)): load_file(str(f)) for f in files}


@pytest.fixture
def ranks_from_tests(monkeypatch: pytest.MonkeyPatch) -> None:
    """The torch engine launched as tests/engines/elastic_rank.py (its kill point installed in each rank)."""
    engine = launch_module.ENGINES["torch"]
    monkeypatch.setitem(
        launch_module.ENGINES, "torch", launch_module.Engine(elastic_rank.__name__, engine.validate, engine.in_process)
    )
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))


@pytest.fixture(scope="module")
def straight(tmp_path_factory: pytest.TempPathFactory, prepped: PipelineConfig) -> PipelineConfig:
    """The uninterrupted 2-rank run (its config; the outputs are in its training folder)."""
    cfg = _config(tmp_path_factory.mktemp("straight"), prepped)
    res = launch_module.launch(cfg, None, None)
    assert res.steps == STEPS and res.resumed_from == 0
    return cfg


@pytest.fixture(scope="module")
def reference(straight: PipelineConfig) -> tuple[list[float], dict]:
    """The uninterrupted run's losses and final weights."""
    losses = json.loads((straight.train_dir / "losses.json").read_text())["losses"]
    return losses, _weights(straight.train_dir / "final")


def _run(cfg: PipelineConfig, mlflow_db: Path) -> tuple[MlflowClient, str]:
    shutil.copyfile(mlflow_db, cfg.workdir / "mlflow.db")  # the workdir's default store, schema made once
    uri = tracking_uri(cfg)
    client = MlflowClient(uri)
    return client, client.create_run(ensure_experiment(client, cfg)).info.run_id


@pytest.mark.slow
def test_killed_ranks_restart_the_group_and_the_run_ends_bit_identical(
    tmp_path: Path,
    prepped: PipelineConfig,
    mlflow_db: Path,
    reference: tuple[list[float], dict],
    ranks_from_tests: None,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    losses, weights = reference
    cfg = _config(tmp_path, prepped, f"train.elastic.max_restarts={len(KILLS)}")
    client, run_id = _run(cfg, mlflow_db)
    monkeypatch.setenv(elastic_rank.KILL_ENV, ",".join(f"{rank}:{step}" for rank, step in KILLS))

    res = launch_module.launch(cfg, run_id, tracking_uri(cfg))  # the job finishes

    # each restarted attempt resumed from the newest checkpoint before its kill, the last one finished the run
    starts = [0] + [_resumed_from(step) for _, step in KILLS]
    assert res.resumed_from == starts[-1] > 0, (KILLS, res.resumed_from)
    assert res.steps == STEPS and res.losses == losses[res.resumed_from :]
    final = _weights(Path(res.final_dir))
    assert final.keys() == weights.keys()
    for name, tensors in final.items():
        assert tensors.keys() == weights[name].keys()
        for key, value in tensors.items():
            assert torch.equal(value, weights[name][key]), f"{name}:{key} differs from the uninterrupted run"

    # one step axis: every step once, with the uninterrupted run's loss (whichever attempt delivered it)
    for key in ("train/loss", "train/lr", "perf/step_time_s"):
        steps = sorted(m.step for m in client.get_metric_history(run_id, key))
        assert steps == list(range(1, STEPS + 1)), (key, steps)
    history = sorted(client.get_metric_history(run_id, "train/loss"), key=lambda m: m.step)
    assert [m.value for m in history] == losses

    # the restarts counted: a metric at the step each attempt started from, and a tag
    restarts = sorted((m.step, m.value) for m in client.get_metric_history(run_id, "elastic/restarts"))
    assert restarts == [(start, float(i)) for i, start in enumerate(starts)]
    assert client.get_run(run_id).data.tags["flowspeed.elastic.restarts"] == str(len(KILLS))


def test_elastic_torchrun_command() -> None:
    """One node: a local c10d store on a free port; several: the shared endpoint, the node range, no node rank."""
    one = torchrun_command("m", [], 2, elastic={"max_restarts": 1, "min_nodes": 1, "max_nodes": 1})
    assert {"--nnodes=1:1", "--rdzv_backend=c10d", "--rdzv_endpoint=localhost:0", "--max-restarts=1"} <= set(one)
    assert "--standalone" not in one
    rdzv = {"nnodes": 2, "node_rank": 1, "endpoint": "node0:29400", "id": "job"}
    many = torchrun_command("m", [], 8, rdzv, {"max_restarts": 3, "min_nodes": 1, "max_nodes": 2})
    assert {"--nnodes=1:2", "--rdzv_endpoint=node0:29400", "--rdzv_id=job", "--max-restarts=3"} <= set(many)
    assert not [a for a in many if a.startswith("--node_rank")]


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["train.elastic.min_nodes=3", "train.elastic.max_nodes=2"], "min_nodes=3 is above"),
        (["train.nnodes=4", "train.rdzv_endpoint=n0:1", "train.elastic.max_nodes=2"], "train.nnodes=4 is outside"),
        (["train.elastic.max_nodes=2"], "max_nodes=2 needs train.rdzv_endpoint"),
        (["train.nproc_per_node=2", "train.parallel.dp_shard=2", "train.rdzv_endpoint=n0:1",
          "train.elastic.max_nodes=2"], "with 2 nodes"),
    ],
)  # fmt: skip
def test_elastic_settings_are_refused_at_load(tmp_path: Path, demo_manifest: Path, overrides: list[str],
                                              message: str) -> None:  # fmt: skip
    with pytest.raises(ValueError, match=message):
        make_config(tmp_path, demo_manifest, *overrides)


@pytest.mark.slow
def test_a_restart_resumes_its_jobs_newest_checkpoint_whatever_train_resume_says(
    straight: PipelineConfig, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`train.resume: never` (or a path) decides where the first attempt starts; a restarted group continues its
    job: the newest checkpoint written since its torchrun agent (the rank's parent process) started."""
    older, newest = list_checkpoints(straight.train_dir)[-2:]
    never = straight.model_copy(update={"train": straight.train.model_copy(update={"resume": "never"})})
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")
    monkeypatch.setattr(os, "getppid", os.getpid)  # this process plays the agent: it started before both
    assert resume_path(never) == newest
    assert resume_path(straight) == newest  # auto: the newest one, as always
    before = psutil.Process().create_time() - 60  # a checkpoint from before the job is a previous run's
    os.utime(newest / "trainer_state.pt", (before, before))
    assert resume_path(never) == older
    os.utime(older / "trainer_state.pt", (before, before))
    assert resume_path(never) is None
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "0")  # the first attempt: train.resume as given
    assert resume_path(never) is None
