"""Write H.264 mp4 files with PyAV (demo data, generated samples)."""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path

import av
import numpy as np
from flowspeed.engines.common.io import atomic_write


def write_mp4(path: Path, frames: np.ndarray, fps: float, crf: int = 18) -> Path:
    """(T, H, W, 3) uint8 -> H.264/yuv420p mp4, atomically. H and W must be even (4:2:0 chroma)."""
    t, h, w, c = frames.shape
    if c != 3 or h % 2 or w % 2:
        raise ValueError(f"write_mp4 needs (T, even H, even W, 3) uint8 frames, got {frames.shape}")

    def write(tmp: Path) -> None:
        with av.open(str(tmp), mode="w", format="mp4") as out:
            rate = Fraction(fps).limit_denominator(1001)
            stream = out.add_stream("libx264", rate=rate)
            stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
            stream.options = {"crf": str(crf), "preset": "veryfast"}
            for arr in frames:
                for packet in stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(arr), format="rgb24")):
                    out.mux(packet)
            for packet in stream.encode():
                out.mux(packet)

    return atomic_write(Path(path), write)


def write_sample(folder: Path, i: int, frames: np.ndarray, fps: float) -> Path:
    """A generated sample as `sample_XX.mp4`, or `sample_XX.png` when it is one frame (image families): the files the
    eval, the training-time samples and a served predict write alike."""
    if len(frames) == 1:
        from PIL import Image

        path = folder / f"sample_{i:02d}.png"
        return atomic_write(path, lambda tmp: Image.fromarray(frames[0]).save(tmp, format="PNG"))
    return write_mp4(folder / f"sample_{i:02d}.mp4", frames, fps)
