"""Probe media with PyAV before decoding a clip: what can be used, and why not if not.

Images are 1-frame clips. Every failure is a `ProbeError` with a short `code` (counted per reason
in the prep summary) and a message (recorded in rejects.jsonl), never an exception that stops the
stage. The probe demuxes every packet (exact frame count, variable frame rate detection) and
decodes one frame (proves the stream decodes; reads the display rotation, which only decoded frames
carry in PyAV).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from fractions import Fraction
from pathlib import Path

import av
from PIL import Image, UnidentifiedImageError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp"}
MAX_SIDE = 16384  # beyond any camera or generator: a corrupt header, or a file no one should decode
VFR_SPREAD = 1.5  # largest / smallest frame duration above which a clip is variable frame rate


@dataclass(frozen=True)
class MediaInfo:
    path: str
    kind: str  # "video" | "image"
    width: int  # display size: rotation already applied
    height: int
    fps: float
    num_frames: int
    duration: float
    codec: str
    rotation: int  # degrees counter-clockwise that decoders apply to stored frames
    container: str = ""
    vfr: bool = False

    def as_row(self) -> dict:
        return asdict(self)


class ProbeError(ValueError):
    """Media that cannot be used: `code` is the reason's category, the message its detail."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


def _scan_packets(container: av.container.InputContainer, stream: av.video.stream.VideoStream) -> tuple[int, bool]:
    """Frame count and whether frame durations vary (VFR), from packet timestamps without decoding."""
    pts = []
    for pkt in container.demux(stream):
        if pkt.size and pkt.pts is not None:
            pts.append(pkt.pts)
    pts.sort()  # packets arrive in decode order; B-frames make raw deltas meaningless
    deltas = [b - a for a, b in zip(pts, pts[1:], strict=False) if b > a]
    vfr = bool(deltas) and max(deltas) > VFR_SPREAD * min(deltas)
    return len(pts), vfr


def probe_video(path: Path) -> MediaInfo:
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                kinds = sorted({s.type for s in container.streams}) or ["no"]
                raise ProbeError("no_video", f"no video stream ({', '.join(kinds)} streams only)")
            stream = container.streams.video[0]
            ctx = stream.codec_context
            fps = float(stream.average_rate or stream.guessed_rate or Fraction(0))
            width, height, codec = ctx.width, ctx.height, ctx.name
            fmt = container.format.name
            frames, vfr = _scan_packets(container, stream)
            container.seek(0)
            first = next(container.decode(stream), None)
            rotation = int(first.rotation) % 360 if first is not None else 0
    except ProbeError:
        raise
    except (av.error.FFmpegError, IndexError, OSError, ValueError, UnicodeDecodeError, StopIteration) as exc:
        raise ProbeError("unreadable", f"unreadable by PyAV: {type(exc).__name__}: {exc}") from exc
    if frames == 0 or fps <= 0 or first is None:
        raise ProbeError("no_frames", f"no decodable frames (frames={frames}, fps={fps:g})")
    if max(width, height) > MAX_SIDE or min(width, height) <= 0:
        raise ProbeError("absurd_size", f"absurd frame size {width}x{height}")
    if rotation in (90, 270):
        width, height = height, width
    return MediaInfo(str(path), "video", width, height, fps, frames, frames / fps, codec, rotation, fmt, vfr)


def probe_image(path: Path) -> MediaInfo:
    try:
        with Image.open(path) as img:
            img.verify()  # catches truncated files without decoding twice
        with Image.open(path) as img:
            width, height, fmt = img.width, img.height, (img.format or "image").lower()
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise ProbeError("unreadable", f"unreadable image: {type(exc).__name__}: {exc}") from exc
    if max(width, height) > MAX_SIDE:
        raise ProbeError("absurd_size", f"absurd image size {width}x{height}")
    return MediaInfo(str(path), "image", width, height, 0.0, 1, 0.0, fmt, 0, fmt, False)


def probe(path: Path) -> MediaInfo:
    path = Path(path)
    if not path.exists():
        raise ProbeError("not_found", "file not found")
    if path.stat().st_size == 0:
        raise ProbeError("empty", "zero-length file")
    return probe_image(path) if path.suffix.lower() in IMAGE_SUFFIXES else probe_video(path)
