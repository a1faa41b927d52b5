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

The authors train on a noised image: pixel noise with sigma = exp(N(-3, 0.5)) before encoding (SAT
`add_noise_to_first_frame`, THUDM's finetune trainer, diffusers' example). Prep adds it once per clip, as
diffusers' `examples/cogvideo/train_cogvideox_image_to_video_lora.py` does when it precomputes the
encodings, with a generator seeded by the frame's bytes (reproducible, independent of batching); THUDM's
trainer redraws it every step, which a cache cannot. The image latent is still drawn afresh from its
posterior each step, and a whole image condition is zeroed with probability 0.05 (SAT
`noised_image_dropout`, diffusers' example's default).
"""

from __future__ import annotations

import math
import zlib
from typing import Any

import numpy as np
import torch
from diffusers import CogVideoXImageToVideoPipeline
from flowspeed.configs.schema import ModelConfig
from flowspeed.engines.models.cogvideox import TRANSFORMER_PRESETS as T2V_PRESETS
from flowspeed.engines.models.cogvideox import CogVideoX, encode_pixels, to_pixels
from flowspeed.engines.models.cogvideox15 import TINY_15, build_transformer, pad_frames, patch_tokens
from flowspeed.engines.models.registry import register_family
from PIL import Image
from torch import nn

TRANSFORMER_PRESETS: dict[str, dict[str, Any]] = {
    "tiny": T2V_PRESETS["tiny"],  # 1.0 layout
    # 1.5 I2V: the ofs embedding is added to the time embedding, so its width is time_embed_dim's.
    "tiny-1.5": dict(TINY_15, ofs_embed_dim=TINY_15["time_embed_dim"]),
}
# log sigma ~ N(-3, 0.5) of the image's pixel noise (SAT diffusion_video.py add_noise_to_first_frame); None: off
IMAGE_NOISE_LOG_SIGMA: tuple[float, float] | None = (-3.0, 0.5)
IMAGE_DROPOUT = 0.05  # SAT cogvideox*_i2v.yaml noised_image_dropout; diffusers' example's --noised_image_dropout


class CogVideoXI2V(CogVideoX):
    name = "cogvideox_i2v"
    conditioning = "image"
    pipeline_cls = CogVideoXImageToVideoPipeline
    snr_shift_scale = 1.0  # both I2V releases are 5B-line models (CogVideoX-5b-I2V, CogVideoX1.5-5B-I2V)

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
        """(B, T, H, W, C) uint8 -> (B, 2*Cz, T'+1, H', W'): the clip's posterior, then the noised frame 0's own."""
        clip = super().encode_video(vae, frames)  # (B, 2*Cz, T', H', W')
        # (B, 2*Cz, 1, H', W'): the noised frame 0 encoded alone, as the pipeline encodes its image
        image = encode_pixels(vae, noised_first_frame(frames))
        if getattr(vae.config, "invert_scale_latents", False):
            # The pipeline divides this VAE's image latent by the scaling factor instead of multiplying;
            # training multiplies every cached latent by it, so store z / s^2: mean / s^2, logvar - 4 ln s.
            s = float(vae.config.scaling_factor)
            mean, logvar = image.chunk(2, dim=1)
            image = torch.cat([mean / s**2, logvar.clamp(-30.0, 20.0) - 4 * math.log(s)], dim=1)
        return torch.cat([clip, image], dim=2)

    # ---- training -------------------------------------------------------------------------------
    def denoiser_latents(
        self, core: nn.Module, z: torch.Tensor, generator: torch.Generator | None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(B, T'+1, Cz, H', W') -> the clip (padded for 1.5) and the image condition, as the pipeline builds
        it; with a generator, each sample's condition is zeroed with probability IMAGE_DROPOUT."""
        video = pad_frames(z[:, :-1], core.config.patch_size_t)  # (B, F, Cz, H', W')
        image = z[:, -1:]
        if generator is not None and IMAGE_DROPOUT:
            keep = (torch.rand(z.shape[0], generator=generator) >= IMAGE_DROPOUT).to(image.device, image.dtype)
            image = image * keep.view(-1, 1, 1, 1, 1)
        return video, image_condition(image, video.shape[1])  # (B, F, Cz, H', W') each

    def latent_tokens(self, transformer_config: Any, latent_shape: tuple[int, ...]) -> int:
        _, t, h, w = latent_shape[-4:]  # (2*Cz, T'+1, H', W'): the last frame is the image
        return patch_tokens(transformer_config, t - 1, h, w)

    # ---- export and inference -------------------------------------------------------------------
    def pipeline_inputs(self, prompt: str, image: np.ndarray | None) -> dict[str, Any]:
        """The prompt and its first frame (`generate` gives one per prompt, grey when eval passes none)."""
        assert image is not None
        return {"prompt": prompt, "image": Image.fromarray(image)}


def noised_first_frame(frames: torch.Tensor) -> torch.Tensor:
    """(B, T, H, W, C) uint8 -> (B, C, 1, H, W): frame 0 in [-1, 1] plus N(0, sigma^2) pixel noise,
    log sigma ~ N(-3, 0.5) per clip, drawn from a generator seeded by that frame's bytes."""
    image = to_pixels(frames[:, :1])
    if IMAGE_NOISE_LOG_SIGMA is None:
        return image
    mean, std = IMAGE_NOISE_LOG_SIGMA
    noised = []
    for one, raw in zip(image, frames[:, 0], strict=True):
        g = torch.Generator().manual_seed(zlib.crc32(raw.cpu().numpy().tobytes()))
        sigma = math.exp(mean + std * torch.randn((), generator=g).item())
        noised.append(one + sigma * torch.randn(one.shape, generator=g).to(one.device))
    return torch.stack(noised)


def image_condition(image: torch.Tensor, frames: int) -> torch.Tensor:
    """(B, 1, C, H', W') image latent -> (B, frames, C, H', W'): the image first, zeros after, as
    `CogVideoXImageToVideoPipeline.prepare_latents` builds it (for 1.5, `frames` is already padded)."""
    zeros = image.new_zeros(image.shape[0], frames - 1, *image.shape[2:])
    return torch.cat([image, zeros], dim=1)


register_family(CogVideoXI2V())
