"""The trainer under real 2-rank layouts (torchrun, gloo): each must reproduce the one-process losses.

Parity is exact in intent: one process accumulating 2 micro-batches sees the same samples and the
same noise as 2 data-parallel ranks with one micro-batch each (the sampler deals batches
round-robin and the noise is keyed by the global micro-batch index); TP and CP ranks all see the
one-process batch. Only the order of floating-point reductions differs, hence 1e-5, not equality.

The 2-rank runs that need no launch of their own (every layout, the FSDP resume test's uninterrupted run and its
first half) train one after another in one torchrun job (runs_job.py), each through the engine's own `train`
with its own saved launch config, mesh and workdir: the job's start (two ranks importing the engine) is most of
a tiny run's time. Each test still asserts on its own run, and a run that fails is named by its test. The
resumed half is a launch of its own (a resume is a new process).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from flowspeed.configs import PipelineConfig
from flowspeed.engines.launch import launch
from flowspeed.engines.loop import TrainResult
from flowspeed.engines.torch_engine import checkpoint as ckpt
from flowspeed.engines.torch_engine.launch import validate_layout
from flowspeed.engines.torch_engine.trainer import export_checkpoint
from flowspeed.evaluation.common import trained_model

from tests.conftest import make_config
from tests.engines.torch_engine.runs_job import result, run_together

STEPS = 5


def _cfg(tmp: Path, prepped: PipelineConfig, *overrides: str, check: bool = True) -> PipelineConfig:
    common = [f"data.output_dir={prepped.prep_dir}", f"data.cache_dir={prepped.cache_dir}", f"train.max_steps={STEPS}",
              "train.batch_size=1", "train.checkpoint_every=100", "train.warmup_steps=0",
              "train.val_fraction=0"]  # fmt: skip
    return make_config(tmp, prepped.data.manifest, *common, *overrides, check=check)


@pytest.fixture(scope="module")
def baselines(tmp_path_factory: pytest.TempPathFactory, prepped: PipelineConfig) -> dict[int, list[float]]:
    """One-process losses for 1 and 2 accumulated micro-batches per step."""
    out = {}
    for accum in (1, 2):
        cfg = _cfg(tmp_path_factory.mktemp(f"single{accum}"), prepped, f"train.grad_accum={accum}")
        out[accum] = launch(cfg, None, None).losses
    return out


def _weights(cfg: PipelineConfig, final_dir: str) -> dict[str, torch.Tensor]:
    return trained_model(cfg, Path(final_dir)).state_dict()


LAYOUTS = {
    # name: (overrides, one-process accumulation it must match)
    "ddp": (["train.parallel.dp_replicate=2", "train.parallel.dp_shard=1"], 2),
    "fsdp2": (["train.parallel.dp_shard=2"], 2),
    "tp2": (["train.parallel.tp=2", "train.parallel.dp_shard=1"], 1),
    "tp2-sp": (["train.parallel.tp=2", "train.parallel.dp_shard=1", "train.parallel.sequence_parallel=true"], 1),
    "cp2-ulysses": (["train.parallel.cp=2", "train.parallel.dp_shard=1"], 1),
    "cp2-ring": (["train.parallel.cp=2", "train.parallel.dp_shard=1", "train.parallel.cp_mode=ring"], 1),
}


FSDP_RESUME = ["train.nproc_per_node=2", "train.parallel.dp_shard=2", "train.checkpoint_every=2",
               "train.ema.enabled=true", "train.async_checkpoint=true"]  # fmt: skip


@pytest.fixture(scope="module")
def two_rank_runs(tmp_path_factory: pytest.TempPathFactory, prepped: PipelineConfig) -> dict[str, Any]:
    """Every 2-rank run of this module that needs no launch of its own, in one torchrun job (runs_job.py)."""
    runs = {name: _cfg(tmp_path_factory.mktemp(name), prepped, "train.nproc_per_node=2", *overrides)
            for name, (overrides, _) in LAYOUTS.items()}  # fmt: skip
    runs["fsdp-straight"] = _cfg(tmp_path_factory.mktemp("fsdp-straight"), prepped, *FSDP_RESUME)
    runs["fsdp-first-half"] = _cfg(tmp_path_factory.mktemp("fsdp-split"), prepped, *FSDP_RESUME,
                                   "train.stop_after_steps=2")  # fmt: skip
    return {"runs": runs, "job_error": run_together(runs, 2)}


def _result(two_rank_runs: dict[str, Any], name: str) -> TrainResult:
    return result(two_rank_runs["runs"], name, two_rank_runs["job_error"])


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_every_layout_matches_one_process(
    name: str, two_rank_runs: dict[str, Any], baselines: dict[int, list[float]]
) -> None:
    _, accum = LAYOUTS[name]
    res = _result(two_rank_runs, name)
    assert len(res.losses) == STEPS
    assert res.losses == pytest.approx(baselines[accum], abs=1e-5)


def test_fsdp_resume_is_exact_and_its_checkpoint_loads_in_one_process(
    tmp_path: Path, two_rank_runs: dict[str, Any]
) -> None:
    straight = _result(two_rank_runs, "fsdp-straight")
    first = _result(two_rank_runs, "fsdp-first-half")
    split = two_rank_runs["runs"]["fsdp-first-half"]
    resumed = launch(split.model_copy(update={"train": split.train.model_copy(update={"stop_after_steps": None})}),
                     None, None)  # fmt: skip
    assert resumed.resumed_from == 2
    assert first.losses + resumed.losses == pytest.approx(straight.losses, abs=1e-6)

    # DCP reshards on load: the 2-rank sharded checkpoint becomes a release folder in one process.
    last = ckpt.latest(split.train_dir)
    assert sorted(p.name for p in (last / "rng").iterdir()) == ["rank-00000.pt", "rank-00001.pt"]
    exported = export_checkpoint(last, tmp_path / "release", use_ema=True)
    released, trained = _weights(split, str(exported)), _weights(split, resumed.final_dir)
    assert released.keys() == trained.keys()
    assert all(torch.equal(released[k], trained[k]) for k in trained)  # the final export is the EMA model too
    raw = export_checkpoint(last, tmp_path / "raw")
    assert any(not torch.equal(_weights(split, str(raw))[k], released[k]) for k in released)


def test_impossible_layout_fails_before_any_process_starts(tmp_path: Path, prepped: PipelineConfig) -> None:
    bad = ("train.nproc_per_node=2", "train.parallel.tp=3")
    with pytest.raises(ValueError, match=r"tp=3"):  # refused when the config loads ...
        _cfg(tmp_path, prepped, *bad)
    cfg = _cfg(tmp_path, prepped, *bad, check=False)
    with pytest.raises(ValueError, match=r"dp_replicate=1 x dp_shard=\? x cp=1 x tp=3 x pp=1"):  # ... and at launch
        launch(cfg, None, None)
    assert not (cfg.train_dir / "launch_config.yaml").exists()
    bad = ("train.nproc_per_node=2", "train.parallel.dp_shard=2", "train.parallel.cp=2")
    cfg = _cfg(tmp_path, prepped, *bad, check=False)
    with pytest.raises(ValueError, match="dp_shard=2 x cp=2 x tp=1 x pp=1 = 4, but the world size is 2"):
        validate_layout(cfg)


def test_mfu_and_step_split_are_logged(tmp_path: Path, prepped: PipelineConfig) -> None:
    from flowspeed.engines.tracking.tracker import ensure_experiment, tracking_uri
    from mlflow import MlflowClient

    cfg = _cfg(tmp_path, prepped, "train.peak_tflops=0.5", "train.metrics_flush_every=1")
    uri = tracking_uri(cfg)
    client = MlflowClient(uri)
    run = client.create_run(ensure_experiment(client, cfg))
    launch(cfg, run.info.run_id, uri)
    metrics = client.get_run(run.info.run_id).data.metrics
    parts = metrics["perf/data_wait_s"] + metrics["perf/fwd_bwd_s"] + metrics["perf/optimizer_s"]
    assert parts == pytest.approx(metrics["perf/step_time_s"], rel=1e-6)
    # MFU = achieved model FLOPs / peak; with a 0.5 TFLOPS "device" it is the achieved rate over 0.5.
    assert metrics["perf/mfu"] == pytest.approx(metrics["perf/model_tflops_per_s_per_rank"] / 0.5, rel=1e-6)
    assert 0 < metrics["perf/mfu"] < 1
