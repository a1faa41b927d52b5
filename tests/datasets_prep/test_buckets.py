from pathlib import Path

import pytest
from flowspeed.configs import DataConfig
from flowspeed.datasets_prep.buckets import assign, drop_minorities, valid_frames
from flowspeed.datasets_prep.prep import run_prep
from flowspeed.datasets_prep.probe import MediaInfo, ProbeError
from flowspeed.engines.common.io import read_jsonl
from flowspeed.engines.launch import launch
from flowspeed.engines.models import get_family

from tests.conftest import make_config


def clip(w: int, h: int, frames: int = 60, fps: float = 24.0) -> MediaInfo:
    return MediaInfo("x.mp4", "video", w, h, fps, frames, frames / fps, "h264", 0)


def data(**buckets) -> DataConfig:
    return DataConfig(target_fps=8.0, buckets=buckets)


def test_opensora_bucket_config_picks_resolution_frames_and_aspect() -> None:
    d = data(mode="opensora", bucket_config={"64px": {9: [1.0, 4], 17: [1.0, 2]}, "32px": {9: [1.0, 8]}})
    land = assign(clip(96, 64), "k1", d, 4, 16, 2)  # 60 frames at 24 fps -> 20 usable at 8 fps: 17
    assert (land.frames, land.batch_size) == (17, 2)
    assert land.height % 16 == 0 and land.width % 16 == 0 and land.height < land.width
    port = assign(clip(64, 96), "k1", d, 4, 16, 2)
    assert port.height > port.width
    short = assign(clip(96, 64, frames=30), "k1", d, 4, 16, 2)  # 10 usable frames: 9 is the most
    assert (short.frames, short.batch_size) == (9, 4)
    small = assign(clip(40, 40), "k1", d, 4, 16, 2)  # too small for 64px: falls to 32px
    assert small.batch_size == 8 and small.height * small.width <= 48 * 48


def test_opensora_keep_probability_is_a_deterministic_draw_per_clip() -> None:
    d = data(mode="opensora", bucket_config={"64px": {17: [0.5, 2], 9: [1.0, 4]}})
    picks = [assign(clip(64, 64), f"key{i}", d, 4, 16, 2).frames for i in range(400)]
    assert 140 < picks.count(17) < 260 and set(picks) == {9, 17}
    assert picks == [assign(clip(64, 64), f"key{i}", d, 4, 16, 2).frames for i in range(400)]
    none = data(mode="opensora", bucket_config={"64px": {17: [0.0, 2]}})
    with pytest.raises(ProbeError, match="no bucket fits"):
        assign(clip(64, 64), "k", none, 4, 16, 2)


def test_dynamic_resolution_aligns_caps_area_and_refuses_extreme_aspect() -> None:
    d = data(mode="dynamic", max_hxw=64 * 64, max_frames=17)
    b = assign(clip(96, 64), "k", d, 4, 16, 3)
    assert b.height * b.width <= 64 * 64 and b.height % 16 == 0 and b.width % 16 == 0
    assert (b.frames, b.batch_size) == (17, 3)
    with pytest.raises(ProbeError, match="aspect ratio 2.50"):
        assign(clip(160, 64), "k", d, 4, 16, 3)


def test_frame_counts_respect_the_vae_stride_and_context_parallel() -> None:
    assert [n for n in range(1, 20) if valid_frames(n, 4, 1)] == [1, 5, 9, 13, 17]
    assert [n for n in range(1, 20) if valid_frames(n, 4, 2)] == [5, 13]  # latent frames 2 and 4
    # a family's own rule: OpenSora 1.2's VAE makes 5 latent frames of each 17-frame chunk (51 -> 15, 102 -> 30)
    rule = get_family("opensora1.2").latent_frame_count
    assert [n for n in (17, 34, 51, 68, 102) if valid_frames(n, rule, 2)] == [34, 68, 102]
    assert [rule(n) for n in (1, 17, 51, 102, 20)] == [1, 5, 15, 30, 6]
    d = data(mode="dynamic", max_frames=17, cp_degree=2)
    assert assign(clip(64, 64), "k", d, 4, 16, 1).frames == 13


def test_minority_buckets_are_dropped() -> None:
    shapes = {"a": (9, 64, 64), "b": (9, 64, 64), "c": (17, 32, 48)}
    assert drop_minorities(shapes, 2) == {"c"}


def test_bucketed_prep_caches_several_shapes_and_training_batches_within_them(
    tmp_path: Path, demo_manifest: Path
) -> None:
    cfg = make_config(
        tmp_path, demo_manifest, "data.buckets.mode=opensora",
        "data.buckets.bucket_config={'64px': {9: [1.0, 2], 17: [1.0, 2]}, '32px': {9: [1.0, 2]}}",
        "data.min_side=16", "train.max_steps=4", "train.val_fraction=0",
    )  # fmt: skip
    res = run_prep(cfg)
    shapes = {tuple(r["latent_shape"]) for r in read_jsonl(Path(res.samples))}
    assert len(shapes) >= 2 and res.num_samples == 8
    assert len(launch(cfg, None, None).losses) == 4  # mixing shapes in a batch would fail to stack
