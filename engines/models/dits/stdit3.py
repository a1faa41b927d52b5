"""OpenSora 1.2 STDiT3 (hpcaitech/Open-Sora v1.2.0, opensora/models/stdit/stdit3.py; hub hpcai-tech/OpenSora-STDiT-v3):
alternating `spatial_blocks[i]` and `temporal_blocks[i]` (same block class, attention over S or over T), per-head
RMSNorm on q/k, RoPE (interleaved, lucidrains' table) in temporal attention, fps added to the timestep embedding,
spatial sin-cos table scaled to the resolution (sqrt(height*width)/512, stretched to round(sqrt(S))), `x_mask`
(B, T) frames that get the t=0 modulation (image / video conditioning), 4 latent channels in, and 8 out: the
authors' STDiT3Config keeps PixArt's `pred_sigma=True` (final_layer.linear has 2 x 4 x patch = 32 rows), while their
rectified flow trains and samples only the first half (`model_output.chunk(2, dim=1)[0]`), so channels 4..7 are an
untrained leftover every caller ignores.

Published layout: an HF folder (config.json + `model.safetensors`) saved by the authors' `PreTrainedModel`; its keys
are this module tree's names exactly, `rope.freqs` (head_dim/2,) and `y_embedder.y_embedding` (300, 4096) included
(the pos-embed frequencies are non-persistent there as here), so `from_published`/`to_published` are identities.

Block calls, one pair per depth index i, always with keyword T and S so a forward pre-hook (Dynamic Sequence
Parallel) can re-shard x between the time and space axes and rewrite T/S:
    x = spatial_blocks[i](x, y, t_mod, mask, x_mask, t0_mod, T=T, S=S)
    x = temporal_blocks[i](x, y, t_mod, mask, x_mask, t0_mod, T=T, S=S, rope=rope)
x (B, T*S, C) in (t, s) order; y (B, L, C); t_mod / t0_mod (B, 6C) (t0_mod None when x_mask is None); mask
(B, 1, 1, L) bool or None; x_mask (B, T) bool or None; rope (cos, sin), each (T, head_dim): a temporal block needs
its full T locally (x_mask and rope are indexed by frame, so a time-split hook must also slice x_mask).

Context parallelism (`_cp_plan`, split over spatial tokens S; Ulysses, and ring too as spatial attention has no
mask): `x_embedder`'s (B, T, S, C) output and the `pos_embed` table (1, S, C) are split along S; the blocks run with
S = local S (the forward reads it off the split tensor), spatial attention goes through Ulysses/ring, temporal
attention (all T local) and cross-attention stay local, `final_layer` (on (B, T, S, C)) is gathered along S.
Needs (H/2)*(W/2) % N == 0 (and heads % N == 0 for Ulysses).
"""

from __future__ import annotations

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from flowspeed.engines.models.dits.opensora_layers import (
    STDIT_CP_PLAN,
    CaptionEmbedder,
    Mlp,
    MultiHeadCrossAttention,
    PatchEmbed3D,
    SelfAttention,
    SinCosPosEmbed2D,
    T2IFinalLayer,
    TemporalRoPE,
    TimestepEmbedder,
    frame_select,
    t2i_modulate,
    unpatchify,
)
from torch import nn

PRESETS: dict[str, dict] = {
    "tiny": dict(hidden_size=32, depth=2, num_attention_heads=2, caption_channels=16, model_max_length=8),
    "STDiT3-XL/2": dict(hidden_size=1152, depth=28, num_attention_heads=16),  # STDiT3_XL_2 in stdit3.py v1.2.0
}
# The report and README say "1.1B" (v1.2.0 docs/report_03.md "we train a 1.1B models", README.md model table), 9%
# below what the authors' STDiT3_XL_2 (stdit3.py v1.2.0) holds: 1,207,643,972 parameters (56 blocks of 21.2M; the
# count includes their rope.freqs, a frozen nn.Parameter of 36, a buffer here), and model.safetensors is that model's
# state dict (docs/fidelity/ref_opensora_facts.py built it on meta). Unverified against the hub file.
PUBLISHED: dict[str, tuple[int, str]] = {
    "STDiT3-XL/2": (
        1_207_643_972,
        "parameters of STDiT3_XL_2 in opensora/models/stdit/stdit3.py v1.2.0 (report: 1.1B)",
    ),
}


def from_published(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return dict(state_dict)


def to_published(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return dict(state_dict)


class STDiT3Block(nn.Module):
    """One spatial (temporal=False) or temporal block; frames where x_mask is False use the t=0 modulation."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float, qk_norm: bool, temporal: bool) -> None:
        super().__init__()
        self.temporal = temporal
        self.norm1 = nn.LayerNorm(hidden_size, eps=1e-6, elementwise_affine=False)
        self.attn = SelfAttention(hidden_size, num_heads, qk_norm=qk_norm, local=temporal)
        self.cross_attn = MultiHeadCrossAttention(hidden_size, num_heads)
        self.norm2 = nn.LayerNorm(hidden_size, eps=1e-6, elementwise_affine=False)
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio))
        self.scale_shift_table = nn.Parameter(torch.randn(6, hidden_size) / hidden_size**0.5)

    def forward(self, x: torch.Tensor, y: torch.Tensor, t_mod: torch.Tensor, mask: torch.Tensor | None = None,
                x_mask: torch.Tensor | None = None, t0_mod: torch.Tensor | None = None, *, T: int, S: int,
                rope: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:  # fmt: skip
        b, _, c = x.shape  # (B, T*S, C)
        mods = (self.scale_shift_table[None] + t_mod.reshape(b, 6, -1)).chunk(6, dim=1)  # 6 x (B, 1, C)
        zero = (self.scale_shift_table[None] + t0_mod.reshape(b, 6, -1)).chunk(6, dim=1) if x_mask is not None else None

        def mix(i: int, j: int | None, h: torch.Tensor) -> torch.Tensor:
            """modulate h with (shift, scale) = mods[i], mods[j], or gate mods[i] (j None); t=0 frames per x_mask."""
            out = t2i_modulate(h, mods[i], mods[j]) if j is not None else mods[i] * h
            if zero is None:
                return out
            alt = t2i_modulate(h, zero[i], zero[j]) if j is not None else zero[i] * h
            return frame_select(x_mask, out, alt, T)

        x_m = mix(0, 1, self.norm1(x))
        if self.temporal:
            x_m = x_m.reshape(b, T, S, c).transpose(1, 2).reshape(b * S, T, c)  # (B*S, T, C)
            x_m = self.attn(x_m, rope).reshape(b, S, T, c).transpose(1, 2).reshape(b, T * S, c)
        else:
            x_m = self.attn(x_m.reshape(b * T, S, c)).reshape(b, T * S, c)  # (B*T, S, C)
        x = x + mix(2, None, x_m)
        x = x + self.cross_attn(x, y, mask)
        return x + mix(5, None, self.mlp(mix(3, 4, self.norm2(x))))


class STDiT3(ModelMixin, ConfigMixin):
    """OpenSora 1.2 denoiser. Block lists: `spatial_blocks`, `temporal_blocks` (run interleaved)."""

    _supports_gradient_checkpointing = False
    _no_split_modules = ["STDiT3Block"]
    _cp_plan = STDIT_CP_PLAN

    @register_to_config
    def __init__(self, in_channels: int = 4, patch_size: tuple[int, int, int] = (1, 2, 2), hidden_size: int = 1152,
                 depth: int = 28, num_attention_heads: int = 16, mlp_ratio: float = 4.0, pred_sigma: bool = True,
                 caption_channels: int = 4096, model_max_length: int = 300, qk_norm: bool = True,
                 input_sq_size: int = 512, vae_downsample: int = 8) -> None:  # fmt: skip
        super().__init__()
        self.patch_size = tuple(patch_size)
        self.out_channels = in_channels * 2 if pred_sigma else in_channels
        self.pos_embed = SinCosPosEmbed2D(hidden_size)
        self.rope = TemporalRoPE(hidden_size // num_attention_heads)
        self.x_embedder = PatchEmbed3D(self.patch_size, in_channels, hidden_size)
        self.t_embedder = TimestepEmbedder(hidden_size)
        self.fps_embedder = TimestepEmbedder(hidden_size)
        self.t_block = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size))
        self.y_embedder = CaptionEmbedder(caption_channels, hidden_size, model_max_length)
        args = (hidden_size, num_attention_heads, mlp_ratio, qk_norm)
        self.spatial_blocks = nn.ModuleList(STDiT3Block(*args, temporal=False) for _ in range(depth))
        self.temporal_blocks = nn.ModuleList(STDiT3Block(*args, temporal=True) for _ in range(depth))
        patch = self.patch_size[0] * self.patch_size[1] * self.patch_size[2]
        self.final_layer = T2IFinalLayer(hidden_size, patch, self.out_channels)
        self._init_weights()

    def _init_weights(self) -> None:
        """The authors' `initialize_weights` (stdit3.py v1.2.0), so a run from scratch starts where theirs does:
        Xavier-uniform linears with zero bias, the fps MLP's output at zero, and each temporal block's attention,
        cross-attention and MLP output projections at zero (the temporal path starts as the identity)."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
        nn.init.normal_(self.fps_embedder.mlp[0].weight, std=0.02)
        nn.init.zeros_(self.fps_embedder.mlp[2].weight)
        for block in self.temporal_blocks:
            for layer in (block.attn.proj, block.cross_attn.proj, block.mlp.fc2):
                nn.init.zeros_(layer.weight)

    def forward(self, hidden_states: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor,
                encoder_attention_mask: torch.Tensor | None = None, *, fps: torch.Tensor | float = 24.0,
                height: torch.Tensor | float | None = None, width: torch.Tensor | float | None = None,
                x_mask: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
        """hidden_states (B, 4, T, H, W) OpenSora-VAE latents, timestep (B,) rectified-flow time x 1000,
        encoder_hidden_states (B, L, 4096) T5 features (L = 300 in training), encoder_attention_mask (B, L).

        Extras: fps (B,) or scalar, the clip's frame rate (the authors feed 120 for images); height / width (B,) or
        scalar, the PIXEL size the pos-embed scale comes from (the authors use sample 0's: we do too), default latent
        size x `vae_downsample`; x_mask (B, T) bool, True = frame is noised (timestep), False = conditioning frame
        kept clean (modulated as t=0). Returns (B, 8, T, H, W) with pred_sigma (the released config): the velocity
        x0 - noise in channels 0..3, an unused half after it; (B, 4, T, H, W) without."""
        cfg = self.config
        b, size = hidden_states.shape[0], hidden_states.shape[-3:]
        h, w = (-(-n // p) for n, p in zip(size[1:], self.patch_size[1:], strict=True))
        height = size[1] * cfg.vae_downsample if height is None else height
        width = size[2] * cfg.vae_downsample if width is None else width
        first = [float(v.reshape(-1)[0]) if torch.is_tensor(v) else float(v) for v in (height, width)]
        scale = (first[0] * first[1]) ** 0.5 / cfg.input_sq_size
        x = self.x_embedder(hidden_states)  # (B, T', S, C)
        pos = self.pos_embed(h, w, scale, round((h * w) ** 0.5), x.device).to(x.dtype)  # (1, S, C)
        x = x + pos[:, None]
        _, frames, tokens, c = x.shape  # tokens = S (local S under CP)
        fps = torch.as_tensor(fps, device=x.device, dtype=torch.float32).reshape(-1).expand(b)
        fps_emb = self.fps_embedder(fps)
        t = self.t_embedder(timestep) + fps_emb  # (B, C)
        t_mod, t0, t0_mod = self.t_block(t), None, None
        if x_mask is not None:
            x_mask = x_mask.bool()
            t0 = self.t_embedder(torch.zeros_like(timestep)) + fps_emb
            t0_mod = self.t_block(t0)
        y = self.y_embedder(encoder_hidden_states)  # (B, L, C)
        mask = None if encoder_attention_mask is None else encoder_attention_mask.bool()[:, None, None, :]
        rope = self.rope(frames, x.device)  # (T', head_dim) x 2
        x = x.reshape(b, frames * tokens, c)
        for spatial, temporal in zip(self.spatial_blocks, self.temporal_blocks, strict=True):
            x = spatial(x, y, t_mod, mask, x_mask, t0_mod, T=frames, S=tokens)
            x = temporal(x, y, t_mod, mask, x_mask, t0_mod, T=frames, S=tokens, rope=rope)
        out = self.final_layer(x.reshape(b, frames, tokens, c), t, x_mask, t0)  # (B, T', S, P), gathered under CP
        return unpatchify(out, self.patch_size, h, w, tuple(size)).float()
