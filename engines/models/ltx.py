"""LTX-Video text-to-video: diffusers' `LTXVideoTransformer3DModel`, `AutoencoderKLLTXVideo`, `LTXPipeline`; T5.

Every piece is the library's own class; the facts (text length, objective, sampler) carry their sources:

- **Latents**: the VAE compresses 32x in space and 8x in time (patch 4, then three 2x2x2 down blocks), so clips take
  8k+1 frames and sides that are multiples of 32 (the transformer's patch is 1x1x1). They are normalised per channel
  as diffusers' `LTXPipeline._normalize_latents` does, (z - latents_mean) * scaling_factor / latents_std, with the
  VAE's own `latents_mean`/`latents_std` buffers (the release's per-channel statistics; LTX-Video-Trainer
  `ltxv_utils.encode_video` does the same). The cached posterior is already normalised (an affine map keeps a
  Gaussian Gaussian), and training draws x0 from it, as the trainer's `latent_dist.sample()`.
- **Text**: T5-XXL last hidden states and their attention mask through `LTXPipeline.encode_prompt` (train ==
  inference): 256 tokens, the authors' `text_encoder_max_tokens` (Lightricks/LTX-Video `pipeline_ltx_video.py`) and
  the trainer's `encode_prompt(max_sequence_length=256)`. The mask is cached beside the states (`text_mask`).
- **Objective**: LTX-Video-Trainer's (Lightricks/LTX-Video-Trainer@31b1273 `timestep_samplers.py`,
  `training_strategies.py` `StandardTrainingStrategy`): sigma = sigmoid(N(0, 1) + shift(S)), the shift linear in the
  video's token count S from 0.95 at 1024 to 2.05 at 4096 tokens (`ShiftedLogitNormalTimestepSampler`); x_t =
  (1 - sigma) x0 + sigma eps, target eps - x0, timestep round(1000 sigma); with probability
  `first_frame_conditioning_p` (0.1, configs/ltxv_2b_*.yaml) the first latent frame stays clean at timestep 0 and is
  left out of the loss (their loss mask, divided by its mean). RoPE scales (8 / fps, 32, 32) at their default 24 fps.
- **Sampling**: diffusers' `LTXPipeline` with `FlowMatchEulerDiscreteScheduler` shifted by token count (the same
  0.95..2.05 line, Lightricks/LTX-Video `schedulers/rf.py` `get_normal_shift`) and stretched to a terminal sigma of 0.1
  (the authors' `DIFFUSERS_SCHEDULER_CONFIG`, what their diffusers folders ship), guidance 3.0, 40 steps, the authors'
  negative prompt and decode timestep 0.05 / noise 0.025 for timestep-conditioned VAEs (configs/ltxv-2b-0.9.1.yaml,
  `inference.py`). A pretrained release folder keeps its own scheduler.

docs/fidelity.md (LTX-Video) lists each choice and what is not reproduced.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKLLTXVideo, FlowMatchEulerDiscreteScheduler, LTXPipeline, LTXVideoTransformer3DModel
from flowspeed.configs.schema import ModelConfig
from flowspeed.engines.models.cogvideox import affine_posterior, encode_pixels, load_t5, to_pixels
from flowspeed.engines.models.registry import (
    LatentFamily,
    from_pretrained,
    pick_preset,
    register_family,
    seeded_init,
)
from flowspeed.engines.models.text_video import TextToVideoPipelineFamily
from torch import nn

#: Lightricks/LTX-Video ltx_video/pipelines/pipeline_ltx_video.py `text_encoder_max_tokens: int = 256`
TEXT_LENGTH = 256
#: LTX-Video-Trainer `ShiftedLogitNormalTimestepSampler._get_shift_for_sequence_length` defaults (= LTX-Video
#: `schedulers/rf.py` `get_normal_shift`): the logit-normal mean, linear in the token count
MIN_TOKENS, MAX_TOKENS, MIN_SHIFT, MAX_SHIFT = 1024, 4096, 0.95, 2.05
#: the released sampler's terminal sigma (Lightricks/LTX-Video utils/diffusers_config_mapping.py
#: DIFFUSERS_SCHEDULER_CONFIG `shift_terminal: 0.1`, their RectifiedFlowScheduler's `target_shift_terminal`)
SHIFT_TERMINAL = 0.1
#: LTX-Video-Trainer configs/ltxv_2b_full.yaml and ltxv_2b_lora.yaml `conditioning.first_frame_conditioning_p`
FIRST_FRAME_P = 0.1
#: LTX-Video-Trainer training_strategies.py `DEFAULT_FPS` (the RoPE's temporal scale is 8 / fps)
FRAME_RATE = 24
#: configs/ltxv-2b-0.9.1.yaml: guidance 3, 40 steps, decode timestep 0.05 and noise 0.025; inference.py's default
#: negative prompt
GUIDANCE_SCALE, SAMPLE_STEPS = 3.0, 40
DECODE_TIMESTEP, DECODE_NOISE_SCALE = 0.05, 0.025
NEGATIVE_PROMPT = "worst quality, inconsistent motion, blurry, jittery, distorted"

VAE_PRESETS: dict[str, dict[str, Any]] = {
    # LTX-Video 0.9.0's VAE layout (patch 4, three spatio-temporal 2x downsamples -> 32x / 8x, causal encoder, 128
    # latent channels as released) at 1/16 of the width and one layer per block.
    "tiny": dict(latent_channels=128, block_out_channels=(8, 16, 32, 32), decoder_block_out_channels=(8, 16, 32, 32),
                 layers_per_block=(1, 1, 1, 1, 1), decoder_layers_per_block=(1, 1, 1, 1, 1)),
}  # fmt: skip
TRANSFORMER_PRESETS: dict[str, dict[str, Any]] = {
    # the released block (RMS qk-norm across heads, 3-D RoPE, cross-attention, adaLN-single) with 2 layers of 2 x 16
    "tiny": dict(num_attention_heads=2, attention_head_dim=16, cross_attention_dim=32, num_layers=2),
}


def token_shift(seq_len: int) -> float:
    """The logit-normal mean for a video of `seq_len` tokens (the trainer's line through (1024, 0.95), (4096, 2.05))."""
    m = (MAX_SHIFT - MIN_SHIFT) / (MAX_TOKENS - MIN_TOKENS)
    return m * seq_len + (MIN_SHIFT - m * MIN_TOKENS)


class LTXVideo(LatentFamily, TextToVideoPipelineFamily):
    """LTX-Video text-to-video (the 2B layouts of 0.9.x, and 13B where named); export and sampling:
    engines/models/text_video.py, with the authors' frame rate and decode noise (`pipeline_extras`)."""

    name = "ltx"
    temporal_compression = 8
    spatial_compression = 32
    size_multiple = 32  # 32x VAE, 1x1 patches
    vae_name = "LTX-Video"
    authors_frames = "the trainer validates at 89"
    pipeline_cls: type = LTXPipeline
    negative_prompt = NEGATIVE_PROMPT
    text_length = TEXT_LENGTH

    # ---- loading -------------------------------------------------------------------------------
    def load_vae(self, cfg: ModelConfig) -> nn.Module:
        if cfg.vae.pretrained:
            vae = from_pretrained(AutoencoderKLLTXVideo, cfg.vae, "vae")
        else:
            with seeded_init(cfg.seed + 1):
                vae = AutoencoderKLLTXVideo(**pick_preset(cfg.vae, VAE_PRESETS, "vae"))
        return vae.eval().requires_grad_(False)

    def load_text_encoder(self, cfg: ModelConfig) -> tuple[Any, nn.Module]:
        """T5's encoder (`T5EncoderModel`, what `LTXPipeline` declares) and tokenizer: the loader CogVideoX and the
        video DiTs share (its tiny preset: 2 layers of width 32, byte-level tokenizer)."""
        return load_t5(cfg)

    def load_transformer(self, cfg: ModelConfig, text_embed_dim: int, latent_channels: int) -> nn.Module:
        if cfg.transformer.pretrained:
            return from_pretrained(LTXVideoTransformer3DModel, cfg.transformer, "transformer")
        preset = pick_preset(cfg.transformer, TRANSFORMER_PRESETS, "transformer")
        with seeded_init(cfg.seed + 3):
            return LTXVideoTransformer3DModel(
                in_channels=latent_channels, out_channels=latent_channels, caption_channels=text_embed_dim, **preset
            )

    def load_scheduler(self, cfg: ModelConfig) -> None:
        """The trainer draws sigma in closed form (`token_shift`); no grid is needed."""
        return None

    def sample_scheduler(self, cfg: ModelConfig) -> FlowMatchEulerDiscreteScheduler:
        """A release's own `scheduler/` where it has one, else Euler flow matching shifted by token count."""
        comp = cfg.transformer
        if comp.pretrained and (Path(comp.pretrained) / "scheduler" / "scheduler_config.json").is_file():
            return FlowMatchEulerDiscreteScheduler.from_pretrained(comp.pretrained, subfolder="scheduler")
        return FlowMatchEulerDiscreteScheduler(
            use_dynamic_shifting=True, base_shift=MIN_SHIFT, max_shift=MAX_SHIFT, base_image_seq_len=MIN_TOKENS,
            max_image_seq_len=MAX_TOKENS, shift_terminal=SHIFT_TERMINAL,
        )  # fmt: skip

    # ---- encoding (prep) ------------------------------------------------------------------------
    def encode_video(self, vae: nn.Module, frames: torch.Tensor) -> torch.Tensor:
        """uint8 (B, T, H, W, C) -> the posterior of the *normalised* latent, (B, 2*128, T', H', W'): mean ++ logvar.

        z' = (z - m) * k / s per channel (k the VAE's scaling_factor), so z ~ N(mu, sigma^2) gives mean (mu - m) k / s
        and log-variance logvar + 2 log(k / s)."""
        params = encode_pixels(vae, to_pixels(frames))
        view = (1, -1, 1, 1, 1)
        scale = float(vae.config.scaling_factor) / vae.latents_std.float().view(view)
        return affine_posterior(params, vae.latents_mean.float().view(view), scale)

    def encode_text(self, tokenizer: Any, encoder: nn.Module, captions: list[str], max_length: int) -> dict:
        """{"text_embeds": (B, L, D), "text_mask": (B, L)}: the pipeline's T5 states and attention mask."""
        if encoder.device.type == "meta":  # sizing on meta (variants)
            return {"text_embeds": torch.empty(len(captions), max_length, encoder.config.d_model, device="meta"),
                    "text_mask": torch.empty(len(captions), max_length, device="meta")}  # fmt: skip
        pipe = LTXPipeline(tokenizer=tokenizer, text_encoder=encoder, vae=None, transformer=None, scheduler=None)
        embeds, mask, _, _ = pipe.encode_prompt(
            captions,
            do_classifier_free_guidance=False,
            max_sequence_length=max_length,
            device=encoder.device,
            dtype=encoder.dtype,
        )
        return {"text_embeds": embeds, "text_mask": mask.float()}

    # ---- training -------------------------------------------------------------------------------
    def training_loss(
        self, transformer: nn.Module, scheduler: Any, batch: dict[str, torch.Tensor], generator: torch.Generator
    ) -> torch.Tensor:
        """LTX-Video-Trainer's step: x0 drawn from the cached posterior, then sigma (shifted logit-normal for the
        clip's token count), then eps, then whether the first frame conditions (probability 0.1, per batch)."""
        params = batch["latent_params"].float()
        mu, logvar = params.chunk(2, dim=1)  # (B, C, T', H', W'), already normalised at prep
        x0 = mu + torch.exp(0.5 * logvar) * torch.randn(mu.shape, generator=generator).to(mu.device)
        _, _, t, h, w = x0.shape
        normal = torch.randn((x0.shape[0],), generator=generator)
        sigma = torch.sigmoid(normal + token_shift(t * h * w)).to(x0.device)
        noise = torch.randn(x0.shape, generator=generator).to(x0.device)
        first_frame = bool(torch.rand((), generator=generator) < FIRST_FRAME_P)
        return self.flow_loss(transformer, x0, noise, sigma, first_frame, batch["text_embeds"], batch["text_mask"])

    def flow_loss(
        self,
        transformer: nn.Module,
        x0: torch.Tensor,
        noise: torch.Tensor,
        sigma: torch.Tensor,
        first_frame: bool,
        text: torch.Tensor,
        text_mask: torch.Tensor,
    ) -> torch.Tensor:
        """The trainer's loss for given x0, eps (B, C, T', H', W'), sigma (B,): packed tokens (B, S, C), the first
        latent frame's H' W' tokens clean at timestep 0 and masked out of the loss when `first_frame`."""
        b, _, t, h, w = x0.shape
        x0, noise = LTXPipeline._pack_latents(x0), LTXPipeline._pack_latents(noise)  # (B, S, C), S = T' H' W'
        cond = torch.zeros(b, x0.shape[1], dtype=torch.bool, device=x0.device)
        if first_frame and h * w < x0.shape[1]:
            cond[:, : h * w] = True
        s = sigma.view(-1, 1, 1).float()
        noisy = torch.where(cond.unsqueeze(-1), x0, (1 - s) * x0 + s * noise)
        timestep = torch.where(cond, 0, torch.round(sigma.float() * 1000.0).long().view(-1, 1))  # (B, S)
        pred = transformer(
            hidden_states=noisy.to(text.dtype), encoder_hidden_states=text, timestep=timestep,
            encoder_attention_mask=text_mask, num_frames=t, height=h, width=w,
            rope_interpolation_scale=[8.0 / FRAME_RATE, 32.0, 32.0], return_dict=False,
        )[0].float()  # fmt: skip
        keep = (~cond).unsqueeze(-1).float()
        return ((pred - (noise - x0)) ** 2 * keep / keep.mean()).mean()

    def latent_tokens(self, transformer_config: Any, latent_shape: tuple[int, ...]) -> int:
        _, t, h, w = latent_shape[-4:]  # (2*Cz, T', H', W')
        p, pt = transformer_config.patch_size, transformer_config.patch_size_t
        return (t // pt) * (h // p) * (w // p)

    def pipeline_extras(self, pipe: Any) -> dict[str, Any]:
        """The trainer's RoPE frame rate, and the decode noise of the authors' inference config where the VAE
        is timestep-conditioned (0.9.1 and later)."""
        decode = (DECODE_TIMESTEP, DECODE_NOISE_SCALE) if pipe.vae.config.timestep_conditioning else (0.0, None)
        return {"frame_rate": FRAME_RATE, "decode_timestep": decode[0], "decode_noise_scale": decode[1]}


register_family(LTXVideo())
