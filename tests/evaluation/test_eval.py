import json
import math
from pathlib import Path
from typing import Any

import av
import numpy as np
import pytest
from flowspeed.configs import ClipConfig, PipelineConfig
from flowspeed.engines.common.device import resolve_device
from flowspeed.engines.launch import launch
from flowspeed.evaluation.clip_score import clip_score
from flowspeed.evaluation.common import measured
from flowspeed.evaluation.run import run_eval, validation_loss
from huggingface_hub import ModelCard


@pytest.fixture(scope="module")
def trained(prepped: PipelineConfig) -> PipelineConfig:
    launch(prepped, None, None)
    return prepped


def test_eval_writes_decodable_videos_and_finite_metrics(trained: PipelineConfig) -> None:
    res = run_eval(trained)
    assert len(res.videos) == len(trained.eval.prompts) == 2
    for path in res.videos:
        with av.open(path) as c:
            frames = [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]
        assert len(frames) == trained.data.num_frames
        assert frames[0].shape == (trained.data.height, trained.data.width, 3)
    m = res.metrics
    assert math.isfinite(m["eval/clip_score"]) and 0 <= m["eval/clip_score"] <= 100
    assert math.isfinite(m["eval/clip_cosine"]) and math.isfinite(m["eval/val_loss"])
    assert m["eval/val_samples"] >= 1
    assert (Path(res.eval_dir) / "metrics.json").is_file() and (Path(res.eval_dir) / "config.yaml").is_file()
    # The trained export's model card (written at export, read by huggingface_hub) now carries the metrics.
    card = ModelCard.load(trained.train_dir / "final" / "README.md")
    assert {r.metric_name: r.metric_value for r in card.data.eval_results}["eval/val_loss"] == m["eval/val_loss"]
    assert card.data.to_dict()["flowspeed"]["steps"] == trained.train.max_steps


def test_validation_loss_is_deterministic(trained: PipelineConfig) -> None:
    device = resolve_device("cpu")
    final = trained.train_dir / "final"
    a, n = validation_loss(trained, final, device)
    b, _ = validation_loss(trained, final, device)
    assert n >= 1 and a == b


def test_clip_score_tells_matching_prompts_from_others() -> None:
    """Same frames, two prompts: a deterministic score per pair, bounded and finite."""
    videos = np.random.default_rng(0).integers(0, 255, (2, 3, 64, 64, 3), dtype=np.uint8)
    cfg = ClipConfig()
    s1 = clip_score(videos, ["a red circle", "a blue square"], cfg, resolve_device("cpu"))
    s2 = clip_score(videos, ["a red circle", "a blue square"], cfg, resolve_device("cpu"))
    s3 = clip_score(videos, ["a blue square", "a red circle"], cfg, resolve_device("cpu"))
    assert s1 == s2 and s1["clip_cosine"] != s3["clip_cosine"]
    with pytest.raises(ValueError, match="unknown open_clip model"):
        clip_score(videos, ["x", "y"], ClipConfig(model="no-such-clip"), resolve_device("cpu"))


def test_eval_without_a_trained_model_explains(tmp_path: Path, prepped: PipelineConfig) -> None:
    cfg = prepped.model_copy(update={"workdir": tmp_path})
    with pytest.raises(FileNotFoundError, match="flowspeed train"):
        run_eval(cfg, tmp_path / "nothing")


def test_clip_pretrained_accepts_a_local_checkpoint_file(tmp_path: Path) -> None:
    import torch
    from flowspeed.evaluation.clip_score import load_clip

    device = resolve_device("cpu")
    model, _, _ = load_clip(ClipConfig(), device)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01)  # weights that no random init would give
    path = tmp_path / "clip.pt"
    torch.save({"state_dict": model.state_dict()}, path)
    loaded, _, _ = load_clip(ClipConfig(pretrained=str(path)), device)
    assert all(
        torch.equal(a, b) for a, b in zip(model.state_dict().values(), loaded.state_dict().values(), strict=True)
    )
    with pytest.raises(FileNotFoundError, match="eval.clip.pretrained"):
        load_clip(ClipConfig(pretrained=str(tmp_path / "missing.pt")), device)


def _with_eval(cfg: PipelineConfig, out: Path, **eval_updates: object) -> PipelineConfig:
    gen = eval_updates.pop("generation", {})
    parallel = eval_updates.pop("parallel", {})
    e = cfg.eval.model_copy(update={"output_dir": out, **eval_updates})
    e = e.model_copy(update={"parallel": e.parallel.model_copy(update=parallel)})
    return cfg.model_copy(update={"eval": e.model_copy(update={"generation": e.generation.model_copy(update=gen)})})


@pytest.fixture(scope="module")
def tiny_dino(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random-init DINOv2 saved as a local folder: what eval.generation.dino points at."""
    from transformers import BitImageProcessor, Dinov2Config, Dinov2Model

    path = tmp_path_factory.mktemp("dino")
    config = Dinov2Config(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                          image_size=28, patch_size=14)  # fmt: skip
    Dinov2Model(config).save_pretrained(path)
    BitImageProcessor(size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28}).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def metric_settings(trained: PipelineConfig, demo_manifest: Path, tiny_dino: Path) -> dict:
    """FID/FVD against the demo folder (6 clips, 2 stills, the 2 rejected stills of its preference pairs) with small
    extractor inputs, and every VBench dimension: 2 prompts x 2 samples."""
    gen = {"reference": str(demo_manifest.parent), "fid_size": 75, "fvd_size": 32, "dino": str(tiny_dino)}
    return {"samples_per_prompt": 2, "batch_size": 2, "generation": gen}


def _frames(path: str) -> np.ndarray:
    with av.open(path) as c:
        return np.stack([f.to_ndarray(format="rgb24") for f in c.decode(video=0)])


def _same_rows(a: list[dict], b: list[dict]) -> None:
    """Equal rows, floats to 1e-6: CLIP features are float32 sums whose order follows the thread count
    (a torchrun rank runs 1 thread, the test process may run more)."""
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert x.keys() == y.keys()
        for k in (k for k in x if not measured(k)):
            assert y[k] == (pytest.approx(x[k], rel=1e-6) if isinstance(x[k], float) else x[k]), (x["index"], k)


def _scores(metrics: dict[str, float]) -> dict[str, float]:
    return {k: v for k, v in metrics.items() if not measured(k)}


def _rows(res) -> list[dict]:  # noqa: ANN001
    path = Path(res.eval_dir) / "samples" / "generation.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def one_rank_eval(trained: PipelineConfig, metric_settings: dict, tmp_path_factory: pytest.TempPathFactory) -> Any:
    """The one-process eval with every generation metric: what the metric test reads and what the two-rank
    eval must equal (one eval for both: each costs tens of seconds on CPU)."""
    return run_eval(_with_eval(trained, tmp_path_factory.mktemp("one-rank-eval"), **metric_settings))


def test_generation_metrics_in_the_eval(trained: PipelineConfig, one_rank_eval: Any) -> None:
    res = one_rank_eval
    m, rows = res.metrics, _rows(res)
    assert len(res.videos) == len(rows) == 4 and [r["seed"] for r in rows] == [1234, 1235, 1236, 1237]
    assert [r["prompt"] for r in rows] == [trained.eval.prompts[0]] * 2 + [trained.eval.prompts[1]] * 2
    for key in ("fid", "fvd", "temporal_flickering", "motion_smoothness", "subject_consistency",
                "background_consistency"):  # fmt: skip
        assert math.isfinite(m[f"eval/{key}"]), key
    assert m["eval/fid"] > 0 and m["eval/fvd"] > 0
    # each overall number is the mean of the per-sample rows that MLflow shows as a table
    for key in ("clip_cosine", "temporal_flickering", "subject_consistency"):
        assert m[f"eval/{key}"] == pytest.approx(sum(r[key] for r in rows) / 4)
    # CLIP score as torchmetrics computes it over all frame-prompt pairs: 100 * mean cosine, clamped after the mean
    assert m["eval/clip_score"] == pytest.approx(max(0.0, 100 * sum(r["clip_cosine"] for r in rows) / 4), rel=1e-5)
    assert res.info["motion_smoothness_interpolator"] == "linear (VBench: AMT-S)"  # deviations are tagged
    # a random-init extractor is labelled as such, with the sample counts behind the number
    assert res.info["fid_features"] == res.info["fvd_features"] == "random-init"
    assert res.info["fvd_samples"] == "4 generated vs 10 reference clips"
    assert not (Path(res.eval_dir) / ".partial").exists()  # per-item shards are gone once the eval is done


def test_fvd_with_one_sample_is_refused_before_generating(trained: PipelineConfig, tmp_path: Path) -> None:
    cfg = _with_eval(trained, tmp_path / "eval", prompts=["one"], generation={"reference": "held_out"})
    with pytest.raises(ValueError, match="FVD needs at least 2 generated videos"):
        run_eval(cfg)
    assert not (tmp_path / "eval" / "videos").exists()


@pytest.mark.slow
def test_two_rank_eval_matches_one_rank(
    trained: PipelineConfig, metric_settings: dict, one_rank_eval: Any, tmp_path: Path
) -> None:
    """torchrun with 2 gloo ranks: each generates and scores its half, rank 0 gathers and reduces."""
    one = one_rank_eval
    two = run_eval(_with_eval(trained, tmp_path / "two", nproc_per_node=2, **metric_settings))
    assert set(_scores(one.metrics)) == set(_scores(two.metrics))
    for key, value in _scores(one.metrics).items():
        assert two.metrics[key] == pytest.approx(value, rel=1e-5, abs=1e-9), key  # float32 sum order, as below
    # Per-sample scores are computed on the raw frames, so equal rows mean equal samples. The mp4s are
    # not compared: x264 at crf 18 on a random-init model's noise-like frames is far from lossless.
    _same_rows(_rows(one), _rows(two))
    for a, b in zip(one.videos, two.videos, strict=True):
        assert Path(a).name == Path(b).name and _frames(a).shape == _frames(b).shape


@pytest.mark.slow
def test_cfg_parallel_eval_matches_one_rank(
    trained: PipelineConfig, metric_settings: dict, one_rank_eval: Any, tmp_path: Path
) -> None:
    """eval.parallel cfg=2 on 2 torchrun ranks: both ranks make every sample together (the guided call's halves),
    the first writes and scores it; the result equals the one-process eval, and the layout and each rank's memory
    are reported."""
    cfg = _with_eval(trained, tmp_path / "cfg", nproc_per_node=2, parallel={"cfg": 2}, **metric_settings)
    two = run_eval(cfg)
    one = one_rank_eval
    assert two.info["parallel"] == "dp1 x cfg2 x cp1" and one.info["parallel"] == "dp1 x cfg1 x cp1"
    assert {"eval/peak_memory_gb_rank0", "eval/peak_memory_gb_rank1"} <= set(two.metrics)
    assert all(two.metrics[f"eval/peak_memory_gb_rank{r}"] > 0 for r in range(2))
    rows = _rows(two)
    assert [r["index"] for r in rows] == [0, 1, 2, 3] and all(r["sample_seconds"] > 0 for r in rows)
    # The split changes float32 summation order (max |diff| ~1e-6 on frames in [0, 1], see
    # tests/engines/torch_engine/test_sampling_parallel.py); a uint8 level may flip at a rounding boundary, so scores
    # computed on the uint8 frames agree to 1e-4, not bit for bit.
    for a, b in zip(_rows(one), rows, strict=True):
        for k, v in a.items():
            if isinstance(v, float) and not measured(k):
                assert b[k] == pytest.approx(v, rel=1e-4, abs=1e-6), (a["index"], k)
    for key in ("eval/clip_score", "eval/fid", "eval/fvd"):
        assert two.metrics[key] == pytest.approx(one.metrics[key], rel=1e-3), key
    assert sorted(p.name for p in (cfg.eval_dir / "videos").iterdir()) == [f"sample_{i:02d}.mp4" for i in range(4)]


def test_a_killed_eval_resumes_where_it_stopped(trained: PipelineConfig, tmp_path: Path) -> None:
    """SIGKILL mid-eval, run again: finished samples are reused (not regenerated) and the result equals
    an uninterrupted eval's."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from flowspeed.configs import save_config

    settings = {"samples_per_prompt": 3, "batch_size": 1}  # 6 samples: killed after 3, half still to make
    cfg = _with_eval(trained, tmp_path / "killed", **settings)
    path = save_config(cfg, tmp_path, "eval.yaml")
    final = trained.train_dir / "final"
    cmd = [sys.executable, "-m", "flowspeed.evaluation.run", "--config", str(path), "--final-dir", str(final)]
    proc = subprocess.Popen(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"})
    partial = cfg.eval_dir / ".partial"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        shards = list(partial.glob("generate-*/rank*.jsonl"))
        if shards and len(shards[0].read_text().splitlines()) >= 3:
            break
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (cfg.eval_dir / "metrics.json").exists(), "the eval finished before it could be killed"
    done = len(next(partial.glob("generate-*/rank*.jsonl")).read_text().splitlines())
    assert 3 <= done < 6
    first = cfg.eval_dir / "videos" / "sample_00.mp4"
    stamp = first.stat().st_mtime_ns
    resumed = run_eval(cfg)
    assert first.stat().st_mtime_ns == stamp  # reused, not generated again
    clean = run_eval(_with_eval(trained, tmp_path / "clean", **settings))
    _same_rows(_rows(resumed), _rows(clean))
    assert _scores(resumed.metrics) == pytest.approx(_scores(clean.metrics), rel=1e-5)
