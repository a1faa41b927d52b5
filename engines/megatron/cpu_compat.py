"""What megatron-core (0.16.x) needs to run on CPU ranks: tests and CPU runs only.

megatron-core assumes CUDA in a handful of places. `apply()` patches exactly those, and only when the
process has no CUDA device (a GPU or NPU run never loads this module's patches). Each patch names the
upstream lines it covers (paths under megatron/core/), so it can be dropped when upstream stops
hard-coding the device.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator

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
    _APPLIED = True
