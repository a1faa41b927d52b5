"""Samples at checkpoints (engines/tracking/samples.py), read back through MLflow's own client: a tiny video run
logs a frame grid per sampled checkpoint with that step (and the clip beside it), a VLM run appends its answers to
one table with a row per held-out sample and checkpoint, and sampling leaves the training RNG where it was."""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from flowspeed.configs import PipelineConfig, load_config
from flowspeed.datasets_prep.cache import split_records
from flowspeed.datasets_prep.prep import load_samples, run_prep
from flowspeed.engines.launch import launch
from flowspeed.engines.tracking.samples import (
    IMAGE_KEY,
    SKIPPED_TAG,
    TABLE,
    checkpoint_samples,
    grid,
    isolated_rng,
)
from flowspeed.engines.tracking.tracker import ensure_experiment, tracking_uri
from mlflow import MlflowClient
from PIL import Image

from tests.conftest import REPO, make_config


def _train(cfg: PipelineConfig) -> tuple[MlflowClient, str]:
    uri = tracking_uri(cfg)
    client = MlflowClient(uri)
    run_id = client.create_run(ensure_experiment(client, cfg)).info.run_id
    launch(cfg, run_id, uri)
    return client, run_id


def _files(client: MlflowClient, run_id: str, path: str) -> list[str]:
    return sorted(a.path for a in client.list_artifacts(run_id, path) if not a.is_dir)


def test_a_tiny_video_run_logs_a_frame_grid_and_the_clip_per_sampled_checkpoint(
    tmp_path: Path, prepped: PipelineConfig
) -> None:
    cfg = make_config(
        tmp_path,
        prepped.data.manifest,
        f"data.output_dir={prepped.prep_dir}",
        f"data.cache_dir={prepped.cache_dir}",
        "train.max_steps=3",
        "train.checkpoint_every=1",
        "tracking.samples.enabled=true",  # the suite turns them off (FLOWSPEED_SAMPLES=0 in tests/conftest.py)
        "tracking.samples.every=2",  # checkpoints 1, 2, 3: samples at 2, and at 3, the last step
        "tracking.samples.num_inference_steps=1",
    )
    client, run_id = _train(cfg)

    # MLflow's image logging: images/<key>+step+<step>+timestamp+... (and a compressed preview) per step
    logged = re.compile(rf"images/{IMAGE_KEY}\+step\+(\d+)\+timestamp\+\d+\+[0-9a-f-]+\.png")
    steps = [int(m.group(1)) for p in _files(client, run_id, "images") if (m := logged.fullmatch(p))]
    assert steps == [2, 3]
    for step in steps:
        folder = f"samples/step-{step:08d}"
        assert _files(client, run_id, folder) == [
            f"{folder}/{n}" for n in ("grid.png", "prompts.json", "sample_00.mp4")
        ]
        local = Path(client.download_artifacts(run_id, f"{folder}/grid.png", str(tmp_path / str(step))))
        h, w = cfg.data.height, cfg.data.width
        assert Image.open(local).size == (8 * w + 7 * 2, h)  # one prompt: a row of 8 of its 9 frames
    history = client.get_metric_history(run_id, "perf/sample_seconds")
    assert sorted(m.step for m in history) == [2, 3] and all(m.value > 0 for m in history)
    assert SKIPPED_TAG not in client.get_run(run_id).data.tags
    assert not (cfg.train_dir / "samples" / ".model").exists()  # the scratch export is gone


def test_a_vlm_run_appends_its_answers_to_one_table(tmp_path: Path, demo_manifest: Path) -> None:
    cfg = load_config(
        REPO / "configs" / "pipelines" / "qwen2_vl-sft.yaml",
        [
            f"data.manifest={demo_manifest.parent / 'conversations.jsonl'}",
            "train.max_steps=2",
            "train.checkpoint_every=1",
            "train.val_fraction=0.5",
            "tracking.samples.enabled=true",
            "tracking.samples.count=2",
            "model.max_text_length=256",
            "eval.max_new_tokens=4",
        ],
        workdir=tmp_path,
    )
    run_prep(cfg)
    _, val = split_records(load_samples(cfg.prep_dir), cfg.train.val_fraction)
    assert len(val) >= 2
    client, run_id = _train(cfg)

    path = Path(client.download_artifacts(run_id, TABLE, str(tmp_path / "table")))
    table = json.loads(path.read_text())  # MLflow's table artifact: {"columns": [...], "data": [[...], ...]}
    rows = [dict(zip(table["columns"], row, strict=True)) for row in table["data"]]
    assert [(r["step"], r["source"]) for r in rows] == [(s, v["source"]) for s in (1, 2) for v in val[:2]]
    assert all(r["split"] == "held_out" and r["prompt"] and r["reference"] for r in rows)
    assert all(isinstance(r["response"], str) for r in rows)
    assert sorted(m.step for m in client.get_metric_history(run_id, "perf/sample_seconds")) == [1, 2]


def test_sampling_leaves_every_rng_where_it_was() -> None:
    """A pipeline may seed or draw from the global generators; training must draw what it would have."""
    random.seed(1), np.random.seed(1), torch.manual_seed(1)
    expected = (random.random(), np.random.rand(), torch.rand(1).item())
    random.seed(1), np.random.seed(1), torch.manual_seed(1)
    with isolated_rng(torch.device("cpu")):
        random.seed(7), np.random.seed(7), torch.manual_seed(7)
        random.random(), np.random.rand(), torch.rand(3)
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected


@pytest.mark.parametrize(("frames", "columns", "rows"), [(9, 8, 2), (4, 4, 2), (1, 2, 1)])
def test_the_grid_has_a_row_per_prompt_and_images_side_by_side(frames: int, columns: int, rows: int) -> None:
    videos = np.full((2, frames, 4, 6, 3), 200, np.uint8)
    videos[1, -1] = 50
    out = grid(videos)
    assert out.shape == (rows * 4 + (rows - 1) * 2, columns * 6 + (columns - 1) * 2, 3)
    assert out[-1, -1].tolist() == [50] * 3  # the last tile is the second sample's last frame


class _Recorder:
    """What `checkpoint_samples` tells the tracker, without an MLflow run."""

    def __init__(self) -> None:
        self.tags: dict[str, str] = {}
        self.metrics: dict[str, tuple[float, int]] = {}

    def set_tags(self, tags: dict[str, str]) -> None:
        self.tags |= tags

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        self.metrics |= {k: (v, step) for k, v in metrics.items()}


def _export_fails(path: Path) -> None:
    path.mkdir(parents=True)
    raise RuntimeError("CUDA out of memory (as a pipeline beside the training state might be)")


def test_a_failed_sample_is_tagged_with_its_reason_and_training_goes_on(tmp_path: Path, demo_manifest: Path) -> None:
    cfg = make_config(tmp_path, demo_manifest, "tracking.samples.enabled=true")
    rec = _Recorder()
    checkpoint_samples(cfg, _export_fails, rec, 10, 0, torch.device("cpu"))  # type: ignore[arg-type]
    assert (
        rec.tags[SKIPPED_TAG]
        == "step 10: RuntimeError: CUDA out of memory (as a pipeline beside the training state might be)"
    )
    assert rec.metrics["perf/sample_seconds"][1] == 10
    assert not (cfg.train_dir / "samples" / ".model").exists()

    no_prompts = make_config(tmp_path, demo_manifest, "tracking.samples.enabled=true", "eval.prompts=[]")
    rec = _Recorder()
    checkpoint_samples(no_prompts, _export_fails, rec, 10, 0, torch.device("cpu"))  # type: ignore[arg-type]
    assert rec.tags == {SKIPPED_TAG: "no prompts: set tracking.samples.prompts or eval.prompts"} and not rec.metrics


@pytest.mark.parametrize(("env", "enabled"), [(None, True), ("1", True), ("0", False)])
def test_samples_are_on_by_default_and_off_with_flowspeed_samples_0(
    env: str | None, enabled: bool, tmp_path: Path, demo_manifest: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    if env is None:
        monkeypatch.delenv("FLOWSPEED_SAMPLES", raising=False)
    else:
        monkeypatch.setenv("FLOWSPEED_SAMPLES", env)
    assert make_config(tmp_path, demo_manifest).tracking.samples.enabled is enabled
