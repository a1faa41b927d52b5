"""Qihoo-T2X text-to-image/video family: the Proxy-Tokenized DiT (engines/models/dits/pt_dit.py) as released in
MindSpeed-MM's qihoo_t2x example: OpenSoraPlan 1.2's CausalVAE (4 channels, 4x8x8), T5 states of 200 tokens with
their mask, rectified flow (the denoiser predicts the velocity in its first 4 output channels; the other 4 are a
PixArt learned-sigma leftover the sampler ignores), 30 Euler steps with guidance 4.0 at inference.

Sizes: latent height/width must divide by patch x window (tiny: 2 x 4 -> 64 pixels; released Qihoo-T2I-1.1B:
2 x 8 -> 128 pixels); the model raises a ValueError naming the sizes otherwise. Images train as 1-frame clips.

Not reproduced: the released config's timestep distribution details beyond logit-normal rectified flow (no
resolution shift is applied), and caption dropout (the released trainer re-encodes an empty caption, which a cached
text embedding cannot).
"""

from __future__ import annotations

from typing import Any

from configs.schema import ModelConfig
from engines.models.dits import causalvae, pt_dit
from engines.models.dits.causalvae import CausalVAEModel
from engines.models.dits.pt_dit import PTDiT
from engines.models.registry import register_family
from engines.models.video_dit import VideoDiTFamily
from engines.models.video_objectives import RectifiedFlow


class QihooT2X(VideoDiTFamily):
    name = "qihoo_t2x"
    size_multiple = 64  # 8x VAE x 2x2 patches x 4x4 windows (tiny); the released 8x8 windows need 128
    transformer_specs = {name: (PTDiT, kwargs) for name, kwargs in pt_dit.PRESETS.items()}
    vae_specs = {
        "tiny": (CausalVAEModel, causalvae.PRESETS["tiny"]),
        "causalvae-v1.2-488": (CausalVAEModel, causalvae.PRESETS["causalvae-v1.2-488"]),
    }
    key_maps = {PTDiT: pt_dit.from_published, CausalVAEModel: causalvae.from_published}
    objective = RectifiedFlow()
    lora_targets = ("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0", "attn2.to_q", "attn2.to_k",
                    "attn2.to_v", "attn2.to_out.0")  # fmt: skip

    def tiny_overrides(self, cfg: ModelConfig, text_embed_dim: int, latent_channels: int) -> dict[str, Any]:
        # the released head has twice the latent channels (velocity + an unused sigma half); tiny keeps that layout
        return {"in_channels": latent_channels, "out_channels": 2 * latent_channels,
                "caption_channels": text_embed_dim}  # fmt: skip


register_family(QihooT2X())
