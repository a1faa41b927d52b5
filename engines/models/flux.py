"""FLUX.1 text-to-image: diffusers' Flux transformer, AutoencoderKL and flow-matching scheduler; a CLIP
text encoder (pooled vector) and a T5 encoder (per-token states).

Prompt embeddings come from `FluxPipeline.encode_prompt`; latents are packed into 2x2 patches and
given position ids with the pipeline's own `_pack_latents` / `_prepare_latent_image_ids`, so the
transformer sees in training what it sees in inference. Training is diffusers' train_dreambooth_flux.py with its
defaults: rectified flow with `weighting_scheme="none"` (s uniform on the scheduler's 1000-step grid, unshifted:
dev's scheduler shifts only at inference, with `use_dynamic_shifting`; schnell's shift is 1), timestep s, target
eps - x0, plain MSE; dev (guidance_embeds) is fed guidance 3.5, schnell none. The scheduler follows the variant:
dev's config (dynamic, resolution-dependent shift at sampling) or schnell's (no shift), read off the transformer's
`guidance_embeds`.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
from diffusers.training_utils import compute_density_for_timestep_sampling
from flowspeed.configs.schema import ModelConfig
from flowspeed.engines.models.encoders import CLIP_PRESETS, ImageFamily, denoiser_config, load_image_vae
from flowspeed.engines.models.registry import (
    batch_loss,
    from_pretrained,
    latents_and_noise,
    pick_preset,
    register_family,
    seeded_init,
)
from torch import nn
from transformers import CLIPTextModel, T5EncoderModel

TRANSFORMER_PRESETS: dict[str, dict[str, Any]] = {
    # schnell-style: timestep-distilled, no guidance embedding
    "tiny": dict(num_layers=1, num_single_layers=1, attention_head_dim=16, num_attention_heads=2,
                 axes_dims_rope=(4, 6, 6), guidance_embeds=False),
    # dev-style: guidance-distilled, the guidance scale is an input embedding (trained at 3.5)
    "tiny-dev": dict(num_layers=1, num_single_layers=1, attention_head_dim=16, num_attention_heads=2,
                     axes_dims_rope=(4, 6, 6), guidance_embeds=True),
}  # fmt: skip
# FLUX.1-schnell's scheduler_config.json; FLUX.1-dev's shifts by the image's token count at sampling time
SCHEDULER_CONFIG = dict(num_train_timesteps=1000, shift=1.0, use_dynamic_shifting=False, base_shift=0.5,
                        max_shift=1.15, base_image_seq_len=256, max_image_seq_len=4096)  # fmt: skip
DEV_SCHEDULER_CONFIG = dict(SCHEDULER_CONFIG, shift=3.0, use_dynamic_shifting=True)
# train_dreambooth_flux.py's defaults: --weighting_scheme none (uniform s, unweighted), --guidance_scale 3.5
WEIGHTING_SCHEME = "none"
TRAIN_GUIDANCE = 3.5
TEXT_PARTS: list[tuple[str, str, type]] = [
    ("text_encoder", "tokenizer", CLIPTextModel),
    ("text_encoder_2", "tokenizer_2", T5EncoderModel),
]


class Flux(ImageFamily):
    name = "flux"
    text_parts = TEXT_PARTS
    pipeline_cls = FluxPipeline
    max_sequence_tokenizer = "tokenizer_2"

    def load_vae(self, cfg: ModelConfig) -> nn.Module:
        return load_image_vae(cfg, scaling_factor=0.3611, shift_factor=0.1159)  # FLUX.1's VAE config

    def load_transformer(self, cfg: ModelConfig, text_embed_dim: int, latent_channels: int) -> nn.Module:
        if cfg.transformer.pretrained:
            return from_pretrained(FluxTransformer2DModel, cfg.transformer, "transformer")
        with seeded_init(cfg.seed + 3):
            return FluxTransformer2DModel(
                in_channels=4 * latent_channels, joint_attention_dim=text_embed_dim,
                pooled_projection_dim=CLIP_PRESETS["tiny"]["hidden_size"],  # CLIPTextModel's pooler output
                **pick_preset(cfg.transformer, TRANSFORMER_PRESETS, "transformer"),
            )  # fmt: skip

    def load_scheduler(self, cfg: ModelConfig) -> FlowMatchEulerDiscreteScheduler:
        dev = denoiser_config(cfg, FluxTransformer2DModel, TRANSFORMER_PRESETS).get("guidance_embeds", False)
        return FlowMatchEulerDiscreteScheduler(**(DEV_SCHEDULER_CONFIG if dev else SCHEDULER_CONFIG))

    def encode_text(self, tokenizer: Any, encoder: nn.Module, captions: list[str], max_length: int) -> dict:
        device = next(encoder.parameters()).device
        embeds, pooled, _ = self._text_pipe(tokenizer, encoder).encode_prompt(
            captions, captions, device=device, max_sequence_length=max_length
        )
        return {"text_embeds": embeds, "pooled_embeds": pooled}  # (B, L, D_t5), (B, D_clip)

    def training_loss(
        self, transformer: nn.Module, scheduler: Any, batch: dict[str, torch.Tensor], generator: torch.Generator
    ) -> torch.Tensor:
        core = self.core_module(transformer)
        x0, noise = latents_and_noise(batch, generator)
        (b, c, h, w), device = x0.shape, x0.device
        u = compute_density_for_timestep_sampling(WEIGHTING_SCHEME, b, generator=generator)
        idx = (u * scheduler.config.num_train_timesteps).long()
        sigma = scheduler.sigmas[idx].to(device, torch.float32).view(-1, 1, 1, 1)
        timestep = (scheduler.timesteps[idx] / scheduler.config.num_train_timesteps).to(device)
        noisy = FluxPipeline._pack_latents((1.0 - sigma) * x0 + sigma * noise, b, c, h, w)  # (B, h*w/4, 4c)
        img_ids = FluxPipeline._prepare_latent_image_ids(b, h // 2, w // 2, device, x0.dtype)
        text = batch["text_embeds"].float()
        txt_ids = torch.zeros(text.shape[1], 3, device=device)
        guidance = torch.full((b,), TRAIN_GUIDANCE, device=device) if core.config.guidance_embeds else None
        pred = transformer(hidden_states=noisy, timestep=timestep, guidance=guidance,
                           pooled_projections=batch["pooled_embeds"].float(), encoder_hidden_states=text,
                           txt_ids=txt_ids, img_ids=img_ids, return_dict=False)[0]  # fmt: skip
        target = FluxPipeline._pack_latents(noise - x0, b, c, h, w)
        return batch_loss(((pred.float() - target) ** 2).flatten(1).mean(1))

    def latent_tokens(self, transformer_config: Any, latent_shape: tuple[int, ...]) -> int:
        _, h, w = latent_shape[-3:]
        return (h // 2) * (w // 2)  # 2x2 packing

    # ---- what a sampler outside the pipeline calls (flow_grpo's SDE rollouts) ----------------------------------
    def flow_velocity(
        self, transformer: nn.Module, latents: torch.Tensor, sigma: torch.Tensor, batch: dict[str, torch.Tensor]
    ) -> torch.Tensor:
        """The velocity v = d x / d sigma (eps - x0) at `latents` (B, C, h, w), noise levels `sigma` (B,), in that
        unpacked layout: FluxPipeline's denoiser call (packed 2x2 patches, timestep = sigma, dev's embedded guidance
        at the training scale). The same call as `training_loss` makes, repeated so the objective stays readable."""
        core = self.core_module(transformer)
        (b, c, h, w), device = latents.shape, latents.device
        text = batch["text_embeds"].float()
        guidance = torch.full((b,), TRAIN_GUIDANCE, device=device) if core.config.guidance_embeds else None
        pred = transformer(hidden_states=FluxPipeline._pack_latents(latents, b, c, h, w), timestep=sigma,
                           guidance=guidance, pooled_projections=batch["pooled_embeds"].float(),
                           encoder_hidden_states=text, txt_ids=torch.zeros(text.shape[1], 3, device=device),
                           img_ids=FluxPipeline._prepare_latent_image_ids(b, h // 2, w // 2, device, latents.dtype),
                           return_dict=False)[0]  # fmt: skip
        f = self.spatial_compression  # _unpack_latents takes the pixel size
        return FluxPipeline._unpack_latents(pred.float(), h * f, w * f, f)

    def sampling_sigmas(self, scheduler: Any, steps: int, latent_shape: tuple[int, ...]) -> torch.Tensor:
        """(steps + 1,) the sigmas FluxPipeline samples `steps` steps on, ending at 0: linspace(1, 1/steps), shifted
        by the image's token count where the scheduler shifts dynamically (dev), on a copy of the scheduler."""
        from diffusers.pipelines.flux.pipeline_flux import calculate_shift

        grid = FlowMatchEulerDiscreteScheduler.from_config(scheduler.config)
        cfg, (h, w) = grid.config, latent_shape[-2:]
        mu = calculate_shift((h // 2) * (w // 2), cfg.get("base_image_seq_len", 256),
                             cfg.get("max_image_seq_len", 4096), cfg.get("base_shift", 0.5),
                             cfg.get("max_shift", 1.15))  # fmt: skip
        grid.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), mu=mu)
        return grid.sigmas.float()


register_family(Flux())
