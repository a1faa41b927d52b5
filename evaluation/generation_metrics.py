"""Generation metrics for images and videos: FID, FVD and the VBench dimensions that need no extra model.

Pure library: no Prefect, no MLflow. Every extractor carries a `features_source` label ("random-init" or the
weights file's name) and every FID/FVD result repeats it under "features", so a score computed with random
features can never be mistaken for a real FID/FVD. Random-init extractors exist for CPU tests and pipelines
without downloadable weights: their distances rank "same distribution" below "shifted distribution", but their
values are not comparable with any published number.

Comparability caveats, even with real weights:
- FID uses torchvision's Inception-v3. Published FIDs use the TF 2015 Inception graph (pytorch-fid's
  `pt_inception-2015-12-05` port), whose blocks differ slightly (pooling details), and whose weights also load
  here (same key names; fc/aux heads are ignored) but give slightly different features in this architecture.
- FVD uses the 1024-d average-pool features by default (`layer="pool"`). The original FVD (Unterthiner et al.)
  and StyleGAN-V's FVD use the 400-d Kinetics logits: use `load_i3d(..., layer="logits")` to match them.
- Both distances are biased upwards at small sample counts (N well below the feature dimension); compare
  numbers only at equal N.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from flowspeed.evaluation.directions import DIRECTIONS
from torch import nn

try:  # scipy is what the reference FID implementations use; it arrives with mlflow but is not a declared dependency
    import scipy.linalg as _scipy_linalg
except ImportError:  # pragma: no cover - exercised only without scipy
    _scipy_linalg = None

_METRICS = ("fid", "fvd", "temporal_flickering", "motion_smoothness", "subject_consistency", "background_consistency")
METRIC_DIRECTIONS: dict[str, str] = {m: DIRECTIONS[m] for m in _METRICS}  # one table: evaluation/directions.py

RANDOM_INIT = "random-init"
# Three temporal stride-2 stages (Conv3d_1a, MaxPool3d_4a, MaxPool3d_5a) take T frames to ceil(T / 8) steps, and
# the final average pool spans 2 of them: 9 frames is the shortest clip the original network accepts.
I3D_MIN_FRAMES = 9

ArrayLike = np.ndarray | torch.Tensor
Encoder = Callable[[Any], Any]
Method = Literal["auto", "sqrtm", "eigh"]


# --------------------------------------------------------------------------- Fréchet distance


def feature_stats(features: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    """Mean and unbiased (N-1) covariance, in float64 because the trace terms cancel to a small difference."""
    x = _to_numpy(features).astype(np.float64)
    if x.ndim != 2:
        raise ValueError(f"features must be (N, D), got shape {x.shape}")
    if x.shape[0] < 2:
        raise ValueError(f"need at least 2 feature vectors for a covariance, got {x.shape[0]}")
    return x.mean(axis=0), np.cov(x, rowvar=False).reshape(x.shape[1], x.shape[1])


def frechet_distance(
    mu1: ArrayLike,
    sigma1: ArrayLike,
    mu2: ArrayLike,
    sigma2: ArrayLike,
    eps: float = 1e-6,
    method: Method = "auto",
) -> float:
    """||mu1 - mu2||^2 + Tr(S1 + S2 - 2 sqrt(S1 S2)), the Fréchet distance between two Gaussians.

    `method="auto"` uses scipy's `sqrtm` when scipy is installed, as pytorch-fid and the TF reference do, so the
    numbers match theirs; without scipy it uses "eigh". A non-finite square root, or one whose diagonal has an
    imaginary part above 1e-3 of its real scale, is retried with eps*I added to both covariances (the standard
    fix for near-singular covariances, e.g. fewer samples than dimensions); if it is still bad we raise rather
    than report a wrong distance. "eigh" computes Tr sqrt(S1 S2) as the sum of sqrt(eigenvalues) of the
    symmetric PSD matrix S1^1/2 S2 S1^1/2 (same spectrum as S1 S2), which is exact for singular covariances too.
    """
    m1, m2 = np.atleast_1d(_to_numpy(mu1).astype(np.float64)), np.atleast_1d(_to_numpy(mu2).astype(np.float64))
    s1, s2 = np.atleast_2d(_to_numpy(sigma1).astype(np.float64)), np.atleast_2d(_to_numpy(sigma2).astype(np.float64))
    d = m1.shape[0]
    if m1.shape != (d,) or m2.shape != (d,) or s1.shape != (d, d) or s2.shape != (d, d):
        raise ValueError(f"shape mismatch: mu1 {m1.shape}, mu2 {m2.shape}, sigma1 {s1.shape}, sigma2 {s2.shape}")
    if method == "auto":
        method = "sqrtm" if _scipy_linalg is not None else "eigh"
    if method == "sqrtm":
        tr_covmean = _trace_sqrtm_scipy(s1, s2, eps)
    elif method == "eigh":
        tr_covmean = _trace_sqrt_eigh(s1, s2)
    else:
        raise ValueError(f"unknown method {method!r}; expected 'auto', 'sqrtm' or 'eigh'")
    diff = m1 - m2
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * tr_covmean)


def _trace_sqrtm_scipy(s1: np.ndarray, s2: np.ndarray, eps: float) -> float:
    if _scipy_linalg is None:
        raise ImportError("method='sqrtm' needs scipy; use method='eigh'")

    def sqrtm(a: np.ndarray) -> np.ndarray:
        with warnings.catch_warnings():  # singular/ill-conditioned warnings: we check the result ourselves
            warnings.simplefilter("ignore")
            return np.asarray(_scipy_linalg.sqrtm(a))

    def bad(covmean: np.ndarray) -> bool:
        if not np.isfinite(covmean).all():
            return True
        diag = np.diagonal(covmean)
        return bool(np.iscomplexobj(covmean) and np.abs(diag.imag).max() > 1e-3 * max(1.0, np.abs(diag.real).max()))

    covmean = sqrtm(s1 @ s2)
    if bad(covmean):
        offset = np.eye(s1.shape[0]) * eps
        covmean = sqrtm((s1 + offset) @ (s2 + offset))
    if bad(covmean):
        raise ValueError(
            "matrix square root of sigma1 @ sigma2 is not finite or has a large imaginary part even with eps*I "
            "added; use more samples, a larger eps, or method='eigh'"
        )
    return float(np.trace(covmean).real)


def _trace_sqrt_eigh(s1: np.ndarray, s2: np.ndarray) -> float:
    s1, s2 = (s1 + s1.T) / 2, (s2 + s2.T) / 2
    w, v = np.linalg.eigh(s1)
    root1 = (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T
    inner = root1 @ s2 @ root1
    return float(np.sqrt(np.clip(np.linalg.eigvalsh((inner + inner.T) / 2), 0.0, None)).sum())


# --------------------------------------------------------------------------- shared helpers


def _to_numpy(x: Any) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().numpy()
    return np.asarray(x)


def _to_unit_float(x: Any, what: str) -> torch.Tensor:
    """Integers (0-255) or floats in [0, 1] -> float32 in [0, 1]; other ranges are almost always a bug upstream."""
    t = x if isinstance(x, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(x))
    if t.dtype == torch.bool or t.is_complex():
        raise TypeError(f"{what} must be uint8 (0-255) or float in [0, 1], got {t.dtype}")
    if not t.is_floating_point():
        if t.dtype != torch.uint8 and t.numel() and (t.min() < 0 or t.max() > 255):
            raise ValueError(f"integer {what} must be in 0-255 (got [{t.min()}, {t.max()}])")
        return t.float() / 255.0
    t = t.float()
    if t.numel() and (t.min() < -1e-3 or t.max() > 1 + 1e-3):
        raise ValueError(f"float {what} must be in [0, 1] (got [{t.min():.3g}, {t.max():.3g}]); pass uint8 for 0-255")
    return t


def _image_to_chw(image: Any) -> torch.Tensor:
    # numpy images are (H, W, C); tensors are (C, H, W) when the first axis is a channel axis, else (H, W, C)
    t = _to_unit_float(image, "images")
    if t.ndim != 3:
        raise ValueError(f"each image must be 3-D (H, W, C) or (C, H, W), got shape {tuple(t.shape)}")
    if isinstance(image, np.ndarray) or t.shape[0] not in (1, 3):
        t = t.permute(2, 0, 1)
    if t.shape[0] == 1:
        t = t.expand(3, -1, -1)
    if t.shape[0] != 3:
        raise ValueError(f"images need 1 or 3 channels, got shape {tuple(image.shape)}")
    return t


def _video_to_cthw(video: Any) -> torch.Tensor:
    # (T, H, W, C), or for tensors also (T, C, H, W)
    t = _to_unit_float(video, "videos")
    if t.ndim != 4:
        raise ValueError(f"each video must be 4-D (T, H, W, C), got shape {tuple(t.shape)}")
    if t.shape[-1] in (1, 3):
        t = t.permute(3, 0, 1, 2)
    elif isinstance(video, torch.Tensor) and t.shape[1] in (1, 3):
        t = t.permute(1, 0, 2, 3)
    else:
        raise ValueError(f"videos must be (T, H, W, C) with 1 or 3 channels, got shape {tuple(t.shape)}")
    return t.expand(3, -1, -1, -1) if t.shape[0] == 1 else t


def _batches(items: Iterable[Any], batch_size: int, convert: Callable[[Any], torch.Tensor]) -> Iterator[torch.Tensor]:
    # Converts item by item so a large uint8 set never exists as one float tensor; differently sized items
    # (a list of videos of different lengths) simply end the current batch.
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    batch: list[torch.Tensor] = []
    for item in items:
        t = convert(item)
        if batch and (len(batch) == batch_size or t.shape != batch[0].shape):
            yield torch.stack(batch)
            batch = []
        batch.append(t)
    if batch:
        yield torch.stack(batch)


def _device_of(module: Any) -> torch.device:
    try:
        return next(module.parameters()).device
    except (AttributeError, StopIteration):
        return torch.device("cpu")


@torch.inference_mode()
def _extract(items: Iterable[Any], extractor: Callable, batch_size: int, convert: Callable) -> np.ndarray:
    device = _device_of(extractor)
    feats = [extractor(batch.to(device)).float().flatten(1).cpu() for batch in _batches(items, batch_size, convert)]
    if not feats:
        raise ValueError("no inputs to extract features from")
    return torch.cat(feats).double().numpy()


@contextmanager
def _seeded(seed: int) -> Iterator[None]:
    # A random-init extractor must give the same features in every run and process, without touching global RNG.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def _he_init(module: nn.Module) -> None:
    # PyTorch's default conv init shrinks activations ~2x per layer and torchvision's truncated-normal(0.1) grows
    # them; with eval-mode BatchNorm at its identity statistics only He-normal keeps a 50-100 layer random network's
    # features at a usable scale (neither vanishing to ~0 nor reaching 1e10).
    for m in module.modules():
        if isinstance(m, nn.Conv2d | nn.Conv3d | nn.Linear):
            nn.init.kaiming_normal_(m.weight, mode="fan_in", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise FileNotFoundError(f"no weights file at {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state: Any = load_file(str(path), device="cpu")
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path.name} does not hold a state dict (a mapping of names to tensors)")
    return dict(state)


def _load_checked(module: nn.Module, state: dict[str, torch.Tensor], path: Path, what: str) -> None:
    own = module.state_dict()
    # checkpoints written before BatchNorm tracked batches lack num_batches_tracked; eval never reads it
    missing = sorted(k for k in own.keys() - state.keys() if not k.endswith("num_batches_tracked"))
    unexpected = sorted(state.keys() - own.keys())
    wrong = sorted(k for k in own.keys() & state.keys() if tuple(own[k].shape) != tuple(state[k].shape))
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing keys (e.g. {', '.join(missing[:3])})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys (e.g. {', '.join(unexpected[:3])})")
        if wrong:
            k = wrong[0]
            parts.append(
                f"{len(wrong)} tensors with the wrong shape (e.g. {k}: file {tuple(state[k].shape)}, "
                f"model {tuple(own[k].shape)})"
            )
        raise ValueError(f"{path.name} is not a {what} state dict: {'; '.join(parts)}")
    module.load_state_dict(state, strict=False)  # strict would reject the tolerated missing num_batches_tracked


def _result(name: str, feats_a: np.ndarray, feats_b: np.ndarray, extractor: Any, method: Method) -> dict[str, Any]:
    mu_a, sigma_a = feature_stats(feats_a)
    mu_b, sigma_b = feature_stats(feats_b)
    return {
        name: frechet_distance(mu_a, sigma_a, mu_b, sigma_b, method=method),
        "n_a": int(feats_a.shape[0]),
        "n_b": int(feats_b.shape[0]),
        "features": str(getattr(extractor, "features_source", "custom")),
    }


# --------------------------------------------------------------------------- FID (Inception-v3)


class InceptionFeatures(nn.Module):
    """torchvision Inception-v3 up to its 2048-d average pool, with the FID preprocessing built in.

    Input: float (N, 3, H, W) in [0, 1], bilinearly resized to `image_size` (299 for real FID; 75 is the smallest
    the network accepts, for tests) and mapped to [-1, 1]. [-1, 1] is what the network sees with torchvision's
    IMAGENET1K_V1 weights too: those were trained with `transform_input=True`, which turns ImageNet-normalised input
    into exactly (x - 0.5) / 0.5, so feeding [-1, 1] with `transform_input=False` is the same computation.
    """

    def __init__(self, net: nn.Module, features_source: str, image_size: int = 299) -> None:
        super().__init__()
        if image_size < 75:
            raise ValueError(f"Inception-v3 needs inputs of at least 75x75, got image_size={image_size}")
        self.net = net
        self.features_source = features_source
        self.image_size = image_size

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        size = (self.image_size, self.image_size)
        if tuple(images.shape[-2:]) != size:
            images = F.interpolate(images, size=size, mode="bilinear", align_corners=False)
        return self.net(images * 2.0 - 1.0)


def _inception_v3_trunk() -> nn.Module:
    from torchvision.models import inception_v3

    net = inception_v3(weights=None, aux_logits=False, init_weights=False, transform_input=False)
    net.fc = nn.Identity()
    return net


def load_inception(
    weights_path: str | Path | None = None, *, image_size: int = 299, seed: int = 0
) -> InceptionFeatures:
    """The FID feature extractor: a local state-dict file, or seeded random init labelled "random-init".

    The file is a torchvision Inception-v3 state dict (safetensors, or a torch file read with weights_only=True);
    its `fc.*` and `AuxLogits.*` entries are ignored since FID only needs the pool features.
    """
    with _seeded(seed):
        net = _inception_v3_trunk()
        if weights_path is None:
            _he_init(net)
    source = RANDOM_INIT
    if weights_path is not None:
        path = Path(weights_path)
        state = {k: v for k, v in _read_state_dict(path).items() if not k.startswith(("fc.", "AuxLogits."))}
        _load_checked(net, state, path, "torchvision Inception-v3")
        source = path.name
    return InceptionFeatures(net, source, image_size).eval().requires_grad_(False)


def extract_image_features(images: Iterable[Any], extractor: Callable, batch_size: int = 32) -> np.ndarray:
    """(N, D) float64 features; exposed so a fixed reference set's features can be computed once and reused.

    `images`: uint8 (N, H, W, 3) numpy arrays (0-255), float tensors (N, 3, H, W) in [0, 1], or a sequence of
    single images in either form (sizes may differ; the extractor resizes).
    """
    return _extract(images, extractor, batch_size, _image_to_chw)


def fid(
    images_a: Iterable[Any],
    images_b: Iterable[Any],
    extractor: Callable | None = None,
    batch_size: int = 32,
    method: Method = "auto",
) -> dict[str, Any]:
    """Fréchet Inception Distance between two image sets, labelled with where its features came from.

    Without an extractor this uses a random-init Inception ("features": "random-init"): fine for tests and
    relative comparisons within one run, never a reportable FID. `method` picks the matrix square root (see
    frechet_distance): "auto" matches pytorch-fid; "eigh" gives the same value about 4x faster on one CPU thread at
    2048 dimensions (about 4 s instead of 19 s) and stays exact when there are fewer images than dimensions.
    """
    extractor = extractor if extractor is not None else load_inception()
    feats_a = extract_image_features(images_a, extractor, batch_size)
    feats_b = extract_image_features(images_b, extractor, batch_size)
    return _result("fid", feats_a, feats_b, extractor, method)


# --------------------------------------------------------------------------- FVD (I3D)


def _same_pad(x: torch.Tensor, kernel: tuple[int, ...], stride: tuple[int, ...]) -> torch.Tensor:
    # TensorFlow "SAME" padding, which the DeepMind I3D was trained with: output = ceil(input / stride), the odd
    # pixel of an uneven total going after. PyTorch's static padding cannot express the asymmetric case.
    pads: list[int] = []
    for size, k, s in zip(reversed(x.shape[2:]), reversed(kernel), reversed(stride), strict=True):
        total = max(k - s, 0) if size % s == 0 else max(k - size % s, 0)
        pads += [total // 2, total - total // 2]
    return F.pad(x, pads) if any(pads) else x


class _Unit3D(nn.Module):
    """Conv3d (SAME padding) -> BatchNorm3d -> ReLU, with the `conv3d` / `bn` names of the common PyTorch port."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel: tuple[int, int, int] = (1, 1, 1),
        stride: tuple[int, int, int] = (1, 1, 1),
        *,
        batch_norm: bool = True,
        activation: bool = True,
        bias: bool = False,
    ) -> None:
        super().__init__()
        self.kernel, self.stride, self.activation = kernel, stride, activation
        self.conv3d = nn.Conv3d(in_channels, out_channels, kernel, stride, padding=0, bias=bias)
        # eps/momentum as in the TF original (Sonnet BatchNorm defaults)
        self.bn = nn.BatchNorm3d(out_channels, eps=1e-3, momentum=0.01) if batch_norm else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv3d(_same_pad(x, self.kernel, self.stride))
        if self.bn is not None:
            x = self.bn(x)
        return F.relu(x) if self.activation else x


class _MaxPool3dSame(nn.Module):
    # Zero padding instead of TF's -inf is exact here: every pool follows a ReLU, so nothing pooled is negative.
    def __init__(self, kernel: tuple[int, int, int], stride: tuple[int, int, int]) -> None:
        super().__init__()
        self.kernel, self.stride = kernel, stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.max_pool3d(_same_pad(x, self.kernel, self.stride), self.kernel, self.stride)


class _InceptionBlock3D(nn.Module):
    """Inflated Inception-v1 mixed block; branch names b0, b1a/b1b, b2a/b2b, b3a/b3b as in the PyTorch port."""

    def __init__(self, in_channels: int, widths: tuple[int, int, int, int, int, int]) -> None:
        super().__init__()
        self.b0 = _Unit3D(in_channels, widths[0])
        self.b1a = _Unit3D(in_channels, widths[1])
        self.b1b = _Unit3D(widths[1], widths[2], (3, 3, 3))
        self.b2a = _Unit3D(in_channels, widths[3])
        self.b2b = _Unit3D(widths[3], widths[4], (3, 3, 3))
        self.b3a = _MaxPool3dSame((3, 3, 3), (1, 1, 1))
        self.b3b = _Unit3D(in_channels, widths[5])
        self.out_channels = widths[0] + widths[2] + widths[4] + widths[5]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.b0(x), self.b1b(self.b1a(x)), self.b2b(self.b2a(x)), self.b3b(self.b3a(x))], dim=1)


class InceptionI3d(nn.Module):
    """RGB I3D (Carreira & Zisserman 2017): Inception-v1 inflated to 3D, 1024-d pool features, Kinetics logits.

    Module names follow the widely used PyTorch port (Conv3d_1a_7x7 ... Mixed_5c, logits) so converted
    checkpoints such as `i3d_pretrained_400.pt` load as they are.
    """

    def __init__(self, num_classes: int = 400, in_channels: int = 3) -> None:
        super().__init__()
        self.Conv3d_1a_7x7 = _Unit3D(in_channels, 64, (7, 7, 7), (2, 2, 2))
        self.MaxPool3d_2a_3x3 = _MaxPool3dSame((1, 3, 3), (1, 2, 2))
        self.Conv3d_2b_1x1 = _Unit3D(64, 64)
        self.Conv3d_2c_3x3 = _Unit3D(64, 192, (3, 3, 3))
        self.MaxPool3d_3a_3x3 = _MaxPool3dSame((1, 3, 3), (1, 2, 2))
        self.Mixed_3b = _InceptionBlock3D(192, (64, 96, 128, 16, 32, 32))
        self.Mixed_3c = _InceptionBlock3D(256, (128, 128, 192, 32, 96, 64))
        self.MaxPool3d_4a_3x3 = _MaxPool3dSame((3, 3, 3), (2, 2, 2))
        self.Mixed_4b = _InceptionBlock3D(480, (192, 96, 208, 16, 48, 64))
        self.Mixed_4c = _InceptionBlock3D(512, (160, 112, 224, 24, 64, 64))
        self.Mixed_4d = _InceptionBlock3D(512, (128, 128, 256, 24, 64, 64))
        self.Mixed_4e = _InceptionBlock3D(512, (112, 144, 288, 32, 64, 64))
        self.Mixed_4f = _InceptionBlock3D(528, (256, 160, 320, 32, 128, 128))
        self.MaxPool3d_5a_2x2 = _MaxPool3dSame((2, 2, 2), (2, 2, 2))
        self.Mixed_5b = _InceptionBlock3D(832, (256, 160, 320, 32, 128, 128))
        self.Mixed_5c = _InceptionBlock3D(832, (384, 192, 384, 48, 128, 128))
        self.logits = _Unit3D(1024, num_classes, batch_norm=False, activation=False, bias=True)
        self._trunk = [
            "Conv3d_1a_7x7",
            "MaxPool3d_2a_3x3",
            "Conv3d_2b_1x1",
            "Conv3d_2c_3x3",
            "MaxPool3d_3a_3x3",
            "Mixed_3b",
            "Mixed_3c",
            "MaxPool3d_4a_3x3",
            "Mixed_4b",
            "Mixed_4c",
            "Mixed_4d",
            "Mixed_4e",
            "Mixed_4f",
            "MaxPool3d_5a_2x2",
            "Mixed_5b",
            "Mixed_5c",
        ]

    def extract_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, T, H, W) in [-1, 1] -> (B, 1024).

        At 224x224 the pool is the original's 2x7x7 stride-1 VALID average pool, then a mean over its temporal
        positions (the original averages the logits over time; the logits are linear in these features, so the
        two agree). Smaller test inputs clip the window to the feature map.
        """
        for name in self._trunk:
            x = getattr(self, name)(x)
        kernel = (min(2, x.shape[2]), min(7, x.shape[3]), min(7, x.shape[4]))
        return F.avg_pool3d(x, kernel, stride=1).mean(dim=(2, 3, 4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Time-averaged class logits (B, num_classes)."""
        return self.logits(self.extract_features(x)[:, :, None, None, None]).flatten(1)


class I3DFeatures(nn.Module):
    """I3D with the FVD preprocessing built in.

    Input: float (B, 3, T, H, W) in [0, 1]. Frames are bilinearly resized to `input_size` (224 for real FVD; 32-64
    keeps CPU tests fast) without keeping the aspect ratio, as the common FVD code does, and mapped to [-1, 1].
    Clips shorter than I3D_MIN_FRAMES (9) are padded by repeating their last frame: a frozen tail reads as "no
    motion" to the network, which is the least invented content we can add. `layer="logits"` returns the 400-d
    Kinetics logits that the original FVD and StyleGAN-V use instead of the 1024-d pool features.
    """

    def __init__(
        self, net: InceptionI3d, features_source: str, input_size: int = 224, layer: Literal["pool", "logits"] = "pool"
    ) -> None:
        super().__init__()
        if input_size < 16:
            raise ValueError(f"input_size must be >= 16, got {input_size}")
        if layer not in ("pool", "logits"):
            raise ValueError(f"layer must be 'pool' or 'logits', got {layer!r}")
        self.net = net
        self.features_source = features_source
        self.input_size = input_size
        self.layer = layer

    def forward(self, videos: torch.Tensor) -> torch.Tensor:
        b, c, t, h, w = videos.shape
        s = self.input_size
        if (h, w) != (s, s):
            frames = videos.transpose(1, 2).reshape(b * t, c, h, w)
            frames = F.interpolate(frames, size=(s, s), mode="bilinear", align_corners=False)
            videos = frames.reshape(b, t, c, s, s).transpose(1, 2)
        if t < I3D_MIN_FRAMES:
            videos = torch.cat([videos, videos[:, :, -1:].expand(-1, -1, I3D_MIN_FRAMES - t, -1, -1)], dim=2)
        x = videos * 2.0 - 1.0
        return self.net(x) if self.layer == "logits" else self.net.extract_features(x)


def load_i3d(
    weights_path: str | Path | None = None,
    *,
    input_size: int = 224,
    layer: Literal["pool", "logits"] = "pool",
    num_classes: int = 400,
    seed: int = 0,
) -> I3DFeatures:
    """The FVD feature extractor: a local I3D state-dict file, or seeded random init labelled "random-init"."""
    with _seeded(seed):
        net = InceptionI3d(num_classes=num_classes)
        if weights_path is None:
            _he_init(net)
    source = RANDOM_INIT
    if weights_path is not None:
        path = Path(weights_path)
        _load_checked(net, _read_state_dict(path), path, f"{num_classes}-class RGB I3D")
        source = path.name
    return I3DFeatures(net, source, input_size, layer).eval().requires_grad_(False)


def extract_video_features(videos: Iterable[Any], extractor: Callable, batch_size: int = 8) -> np.ndarray:
    """(N, D) float64 features of videos given as uint8 (N, T, H, W, 3) or a sequence of (T, H, W, 3) clips."""
    return _extract(videos, extractor, batch_size, _video_to_cthw)


def fvd(
    videos_a: Iterable[Any],
    videos_b: Iterable[Any],
    extractor: Callable | None = None,
    batch_size: int = 8,
    method: Method = "auto",
) -> dict[str, Any]:
    """Fréchet Video Distance between two video sets, labelled with where its features came from.

    Without an extractor this uses a random-init I3D at 224 px ("features": "random-init"): never a reportable FVD.
    `method` as in fid.
    """
    extractor = extractor if extractor is not None else load_i3d()
    feats_a = extract_video_features(videos_a, extractor, batch_size)
    feats_b = extract_video_features(videos_b, extractor, batch_size)
    return _result("fvd", feats_a, feats_b, extractor, method)


# --------------------------------------------------------------------------- VBench-style dimensions
# Formulas and aggregation follow VBench v0.1.5 (vbench/{temporal_flickering,motion_smoothness,
# background_consistency,subject_consistency}.py); checked on fixed clips by docs/fidelity/ref_vbench_metrics.py.

# What our motion smoothness predicts the dropped frames with; VBench uses the AMT-S network. Logged as a tag.
MOTION_SMOOTHNESS_INTERPOLATOR = "linear (VBench: AMT-S)"


def _video_uint8(video: Any, min_frames: int) -> np.ndarray:
    """(T, H, W, C) uint8: VBench scores decoded video files, so float input in [0, 1] is quantised the way
    writing it to a video would (round(x * 255)); any frame layout works since only pixel statistics are used."""
    if isinstance(video, np.ndarray | torch.Tensor) and video.dtype in (np.uint8, torch.uint8):
        v = _to_numpy(video)
    else:
        v = np.round(_to_unit_float(video, "video").double().cpu().numpy() * 255.0).clip(0, 255).astype(np.uint8)
    if v.ndim != 4:
        raise ValueError(f"a video must be 4-D (T, H, W, C), got shape {v.shape}")
    if v.shape[0] < min_frames:
        raise ValueError(f"need at least {min_frames} frames, got {v.shape[0]}")
    return v


def temporal_flickering(video: ArrayLike) -> float:
    """VBench temporal flickering: (255 - mean |frame[t+1] - frame[t]|) / 255; 1.0 for a static video.

    VBench scores this on static-scene prompts, where any frame-to-frame change is flicker; on moving content it
    also penalises real motion, so read it next to motion_smoothness. A one-frame video has no pair: VBench's
    score is NaN there (a mean of nothing), we raise instead.
    """
    v = _video_uint8(video, 2).astype(np.float64)
    return float((255.0 - np.abs(np.diff(v, axis=0)).mean()) / 255.0)


def motion_smoothness(video: ArrayLike) -> float:
    """VBench motion smoothness with a linear frame interpolator in place of AMT-S.

    As in VBench: keep the even frames, predict each odd frame between two kept ones, quantise the prediction the
    way VBench's `tensor2img` does (float32 [0, 1] * 255, truncated to uint8), and score (255 - mean |odd - pred|)
    / 255; an odd last frame with no right neighbour is not scored. Only the interpolator differs: the average of
    the two neighbours is exact for motion linear in intensity (a fade) and stricter than AMT for other smooth
    motion, so values run lower than VBench's; the eval tags the run with MOTION_SMOOTHNESS_INTERPOLATOR.
    """
    v = _video_uint8(video, 3)
    kept = torch.from_numpy(np.ascontiguousarray(v[::2])).float() / 255.0
    pred = ((kept[:-1] + kept[1:]) / 2 * 255.0).numpy().clip(0, 255).astype(np.uint8)
    odd = v[1::2][: len(pred)]
    return float((255.0 - np.abs(odd.astype(np.int16) - pred).mean()) / 255.0)


def _pair_similarities(video: Any, encoder: Encoder) -> np.ndarray:
    """(T-1,) VBench frame-pair scores: (max(0, cos(f_t, f_t-1)) + max(0, cos(f_t, f_0))) / 2 for t >= 1."""
    feats = _to_numpy(encoder(video)).astype(np.float64)
    feats = feats.reshape(feats.shape[0], -1)
    if feats.shape[0] < 2:
        raise ValueError(f"need features of at least 2 frames, the encoder returned {feats.shape[0]}")
    unit = feats / np.maximum(np.linalg.norm(feats, axis=1, keepdims=True), 1e-12)
    to_first = np.clip(unit[1:] @ unit[0], 0.0, None)
    to_prev = np.clip(np.sum(unit[1:] * unit[:-1], axis=1), 0.0, None)
    return (to_first + to_prev) / 2.0


def subject_consistency(video: Any, encoder: Encoder) -> float:
    """VBench subject consistency of one video: the mean over frames t >= 1 of (cos(f_t, f_0) + cos(f_t, f_t-1)) / 2,
    each cosine clamped at 0.

    VBench uses DINO ViT-B/16 features for this. `encoder` gets `video` exactly as passed (e.g. a (T, H, W, 3)
    uint8 array) and returns one feature vector per frame, (T, D); it owns its own preprocessing.
    """
    return float(_pair_similarities(video, encoder).mean())


def background_consistency(video: Any, encoder: Encoder) -> float:
    """VBench background consistency: the same frame-to-first/previous cosine average as subject_consistency.

    VBench computes it on CLIP ViT-B/32 image features, which weigh the whole scene rather than the main subject;
    the difference between the two dimensions is only which encoder is passed.
    """
    return float(_pair_similarities(video, encoder).mean())


def set_consistency(videos: Iterable[Any], encoder: Encoder) -> float:
    """Subject or background consistency of a set of videos as VBench reports it: the mean over every frame pair
    of every video (`sim / cnt`), so a longer video weighs more; with equal lengths it is the mean of the videos."""
    pairs = [_pair_similarities(v, encoder) for v in videos]
    if not pairs:
        raise ValueError("no videos to score")
    return float(np.concatenate(pairs).mean())


def video_dimensions(
    videos: Sequence[Any] | np.ndarray, encoder: Encoder | None = None, background_encoder: Encoder | None = None
) -> dict[str, float]:
    """Each dimension over a set of videos, aggregated as VBench does.

    Temporal flickering and motion smoothness: the mean of the per-video scores. Subject and background
    consistency: `set_consistency`. Consistency dimensions appear only when an encoder is given;
    `background_encoder` (VBench: CLIP) defaults to `encoder` (VBench: DINO for subject consistency).
    """
    videos = list(videos)
    if not videos:
        raise ValueError("no videos to score")
    background_encoder = background_encoder or encoder
    out = {
        "temporal_flickering": float(np.mean([temporal_flickering(v) for v in videos])),
        "motion_smoothness": float(np.mean([motion_smoothness(v) for v in videos])),
    }
    if encoder is not None and background_encoder is not None:
        out["subject_consistency"] = set_consistency(videos, encoder)
        out["background_consistency"] = set_consistency(videos, background_encoder)
    return out
