"""Frame sampling and decoding with PyAV (default) or decord (`pip install 'flowspeed[video-decode]'`), by name.

Both decoders take the same frame indices and return uint8 (T, H, W, C) RGB; tests hold them to
the same frames. Sampling is deterministic (start of clip), so a cached sample is reproducible.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from flowspeed.datasets_prep.probe import MediaInfo, ProbeError
from flowspeed.engines.common.extras import MissingExtraError, missing, require


def sample_indices(info: MediaInfo, num_frames: int, target_fps: float | None, stride: int) -> list[int]:
    """Indices of `num_frames` frames at `target_fps` (or every `stride`-th frame); images repeat."""
    if info.kind == "image":
        return [0] * num_frames
    # At a target fps above the source's, frames repeat rather than the clip being rejected.
    step = max(info.fps / target_fps, 1.0) if target_fps else float(stride)
    indices = [int(i * step + 1e-6) for i in range(num_frames)]
    if indices[-1] >= info.num_frames:
        need = indices[-1] + 1
        raise ProbeError(
            "too_short",
            f"too short: {num_frames} frames at step {step:.2f} need {need} source frames, "
            f"the clip has {info.num_frames}",
        )
    return indices


def _decode_decord(path: Path, indices: list[int], size: tuple[int, int] | None = None) -> np.ndarray:
    # an extra (no wheels for macOS or aarch64); PyAV is core
    decord = require("decord", "data.decoder: decord", "use data.decoder: pyav")

    hw = {"height": size[0], "width": size[1]} if size else {}
    vr = decord.VideoReader(str(path), ctx=decord.cpu(0), num_threads=1, **hw)
    return vr.get_batch(indices).asnumpy()


def _decode_pyav(path: Path, indices: list[int], size: tuple[int, int] | None = None) -> np.ndarray:
    import av

    wanted = set(indices)
    last = max(indices)
    frames: dict[int, np.ndarray] = {}
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        for i, frame in enumerate(container.decode(stream)):
            if i in wanted:
                # decord applies the display rotation; PyAV hands back stored frames: match decord.
                # Scaling in swscale, bicubic like ffmpeg's scale filter that decord uses.
                hw = {"height": size[0], "width": size[1], "interpolation": "BICUBIC"} if size else {}
                frames[i] = np.rot90(frame.to_ndarray(format="rgb24", **hw), k=int(frame.rotation) // 90)
            if i >= last:
                break
    missing = wanted - frames.keys()
    if missing:
        raise ProbeError(
            "decode_failed", f"decoded only {len(frames)} of the wanted frames; missing {sorted(missing)[:5]}"
        )
    return np.stack([frames[i] for i in indices])


def _decode_image(path: Path, indices: list[int], size: tuple[int, int] | None = None) -> np.ndarray:
    """One decode, scaled to `size` first, then repeated: a full-size frame per output frame (and as
    float32 for the resize) is what made one large PNG cost tens of GB."""
    from PIL import Image

    with Image.open(path) as img:
        arr = np.asarray(img.convert("RGB"))[None]
    if size is not None and size != arr.shape[1:3]:
        arr = _scale(arr, *size)
    return np.repeat(arr, len(indices), axis=0)


DECODERS: dict[str, Callable[..., np.ndarray]] = {"decord": _decode_decord, "pyav": _decode_pyav}


def cover_size(h: int, w: int, height: int, width: int) -> tuple[int, int]:
    """The smallest (h, w) with the source's aspect ratio that covers (height, width)."""
    scale = max(height / h, width / w)
    return max(height, round(h * scale)), max(width, round(w * scale))


def decode(
    info: MediaInfo, indices: list[int], decoder: str, size: tuple[int, int] | None = None
) -> tuple[np.ndarray, str]:
    """Frames and the name of the decoder that produced them.

    `size` (h, w) scales inside the decoder (swscale, on the way out of the codec): much cheaper
    than decoding full frames and resizing them after. Rotated clips are scaled afterwards, since
    decoders disagree on whether the size means before or after rotation.

    decord 0.6 fails on some frame widths (72 px, for one) with a buffer-size check; the probe has
    already shown the file is sound, so PyAV, which returns the same frames, takes over.
    """
    if info.kind == "image":
        return _decode_image(Path(info.path), indices, size), "pil"
    if decoder not in DECODERS:
        raise ValueError(f"unknown decoder {decoder!r}; known decoders: {', '.join(sorted(DECODERS))}")
    if size == (info.height, info.width) or info.rotation != 0:
        size = None  # nothing to scale (a scaler would only add a copy), or sizes ambiguous under rotation
    # the fallbacks are the decoders installed here; the one asked for, missing, is refused (MissingExtraError)
    order = [decoder] + [d for d in DECODERS if d != decoder and _installed(d)]
    errors = []
    for name in order:
        try:
            return DECODERS[name](Path(info.path), indices, size), name
        except MissingExtraError:
            raise
        except ProbeError as exc:
            errors.append(f"{name}: {exc}")
        except Exception as exc:  # decoders raise library-specific types for corrupt streams
            errors.append(f"{name}: {type(exc).__name__}: {str(exc)[-200:]}")
    raise ProbeError("decode_failed", "failed to decode: " + "; ".join(errors))


@functools.cache  # asked once per clip in the decode loop; what is installed does not change mid-run
def _installed(decoder: str) -> bool:
    return decoder != "decord" or missing("decord", "data.decoder: decord") is None


def resize_center_crop(frames: np.ndarray, height: int, width: int) -> torch.Tensor:
    """(T, H, W, C) uint8 -> (T, height, width, C) uint8: scale to cover, then crop the centre."""
    h, w = frames.shape[1:3]
    nh, nw = cover_size(h, w, height, width)
    if (nh, nw) != (h, w):  # frames the decoder already scaled skip straight to the crop
        frames = _scale(frames, nh, nw)
    top, left = (nh - height) // 2, (nw - width) // 2
    return torch.from_numpy(np.ascontiguousarray(frames[:, top : top + height, left : left + width]))


def _scale(frames: np.ndarray, height: int, width: int) -> np.ndarray:
    """(T, H, W, C) uint8 -> (T, height, width, C) uint8, bilinear with antialiasing, a frame at a time so
    the float32 copy the interpolation needs is one frame's, not the clip's."""
    out = np.empty((frames.shape[0], height, width, frames.shape[3]), np.uint8)
    for i, frame in enumerate(frames):
        x = torch.from_numpy(np.require(frame, requirements=["C", "W"])).permute(2, 0, 1)[None].float()  # (1, C, H, W)
        x = F.interpolate(x, size=(height, width), mode="bilinear", antialias=True, align_corners=False)
        out[i] = x[0].round().clamp(0, 255).to(torch.uint8).permute(1, 2, 0).numpy()
    return out
