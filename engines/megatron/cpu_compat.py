"""What megatron-core (0.16.x) needs to run on CPU ranks: tests and CPU runs only.

megatron-core assumes CUDA in a handful of places. `apply()` patches exactly those, and only when the
process has no CUDA device (a GPU or NPU run never loads this module's patches). Each patch names the
upstream lines it covers (paths under megatron/core/), so it can be dropped when upstream stops
hard-coding the device.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import types
from collections.abc import Callable, Iterator
from typing import Any

import torch

_APPLIED = False


class CpuRNGStatesTracker:
    """tensor_parallel/random.py `CudaRNGStatesTracker` on the CPU generator.

    Upstream's tracker keeps named CUDA RNG states (`torch.cuda.get_rng_state`, `_set_cuda_rng_state`,
    random.py lines ~230-280) so TP ranks draw different dropout/init noise in `fork()`. Same contract
    here with `torch.get_rng_state` / `torch.set_rng_state`.
    """

    def __init__(self, *args: object, **kwargs: object) -> None:
        self.reset()

    def is_initialized(self) -> bool:
        return self._is_initialized

    def reset(self) -> None:
        self._is_initialized = False
        self.states_: dict[str, torch.Tensor] = {}
        self.seeds_: set[int] = set()

    def get_states(self) -> dict[str, torch.Tensor]:
        return {k: v.clone() for k, v in self.states_.items()}

    def set_states(self, states: dict[str, torch.Tensor]) -> None:
        self._is_initialized = True
        self.states_ = states

    def add(self, name: str, seed: int) -> None:
        self._is_initialized = True
        if seed in self.seeds_:
            raise RuntimeError(f"seed {seed} already exists")
        if name in self.states_:
            raise RuntimeError(f"rng state {name} already exists")
        self.seeds_.add(seed)
        outer = torch.get_rng_state()
        torch.manual_seed(seed)
        self.states_[name] = torch.get_rng_state()
        torch.set_rng_state(outer)

    @contextlib.contextmanager
    def fork(self, name: str = "model-parallel-rng") -> Iterator[None]:
        if name not in self.states_:
            raise RuntimeError(f"rng state {name} is not added")
        outer = torch.get_rng_state()
        torch.set_rng_state(self.states_[name])
        try:
            yield
        finally:
            self.states_[name] = torch.get_rng_state()
            torch.set_rng_state(outer)


@functools.lru_cache(maxsize=8)
def _cpu_causal_mask(sq: int) -> torch.Tensor:
    return torch.triu(torch.ones(sq, sq), diagonal=1).bool()


def _cpu_device(device: object) -> object:
    if device == "cuda" or (isinstance(device, torch.device) and device.type == "cuda"):
        return "cpu"
    return device


def _on_cpu(factory: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    @functools.wraps(factory)
    def make(*args: Any, **kwargs: Any) -> torch.Tensor:
        if "device" in kwargs:
            kwargs["device"] = _cpu_device(kwargs["device"])
        return factory(*args, **kwargs)

    return make


class _NoStream(contextlib.nullcontext):
    """Stands for a CUDA stream: CPU collectives are synchronous, so ordering between streams is moot."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__()

    def wait_stream(self, other: object) -> None:
        pass

    def synchronize(self) -> None:
        pass


_CPU_CUDA = types.SimpleNamespace(
    current_device=lambda: "cpu",
    synchronize=lambda *a, **k: None,
    empty_cache=lambda: None,
    is_available=lambda: False,
    Stream=_NoStream,
    stream=lambda s=None: contextlib.nullcontext(),
    current_stream=lambda *a, **k: _NoStream(),
    default_stream=lambda *a, **k: _NoStream(),
    nvtx=types.SimpleNamespace(range_push=lambda *a, **k: None, range_pop=lambda *a, **k: None),
)


class _CpuTorch(types.ModuleType):
    """The `torch` a megatron-core module sees on CPU ranks: tensor factories given device="cuda" make CPU
    tensors, and `torch.cuda.*` queries answer for the CPU. Everything else is torch itself."""

    _FACTORIES = ("zeros", "ones", "empty", "tensor", "full", "arange", "randn", "rand", "zeros_like",
                  "empty_like", "ones_like")  # fmt: skip

    def __init__(self) -> None:
        super().__init__("torch")
        for name in self._FACTORIES:
            setattr(self, name, _on_cpu(getattr(torch, name)))
        self.cuda = _CPU_CUDA

    def __getattr__(self, name: str) -> Any:
        return getattr(torch, name)


# Modules whose functions write `device="cuda"`, `torch.cuda.current_device()`, `torch.cuda.synchronize()`
# or CUDA streams inline (megatron-core 0.16.1):
# - pipeline_parallel/schedules.py: `total_num_tokens = torch.zeros([], ..., device="cuda")` in every schedule;
# - pipeline_parallel/p2p_communication.py: shape exchange and receive buffers on
#   `torch.cuda.current_device()`, `torch.cuda.synchronize()` after batched isend/irecv;
# - distributed/distributed_data_parallel.py: `torch.cuda.Stream` for overlapped communication;
# - distributed/param_and_grad_buffer.py: `torch.cuda.stream`/`default_stream` around bucket reductions and
#   `torch.zeros(..., device="cuda")` buffers;
# - distributed/finalize_model_grads.py: the token-count and embedding-grad reductions;
# - optimizer/clip_grads.py: `torch.tensor([...], device='cuda')` norms and the overflow buffer;
# - optimizer/optimizer.py, optimizer/distrib_optimizer.py: found-inf / grad-norm tensors on CUDA;
# - tensor_parallel/data.py: `broadcast_data` buffers;
# - utils.py: `local_multi_tensor_l2_norm` / `local_multi_tensor_scale` (the no-Apex grad-norm and clip path)
#   put their results on `device="cuda"`;
# - dist_checkpointing/strategies/{filesystem_async,state_dict_saver,async_utils}.py and exchange_utils.py:
#   `torch.cuda.synchronize()` before writing, result/verification flags on CUDA, exchange buffers with
#   `device="cuda"`.
_DEVICE_MODULES = (
    "megatron.core.pipeline_parallel.schedules",
    "megatron.core.pipeline_parallel.p2p_communication",
    "megatron.core.pipeline_parallel.utils",
    "megatron.core.distributed.distributed_data_parallel",
    "megatron.core.distributed.param_and_grad_buffer",
    "megatron.core.distributed.finalize_model_grads",
    "megatron.core.optimizer.clip_grads",
    "megatron.core.optimizer.optimizer",
    "megatron.core.optimizer.distrib_optimizer",
    "megatron.core.tensor_parallel.data",
    "megatron.core.utils",
    "megatron.core.dist_checkpointing.strategies.filesystem_async",
    "megatron.core.dist_checkpointing.strategies.state_dict_saver",
    "megatron.core.dist_checkpointing.strategies.async_utils",
    "megatron.core.dist_checkpointing.exchange_utils",
)


@contextlib.contextmanager
def _cuda_type_names() -> Iterator[None]:
    """optimizer/distrib_optimizer.py (`model_param.type() == 'torch.cuda.FloatTensor'`, lines ~361-436 and
    ~582) and optimizer/clip_grads.py (`assert param.grad.type() == 'torch.cuda.FloatTensor'`, line ~167)
    classify parameters by their CUDA type name; inside this context a CPU tensor reports the CUDA name
    of its dtype."""
    original = torch.Tensor.type

    def type_(self: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        name = original(self, *args, **kwargs)
        plain = not args and not kwargs and isinstance(name, str) and name.startswith("torch.")
        if plain and self.device.type == "cpu":
            return name.replace("torch.", "torch.cuda.", 1)
        return name

    torch.Tensor.type = type_  # type: ignore[method-assign]
    try:
        yield
    finally:
        torch.Tensor.type = original  # type: ignore[method-assign]


def _with_cuda_type_names(fn: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(fn)
    def wrapped(*args: Any, **kwargs: Any) -> Any:
        with _cuda_type_names():
            return fn(*args, **kwargs)

    return wrapped


def apply() -> None:
    """Install the patches once per process; a no-op where CUDA is available."""
    global _APPLIED
    if _APPLIED or torch.cuda.is_available():
        return
    import megatron.core.fusions.fused_softmax as fused_softmax
    import megatron.core.tensor_parallel.random as tp_random
    import megatron.core.transformer.utils as transformer_utils

    # models/common/embeddings/rotary_pos_embedding.py `get_emb` (`.to(device=torch.cuda.current_device())`),
    # utils.py `GlobalMemoryBuffer.get_tensor`, tensor_parallel/layers.py backward buffers: every "the
    # current device" query becomes this process's only device.
    torch.cuda.current_device = lambda: "cpu"  # type: ignore[assignment]
    # transformer/utils.py `get_default_causal_mask` (`torch.ones(sq, sq, device="cuda")`), also imported
    # by name into fusions/fused_softmax.py.
    transformer_utils.get_default_causal_mask = _cpu_causal_mask
    fused_softmax.get_default_causal_mask = _cpu_causal_mask
    # tensor_parallel/random.py `get_cuda_rng_tracker` / `model_parallel_cuda_manual_seed`: the tracker
    # class it instantiates keeps CUDA generator states.
    tp_random.CudaRNGStatesTracker = CpuRNGStatesTracker  # type: ignore[misc]
    tp_random._CUDA_RNG_STATE_TRACKER = CpuRNGStatesTracker()
    tp_random._CUDA_RNG_STATE_TRACKER_INITIALIZED = True
    # tensor_parallel/random.py `_get_cuda_rng_state` / `_set_cuda_rng_state` (lines ~41-110), which full
    # recomputation (`CheckpointFunction`, `_get_all_rng_states`) uses to replay a layer's forward with the
    # same random draws: on CPU the only generator is the CPU one.
    tp_random._get_cuda_rng_state = lambda *args, **kwargs: torch.get_rng_state()
    tp_random._set_cuda_rng_state = lambda state, *args, **kwargs: torch.set_rng_state(state)
    cpu_torch = _CpuTorch()
    for name in _DEVICE_MODULES:
        importlib.import_module(name).torch = cpu_torch
    import megatron.core.optimizer.clip_grads as clip_grads
    import megatron.core.optimizer.distrib_optimizer as distrib_optimizer

    dist_opt = distrib_optimizer.DistributedOptimizer
    dist_opt.__init__ = _with_cuda_type_names(dist_opt.__init__)
    # optimizer/distrib_optimizer.py `get_parameter_state_dp_zero` (line ~1089): the reshardable checkpoint
    # format gathers optimizer state with `use_gloo_comm=False`, i.e. `send_tensor.cuda()`; on CPU ranks
    # the gloo path is the only one.
    gather_state = dist_opt.get_parameter_state_dp_zero

    def get_parameter_state_dp_zero(self: Any, use_gloo_comm: bool = True, **kwargs: Any) -> Any:
        return gather_state(self, use_gloo_comm=True, **kwargs)

    dist_opt.get_parameter_state_dp_zero = get_parameter_state_dp_zero
    # optimizer/distrib_optimizer.py `_set_main_param_and_optimizer_states` (line ~940) copies every key of the
    # optimizer's per-parameter state from the loaded tensors, but `load_parameter_state_from_fully_reshardable`
    # (line ~2101) leaves out torch Adam's per-parameter "step" (restored from the common state instead):
    # with torch's AdamW, the optimizer used where neither Apex nor Transformer Engine is, that is a KeyError.
    set_states = dist_opt._set_main_param_and_optimizer_states

    def _set_main_param_and_optimizer_states(self: Any, model_param: Any, tensors: dict) -> None:
        if "step" not in tensors and not self.config.use_precision_aware_optimizer_no_fp8_or_ds_fp8:
            group, order = self.model_param_group_index_map[model_param]
            own = self.optimizer.state[self.optimizer.param_groups[group]["params"][order]]
            if "step" in own:
                tensors = {**tensors, "step": own["step"]}  # copied onto itself: left as the common state set it
        set_states(self, model_param, tensors)

    dist_opt._set_main_param_and_optimizer_states = _set_main_param_and_optimizer_states
    # optimizer/distrib_optimizer.py `load_state_dict` (lines ~818-825), the same torch-AdamW path: every
    # parameter's "step" is set to ONE shared tensor, which torch's Adam then increments in place once per
    # parameter per step, so bias correction runs far ahead after a resume. Each parameter gets its own copy.
    load_state = dist_opt.load_state_dict

    def load_state_dict(self: Any, state_dict: dict) -> None:
        load_state(self, state_dict)
        for state in self.optimizer.state.values():
            if isinstance(state.get("step"), torch.Tensor):
                state["step"] = state["step"].clone()

    dist_opt.load_state_dict = load_state_dict
    clip_grads.clip_grad_by_total_norm_fp32 = _with_cuda_type_names(clip_grads.clip_grad_by_total_norm_fp32)
    import megatron.core.optimizer.optimizer as optimizer_mod  # imports the function by name

    if hasattr(optimizer_mod, "clip_grad_by_total_norm_fp32"):
        optimizer_mod.clip_grad_by_total_norm_fp32 = clip_grads.clip_grad_by_total_norm_fp32
    # optimizer/optimizer.py `Float16OptimizerWithFloat16Params.__init__` (lines ~671-700, bf16 training):
    # the same CUDA type-name classification of parameters.
    fp16_opt = optimizer_mod.Float16OptimizerWithFloat16Params
    fp16_opt.__init__ = _with_cuda_type_names(fp16_opt.__init__)
    _APPLIED = True
