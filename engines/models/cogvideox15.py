"""CogVideoX 1.5 text-to-video: the 1.0 family with temporal patches (`patch_size_t=2`).

A 1.5 transformer patches two latent frames into one token, so the latent frame count must be even.
Diffusers' pipelines pad an odd count at the front and drop the padding after denoising; THUDM's
finetune trainers (CogVideo `finetune/models/cogvideox_*/lora_trainer.py`) pad the training latents
the same way, with copies of the first latent frame. This module holds that rule and the v-prediction
objective on already-padded latents, which the image-to-video family shares.
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers import CogVideoXTransformer3DModel
from flowspeed.configs.schema import ModelConfig
from flowspeed.engines.models.cogvideox import CogVideoX
from flowspeed.engines.models.registry import from_pretrained, pick_preset, register_family, seeded_init
from torch import nn

# The tiny preset with 1.5's layout: temporal patches of 2, no patch bias, 3D RoPE sliced from a
# fixed grid (1.5 ships sample_height = sample_width = 300 latents for any resolution; 64 covers 512 px).
TINY_15: dict[str, Any] = dict(
    num_attention_heads=2,
    attention_head_dim=16,
    num_layers=2,
    time_embed_dim=32,
    patch_size=2,
    patch_size_t=2,
    patch_bias=False,
    sample_height=64,
    sample_width=64,
    sample_frames=9,
    temporal_compression_ratio=4,
    use_rotary_positional_embeddings=True,
)
# "tiny" is what `preset: tiny` (the config default) builds; "tiny-1.5" names the layout explicitly.
TRANSFORMER_PRESETS: dict[str, dict[str, Any]] = {"tiny": TINY_15, "tiny-1.5": TINY_15}


def padded_frames(latent_frames: int, patch_size_t: int | None) -> int:
    """Latent frames the transformer sees: rounded up to a multiple of `patch_size_t` (1.5) or as is."""
    pt = patch_size_t or 1
    return latent_frames + (-latent_frames) % pt


def pad_frames(latents: torch.Tensor, patch_size_t: int | None) -> torch.Tensor:
    """(B, T', C, H', W') -> (B, F, C, H', W'), F = padded_frames(T'): copies of frame 0 in front,
    where the pipeline's extra frames sit (it drops `latents[:, :extra]` before decoding)."""
    extra = padded_frames(latents.shape[1], patch_size_t) - latents.shape[1]
    if not extra:
        return latents
    return torch.cat([latents[:, :1].expand(-1, extra, -1, -1, -1), latents], dim=1)


def build_transformer(
    cfg: ModelConfig,
    presets: dict[str, dict[str, Any]],
    text_embed_dim: int,
    in_channels: int,
    out_channels: int,
) -> nn.Module:
    """`pretrained:` weights, or a seeded random init of a named preset (the same seed as CogVideoX)."""
    if cfg.transformer.pretrained:
        return from_pretrained(CogVideoXTransformer3DModel, cfg.transformer, "transformer")
    preset = pick_preset(cfg.transformer, presets, "transformer")
    with seeded_init(cfg.seed + 3):
        return CogVideoXTransformer3DModel(
            in_channels=in_channels,
            out_channels=out_channels,
            text_embed_dim=text_embed_dim,
            max_text_seq_length=cfg.max_text_length,
            **preset,
        )


def patch_tokens(transformer_config: Any, latent_frames: int, height: int, width: int) -> int:
    """Tokens per sample after padding: (F / p_t) * (H' / p) * (W' / p)."""
    p, pt = transformer_config.patch_size, transformer_config.patch_size_t or 1
    return padded_frames(latent_frames, pt) // pt * (height // p) * (width // p)


class CogVideoX15(CogVideoX):
    """Same VAE, T5, scheduler, export and pipeline as 1.0 (`CogVideoXPipeline` pads on its own);
    only the transformer presets and the training-time padding differ."""

    name = "cogvideox1.5"
    snr_shift_scale = 1.0  # sat/configs/cogvideox1.5_5b.yaml: ZeroSNRDDPMDiscretization's default shift

    def load_transformer(self, cfg: ModelConfig, text_embed_dim: int, latent_channels: int) -> nn.Module:
        return build_transformer(cfg, TRANSFORMER_PRESETS, text_embed_dim, latent_channels, latent_channels)

    def denoiser_latents(
        self, core: nn.Module, z: torch.Tensor, generator: torch.Generator | None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        return pad_frames(z, core.config.patch_size_t), None  # (B, F, C, H', W'), F even

    def latent_tokens(self, transformer_config: Any, latent_shape: tuple[int, ...]) -> int:
        _, t, h, w = latent_shape[-4:]  # (2*Cz, T', H', W')
        return patch_tokens(transformer_config, t, h, w)


register_family(CogVideoX15())
