"""GPU slots: training holds slots of a Prefect global concurrency limit while it runs.

The limit is named per node (`gpu-<hostname>`) or per GPU pool (`train.gpu_slots.name`), so two
deployments scheduled at the same hour on one node queue one behind the other instead of both
starting torchrun on the same devices. The limit lives in the Prefect server, visible and resizable
in the UI (Concurrency -> Global); flowspeed creates it on first use, sized to the node's devices.
A waiting run frees the slots of holders that died (SIGKILL, OOM killer) and says whom it waits for.
"""

from __future__ import annotations

import logging
import os
import socket
import sys
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from uuid import UUID

from flowspeed.configs import PipelineConfig
from flowspeed.configs.schema import GpuSlotsConfig
from flowspeed.engines.common.device import resolve_device
from flowspeed.tasks import gpu_slot_holders as slot_holders
from flowspeed.tasks.embedded_prefect import MARKER as EMBEDDED_API
from prefect.client.orchestration import get_client
from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate, GlobalConcurrencyLimitUpdate
from prefect.client.schemas.objects import ConcurrencyLeaseHolder
from prefect.concurrency.sync import concurrency
from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound
from prefect.logging import get_logger
from prefect.settings import get_current_settings

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
    with ExitStack() as stack:
        _acquire(stack, name, occupy, size, g)
        mine = slot_holders.record(name, occupy)
        stack.callback(mine.unlink, missing_ok=True)
        log.info("holding %d slot(s) of %s", occupy, name)
        yield name


def _acquire(stack: ExitStack, name: str, occupy: int, size: int, g: GpuSlotsConfig) -> None:
    """Ask for the slots in rounds of `poll_s`: between rounds, free what dead holders kept and say who
    is being waited for, so a queued run is never silent and never stuck behind a killed one."""
    start = time.monotonic()
    with _quiet_round_timeouts():
        _acquire_rounds(stack, name, occupy, size, g, start)


def _acquire_rounds(stack: ExitStack, name: str, occupy: int, size: int, g: GpuSlotsConfig, start: float) -> None:
    while True:
        waited = time.monotonic() - start
        if g.timeout_s is not None and waited >= g.timeout_s:
            raise TimeoutError(
                f"gave up after {waited:.0f} s waiting for {occupy} slot(s) of the global concurrency limit {name} "
                f"(size {size}), {_holders_text(name)}. Raise train.gpu_slots.timeout_s, or free the slots "
                f"(Prefect UI: Concurrency -> Global, or `prefect gcl update {name} --active-slots 0`)"
            )
        round_s = g.poll_s if g.timeout_s is None else min(g.poll_s, g.timeout_s - waited)
        holder = ConcurrencyLeaseHolder(type="task_run", id=rid) if (rid := _task_run_id()) else None
        try:
            # strict: a limit deleted between ensure_limit and here is an error, not a silent free-for-all.
            stack.enter_context(concurrency(name, occupy=occupy, timeout_seconds=round_s,
                                            lease_duration=g.lease_s, strict=True, holder=holder))  # fmt: skip
            return
        except TimeoutError:
            pass
        freed = _release_dead_holders(name)
        if not freed:
            limit_text = g.timeout_s or "none (waits while the holder lives)"
            _say(f"waiting {time.monotonic() - start:.0f} s for {occupy} slot(s) of {name} (size {size}), "
                 f"{_holders_text(name)}; train.gpu_slots.timeout_s: {limit_text}")  # fmt: skip


def _release_dead_holders(name: str) -> bool:
    """Give back the slots of holders whose process on this node is gone. Against the ephemeral API the
    slots are decremented here (nobody else ever would); a real server's repossessor frees them when
    the dead holder's lease runs out, so there only the record goes."""
    freed = False
    url = (
        get_current_settings().api.url
    )  # flowspeed's embedded API (flowspeed.tasks.embedded_prefect) is the ephemeral one
    ephemeral = url is None or url == os.environ.get(EMBEDDED_API)
    for path, h in slot_holders.read_holders(name):
        if h.is_alive() or not slot_holders.claim(path):
            continue
        if ephemeral:
            with get_client(sync_client=True) as client:
                client.release_concurrency_slots([name], h.occupy, occupancy_seconds=time.time() - h.since)
            _say(f"released {h.occupy} slot(s) of {name} kept by a dead process: {h.describe()}")
        else:
            _say(f"the holder of {name} is dead: {h.describe()}; the server frees its slots when its lease expires")
        freed = True
    return freed


def _holders_text(name: str) -> str:
    holders = [h for _, h in slot_holders.read_holders(name)]
    if not holders:
        return "held by a run on another node or one that flowspeed did not start (see the Prefect UI)"
    return "held by " + "; ".join(h.describe() for h in holders)


@contextmanager
def _quiet_round_timeouts() -> Iterator[None]:
    """Prefect logs every timed-out acquisition as an ERROR with a traceback; here a round ending is
    expected, and the waiting message says what matters."""

    def keep(rec: logging.LogRecord) -> bool:
        msg = rec.getMessage()
        return not ("ConcurrencySlotAcquisition" in msg and "TimeoutError" in msg)

    logger = logging.getLogger("prefect._internal.concurrency")
    logger.addFilter(keep)
    try:
        yield
    finally:
        logger.removeFilter(keep)


def _task_run_id() -> UUID | None:
    from prefect.context import TaskRunContext

    ctx = TaskRunContext.get()
    return ctx.task_run.id if ctx else None


def _say(message: str) -> None:
    """The CLI keeps Prefect's console logs at CRITICAL, so a waiting run would look hung: write to
    stderr as well as to the Prefect log (which the UI shows)."""
    log.warning(message)
    print(f"flowspeed: {message}", file=sys.stderr, flush=True)
