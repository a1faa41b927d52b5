"""Buckets over (frames, height, width): which shape each clip is cached at and batched with.

Three modes (``data.buckets.mode``):
    fixed     every clip at data.num_frames x data.height x data.width (centre crop), one bucket
    opensora  Open-Sora's ``bucket_config``: resolution -> {frames: [keep_prob, batch_size]}. A clip
              goes to the highest resolution (not above its own) and the most frames (not above what
              it holds) whose keep draw passes, at the aspect ratio closest to its own
    dynamic   Open-Sora-Plan's dynamic resolution: scale to at most ``max_hxw`` pixels keeping the
              aspect ratio, align both sides to ``stride``; refuse aspect ratios past
              ``aspect_threshold``; buckets with fewer than ``min_bucket_count`` clips are dropped

Frame counts are always ones the VAE takes (4k+1 for CogVideoX) and, with ``cp_degree``, give a
latent frame count divisible by the context-parallel degree. Keep draws hash the clip's content
key, so the same clip lands in the same bucket in every run and on every rank.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

from flowspeed.configs.schema import BucketsConfig, DataConfig, resolution_area
from flowspeed.datasets_prep.probe import MediaInfo, ProbeError
from flowspeed.engines.common.io import text_digest

# Height / width ratios a clip may be bucketed at (portrait 9:21 ... landscape 21:9).
ASPECT_RATIOS = (21 / 9, 16 / 9, 4 / 3, 1.0, 3 / 4, 9 / 16, 9 / 21)


@dataclass(frozen=True)
class Bucket:
    frames: int
    height: int
    width: int
    batch_size: int

    @property
    def shape(self) -> tuple[int, int, int]:
        return (self.frames, self.height, self.width)


def _align(x: float, stride: int) -> int:
    return max(stride, int(round(x / stride)) * stride)


def available_frames(info: MediaInfo, d: DataConfig) -> int:
    """How many frames sampling at the target fps (or stride) can take from this clip."""
    if info.kind == "image":
        return 10**9  # a still repeats to any length
    step = max(info.fps / d.target_fps, 1.0) if d.target_fps else float(d.stride)
    return int((info.num_frames - 1) / step + 1e-6) + 1


#: pixel frames -> the latent frames a VAE makes of them, or None when it cannot take that many
FrameRule = Callable[[int], "int | None"]


def causal_rule(temporal: int) -> FrameRule:
    """A causal video VAE's frame rule: 1 + temporal * k frames -> 1 + k latent frames."""
    return lambda n: None if n < 1 or (n - 1) % temporal else (n - 1) // temporal + 1


def valid_frames(n: int, temporal: int | FrameRule, cp_degree: int) -> bool:
    """`temporal`: a causal VAE's temporal compression, or the family's own frame rule (OpenSora 1.2's VAE encodes
    17-frame chunks, so its latent count is not (n - 1) / 4 + 1)."""
    latent = (temporal if callable(temporal) else causal_rule(temporal))(n)
    return latent is not None and latent % cp_degree == 0


def _keep(key: str, salt: str, prob: float) -> bool:
    if prob >= 1.0:
        return True
    return int(text_digest(key, salt)[:8], 16) / 0xFFFFFFFF < prob


def assign(info: MediaInfo, key: str, d: DataConfig, temporal: int | FrameRule, stride: int, default_bs: int) -> Bucket:
    b = d.buckets
    have = available_frames(info, d)
    if b.mode == "fixed":
        if not valid_frames(d.num_frames, temporal, b.cp_degree):
            raise ValueError(f"data.num_frames={d.num_frames} gives a latent length not divisible by cp_degree")
        return Bucket(d.num_frames, d.height, d.width, default_bs)
    if b.mode == "dynamic":
        return _dynamic(info, have, b, temporal, stride, default_bs)
    return _opensora(info, key, have, b, temporal, stride)


def _frames_for(have: int, wanted: list[int], b: BucketsConfig, temporal: int | FrameRule) -> list[int]:
    return sorted((n for n in wanted if n <= have and valid_frames(n, temporal, b.cp_degree)), reverse=True)


def _opensora(info: MediaInfo, key: str, have: int, b: BucketsConfig, temporal: int | FrameRule, stride: int) -> Bucket:
    ratio = info.height / info.width
    aspect = min(ASPECT_RATIOS, key=lambda r: abs(math.log(r / ratio)))
    for res in sorted(b.bucket_config, key=lambda r: resolution_area(r), reverse=True):
        area = resolution_area(res)
        if info.height * info.width < area * 0.5:  # never upscale a clip by more than ~1.4x a side
            continue
        frames_cfg = {int(k): v for k, v in b.bucket_config[res].items()}
        for n in _frames_for(have, list(frames_cfg), b, temporal):
            keep_prob, batch_size = frames_cfg[n]
            if _keep(key, f"{res}/{n}", float(keep_prob)):
                h = _align(math.sqrt(area * aspect), stride)
                w = _align(area / math.sqrt(area * aspect), stride)
                return Bucket(n, h, w, int(batch_size))
    raise ProbeError(
        "no_bucket", f"no bucket fits {info.width}x{info.height} with {have} usable frames (data.buckets.bucket_config)"
    )


def _dynamic(
    info: MediaInfo, have: int, b: BucketsConfig, temporal: int | FrameRule, stride: int, default_bs: int
) -> Bucket:
    ratio = max(info.height / info.width, info.width / info.height)
    if ratio > b.aspect_threshold:
        raise ProbeError("aspect", f"aspect ratio {ratio:.2f} above data.buckets.aspect_threshold={b.aspect_threshold}")
    scale = min(1.0, math.sqrt(b.max_hxw / (info.height * info.width)))
    # Align down so the aligned size never exceeds max_hxw nor the clip's own size.
    h = max(stride, int(info.height * scale) // stride * stride)
    w = max(stride, int(info.width * scale) // stride * stride)
    frames = _frames_for(have, list(range(1, b.max_frames + 1)), b, temporal)
    if not frames:
        raise ProbeError("too_short", f"too short: {have} usable frames, no valid frame count for the VAE")
    return Bucket(frames[0], h, w, default_bs)


def drop_minorities(shapes: dict[str, tuple[int, int, int]], min_count: int) -> set[str]:
    """Keys whose bucket holds fewer than `min_count` clips: they would make lonely, padded batches."""
    counts = Counter(shapes.values())
    return {k for k, s in shapes.items() if counts[s] < min_count}
