"""Every released layout against a table written from outside the project (tests/facts/README.md).

Each named real variant's components, built on the meta device, must have exactly the keys and shapes of the
authors' released checkpoint: a wrong config value, a missing head or a renamed module fails here even when our
own save/load round trip is consistent with itself.
"""

from __future__ import annotations

from functools import lru_cache

import pytest
import torch
from flowspeed.engines.models import get_family, known_families
from flowspeed.engines.models.dits.checkpoint import load_published
from flowspeed.engines.models.variants import TINY, build_on_meta, get_variant, known_variants
from torch import nn

from tests.fidelity import load_facts, released_shapes

TABLES = load_facts()
CASES = [(t["file"], tuple(u)) for t in TABLES for u in t["used_by"]]


@lru_cache(maxsize=4)
def _built(family: str, variant: str) -> dict[str, nn.Module]:
    return build_on_meta(family, variant)


@pytest.mark.parametrize(("file", "use"), CASES, ids=[f"{f}:{'/'.join(u)}" for f, u in CASES])
def test_variant_matches_released_layout(file: str, use: tuple[str, str, str]) -> None:
    family, variant, component = use
    table = next(t for t in TABLES if t["file"] == file)
    ours = released_shapes(_built(family, variant)[component])
    facts = table["keys"]
    missing = sorted(set(facts) - set(ours))
    unexpected = sorted(set(ours) - set(facts))
    wrong = {k: (ours[k], facts[k]) for k in sorted(set(ours) & set(facts)) if ours[k] != facts[k]}
    assert not (missing or unexpected or wrong), (
        f"{family}/{variant}/{component} vs {file} ({table['source']}): "
        f"{len(missing)} missing {missing[:8]}, {len(unexpected)} unexpected {unexpected[:8]}, "
        f"{len(wrong)} mis-shaped (ours, released) {dict(list(wrong.items())[:8])}"
    )


def test_tables_name_real_variants() -> None:
    for table in TABLES:
        assert table["keys"] and table["source"].strip(), table["file"]
        for family, variant, component in table["used_by"]:
            assert component in get_variant(family, variant).components, (table["file"], family, variant, component)


def test_every_released_component_has_a_table() -> None:
    """A new variant (or a new component of one) lands with the table of its release, or this fails."""
    covered = {tuple(u) for t in TABLES for u in t["used_by"]}
    components = {(f, n, c) for f in known_families() for n in known_variants(f) if n != TINY
                  for c in get_variant(f, n).components}  # fmt: skip
    assert sorted(components - covered) == []


# the denoisers and VAEs of the families whose model files are ours (text encoders load through transformers)
OWN = [(f, u) for f, u in CASES if getattr(get_family(u[0]), "key_maps", None) and u[2] != "text_encoder"]


@pytest.mark.parametrize(("file", "use"), OWN, ids=[f"{f}:{'/'.join(u)}" for f, u in OWN])
def test_released_layout_loads_through_the_family_key_map(file: str, use: tuple[str, str, str]) -> None:
    """The route a user's `pretrained:` release takes (the family's key map, then `load_published`, which fails on
    any missing, unexpected or mis-shaped key), fed a state dict of the release's names and shapes (meta tensors)."""
    family, variant, component = use
    model = _built(family, variant)[component]
    key_map = get_family(family).key_maps[type(model)]
    released = {
        k: torch.empty(shape, device="meta")
        for k, shape in next(t for t in TABLES if t["file"] == file)["keys"].items()
    }
    assert load_published(model, released, key_map).clean
