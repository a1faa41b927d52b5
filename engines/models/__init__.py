"""Model families (diffusers/transformers classes behind one interface), registered by name."""

from engines.models import cogvideox  # noqa: F401  (registers "cogvideox")
from engines.models.registry import ModelFamily, get_family, known_families, register_family

__all__ = ["ModelFamily", "get_family", "known_families", "register_family"]
