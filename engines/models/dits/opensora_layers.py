"""Layers OpenSora 1.0 (STDiT) and 1.2 (STDiT3) share: patch embedding, sin-cos tables, timestep / caption
embedders, the attention modules and the PixArt-style final layer (see stdit.py / stdit3.py for the models).

Submodule and parameter names are the authors' (opensora/models/layers/blocks.py of v1.0.0 and v1.2.0: `qkv`,
`q_norm`, `k_norm`, `proj`, `q_linear`, `kv_linear`, `y_proj.fc1`, `mlp.0`, ...), so the released state dicts load
by identity. The token stream between blocks is (B, T*S, C) in (t, s) order, s = h*w row-major; the patch embedding
and final layer work on (B, T, S, C) so a context-parallel plan can split / gather the spatial axis S (dim 2).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from diffusers.models._modeling_parallel import ContextParallelInput, ContextParallelOutput
from diffusers.models.attention import AttentionModuleMixin
from diffusers.models.attention_dispatch import dispatch_attention_fn
from torch import nn


def stdit_cp_plan(pos_module: str) -> dict:
    """Ulysses/ring CP for STDiT and STDiT3 (both time-major (B, T, S, C) tokens): split each frame's S tokens after
    the patch embedding, with the (1, S, C) position table made by the module named `pos_module` (STDiT's released
    file holds a buffer named `pos_embed`, so its table module has another name), and gather after the final layer."""
    return {
        "x_embedder": {0: ContextParallelInput(split_dim=2, expected_dims=4, split_output=True)},  # (B, T, S, C)
        pos_module: {0: ContextParallelInput(split_dim=1, expected_dims=3, split_output=True)},  # (1, S, C)
        "final_layer": ContextParallelOutput(gather_dim=2, expected_dims=4),  # (B, T, S/N, P) -> (B, T, S, P)
    }


STDIT_CP_PLAN = stdit_cp_plan("pos_embed")


def t2i_modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale) + shift


# ---- sin-cos tables -----------------------------------------------------------------------------------------------
def sincos_1d(pos: torch.Tensor, dim: int) -> torch.Tensor:
    """(M,) positions -> (M, dim) as [sin | cos], frequencies 10000^(-i / (dim/2)) (the MAE/DiT table)."""
    omega = 1.0 / 10000 ** (torch.arange(dim // 2, device=pos.device, dtype=torch.float32) / (dim // 2))
    out = pos.float()[:, None] * omega[None]  # (M, dim/2)
    return torch.cat([out.sin(), out.cos()], dim=-1)


class SinCosPosEmbed2D(nn.Module):
    """Spatial sin-cos table (1, h*w, dim): first half encodes the column (w) position, second half the row (h)
    position (the authors' meshgrid puts w first), positions / scale, stretched to `base_size` when given (1.2).
    No parameters; a module so a CP plan can split its output along S."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        if dim % 4:
            raise ValueError(f"2D sin-cos embedding needs hidden_size % 4 == 0, got {dim}")
        self.dim = dim

    def forward(self, h: int, w: int, scale: float, base_size: int | None, device: torch.device,
                table: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
        """`table` (1, h*w, dim), when given, is returned as is: STDiT's released fixed table of its training size
        (so a CP plan splits whichever table the model uses)."""
        if table is not None:
            return table
        pos_h = torch.arange(h, device=device, dtype=torch.float32) / scale
        pos_w = torch.arange(w, device=device, dtype=torch.float32) / scale
        if base_size is not None:
            pos_h, pos_w = pos_h * (base_size / h), pos_w * (base_size / w)
        grid_h, grid_w = torch.meshgrid(pos_h, pos_w, indexing="ij")  # (h, w) each
        emb = [sincos_1d(g.reshape(-1), self.dim // 2) for g in (grid_w, grid_h)]
        return torch.cat(emb, dim=-1)[None]  # (1, S, dim)


# ---- embedders ----------------------------------------------------------------------------------------------------
class PatchEmbed3D(nn.Module):
    """Conv3d patchify (key `proj`), zero-padding T/H/W up to the patch size like the authors.
    (B, C, T, H, W) -> (B, T', S, D), S = h'*w' row-major."""

    def __init__(self, patch_size: tuple[int, int, int], in_channels: int, embed_dim: int) -> None:
        super().__init__()
        self.patch_size = tuple(patch_size)
        self.proj = nn.Conv3d(in_channels, embed_dim, kernel_size=self.patch_size, stride=self.patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pt, ph, pw = self.patch_size
        t, h, w = x.shape[-3:]
        x = F.pad(x, (0, -w % pw, 0, -h % ph, 0, -t % pt))
        x = self.proj(x)  # (B, D, T', h', w')
        return x.flatten(3).permute(0, 2, 3, 1)  # (B, T', S, D)


class TimestepEmbedder(nn.Module):
    """Sinusoidal [cos | sin] features of a scalar (256 dims, max period 1e4) -> MLP (keys `mlp.0`, `mlp.2`).
    Also the authors' `SizeEmbedder` for fps (identical parameters for a (B,) input)."""

    def __init__(self, hidden_size: int, frequency_embedding_size: int = 256) -> None:
        super().__init__()
        self.frequency_embedding_size = frequency_embedding_size
        self.mlp = nn.Sequential(
            nn.Linear(frequency_embedding_size, hidden_size), nn.SiLU(), nn.Linear(hidden_size, hidden_size)
        )

    def forward(self, t: torch.Tensor) -> torch.Tensor:  # (B,) -> (B, D)
        half = self.frequency_embedding_size // 2
        freqs = torch.exp(-math.log(10000) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
        args = t.float()[:, None] * freqs[None]  # (B, half)
        emb = torch.cat([args.cos(), args.sin()], dim=-1)
        return self.mlp(emb.to(self.mlp[0].weight.dtype))


class Mlp(nn.Module):
    """timm's Mlp as the authors use it (keys `fc1`, `fc2`), GELU-tanh."""

    def __init__(self, in_features: int, hidden_features: int, out_features: int | None = None) -> None:
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden_features)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(hidden_features, out_features or in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class CaptionEmbedder(nn.Module):
    """T5 features -> hidden size (`y_proj`). `y_embedding` (L, D_text) is the learned null caption the authors swap
    in for classifier-free guidance; we keep it as their (persistent) buffer for the pipeline / caption dropout to
    use, and never swap it in inside forward (dropout is the training step's business)."""

    def __init__(self, in_channels: int, hidden_size: int, token_num: int) -> None:
        super().__init__()
        self.y_proj = Mlp(in_channels, hidden_size, hidden_size)
        self.register_buffer("y_embedding", torch.randn(token_num, in_channels) / in_channels**0.5)

    def forward(self, caption: torch.Tensor) -> torch.Tensor:  # (B, L, D_text) -> (B, L, D)
        return self.y_proj(caption)


class RMSNorm(nn.Module):
    """LlamaRMSNorm (fp32 statistics, weight applied in the input dtype), key `weight`."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


# ---- rotary (1.2 temporal attention) ------------------------------------------------------------------------------
class TemporalRoPE(nn.Module):
    """The table of lucidrains' `RotaryEmbedding(dim=head_dim)` used by 1.2's temporal attention: frequencies
    theta^(-2i/dim) in buffer `freqs` (the checkpoint's `rope.freqs`), positions 0..T-1, each frequency repeated for
    an interleaved pair. Returns (cos, sin), each (T, head_dim)."""

    def __init__(self, head_dim: int, theta: float = 10000.0) -> None:
        super().__init__()
        self.register_buffer("freqs", 1.0 / theta ** (torch.arange(0, head_dim, 2).float() / head_dim))

    def forward(self, frames: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        angles = torch.arange(frames, device=device, dtype=torch.float32)[:, None] * self.freqs.float()[None]
        angles = angles.repeat_interleave(2, dim=-1)  # (T, head_dim): f0 f0 f1 f1 ...
        return angles.cos(), angles.sin()


def apply_interleaved_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (B', N, H, D), tables (N, D): pairs (x0, x1) -> (x0 cos - x1 sin, x1 cos + x0 sin)."""
    x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)
    rotated = torch.stack((-x2, x1), dim=-1).flatten(-2)
    return (x * cos[:, None] + rotated * sin[:, None]).to(x.dtype)


# ---- attention ----------------------------------------------------------------------------------------------------
class SplitAttnProcessor:
    """Self-attention over the tokens context parallelism splits (STDiT/STDiT3 spatial attention): diffusers'
    `enable_parallelism` sets `_parallel_config` and the dispatcher runs Ulysses/ring."""

    _attention_backend = None
    _parallel_config = None

    def __call__(self, attn: SelfAttention, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None = None):
        q, k, v = attn.project(x, rope)
        out = dispatch_attention_fn(q, k, v, backend=self._attention_backend, parallel_config=self._parallel_config)
        return attn.proj(out.flatten(2))


class LocalAttnProcessor:
    """Attention that stays local under CP (temporal attention when S is split): no `_parallel_config`."""

    _attention_backend = None

    def __call__(self, attn: SelfAttention, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None = None):
        q, k, v = attn.project(x, rope)
        return attn.proj(dispatch_attention_fn(q, k, v, backend=self._attention_backend).flatten(2))


class SelfAttention(nn.Module, AttentionModuleMixin):
    """The authors' `Attention`: fused `qkv`, optional per-head RMSNorm `q_norm`/`k_norm` (1.2), optional RoPE after
    the norm (1.2 temporal), `proj`. (B', N, C) -> (B', N, C)."""

    _default_processor_cls = SplitAttnProcessor
    _available_processors = [SplitAttnProcessor, LocalAttnProcessor]

    def __init__(self, dim: int, num_heads: int, qk_norm: bool = False, local: bool = False) -> None:
        super().__init__()
        self.heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.q_norm = RMSNorm(dim // num_heads) if qk_norm else nn.Identity()
        self.k_norm = RMSNorm(dim // num_heads) if qk_norm else nn.Identity()
        self.proj = nn.Linear(dim, dim)
        self.set_processor(LocalAttnProcessor() if local else SplitAttnProcessor())

    def project(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None):
        q, k, v = self.qkv(x).unflatten(-1, (3, self.heads, -1)).unbind(2)  # (B', N, H, Dh) x 3
        q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:
            q, k = apply_interleaved_rope(q, *rope), apply_interleaved_rope(k, *rope)
        return q, k, v

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        return self.processor(self, x, rope)


class CrossAttnProcessor:
    """Cross-attention to the caption: local under CP (its keys are never split), so no `_parallel_config`."""

    _attention_backend = None

    def __call__(self, attn: MultiHeadCrossAttention, x: torch.Tensor, cond: torch.Tensor, mask: torch.Tensor | None):
        q = attn.q_linear(x).unflatten(-1, (attn.heads, -1))  # (B, N, H, Dh)
        k, v = attn.kv_linear(cond).unflatten(-1, (2, attn.heads, -1)).unbind(2)  # (B, L, H, Dh) x 2
        out = dispatch_attention_fn(q, k, v, attn_mask=mask, backend=self._attention_backend)
        return attn.proj(out.flatten(2))


class MultiHeadCrossAttention(nn.Module, AttentionModuleMixin):
    """The authors' cross-attention (`q_linear`, fused `kv_linear`, `proj`). Their xformers block-diagonal mask over
    the batch's real caption tokens equals per-sample attention with a boolean key mask (B, 1, 1, L)."""

    _default_processor_cls = CrossAttnProcessor
    _available_processors = [CrossAttnProcessor]

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.heads = num_heads
        self.q_linear = nn.Linear(dim, dim)
        self.kv_linear = nn.Linear(dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)
        self.set_processor(CrossAttnProcessor())

    def forward(self, x: torch.Tensor, cond: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.processor(self, x, cond, mask)


# ---- output -------------------------------------------------------------------------------------------------------
def frame_select(x_mask: torch.Tensor, x: torch.Tensor, x_zero: torch.Tensor, frames: int) -> torch.Tensor:
    """Where x_mask (B, T) is True keep x, else x_zero; x / x_zero (B, T*S, ...) or (B, T, S, ...)."""
    shape = x.shape
    x, x_zero = x.unflatten(1, (frames, -1)), x_zero.unflatten(1, (frames, -1))
    keep = x_mask.reshape(*x_mask.shape, *([1] * (x.dim() - 2)))
    return torch.where(keep, x, x_zero).reshape(shape)


class T2IFinalLayer(nn.Module):
    """PixArt final layer: LayerNorm, modulation from `scale_shift_table` + t, linear to p_t*p_h*p_w*C_out. Works on
    (B, T, S, D) so a CP plan gathers its output along S; x_mask frames (1.2) use the t=0 modulation."""

    def __init__(self, hidden_size: int, num_patch: int, out_channels: int) -> None:
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden_size, num_patch * out_channels)
        self.scale_shift_table = nn.Parameter(torch.randn(2, hidden_size) / hidden_size**0.5)

    def forward(self, x: torch.Tensor, t: torch.Tensor, x_mask: torch.Tensor | None = None,
                t0: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
        b = x.shape[0]
        shift, scale = (self.scale_shift_table[None] + t[:, None]).reshape(b, 2, 1, 1, -1).unbind(1)  # (B,1,1,D)
        out = t2i_modulate(self.norm_final(x), shift, scale)  # (B, T, S, D)
        if x_mask is not None:
            # the authors' v1.2.0 T2IFinalLayer normalises the already t-modulated tokens again for the t=0 frames
            # (x is reassigned before its x_zero line); the released STDiT3 was trained so, hence kept
            shift0, scale0 = (self.scale_shift_table[None] + t0[:, None]).reshape(b, 2, 1, 1, -1).unbind(1)
            out = frame_select(x_mask, out, t2i_modulate(self.norm_final(out), shift0, scale0), x.shape[1])
        return self.linear(out)  # (B, T, S, p*C_out)


def unpatchify(x: torch.Tensor, patch_size: tuple[int, int, int], h: int, w: int, size: tuple[int, int, int]):
    """(B, T', h'*w', pt*ph*pw*C) -> (B, C, T, H, W), cropping the patch padding back to `size` = (T, H, W)."""
    pt, ph, pw = patch_size
    b, t = x.shape[:2]
    x = x.reshape(b, t, h, w, pt, ph, pw, -1).permute(0, 7, 1, 4, 2, 5, 3, 6)  # (B, C, T', pt, h', ph, w', pw)
    x = x.reshape(b, -1, t * pt, h * ph, w * pw)
    return x[:, :, : size[0], : size[1], : size[2]]
