"""Step caching while sampling (`eval.cache`): diffusers' cache hooks on each denoiser a `generate` loads.

Why: most of a video sample's time is its denoiser's steps, and neighbouring steps compute nearly the same thing.
diffusers ships hooks that reuse earlier steps' work — First Block Cache (skip the remaining blocks when the first
block's residual barely changed) and TaylorSeer (predict blocks' outputs from a Taylor expansion over the last full
steps) — behind `CacheMixin.enable_cache`. They are applied through `SamplingSetup.extra`, after the parallel hooks,
so every family's `generate` runs unchanged. The price is quality, so the eval measures it on its own samples
(evaluation/generation_eval.py): `step_cache_off` makes the same samples without the cache and `denoiser_seconds`
times both runs' denoiser calls.

Supported: diffusers denoisers that are `CacheMixin` (their pipelines enter the `cache_context` the hooks key their
state by, and reset it after each call). Our own DiTs (OpenSora, OpenSoraPlan, ...) sample in their own loop with
blocks diffusers' hooks do not know: refused with the families that work. Pyramid Attention Broadcast and FasterCache
need the pipeline's current timestep, which a denoiser-level setup does not see, and MagCache needs per-checkpoint
ratios: not offered.

Under eval.parallel the First Block Cache decision (skip or compute) is reduced over the sample's cfg and cp ranks:
each rank holds a piece of the batch or sequence, and ranks deciding differently would leave a context-parallel
collective waiting forever. TaylorSeer decides by step count, the same on every rank.
"""

from __future__ import annotations

import logging
import time
import types
import weakref
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import torch
import torch.distributed as dist
from flowspeed.configs.schema import EvalCacheConfig
from flowspeed.engines.models.registry import paired_guidance_checks
from torch import nn

log = logging.getLogger(__name__)

_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
#: the modules TaylorSeer predicts: every block's attention. diffusers' default (`^transformer_blocks.*attn`, matched
#: whole) names only a module called `attn`, so it hooks nothing on CogVideoX or Wan, whose attention is attn1/attn2
TAYLORSEER_MODULES = (r"(single_|temporal_)?(transformer_)?blocks\.\d+\.attn\d*",)

#: every denoiser `apply_step_cache` set up in this process, with the call that (re)enables its cache
_CACHED: weakref.WeakKeyDictionary[nn.Module, Callable[[], None]] = weakref.WeakKeyDictionary()
_OFF = 0  # > 0 inside `step_cache_off`: a denoiser loaded there is registered but left uncached until it exits
_TIMERS: list[list[float]] = []  # active `denoiser_seconds` accumulators


def diffusers_config(section: EvalCacheConfig) -> Any:
    """The diffusers cache config for `eval.cache` (None for method none)."""
    from diffusers.hooks import FirstBlockCacheConfig, TaylorSeerCacheConfig

    if section.method == "first_block":
        return FirstBlockCacheConfig(threshold=section.threshold)
    if section.method == "taylorseer":
        return TaylorSeerCacheConfig(
            cache_interval=section.cache_interval,
            disable_cache_before_step=section.warmup_steps,
            disable_cache_after_step=section.cooldown_step,
            max_order=section.max_order,
            taylor_factors_dtype=_DTYPES[section.factors_dtype],
            cache_identifiers=list(TAYLORSEER_MODULES),
        )
    if section.method == "none":
        return None
    raise ValueError(f"eval.cache: unknown method {section.method!r}")


def apply_step_cache(
    model: nn.Module, section: EvalCacheConfig, groups: Mapping[str, dist.ProcessGroup] | None = None
) -> None:
    """In place: `section`'s cache on `model` (nothing for method none). `groups`: the process groups one sample is
    split over (cfg, cp), whose ranks must take the same First Block Cache decisions."""
    if not section.on:
        return
    from diffusers.models.cache_utils import CacheMixin

    if not isinstance(model, CacheMixin):
        raise ValueError(
            f"eval.cache: {type(model).__name__} has no diffusers step cache (not a CacheMixin denoiser); the families "
            "whose denoisers take one: cogvideox, cogvideox1.5, cogvideox_i2v, flux, hunyuanvideo, hunyuanvideo15, "
            "ltx, wan, wan_i2v. Set eval.cache.method: none for this family"
        )
    config = diffusers_config(section)
    groups = {k: g for k, g in (groups or {}).items() if dist.get_world_size(g) > 1}

    def enable() -> None:
        model.enable_cache(config)
        _context_parallel_outermost(model)
        if groups and section.method == "first_block":
            _sync_first_block(model, groups)

    enable()
    if not _hooked(model):
        model.disable_cache()
        raise ValueError(
            f"eval.cache: {section.method} found no module of {type(model).__name__} to cache (no transformer block "
            "or block attention diffusers' hooks know): use another method or eval.cache.method: none"
        )
    if _OFF:
        model.disable_cache()
    _CACHED[model] = enable
    model.register_forward_pre_hook(_start_timer)
    model.register_forward_hook(_stop_timer)
    log.info("eval.cache: %s on %s", section.describe(), type(model).__name__)


def sampling_extra(section: EvalCacheConfig, mesh: Any | None) -> Callable[[nn.Module], None] | None:
    """What `SamplingSetup(extra=...)` takes for `section` on this job's (dp, cfg, cp) mesh: None without a cache.
    For the eval and a served generation alike."""
    if not section.on:
        return None
    groups = {} if mesh is None else {name: mesh[name].get_group() for name in ("cfg", "cp") if mesh[name].size() > 1}
    return lambda model: apply_step_cache(model, section, groups)


def _context_parallel_outermost(model: nn.Module) -> None:
    """Re-register diffusers' context-parallel hooks that share a module with a cache hook, so they wrap it. A CP plan
    splits the sequence at a block's inputs (CogVideoX's and Wan's first block); a cache hook registered later would
    wrap the split and compare the block's full input with its sharded output."""
    for module in model.modules():
        registry = getattr(module, "_diffusers_hook", None)
        if registry is None:
            continue
        order = list(registry._hook_order)
        cp = [n for n in order if n.startswith(("cp_input---", "cp_output---"))]
        if not cp or len(cp) == len(order):
            continue
        hooks = {n: registry.get_hook(n) for n in order}
        # all off, outermost first, then on again: diffusers' remove_hook of an inner hook under one that replaces the
        # forward (the cache's `new_forward`) would unlink the outer one
        for name in reversed(order):
            registry.remove_hook(name, recurse=False)
        for name in [n for n in order if n not in cp] + cp:
            registry.register_hook(hooks[name], name)


def _hooked(model: nn.Module) -> int:
    """How many of `model`'s modules carry a diffusers step-cache hook."""
    from diffusers.hooks.first_block_cache import _FBC_BLOCK_HOOK, _FBC_LEADER_BLOCK_HOOK
    from diffusers.hooks.taylorseer_cache import _TAYLORSEER_CACHE_HOOK

    names = (_FBC_LEADER_BLOCK_HOOK, _FBC_BLOCK_HOOK, _TAYLORSEER_CACHE_HOOK)
    registries = [r for m in model.modules() if (r := getattr(m, "_diffusers_hook", None)) is not None]
    return sum(any(r.get_hook(n) is not None for n in names) for r in registries)


def _sync_first_block(model: nn.Module, groups: Mapping[str, dist.ProcessGroup]) -> None:
    """Every First Block Cache head hook of `model` decides on the residual change summed over `groups`' ranks:
    the ratio of sums is the one-process ratio of means whether a rank holds a slice or a whole copy of the batch."""
    from diffusers.hooks.first_block_cache import _FBC_LEADER_BLOCK_HOOK

    def decide(hook: Any, residual: torch.Tensor) -> bool:
        state = hook.state_manager.get_state()
        if state.head_block_residual is None:  # the same on every rank: their decisions so far were the same
            return True
        prev = state.head_block_residual
        sums = torch.stack([(residual - prev).abs().sum(), prev.abs().sum()]).float()
        # A pair-guided pipeline's cfg ranks compute different calls (conditional / unconditional, each its own cache
        # context, engines/torch_engine/sampling.py `_Pairs`): their decisions stay their own, as in one process.
        paired = paired_guidance_checks() is not None
        for name, group in groups.items():
            if paired and name == "cfg":
                continue
            dist.all_reduce(sums, group=group)
        return bool((sums[0] / sums[1]).item() > hook.threshold)

    for module in model.modules():
        registry = getattr(module, "_diffusers_hook", None)
        hook = registry.get_hook(_FBC_LEADER_BLOCK_HOOK) if registry is not None else None
        if hook is not None:
            hook._should_compute_remaining_blocks = types.MethodType(decide, hook)


@contextmanager
def step_cache_off() -> Iterator[None]:
    """Inside, every denoiser `apply_step_cache` set up (or sets up, when loaded inside) samples without its cache;
    on exit the caches are back. The eval makes its comparison samples here from the very same loaded denoiser."""
    global _OFF
    for model in list(_CACHED):
        if model.is_cache_enabled:
            model.disable_cache()
    _OFF += 1
    try:
        yield
    finally:
        _OFF -= 1
        if not _OFF:
            for model, enable in list(_CACHED.items()):
                if not model.is_cache_enabled:
                    enable()


@contextmanager
def denoiser_seconds() -> Iterator[list[float]]:
    """Inside, the wall seconds of every call of a step-cached denoiser add up in the yielded one-item list: what the
    cache speeds up, without loading, text encoding and decoding (which it does not touch). The device is
    synchronised around each call, so the seconds are the device's."""
    total = [0.0]
    _TIMERS.append(total)
    try:
        yield total
    finally:
        _TIMERS.remove(total)


def _sync(module: nn.Module) -> None:
    param = next(module.parameters(), None)
    if param is not None and param.device.type == "cuda":
        torch.cuda.synchronize(param.device)


def _start_timer(module: nn.Module, args: tuple) -> None:
    if _TIMERS:
        _sync(module)
        module._flowspeed_step_cache_t0 = time.perf_counter()


def _stop_timer(module: nn.Module, args: tuple, output: Any) -> None:
    t0 = getattr(module, "_flowspeed_step_cache_t0", None)
    if _TIMERS and t0 is not None:
        _sync(module)
        for total in _TIMERS:
            total[0] += time.perf_counter() - t0
        module._flowspeed_step_cache_t0 = None
