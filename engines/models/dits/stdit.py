"""OpenSora 1.0 STDiT (hpcaitech/Open-Sora v1.0.0, opensora/models/stdit/stdit.py): per block spatial attention,
temporal attention (both gated by the same adaLN gate), un-normalised cross-attention to T5 (4096-d, 120 tokens),
adaLN-modulated MLP; adaLN-single (`t_block`), learned sigma (C_out = 2 C_in), SD-VAE latents (4 ch), patch (1,2,2).

Published layout: a bare `.pth` state dict (OpenSora-v1-16x256x256.pth, OpenSora-v1-HQ-16x512x512.pth) whose keys
are this module tree's names exactly, including the two fixed sin-cos buffers of the training size (`input_size`,
latent T x H x W): `pos_embed` (1, S, C) and `pos_embed_temporal` (1, T, C). We keep them as the authors do and use
them when the input has the training size; other sizes get the same tables computed for their size (the authors'
model only runs at its training size). `from_published` / `to_published` are identities.

Block calls (list `blocks`): `block(x, y, t_mod, mask, T=T, S=S, tpe=tpe)`, x (B, T*S, C) in (t, s) order, y
(B, L, C) the projected caption, t_mod (B, 6C), mask (B, 1, 1, L) bool or None, tpe (1, T, C) for block 0 only
(the authors add the temporal table inside block 0's temporal branch only).

Context parallelism (`_cp_plan`, split over spatial tokens S; Ulysses, and ring too as spatial attention has no
mask): `x_embedder` returns (B, T, S, C) and the plan splits it and the `spatial_pos` table (1, S, C) along S; the
forward then runs the blocks with S = local S, so spatial attention (over S) goes through Ulysses/ring while
temporal attention (over T, all local) and cross-attention stay local; `final_layer` works on (B, T, S, C) and its
output is gathered along S. Needs (H/2)*(W/2) % N == 0.
"""

from __future__ import annotations

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from flowspeed.engines.models.dits.opensora_layers import (
    CaptionEmbedder,
    Mlp,
    MultiHeadCrossAttention,
    PatchEmbed3D,
    SelfAttention,
    SinCosPosEmbed2D,
    T2IFinalLayer,
    TimestepEmbedder,
    sincos_1d,
    stdit_cp_plan,
    t2i_modulate,
    unpatchify,
)
from torch import nn

_XL = dict(hidden_size=1152, depth=28, num_attention_heads=16)
PRESETS: dict[str, dict] = {
    "tiny": dict(
        hidden_size=32, depth=2, num_attention_heads=2, caption_channels=16, model_max_length=8, input_size=(2, 8, 8)
    ),  # fmt: skip
    # configs/opensora/{train,inference}/16x256x256.py and 16x512x512.py at v1.0.0: 16 frames, SD-VAE latents
    "STDiT-XL/2": dict(_XL, space_scale=0.5, input_size=(16, 32, 32)),
    "STDiT-XL/2-512": dict(_XL, space_scale=1.0, input_size=(16, 64, 64)),
}
# The README states "724M" (v1.0.0 README.md, "The number of parameters is 724M"), 4.7% below what the authors'
# module tree holds: STDiT_XL_2 of stdit.py v1.0.0 counts 759,620,768 parameters (PixArt-alpha's 611M + 28 temporal
# attentions of 5.3M), and the released .pth is that module's state_dict (+ the fixed pos-embed buffers). The count
# below is that tree's; it could not be checked against the released file (the hubs are unreachable here).
PUBLISHED: dict[str, tuple[int, str]] = {
    name: (759_620_768, "parameters of STDiT_XL_2 in opensora/models/stdit/stdit.py v1.0.0 (README v1.0.0 says 724M)")
    for name in ("STDiT-XL/2", "STDiT-XL/2-512")
}


def from_published(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return dict(state_dict)


def to_published(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return dict(state_dict)


class STDiTBlock(nn.Module):
    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size, eps=1e-6, elementwise_affine=False)
        self.attn = SelfAttention(hidden_size, num_heads)  # spatial: the attention CP splits
        self.cross_attn = MultiHeadCrossAttention(hidden_size, num_heads)
        self.norm2 = nn.LayerNorm(hidden_size, eps=1e-6, elementwise_affine=False)
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio))
        self.scale_shift_table = nn.Parameter(torch.randn(6, hidden_size) / hidden_size**0.5)
        self.attn_temp = SelfAttention(hidden_size, num_heads, local=True)

    def forward(self, x: torch.Tensor, y: torch.Tensor, t_mod: torch.Tensor, mask: torch.Tensor | None = None, *,
                T: int, S: int, tpe: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
        b, _, c = x.shape  # (B, T*S, C)
        mods = (self.scale_shift_table[None] + t_mod.reshape(b, 6, -1)).chunk(6, dim=1)  # 6 x (B, 1, C)
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = mods
        x_m = t2i_modulate(self.norm1(x), shift_msa, scale_msa)
        x_s = self.attn(x_m.reshape(b * T, S, c)).reshape(b, T * S, c)  # spatial: (B*T, S, C)
        x = x + gate_msa * x_s
        x_t = x.reshape(b, T, S, c).transpose(1, 2).reshape(b * S, T, c)  # temporal: (B*S, T, C)
        if tpe is not None:
            x_t = x_t + tpe
        x_t = self.attn_temp(x_t).reshape(b, S, T, c).transpose(1, 2).reshape(b, T * S, c)
        x = x + gate_msa * x_t
        x = x + self.cross_attn(x, y, mask)
        return x + gate_mlp * self.mlp(t2i_modulate(self.norm2(x), shift_mlp, scale_mlp))


class STDiT(ModelMixin, ConfigMixin):
    """OpenSora 1.0 denoiser. Block list: `blocks`. No forward extras beyond the contract."""

    _supports_gradient_checkpointing = False
    _no_split_modules = ["STDiTBlock"]
    _cp_plan = stdit_cp_plan("spatial_pos")

    @register_to_config
    def __init__(self, in_channels: int = 4, patch_size: tuple[int, int, int] = (1, 2, 2), hidden_size: int = 1152,
                 depth: int = 28, num_attention_heads: int = 16, mlp_ratio: float = 4.0, pred_sigma: bool = True,
                 caption_channels: int = 4096, model_max_length: int = 120, space_scale: float = 1.0,
                 time_scale: float = 1.0, input_size: tuple[int, int, int] = (16, 32, 32)) -> None:  # fmt: skip
        super().__init__()
        self.patch_size = tuple(patch_size)
        self.out_channels = in_channels * 2 if pred_sigma else in_channels
        self.spatial_pos = SinCosPosEmbed2D(hidden_size)
        self.grid = tuple(n // p for n, p in zip(input_size, self.patch_size, strict=True))  # training (T', h, w)
        t, h, w = self.grid
        self.register_buffer("pos_embed", self.spatial_pos(h, w, space_scale, None, None))
        self.register_buffer("pos_embed_temporal", sincos_1d(torch.arange(t) / time_scale, hidden_size)[None])
        self.x_embedder = PatchEmbed3D(self.patch_size, in_channels, hidden_size)
        self.t_embedder = TimestepEmbedder(hidden_size)
        self.t_block = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size))
        self.y_embedder = CaptionEmbedder(caption_channels, hidden_size, model_max_length)
        self.blocks = nn.ModuleList(STDiTBlock(hidden_size, num_attention_heads, mlp_ratio) for _ in range(depth))
        patch = self.patch_size[0] * self.patch_size[1] * self.patch_size[2]
        self.final_layer = T2IFinalLayer(hidden_size, patch, self.out_channels)

    def forward(self, hidden_states: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor,
                encoder_attention_mask: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
        """hidden_states (B, 4, T, H, W) SD-VAE latents, timestep (B,) DDPM step in [0, 1000), encoder_hidden_states
        (B, L, 4096) T5 features, encoder_attention_mask (B, L) 1 = real token. Returns (B, 8, T, H, W): the noise
        prediction (channels 0..3) and the learned variance interpolation (4..7)."""
        cfg = self.config
        size = hidden_states.shape[-3:]
        h, w = (-(-n // p) for n, p in zip(size[1:], self.patch_size[1:], strict=True))
        x = self.x_embedder(hidden_states)  # (B, T', S, C)
        table = self.pos_embed if (h, w) == self.grid[1:] else None  # the stored table at the training size
        pos = self.spatial_pos(h, w, cfg.space_scale, None, x.device, table).to(x.dtype)  # (1, S, C)
        x = x + pos[:, None]
        b, frames, tokens, c = x.shape  # tokens = S (local S under CP)
        if frames == self.grid[0]:
            tpe = self.pos_embed_temporal.to(x.dtype)
        else:
            tpe = sincos_1d(torch.arange(frames, device=x.device) / cfg.time_scale, c)[None].to(x.dtype)  # (1, T', C)
        t = self.t_embedder(timestep)  # (B, C)
        t_mod = self.t_block(t)  # (B, 6C)
        y = self.y_embedder(encoder_hidden_states)  # (B, L, C)
        mask = None if encoder_attention_mask is None else encoder_attention_mask.bool()[:, None, None, :]
        x = x.reshape(b, frames * tokens, c)
        for i, block in enumerate(self.blocks):
            x = block(x, y, t_mod, mask, T=frames, S=tokens, tpe=tpe if i == 0 else None)
        out = self.final_layer(x.reshape(b, frames, tokens, c), t)  # (B, T', S, P) (gathered to full S under CP)
        return unpatchify(out, self.patch_size, h, w, tuple(size)).float()
