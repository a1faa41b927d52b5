"""The engine-neutral training loop (engines/loop.py): a non-finite loss stops the run before the update,
naming the step, the last good checkpoint and what to change, and leaves that checkpoint the newest one."""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import pytest
import torch
from flowspeed.configs import PipelineConfig, load_config
from flowspeed.engines.launch import launch
from flowspeed.engines.loop import NonFiniteLoss, non_finite_message
from flowspeed.engines.models import get_family
from flowspeed.engines.torch_engine import checkpoint as ckpt
from flowspeed.engines.tracking.tracker import ensure_experiment, tracking_uri
from mlflow import MlflowClient

from tests.conftest import make_config, on_prepped
from tests.distributed import run_ranks


def _nan_from_call(family: Any, call: int, only_rank: int | None = None) -> None:
    """Patch the family's objective to return NaN (with a graph, as a real divergence would) from its
    `call`-th call on (`only_rank` or every rank): with grad_accum 1 that is step `call`."""
    original = type(family).training_loss
    calls = [0]

    def training_loss(self: Any, *args: Any, **kwargs: Any) -> torch.Tensor:
        loss = original(self, *args, **kwargs)
        calls[0] += 1
        mine = only_rank is None or int(os.environ.get("RANK", 0)) == only_rank
        return loss * float("nan") if mine and calls[0] >= call else loss

    type(family).training_loss = training_loss  # type: ignore[method-assign]


def _config(tmp_path: Path, prepped: PipelineConfig, *overrides: str) -> PipelineConfig:
    return on_prepped(
        tmp_path,
        prepped,
        "train.max_steps=6",
        "train.checkpoint_every=2",
        "train.metrics_flush_every=1",
        *overrides,
    )


def test_a_nan_loss_stops_before_the_update_naming_the_last_good_checkpoint(
    tmp_path: Path, prepped: PipelineConfig, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = _config(tmp_path, prepped, "train.async_checkpoint=true")  # step 4's save is still in flight at step 5
    family = get_family(cfg.model.family)
    monkeypatch.setattr(type(family), "training_loss", type(family).training_loss)  # restored after the test
    _nan_from_call(family, 5)
    uri = tracking_uri(cfg)
    client = MlflowClient(uri)
    run = client.create_run(ensure_experiment(client, cfg))
    with pytest.raises(NonFiniteLoss) as err:
        launch(cfg, run.info.run_id, uri)
    good = cfg.train_dir / "checkpoints" / "step-00000004"
    msg = str(err.value)
    assert "stopped at step 5" in msg and f"Last good checkpoint: {good}." in msg, msg
    for advice in ("train.lr", "max_grad_norm", "mixed_precision", "check the data", "train.resume=auto"):
        assert advice in msg, advice
    assert [p.name for p in ckpt.list_checkpoints(cfg.train_dir)] == ["step-00000002", "step-00000004"]
    assert not (cfg.train_dir / "final").exists() and not (cfg.train_dir / "losses.json").exists()
    tags = client.get_run(run.info.run_id).data.tags
    assert tags["flowspeed.stopped_reason"] == "non-finite loss at step 5" and tags["flowspeed.checkpoint_step"] == "4"
    steps = sorted(m.step for m in client.get_metric_history(run.info.run_id, "train/loss"))
    assert steps == [1, 2, 3, 4]  # the NaN step is not logged as a loss


def test_the_message_says_when_there_is_no_checkpoint(tmp_path: Path, prepped: PipelineConfig) -> None:
    cfg = _config(tmp_path, prepped, "train.mixed_precision=bf16")
    msg = non_finite_message(cfg, 0, math.nan, None)
    assert "step 1" in msg and "Last good checkpoint: none: the run starts from scratch." in msg
    assert "bf16" in msg and "fp32" in msg


def _two_ranks(rank: int, world: int, workdir: str, manifest: str, prep_dir: str, cache_dir: str) -> str:
    cfg = make_config(
        Path(workdir),
        Path(manifest),
        f"data.output_dir={prep_dir}",
        f"data.cache_dir={cache_dir}",
        f"train.nproc_per_node={world}",
        "train.max_steps=6",
        "train.checkpoint_every=2",
    )
    _nan_from_call(get_family(cfg.model.family), 3, only_rank=1)  # rank 0's own loss stays finite
    from flowspeed.engines.torch_engine.trainer import train

    try:
        train(cfg)
    except NonFiniteLoss as exc:
        return str(exc)
    return "no error"


@pytest.mark.slow
def test_two_ranks_stop_together_when_one_rank_sees_nan(tmp_path: Path, prepped: PipelineConfig) -> None:
    """The check reads the loss after the data-parallel all-reduce: both ranks stop at the same step (no rank
    left waiting in a collective), though only rank 1's micro-batch went non-finite."""
    messages = run_ranks(
        _two_ranks, 2, str(tmp_path), str(prepped.data.manifest), str(prepped.prep_dir), str(prepped.cache_dir)
    )
    train_dir = _config(tmp_path, prepped).train_dir
    good = train_dir / "checkpoints" / "step-00000002"
    for msg in messages:
        assert "stopped at step 3" in msg and f"Last good checkpoint: {good}." in msg, msg
    assert [p.name for p in ckpt.list_checkpoints(train_dir)] == ["step-00000002"]


def _megatron_rank(rank: int, world: int, recipe: str, overrides: list[str], workdir: str) -> str:
    import flowspeed.engines.megatron.batches as megatron_batches  # the VLM forward step's loss function
    import flowspeed.engines.megatron.trainer as megatron_trainer

    cfg = load_config(Path(recipe), overrides, workdir=Path(workdir))
    original = megatron_batches.token_loss
    calls = [0]

    def token_loss(loss_mask: torch.Tensor, per_token: torch.Tensor) -> Any:
        calls[0] += 1  # one call per micro-batch: grad_accum 1 makes it the step
        return original(loss_mask, per_token * float("nan") if calls[0] >= 3 else per_token)

    megatron_batches.token_loss = token_loss
    try:
        megatron_trainer.train(cfg)
    except NonFiniteLoss as exc:
        return str(exc)
    return "no error"


@pytest.mark.slow
def test_the_megatron_engine_stops_on_a_nan_loss_too(tmp_path: Path) -> None:
    """megatron's optimizer skips an update whose gradients are not finite; the loop then stops the run."""
    from flowspeed.datasets_prep.demo import make_demo_dataset
    from flowspeed.datasets_prep.prep import run_prep

    from tests.conftest import REPO

    make_demo_dataset(tmp_path / "demo", num_videos=2, num_images=2)
    recipe = REPO / "configs" / "pipelines" / "qwen2_vl-sft-megatron.yaml"
    manifest = tmp_path / "demo" / "conversations.jsonl"
    overrides = [f"data.manifest={manifest}", "train.nproc_per_node=1", "train.parallel.pp=1", "train.grad_accum=1",
                 "train.max_steps=4", "train.checkpoint_every=2"]  # fmt: skip
    cfg = load_config(recipe, overrides, workdir=tmp_path)
    run_prep(cfg)
    (msg,) = run_ranks(_megatron_rank, 1, str(recipe), overrides, str(tmp_path))
    good = cfg.train_dir / "checkpoints" / "step-00000002"
    assert "stopped at step 3" in msg and f"Last good checkpoint: {good}." in msg, msg
    assert [p.name for p in ckpt.list_checkpoints(cfg.train_dir)] == ["step-00000002"]
