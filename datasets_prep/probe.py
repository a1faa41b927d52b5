"""Probe media with PyAV before decoding anything: what can be used, and why not if not.

Images are 1-frame clips. Every failure is a reason string (recorded in rejects.jsonl), never an
exception that stops the stage.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from fractions import Fraction
from pathlib import Path

import av
from PIL import Image, UnidentifiedImageError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp"}


@dataclass(frozen=True)
class MediaInfo:
    path: str
    kind: str  # "video" | "image"
    width: int
    height: int
    fps: float
    num_frames: int
    duration: float
    codec: str
    rotation: int

    def as_row(self) -> dict:
        return asdict(self)


class ProbeError(ValueError):
    """Media that cannot be used; the message is the recorded reason."""


def _rotation(stream: av.video.stream.VideoStream) -> int:
    rotate = stream.metadata.get("rotate")
    if rotate is not None:
        return int(float(rotate)) % 360
    for data in getattr(stream, "side_data", {}) or {}:
        if "DISPLAYMATRIX" in str(data).upper():
            try:
                return int(round(float(stream.side_data[data]))) % 360
            except (TypeError, ValueError):
                return 0
    return 0


def _count_frames(container: av.container.InputContainer, stream: av.video.stream.VideoStream) -> int:
    # Demux packets only (no decode): exact even when the header's frame count is missing or wrong.
    return sum(1 for pkt in container.demux(stream) if pkt.size)


def probe_video(path: Path) -> MediaInfo:
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise ProbeError("no video stream")
            stream = container.streams.video[0]
            ctx = stream.codec_context
            rate = stream.average_rate or stream.guessed_rate or Fraction(0)
            fps = float(rate)
            frames = _count_frames(container, stream)
            width, height, codec = ctx.width, ctx.height, ctx.name
            rotation = _rotation(stream)
    except ProbeError:
        raise
    except (av.error.FFmpegError, IndexError, OSError, ValueError, UnicodeDecodeError) as exc:
        raise ProbeError(f"unreadable by PyAV: {type(exc).__name__}: {exc}") from exc
    if frames == 0 or fps <= 0:
        raise ProbeError(f"no decodable frames (frames={frames}, fps={fps:g})")
    return MediaInfo(str(path), "video", width, height, fps, frames, frames / fps, codec, rotation)


def probe_image(path: Path) -> MediaInfo:
    try:
        with Image.open(path) as img:
            img.verify()  # catches truncated files without decoding twice
        with Image.open(path) as img:
            width, height, fmt = img.width, img.height, (img.format or "image").lower()
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise ProbeError(f"unreadable image: {type(exc).__name__}: {exc}") from exc
    return MediaInfo(str(path), "image", width, height, 0.0, 1, 0.0, fmt, 0)


def probe(path: Path) -> MediaInfo:
    path = Path(path)
    if not path.exists():
        raise ProbeError("file not found")
    if path.stat().st_size == 0:
        raise ProbeError("zero-length file")
    return probe_image(path) if path.suffix.lower() in IMAGE_SUFFIXES else probe_video(path)
