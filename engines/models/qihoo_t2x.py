"""Qihoo-T2X text-to-image/video family: the Proxy-Tokenized DiT (engines/models/dits/pt_dit.py) as released in
MindSpeed-MM's qihoo_t2x example (Ascend/MindSpeed-MM@v2.0.0, `examples/qihoo_t2x/inference_model_image.json` and
`mindspeed_mm/models/diffusion/rflow.py`): OpenSoraPlan 1.2's CausalVAE (4 channels, 4x8x8, latents x 0.18215),
T5-XXL states of 200 tokens with their mask, rectified flow ("rflow": logit-normal t with `use_timestep_transform`,
the denoiser predicts the velocity x0 - noise in its first 4 output channels; the other 4 are a PixArt learned-sigma
leftover nobody reads), 30 Euler steps with guidance 4.0 against the empty prompt at inference.

The timestep shift (their `timestep_transform`, on in the released config for training draws and sampling): t is
moved towards noise by k = sqrt(H W / 512^2) x sqrt(frames), pixel sizes, frames = 1 for an image, else
`num_frames // 17 * 5` of the pixel frame count (1024^2 images: k = 2). Below 17 frames (2-4 latent frames) their
count is 0, which sends every timestep to 0; we use the latent frame count there (as opensora.py does).

Sizes: latent height/width must divide by patch x window (tiny: 2 x 4 -> 64 pixels; released Qihoo-T2I-1.1B:
2 x 8 -> 128 pixels); the model raises a ValueError naming the sizes otherwise. Images train as 1-frame clips.

Not reproduced (docs/fidelity/qihoo_t2x.md): caption dropout (MindSpeed-MM's generic text processor swaps in the
empty caption, re-encoded, 10% of the time by default; Qihoo's own training code is not released and a cached text
embedding cannot be re-encoded), and the prompt cleaning of their pipeline (PixArt/DeepFloyd `clean_caption`,
lower-casing), which needs bs4/ftfy: prompts are encoded as given.
"""

from __future__ import annotations

from typing import Any

from flowspeed.configs.schema import ModelConfig
from flowspeed.engines.models.dits import causalvae, pt_dit
from flowspeed.engines.models.dits.causalvae import CausalVAEModel
from flowspeed.engines.models.dits.pt_dit import PTDiT
from flowspeed.engines.models.registry import register_family
from flowspeed.engines.models.video_dit import VideoDiTFamily
from flowspeed.engines.models.video_objectives import RectifiedFlow


def shift_frames(latent_frames: int) -> int:
    """The frame count of MindSpeed-MM's `timestep_transform` for `latent_frames` CausalVAE latents (4k+1 pixel
    frames -> k+1): 1 for an image, else pixel frames // 17 * 5; where that is 0 (5..13 frames), the latent count."""
    pixels = (latent_frames - 1) * 4 + 1
    return 1 if pixels == 1 else (pixels // 17 * 5 or latent_frames)


class QihooT2X(VideoDiTFamily):
    name = "qihoo_t2x"
    size_multiple = 64  # 8x VAE x 2x2 patches x 4x4 windows (tiny); the released 8x8 windows need 128
    transformer_specs = {name: (PTDiT, kwargs) for name, kwargs in pt_dit.PRESETS.items()}
    vae_specs = {
        "tiny": (CausalVAEModel, causalvae.PRESETS["tiny"]),
        "causalvae-v1.2-488": (CausalVAEModel, causalvae.PRESETS["causalvae-v1.2-488"]),
    }
    key_maps = {PTDiT: pt_dit.from_published, CausalVAEModel: causalvae.from_published}
    objective = RectifiedFlow(shift_frames=shift_frames)
    resolution_shift = True  # the released diffusion config's use_timestep_transform
    lora_targets = ("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0", "attn2.to_q", "attn2.to_k",
                    "attn2.to_v", "attn2.to_out.0")  # fmt: skip

    def tiny_overrides(self, cfg: ModelConfig, text_embed_dim: int, latent_channels: int) -> dict[str, Any]:
        # the released head has twice the latent channels (velocity + an unused sigma half); tiny keeps that layout
        return {"in_channels": latent_channels, "out_channels": 2 * latent_channels,
                "caption_channels": text_embed_dim}  # fmt: skip


register_family(QihooT2X())
