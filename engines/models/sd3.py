"""Stable Diffusion 3 text-to-image: diffusers' SD3 transformer, AutoencoderKL, flow-matching scheduler
and pipeline; two CLIP text encoders with projection and a T5 encoder.

Prompt embeddings come from `StableDiffusion3Pipeline.encode_prompt`, so the cached per-token
states (CLIP-L ++ CLIP-G, padded to T5's width, then T5's tokens) and pooled vector are exactly
what inference feeds the transformer. Training is rectified flow: x_t = (1 - s) x0 + s eps,
target eps - x0, with SD3's logit-normal draw of s.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
from torch import nn
from transformers import CLIPTextModelWithProjection, T5EncoderModel

from configs.schema import ModelConfig
from engines.models.encoders import CLIP_MAX, CLIP_PRESETS, load_image_vae, load_text_encoders
from engines.models.registry import ModelFamily, from_pretrained, pick_preset, register_family, seeded_init

TRANSFORMER_PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(sample_size=8, patch_size=2, num_layers=2, attention_head_dim=16, num_attention_heads=2,
                 caption_projection_dim=32, pos_embed_max_size=32),
}  # fmt: skip
SCHEDULER_CONFIG = dict(num_train_timesteps=1000, shift=3.0)  # SD3-medium's scheduler_config.json
TEXT_PARTS = [("text_encoder", "tokenizer", CLIPTextModelWithProjection),
              ("text_encoder_2", "tokenizer_2", CLIPTextModelWithProjection),
              ("text_encoder_3", "tokenizer_3", T5EncoderModel)]  # fmt: skip


class SD3(ModelFamily):
    name = "sd3"
    temporal_compression = 1
    spatial_compression = 8
    size_multiple = 16  # 8x VAE, 2x2 patches

    def frame_count_error(self, num_frames: int) -> str | None:
        return None if num_frames == 1 else f"SD3 is an image model: set data.num_frames: 1 (got {num_frames})"

    def load_vae(self, cfg: ModelConfig) -> nn.Module:
        return load_image_vae(cfg, scaling_factor=1.5035, shift_factor=0.0609)  # SD3's VAE config

    def load_text_encoder(self, cfg: ModelConfig) -> tuple[Any, nn.Module]:
        """((clip_l_tok, clip_g_tok, t5_tok), ModuleList([clip_l, clip_g, t5]))."""
        return load_text_encoders(cfg, TEXT_PARTS, [CLIP_MAX, CLIP_MAX, cfg.max_text_length])

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

    def encode_video(self, vae: nn.Module, frames: torch.Tensor) -> torch.Tensor:
        # (B, 1, H, W, C) uint8 -> (B, C, H, W) in [-1, 1]; one frame per sample
        x = frames[:, 0].permute(0, 3, 1, 2).to(vae.device, vae.dtype) / 127.5 - 1.0
        return vae.encode(x).latent_dist.parameters  # (B, 2*Cz, H', W')

    def _text_pipe(self, tokenizers: Any, encoders: nn.Module) -> StableDiffusion3Pipeline:
        t1, t2, t3 = tokenizers
        e1, e2, e3 = encoders
        return StableDiffusion3Pipeline(
            transformer=None,
            scheduler=None,
            vae=None,
            text_encoder=e1,
            tokenizer=t1,
            text_encoder_2=e2,
            tokenizer_2=t2,
            text_encoder_3=e3,
            tokenizer_3=t3,
        )

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
        params = batch["latent_params"]
        device = params.device
        eps = torch.randn(params[:, : params.shape[1] // 2].shape, generator=generator).to(device)
        dist = DiagonalGaussianDistribution(params.float())
        shift = batch.get("shift_factor", torch.zeros(params.shape[0], device=device)).view(-1, 1, 1, 1)
        x0 = (dist.mean + dist.std * eps - shift) * batch["scaling_factor"].view(-1, 1, 1, 1)
        noise = torch.randn(x0.shape, generator=generator).to(device)
        # SD3's logit-normal draw of the noise level, on the scheduler's (shifted) sigma grid.
        u = torch.sigmoid(torch.randn(x0.shape[0], generator=generator))
        idx = (u * scheduler.config.num_train_timesteps).long().clamp(max=scheduler.config.num_train_timesteps - 1)
        sigma = scheduler.sigmas[idx].to(device, torch.float32).view(-1, 1, 1, 1)
        timestep = scheduler.timesteps[idx].to(device)
        noisy = (1.0 - sigma) * x0 + sigma * noise
        pred = transformer(
            hidden_states=noisy,
            timestep=timestep,
            encoder_hidden_states=batch["text_embeds"].float(),
            pooled_projections=batch["pooled_embeds"].float(),
            return_dict=False,
        )[0]
        return ((pred.float() - (noise - x0)) ** 2).mean()

    def latent_tokens(self, transformer_config: Any, latent_shape: tuple[int, ...]) -> int:
        _, h, w = latent_shape[-3:]
        p = transformer_config.patch_size
        return (h // p) * (w // p)

    def save_pretrained(self, out_dir: Path, cfg: ModelConfig, transformer: nn.Module) -> Path:
        toks, encs = self.load_text_encoder(cfg)
        pipe = self._text_pipe(toks, encs)
        pipe.register_modules(transformer=transformer, vae=self.load_vae(cfg), scheduler=self.load_scheduler(cfg))
        pipe.save_pretrained(out_dir, safe_serialization=True)
        return out_dir

    def generate(
        self, pretrained_dir: Path, prompts: list[str], *, num_frames: int, height: int, width: int,
        steps: int, guidance_scale: float, seed: int, device: torch.device,
    ) -> np.ndarray:  # fmt: skip
        pipe = StableDiffusion3Pipeline.from_pretrained(pretrained_dir).to(device)
        pipe.set_progress_bar_config(disable=True)
        out = []
        for i, prompt in enumerate(prompts):
            gen = torch.Generator("cpu").manual_seed(seed + i)
            image = pipe(prompt=prompt, height=height, width=width, num_inference_steps=steps,
                         guidance_scale=guidance_scale, generator=gen, output_type="np",
                         max_sequence_length=pipe.tokenizer_3.model_max_length).images[0]  # fmt: skip
            out.append((np.clip(image, 0, 1) * 255).round().astype(np.uint8)[None])  # (1, H, W, C)
        return np.stack(out)


register_family(SD3())
