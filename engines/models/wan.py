"""Wan2.1 text-to-video: diffusers' `WanTransformer3DModel`, `AutoencoderKLWan`, `WanPipeline`; UMT5 text encoder.

Nothing here is a copy of diffusers or of the authors' code; every piece is the library's own class, and the facts
(shift, text length, latent statistics, sampler) carry their sources:

- **Latents** are normalised as Wan does: per channel, (z - latents_mean) / latents_std from the VAE's config (the
  authors' `WanVAE.scale = [mean, 1 / std]`, Wan-Video/Wan2.1 `wan/modules/vae.py`; diffusers' `WanPipeline` undoes
  it with the same config values before decoding). The cached posterior is stored already normalised (a Gaussian
  stays Gaussian under an affine map), so the engine's cache path stays the shared one; training uses the posterior
  mean, as the authors' `WanVAE.encode` (it returns `mu`) and DiffSynth-Studio's trainer do.
- **Text**: UMT5-XXL last hidden states through `WanPipeline.encode_prompt` (so train == inference): 512 tokens
  (`wan_shared_cfg.text_len`), the tail after each caption zeroed as the authors' `T5EncoderModel` wrapper does.
- **Objective**: flow matching as DiffSynth-Studio trains Wan (the training code the Wan2.1 README points to:
  `diffsynth/schedulers/flow_match.py`, `FlowMatchScheduler(shift=5, sigma_min=0.0, extra_one_step=True)` with
  `set_timesteps(1000, training=True)`): an index drawn uniformly on the 1000-point grid sigma_i = (1000 - i) / 1000,
  shifted s' = k s / (1 + (k - 1) s) with k = 5 (diffusers' `FlowMatchEulerDiscreteScheduler(shift=5.0)` holds the
  same grid), x_t = (1 - s') x0 + s' eps, target eps - x0, MSE weighted by their "bsmntw" table
  w(t) proportional to exp(-2 ((t - 500) / 1000)^2) - min, normalised to mean 1 over the grid.
- **Sampling**: the authors' `generate.py` for text-to-video: UniPC flow solver (diffusers' `UniPCMultistepScheduler`
  with `use_flow_sigmas`), shift 5.0, 50 steps, guidance 5.0, their default negative prompt (`sample_neg_prompt`).
  A pretrained transformer's release folder keeps its own scheduler (diffusers' Wan2.1 folders ship flow_shift 3.0).

docs/fidelity.md (Wan) lists each choice and what is not reproduced.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
from diffusers import (
    AutoencoderKLWan,
    FlowMatchEulerDiscreteScheduler,
    UniPCMultistepScheduler,
    WanPipeline,
    WanTransformer3DModel,
)
from flowspeed.configs.schema import ModelConfig
from flowspeed.engines.models.cogvideox import affine_posterior, encode_pixels, to_pixels
from flowspeed.engines.models.registry import (
    LatentFamily,
    from_pretrained,
    pick_preset,
    register_family,
    seeded_init,
)
from flowspeed.engines.models.text_video import TextToVideoPipelineFamily
from flowspeed.engines.models.tokenizer import byte_level_tokenizer
from torch import nn
from transformers import AutoTokenizer, UMT5Config, UMT5EncoderModel

#: Wan-Video/Wan2.1 wan/configs/shared_config.py: `text_len = 512`, `num_train_timesteps = 1000`
TEXT_LENGTH = 512
NUM_TRAIN_TIMESTEPS = 1000
#: DiffSynth-Studio's training shift (`FlowMatchScheduler(shift=5, ...)`) and the authors' text-to-video sampling
#: shift (generate.py: `sample_shift = 5.0` unless 480p image-to-video)
TRAIN_SHIFT = 5.0
SAMPLE_SHIFT = 5.0
#: generate.py defaults: `sample_guide_scale` 5.0, 50 steps for text-to-video
GUIDANCE_SCALE = 5.0
SAMPLE_STEPS = 50
#: wan_shared_cfg.sample_neg_prompt, the negative prompt the authors sample with
NEGATIVE_PROMPT = (
    "色调艳丽，过曝，静态，细节模糊不清，字幕，风格，作品，画作，画面，静止，整体发灰，最差质量，低质量，JPEG压缩残留，"
    "丑陋的，残缺的，多余的手指，画得不好的手部，画得不好的脸部，畸形的，毁容的，形态畸形的肢体，手指融合，"
    "静止不动的画面，杂乱的背景，三条腿，背景人很多，倒着走"
)

VAE_PRESETS: dict[str, dict[str, Any]] = {
    # Wan2.1's VAE layout (3 spatial downsamples -> 8x, temporal [False, True, True] -> 4x, 16 latent channels and
    # the released per-channel latents_mean/std, AutoencoderKLWan's defaults) at 1/12 of the width.
    "tiny": dict(base_dim=8, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=1, attn_scales=[],
                 temperal_downsample=[False, True, True]),
}  # fmt: skip
TEXT_PRESETS: dict[str, dict[str, Any]] = {
    # UMT5 (per-layer relative attention bias, gated-GELU), 2 layers of width 32
    "tiny": dict(d_model=32, d_ff=64, d_kv=16, num_layers=2, num_heads=2, feed_forward_proj="gated-gelu"),
}
TRANSFORMER_PRESETS: dict[str, dict[str, Any]] = {
    # Wan2.1's block (self-attention with RMS qk-norm across heads, 3-D RoPE, cross-attention, adaLN table) with
    # 2 layers of 2 x 16-wide heads; 1x2x2 patches as released.
    "tiny": dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16, ffn_dim=64, freq_dim=32,
                 num_layers=2, qk_norm="rms_norm_across_heads", cross_attn_norm=True, eps=1e-6),
}  # fmt: skip


def bsmntw_weights(timesteps: torch.Tensor, steps: int = NUM_TRAIN_TIMESTEPS) -> torch.Tensor:
    """DiffSynth-Studio's training weight per grid timestep: exp(-2 ((t - steps/2) / steps)^2), its minimum over the
    grid subtracted, scaled so the grid's weights sum to `steps` (mean 1); in float32, as theirs (near t = 1000 the
    weight is a small difference of nearly equal numbers, so the precision shows)."""
    y = torch.exp(-2 * ((timesteps.float() - steps / 2) / steps) ** 2)
    y = y - y.min()
    return y * (steps / y.sum())


class Wan(LatentFamily, TextToVideoPipelineFamily):
    """Wan2.1 text-to-video (1.3B and 14B layouts); export and sampling: engines/models/text_video.py."""

    name = "wan"
    temporal_compression = 4
    spatial_compression = 8
    size_multiple = 16  # 8x VAE, 2x2 patches
    pipeline_cls: type = WanPipeline
    negative_prompt = NEGATIVE_PROMPT
    text_length = TEXT_LENGTH

    def frame_count_error(self, num_frames: int) -> str | None:
        if num_frames < 1 or (num_frames - 1) % self.temporal_compression:
            k = max(num_frames - 1, 0) // 4
            return f"Wan's VAE takes 4k+1 frames (e.g. {4 * k + 1} or {4 * k + 5}; the authors: 81), not {num_frames}"
        return None

    # ---- loading -------------------------------------------------------------------------------
    def load_vae(self, cfg: ModelConfig) -> nn.Module:
        if cfg.vae.pretrained:
            vae = from_pretrained(AutoencoderKLWan, cfg.vae, "vae")
        else:
            with seeded_init(cfg.seed + 1):
                vae = AutoencoderKLWan(**pick_preset(cfg.vae, VAE_PRESETS, "vae"))
        return vae.eval().requires_grad_(False)

    def load_text_encoder(self, cfg: ModelConfig) -> tuple[Any, nn.Module]:
        """UMT5's encoder (`UMT5EncoderModel`, what `WanPipeline` declares: T5 classes would drop UMT5's per-layer
        relative attention biases) and its tokenizer (`tokenizer/` beside a diffusers `text_encoder/`)."""
        comp = cfg.text_encoder
        if comp.pretrained:
            tok_sub = "tokenizer" if comp.subfolder == "text_encoder" else comp.subfolder
            tokenizer = from_pretrained(AutoTokenizer, comp.model_copy(update={"subfolder": tok_sub}), "text_encoder")
            encoder = from_pretrained(UMT5EncoderModel, comp, "text_encoder")
        else:
            tokenizer = byte_level_tokenizer()
            umt5 = UMT5Config(
                vocab_size=len(tokenizer),
                pad_token_id=tokenizer.pad_token_id,
                eos_token_id=tokenizer.eos_token_id,
                decoder_start_token_id=tokenizer.pad_token_id,
                **pick_preset(comp, TEXT_PRESETS, "text_encoder"),
            )
            with seeded_init(cfg.seed + 2):
                encoder = UMT5EncoderModel(umt5)
        return tokenizer, encoder.eval().requires_grad_(False)

    def load_transformer(self, cfg: ModelConfig, text_embed_dim: int, latent_channels: int) -> nn.Module:
        if cfg.transformer.pretrained:
            return from_pretrained(WanTransformer3DModel, cfg.transformer, "transformer")
        preset = pick_preset(cfg.transformer, TRANSFORMER_PRESETS, "transformer")
        with seeded_init(cfg.seed + 3):
            return WanTransformer3DModel(
                in_channels=latent_channels, out_channels=latent_channels, text_dim=text_embed_dim, **preset
            )

    def load_scheduler(self, cfg: ModelConfig) -> FlowMatchEulerDiscreteScheduler:
        """The training grid: 1000 sigmas (1000 - i) / 1000 shifted by 5, DiffSynth-Studio's training schedule."""
        return FlowMatchEulerDiscreteScheduler(num_train_timesteps=NUM_TRAIN_TIMESTEPS, shift=TRAIN_SHIFT)

    def sample_scheduler(self, cfg: ModelConfig) -> Any:
        """What the export samples with: a pretrained release's own `scheduler/` folder where it has one, else the
        authors' text-to-video sampler (UniPC flow solver, shift 5.0)."""
        comp = cfg.transformer
        if comp.pretrained and (Path(comp.pretrained) / "scheduler" / "scheduler_config.json").is_file():
            return UniPCMultistepScheduler.from_pretrained(comp.pretrained, subfolder="scheduler")
        return UniPCMultistepScheduler(
            prediction_type="flow_prediction", use_flow_sigmas=True, num_train_timesteps=NUM_TRAIN_TIMESTEPS,
            flow_shift=SAMPLE_SHIFT,
        )  # fmt: skip

    # ---- encoding (prep) ------------------------------------------------------------------------
    def encode_video(self, vae: nn.Module, frames: torch.Tensor) -> torch.Tensor:
        """uint8 (B, T, H, W, C) -> the posterior of the *normalised* latent, (B, 2*16, T', H', W'): mean ++ logvar.

        Wan trains on (z - latents_mean) / latents_std per channel; z ~ N(mu, sigma^2) gives N((mu - m) / s,
        (sigma / s)^2), so the cache holds mean (mu - m) / s and log-variance logvar - 2 log s, and the engine's
        scaling (1.0) and shift (0.0) leave it as it is."""
        params = encode_pixels(vae, to_pixels(frames))
        mean, std = latent_stats(vae, params)
        return affine_posterior(params, mean, 1.0 / std)

    def encode_text(self, tokenizer: Any, encoder: nn.Module, captions: list[str], max_length: int) -> torch.Tensor:
        if encoder.device.type == "meta":  # sizing on meta (variants): the pipeline trims each caption by value
            return torch.empty(len(captions), max_length, encoder.config.d_model, device="meta")
        pipe = WanPipeline(tokenizer=tokenizer, text_encoder=encoder, vae=None, transformer=None, scheduler=None)
        embeds, _ = pipe.encode_prompt(
            captions,
            do_classifier_free_guidance=False,
            max_sequence_length=max_length,
            device=encoder.device,
            dtype=encoder.dtype,
        )
        return embeds  # (B, L, D): the caption's states, zeros after it

    # ---- training -------------------------------------------------------------------------------
    def training_loss(
        self, transformer: nn.Module, scheduler: Any, batch: dict[str, torch.Tensor], generator: torch.Generator
    ) -> torch.Tensor:
        """DiffSynth-Studio's Wan objective, one timestep per sample: x0 the normalised posterior mean (the authors'
        VAE wrapper encodes to `mu`), index i ~ U{0..999} on the shifted grid, flow target eps - x0, bsmntw weight."""
        params = batch["latent_params"].float()
        x0 = params[:, : params.shape[1] // 2]  # (B, C, T', H', W'), already normalised at prep
        noise = torch.randn(x0.shape, generator=generator).to(x0.device)
        idx = torch.randint(0, NUM_TRAIN_TIMESTEPS, (x0.shape[0],), generator=generator)
        return self.flow_loss(transformer, scheduler, x0, noise, idx, batch["text_embeds"])

    def flow_loss(
        self,
        transformer: nn.Module,
        scheduler: Any,
        x0: torch.Tensor,
        noise: torch.Tensor,
        idx: torch.Tensor,
        text: torch.Tensor,
    ) -> torch.Tensor:
        """The loss at given grid indices `idx` (B,) and noise: per sample the weighted mean squared error of the
        predicted velocity against eps - x0, then the batch mean."""
        device = x0.device
        sigma = scheduler.sigmas[idx].to(device, torch.float32).view(-1, 1, 1, 1, 1)
        timestep = scheduler.timesteps[idx].to(device)
        noisy = (1.0 - sigma) * x0 + sigma * noise
        pred = transformer(
            hidden_states=noisy, timestep=timestep, encoder_hidden_states=text.to(noisy.dtype), return_dict=False
        )[0].float()
        weight = bsmntw_weights(scheduler.timesteps[:NUM_TRAIN_TIMESTEPS])[idx].to(device)
        return (weight * ((pred - (noise - x0)) ** 2).flatten(1).mean(1)).mean()

    def latent_tokens(self, transformer_config: Any, latent_shape: tuple[int, ...]) -> int:
        _, t, h, w = latent_shape[-4:]  # (2*Cz, T', H', W')
        pt, ph, pw = transformer_config.patch_size
        return (t // pt) * (h // ph) * (w // pw)


def latent_stats(vae: nn.Module, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The VAE config's per-channel latents_mean and latents_std, shaped (1, C, 1, 1, 1) like `like`."""
    c = vae.config.z_dim
    if len(vae.config.latents_mean) != c or len(vae.config.latents_std) != c:
        raise ValueError(f"the Wan VAE's latents_mean/latents_std must have z_dim={c} entries each")
    view = (1, c) + (1,) * (like.ndim - 2)
    mean = torch.tensor(vae.config.latents_mean, dtype=torch.float32, device=like.device).view(view)
    std = torch.tensor(vae.config.latents_std, dtype=torch.float32, device=like.device).view(view)
    assert math.isfinite(float(std.min())) and float(std.min()) > 0
    return mean, std


register_family(Wan())
