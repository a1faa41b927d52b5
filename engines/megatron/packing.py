"""Packed micro-batches on the megatron engine (`train.packing.max_tokens`): the samples of a micro-batch laid end
to end in one row, attention kept inside each sample, the loss megatron's per-token mean over the global batch.

Why it is exact: the family's `pack` (engines/models/sequence.py) puts the samples in one row and masks each
sample's first label (in the row it would be the previous sample's next token); positions restart at every
sample (Qwen-VL's M-RoPE computed per sample by transformers' own get_rope_index, plain RoPE counted from 0 per
sample); attention never crosses a boundary; and the loss is summed per token and divided by the global batch's
labelled-token count (`calculate_per_token_loss`, engines/megatron/training.py), which packing does not change.
So a packed step computes the padded step's loss and gradient, without the pad tokens.

How attention stays inside each sample depends on the chunk's attention backend:

- Transformer Engine (`TEDotProductAttention`, the "te" layer spec on CUDA): megatron-core's `PackedSeqParams`
  with `qkv_format="thd"` and the samples' `cu_seqlens`: TE's varlen (flash / cuDNN) kernels, no mask.
- megatron-core's local `DotProductAttention` (the spec this engine builds on every device; it refuses
  `PackedSeqParams`): a block-diagonal causal mask, given to its arbitrary-mask path (`attention_mask`, True where a
  query may not see a key), which replaces its default causal mask. It materialises the [S, S] scores as the
  local backend always does, so packing saves the pad tokens' compute, not attention's quadratic memory.

Refused at config load (`packing_problems`): context parallel with packing. CP splits every sequence into 2 x cp
chunks across ranks; with packing each sample would have to be padded to a multiple of 2 x cp and attended with
TE's THD context-parallel kernels, and the local backend has no context parallel at all.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:  # torch stays out of the config checks' import path
    import torch

AttentionPath = Literal["thd", "mask"]


def packing_problems(cfg: Any) -> list[str]:
    """What the megatron engine cannot pack, as config errors (imports nothing heavy: load_config may call it)."""
    t = cfg.train
    if t.engine != "megatron" or t.packing.max_tokens is None:
        return []
    out = []
    if t.parallel.cp > 1:
        out.append(
            f"train.packing with train.parallel.cp={t.parallel.cp} on the megatron engine: context parallel splits "
            "each sequence into 2 x cp chunks across ranks, and a packed row would need every sample padded to a "
            "multiple of 2 x cp and Transformer Engine's THD context-parallel attention, which this engine does not "
            "build (its local attention has no context parallel). Set train.parallel.cp: 1, or remove train.packing"
        )
    return out


def attention_path(chunk: torch.nn.Module) -> AttentionPath:
    """How this chunk's attention keeps a packed row's samples apart: "thd" (TE's varlen attention through
    PackedSeqParams) or "mask" (the local backend's arbitrary mask). An unknown backend is refused rather than
    let attend across samples."""
    cached = getattr(chunk, "_flowspeed_attention_path", None)
    if cached is not None:
        return cached
    kinds = {type(m.core_attention).__name__ for m in chunk.modules() if hasattr(m, "core_attention")}
    if kinds <= {"DotProductAttention"}:
        path: AttentionPath = "mask"  # also a chunk without layers: nothing attends there
    elif kinds == {"TEDotProductAttention"}:
        path = "thd"
    else:
        raise ValueError(
            f"packed sequences on the megatron engine need Transformer Engine's or megatron's local attention; this "
            f"model's is {sorted(kinds)}: remove train.packing"
        )
    chunk._flowspeed_attention_path = path
    return path


def block_causal_mask(cu_seqlens: torch.Tensor, length: int) -> torch.Tensor:
    """(1, 1, L, L) bool, True where a query may NOT attend a key: causal inside each sample of `cu_seqlens`, nothing
    across samples (megatron's mask convention: `attention_mask_func` fills True positions)."""
    import torch

    bounds = cu_seqlens.to(torch.long)
    segment = torch.bucketize(torch.arange(length, device=bounds.device), bounds[1:], right=True)  # (L,)
    same = segment[:, None] == segment[None, :]
    causal = torch.ones(length, length, dtype=torch.bool, device=bounds.device).tril()
    return ~(same & causal).view(1, 1, length, length)


def packed_seq_params(cu_seqlens: torch.Tensor) -> Any:
    """megatron-core's THD parameters for one packed row (self-attention: the same boundaries for q and kv)."""
    import torch
    from megatron.core.packed_seq_params import PackedSeqParams

    cu = cu_seqlens.to(torch.int32)
    longest = int((cu[1:] - cu[:-1]).max())
    return PackedSeqParams(
        qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu, max_seqlen_q=longest, max_seqlen_kv=longest
    )


def attention_inputs(chunk: torch.nn.Module, cu_seqlens: torch.Tensor, length: int) -> dict[str, Any]:
    """The keyword arguments a packed row's forward gives this chunk's decoder."""
    if attention_path(chunk) == "thd":
        return {"packed_seq_params": packed_seq_params(cu_seqlens)}
    return {"attention_mask": block_causal_mask(cu_seqlens, length)}
