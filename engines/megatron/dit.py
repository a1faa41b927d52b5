"""A CogVideoX video DiT whose transformer blocks are megatron-core tensor-parallel layers.

Why: the diffusers `CogVideoXTransformer3DModel` runs on one device; for training and sampling the 5B
models across GPUs the attention and MLP of every block are split over tensor-parallel ranks here, while
the diffusers checkpoint stays the source of truth (`diffusers_to_megatron_dit` / `megatron_dit_to_diffusers`).

What is parallel and what is not:
- Per block, megatron-core's `SelfAttention` (fused column-parallel `linear_qkv`, per-head q/k LayerNorm,
  `DotProductAttention`, row-parallel `linear_proj`) and `MLP` (column-parallel fc1, tanh-GELU, row-parallel
  fc2), all with biases, in megatron's [seq, batch, hidden] layout.
- Replicated on every TP rank (plain torch; small next to the blocks): the patch/text embedding and time
  embedding (diffusers' own `CogVideoXPatchEmbed`, `Timesteps`, `TimestepEmbedding`), each block's expert
  adaptive LayerNorms (separate shift/scale/gate for text and video tokens, computed from the time
  embedding), the final norms and the output projection.
- 3D RoPE is applied to the video tokens only: the text tokens, which come first in the sequence, get a zero
  rotation angle (cos 1, sin 0), so megatron's RoPE over the whole sequence leaves them as they are.

Layout facts for the conversion (megatron-core 0.16, num_query_groups == num_heads):
- `linear_qkv` rows are per head h: [q_h; k_h; v_h] (head_dim rows each), its bias the same way; TP rank r
  holds heads [r * heads/tp, (r+1) * heads/tp), a contiguous block of those rows.
- Column-parallel weights and biases (qkv, fc1) split on dim 0; row-parallel weights (linear_proj, fc2) on
  dim 1, their biases replicated; everything else is replicated.
Supported: CogVideoX 1.0 (2B with sincos positions, 5B with RoPE, 5B-I2V with RoPE + learned positions).
Not supported: CogVideoX 1.5 (`patch_size_t`, `ofs_embed_dim`), sequence/context/pipeline parallelism.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

Tensors = dict[str, torch.Tensor]


def _gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    """CogVideoX's "gelu-approximate" activation (module level so the config pickles)."""
    return F.gelu(x, approximate="tanh")


@dataclass(frozen=True)
class CogVideoXShape:
    """The facts of a diffusers CogVideoX config that fix the megatron layout and the replicated parts."""

    num_layers: int
    num_heads: int
    head_dim: int
    in_channels: int
    out_channels: int
    patch_size: int
    text_embed_dim: int
    time_embed_dim: int
    flip_sin_to_cos: bool
    freq_shift: int
    timestep_activation_fn: str
    sample_width: int
    sample_height: int
    sample_frames: int
    temporal_compression_ratio: int
    max_text_seq_length: int
    spatial_interpolation_scale: float
    temporal_interpolation_scale: float
    use_rotary_positional_embeddings: bool
    use_learned_positional_embeddings: bool
    patch_bias: bool
    norm_eps: float
    norm_elementwise_affine: bool

    @property
    def hidden_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def ffn_hidden_size(self) -> int:
        return 4 * self.hidden_size  # diffusers' FeedForward default; CogVideoX does not override it

    @classmethod
    def from_diffusers(cls, config: Any) -> CogVideoXShape:
        """From `CogVideoXTransformer3DModel.config` (or a plain dict of it); refuses what is not CogVideoX 1.0."""
        values = dict(config) if isinstance(config, Mapping) else dict(vars(config))

        def get(key: str, default: Any) -> Any:
            value = values.get(key, default)
            return default if value is None and default is not None else value

        if get("patch_size_t", None) is not None:
            raise ValueError(
                f"patch_size_t={values['patch_size_t']} (CogVideoX 1.5's temporal patching) is not supported by the "
                "megatron DiT; only CogVideoX 1.0 configs (patch_size_t=None) are"
            )
        if get("ofs_embed_dim", None):
            raise ValueError(
                f"ofs_embed_dim={values['ofs_embed_dim']} (CogVideoX 1.5 I2V's ofs embedding) is not supported by "
                "the megatron DiT"
            )
        if get("activation_fn", "gelu-approximate") != "gelu-approximate":
            raise ValueError(
                f"activation_fn={values['activation_fn']!r} is not supported; CogVideoX uses 'gelu-approximate'"
            )
        if not get("attention_bias", True):
            raise ValueError(
                "attention_bias=False is not supported: megatron's linear_qkv has a bias whenever the output "
                "projection and MLP have one, as CogVideoX's do"
            )
        if float(get("dropout", 0.0)) != 0.0:
            raise ValueError(f"dropout={values['dropout']} is not supported; CogVideoX checkpoints use 0.0")
        rotary = bool(get("use_rotary_positional_embeddings", False))
        learned = bool(get("use_learned_positional_embeddings", False))
        if learned and not rotary:
            raise ValueError("learned positional embeddings without rotary ones is not a CogVideoX configuration")
        head_dim = int(get("attention_head_dim", 64))
        if rotary and (head_dim % 8 or (head_dim // 8 * 3) % 2):
            raise ValueError(f"3D RoPE splits attention_head_dim into t/h/w parts of even size; {head_dim} does not")
        return cls(
            num_layers=int(get("num_layers", 30)),
            num_heads=int(get("num_attention_heads", 30)),
            head_dim=head_dim,
            in_channels=int(get("in_channels", 16)),
            out_channels=int(get("out_channels", 16)),
            patch_size=int(get("patch_size", 2)),
            text_embed_dim=int(get("text_embed_dim", 4096)),
            time_embed_dim=int(get("time_embed_dim", 512)),
            flip_sin_to_cos=bool(get("flip_sin_to_cos", True)),
            freq_shift=int(get("freq_shift", 0)),
            timestep_activation_fn=str(get("timestep_activation_fn", "silu")),
            sample_width=int(get("sample_width", 90)),
            sample_height=int(get("sample_height", 60)),
            sample_frames=int(get("sample_frames", 49)),
            temporal_compression_ratio=int(get("temporal_compression_ratio", 4)),
            max_text_seq_length=int(get("max_text_seq_length", 226)),
            spatial_interpolation_scale=float(get("spatial_interpolation_scale", 1.875)),
            temporal_interpolation_scale=float(get("temporal_interpolation_scale", 1.0)),
            use_rotary_positional_embeddings=rotary,
            use_learned_positional_embeddings=learned,
            patch_bias=bool(get("patch_bias", True)),
            norm_eps=float(get("norm_eps", 1e-5)),
            norm_elementwise_affine=bool(get("norm_elementwise_affine", True)),
        )


def _check_tp(num_heads: int, ffn_hidden_size: int, tp: int) -> None:
    for what, n in (("attention heads", num_heads), ("ffn hidden size", ffn_hidden_size)):
        if tp < 1 or n % tp:
            raise ValueError(f"tensor parallel size {tp} does not divide the {what} ({n})")


def transformer_config(shape: CogVideoXShape, **parallel: Any) -> Any:
    """megatron-core's TransformerConfig for the DiT blocks; `parallel` adds TP and other fields.

    `layernorm_epsilon` is the q/k LayerNorm's 1e-6 (the only megatron-built norm here; the blocks' adaptive
    norms are plain torch with the config's `norm_eps`). CUDA-kernel fusions are off so the same config
    builds on CPU ranks.
    """
    from megatron.core.transformer.transformer_config import TransformerConfig

    from engines.megatron.gpt import NO_CUDA_FUSIONS

    _check_tp(shape.num_heads, shape.ffn_hidden_size, int(parallel.get("tensor_model_parallel_size", 1)))
    fields: dict[str, Any] = {
        "num_layers": shape.num_layers,
        "hidden_size": shape.hidden_size,
        "ffn_hidden_size": shape.ffn_hidden_size,
        "num_attention_heads": shape.num_heads,
        "num_query_groups": shape.num_heads,
        "kv_channels": shape.head_dim,
        "normalization": "LayerNorm",
        "layernorm_epsilon": 1e-6,
        "qk_layernorm": True,
        "gated_linear_unit": False,
        "activation_func": _gelu_tanh,
        "add_bias_linear": True,
        "add_qkv_bias": True,
        "rotary_interleaved": True,  # CogVideoX rotates adjacent pairs (x0, x1), (x2, x3), ...
        "bias_activation_fusion": False,
        **NO_CUDA_FUSIONS,
    }
    fields.update(parallel)
    return TransformerConfig(**fields)


class _ExpertAdaLayerNorm(nn.Module):
    """CogVideoX's `CogVideoXLayerNormZero` in [seq, batch, hidden] layout: one LayerNorm, then separate
    shift/scale for text tokens (the first `text_len`) and video tokens, plus their two residual gates."""

    def __init__(self, time_embed_dim: int, hidden: int, eps: float, affine: bool) -> None:
        super().__init__()
        self.linear = nn.Linear(time_embed_dim, 6 * hidden)
        self.norm = nn.LayerNorm(hidden, eps=eps, elementwise_affine=affine)

    def forward(
        self, x: torch.Tensor, temb: torch.Tensor, text_len: int
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        shift, scale, gate, text_shift, text_scale, text_gate = self.linear(F.silu(temb)).chunk(6, dim=1)
        normed = self.norm(x)
        text = normed[:text_len] * (1 + text_scale) + text_shift  # [L, B, H] * [B, H]
        video = normed[text_len:] * (1 + scale) + shift
        return torch.cat([text, video]), text_gate, gate


def _gated_residual(
    x: torch.Tensor, out: torch.Tensor, text_gate: torch.Tensor, gate: torch.Tensor, text_len: int
) -> torch.Tensor:
    return x + torch.cat([out[:text_len] * text_gate, out[text_len:] * gate])


class CogVideoXBlock(nn.Module):
    """One CogVideoX block: adaptive norm -> megatron self-attention -> gated residual, twice (MLP second)."""

    def __init__(self, config: Any, shape: CogVideoXShape, layer_number: int) -> None:
        super().__init__()
        from megatron.core.models.backends import LocalSpecProvider
        from megatron.core.transformer.attention import SelfAttention, SelfAttentionSubmodules
        from megatron.core.transformer.enums import AttnMaskType
        from megatron.core.transformer.mlp import MLP, MLPSubmodules

        local = LocalSpecProvider()
        h, eps, affine = shape.hidden_size, shape.norm_eps, shape.norm_elementwise_affine
        self.norm1 = _ExpertAdaLayerNorm(shape.time_embed_dim, h, eps, affine)
        self.self_attention = SelfAttention(
            config,
            SelfAttentionSubmodules(
                linear_qkv=local.column_parallel_linear(),
                core_attention=local.core_attention(),
                linear_proj=local.row_parallel_linear(),
                q_layernorm=local.layer_norm(rms_norm=False, for_qk=True),
                k_layernorm=local.layer_norm(rms_norm=False, for_qk=True),
            ),
            layer_number=layer_number,
            attn_mask_type=AttnMaskType.no_mask,  # full bidirectional attention over text + video
        )
        self.norm2 = _ExpertAdaLayerNorm(shape.time_embed_dim, h, eps, affine)
        self.mlp = MLP(
            config,
            MLPSubmodules(linear_fc1=local.column_parallel_linear(), linear_fc2=local.row_parallel_linear()),
            ffn_hidden_size=shape.ffn_hidden_size,
        )

    def forward(self, x: torch.Tensor, temb: torch.Tensor, text_len: int, rotary: torch.Tensor | None) -> torch.Tensor:
        normed, text_gate, gate = self.norm1(x, temb, text_len)
        out, bias = self.self_attention(normed, attention_mask=None, rotary_pos_emb=rotary)
        x = _gated_residual(x, out if bias is None else out + bias, text_gate, gate, text_len)
        normed, text_gate, gate = self.norm2(x, temb, text_len)
        out, bias = self.mlp(normed)
        return _gated_residual(x, out if bias is None else out + bias, text_gate, gate, text_len)


def _crop_region(grid_h: int, grid_w: int, base_w: int, base_h: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """Where a grid_h x grid_w latent grid sits inside the base (training) grid, keeping its aspect ratio:
    the RoPE positions CogVideoX 1.0's pipeline uses ((top, left), (bottom, right))."""
    if grid_h / grid_w > base_h / base_w:
        height, width = base_h, int(round(base_h / grid_h * grid_w))
    else:
        width, height = base_w, int(round(base_w / grid_w * grid_h))
    top, left = int(round((base_h - height) / 2.0)), int(round((base_w - width) / 2.0))
    return (top, left), (top + height, left + width)


def rope_angles(shape: CogVideoXShape, frames: int, grid_h: int, grid_w: int, theta: float = 10000.0) -> torch.Tensor:
    """CogVideoX 1.0's 3D RoPE rotation angles for the video tokens, [frames * grid_h * grid_w, head_dim].

    head_dim is split t/h/w as 1/4, 3/8, 3/8; each pair of channels (2i, 2i+1) shares one angle, laid out
    interleaved to match megatron's `rotary_interleaved` (cos/sin of these are the pipeline's freqs_cos/sin).
    """
    d = shape.head_dim
    dims = (d // 4, d // 8 * 3, d // 8 * 3)
    p = shape.patch_size
    (top, left), (bottom, right) = _crop_region(grid_h, grid_w, shape.sample_width // p, shape.sample_height // p)
    positions = (
        torch.linspace(0, frames * (frames - 1) / frames, frames, dtype=torch.float32),
        torch.linspace(top, bottom * (grid_h - 1) / grid_h, grid_h, dtype=torch.float32),
        torch.linspace(left, right * (grid_w - 1) / grid_w, grid_w, dtype=torch.float32),
    )
    axes = []
    for pos, dim in zip(positions, dims, strict=True):
        inv_freq = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
        axes.append(torch.outer(pos, inv_freq).repeat_interleave(2, dim=1))
    t, h, w = axes
    grid = torch.cat(
        [
            t[:, None, None, :].expand(-1, grid_h, grid_w, -1),
            h[None, :, None, :].expand(frames, -1, grid_w, -1),
            w[None, None, :, :].expand(frames, grid_h, -1, -1),
        ],
        dim=-1,
    )
    return grid.reshape(frames * grid_h * grid_w, d)


class CogVideoXDiT(nn.Module):
    """CogVideoX 1.0 transformer on this rank's TP shard: same inputs and output as diffusers'
    `CogVideoXTransformer3DModel.forward` (noise/velocity prediction), with the RoPE computed here.

    Build it after `engines.megatron.setup.init_model_parallel(tp=...)`, with a config from
    `transformer_config(shape, tensor_model_parallel_size=tp)`. The replicated parts are initialized from
    the default generator, which `init_model_parallel` seeds the same on every rank.
    """

    def __init__(self, config: Any, shape: CogVideoXShape) -> None:
        super().__init__()
        from diffusers.models.embeddings import CogVideoXPatchEmbed, TimestepEmbedding, Timesteps
        from diffusers.models.normalization import AdaLayerNorm

        _check_tp(shape.num_heads, shape.ffn_hidden_size, config.tensor_model_parallel_size)
        unsupported = {
            "sequence_parallel": config.sequence_parallel,
            "context_parallel_size > 1": config.context_parallel_size > 1,
            "pipeline_model_parallel_size > 1": config.pipeline_model_parallel_size > 1,
        }
        for field, present in unsupported.items():
            if present:
                raise ValueError(f"{field} is not supported by the megatron CogVideoX DiT (tensor parallel only)")
        if config.num_layers != shape.num_layers or config.hidden_size != shape.hidden_size:
            raise ValueError(
                f"config ({config.num_layers} layers, hidden {config.hidden_size}) does not match the shape "
                f"({shape.num_layers} layers, hidden {shape.hidden_size})"
            )
        self.config, self.shape = config, shape
        h = shape.hidden_size
        self.patch_embed = CogVideoXPatchEmbed(
            patch_size=shape.patch_size,
            in_channels=shape.in_channels,
            embed_dim=h,
            text_embed_dim=shape.text_embed_dim,
            bias=shape.patch_bias,
            sample_width=shape.sample_width,
            sample_height=shape.sample_height,
            sample_frames=shape.sample_frames,
            temporal_compression_ratio=shape.temporal_compression_ratio,
            max_text_seq_length=shape.max_text_seq_length,
            spatial_interpolation_scale=shape.spatial_interpolation_scale,
            temporal_interpolation_scale=shape.temporal_interpolation_scale,
            use_positional_embeddings=not shape.use_rotary_positional_embeddings,
            use_learned_positional_embeddings=shape.use_learned_positional_embeddings,
        )
        self.time_proj = Timesteps(h, shape.flip_sin_to_cos, shape.freq_shift)
        self.time_embedding = TimestepEmbedding(h, shape.time_embed_dim, shape.timestep_activation_fn)
        self.blocks = nn.ModuleList(CogVideoXBlock(config, shape, i + 1) for i in range(shape.num_layers))
        self.norm_final = nn.LayerNorm(h, shape.norm_eps, shape.norm_elementwise_affine)
        self.norm_out = AdaLayerNorm(
            embedding_dim=shape.time_embed_dim,
            output_dim=2 * h,
            norm_elementwise_affine=shape.norm_elementwise_affine,
            norm_eps=shape.norm_eps,
            chunk_dim=1,
        )
        self.proj_out = nn.Linear(h, shape.patch_size * shape.patch_size * shape.out_channels)

    def forward(
        self, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor, timestep: torch.Tensor | float
    ) -> torch.Tensor:
        """hidden_states [B, F, C, H, W] latents, encoder_hidden_states [B, L, text_embed_dim], timestep [B]
        (or a scalar) -> the prediction, [B, F, out_channels, H, W], full (not sharded) on every TP rank."""
        batch, frames, _, height, width = hidden_states.shape
        p = self.shape.patch_size
        if height % p or width % p:
            raise ValueError(f"latent height/width {height}x{width} are not multiples of patch_size {p}")
        timestep = torch.as_tensor(timestep, device=hidden_states.device)
        if timestep.ndim == 0:
            timestep = timestep.expand(batch)
        temb = self.time_embedding(self.time_proj(timestep).to(hidden_states.dtype))
        tokens = self.patch_embed(encoder_hidden_states, hidden_states)  # [B, L + F*h*w, hidden], text first
        text_len = encoder_hidden_states.shape[1]
        x = tokens.transpose(0, 1).contiguous()  # megatron's [seq, batch, hidden]
        rotary = None
        if self.shape.use_rotary_positional_embeddings:
            video = rope_angles(self.shape, frames, height // p, width // p)
            angles = torch.cat([video.new_zeros(text_len, video.shape[1]), video])  # text tokens: no rotation
            rotary = angles.to(hidden_states.device)[:, None, None, :]  # [S, 1, 1, head_dim]
        for block in self.blocks:
            x = block(x, temb, text_len, rotary)
        video_tokens = self.norm_final(x[text_len:].transpose(0, 1))
        out = self.proj_out(self.norm_out(video_tokens, temb=temb))
        out = out.reshape(batch, frames, height // p, width // p, -1, p, p)
        return out.permute(0, 1, 4, 2, 5, 3, 6).flatten(5, 6).flatten(3, 4)

    def allreduce_qk_norm_grads(self) -> None:
        """Sum the q/k LayerNorm gradients over the TP group: those norms are replicated but each rank only
        applies them to its own heads, so each rank holds a partial gradient. megatron's
        `finalize_model_grads` does this for its DDP wrapper; call this after backward when training the bare
        module with a torch optimizer instead."""
        from megatron.core import parallel_state
        from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

        group = parallel_state.get_tensor_model_parallel_group()
        if torch.distributed.get_world_size(group) == 1:
            return
        grads = [
            p.grad
            for name, p in self.named_parameters()
            if ("q_layernorm" in name or "k_layernorm" in name) and p.grad is not None
        ]
        if grads:
            flat = _flatten_dense_tensors(grads)
            torch.distributed.all_reduce(flat, group=group)
            for grad, synced in zip(grads, _unflatten_dense_tensors(flat, grads), strict=True):
                grad.copy_(synced)


# Block parameters, diffusers suffix -> megatron suffix (under transformer_blocks.{i}. / blocks.{i}.).
_REPLICATED = {
    "attn1.norm_q.weight": "self_attention.q_layernorm.weight",
    "attn1.norm_q.bias": "self_attention.q_layernorm.bias",
    "attn1.norm_k.weight": "self_attention.k_layernorm.weight",
    "attn1.norm_k.bias": "self_attention.k_layernorm.bias",
    "attn1.to_out.0.bias": "self_attention.linear_proj.bias",
    "ff.net.2.bias": "mlp.linear_fc2.bias",
}
_COLUMN = {"ff.net.0.proj.weight": "mlp.linear_fc1.weight", "ff.net.0.proj.bias": "mlp.linear_fc1.bias"}
_ROW = {"attn1.to_out.0.weight": "self_attention.linear_proj.weight", "ff.net.2.weight": "mlp.linear_fc2.weight"}
_QKV = {"weight": "self_attention.linear_qkv.weight", "bias": "self_attention.linear_qkv.bias"}
_SAME_IN_BLOCK = ("norm1.", "norm2.")  # the adaptive norms keep their diffusers names


def _qkv_rows(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, head_dim: int) -> torch.Tensor:
    heads = q.shape[0] // head_dim
    stacked = torch.stack([t.reshape(heads, head_dim, *t.shape[1:]) for t in (q, k, v)], dim=1)
    return stacked.reshape(heads * 3 * head_dim, *q.shape[1:])


def diffusers_to_megatron_dit(state: Tensors, tp: int = 1, tp_rank: int = 0) -> Tensors:
    """This TP rank's `CogVideoXDiT` state dict from a whole diffusers `CogVideoXTransformer3DModel` one.

    Head count and size are read from the tensors (q LayerNorm is head_dim wide), so no config is needed.
    """
    if "transformer_blocks.0.attn1.norm_q.weight" not in state:
        raise ValueError("not a CogVideoX transformer state dict: no transformer_blocks.0.attn1.norm_q.weight")
    head_dim = state["transformer_blocks.0.attn1.norm_q.weight"].shape[0]
    heads = state["transformer_blocks.0.attn1.to_q.weight"].shape[0] // head_dim
    _check_tp(heads, state["transformer_blocks.0.ff.net.0.proj.weight"].shape[0], tp)
    if not 0 <= tp_rank < tp:
        raise ValueError(f"tp_rank {tp_rank} is outside tensor parallel size {tp}")

    out: Tensors = {}
    unknown = []
    for key, value in state.items():
        if not key.startswith("transformer_blocks."):
            out[key] = value.clone()
            continue
        _, index, suffix = key.split(".", 2)
        dst = f"blocks.{index}."
        if suffix.startswith(_SAME_IN_BLOCK):
            out[dst + suffix] = value.clone()
        elif suffix in _REPLICATED:
            out[dst + _REPLICATED[suffix]] = value.clone()
        elif suffix in _COLUMN:
            out[dst + _COLUMN[suffix]] = value.chunk(tp, dim=0)[tp_rank].clone()
        elif suffix in _ROW:
            out[dst + _ROW[suffix]] = value.chunk(tp, dim=1)[tp_rank].clone()
        elif suffix.startswith(("attn1.to_q.", "attn1.to_k.", "attn1.to_v.")):
            kind = suffix.rsplit(".", 1)[1]
            if suffix.startswith("attn1.to_q."):
                src = f"transformer_blocks.{index}.attn1.to_"
                rows = _qkv_rows(state[f"{src}q.{kind}"], state[f"{src}k.{kind}"], state[f"{src}v.{kind}"], head_dim)
                out[dst + _QKV[kind]] = rows.chunk(tp, dim=0)[tp_rank].clone()
        else:
            unknown.append(key)
    if unknown:
        raise ValueError(f"diffusers keys the megatron DiT has no place for: {unknown[:8]}")
    return out


def megatron_dit_to_diffusers(shards: list[Tensors]) -> Tensors:
    """A whole diffusers `CogVideoXTransformer3DModel` state dict from `CogVideoXDiT` shards[tp_rank]."""
    first = shards[0]
    head_dim = first["blocks.0.self_attention.q_layernorm.weight"].shape[0]
    reverse = {v: k for table in (_REPLICATED, _COLUMN, _ROW) for k, v in table.items()}
    out: Tensors = {}
    for key, value in first.items():
        if key.endswith("_extra_state"):
            continue
        if not key.startswith("blocks."):
            out[key] = value.clone()
            continue
        _, index, suffix = key.split(".", 2)
        dst = f"transformer_blocks.{index}."
        if suffix.startswith(_SAME_IN_BLOCK):
            out[dst + suffix] = value.clone()
        elif suffix in (_QKV["weight"], _QKV["bias"]):
            full = torch.cat([s[key] for s in shards], dim=0)
            grouped = full.reshape(-1, 3, head_dim, *full.shape[1:])
            kind = suffix.rsplit(".", 1)[1]
            for i, name in enumerate("qkv"):
                out[f"{dst}attn1.to_{name}.{kind}"] = grouped[:, i].reshape(-1, *full.shape[1:]).contiguous()
        elif reverse.get(suffix) in _COLUMN:
            out[dst + reverse[suffix]] = torch.cat([s[key] for s in shards], dim=0)
        elif reverse.get(suffix) in _ROW:
            out[dst + reverse[suffix]] = torch.cat([s[key] for s in shards], dim=1)
        elif suffix in reverse:
            out[dst + reverse[suffix]] = value.clone()
        else:
            raise ValueError(f"megatron DiT key with no diffusers counterpart: {key}")
    return out
