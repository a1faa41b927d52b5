"""The megatron VLM checks share their processes: one 1-process spawn and one 2-rank spawn run both the logits parity
(test_megatron_vlm.py) and the packed-vs-padded parity (test_megatron_packing.py), since starting a rank (torch,
transformers and megatron-core imports) costs far more than the tiny models' work."""

from __future__ import annotations

from typing import Any

import pytest

from tests.distributed import run_ranks


def vlm_jobs(rank: int, world: int) -> dict[str, Any]:
    """Every VLM check of one rank: transformers' logits (without and, on 2 ranks, with sequence parallelism) and
    the packing runs."""
    from tests.engines.megatron.test_megatron_packing import packing_jobs
    from tests.engines.megatron.test_megatron_vlm import _all_logits

    return {"logits": _all_logits(rank, world, [False] if world == 1 else [False, True]),
            "packing": packing_jobs(rank, world)}  # fmt: skip


class _Spawns(dict):
    """world size -> each rank's `vlm_jobs` results, spawned the first time a test asks for that world size."""

    def __missing__(self, world: int) -> list[dict[str, Any]]:
        self[world] = run_ranks(vlm_jobs, world)
        return self[world]


@pytest.fixture(scope="session")
def vlm_ranks() -> _Spawns:
    return _Spawns()
