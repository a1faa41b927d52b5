"""Stable Diffusion 3 text-to-image: diffusers' SD3 transformer, AutoencoderKL, flow-matching scheduler
and pipeline; two CLIP text encoders with projection and a T5 encoder.

Prompt embeddings come from `StableDiffusion3Pipeline.encode_prompt`, so the cached per-token
states (CLIP-L ++ CLIP-G, padded to T5's width, then T5's tokens) and pooled vector are exactly
what inference feeds the transformer. Training is diffusers' examples/dreambooth/train_dreambooth_sd3.py with
its defaults: rectified flow x_t = (1 - s) x0 + s eps, s drawn logit-normal(0, 1) and looked up on the scheduler's
shifted (shift 3.0) sigma grid, and the EDM-style preconditioned output x0_hat = x_t - s v (`precondition_outputs=1`)
regressed on x0, i.e. the flow-matching loss weighted by s^2. `precondition_outputs = False` on the family gives
the SD3 paper's plain v-loss (target eps - x0).
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
from diffusers.training_utils import compute_density_for_timestep_sampling, compute_loss_weighting_for_sd3
from flowspeed.configs.schema import ModelConfig
from flowspeed.engines.models.encoders import CLIP_PRESETS, ImageFamily, load_image_vae
from flowspeed.engines.models.registry import (
    batch_loss,
    from_pretrained,
    latents_and_noise,
    pick_preset,
    register_family,
    seeded_init,
)
from torch import nn
from transformers import CLIPTextModelWithProjection, T5EncoderModel

TRANSFORMER_PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(sample_size=8, patch_size=2, num_layers=2, attention_head_dim=16, num_attention_heads=2,
                 caption_projection_dim=32, pos_embed_max_size=32),
    # SD3.5's architecture: RMS qk-norm in every block (3.5 Large/Medium) and, in the first blocks,
    # MMDiT-X's second self-attention over the image tokens (3.5 Medium's dual_attention_layers).
    "tiny-3.5": dict(sample_size=8, patch_size=2, num_layers=2, attention_head_dim=16, num_attention_heads=2,
                     caption_projection_dim=32, pos_embed_max_size=32, qk_norm="rms_norm",
                     dual_attention_layers=(0,)),
}  # fmt: skip
SCHEDULER_CONFIG = dict(num_train_timesteps=1000, shift=3.0)  # SD3-medium's and SD3.5-large's scheduler_config.json
# train_dreambooth_sd3.py's argparse defaults (weighting_scheme, logit_mean, logit_std, mode_scale)
TIMESTEP_SAMPLING = dict(weighting_scheme="logit_normal", logit_mean=0.0, logit_std=1.0, mode_scale=1.29)
TEXT_PARTS: list[tuple[str, str, type]] = [("text_encoder", "tokenizer", CLIPTextModelWithProjection),
              ("text_encoder_2", "tokenizer_2", CLIPTextModelWithProjection),
              ("text_encoder_3", "tokenizer_3", T5EncoderModel)]  # fmt: skip


class SD3(ImageFamily):
    name = "sd3"
    text_parts = TEXT_PARTS
    pipeline_cls = StableDiffusion3Pipeline
    max_sequence_tokenizer = "tokenizer_3"
    #: train_dreambooth_sd3.py's --precondition_outputs (default 1): regress x_t - s * pred on x0
    precondition_outputs = True

    def load_vae(self, cfg: ModelConfig) -> nn.Module:
        return load_image_vae(cfg, scaling_factor=1.5305, shift_factor=0.0609)  # SD3's VAE config

    def load_transformer(self, cfg: ModelConfig, text_embed_dim: int, latent_channels: int) -> nn.Module:
        if cfg.transformer.pretrained:
            return from_pretrained(SD3Transformer2DModel, cfg.transformer, "transformer")
        preset = pick_preset(cfg.transformer, TRANSFORMER_PRESETS, "transformer")
        with seeded_init(cfg.seed + 3):
            # joint attention takes the T5-width states; pooled = CLIP-L ++ CLIP-G projections.
            return SD3Transformer2DModel(
                in_channels=latent_channels,
                out_channels=latent_channels,
                joint_attention_dim=text_embed_dim,
                pooled_projection_dim=2 * CLIP_PRESETS["tiny"]["projection_dim"],
                **preset,
            )

    def load_scheduler(self, cfg: ModelConfig) -> FlowMatchEulerDiscreteScheduler:
        return FlowMatchEulerDiscreteScheduler(**SCHEDULER_CONFIG)

    def encode_text(self, tokenizer: Any, encoder: nn.Module, captions: list[str], max_length: int) -> dict:
        device = next(encoder.parameters()).device
        embeds, _, pooled, _ = self._text_pipe(tokenizer, encoder).encode_prompt(
            captions,
            captions,
            captions,
            device=device,
            do_classifier_free_guidance=False,
            max_sequence_length=max_length,
        )
        return {"text_embeds": embeds, "pooled_embeds": pooled}  # (B, 77 + L, D), (B, 2 * proj)

    def training_loss(
        self, transformer: nn.Module, scheduler: Any, batch: dict[str, torch.Tensor], generator: torch.Generator
    ) -> torch.Tensor:
        x0, noise = latents_and_noise(batch, generator)
        b, device = x0.shape[0], x0.device
        u = compute_density_for_timestep_sampling(batch_size=b, generator=generator, **TIMESTEP_SAMPLING)
        idx = (u * scheduler.config.num_train_timesteps).long()
        sigma = scheduler.sigmas[idx].to(device, torch.float32).view(-1, 1, 1, 1)
        timestep = scheduler.timesteps[idx].to(device)
        noisy = (1.0 - sigma) * x0 + sigma * noise
        pred = transformer(
            hidden_states=noisy,
            timestep=timestep,
            encoder_hidden_states=batch["text_embeds"].float(),
            pooled_projections=batch["pooled_embeds"].float(),
            return_dict=False,
        )[0].float()
        if self.precondition_outputs:
            pred, target = pred * (-sigma) + noisy, x0
        else:
            target = noise - x0
        weighting = compute_loss_weighting_for_sd3(TIMESTEP_SAMPLING["weighting_scheme"], sigma)
        return batch_loss((weighting * (pred - target) ** 2).reshape(b, -1).mean(1))

    # ---- what a sampler outside the pipeline calls (flow_grpo's SDE rollouts) ----------------------------------
    def flow_velocity(
        self, transformer: nn.Module, latents: torch.Tensor, sigma: torch.Tensor, batch: dict[str, torch.Tensor]
    ) -> torch.Tensor:
        """The velocity v = d x / d sigma (eps - x0 for x = (1 - sigma) x0 + sigma eps) at `latents` (B, C, h, w),
        noise levels `sigma` (B,): StableDiffusion3Pipeline's denoiser call without guidance (timestep = 1000 sigma).
        The same call as `training_loss` makes, repeated here so the objective stays one readable function."""
        return transformer(
            hidden_states=latents,
            timestep=sigma * SCHEDULER_CONFIG["num_train_timesteps"],
            encoder_hidden_states=batch["text_embeds"].float(),
            pooled_projections=batch["pooled_embeds"].float(),
            return_dict=False,
        )[0].float()

    def sampling_sigmas(self, scheduler: Any, steps: int, latent_shape: tuple[int, ...]) -> torch.Tensor:
        """(steps + 1,) the sigmas the pipeline samples `steps` steps on, ending at 0: `set_timesteps` with the
        scheduler's shift, on a copy (the training scheduler keeps its 1000-step grid)."""
        grid = FlowMatchEulerDiscreteScheduler.from_config(scheduler.config)
        grid.set_timesteps(steps)
        return grid.sigmas.float()


register_family(SD3())
