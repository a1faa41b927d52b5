"""Hugging Face <-> megatron-core state dicts for Llama / Qwen2 decoders, with tensor-parallel splitting.

Layout facts (megatron-core's GPT layer names; the same for the local and Transformer Engine specs):
- `linear_qkv` stacks, per query group g: the group's `heads/groups` query heads, then its key head, then
  its value head (rows of head_dim each); its bias the same way. TP rank r holds groups
  [r * groups/tp, (r+1) * groups/tp), which is a contiguous block of those rows.
- `linear_fc1` is [gate; up]; under TP each rank holds [gate_r; up_r], not a slice of the concatenation.
- Column-parallel weights (qkv, fc1, output layer, vocab embedding) split on dim 0; row-parallel ones
  (`linear_proj`, `linear_fc2`) on dim 1; norms are replicated.
Pipeline stages hold global layers [stage offset, offset + layers per stage) renumbered from 0, as
megatron-core builds them.
"""

from __future__ import annotations

import torch
from flowspeed.engines.megatron.gpt import DecoderShape

Tensors = dict[str, torch.Tensor]


def _hf_prefix(state: Tensors) -> str:
    """'model.' for *ForCausalLM checkpoints, '' for bare *Model ones, 'model.language_model.' for VLMs."""
    for prefix in ("model.language_model.", "model.", "language_model.model.", ""):
        if f"{prefix}embed_tokens.weight" in state:
            return prefix
    raise ValueError("not a Llama/Qwen2 decoder state dict: no embed_tokens.weight under any known prefix")


def _check_divisible(shape: DecoderShape, tp: int) -> None:
    for what, n in (("query groups (num_key_value_heads)", shape.num_query_groups),
                    ("attention heads", shape.num_heads), ("ffn hidden size", shape.ffn_hidden_size),
                    ("vocab size", shape.vocab_size)):  # fmt: skip
        if n % tp:
            raise ValueError(f"tensor parallel size {tp} does not divide the {what} ({n})")


def _qkv_rows(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, shape: DecoderShape) -> torch.Tensor:
    g, d = shape.num_query_groups, shape.head_dim
    per = shape.num_heads // g
    q = q.reshape(g, per * d, *q.shape[1:])
    k = k.reshape(g, d, *k.shape[1:])
    v = v.reshape(g, d, *v.shape[1:])
    return torch.cat([q, k, v], dim=1).reshape(-1, *q.shape[2:])


def _split_qkv_rows(qkv: torch.Tensor, shape: DecoderShape) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g, d = shape.num_query_groups, shape.head_dim
    per = shape.num_heads // g
    grouped = qkv.reshape(g, (per + 2) * d, *qkv.shape[1:])
    q, k, v = grouped.split([per * d, d, d], dim=1)
    return (q.reshape(-1, *qkv.shape[1:]), k.reshape(-1, *qkv.shape[1:]), v.reshape(-1, *qkv.shape[1:]))


def hf_to_megatron(
    hf: Tensors, shape: DecoderShape, tp: int = 1, tp_rank: int = 0, pp: int = 1, pp_rank: int = 0
) -> Tensors:
    """This (tp_rank, pp_rank)'s megatron state dict from a whole HF one."""
    _check_divisible(shape, tp)
    if shape.num_layers % pp:
        raise ValueError(f"pipeline parallel size {pp} does not divide the {shape.num_layers} layers")
    p = _hf_prefix(hf)
    per_stage = shape.num_layers // pp
    first, last = pp_rank == 0, pp_rank == pp - 1

    def col(t: torch.Tensor) -> torch.Tensor:
        return t.chunk(tp, dim=0)[tp_rank].clone()

    def row(t: torch.Tensor) -> torch.Tensor:
        return t.chunk(tp, dim=1)[tp_rank].clone()

    out: Tensors = {}
    if first or (shape.tied_embeddings and last):  # a tied last stage keeps its own copy of the embedding
        out["embedding.word_embeddings.weight"] = col(hf[f"{p}embed_tokens.weight"])
    for local in range(per_stage):
        i = pp_rank * per_stage + local
        src, dst = f"{p}layers.{i}.", f"decoder.layers.{local}."
        a = f"{src}self_attn."
        out[f"{dst}input_layernorm.weight"] = hf[f"{src}input_layernorm.weight"].clone()
        qkv = _qkv_rows(hf[f"{a}q_proj.weight"], hf[f"{a}k_proj.weight"], hf[f"{a}v_proj.weight"], shape)
        out[f"{dst}self_attention.linear_qkv.weight"] = col(qkv)
        if shape.qkv_bias:
            bias = _qkv_rows(hf[f"{a}q_proj.bias"], hf[f"{a}k_proj.bias"], hf[f"{a}v_proj.bias"], shape)
            out[f"{dst}self_attention.linear_qkv.bias"] = col(bias)
        out[f"{dst}self_attention.linear_proj.weight"] = row(hf[f"{a}o_proj.weight"])
        out[f"{dst}pre_mlp_layernorm.weight"] = hf[f"{src}post_attention_layernorm.weight"].clone()
        gate, up = col(hf[f"{src}mlp.gate_proj.weight"]), col(hf[f"{src}mlp.up_proj.weight"])
        out[f"{dst}mlp.linear_fc1.weight"] = torch.cat([gate, up], dim=0)
        out[f"{dst}mlp.linear_fc2.weight"] = row(hf[f"{src}mlp.down_proj.weight"])
    if last:
        out["decoder.final_layernorm.weight"] = hf[f"{p}norm.weight"].clone()
        if not shape.tied_embeddings:
            head = next((hf[k] for k in ("lm_head.weight", "language_model.lm_head.weight") if k in hf), None)
            if head is None:
                raise ValueError("the HF state dict has no lm_head.weight and the config does not tie embeddings")
            out["output_layer.weight"] = col(head)
    return out


def megatron_to_hf(shards: list[list[Tensors]], shape: DecoderShape, prefix: str = "model.") -> Tensors:
    """A whole HF state dict from megatron shards given as shards[pp_rank][tp_rank]."""
    pp, tp = len(shards), len(shards[0])
    per_stage = shape.num_layers // pp

    def col(stage: int, key: str) -> torch.Tensor:
        return torch.cat([shards[stage][r][key] for r in range(tp)], dim=0)

    def row(stage: int, key: str) -> torch.Tensor:
        return torch.cat([shards[stage][r][key] for r in range(tp)], dim=1)

    hf: Tensors = {f"{prefix}embed_tokens.weight": col(0, "embedding.word_embeddings.weight")}
    for stage in range(pp):
        for local in range(per_stage):
            src, dst = f"decoder.layers.{local}.", f"{prefix}layers.{stage * per_stage + local}."
            a = f"{dst}self_attn."
            hf[f"{dst}input_layernorm.weight"] = shards[stage][0][f"{src}input_layernorm.weight"]
            q, k, v = _split_qkv_rows(col(stage, f"{src}self_attention.linear_qkv.weight"), shape)
            hf[f"{a}q_proj.weight"], hf[f"{a}k_proj.weight"], hf[f"{a}v_proj.weight"] = q, k, v
            if shape.qkv_bias:
                q, k, v = _split_qkv_rows(col(stage, f"{src}self_attention.linear_qkv.bias"), shape)
                hf[f"{a}q_proj.bias"], hf[f"{a}k_proj.bias"], hf[f"{a}v_proj.bias"] = q, k, v
            hf[f"{a}o_proj.weight"] = row(stage, f"{src}self_attention.linear_proj.weight")
            hf[f"{dst}post_attention_layernorm.weight"] = shards[stage][0][f"{src}pre_mlp_layernorm.weight"]
            fc1 = [shards[stage][r][f"{src}mlp.linear_fc1.weight"].chunk(2, dim=0) for r in range(tp)]
            hf[f"{dst}mlp.gate_proj.weight"] = torch.cat([g for g, _ in fc1], dim=0)
            hf[f"{dst}mlp.up_proj.weight"] = torch.cat([u for _, u in fc1], dim=0)
            hf[f"{dst}mlp.down_proj.weight"] = row(stage, f"{src}mlp.linear_fc2.weight")
    hf[f"{prefix}norm.weight"] = shards[-1][0]["decoder.final_layernorm.weight"]
    if not shape.tied_embeddings:
        hf["lm_head.weight"] = col(pp - 1, "output_layer.weight")
    return {k: v.contiguous() for k, v in hf.items()}
