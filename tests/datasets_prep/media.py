"""Awkward media the tests make themselves: audio-only, variable frame rate, rotated."""

from fractions import Fraction
from pathlib import Path

import av
import numpy as np


def write_audio_only(path: Path, seconds: float = 0.5, rate: int = 16000) -> Path:
    with av.open(str(path), "w") as out:
        s = out.add_stream("aac", rate=rate)
        s.layout = "mono"
        for i in range(int(seconds * rate / 1024) + 1):
            frame = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp", layout="mono")
            frame.sample_rate, frame.pts = rate, i * 1024
            for p in s.encode(frame):
                out.mux(p)
        for p in s.encode():
            out.mux(p)
    return path


def write_vfr(path: Path, n: int = 40, size: int = 64) -> Path:
    """Frame durations alternate 1 and 3 ticks of 1/24 s."""
    tb = Fraction(1, 24)
    with av.open(str(path), "w") as out:
        s = out.add_stream("libx264", rate=24)
        s.width = s.height = size
        s.pix_fmt, s.time_base, s.codec_context.time_base = "yuv420p", tb, tb
        pts = 0
        for i in range(n):
            frame = av.VideoFrame.from_ndarray(np.full((size, size, 3), (i * 5) % 255, np.uint8), format="rgb24")
            frame.pts, frame.time_base = pts, tb
            pts += 1 if i % 2 else 3
            for p in s.encode(frame):
                out.mux(p)
        for p in s.encode():
            out.mux(p)
    return path


def write_rotated(path: Path, n: int = 24, height: int = 64, width: int = 96, degrees: int = 90) -> Path:
    """Stored landscape with a bright left edge; displayed rotated by `degrees` counter-clockwise."""
    with av.open(str(path), "w") as out:
        s = out.add_stream("libx264", rate=8)
        s.width, s.height, s.pix_fmt = width, height, "yuv420p"
        s.set_display_rotation(degrees)
        for _ in range(n):
            arr = np.zeros((height, width, 3), np.uint8)
            arr[:, : width // 8] = 255
            for p in s.encode(av.VideoFrame.from_ndarray(arr, format="rgb24")):
                out.mux(p)
        for p in s.encode():
            out.mux(p)
    return path
