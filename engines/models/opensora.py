"""OpenSora 1.0 (STDiT) and OpenSora 1.2 (STDiT3) text-to-video families (hpcaitech/Open-Sora v1.0.0 / v1.2.0).

- `opensora`: STDiT-XL/2 on per-frame SD-VAE latents (stabilityai/sd-vae-ft-ema, diffusers' AutoencoderKL, scaling
  0.18215, read from its config by prep), T5-v1.1-XXL states of 120 tokens, the IDDPM hybrid loss with a learned
  variance (uniform integer timesteps). 10% of training captions are replaced by the model's null caption
  (`class_dropout_prob=0.1`), which is also the unconditional branch of guidance, as in their sampler; guidance
  mixes only the first 3 of the 4 eps channels, as their `forward_with_cfg` does (a PixArt leftover the released
  samples were made with). Their sampler: 100 respaced IDDPM steps, cfg 7.0 (configs/opensora/inference).
- `opensora1.2`: STDiT3-XL/2 on OpenSora's own VAE (a per-frame SDXL VAE then a 4x temporal VAE, per-channel
  latent shift/scale), T5 states of 300 tokens, rectified flow on the first half of the denoiser's 8 output channels
  with logit-normal timesteps and their resolution- and length-dependent shift, fps 24 for clips and 120 for
  single-frame samples (their IMG_FPS). Their sampler: 30 Euler steps, cfg 7.0 (configs/opensora-v1-2/inference).
  DSP (`train.parallel.cp_mode: dsp`) or Ulysses/ring split a sample across ranks.

Released weights: `model.transformer: {preset: STDiT-XL/2, pretrained: OpenSora-v1-HQ-16x512x512.pth}` or
`{preset: STDiT3-XL/2, pretrained: <hpcai-tech/OpenSora-STDiT-v3 folder>}`; `model.vae: {preset: opensora-vae-v1.2,
pretrained: <hpcai-tech/OpenSora-VAE-v1.2 folder>}`; the SD VAE loads as a diffusers folder
(`{pretrained: stabilityai/sd-vae-ft-ema}`).

Not reproduced (docs/fidelity.md (opensora) lists each with its reason): OpenSora 1.2's training-time frame masks
(image/video-continuation conditioning, `mask_ratios`), its frozen caption projection (`freeze_y_embedder`), the
per-clip fps of videos (24 is used, their sampling default), the "aesthetic score: 6.5." their sampler appends to
prompts; the v1.2 VAE's spatial posterior is cached at its mean (their trainer samples it at every step) so a
re-run of prep caches the same latents.
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers import AutoencoderKL
from flowspeed.configs.schema import ModelConfig
from flowspeed.engines.models.dits import opensora_vae, stdit, stdit3
from flowspeed.engines.models.dits.opensora_vae import OpenSoraVAE
from flowspeed.engines.models.dits.stdit import STDiT
from flowspeed.engines.models.dits.stdit3 import STDiT3
from flowspeed.engines.models.registry import register_family
from flowspeed.engines.models.video_dit import VideoDiTFamily
from flowspeed.engines.models.video_objectives import IDDPM, RectifiedFlow
from torch import nn

# stabilityai/sd-vae-ft-ema's config.json (diffusers AutoencoderKL defaults but for these)
SD_VAE = dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4, sample_size=256,
              down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)  # fmt: skip
TINY_SD_VAE = dict(SD_VAE, block_out_channels=(8, 8, 16, 16), layers_per_block=1, norm_num_groups=4)
_STDIT_KEYS = "attn.qkv", "attn.proj", "cross_attn.q_linear", "cross_attn.kv_linear", "cross_attn.proj"


IMG_FPS, VIDEO_FPS = 120.0, 24.0  # v1.2.0 opensora/datasets/datasets.py IMG_FPS; configs/opensora-v1-2 fps = 24


def shift_frames(latent_frames: int) -> int:
    """The frame count OpenSora 1.2's `timestep_transform` uses: `num_frames // 17 * 5` pixel frames, 1 for an
    image. Their VAE makes 5 latent frames per 17 and at most 4 of any remainder, so that is latent // 5 * 5. Below
    17 frames (1-4 latent) theirs gives 0, a zero shift that sends every timestep to 0 (no bucket of theirs has such
    clips): we use the latent count there instead."""
    return latent_frames // 5 * 5 or latent_frames


def _identity(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return dict(state_dict)


class OpenSora(VideoDiTFamily):
    name = "opensora"
    temporal_compression = 1  # a per-frame VAE: any frame count
    transformer_specs = {name: (STDiT, kwargs) for name, kwargs in stdit.PRESETS.items()}
    vae_specs = {"tiny": (AutoencoderKL, TINY_SD_VAE), "sd-vae-ft-ema": (AutoencoderKL, SD_VAE)}
    key_maps = {STDiT: stdit.from_published, AutoencoderKL: _identity}
    objective = IDDPM()
    caption_dropout = 0.1
    guidance_channels = 3  # v1.0.0 opensora/schedulers/iddpm/__init__.py forward_with_cfg: model_out[:, :3]
    lora_targets = (*_STDIT_KEYS, "attn_temp.qkv", "attn_temp.proj")

    def tiny_overrides(self, cfg: ModelConfig, text_embed_dim: int, latent_channels: int) -> dict[str, Any]:
        return {"in_channels": latent_channels, "caption_channels": text_embed_dim,
                "model_max_length": cfg.max_text_length}  # fmt: skip

    def encode_video(self, vae: nn.Module, frames: torch.Tensor) -> torch.Tensor:
        """Frame by frame through the image VAE: (B, T, H, W, 3) -> (B, 8, T, H/8, W/8) raw posterior (prep
        records the VAE's scaling factor beside it)."""
        b, t = frames.shape[:2]
        x = frames.flatten(0, 1).permute(0, 3, 1, 2).to(vae.device, vae.dtype) / 127.5 - 1.0  # (B*T, 3, H, W)
        params = vae.encode(x).latent_dist.parameters  # (B*T, 8, h, w)
        return params.reshape(b, t, *params.shape[1:]).transpose(1, 2)

    def decode(self, vae: nn.Module, z: torch.Tensor, num_frames: int) -> torch.Tensor:
        b, _, t = z.shape[:3]
        flat = z.transpose(1, 2).flatten(0, 1) / vae.config.scaling_factor  # (B*T, 4, h, w)
        frames = torch.cat([vae.decode(flat[i : i + 8]).sample for i in range(0, flat.shape[0], 8)])
        return frames.reshape(b, t, *frames.shape[1:]).transpose(1, 2)  # (B, 3, T, H, W)


class OpenSora12(VideoDiTFamily):
    name = "opensora1.2"
    transformer_specs = {name: (STDiT3, kwargs) for name, kwargs in stdit3.PRESETS.items()}
    vae_specs = {name: (OpenSoraVAE, kwargs) for name, kwargs in opensora_vae.PRESETS.items()}
    key_maps = {STDiT3: stdit3.from_published, OpenSoraVAE: opensora_vae.from_published}
    objective = RectifiedFlow(shift_frames=shift_frames)
    resolution_shift = True
    caption_dropout = 0.1
    lora_targets = _STDIT_KEYS

    def frame_count_error(self, num_frames: int) -> str | None:
        # the VAE takes any length (17-frame chunks, the last front-padded); prep's buckets still pick 4k+1
        return None if num_frames >= 1 else f"at least one frame is needed, not {num_frames}"

    def latent_frame_count(self, num_frames: int) -> int | None:
        """The released VAE's rule (opensora_vae.OpenSoraVAE.latent_frames): 5 latent frames per 17-frame chunk,
        ceil(r / 4) for the r frames left; buckets such as the authors' 51 / 102 frames are valid."""
        if num_frames < 1:
            return None
        k, r = divmod(num_frames, 17)
        return 5 * k + -(-r // 4)

    def tiny_overrides(self, cfg: ModelConfig, text_embed_dim: int, latent_channels: int) -> dict[str, Any]:
        return {"in_channels": latent_channels, "caption_channels": text_embed_dim,
                "model_max_length": cfg.max_text_length}  # fmt: skip

    def latent_frames(self, vae: nn.Module | None, num_frames: int) -> int:
        return vae.latent_frames(num_frames)

    def denoiser_inputs(self, x_t: torch.Tensor) -> dict[str, Any]:
        """The fps the authors feed: IMG_FPS (120) for a single frame, else the video rate (24)."""
        return {"fps": IMG_FPS if x_t.shape[2] == 1 else VIDEO_FPS}

    def vae_encode(self, vae: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return vae.encode(x, sample_spatial=False)

    def decode(self, vae: nn.Module, z: torch.Tensor, num_frames: int) -> torch.Tensor:
        return vae.decode(vae.denormalize_latents(z), num_frames)


register_family(OpenSora())
register_family(OpenSora12())
