"""Helpers for the fidelity tests: facts from outside the project, and inputs both sides can rebuild.

The fact tables under `tests/facts/` hold what a released checkpoint looks like (key -> shape), written from the
authors' code at their release tag or from the released checkpoint's index, never from our modules. The seeded
weights and inputs are defined by key name and seed alone (not by module construction order), so a reference
script running the authors' module and our test build bit-identical tensors from the same few lines; the scripts
that computed the reference values are kept in `docs/fidelity/`.
"""

from __future__ import annotations

import json
import math
import sys
import zlib
from pathlib import Path
from typing import Any

import torch
from torch import nn

FACTS = Path(__file__).resolve().parent / "facts"


def load_facts() -> list[dict[str, Any]]:
    """Every fact table: {"file", "source", "used_by": [[family, variant, component], ...], "keys": {k: shape}}."""
    tables = []
    for path in sorted(FACTS.glob("*.json")):
        table = json.loads(path.read_text())
        missing = {"source", "used_by", "keys"} - set(table)
        if missing:
            raise ValueError(f"{path.name}: fact table lacks {sorted(missing)}")
        table["file"] = path.name
        table["keys"] = {k: tuple(v) for k, v in table["keys"].items()}
        tables.append(table)
    return tables


def released_shapes(module: nn.Module) -> dict[str, tuple[int, ...]]:
    """key -> shape of `module` under the names its released checkpoint uses.

    Our own model files (engines/models/dits) rename through their module's `to_published`; transformers models
    through transformers' own reverse of its load-time conversion mapping, less the tied copies save_pretrained
    drops; diffusers models keep their state-dict names (a released diffusers folder uses them).
    """
    state = module.state_dict()
    owner = sys.modules[type(module).__module__]
    if type(module).__module__.startswith("flowspeed.engines.models.dits") and hasattr(owner, "to_published"):
        state = owner.to_published(state)
    else:
        from transformers import PreTrainedModel

        if isinstance(module, PreTrainedModel):
            tied = _tied_keys(module)
            state = {k: v for k, v in state.items() if k not in tied}
            if callable(getattr(module, "to_original", None)):  # a remote-code release transformers has no map for
                state = module.to_original(state)
            else:
                state = _revert_as_loaded(module, state)
    return {k: tuple(v.shape) for k, v in state.items()}


def _revert_as_loaded(model: nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """transformers' reverse conversion as for a model loaded from its released file.

    For a freshly built model transformers drops every prefix change (it cannot know the file had the prefix);
    a nested tower's scoped one is a fact of the release, though: llava-hf saves its CLIP tower as
    `vision_tower.vision_model.*`, which transformers 5 loads into `model.vision_tower.*`.
    """
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import PrefixChange
    from transformers.modeling_utils import revert_weight_conversion

    if getattr(model, "_weight_conversions", None) is not None:  # loaded by from_pretrained: it knows
        return revert_weight_conversion(model, state)
    convs = get_model_conversion_mapping(model, add_legacy=False)
    model._weight_conversions = [c for c in convs if not isinstance(c, PrefixChange) or getattr(c, "scope_prefix", "")]
    try:
        return revert_weight_conversion(model, state)
    finally:
        del model._weight_conversions


def _tied_keys(model: nn.Module) -> set[str]:
    """State-dict names that alias a tensor listed earlier (transformers' save_pretrained keeps only the first)."""
    seen: dict[int, str] = {}
    tied = set()
    for name, tensor in model.state_dict(keep_vars=True).items():
        key = id(tensor)
        if key in seen:
            tied.add(name)
        else:
            seen[key] = name
    return tied


def _generator(seed: int, name: str) -> torch.Generator:
    return torch.Generator().manual_seed(zlib.crc32(f"{seed}:{name}".encode()))


def seeded_tensor(name: str, shape: tuple[int, ...], seed: int = 0, scale: float | None = None) -> torch.Tensor:
    """A float32 tensor fixed by (seed, name, shape) alone: N(0, 1/fan_in) for matrices and kernels,
    1 + N(0, 0.1) for norm-like vectors named "*weight", N(0, 0.1) for other vectors, unless `scale` is given."""
    noise = torch.randn(shape, generator=_generator(seed, name), dtype=torch.float64)
    if scale is not None:
        return (noise * scale).float()
    if len(shape) >= 2:
        return (noise / math.sqrt(math.prod(shape[1:]))).float()
    return ((1.0 if name.endswith("weight") else 0.0) + 0.1 * noise).float()


def seeded_weights(shapes: dict[str, tuple[int, ...]], seed: int = 0) -> dict[str, torch.Tensor]:
    """Weights for every key of a (released-name) shape table; load them into either side's module."""
    return {k: seeded_tensor(k, tuple(s), seed) for k, s in sorted(shapes.items())}
