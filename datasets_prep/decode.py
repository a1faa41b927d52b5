"""Frame sampling and decoding with decord (default) or PyAV, registered by name.

Both decoders take the same frame indices and return uint8 (T, H, W, C) RGB; tests hold them to
the same frames. Sampling is deterministic (start of clip), so a cached sample is reproducible.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from datasets_prep.probe import MediaInfo, ProbeError


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


def _decode_decord(path: Path, indices: list[int]) -> np.ndarray:
    import decord

    vr = decord.VideoReader(str(path), ctx=decord.cpu(0), num_threads=1)
    return vr.get_batch(indices).asnumpy()


def _decode_pyav(path: Path, indices: list[int]) -> np.ndarray:
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
                frames[i] = np.rot90(frame.to_ndarray(format="rgb24"), k=int(frame.rotation) // 90)
            if i >= last:
                break
    missing = wanted - frames.keys()
    if missing:
        raise ProbeError(
            "decode_failed", f"decoded only {len(frames)} of the wanted frames; missing {sorted(missing)[:5]}"
        )
    return np.stack([frames[i] for i in indices])


def _decode_image(path: Path, indices: list[int]) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as img:
        arr = np.asarray(img.convert("RGB"))
    return np.repeat(arr[None], len(indices), axis=0)


DECODERS: dict[str, Callable[[Path, list[int]], np.ndarray]] = {"decord": _decode_decord, "pyav": _decode_pyav}


def decode(info: MediaInfo, indices: list[int], decoder: str) -> tuple[np.ndarray, str]:
    """Frames and the name of the decoder that produced them.

    decord 0.6 fails on some frame widths (72 px, for one) with a buffer-size check; the probe has
    already shown the file is sound, so PyAV, which returns the same frames, takes over.
    """
    if info.kind == "image":
        return _decode_image(Path(info.path), indices), "pil"
    if decoder not in DECODERS:
        raise ValueError(f"unknown decoder {decoder!r}; known decoders: {', '.join(sorted(DECODERS))}")
    order = [decoder] + [d for d in DECODERS if d != decoder]
    errors = []
    for name in order:
        try:
            return DECODERS[name](Path(info.path), indices), name
        except ProbeError as exc:
            errors.append(f"{name}: {exc}")
        except Exception as exc:  # decoders raise library-specific types for corrupt streams
            errors.append(f"{name}: {type(exc).__name__}: {str(exc)[-200:]}")
    raise ProbeError("decode_failed", "failed to decode: " + "; ".join(errors))


def resize_center_crop(frames: np.ndarray, height: int, width: int) -> torch.Tensor:
    """(T, H, W, C) uint8 -> (T, height, width, C) uint8: scale to cover, then crop the centre."""
    x = torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2).float()  # (T, C, H, W)
    h, w = x.shape[-2:]
    scale = max(height / h, width / w)
    nh, nw = max(height, round(h * scale)), max(width, round(w * scale))
    x = F.interpolate(x, size=(nh, nw), mode="bilinear", antialias=True, align_corners=False)
    top, left = (nh - height) // 2, (nw - width) // 2
    x = x[:, :, top : top + height, left : left + width]
    return x.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).contiguous()
