"""The two conversations the VLM family tests encode, train on and answer back: a two-turn chat about an image and
a chat with a system turn about a video. Only the video's frames (and frame rate) are the family's own, since patch,
temporal-patch and merge sizes differ; the draws are the same in every file (seed 0, image first)."""

from __future__ import annotations

import numpy as np
from flowspeed.engines.models.sequence import SequenceSample


def image_and_video_chats(
    video: tuple[int, int, int], video_fps: float | None = None
) -> tuple[SequenceSample, SequenceSample]:
    """(image chat, video chat); the image is 40x50 px, the video `video` = (frames, height, width)."""
    rng = np.random.default_rng(0)
    image_chat = SequenceSample(
        messages=[
            {"role": "user", "content": "What is in the picture?"},
            {"role": "assistant", "content": "A red circle."},
            {"role": "user", "content": "Where?"},
            {"role": "assistant", "content": "Top left."},
        ],
        images=[rng.integers(0, 256, (40, 50, 3), dtype=np.uint8)],
    )
    video_chat = SequenceSample(
        messages=[
            {"role": "system", "content": "Answer briefly."},
            {"role": "user", "content": "Does it move?"},
            {"role": "assistant", "content": "Yes, to the right."},
        ],
        videos=[rng.integers(0, 256, (*video, 3), dtype=np.uint8)],
        video_fps=[] if video_fps is None else [video_fps],
    )
    return image_chat, video_chat
