"""What a config may name, known without importing a model library (or pandas).

Checking `model.family`, its frame rule or `data.caption.model` through the real registries means
importing every family module, hence diffusers, transformers and torch: 10+ s before a typo is
reported. This table holds the few facts the config checks need, per registered name, and
`tests/configs/test_validation.py` holds it to the real registries (`engines.models.known_families()`,
each family's `frame_count_error`, `size_multiple` and `vision_tower`, megatron's `MODELS`, prep's
`CAPTIONERS`, the benchmarks and prompt templates), so the table cannot drift from what the stages
will do: a new family that is not listed here fails that test, not a user's run.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Literal

#: "any": any frame count >= 1; "image": exactly 1; an int t: the VAE takes t*k+1 frames
FrameRule = Literal["any", "image"] | int


@dataclass(frozen=True)
class FamilyFacts:
    """What the config checks need to know about one registered model family."""

    module: str  #: the module whose import registers it (engines/models/<module>.py)
    frames: FrameRule
    size_multiple: int = 1  #: data.height/width must divide by this (VAE downsampling x patch size)
    vision_tower: bool = False  #: has a vision tower (model.freeze_vision_tower applies)

    def frame_error(self, name: str, num_frames: int) -> str | None:
        """Why `name`'s VAE cannot take `num_frames` (the family's own rule, stated as data)."""
        if self.frames == "any":
            return None if num_frames >= 1 else f"{name} needs at least one frame, not {num_frames}"
        if self.frames == "image":
            return None if num_frames == 1 else f"{name} is an image model: it takes 1 frame, not {num_frames}"
        t = self.frames
        if num_frames >= 1 and (num_frames - 1) % t == 0:
            return None
        k = max(num_frames - 1, 0) // t
        return f"{name}'s VAE takes {t}k+1 frames (e.g. {t * k + 1} or {t * k + t + 1}), not {num_frames}"


_VIDEO = FamilyFacts("", 4, 16)  # 4x temporal VAE, 16-pixel multiples: the CogVideoX / Open-Sora-Plan layout
_IMAGE = FamilyFacts("", "image", 16)
_SEQUENCE = FamilyFacts("", "any", 1)


def _facts(module: str, like: FamilyFacts, **changes: Any) -> FamilyFacts:
    return replace(like, module=f"engines.models.{module}", **changes)


#: every registered model family, by its `model.family` name
FAMILIES: dict[str, FamilyFacts] = {
    "cogvideox": _facts("cogvideox", _VIDEO),
    "cogvideox1.5": _facts("cogvideox15", _VIDEO),
    "cogvideox_i2v": _facts("cogvideox_i2v", _VIDEO),
    "flux": _facts("flux", _IMAGE),
    "hunyuandit": _facts("hunyuandit", _IMAGE),
    "internvl": _facts("internvl", _SEQUENCE, vision_tower=True),
    "kolors": _facts("kolors", _IMAGE),
    "llava": _facts("llava", _SEQUENCE, vision_tower=True),
    "opensora": _facts("opensora", _VIDEO, frames="any"),
    "opensora1.2": _facts("opensora", _VIDEO, frames="any"),
    "opensoraplan": _facts("opensoraplan", _VIDEO),
    "opensoraplan_i2v": _facts("opensoraplan", _VIDEO),
    "qihoo_t2x": _facts("qihoo_t2x", _VIDEO, size_multiple=64),
    "qwen2_vl": _facts("qwen2_vl", _SEQUENCE, vision_tower=True),
    "sd3": _facts("sd3", _IMAGE),
    "sdxl": _facts("sdxl", _IMAGE),
    "whisper": _facts("whisper", _SEQUENCE),
}

#: families `train.engine: megatron` builds (engines/megatron/vlm.py MODELS), in its order
MEGATRON_FAMILIES: tuple[str, ...] = ("qwen2_vl", "llava")

#: prep's captioners (datasets_prep/caption.py CAPTIONERS) -> the presets each can build without `pretrained`
CAPTIONERS: dict[str, tuple[str, ...]] = {"qwen2_vl": ("tiny",), "llava": (), "internvl": ()}

#: understanding benchmarks (evaluation/benchmarks.py BENCHMARKS) and their prompt templates (PROMPT_TEMPLATES)
BENCHMARKS: tuple[str, ...] = ("mmmu", "ai2d", "chartqa", "docvqa", "infovqa")
PROMPT_TEMPLATES: tuple[str, ...] = ("default", "llava", "qwen2_vl", "internvl")
