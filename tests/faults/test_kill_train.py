"""SIGKILL of torch-engine training at several points, then a resume in a fresh process.

Each case trains the tiny quickstart family for 6 steps with a checkpoint every 2, in a child process
(forked from a fork server that imported torch, MLflow and the training code once for all cases) that
logs into a real SQLite MLflow store and SIGKILLs itself at one point (a wrapped function: no test hooks
in the product). The resume (this process, as a new `flowspeed train` would) must give the
uninterrupted run's losses bit for bit, pick an intact checkpoint, leave no half checkpoint or stray
process, and the MLflow run must hold every step 1..6 of every metric exactly once, with the
uninterrupted run's values. The 2-rank torchrun variant is left out: a second rank pair costs about
a minute of the suite's budget and the kill points are rank-0 code the single-process run already
reaches (tests/engines/torch_engine/test_train.py covers 2-rank checkpoints).
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import pytest
from flowspeed.configs import PipelineConfig, load_config, save_config
from flowspeed.engines.launch import launch
from flowspeed.engines.torch_engine import checkpoint as ckpt
from flowspeed.engines.tracking.tracker import UNDELIVERED_DIR, replay_undelivered
from mlflow import MlflowClient

from tests.conftest import on_prepped
from tests.faults.conftest import assert_no_survivors, die, wait_killed
from tests.faults.forked import forked_child, start_fork_server

pytestmark = pytest.mark.slow

# The flush interval (20 steps) never comes round in 6 steps: only checkpoints make metrics durable.
STEPS = ["train.max_steps=6", "train.checkpoint_every=2", "train.metrics_flush_every=20"]
KEYS = ("train/loss", "train/lr", "perf/step_time_s")


def _config(workdir: Path, prepped: PipelineConfig, *extra: str) -> PipelineConfig:
    return on_prepped(workdir, prepped, *STEPS, *extra)


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory, prepped: PipelineConfig) -> list[float]:
    """The uninterrupted run's losses, steps 1..6 (the children's fork server imports meanwhile)."""
    start_fork_server()
    return launch(_config(tmp_path_factory.mktemp("straight"), prepped), None, None).losses


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory, mlflow_db: Path) -> str:
    """One SQLite store for the module (its schema made once a session); each test has a run of its own."""
    path = tmp_path_factory.mktemp("mlflow") / "mlflow.db"
    shutil.copyfile(mlflow_db, path)
    uri = f"sqlite:///{path}"
    MlflowClient(uri).create_experiment("faults")
    return uri


def child(spec_file: str) -> None:
    """The training process to kill: installs its kill point, then trains as `flowspeed train` does."""
    spec = json.loads(Path(spec_file).read_text())
    kind, at = spec["kill"], int(spec["at"])
    name = f"step-{at:08d}"
    if kind == "after_log":  # between checkpoints, once step `at`'s metrics are logged
        from flowspeed.engines.tracking.tracker import Tracker

        log_metrics = Tracker.log_metrics

        def logged_then_die(self: Tracker, metrics: dict[str, float], step: int) -> None:
            log_metrics(self, metrics, step)
            if step == at:
                die()

        Tracker.log_metrics = logged_then_die  # type: ignore[method-assign]
    elif kind == "publish":  # checkpoint `at` written whole (shards, trainer state, config), not yet renamed
        replace = os.replace

        def die_before_publishing(src: str | os.PathLike, dst: str | os.PathLike) -> None:
            if Path(src).name.startswith(f".{name}.") and Path(dst).name == name:
                die()
            replace(src, dst)

        os.replace = die_before_publishing
    elif kind == "prune":  # deleting checkpoint `at`, part of it gone (rmtree's order is the directory's)
        rmtree = shutil.rmtree

        def die_mid_delete(path: str | os.PathLike, *args: object, **kwargs: object) -> None:
            victim = Path(path)
            if name in victim.name and (victim / "trainer_state.pt").is_file():
                (victim / "trainer_state.pt").unlink()
                next((victim / "state").glob("*.distcp")).unlink()
                die()
            rmtree(path, *args, **kwargs)

        shutil.rmtree = die_mid_delete
    elif kind == "export":  # the release folder written whole beside final/, not yet renamed onto it
        replace = os.replace

        def die_before_final(src: str | os.PathLike, dst: str | os.PathLike) -> None:
            if Path(dst).name == "final" and Path(src).name.startswith(".final."):
                die()
            replace(src, dst)

        os.replace = die_before_final
    else:
        raise ValueError(kind)
    launch(load_config(Path(spec["config"])), spec["run_id"], spec["uri"])
    sys.exit(f"training finished: the kill point {kind}@{at} was never reached")


def _history(uri: str, run_id: str, key: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in MlflowClient(uri).get_metric_history(run_id, key))


def _kill_and_resume(tmp_path: Path, prepped: PipelineConfig, store: str, kill: str, at: int,
                     *extra: str) -> tuple[PipelineConfig, str, object]:  # fmt: skip
    cfg = _config(tmp_path / "work", prepped, *extra)
    client = MlflowClient(store)
    run_id = client.create_run(client.get_experiment_by_name("faults").experiment_id).info.run_id
    spec = tmp_path / "spec.json"
    cfg_path = save_config(cfg, tmp_path / "cfg", "config.yaml")
    spec.write_text(json.dumps({"config": str(cfg_path), "run_id": run_id, "uri": store, "kill": kill, "at": at}))
    log = tmp_path / "child.log"
    proc = forked_child("tests.faults.test_kill_train:child", str(spec), log=log)
    wait_killed(proc, log)
    assert_no_survivors(proc)
    return cfg, run_id, proc


def _resume_and_check(cfg: PipelineConfig, store: str, run_id: str, reference: list[float], from_step: int) -> None:
    picked = ckpt.latest_intact(cfg.train_dir)
    assert picked is not None and picked.name == f"step-{from_step:08d}"
    ckpt.verify(picked)
    resumed = launch(cfg, run_id, store)  # a fresh process, as the next `flowspeed train` would be
    assert resumed.resumed_from == from_step
    assert resumed.losses == reference[from_step:]  # bit-identical on CPU
    replay_undelivered(cfg.train_dir / UNDELIVERED_DIR)  # what the train flow does after training
    for key in KEYS:
        steps = [s for s, _ in _history(store, run_id, key)]
        assert steps == list(range(1, 7)), f"{key}: every step once, got {steps}"
    assert [v for _, v in _history(store, run_id, "train/loss")] == reference
    left = sorted(p.name for p in ckpt.checkpoint_dir(cfg.train_dir).iterdir())
    keep = cfg.train.keep_checkpoints
    assert left == [f"step-{s:08d}" for s in (2, 4, 6)[-keep:]], f"half or stray checkpoints left: {left}"


def test_kill_between_checkpoints_loses_no_metric_up_to_the_checkpoint(
    tmp_path: Path, prepped: PipelineConfig, store: str, reference: list[float]
) -> None:
    """Killed after step 5 was logged (checkpoint 4 published): steps 1..4 were in MLflow or its
    journal before the kill, though the flush interval (20 steps) had not come round."""
    cfg, run_id, _ = _kill_and_resume(tmp_path, prepped, store, "after_log", 5)
    journal = cfg.train_dir / UNDELIVERED_DIR / f"{run_id}.jsonl"
    rows = [json.loads(r) for r in journal.read_text().splitlines()] if journal.is_file() else []
    kept = {r["step"] for r in rows if r.get("metric") == "train/loss"}
    held = {s for s, _ in _history(store, run_id, "train/loss")} | kept
    assert held >= {1, 2, 3, 4}, f"metrics up to the last checkpoint lost by the kill: only {sorted(held)}"
    _resume_and_check(cfg, store, run_id, reference, from_step=4)


def test_kill_during_checkpoint_save_resumes_from_the_previous_one_logging_each_step_once(
    tmp_path: Path, prepped: PipelineConfig, store: str, reference: list[float]
) -> None:
    """Killed with checkpoint 4 written but not published: the resume starts at 2 and recomputes 3
    and 4, which the killed process had already delivered; the run holds them once."""
    cfg, run_id, _ = _kill_and_resume(tmp_path, prepped, store, "publish", 4)
    assert [s for s, _ in _history(store, run_id, "train/loss")] == [1, 2, 3, 4]
    assert any(p.name.startswith(".step-00000004.") for p in ckpt.checkpoint_dir(cfg.train_dir).iterdir())
    _resume_and_check(cfg, store, run_id, reference, from_step=2)


def test_kill_during_prune_leaves_no_half_checkpoint(
    tmp_path: Path, prepped: PipelineConfig, store: str, reference: list[float]
) -> None:
    """Killed halfway through deleting checkpoint 2 after publishing 4 (keep_checkpoints=1): the
    resume takes 4, and the half-deleted 2 is gone afterwards instead of kept on disk forever."""
    cfg, run_id, _ = _kill_and_resume(tmp_path, prepped, store, "prune", 2, "train.keep_checkpoints=1")
    _resume_and_check(cfg, store, run_id, reference, from_step=4)


def test_kill_during_export_leaves_no_half_release(
    tmp_path: Path, prepped: PipelineConfig, store: str, reference: list[float]
) -> None:
    """Killed with the release folder written beside final/ but not yet renamed onto it: the resume
    (nothing left to train) exports again, and no temp release is left behind."""
    cfg, run_id, _ = _kill_and_resume(tmp_path, prepped, store, "export", 6)
    assert not (cfg.train_dir / "final").exists()
    assert any(p.name.startswith(".final.") for p in cfg.train_dir.iterdir())
    _resume_and_check(cfg, store, run_id, reference, from_step=6)
    assert (cfg.train_dir / "final" / "config.yaml").is_file()
    assert not [p.name for p in cfg.train_dir.iterdir() if p.name.startswith(".final.")]


def test_the_survivor_check_sees_an_orphan(tmp_path: Path) -> None:
    """The "no process left" assertions above can fail: a grandchild re-parented to init is found."""
    from tests.faults.conftest import python_code, session_survivors

    log = tmp_path / "child.log"
    orphan = "import subprocess, sys; subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)'])"
    proc = python_code(f"{orphan}; from tests.faults.conftest import die; die()", log=log)
    wait_killed(proc, log, timeout_s=60)
    try:
        with pytest.raises(AssertionError, match="left processes behind"):
            assert_no_survivors(proc, settle_s=0.5)
    finally:
        for p in session_survivors(proc.pid):
            p.kill()
