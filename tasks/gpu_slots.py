"""GPU slots: training holds slots of a Prefect global concurrency limit while it runs.

The limit is named per node (`gpu-<hostname>`) or per GPU pool (`train.gpu_slots.name`), so two
deployments scheduled at the same hour on one node queue one behind the other instead of both
starting torchrun on the same devices. The limit lives in the Prefect server, visible and resizable
in the UI (Concurrency -> Global); flowspeed creates it on first use, sized to the node's devices.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator
from contextlib import contextmanager

from prefect.client.orchestration import get_client
from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate, GlobalConcurrencyLimitUpdate
from prefect.concurrency.sync import concurrency
from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound
from prefect.logging import get_logger

from configs import PipelineConfig
from engines.device import resolve_device

log = get_logger("flowspeed.gpu_slots")


def slot_name(cfg: PipelineConfig) -> str:
    return cfg.train.gpu_slots.name or f"gpu-{socket.gethostname()}"


def node_devices(device: str) -> int:
    """Accelerators on this node: what a default-sized limit can hand out (1 for a CPU node)."""
    import torch

    kind = resolve_device(device).type
    if kind == "cuda":
        return max(torch.cuda.device_count(), 1)
    if kind == "npu":
        return max(torch.npu.device_count(), 1)  # type: ignore[attr-defined]  # torch_npu registers it
    return 1


def ensure_limit(name: str, size: int | None, default_size: int) -> int:
    """Create the limit if missing; resize it only when the config names a size. Returns its size."""
    with get_client(sync_client=True) as client:
        try:
            existing = client.read_global_concurrency_limit_by_name(name)
        except ObjectNotFound:
            limit = size or default_size
            try:
                client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=name, limit=limit))
                log.info("created the global concurrency limit %s with %d slot(s)", name, limit)
                return limit
            except ObjectAlreadyExists:  # another run on this node created it first
                existing = client.read_global_concurrency_limit_by_name(name)
        if size is not None and existing.limit != size:
            client.update_global_concurrency_limit(name, GlobalConcurrencyLimitUpdate(limit=size))
            return size
        if not existing.active:
            raise RuntimeError(f"the global concurrency limit {name} is inactive: it would not hold anything back. "
                               "Activate it in the Prefect UI or set train.gpu_slots.enabled=false")  # fmt: skip
        return existing.limit


@contextmanager
def gpu_slots(cfg: PipelineConfig) -> Iterator[str | None]:
    """Hold `occupy` slots of the node's limit for the duration of the block (waits while they are taken)."""
    g = cfg.train.gpu_slots
    if not g.enabled:
        yield None
        return
    name = slot_name(cfg)
    occupy = g.occupy or cfg.train.nproc_per_node
    size = ensure_limit(name, g.size, node_devices(cfg.train.device))
    if occupy > size:
        raise ValueError(
            f"training needs {occupy} slot(s) of the global concurrency limit {name}, which has {size}: it would "
            f"wait forever. Set train.gpu_slots.size (or resize it in the Prefect UI) to at least {occupy}, or "
            "lower train.gpu_slots.occupy / train.nproc_per_node"
        )
    log.info("waiting for %d slot(s) of %s (size %d)", occupy, name, size)
    # strict: a limit deleted between ensure_limit and here is an error, not a silent free-for-all.
    with concurrency(name, occupy=occupy, timeout_seconds=g.timeout_s, strict=True):
        log.info("holding %d slot(s) of %s", occupy, name)
        yield name
