"""Model families (diffusers/transformers classes behind one interface), registered by name."""

from engines.models import cogvideox, sd3  # noqa: F401  (register "cogvideox", "sd3")
from engines.models.registry import ModelFamily, get_family, known_families, register_family

__all__ = ["ModelFamily", "get_family", "known_families", "register_family"]
