"""FID / FVD / VBench-style dimensions: closed forms, self-distances, weight files and the I3D definition.

Everything runs on random-init extractors with a fixed seed and tiny inputs, so the whole file stays fast on
two CPU cores; the expected values of the pixel metrics are worked out in the comments.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from flowspeed.evaluation import generation_metrics as gm
from flowspeed.evaluation.generation_metrics import (
    I3D_MIN_FRAMES,
    METRIC_DIRECTIONS,
    RANDOM_INIT,
    InceptionI3d,
    background_consistency,
    extract_image_features,
    extract_video_features,
    feature_stats,
    fid,
    frechet_distance,
    fvd,
    load_i3d,
    load_inception,
    motion_smoothness,
    subject_consistency,
    temporal_flickering,
    video_dimensions,
)
from safetensors.torch import save_file

HAVE_SCIPY = gm._scipy_linalg is not None
METHODS = ["eigh", "sqrtm"] if HAVE_SCIPY else ["eigh"]


def _images(n: int, seed: int) -> np.ndarray:
    # blocky 64x64 uint8 images: 8x8 random colours upsampled, so the resize to 299 sees real structure
    low = np.random.default_rng(seed).integers(0, 256, (n, 8, 8, 3), dtype=np.uint8)
    return low.repeat(8, axis=1).repeat(8, axis=2)


def _videos(n: int, frames: int, seed: int, size: int = 32) -> np.ndarray:
    # a random texture per video sliding one pixel per frame
    texture = _images(n, seed)[:, :size, :size]
    return np.stack([np.stack([np.roll(t, shift, axis=1) for shift in range(frames)]) for t in texture])


def _brighten(x: np.ndarray, amount: int = 80) -> np.ndarray:
    return np.clip(x.astype(np.int16) + amount, 0, 255).astype(np.uint8)


def _random_cov(d: int, rng: np.random.Generator) -> np.ndarray:
    a = rng.normal(size=(d, d))
    return a @ a.T / d + 0.1 * np.eye(d)


@pytest.fixture(scope="module")
def inception() -> gm.InceptionFeatures:
    return load_inception()


@pytest.fixture(scope="module")
def small_inception() -> gm.InceptionFeatures:
    return load_inception(image_size=75)  # the smallest input Inception-v3 accepts


@pytest.fixture(scope="module")
def i3d_small() -> gm.I3DFeatures:
    return load_i3d(input_size=32)


def test_metric_directions() -> None:
    assert METRIC_DIRECTIONS == {
        "fid": "lower",
        "fvd": "lower",
        "temporal_flickering": "higher",
        "motion_smoothness": "higher",
        "subject_consistency": "higher",
        "background_consistency": "higher",
    }


# --------------------------------------------------------------------------- Fréchet distance


@pytest.mark.parametrize("method", METHODS)
def test_frechet_identical_stats_is_zero(method: str) -> None:
    rng = np.random.default_rng(0)
    mu, sigma = rng.normal(size=16), _random_cov(16, rng)
    assert abs(frechet_distance(mu, sigma, mu, sigma, method=method)) < 1e-9 * np.trace(sigma)
    # singular: 6 samples in 16 dimensions (rank 5), the usual FID situation at small N
    mu_s, sigma_s = feature_stats(rng.normal(size=(6, 16)))
    assert abs(frechet_distance(mu_s, sigma_s, mu_s, sigma_s, method=method)) < 1e-4 * np.trace(sigma_s)


@pytest.mark.parametrize("method", METHODS)
def test_frechet_closed_forms(method: str) -> None:
    # 1-D: (1 - 3)^2 + 4 + 9 - 2 * sqrt(4 * 9) = 4 + 13 - 12 = 5
    assert frechet_distance([1.0], [[4.0]], [3.0], [[9.0]], method=method) == pytest.approx(5.0)
    # diagonal: ||mu1 - mu2||^2 + sum(s1 + s2 - 2 sqrt(s1 s2))
    rng = np.random.default_rng(1)
    mu1, mu2 = rng.normal(size=5), rng.normal(size=5)
    s1, s2 = rng.uniform(0.1, 3.0, 5), rng.uniform(0.1, 3.0, 5)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum(s1 + s2 - 2 * np.sqrt(s1 * s2))
    got = frechet_distance(mu1, np.diag(s1), mu2, np.diag(s2), method=method)
    assert got == pytest.approx(expected, rel=1e-9)
    # torch tensors are accepted as well
    as_t = frechet_distance(*(torch.as_tensor(x) for x in (mu1, np.diag(s1), mu2, np.diag(s2))), method=method)
    assert as_t == pytest.approx(expected, rel=1e-9)


@pytest.mark.skipif(not HAVE_SCIPY, reason="scipy not installed")
def test_frechet_methods_agree_on_non_commuting_covariances() -> None:
    rng = np.random.default_rng(2)
    mu1, mu2 = rng.normal(size=24), rng.normal(size=24)
    s1, s2 = _random_cov(24, rng), _random_cov(24, rng)
    a = frechet_distance(mu1, s1, mu2, s2, method="sqrtm")
    assert a == pytest.approx(frechet_distance(mu1, s1, mu2, s2, method="eigh"), rel=1e-8)
    assert a == pytest.approx(frechet_distance(mu1, s1, mu2, s2), rel=1e-12)  # auto = sqrtm when scipy is there


def test_frechet_and_stats_validate_input() -> None:
    with pytest.raises(ValueError, match="shape mismatch"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))
    with pytest.raises(ValueError, match="unknown method"):
        frechet_distance(np.zeros(2), np.eye(2), np.zeros(2), np.eye(2), method="svd")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="at least 2"):
        feature_stats(np.zeros((1, 4)))
    x = np.random.default_rng(3).normal(size=(7, 3))
    mu, sigma = feature_stats(torch.as_tensor(x, dtype=torch.float32))
    np.testing.assert_allclose(mu, x.mean(0), rtol=1e-6)
    np.testing.assert_allclose(sigma, np.cov(x, rowvar=False), rtol=1e-5)  # unbiased (N - 1), like pytorch-fid


# --------------------------------------------------------------------------- FID


def test_fid_self_is_zero_and_brightened_set_is_far(inception: gm.InceptionFeatures) -> None:
    a = _images(8, seed=0)
    # "eigh": scipy's sqrtm of a 2048 x 2048 product takes 20-35 s on one thread (covered by the slow test below)
    same = fid(a, a, extractor=inception, method="eigh")
    shifted = fid(a, _brighten(a), extractor=inception, method="eigh")
    assert same["features"] == shifted["features"] == RANDOM_INIT
    assert (same["n_a"], same["n_b"]) == (8, 8)
    assert shifted["fid"] > 0
    assert abs(same["fid"]) < 1e-3 * shifted["fid"]


@pytest.mark.slow
@pytest.mark.skipif(not HAVE_SCIPY, reason="scipy not installed")
def test_fid_default_sqrtm_matches_eigh_at_2048_dims(inception: gm.InceptionFeatures) -> None:
    # 8 images in 2048 dimensions: both covariances have rank 7, far from the full rank sqrtm is comfortable with.
    # One sqrtm (20-35 s here): the self-is-zero property is the eigh test's above; this one is the agreement.
    a, b = _images(8, seed=0), _brighten(_images(8, seed=0))
    stats_a = feature_stats(extract_image_features(a, inception))
    stats_b = feature_stats(extract_image_features(b, inception))
    default = frechet_distance(*stats_a, *stats_b)
    assert default == pytest.approx(frechet_distance(*stats_a, *stats_b, method="eigh"), rel=1e-4)
    assert default > 0


def test_image_inputs_uint8_float_and_lists_agree(small_inception: gm.InceptionFeatures) -> None:
    a = _images(3, seed=1)
    from_uint8 = extract_image_features(a, small_inception)
    assert from_uint8.shape == (3, 2048)
    nchw = torch.from_numpy(a).permute(0, 3, 1, 2).float() / 255
    np.testing.assert_allclose(extract_image_features(nchw, small_inception), from_uint8, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(extract_image_features(list(a), small_inception, batch_size=2), from_uint8, atol=1e-6)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        extract_image_features(nchw * 255, small_inception)


def test_inception_weights_file_roundtrip(tmp_path: Path, small_inception: gm.InceptionFeatures) -> None:
    path = tmp_path / "inception_fid.safetensors"
    save_file({k: v.contiguous() for k, v in small_inception.net.state_dict().items()}, str(path))
    loaded = load_inception(path, image_size=75)
    assert loaded.features_source == "inception_fid.safetensors"
    x = torch.from_numpy(_images(2, seed=2)).permute(0, 3, 1, 2).float() / 255
    with torch.inference_mode():
        assert torch.equal(loaded(x), small_inception(x))


def test_torchvision_inception_state_dict_loads_without_its_heads(tmp_path: Path) -> None:
    from torchvision.models import inception_v3

    # the layout of torchvision's IMAGENET1K_V1 file: 1000-class fc and the auxiliary head included
    full = inception_v3(weights=None, aux_logits=True, init_weights=False, num_classes=1000)
    path = tmp_path / "inception_v3_google.pth"
    torch.save(full.state_dict(), path)
    loaded = load_inception(path, image_size=75)
    assert loaded.features_source == "inception_v3_google.pth"
    assert torch.equal(loaded.net.Mixed_7c.branch1x1.conv.weight, full.Mixed_7c.branch1x1.conv.weight)


def test_inception_wrong_file_fails_clearly(tmp_path: Path, small_inception: gm.InceptionFeatures) -> None:
    state = dict(small_inception.net.state_dict())
    state["Mixed_7c.branch1x1.conv.weight"] = torch.zeros(3, 3, 1, 1)
    path = tmp_path / "bad.pt"
    torch.save(state, path)
    with pytest.raises(ValueError, match=r"bad\.pt is not a torchvision Inception-v3.*wrong shape.*Mixed_7c"):
        load_inception(path, image_size=75)
    torch.save({"step": torch.tensor(3), "note": "not weights"}, tmp_path / "junk.pt")
    with pytest.raises(ValueError, match="does not hold a state dict"):
        load_inception(tmp_path / "junk.pt")
    with pytest.raises(FileNotFoundError):
        load_inception(tmp_path / "missing.safetensors")


# --------------------------------------------------------------------------- I3D / FVD


def test_i3d_definition_matches_published_size_and_port_names() -> None:
    with torch.device("meta"):
        net = InceptionI3d(num_classes=400).eval()
    n = sum(p.numel() for p in net.parameters())
    # OpenVINO Open Model Zoo's card for `i3d-rgb-tf` (DeepMind kinetics-i3d, RGB, Kinetics-400;
    # docs.openvino.ai/2021.2/omz_models_public_i3d_rgb_tf_i3d_rgb_tf.html) lists "MParams 12.69". The TF model's
    # BatchNorm has a shift but no scale: 12,697,264 - 7,280 BN channels = 12,689,984. PyTorch's BatchNorm3d
    # always has both, so the port (and a converted checkpoint) has 12,697,264.
    assert abs(n / 12.69e6 - 1) < 0.01
    assert n == 12_697_264
    bn_scale = sum(m.weight.numel() for m in net.modules() if isinstance(m, torch.nn.BatchNorm3d))
    assert bn_scale == 7_280 and round((n - bn_scale) / 1e6, 2) == 12.69
    # ~12.3M is the trunk without the 1024 x 400 (+ bias) logits layer
    assert n - sum(p.numel() for p in net.logits.parameters()) == 12_287_264
    shapes = {k: tuple(v.shape) for k, v in net.state_dict().items()}
    assert shapes["Conv3d_1a_7x7.conv3d.weight"] == (64, 3, 7, 7, 7)
    assert shapes["Conv3d_1a_7x7.bn.running_var"] == (64,)
    assert shapes["Mixed_4b.b1b.conv3d.weight"] == (208, 96, 3, 3, 3)
    assert shapes["Mixed_5c.b3b.conv3d.weight"] == (128, 832, 1, 1, 1)
    assert shapes["logits.conv3d.weight"] == (400, 1024, 1, 1, 1)
    assert shapes["logits.conv3d.bias"] == (400,)
    assert not any(k.startswith("MaxPool") for k in shapes)
    x = torch.empty(1, 3, 16, 224, 224, device="meta")
    assert tuple(net.extract_features(x).shape) == (1, 1024)
    assert tuple(net(x).shape) == (1, 400)


def test_fvd_self_is_zero_and_brightened_set_is_far(i3d_small: gm.I3DFeatures) -> None:
    a = _videos(5, frames=10, seed=0)
    same = fvd(a, a, extractor=i3d_small)
    shifted = fvd(a, _brighten(a), extractor=i3d_small)
    assert same["features"] == shifted["features"] == RANDOM_INIT
    assert (same["n_a"], same["n_b"]) == (5, 5)
    assert shifted["fvd"] > 0
    assert abs(same["fvd"]) < 1e-3 * shifted["fvd"]


def test_short_videos_are_padded_with_their_last_frame(i3d_small: gm.I3DFeatures) -> None:
    short = _videos(2, frames=4, seed=1)
    padded = np.concatenate([short, np.repeat(short[:, -1:], I3D_MIN_FRAMES - 4, axis=1)], axis=1)
    got = extract_video_features(short, i3d_small)
    assert got.shape == (2, 1024)
    np.testing.assert_allclose(got, extract_video_features(padded, i3d_small), rtol=1e-5, atol=1e-6)
    # a list of clips of different lengths is fine too
    mixed = extract_video_features([short[0], padded[1]], i3d_small)
    np.testing.assert_allclose(mixed, got, rtol=1e-4, atol=1e-5)  # batch size changes the float summation order


def test_i3d_weights_file_roundtrip_and_logits_layer(tmp_path: Path, i3d_small: gm.I3DFeatures) -> None:
    # files written before BatchNorm tracked its batch count have no num_batches_tracked: they must load too
    state = {k: v for k, v in i3d_small.net.state_dict().items() if not k.endswith("num_batches_tracked")}
    path = tmp_path / "i3d_pretrained_400.pt"
    torch.save(state, path)
    loaded = load_i3d(path, input_size=32)
    assert loaded.features_source == "i3d_pretrained_400.pt"
    x = torch.from_numpy(_videos(2, frames=9, seed=2)).permute(0, 4, 1, 2, 3).float() / 255
    with torch.inference_mode():
        feats = loaded(x)
        assert torch.equal(feats, i3d_small(x))
        logits = load_i3d(path, input_size=32, layer="logits")(x)
        assert logits.shape == (2, 400)
        torch.testing.assert_close(logits, loaded.net.logits(feats[:, :, None, None, None]).flatten(1))


def test_i3d_wrong_file_fails_clearly(tmp_path: Path) -> None:
    path = tmp_path / "i3d_600.safetensors"
    save_file(InceptionI3d(num_classes=600).state_dict(), str(path))  # a Kinetics-600 model
    with pytest.raises(ValueError, match=r"400-class RGB I3D.*wrong shape.*logits\.conv3d"):
        load_i3d(path, input_size=32)
    assert load_i3d(path, input_size=32, num_classes=600).features_source == "i3d_600.safetensors"


# --------------------------------------------------------------------------- VBench-style dimensions


def _noise_video(frames: int = 12, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (frames, 16, 16, 3), dtype=np.uint8)


def _static_video(frames: int = 9) -> np.ndarray:
    return np.repeat(_noise_video(1, seed=5), frames, axis=0)


def _moving_gradient(frames: int = 14) -> np.ndarray:
    # a ramp of slope 2 sliding 2 px per frame: 60 + 2 * (x - 2t) stays inside 8..186 for x < 64, t < 14
    x = np.arange(64)
    frames_ = [np.broadcast_to((60 + 2 * (x - 2 * t))[None, :, None], (16, 64, 3)) for t in range(frames)]
    return np.stack(frames_).astype(np.uint8)


def _projection_encoder(seed: int = 0):
    w = np.random.default_rng(seed).normal(size=(16 * 16 * 3, 32))

    def encode(video: np.ndarray) -> np.ndarray:
        return (np.asarray(video, dtype=np.float64).reshape(len(video), -1) / 255 - 0.5) @ w

    return encode


def test_temporal_flickering() -> None:
    assert temporal_flickering(_static_video()) == 1.0
    blink = np.zeros((10, 8, 8, 3), dtype=np.uint8)
    blink[1::2] = 255
    assert temporal_flickering(blink) == 0.0  # every step changes every pixel by 255
    # every pixel of the ramp changes by 4 grey levels per frame: (255 - 4) / 255
    assert temporal_flickering(_moving_gradient()) == pytest.approx(251 / 255)
    # float video in [0, 1] scores like its uint8 original
    video = _noise_video()
    assert temporal_flickering(torch.from_numpy(video).float() / 255) == pytest.approx(temporal_flickering(video))
    with pytest.raises(ValueError, match="at least 2 frames"):
        temporal_flickering(_static_video(1))


def test_motion_smoothness() -> None:
    # linear in t, so the neighbours' average predicts every odd frame exactly
    assert motion_smoothness(_moving_gradient()) > 0.999
    assert motion_smoothness(_static_video()) == 1.0
    noise = motion_smoothness(_noise_video())
    # E|(U1 + U2)/2 - U3| for uniform pixels is about 0.29 * 255, so about 0.71
    assert 0.6 < noise < 0.8
    with pytest.raises(ValueError, match="at least 3 frames"):
        motion_smoothness(_static_video(2))


def test_consistency_dimensions() -> None:
    encode = _projection_encoder()

    def channel_means(video: np.ndarray) -> np.ndarray:
        return np.asarray(video, dtype=np.float64).mean(axis=(1, 2)) + 1.0

    static = _static_video()
    for enc in (encode, channel_means):
        assert subject_consistency(static, enc) == pytest.approx(1.0)
        assert background_consistency(static, enc) == pytest.approx(1.0)
    noisy = subject_consistency(_noise_video(), encode)
    assert noisy < 0.5
    assert background_consistency(_noise_video(), encode) == pytest.approx(noisy)
    # an encoder returning torch tensors works the same
    as_torch = subject_consistency(_noise_video(), lambda v: torch.as_tensor(encode(v)))
    assert as_torch == pytest.approx(noisy)


def test_video_dimensions_aggregates_means() -> None:
    videos = [_static_video(12), _noise_video(12)]
    plain = video_dimensions(videos)
    assert set(plain) == {"temporal_flickering", "motion_smoothness"}
    assert plain["temporal_flickering"] == pytest.approx(np.mean([temporal_flickering(v) for v in videos]))
    encode = _projection_encoder()
    full = video_dimensions(np.stack(videos), encoder=encode)
    assert set(full) <= set(METRIC_DIRECTIONS)
    assert set(full) == set(METRIC_DIRECTIONS) - {"fid", "fvd"}
    assert full["subject_consistency"] == pytest.approx((1.0 + subject_consistency(videos[1], encode)) / 2)
    assert full["motion_smoothness"] == pytest.approx(plain["motion_smoothness"])
    with pytest.raises(ValueError, match="no videos"):
        video_dimensions([])
