import math
from pathlib import Path

import av
import numpy as np
import pytest

from configs import ClipConfig, PipelineConfig
from engines.device import resolve_device
from engines.torch_engine.launch import launch
from evaluation.clip_score import clip_score
from evaluation.run import run_eval, validation_loss


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

    from evaluation.clip_score import load_clip

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
