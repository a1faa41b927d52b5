"""Llama- and Qwen2-style decoders as megatron-core `GPTModel`s, built from a Hugging Face config.

The layer spec is megatron-core's local one (`get_gpt_layer_local_spec`: torch RMSNorm, megatron's own
attention and tensor-parallel linears), which runs without Transformer Engine or Apex; on GPUs with
Transformer Engine installed, `layer_spec="te"` takes its fused modules instead. Both specs give the same
parameter names, so one converter (engines/megatron/convert.py) serves both.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F

SUPPORTED = ("llama", "qwen2", "mistral", "qwen2_vl", "qwen2_5_vl")  # qwen2_vl, qwen2_5_vl: their text decoders


@dataclass(frozen=True)
class DecoderShape:
    """The facts of a HF decoder config that fix the megatron layout (and the conversion)."""

    model_type: str
    num_layers: int
    hidden_size: int
    ffn_hidden_size: int
    num_heads: int
    num_query_groups: int
    head_dim: int
    vocab_size: int
    qkv_bias: bool
    tied_embeddings: bool
    rope_theta: float
    norm_eps: float
    max_positions: int
    #: Qwen2-VL's (and Qwen2.5-VL's) multimodal RoPE: rotary frequency pairs per (time, height, width) position id
    mrope_section: tuple[int, ...] | None = None

    @classmethod
    def from_hf(cls, config: Any) -> DecoderShape:
        """Llama / Mistral / Qwen2 configs (text decoders, or a VLM's `text_config`)."""
        config = getattr(config, "text_config", None) or config
        kind = config.model_type.removesuffix("_text")
        if kind not in SUPPORTED:
            raise ValueError(f"the megatron engine converts {', '.join(SUPPORTED)} decoders, not {config.model_type!r}")
        rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
        if rope.get("rope_type", "default") != "default":
            raise ValueError(f"rope scaling {rope} is not supported by the megatron engine yet")
        mrope = rope.get("mrope_section")
        heads = config.num_attention_heads
        return cls(
            model_type=kind,
            num_layers=config.num_hidden_layers,
            hidden_size=config.hidden_size,
            ffn_hidden_size=config.intermediate_size,
            num_heads=heads,
            num_query_groups=getattr(config, "num_key_value_heads", None) or heads,
            head_dim=getattr(config, "head_dim", None) or config.hidden_size // heads,
            vocab_size=config.vocab_size,
            qkv_bias=kind in ("qwen2", "qwen2_vl", "qwen2_5_vl") or bool(getattr(config, "attention_bias", False)),
            tied_embeddings=bool(getattr(config, "tie_word_embeddings", False)),
            rope_theta=float(rope.get("rope_theta") or getattr(config, "rope_theta", 10000.0)),
            norm_eps=float(config.rms_norm_eps),
            max_positions=int(config.max_position_embeddings),
            mrope_section=tuple(int(n) for n in mrope) if mrope else None,
        )


#: TransformerConfig fields every model here starts from: no dropout, and none of the fusions that need CUDA
#: kernels (speed-ups, not semantics), so one config builds on CPU ranks and GPUs alike.
NO_CUDA_FUSIONS: dict[str, Any] = {
    "attention_dropout": 0.0,
    "hidden_dropout": 0.0,
    "bias_dropout_fusion": False,
    "apply_rope_fusion": False,
    "masked_softmax_fusion": False,
    "gradient_accumulation_fusion": False,
    "persist_layer_norm": False,
    "use_cpu_initialization": True,
    "params_dtype": torch.float32,
}


def transformer_config(shape: DecoderShape, **parallel: Any) -> Any:
    """megatron-core's TransformerConfig for this decoder; `parallel` adds TP/PP/SP/recompute fields.

    Fusions that need CUDA kernels (bias-dropout, rope, masked softmax, gradient-accumulation) are off
    unless asked for: they are speed-ups, not semantics, and the same config must build on CPU ranks.
    """
    from megatron.core.transformer.transformer_config import TransformerConfig

    fields: dict[str, Any] = {
        "num_layers": shape.num_layers,
        "hidden_size": shape.hidden_size,
        "ffn_hidden_size": shape.ffn_hidden_size,
        "num_attention_heads": shape.num_heads,
        "num_query_groups": shape.num_query_groups,
        "kv_channels": shape.head_dim,
        "normalization": "RMSNorm",
        "layernorm_epsilon": shape.norm_eps,
        "gated_linear_unit": True,
        "activation_func": F.silu,
        "add_bias_linear": False,
        "add_qkv_bias": shape.qkv_bias,
        **NO_CUDA_FUSIONS,
    }
    if shape.mrope_section:
        fields["mrope_section"] = list(shape.mrope_section)
    fields.update(parallel)
    return TransformerConfig(**fields)


class TorchNorm:
    """The local spec's norm (torch RMSNorm / LayerNorm) that also serves sequence parallelism.

    megatron-core's `WrappedTorchNorm` refuses `sequence_parallel` because, under SP, each TP rank sees
    only its slice of the sequence, so a norm weight's gradient is a partial sum. Tagging the parameters
    `sequence_parallel=True` is how megatron marks exactly that: `finalize_model_grads` all-reduces such
    gradients across the TP group (what Transformer Engine's and Apex's norms get by the same tag).
    """

    def __new__(cls, config: Any, hidden_size: int, eps: float = 1e-5, **_: Any) -> torch.nn.Module:
        kind = torch.nn.RMSNorm if config.normalization == "RMSNorm" else torch.nn.LayerNorm
        norm = kind(hidden_size, eps=eps)
        for param in norm.parameters():
            param.sequence_parallel = config.sequence_parallel
        return norm


def local_block_spec(config: Any, vp_stage: int | None = None) -> Any:
    """The local layer spec for this stage's layers, with `TorchNorm` in every norm (final one included)."""
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer.transformer_block import TransformerBlockSubmodules, get_num_layers_to_build

    layer = get_gpt_layer_local_spec(normalization=config.normalization)
    layer.submodules.input_layernorm = TorchNorm
    layer.submodules.pre_mlp_layernorm = TorchNorm
    n = get_num_layers_to_build(config, vp_stage=vp_stage)
    return TransformerBlockSubmodules(layer_specs=[layer] * n, layer_norm=TorchNorm)


def build_gpt(
    shape: DecoderShape,
    config: Any,
    *,
    pre_process: bool = True,
    post_process: bool = True,
    vp_stage: int | None = None,
    layer_spec: Literal["local", "te"] = "local",
    parallel_output: bool = True,
) -> Any:
    """One pipeline stage (or the whole model) of the decoder, on this rank's TP shard."""
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_with_transformer_engine_spec

    if layer_spec == "te":
        spec = get_gpt_layer_with_transformer_engine_spec()
    else:
        spec = local_block_spec(config, vp_stage)
    return GPTModel(
        config,
        spec,
        vocab_size=shape.vocab_size,
        max_sequence_length=shape.max_positions,
        pre_process=pre_process,
        post_process=post_process,
        parallel_output=parallel_output,
        share_embeddings_and_output_weights=shape.tied_embeddings,
        position_embedding_type="mrope" if shape.mrope_section else "rope",
        rotary_base=int(shape.rope_theta),
        vp_stage=vp_stage,
    )
