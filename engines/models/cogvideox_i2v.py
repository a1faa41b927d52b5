"""CogVideoX image-to-video (1.0 and 1.5 layouts): the first frame conditions the clip.

`CogVideoXImageToVideoPipeline` encodes the conditioning image on its own (a one-frame video), scales
it, and pads it with zeros to the latent frame count; the transformer takes the noisy latents and
that tensor concatenated on channels (`in_channels = 2 * latent channels`). Training builds the same
tensor, from the same one-frame encoding. That encoding is not the clip's first latent frame: the
VAE's group norms pool over time, so frame 0 encoded alone differs from frame 0 inside the clip.
Prep caches one tensor per clip, so `encode_video` appends the image's own posterior to the clip's
as one extra latent frame: `latent_params` is (2*Cz, T'+1, H', W'), the last frame the image.

The layout (1.0 or 1.5) is the transformer's: `preset: tiny` is 1.0-shaped, `preset: tiny-1.5` has
temporal patches and 1.5's ofs embedding, and `pretrained:` weights bring their own config.

Not reproduced: THUDM's trainer adds pixel noise (sigma = exp(N(-3, 0.5))) to the image before
encoding it at every step; a cached encoding cannot. The image latent is still drawn afresh from its
posterior each step.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
from diffusers import CogVideoXImageToVideoPipeline
from PIL import Image
from torch import nn

from configs.schema import ModelConfig
from engines.models.cogvideox import TRANSFORMER_PRESETS as T2V_PRESETS
from engines.models.cogvideox import CogVideoX
from engines.models.cogvideox15 import TINY_15, build_transformer, pad_frames, patch_tokens
from engines.models.registry import conditioning_images, loaded, register_family, sample_latents

TRANSFORMER_PRESETS: dict[str, dict[str, Any]] = {
    "tiny": T2V_PRESETS["tiny"],  # 1.0 layout
    # 1.5 I2V: the ofs embedding is added to the time embedding, so its width is time_embed_dim's.
    "tiny-1.5": dict(TINY_15, ofs_embed_dim=TINY_15["time_embed_dim"]),
}


class CogVideoXI2V(CogVideoX):
    name = "cogvideox_i2v"
    conditioning = "image"
    pipeline_cls = CogVideoXImageToVideoPipeline

    def load_transformer(self, cfg: ModelConfig, text_embed_dim: int, latent_channels: int) -> nn.Module:
        model = build_transformer(cfg, TRANSFORMER_PRESETS, text_embed_dim, 2 * latent_channels, latent_channels)
        c = model.config
        if c.in_channels != 2 * c.out_channels:
            raise ValueError(
                f"model.transformer: in_channels={c.in_channels}, out_channels={c.out_channels} is not an "
                "image-to-video transformer (it takes twice its output channels: noisy latents + image "
                "latents); use an I2V checkpoint such as CogVideoX-5b-I2V, or `model.family: cogvideox` for T2V"
            )
        return model

    # ---- encoding (prep) ------------------------------------------------------------------------
    def encode_video(self, vae: nn.Module, frames: torch.Tensor) -> torch.Tensor:
        """(B, T, H, W, C) uint8 -> (B, 2*Cz, T'+1, H', W'): the clip's posterior, then frame 0's own."""
        clip = super().encode_video(vae, frames)  # (B, 2*Cz, T', H', W')
        image = super().encode_video(vae, frames[:, :1])  # (B, 2*Cz, 1, H', W'), as the pipeline encodes it
        if getattr(vae.config, "invert_scale_latents", False):
            # The pipeline divides this VAE's image latent by the scaling factor instead of multiplying;
            # training multiplies every cached latent by it, so store z / s^2: mean / s^2, logvar - 4 ln s.
            s = float(vae.config.scaling_factor)
            mean, logvar = image.chunk(2, dim=1)
            image = torch.cat([mean / s**2, logvar.clamp(-30.0, 20.0) - 4 * math.log(s)], dim=1)
        return torch.cat([clip, image], dim=2)

    # ---- training -------------------------------------------------------------------------------
    def training_loss(
        self, transformer: nn.Module, scheduler: Any, batch: dict[str, torch.Tensor], generator: torch.Generator
    ) -> torch.Tensor:
        """CogVideoX's x0 loss on the clip latents; the image latents condition, as at inference."""
        core = getattr(transformer, "module", transformer)
        z = sample_latents(batch, generator).permute(0, 2, 1, 3, 4)  # (B, T'+1, Cz, H', W')
        video = pad_frames(z[:, :-1], core.config.patch_size_t)  # (B, F, Cz, H', W')
        condition = image_condition(z[:, -1:], video.shape[1])  # (B, F, Cz, H', W')
        return self.x0_loss(transformer, scheduler, video, batch["text_embeds"], generator, condition)

    def latent_tokens(self, transformer_config: Any, latent_shape: tuple[int, ...]) -> int:
        _, t, h, w = latent_shape[-4:]  # (2*Cz, T'+1, H', W'): the last frame is the image
        return patch_tokens(transformer_config, t - 1, h, w)

    # ---- export and inference -------------------------------------------------------------------
    def generate(
        self,
        pretrained_dir: Path,
        prompts: list[str],
        *,
        num_frames: int,
        height: int,
        width: int,
        steps: int,
        guidance_scale: float,
        seed: int,
        device: torch.device,
        images: list[np.ndarray] | None = None,
    ) -> np.ndarray:
        """(N, T, H, W, 3) uint8 videos, each continuing its image.

        `images`: one (H, W, 3) uint8 first frame per prompt, any size (the pipeline resizes it to
        height x width). Evaluation passes none; then every video starts from a mid-grey frame, which
        keeps eval comparable across runs without inventing content.
        """
        images = conditioning_images(images, prompts, height, width)
        pipe = loaded(
            lambda: CogVideoXImageToVideoPipeline.from_pretrained(pretrained_dir).to(device), pretrained_dir, device
        )
        pipe.set_progress_bar_config(disable=True)
        out = []
        for i, (prompt, img) in enumerate(zip(prompts, images, strict=True)):
            gen = torch.Generator("cpu").manual_seed(seed + i)
            video = pipe(
                image=Image.fromarray(img),
                prompt=prompt,
                num_frames=num_frames,
                height=height,
                width=width,
                num_inference_steps=steps,
                guidance_scale=guidance_scale,
                generator=gen,
                max_sequence_length=pipe.transformer.config.max_text_seq_length,
                output_type="np",
                use_dynamic_cfg=False,
            ).frames[0]  # (T, H, W, C) in [0, 1]
            out.append((np.clip(video, 0, 1) * 255).round().astype(np.uint8))
        return np.stack(out)


def image_condition(image: torch.Tensor, frames: int) -> torch.Tensor:
    """(B, 1, C, H', W') image latent -> (B, frames, C, H', W'): the image first, zeros after, as
    `CogVideoXImageToVideoPipeline.prepare_latents` builds it (for 1.5, `frames` is already padded)."""
    zeros = image.new_zeros(image.shape[0], frames - 1, *image.shape[2:])
    return torch.cat([image, zeros], dim=1)


register_family(CogVideoXI2V())
