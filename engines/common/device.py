"""Device and distributed setup in one place: the same code on CUDA, Ascend NPU or CPU."""

from __future__ import annotations

import importlib.util
import os
from datetime import timedelta

import torch
import torch.distributed as dist


def npu_available() -> bool:
    if importlib.util.find_spec("torch_npu") is None:
        return False
    import torch_npu  # noqa: F401  (registers the "npu" device with torch)

    return bool(torch.npu.is_available())  # type: ignore[attr-defined]


def resolve_device(name: str = "auto", local_rank: int | None = None) -> torch.device:
    """`auto` picks cuda, then npu, then cpu; a rank gets its local accelerator."""
    idx = local_rank if local_rank is not None else int(os.environ.get("LOCAL_RANK", 0))
    if name == "auto":
        if torch.cuda.is_available():
            name = "cuda"
        elif npu_available():
            name = "npu"
        else:
            name = "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("device cuda was requested but torch sees no CUDA device; use device: auto or cpu")
    if name == "npu" and not npu_available():
        raise ValueError("device npu was requested but torch_npu is not installed (pip install flowspeed[npu])")
    if name in ("cuda", "npu"):
        return torch.device(name, idx)
    return torch.device(name)


def dist_backend(device: torch.device) -> str:
    return {"cuda": "nccl", "npu": "hccl"}.get(device.type, "gloo")


def init_process_group(
    device: torch.device | None = None, timeout_s: float = 1800, *, backend: str | None = None, alone: bool = False
) -> bool:
    """Join this job's process group, the one way every stage does it (training, eval, prep).

    The backend follows the device (NCCL, HCCL, gloo) unless `backend` names one (prep's ranks meet only
    at barriers and use gloo whatever the device); `timeout_s` bounds every collective, so a dead peer
    fails the job instead of hanging it. `alone`: a lone process outside torchrun gets a one-rank group
    (megatron-core needs one even then). A no-op when the group exists; True when this call made it.
    """
    if device is not None:
        set_current(device)  # before the group: NCCL/HCCL bind to the current device
    if dist.is_initialized():
        return False
    if alone:
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", "29511")
        os.environ.setdefault("RANK", "0")
        os.environ.setdefault("WORLD_SIZE", "1")
    name = backend or dist_backend(device if device is not None else torch.device("cpu"))
    dist.init_process_group(backend=name, timeout=timedelta(seconds=timeout_s))
    return True


def torch_dtype(name: str) -> torch.dtype:
    try:
        return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]
    except KeyError:
        raise ValueError(f"unknown dtype {name!r}; use float32, bfloat16 or float16") from None


def peak_memory_bytes(device: torch.device) -> int:
    """Peak accelerator memory, or this process's peak RSS on CPU."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    if device.type == "npu":
        return int(torch.npu.max_memory_allocated(device))  # type: ignore[attr-defined]
    import resource

    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def synchronize(device: torch.device) -> None:
    """Wait for queued kernels, so a timer around a region measures the region (no-op on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "npu":
        torch.npu.synchronize(device)  # type: ignore[attr-defined]


def set_current(device: torch.device) -> None:
    """Bind this process to its accelerator before the process group or any kernel touches it."""
    if device.type == "cuda":
        torch.cuda.set_device(device)
    elif device.type == "npu":
        torch.npu.set_device(device)  # type: ignore[attr-defined]


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    if device.type == "npu":
        return torch.npu.get_device_name(device)  # type: ignore[attr-defined]
    import platform

    return platform.processor() or platform.machine() or "cpu"


def profiler_module(device: torch.device):  # noqa: ANN201
    """torch.profiler, or torch_npu.profiler on Ascend (it records the NPU's own activities)."""
    if device.type == "npu":
        import torch_npu

        return torch_npu.profiler
    return torch.profiler


def profiler_activities(device: torch.device) -> list:
    prof = profiler_module(device)
    acts = [prof.ProfilerActivity.CPU]
    if device.type == "cuda":
        acts.append(prof.ProfilerActivity.CUDA)
    elif device.type == "npu":
        acts.append(prof.ProfilerActivity.NPU)
    return acts


def accelerator_rng_state() -> list[torch.Tensor] | None:
    """Every local accelerator's RNG state (for exact resume of dropout/noise drawn on device)."""
    if torch.cuda.is_available():
        return torch.cuda.get_rng_state_all()
    if npu_available():
        return torch.npu.get_rng_state_all()  # type: ignore[attr-defined]
    return None


def set_accelerator_rng_state(states: list[torch.Tensor]) -> None:
    if torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states)
    elif npu_available():
        torch.npu.set_rng_state_all(states)  # type: ignore[attr-defined]
