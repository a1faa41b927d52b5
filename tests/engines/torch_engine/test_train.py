import json
import statistics
from pathlib import Path

import pytest
import torch
from flowspeed.configs import PipelineConfig
from flowspeed.datasets_prep.cache import CachedLatents, collate
from flowspeed.datasets_prep.prep import run_prep
from flowspeed.engines.common.torchrun import DistributedJobFailed
from flowspeed.engines.launch import launch
from flowspeed.engines.models import get_family
from flowspeed.engines.torch_engine import checkpoint as ckpt
from flowspeed.engines.tracking.tracker import ensure_experiment, tracking_uri
from flowspeed.evaluation.common import trained_model
from mlflow import MlflowClient

from tests.conftest import make_config
from tests.file_modes import assert_tree_modes


@pytest.fixture(scope="module")
def two_clip_manifest(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from flowspeed.datasets_prep.demo import make_demo_dataset

    return make_demo_dataset(tmp_path_factory.mktemp("two"), num_videos=2, num_images=0)


def _fixed_noise_loss(cfg: PipelineConfig, model: torch.nn.Module) -> float:
    from flowspeed.datasets_prep.prep import load_samples

    family = get_family("cogvideox")
    data = CachedLatents(cfg.cache_dir, load_samples(cfg.prep_dir))
    batch = collate([data[i] for i in range(len(data))])
    with torch.no_grad():
        return statistics.mean(
            family.training_loss(
                model.eval(), family.load_scheduler(cfg.model), batch, torch.Generator().manual_seed(s)
            ).item()
            for s in range(8)
        )


def test_loss_falls_on_a_fixed_tiny_batch(tmp_path: Path, two_clip_manifest: Path) -> None:
    cfg = make_config(
        tmp_path, two_clip_manifest, "train.max_steps=30", "train.batch_size=2", "train.val_fraction=0", "train.lr=3e-3"
    )
    run_prep(cfg)
    family = get_family("cogvideox")
    before = _fixed_noise_loss(cfg, family.load_transformer(cfg.model, 32, 4))
    res = launch(cfg, None, None)
    assert len(res.losses) == 30
    assert statistics.mean(res.losses[-5:]) < 0.95 * statistics.mean(res.losses[:5])
    after = _fixed_noise_loss(cfg, trained_model(cfg, Path(res.final_dir)))
    assert after < 0.9 * before


def test_resume_gives_the_same_losses_as_a_straight_run(tmp_path: Path, prepped: PipelineConfig) -> None:
    common = ["train.max_steps=10", "train.checkpoint_every=5", "train.grad_accum=2"]
    straight = make_config(
        tmp_path / "a",
        prepped.data.manifest,
        *common,
        f"data.output_dir={prepped.prep_dir}",
        f"data.cache_dir={prepped.cache_dir}",
    )
    full = launch(straight, None, None).losses

    split = make_config(
        tmp_path / "b",
        prepped.data.manifest,
        *common,
        f"data.output_dir={prepped.prep_dir}",
        f"data.cache_dir={prepped.cache_dir}",
        "train.stop_after_steps=5",
        "train.async_checkpoint=true",  # written in the background: the same checkpoint, the same resume
    )
    first = launch(split, None, None)
    assert first.steps == 5 and not Path(first.final_dir).exists()  # stopped early: no export yet
    resumed = launch(
        split.model_copy(update={"train": split.train.model_copy(update={"stop_after_steps": None})}), None, None
    )
    assert resumed.resumed_from == 5
    assert first.losses + resumed.losses == full  # bit-identical on CPU

    latest = ckpt.latest(split.train_dir)
    assert latest is not None and latest.name == "step-00000010"
    state = torch.load(latest / "trainer_state.pt", weights_only=True)  # no pickled code
    assert state["step"] == 10 and state["data"]["consumed"] == 10 * 2  # micro-batches: 10 steps x accum 2
    assert state["data"]["samples_seen"] == 10 * 2 * split.train.batch_size
    assert set(state) >= {"lr_scheduler", "model_args", "layout"}
    assert (latest / "state" / ".metadata").is_file() and (latest / "rng" / "rank-00000.pt").is_file()
    model = get_family("cogvideox").load_transformer(split.model, **state["model_args"])
    ckpt.load_model_weights(latest, model)
    trained = trained_model(split, Path(resumed.final_dir))
    assert all(torch.equal(v, trained.state_dict()[k]) for k, v in model.state_dict().items())  # final == last
    assert (latest / "config.yaml").is_file()


def test_checkpoints_are_pruned_and_partial_ones_ignored(tmp_path: Path, prepped: PipelineConfig) -> None:
    cfg = make_config(
        tmp_path,
        prepped.data.manifest,
        f"data.output_dir={prepped.prep_dir}",
        f"data.cache_dir={prepped.cache_dir}",
        "train.max_steps=6",
        "train.checkpoint_every=2",
        "train.keep_checkpoints=2",
    )
    launch(cfg, None, None)
    assert [p.name for p in ckpt.list_checkpoints(cfg.train_dir)] == ["step-00000004", "step-00000006"]
    (ckpt.checkpoint_dir(cfg.train_dir) / ".step-00000008.partial").mkdir()  # a writer killed mid-way
    assert ckpt.latest(cfg.train_dir).name == "step-00000006"
    assert (Path(cfg.train_dir) / "final" / "transformer" / "config.json").is_file()
    # checkpoints and the export get the umask's modes, not mkdtemp's owner-only ones: teammates can read them
    assert_tree_modes(ckpt.checkpoint_dir(cfg.train_dir) / "step-00000006")
    assert_tree_modes(Path(cfg.train_dir) / "final")


@pytest.mark.slow
def test_two_rank_ddp_run_completes_and_only_rank0_logs(tmp_path: Path, prepped: PipelineConfig) -> None:
    cfg = make_config(
        tmp_path,
        prepped.data.manifest,
        f"data.output_dir={prepped.prep_dir}",
        f"data.cache_dir={prepped.cache_dir}",
        "train.nproc_per_node=2",
        "train.max_steps=4",
        "train.checkpoint_every=2",
        "train.metrics_flush_every=1",
    )
    uri = tracking_uri(cfg)
    client = MlflowClient(uri)
    run = client.create_run(ensure_experiment(client, cfg))
    res = launch(cfg, run.info.run_id, uri)
    assert len(res.losses) == 4 and all(map(lambda x: x == x, res.losses))
    history = client.get_metric_history(run.info.run_id, "train/loss")
    # Rank 1 logging too would double every step.
    assert sorted(m.step for m in history) == [1, 2, 3, 4]
    assert [m.value for m in sorted(history, key=lambda m: m.step)] == pytest.approx(res.losses)
    assert client.get_run(run.info.run_id).data.tags["flowspeed.world_size"] == "2"
    for name in (
        "perf/samples_per_s",
        "perf/frames_per_s",
        "perf/tokens_per_s",
        "perf/data_wait_s",
        "perf/step_time_s",
        "perf/peak_memory_gb",
        "train/lr",
        "train/grad_norm",
    ):
        assert len(client.get_metric_history(run.info.run_id, name)) == 4, name
    assert json.loads((cfg.train_dir / "losses.json").read_text())["losses"] == res.losses
    assert (cfg.train_dir / "final" / "model_index.json").is_file()


@pytest.mark.slow
def test_a_failing_rank_surfaces_its_error(tmp_path: Path, prepped: PipelineConfig) -> None:
    cfg = make_config(
        tmp_path,
        prepped.data.manifest,
        f"data.output_dir={prepped.prep_dir}",
        f"data.cache_dir={prepped.cache_dir}",
        "train.nproc_per_node=2",
        f"train.resume={tmp_path / 'no-such-checkpoint'}",
    )
    with pytest.raises(DistributedJobFailed, match="not a checkpoint directory"):
        launch(cfg, None, None)


def test_bf16_autocast_and_grad_accumulation_train(tmp_path: Path, prepped: PipelineConfig) -> None:
    cfg = make_config(
        tmp_path,
        prepped.data.manifest,
        f"data.output_dir={prepped.prep_dir}",
        f"data.cache_dir={prepped.cache_dir}",
        "train.mixed_precision=bf16",
        "train.grad_accum=2",
        "train.max_steps=3",
    )
    res = launch(cfg, None, None)
    assert len(res.losses) == 3 and all(0 < x < 100 for x in res.losses)
    state = torch.load(ckpt.latest(cfg.train_dir) / "trainer_state.pt", weights_only=True)
    assert state["data"]["consumed"] == 3 * 2  # accumulation consumed 2 micro-batches a step
