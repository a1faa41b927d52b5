"""CLIP score, Fréchet distance and VBench dimensions against values their reference scorers printed once.

The inputs are rebuilt here from `tests.fidelity.seeded_tensor` exactly as the reference scripts build them:
docs/fidelity/ref_generation_metrics.py (torchmetrics 1.9.0 CLIPScore and FrechetInceptionDistance, pytorch-fid
0.3.0) and docs/fidelity/ref_vbench_metrics.py (VBench v0.1.5 per-video and set code). CI never runs those.
Tolerances: the references accumulate in float32 (VBench's cv2/np means, torchmetrics' score state), we in
float64 or a different float32 order, so agreement is to ~1e-7 relative; 1e-6 leaves room without hiding a
formula change (the smallest such change below moves a value by more than 1e-3).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from flowspeed.evaluation import generation_metrics as gm
from flowspeed.evaluation.clip_score import clip_score_of, frame_cosines, video_clip_score
from flowspeed.evaluation.generation_eval import dino_pixels

from tests.fidelity import seeded_tensor

# --------------------------------------------------------------------------- CLIP score (torchmetrics)

CLIP_D = 2 * 4 * 3
FRAMES = {"a": 1, "b": 4, "c": 6}
PROMPTS = {"a": "p0", "b": "p1", "c": "p2"}
LEAN = {"a": 0.5, "b": -0.15, "c": 0.25}
# torchmetrics CLIPScore of each video alone (every frame paired with its prompt), and of the whole set
TORCHMETRICS_PER_VIDEO = {"a": 53.538978576660156, "b": 0.0, "c": 16.46217918395996}
TORCHMETRICS_SET = 3.813783884048462
# the old rule, 100 * max(cos, 0) per frame and then the mean, gave 17.415197372436523 for video "c"
OLD_RULE_C = 17.415197372436523


def _text_feature(prompt: str) -> torch.Tensor:
    return seeded_tensor(f"text-{prompt}", (CLIP_D,), 0, scale=1.0)


def _clip_video(name: str) -> np.ndarray:
    lean = LEAN[name] * 40.0 * _text_feature(PROMPTS[name]).view(2, 4, 3)
    x = seeded_tensor(f"clip-{name}", (FRAMES[name], 2, 4, 3), 0, scale=40.0) + lean + 128.0
    return x.clamp(0, 255).round().to(torch.uint8).numpy()


class _FakeClip(torch.nn.Module):
    """An open_clip stand-in with the reference script's encoders: a frame's feature is its pixels - 128."""

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        return images.float() - 128.0

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        return torch.stack([_text_feature(f"p{int(i)}") for i in tokens[:, 0]])


def _clip() -> tuple:
    preprocess = lambda image: torch.from_numpy(np.asarray(image).copy()).flatten()  # noqa: E731
    tokenizer = lambda texts: torch.tensor([[int(t[1:])] for t in texts])  # noqa: E731
    return _FakeClip(), preprocess, tokenizer


@pytest.mark.parametrize("name", sorted(FRAMES))
def test_video_clip_score_is_torchmetrics(name: str) -> None:
    score, cosine = video_clip_score(_clip(), _clip_video(name), PROMPTS[name], torch.device("cpu"))
    assert score == pytest.approx(TORCHMETRICS_PER_VIDEO[name], rel=1e-6, abs=1e-6)
    assert (cosine < 0) == (name == "b")  # a negative mean cosine clamps to 0 after the mean


def test_set_clip_score_clamps_after_the_mean_over_all_pairs() -> None:
    cos = torch.cat([frame_cosines(_clip(), _clip_video(n), PROMPTS[n], torch.device("cpu")) for n in sorted(FRAMES)])
    assert clip_score_of(cos) == pytest.approx(TORCHMETRICS_SET, rel=1e-6)
    # neither the mean of the per-video scores nor the per-frame clamp is torchmetrics' number
    assert np.mean(list(TORCHMETRICS_PER_VIDEO.values())) > TORCHMETRICS_SET + 10
    c = frame_cosines(_clip(), _clip_video("c"), PROMPTS["c"], torch.device("cpu"))
    assert (100 * c.clamp(min=0)).mean().item() == pytest.approx(OLD_RULE_C, rel=1e-6)
    assert clip_score_of(c) == pytest.approx(TORCHMETRICS_PER_VIDEO["c"], rel=1e-6)
    assert clip_score_of([-0.2, -0.1]) == 0.0
    with pytest.raises(ValueError, match="no \\(image, text\\) pairs"):
        clip_score_of([])


# --------------------------------------------------------------------------- Fréchet distance (pytorch-fid)

# (N, D, tag) -> (pytorch-fid calculate_frechet_distance, torchmetrics FrechetInceptionDistance)
FRECHET = {
    (64, 12, "full"): (21.786808743172507, 21.786808743172536),
    (10, 16, "singular"): (67.05302244790673, 67.05302230622081),  # N < D: both covariances are singular
}


def _fid_sets(n: int, d: int, tag: str) -> tuple[np.ndarray, np.ndarray]:
    a = seeded_tensor(f"fid-a-{tag}", (n, d), 0, scale=1.0).double().numpy()
    mix = seeded_tensor(f"fid-mix-{tag}", (d, d), 0, scale=0.5).double().numpy()
    b = seeded_tensor(f"fid-b-{tag}", (n, d), 0, scale=1.0).double().numpy() @ (np.eye(d) + mix) + 0.3
    return a, b


@pytest.mark.parametrize("case", sorted(FRECHET))
def test_frechet_distance_is_pytorch_fids_and_torchmetrics(case: tuple[int, int, str]) -> None:
    pytorch_fid, torchmetrics = FRECHET[case]
    a, b = _fid_sets(*case)
    (mu_a, s_a), (mu_b, s_b) = gm.feature_stats(a), gm.feature_stats(b)
    # same scipy sqrtm and eps retry as pytorch-fid: equal to float64 rounding when the covariances have full
    # rank. With N < D they have rank N-1, and the square root is not Lipschitz at a zero eigenvalue: a rounding
    # perturbation u*||S1 S2|| moves each of the D-N+1 vanishing roots by up to sqrt(u*||S1 S2||), so the
    # distance (-2 Tr sqrt) agrees only to 2 (D-N+1) sqrt(u ||S1 S2||_2) (1.7e-6 here; scipy 1.17's sqrtm lands
    # 6.4e-8 from the reference's), still far below what a formula change moves (> 1e-3).
    n, d, _ = case
    bound = 2 * (d - n + 1) * np.sqrt(np.finfo(np.float64).eps * np.linalg.norm(s_a @ s_b, 2)) if n < d else 0.0
    got = gm.frechet_distance(mu_a, s_a, mu_b, s_b, method="sqrtm")
    assert got == pytest.approx(pytorch_fid, rel=1e-12, abs=bound)
    # eigenvalue form, like torchmetrics' _compute_fid: a different float64 route to the same number
    assert gm.frechet_distance(mu_a, s_a, mu_b, s_b, method="eigh") == pytest.approx(torchmetrics, rel=1e-8)


# --------------------------------------------------------------------------- VBench dimensions (v0.1.5)

H, W, D = 20, 28, 8
# VBench temporal_flickering per video (v2, v5, v8) and its set mean (the mean of the videos)
FLICKER = {2: 0.9630135405297373, 5: 0.9626003751567765, 8: 0.9624903286204619}
FLICKER_SET = 0.962701414768992
# VBench motion_smoothness with AMT-S replaced by (in_0 + in_1) / 2, per video (m3, m4, m7, m8) and set mean
SMOOTH = {3: 0.9741386554621849, 4: 0.9729715219421101, 7: 0.9736741363211951, 8: 0.9733597883597884}
SMOOTH_SET = 0.9735360255213197
# VBench subject_consistency == background_consistency on fixed features, per video (c2, c5, c9), and the set
# figure VBench reports, sim / cnt over all frame pairs (the mean of the three videos would be 0.1755...)
CONSISTENCY = {2: 0.0, 5: 0.2343412039335817, 9: 0.29204474622383714}
CONSISTENCY_SET = 0.2518248296557711


def _video(name: str, frames: int, h: int = H, w: int = W) -> np.ndarray:
    walk = seeded_tensor(name, (frames, h, w, 3), 0, scale=12.0).cumsum(0) + 128.0
    return walk.clamp(0, 255).round().to(torch.uint8).numpy()


def _features(frames: int) -> np.ndarray:
    shared = seeded_tensor("shared", (D,), 0, scale=0.6)
    return (shared + seeded_tensor(f"c{frames}", (frames, D), 0, scale=1.0)).numpy()


def test_temporal_flickering_is_vbenchs() -> None:
    videos = {t: _video(f"v{t}", t) for t in FLICKER}
    for t, expected in FLICKER.items():
        assert gm.temporal_flickering(videos[t]) == pytest.approx(expected, abs=1e-6)
    assert gm.video_dimensions([videos[5], videos[8]])["temporal_flickering"] == pytest.approx(
        (FLICKER[5] + FLICKER[8]) / 2, abs=1e-6
    )  # the set is the plain mean over videos (v2 is too short for motion smoothness, so it sits out)
    assert np.mean(list(FLICKER.values())) == pytest.approx(FLICKER_SET, abs=1e-12)
    with pytest.raises(ValueError, match="at least 2 frames"):  # VBench: NaN for a one-frame video
        gm.temporal_flickering(_video("v1", 1))


def test_motion_smoothness_is_vbenchs_with_a_linear_interpolator() -> None:
    videos = [_video(f"m{t}", t) for t in SMOOTH]
    for video, expected in zip(videos, SMOOTH.values(), strict=True):
        assert gm.motion_smoothness(video) == pytest.approx(expected, abs=1e-12)  # same float32 ops: exact
    assert gm.video_dimensions(videos)["motion_smoothness"] == pytest.approx(SMOOTH_SET, abs=1e-12)
    # a float video in [0, 1] is scored as the uint8 video it would be written as
    as_float = torch.from_numpy(videos[0]).float() / 255.0
    assert gm.motion_smoothness(as_float) == pytest.approx(SMOOTH[3], abs=1e-12)
    with pytest.raises(ValueError, match="at least 3 frames"):  # VBench asserts two kept (even) frames
        gm.motion_smoothness(_video("m2", 2))


def test_consistency_is_vbenchs_per_video_and_per_frame_pair_over_the_set() -> None:
    feats = {t: _features(t) for t in CONSISTENCY}
    videos = [np.zeros((t, 2, 2, 3), np.uint8) for t in CONSISTENCY]  # the encoder keys on the length alone
    encode = lambda video: feats[len(video)]  # noqa: E731
    for video, expected in zip(videos, CONSISTENCY.values(), strict=True):
        assert gm.subject_consistency(video, encode) == pytest.approx(expected, abs=1e-6)
        assert gm.background_consistency(video, encode) == pytest.approx(expected, abs=1e-6)
    assert gm.set_consistency(videos, encode) == pytest.approx(CONSISTENCY_SET, abs=1e-6)
    assert abs(np.mean(list(CONSISTENCY.values())) - CONSISTENCY_SET) > 0.05  # unequal lengths: not the same
    with pytest.raises(ValueError, match="at least 2 frames"):  # VBench divides by zero for one frame
        gm.subject_consistency(videos[0][:1], lambda v: feats[2][:1])


def test_dino_input_is_vbenchs_dino_transform() -> None:
    # VBench's dino_transform(224) on this (2, 40, 64, 3) clip: shape (2, 3, 224, 358), sum 113223.3236960019,
    # x[1, 2, 100, :4] = [0.8622223734855652, 0.8622223734855652, 0.8622223734855652, 0.7925056219100952]
    x = dino_pixels(_video("dino", 2, 40, 64))
    assert tuple(x.shape) == (2, 3, 224, 358)
    assert x.double().sum().item() == pytest.approx(113223.3236960019, rel=1e-9)
    assert x[1, 2, 100, :4].tolist() == pytest.approx([0.8622223734855652] * 3 + [0.7925056219100952], abs=1e-7)
