import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from flowspeed.datasets_prep.curate import detect_scenes, load_head, motion_score
from flowspeed.datasets_prep.demo import render_clip
from flowspeed.datasets_prep.mp4 import write_mp4
from flowspeed.datasets_prep.prep import run_prep
from flowspeed.engines.common.io import read_jsonl, write_jsonl
from safetensors.torch import save_file

from tests.conftest import make_config

SCENES = [("circle", "red", "black", "from left to right", 30), ("square", "blue", "grey", "from top to bottom", 25),
          ("triangle", "yellow", "dark blue", "from right to left", 35)]  # fmt: skip


def three_scene_clip(path: Path) -> Path:
    parts = [render_clip(shape, col, bg, motion, 96, 64, n) for shape, col, bg, motion, n in SCENES]
    return write_mp4(path, np.concatenate(parts), 24)


def test_scene_split_finds_the_cuts_and_caches_each_scene(tmp_path: Path) -> None:
    clip = three_scene_clip(tmp_path / "data" / "three.mp4")
    cfg_ss = make_config(tmp_path / "w", tmp_path / "m.jsonl").data.curate.scene_split.model_copy(
        update={"enabled": True})  # fmt: skip
    cuts = detect_scenes(clip, cfg_ss)
    assert len(cuts) == 3
    for (start, end), (s, e) in zip(cuts, [(0, 30), (30, 55), (55, 90)], strict=True):
        assert abs(start - s) <= 2 and abs(end - e) <= 2

    manifest = write_jsonl(tmp_path / "data" / "data.jsonl", [{"file": "three.mp4", "captions": "shapes"}])
    cfg = make_config(tmp_path / "w", manifest, "data.curate.scene_split.enabled=true")
    res = run_prep(cfg)
    samples = read_jsonl(Path(res.samples))
    assert [tuple(s["clip_range"]) for s in samples] == [tuple(c) for c in cuts]
    for s in samples:  # every sampled frame lies inside its scene
        assert all(s["clip_range"][0] <= i < s["clip_range"][1] for i in s["frame_indices"])
    assert len({s["key"] for s in samples}) == 3
    again = run_prep(cfg)
    assert again.num_cached == 3 and again.encoder_calls == 0

    import av

    cut = run_prep(
        make_config(
            tmp_path / "w2", manifest, "data.curate.scene_split.enabled=true", "data.curate.scene_split.reencode=true"
        )
    )
    for s in read_jsonl(Path(cut.samples)):
        with av.open(s["clip_path"]) as c:
            assert sum(1 for _ in c.decode(video=0)) == s["clip_range"][1] - s["clip_range"][0]


def test_motion_separates_static_from_moving_and_filters(tmp_path: Path) -> None:
    moving = render_clip("circle", "red", "black", "from left to right", 96, 64, 48)
    static = np.repeat(moving[:1], 48, axis=0)
    assert motion_score(moving[::6]) > 1.0 > motion_score(static[::6]) == 0.0
    assert motion_score(moving[::6], "diff") > motion_score(static[::6], "diff") == 0.0
    write_mp4(tmp_path / "d" / "moving.mp4", moving, 24)
    write_mp4(tmp_path / "d" / "static.mp4", static, 24)
    manifest = write_jsonl(
        tmp_path / "d" / "data.jsonl",
        [{"file": "moving.mp4", "captions": "a moving circle"}, {"file": "static.mp4", "captions": "a still circle"}],
    )
    res = run_prep(
        make_config(tmp_path / "w", manifest, "data.curate.motion.enabled=true", "data.curate.motion.min_score=0.5")
    )
    (kept,) = read_jsonl(Path(res.samples))
    assert kept["source"].endswith("moving.mp4") and kept["motion"] > 0.5
    (rej,) = read_jsonl(Path(res.rejects))
    assert rej["code"] == "low_motion" and rej["path"].endswith("static.mp4")


def test_aesthetic_head_from_a_file_scores_and_near_duplicates_are_dropped(
    tmp_path: Path, demo_manifest: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = tmp_path / "data"
    shutil.copytree(demo_manifest.parent, data)
    rows = read_jsonl(data / "data.jsonl")
    shutil.copy(data / rows[0]["file"], data / "copy.mp4")  # same frames, another caption: a near duplicate
    rows.append({"file": "copy.mp4", "captions": "the same clip, captioned again"})
    write_jsonl(data / "data.jsonl", rows)
    # A LAION-style chain of Linear layers (their Dropouts hold no weights), saved like theirs.
    head = {"layers.0.weight": torch.randn(16, 64), "layers.0.bias": torch.zeros(16),
            "layers.2.weight": torch.randn(1, 16), "layers.2.bias": torch.full((1,), 5.0)}  # fmt: skip
    save_file(head, str(tmp_path / "head.safetensors"))
    net = load_head(str(tmp_path / "head.safetensors"), 64)
    x = torch.randn(3, 64)
    assert torch.allclose(net(x), (x @ head["layers.0.weight"].T) @ head["layers.2.weight"].T + 5.0, atol=1e-5)
    with pytest.raises(ValueError, match="maps 64 -> 1; the CLIP model gives 32-dim"):
        load_head(str(tmp_path / "head.safetensors"), 32)

    args = [
        "data.curate.aesthetic.enabled=true",
        f"data.curate.aesthetic.head={tmp_path / 'head.safetensors'}",
        "data.curate.dedup.enabled=true",
        "data.curate.dedup.threshold=0.99999",  # random-init CLIP puts distinct clips at up to 0.9994
    ]
    cfg = make_config(tmp_path / "w", data / "data.jsonl", *args)
    res = run_prep(cfg)
    rejects = read_jsonl(Path(res.rejects))
    assert [r["code"] for r in rejects] == ["duplicate"] and rejects[0]["path"].endswith("copy.mp4")
    samples = read_jsonl(Path(res.samples))
    assert len(samples) == 8 and all(np.isfinite(s["aesthetic"]) for s in samples)

    # New thresholds: nothing is rescored, the scores decide.
    import flowspeed.datasets_prep.curate as mod

    monkeypatch.setattr(mod, "ClipScorer", None)  # would fail if anything were scored again
    median = float(np.median([s["aesthetic"] for s in samples]))
    res2 = run_prep(
        make_config(tmp_path / "w", data / "data.jsonl", *args, f"data.curate.aesthetic.min_score={median}")
    )
    kept = read_jsonl(Path(res2.samples))
    assert 0 < len(kept) < 8 and all(s["aesthetic"] >= median for s in kept)
    assert res2.num_rejected == 9 - len(kept) and res2.rejected_by_reason["low_aesthetic"] >= 8 - len(kept)


def test_slices_keep_every_score_and_dedup_sees_across_slices(tmp_path: Path, demo_manifest: Path) -> None:
    from flowspeed.datasets_prep.curate import ScoreCache
    from flowspeed.datasets_prep.prep import merge_slices, prep_slice

    data = tmp_path / "data"
    shutil.copytree(demo_manifest.parent, data)
    rows = read_jsonl(data / "data.jsonl")
    shutil.copy(data / rows[0]["file"], data / "copy.mp4")  # record 8: slice 2 of 3; its original is in slice 0
    rows.append({"file": "copy.mp4", "captions": "the same clip, captioned again"})
    write_jsonl(data / "data.jsonl", rows)
    cfg = make_config(
        tmp_path / "w",
        data / "data.jsonl",
        "data.curate.dedup.enabled=true",
        "data.curate.dedup.threshold=0.99999",
        "data.curate.motion.enabled=true",
    )
    for i in range(3):  # what three concurrent slice tasks do, each with its own score files
        prep_slice(cfg, i, 3)
    res = merge_slices(cfg, 3)
    assert [r["code"] for r in read_jsonl(Path(res.rejects))] == ["duplicate"]
    assert res.num_samples == 8
    files = sorted(p.name for p in (cfg.curation_dir).glob("scores-*.jsonl"))
    assert len(files) == 3
    cache = ScoreCache(cfg.curation_dir, cfg.data.curate)
    assert len(cache.scores.rows) == 9 and len(cache.emb) == 9  # no slice's scores were lost
