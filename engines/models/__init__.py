"""Model families (diffusers/transformers classes behind one interface), registered by name.

Nothing is imported here: `get_family(name)` imports only that family's module on first use
(engines/models/registry.py), so the stage machinery starts without the model libraries of families
the run does not use, and the cost of starting does not grow with the zoo. The names below are looked
up in the registry on first access.
"""

from __future__ import annotations

from typing import Any

__all__ = ["Capability", "ModelFamily", "get_family", "known_families", "register_family"]


def __getattr__(name: str) -> Any:
    """`from flowspeed.engines.models import get_family` (and the other public names) without importing a family."""
    if name in __all__:
        from flowspeed.engines.models import registry

        return getattr(registry, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
