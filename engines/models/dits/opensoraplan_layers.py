"""Layers of the OpenSoraPlan DiTs: 3D RoPE, Skiparse ("sparse1d") token regrouping, the attention processors and
the transformer block (see opensoraplan.py for the models, the published layouts and the CP reasoning).

The attention modules are diffusers' `Attention` (so `to_q/to_k/to_v/to_out.0` keep the authors' key names) with
`AttentionModuleMixin` added, driven by our processors that call `dispatch_attention_fn` on (B, S, H, D) tensors.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers.models.attention import AttentionModuleMixin, FeedForward
from diffusers.models.attention_dispatch import dispatch_attention_fn
from diffusers.models.attention_processor import Attention
from torch import nn

# The authors turn 0/1 masks into additive biases with this value (not -inf): a fully masked caption row then
# attends uniformly instead of producing NaN, so we keep it.
NEG_BIAS = -10000.0


class OpenSoraAttention(Attention, AttentionModuleMixin):
    """diffusers' `Attention` (the authors subclass it too: identical parameters and key names), marked with
    `AttentionModuleMixin` so `set_attention_backend` and `enable_parallelism` find its processor."""


class PatchEmbed2D(nn.Module):
    """Per-frame Conv2d patchify, (B, C, T, H, W) -> (B, T*h*w, D) in (t, h, w) order; key `proj` as the authors'."""

    def __init__(self, patch_size: int, in_channels: int, embed_dim: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_channels, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, latent: torch.Tensor) -> torch.Tensor:
        b, _, t, _, _ = latent.shape
        x = self.proj(latent.transpose(1, 2).flatten(0, 1))  # (B*T, D, h, w)
        return x.flatten(2).transpose(1, 2).unflatten(0, (b, t)).flatten(1, 2)  # (B, T*h*w, D)


class OpenSoraRoPE3D(nn.Module):
    """3D RoPE tables of the authors' `RoPE3D`: the head dim is cut in thirds (t | y | x); each third is a 1-D
    rotate-half RoPE (theta 10000) over that axis' position divided by its interpolation scale. Returns
    (cos, sin), each (S, head_dim) over the (t, h, w)-ordered tokens, in `dtype` (the authors cast the angles to the
    activation dtype before cos/sin; so do we). A module of its own so a CP plan can split its output."""

    def __init__(self, head_dim: int, interpolation_scale_thw: tuple[float, float, float], theta: float = 10000.0):
        super().__init__()
        if head_dim % 6:
            raise ValueError(
                f"3D RoPE splits the head dim in three rotate-half parts: need head_dim % 6 == 0, got {head_dim}"
            )
        self.head_dim, self.scales, self.theta = head_dim, tuple(float(s) for s in interpolation_scale_thw), theta

    def forward(self, frames: int, height: int, width: int, device: torch.device, dtype: torch.dtype):
        d = self.head_dim // 3
        inv_freq = 1.0 / (self.theta ** (torch.arange(0, d, 2, device=device).float() / d))  # (d/2,)
        axes = [torch.arange(n, device=device, dtype=torch.float32) for n in (frames, height, width)]
        grid = torch.meshgrid(*axes, indexing="ij")  # 3 x (T, h, w)
        cos, sin = [], []
        for pos, scale in zip(grid, self.scales, strict=True):
            freqs = (pos.reshape(-1) / scale)[:, None] * inv_freq[None]  # (S, d/2)
            freqs = torch.cat([freqs, freqs], dim=-1).to(dtype)  # (S, d)
            cos.append(freqs.cos())
            sin.append(freqs.sin())
        return torch.cat(cos, dim=-1), torch.cat(sin, dim=-1)  # (S, head_dim) x 2


def apply_rope3d(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (B, S, H, D) with tables (S, D): rotate-half within each third of D."""
    x1, x2 = x.unflatten(-1, (3, 2, -1)).unbind(-2)  # (B, S, H, 3, D/6) each
    rotated = torch.stack((-x2, x1), dim=-2).flatten(-3)  # (B, S, H, D)
    return x * cos[None, :, None] + rotated * sin[None, :, None]


# ---- Skiparse regrouping ------------------------------------------------------------------------------------------
# Token s of the (t, h, w)-ordered sequence (padded to a multiple of n^2) belongs to scope
#   single skip  (sparse_group False): s % n          -> scopes [0, n, 2n, ...], [1, n+1, ...], ...
#   group skip   (sparse_group True):  (s // n) % n   -> [(0..n-1), (n^2..n^2+n-1), ...], [(n..2n-1), ...], ...
# Each scope becomes one batch row, scope-major ("(k b)" like the authors), ordered by s inside the scope.
def sparse_regroup(x: torch.Tensor, n: int, group: bool) -> torch.Tensor:
    """(B, S, ...) with S % n^2 == 0 -> (n*B, S/n, ...)."""
    b, s = x.shape[:2]
    rest = x.shape[2:]
    if group:
        x = x.reshape(b, s // (n * n), n, n, *rest).transpose(1, 2)  # (B, m, a, k, ...): scope m
    else:
        x = x.reshape(b, s // n, n, *rest).transpose(1, 2)  # (B, k, g, ...): scope k
    return x.transpose(0, 1).reshape(n * b, s // n, *rest)


def sparse_ungroup(x: torch.Tensor, n: int, group: bool) -> torch.Tensor:
    """Inverse of `sparse_regroup`: (n*B, S/n, ...) -> (B, S, ...)."""
    nb, g = x.shape[:2]
    b, rest = nb // n, x.shape[2:]
    x = x.reshape(n, b, g, *rest).transpose(0, 1)  # (B, scope, g, ...)
    if group:
        x = x.reshape(b, n, g // n, n, *rest).transpose(1, 2)  # (B, a, m, k, ...)
    else:
        x = x.transpose(1, 2)  # (B, g, k, ...)
    return x.reshape(b, g * n, *rest)


class OpenSoraPlanAttnProcessor:
    """Self-attention over the video tokens (the attention CP splits): RoPE, optional Skiparse regrouping, then
    `dispatch_attention_fn`. Under CP it sees this rank's contiguous token chunk; regrouping that chunk locally and
    letting Ulysses/ring concatenate the chunks in rank order equals the global regrouping when the chunk length is
    a multiple of n^2 (the model refuses CP otherwise, before any collective). Without CP a sequence that is not a
    multiple of n^2 is zero-padded after RoPE with the pad keys masked out, as the authors do."""

    _attention_backend = None
    _parallel_config = None

    def __init__(self, sparse_n: int = 1, sparse_group: bool = False) -> None:
        self.sparse_n, self.sparse_group = sparse_n, sparse_group

    def __call__(
        self,
        attn: Attention,
        hidden_states: torch.Tensor,  # (B, S, C)
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,  # 2 x (S, D)
    ) -> torch.Tensor:
        assert encoder_hidden_states is None and attention_mask is None, "self-attention takes no context or mask"
        q, k, v = (proj(hidden_states).unflatten(-1, (attn.heads, -1)) for proj in (attn.to_q, attn.to_k, attn.to_v))
        if rotary_emb is not None:
            q, k = apply_rope3d(q, *rotary_emb), apply_rope3d(k, *rotary_emb)  # (B, S, H, D)
        seq, n, mask = q.shape[1], self.sparse_n, None
        if n > 1:
            pad = -seq % (n * n)
            if pad:
                if self._parallel_config is not None:
                    raise ValueError(f"Skiparse under context parallelism needs a local chunk that is a multiple of "
                                     f"{n * n} tokens, got {seq}")  # fmt: skip
                q, k, v = (F.pad(x, (0, 0, 0, 0, 0, pad)) for x in (q, k, v))
                real = torch.arange(seq + pad, device=q.device) < seq  # (S_pad,)
                real = real[None, :].expand(q.shape[0], -1)  # (B, S_pad)
                mask = sparse_regroup(real, n, self.sparse_group)[:, None, None, :]  # (n*B, 1, 1, S_pad/n)
            q, k, v = (sparse_regroup(x, n, self.sparse_group) for x in (q, k, v))  # (n*B, S_pad/n, H, D)
        out = dispatch_attention_fn(
            q, k, v, attn_mask=mask, backend=self._attention_backend, parallel_config=self._parallel_config
        )
        if n > 1:
            out = sparse_ungroup(out, n, self.sparse_group)[:, :seq]  # (B, S, H, D)
        out = attn.to_out[1](attn.to_out[0](out.flatten(2, 3)))  # (B, S, C)
        return out / attn.rescale_output_factor


class OpenSoraPlanCrossAttnProcessor:
    """Cross-attention to the caption: stays local under CP (keys are the unsplit caption), hence no
    `_parallel_config`. The authors regroup the queries of Skiparse layers here too and repeat the keys per scope;
    every query still sees the same full caption, so that regrouping cannot change the result and is skipped."""

    _attention_backend = None

    def __call__(
        self,
        attn: Attention,
        hidden_states: torch.Tensor,  # (B, S, C)
        encoder_hidden_states: torch.Tensor,  # (B, L, C)
        attention_mask: torch.Tensor | None = None,  # (B, 1, 1, L) additive
    ) -> torch.Tensor:
        q = attn.to_q(hidden_states).unflatten(-1, (attn.heads, -1))  # (B, S, H, D)
        k, v = (proj(encoder_hidden_states).unflatten(-1, (attn.heads, -1)) for proj in (attn.to_k, attn.to_v))
        out = dispatch_attention_fn(q, k, v, attn_mask=attention_mask, backend=self._attention_backend)
        out = attn.to_out[1](attn.to_out[0](out.flatten(2, 3)))
        return out / attn.rescale_output_factor


class OpenSoraPlanBlock(nn.Module):
    """The authors' `BasicTransformerBlock` in its ada_norm_single form (v1.2 and v1.3 alike): adaLN-modulated
    self-attention with a gate, un-normalised cross-attention, adaLN-modulated GELU-tanh MLP with a gate. `norm2`
    is the MLP's norm (the authors' naming); with `norm_elementwise_affine=False` neither norm has parameters."""

    def __init__(self, dim: int, num_attention_heads: int, attention_head_dim: int, cross_attention_dim: int,
                 activation_fn: str, attention_bias: bool, norm_eps: float, norm_elementwise_affine: bool,
                 sparse_n: int = 1, sparse_group: bool = False) -> None:  # fmt: skip
        super().__init__()
        heads = dict(heads=num_attention_heads, dim_head=attention_head_dim, bias=attention_bias, out_bias=True)
        self.norm1 = nn.LayerNorm(dim, eps=norm_eps, elementwise_affine=norm_elementwise_affine)
        self.attn1 = OpenSoraAttention(query_dim=dim, processor=OpenSoraPlanAttnProcessor(sparse_n, sparse_group),
                                       **heads)  # fmt: skip
        self.norm2 = nn.LayerNorm(dim, eps=norm_eps, elementwise_affine=norm_elementwise_affine)
        self.attn2 = OpenSoraAttention(query_dim=dim, cross_attention_dim=cross_attention_dim,
                                       processor=OpenSoraPlanCrossAttnProcessor(), **heads)  # fmt: skip
        self.ff = FeedForward(dim, activation_fn=activation_fn, bias=True)
        self.scale_shift_table = nn.Parameter(torch.randn(6, dim) / dim**0.5)

    def forward(
        self,
        hidden_states: torch.Tensor,  # (B, S, D)
        encoder_hidden_states: torch.Tensor,  # (B, L, D)
        timestep: torch.Tensor,  # (B, 6D) from adaln_single
        encoder_attention_mask: torch.Tensor | None = None,  # (B, 1, 1, L) additive
        rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,  # 2 x (S, head_dim)
    ) -> torch.Tensor:
        mods = self.scale_shift_table[None] + timestep.reshape(hidden_states.shape[0], 6, -1)  # (B, 6, D)
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = mods.chunk(6, dim=1)  # (B, 1, D) each
        x = self.norm1(hidden_states) * (1 + scale_msa) + shift_msa
        hidden_states = gate_msa * self.attn1(x, rotary_emb=rotary_emb) + hidden_states
        hidden_states = self.attn2(hidden_states, encoder_hidden_states, encoder_attention_mask) + hidden_states
        x = self.norm2(hidden_states) * (1 + scale_mlp) + shift_mlp
        return gate_mlp * self.ff(x) + hidden_states
