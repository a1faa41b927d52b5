"""Training takes slots of a per-node Prefect global concurrency limit: runs on one node queue."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
from prefect.client.orchestration import get_client

from tasks.gpu_slots import gpu_slots, slot_name
from tests.conftest import make_config


def _limit(name: str) -> int:
    with get_client(sync_client=True) as client:
        return client.read_global_concurrency_limit_by_name(name).limit


def test_two_trainings_on_one_node_do_not_overlap(tmp_path: Path, demo_manifest: Path) -> None:
    cfg = make_config(tmp_path, demo_manifest, "train.gpu_slots.name=gpu-test-node-a")
    spans: list[tuple[float, float]] = []

    def train_like() -> None:
        with gpu_slots(cfg):
            start = time.monotonic()
            time.sleep(1.0)
            spans.append((start, time.monotonic()))

    with get_client(sync_client=True) as client:  # the ephemeral API starts once, as inside a flow run
        client.hello()
    threads = [threading.Thread(target=train_like) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert len(spans) == 2
    (a0, a1), (b0, b1) = sorted(spans)
    assert b0 >= a1, f"both held the node's only slot at once: {spans}"
    assert _limit("gpu-test-node-a") == 1  # created on first use, one slot on a CPU node


def test_size_comes_from_config_and_an_impossible_request_says_so(tmp_path: Path, demo_manifest: Path) -> None:
    cfg = make_config(tmp_path, demo_manifest, "train.gpu_slots.name=gpu-test-pool-b", "train.gpu_slots.size=2",
                      "train.gpu_slots.occupy=2")  # fmt: skip
    with gpu_slots(cfg) as name:
        assert name == "gpu-test-pool-b" and _limit(name) == 2
    too_many = make_config(tmp_path, demo_manifest, "train.gpu_slots.name=gpu-test-pool-b", "train.gpu_slots.occupy=3")
    with pytest.raises(ValueError, match=r"needs 3 slot\(s\).*which has 2.*train.gpu_slots.size"):
        with gpu_slots(too_many):
            pass
    assert slot_name(make_config(tmp_path, demo_manifest)).startswith("gpu-")
    off = make_config(tmp_path, demo_manifest, "train.gpu_slots.enabled=false")
    with gpu_slots(off) as name:
        assert name is None
