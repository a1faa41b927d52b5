"""Model families (diffusers/transformers classes behind one interface), registered by name."""

from engines.models import cogvideox, flux, sd3, sdxl  # noqa: F401  (register the built-in families)
from engines.models.registry import ModelFamily, get_family, known_families, register_family

__all__ = ["ModelFamily", "get_family", "known_families", "register_family"]
