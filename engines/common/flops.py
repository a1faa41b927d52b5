"""Model FLOPs utilisation: achieved training FLOPs over the device's peak.

MFU = (FLOPs one training step needs by the model's arithmetic) / (step time x peak FLOPS x ranks).
It counts model FLOPs, not hardware FLOPs: recomputed activations (activation checkpointing) do not
raise it, which is what makes runs with different memory tricks comparable.

Per token of a transformer: 6 x params (forward 2, backward 4, for every weight matmul) plus the
attention score/value matmuls, 12 x layers x hidden x sequence length (PaLM appendix B, the
estimate Megatron-LM and torchtitan report). A family whose denoiser is not a plain transformer
stack (a UNet) gets the 6N term only, which undercounts convolutions; say so rather than guess.
"""

from __future__ import annotations

from typing import Any

import torch
from flowspeed.engines.common.device import device_name

# Dense (no sparsity) peak TFLOPS per device, by dtype. Sources: NVIDIA H100 SXM and H200 datasheets
# (989 bf16 / 67 fp32 non-tensor), NVIDIA A100 datasheet (312 bf16 / 19.5 fp32), Huawei Atlas 800T A2
# (Ascend 910B: 313 fp16/bf16 is the commonly cited figure; SKUs differ, so set train.peak_tflops for
# yours). Matched by substring of the device name, most specific first.
PEAK_TFLOPS: dict[str, dict[str, float]] = {
    "H200": {"bfloat16": 989.0, "float32": 67.0},
    "H100 PCIe": {"bfloat16": 756.0, "float32": 51.0},
    "H100": {"bfloat16": 989.0, "float32": 67.0},
    "A100": {"bfloat16": 312.0, "float32": 19.5},
    "910B": {"bfloat16": 313.0, "float32": 78.0},
}


def peak_tflops(device: torch.device, dtype: str, override: float | None = None) -> float | None:
    """The device's peak for the training dtype; None on CPU or an unknown device (MFU is n/a)."""
    if override is not None:
        return override
    name = device_name(device)  # a CPU's name matches no entry
    for key, peaks in PEAK_TFLOPS.items():
        if key in name:
            return peaks[dtype]
    return None


def _get(cfg: Any, *names: str) -> Any:
    for n in names:
        v = cfg.get(n) if isinstance(cfg, dict) else getattr(cfg, n, None)
        if v is not None:
            return v
    return None


def attention_flops_per_token(model_config: Any, seq_len: int) -> float:
    """12 x layers x hidden x seq: QK^T and AV, forward + backward, for every token."""
    layers = _get(model_config, "num_layers", "num_hidden_layers")
    if layers is None:
        return 0.0
    layers += _get(model_config, "num_single_layers") or 0  # Flux's single-stream blocks attend too
    heads = _get(model_config, "num_attention_heads")
    head_dim = _get(model_config, "attention_head_dim", "head_dim")
    hidden = _get(model_config, "hidden_size") or (heads * head_dim if heads and head_dim else None)
    if hidden is None:
        return 0.0
    return 12.0 * layers * hidden * seq_len


def train_flops(n_params: int, model_config: Any, tokens_per_sample: int, samples: int) -> float:
    """Model FLOPs of one optimizer step over `samples` samples of `tokens_per_sample` tokens each."""
    per_token = 6.0 * n_params + attention_flops_per_token(model_config, tokens_per_sample)
    return per_token * tokens_per_sample * samples


def mfu(flops: float, step_s: float, peak: float | None, ranks: int) -> float | None:
    if peak is None or step_s <= 0:
        return None
    return flops / (step_s * peak * 1e12 * ranks)
