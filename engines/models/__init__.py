"""Model families (diffusers/transformers classes behind one interface), registered by name."""

from engines.models import (  # noqa: F401  (register the built-in families)
    cogvideox,
    cogvideox15,
    cogvideox_i2v,
    flux,
    hunyuandit,
    internvl,
    kolors,
    llava,
    opensora,
    opensoraplan,
    qihoo_t2x,
    qwen2_vl,
    sd3,
    sdxl,
    whisper,
)
from engines.models.registry import ModelFamily, get_family, known_families, register_family

__all__ = ["ModelFamily", "get_family", "known_families", "register_family"]
