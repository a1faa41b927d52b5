"""The megatron engine behind the same flows: the tiny Qwen2-VL recipe with `train.engine=megatron` (2 CPU ranks,
pp=2) trains end to end, logs the torch engine's metric names, exports a transformers model the eval scores, and
a killed-and-resumed run continues from its megatron checkpoint."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from flowspeed.configs import load_config
from mlflow import MlflowClient

from tests.conftest import REPO

RECIPE = REPO / "configs" / "pipelines" / "qwen2_vl-sft-megatron.yaml"
# What the torch engine's loop logs every step (engines/torch_engine/trainer.py), MFU aside (no CPU peak known).
TORCH_ENGINE_METRICS = {
    "train/loss", "train/lr", "train/grad_norm", "perf/step_time_s", "perf/data_wait_s", "perf/fwd_bwd_s",
    "perf/optimizer_s", "perf/samples_per_s", "perf/frames_per_s", "perf/tokens_per_s",
    "perf/model_tflops_per_s_per_rank", "perf/peak_memory_gb",
}  # fmt: skip


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from flowspeed.datasets_prep.demo import make_demo_dataset

    root = tmp_path_factory.mktemp("demo")
    make_demo_dataset(root, num_videos=6, num_images=2)
    return root / "conversations.jsonl"


def test_megatron_recipe_trains_exports_and_logs_the_torch_engine_metrics(demo: Path, tmp_path: Path) -> None:
    from flowspeed.flows.pipeline import pipeline

    cfg = load_config(RECIPE, ["train.max_steps=4", "train.checkpoint_every=2", f"data.manifest={demo}"],
                      workdir=tmp_path)  # fmt: skip
    out = pipeline(cfg)
    losses = out["train"]["losses"]
    assert len(losses) == 4 and all(math.isfinite(x) for x in losses)
    final = Path(out["train"]["final_dir"])
    from transformers import Qwen2VLForConditionalGeneration

    model = Qwen2VLForConditionalGeneration.from_pretrained(final)  # a plain transformers export
    assert model.config.text_config.num_hidden_layers == 2
    metrics = json.loads((cfg.eval_dir / "metrics.json").read_text())["metrics"]
    assert math.isfinite(metrics["eval/val_loss"])
    client = MlflowClient(out["tracking_uri"])
    runs = client.search_runs([client.get_experiment_by_name(cfg.experiment).experiment_id])
    train_run = next(r for r in runs if r.data.tags.get("flowspeed.stage") == "train")
    assert TORCH_ENGINE_METRICS <= set(train_run.data.metrics), TORCH_ENGINE_METRICS - set(train_run.data.metrics)
    history = client.get_metric_history(train_run.info.run_id, "train/loss")
    assert [m.value for m in sorted(history, key=lambda m: m.step)] == pytest.approx(losses)
    assert train_run.data.tags["flowspeed.engine"] == "megatron"
    assert "pp=2" in train_run.data.tags["flowspeed.engine_layout"]
    ckpts = sorted((cfg.train_dir / "checkpoints").glob("step-*"))
    assert [p.name for p in ckpts] == ["step-00000002", "step-00000004"]
    assert (ckpts[-1] / "megatron" / "metadata.json").is_file()

    # Resume from step 2's checkpoint in a fresh output folder: steps 3-4 repeat the uninterrupted run's losses
    # (model, optimizer moments and sampler position all restored).
    from flowspeed.engines.launch import launch

    resumed = cfg.model_copy(update={"train": cfg.train.model_copy(
        update={"output_dir": tmp_path / "resumed", "resume": str(ckpts[0])})})  # fmt: skip
    again = launch(resumed, None, None)
    assert again.resumed_from == 2
    assert again.losses == pytest.approx(losses[2:], rel=1e-5, abs=1e-6)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["train.lora.enabled=true"], "train.lora is not supported on the megatron engine"),
        (
            ["model.family=whisper"],
            "train.engine=megatron trains qwen2_vl, llava, qwen2_5_vl; 'whisper' trains on the torch",
        ),
        (["train.parallel.pp_virtual_stages=2", "train.grad_accum=3"], "multiple of pp=2"),
        (["train.ema.enabled=true"], "train.ema.enabled: not available on the megatron engine"),
        (["train.parallel.tp=3"], "does not divide the 2 ranks"),
    ],
)
def test_megatron_settings_it_cannot_honour_are_refused_before_launch(
    overrides: list[str], message: str, tmp_path: Path
) -> None:
    from flowspeed.engines.launch import launch

    with pytest.raises(ValueError, match=message):  # refused when the config loads ...
        load_config(RECIPE, overrides, workdir=tmp_path)
    cfg = load_config(RECIPE, overrides, workdir=tmp_path, check=False)
    with pytest.raises(ValueError, match=message):  # ... and by the launcher, for a config built in code
        launch(cfg, None, None)
