"""Stable Diffusion XL text-to-image: diffusers' UNet2DConditionModel, AutoencoderKL, DDPM training
scheduler and pipeline; CLIP-L (hidden states) and CLIP-G with projection (hidden states + pooled).

Prompt embeddings come from `StableDiffusionXLPipeline.encode_prompt` and the size conditioning
from the pipeline's `_get_add_time_ids`, so the UNet is conditioned in training as in inference.
Epsilon prediction, as SDXL base was trained.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import torch
from diffusers import DDPMScheduler, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
from flowspeed.configs.schema import ModelConfig
from flowspeed.engines.models.encoders import CLIP_PRESETS, ImageFamily, load_image_vae
from flowspeed.engines.models.registry import (
    batch_loss,
    ddpm_noised,
    from_pretrained,
    pick_preset,
    register_family,
    seeded_init,
)
from torch import nn
from transformers import CLIPTextModel, CLIPTextModelWithProjection

TIME_EMBED = 8  # addition_time_embed_dim of the tiny UNet (256 in the published one)
UNET_PRESETS: dict[str, dict[str, Any]] = {
    # diffusers' own tiny SDXL test UNet: 2 blocks, cross-attention in the second.
    "tiny": dict(block_out_channels=(32, 64), layers_per_block=1, sample_size=8, norm_num_groups=8,
                 down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                 up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), attention_head_dim=(2, 4),
                 use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=TIME_EMBED,
                 transformer_layers_per_block=(1, 2)),
}  # fmt: skip
# stabilityai/stable-diffusion-xl-base-1.0 scheduler_config.json (Euler for sampling, DDPM for training)
SCHEDULER_CONFIG = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                        steps_offset=1, timestep_spacing="leading", prediction_type="epsilon")  # fmt: skip
TEXT_PARTS: list[tuple[str, str, type]] = [("text_encoder", "tokenizer", CLIPTextModel),
              ("text_encoder_2", "tokenizer_2", CLIPTextModelWithProjection)]  # fmt: skip


class SDXL(ImageFamily):
    """Also the base of the SDXL-shaped families (Kolors): the VAE, the `text_time`-conditioned UNet's epsilon
    loss and the DDPM-train / Euler-sample split are shared; a subclass names its pipeline, text side and
    scheduler configs."""

    name = "sdxl"
    text_parts = TEXT_PARTS
    pipeline_cls = StableDiffusionXLPipeline
    denoiser_subfolder = "unet"
    #: the release's scheduler_config.json: DDPM trains on it, Euler samples with `euler_config`
    scheduler_config: dict[str, Any] = SCHEDULER_CONFIG
    euler_config: dict[str, Any] = SCHEDULER_CONFIG

    def load_vae(self, cfg: ModelConfig) -> nn.Module:
        return load_image_vae(cfg, scaling_factor=0.13025, shift_factor=0.0)  # SDXL's VAE config

    def load_transformer(self, cfg: ModelConfig, text_embed_dim: int, latent_channels: int) -> nn.Module:
        if cfg.transformer.pretrained:
            return from_pretrained(UNet2DConditionModel, cfg.transformer, "transformer")
        pooled = CLIP_PRESETS["tiny"]["projection_dim"]
        with seeded_init(cfg.seed + 3):
            return UNet2DConditionModel(
                in_channels=latent_channels, out_channels=latent_channels, cross_attention_dim=text_embed_dim,
                projection_class_embeddings_input_dim=pooled + 6 * TIME_EMBED,  # pooled ++ 6 size ids
                **pick_preset(cfg.transformer, UNET_PRESETS, "transformer"),
            )  # fmt: skip

    def load_scheduler(self, cfg: ModelConfig) -> DDPMScheduler:
        return DDPMScheduler(**self.scheduler_config)

    def encode_text(self, tokenizer: Any, encoder: nn.Module, captions: list[str], max_length: int) -> dict:
        device = next(encoder.parameters()).device
        embeds, _, pooled, _ = self._text_pipe(tokenizer, encoder).encode_prompt(
            captions, captions, device=device, do_classifier_free_guidance=False
        )
        return {"text_embeds": embeds, "pooled_embeds": pooled}  # (B, 77, D_l + D_g), (B, proj)

    def training_loss(
        self, transformer: nn.Module, scheduler: Any, batch: dict[str, torch.Tensor], generator: torch.Generator
    ) -> torch.Tensor:
        x0, noise, t, noisy = ddpm_noised(batch, scheduler, generator)
        (b, _, h, w), device = x0.shape, x0.device
        size = (h * self.spatial_compression, w * self.spatial_compression)
        pooled = batch["pooled_embeds"].float()
        # (orig h, orig w, crop top, crop left, target h, target w): clips are resized whole, no crop offset
        time_ids = self.pipeline_cls._get_add_time_ids(
            SimpleNamespace(unet=self.core_module(transformer), text_encoder_2=None),
            size, (0, 0), size, dtype=torch.float32, text_encoder_projection_dim=pooled.shape[-1],
        ).to(device).repeat(b, 1)  # fmt: skip
        pred = transformer(
            noisy,
            t,
            encoder_hidden_states=batch["text_embeds"].float(),  # Kolors: (B, L, D_glm), the UNet's text_proj maps it
            added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids},
            return_dict=False,
        )[0]
        return batch_loss(((pred.float() - noise) ** 2).flatten(1).mean(1))

    def export_scheduler(self, cfg: ModelConfig) -> EulerDiscreteScheduler:
        return EulerDiscreteScheduler(**self.euler_config)  # SDXL samples with Euler; it trains with DDPM


register_family(SDXL())
