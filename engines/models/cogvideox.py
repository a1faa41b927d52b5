"""CogVideoX text-to-video: diffusers' VAE, transformer, DDIM/DPM schedulers and pipeline; T5 text encoder.

Nothing here is a copy of diffusers: text embeddings come from `CogVideoXPipeline.encode_prompt`
and rotary embeddings from the pipeline's own helper, so training sees exactly what inference sees.
The objective is THUDM's finetune trainers' (CogVideo `finetune/models/cogvideox_t2v/lora_trainer.py`):
uniform timesteps, v-prediction turned into an x0 estimate, MSE weighted by 1/(1 - alpha_bar); the audit
and its reference numbers are in docs/fidelity.md (CogVideoX).
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch
from diffusers import (
    AutoencoderKLCogVideoX,
    CogVideoXDDIMScheduler,
    CogVideoXDPMScheduler,
    CogVideoXPipeline,
    CogVideoXTransformer3DModel,
)
from flowspeed.configs.schema import ModelConfig
from flowspeed.engines.models.registry import (
    GeneratingFamily,
    LatentFamily,
    batch_loss,
    frames_out,
    from_pretrained,
    pick_preset,
    register_family,
    sample_latents,
    seeded_init,
    uniform_timesteps,
)
from flowspeed.engines.models.tokenizer import byte_level_tokenizer
from torch import nn
from transformers import AutoConfig, AutoModel, AutoTokenizer, T5Config, T5EncoderModel

VAE_PRESETS: dict[str, dict[str, Any]] = {
    # 4 blocks -> 8x spatial, 4x temporal compression, like the published 2B/5B VAE, at 1/32 the width.
    "tiny": dict(
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        layers_per_block=1,
        norm_num_groups=4,
        block_out_channels=(16, 16, 16, 16),
        temporal_compression_ratio=4,
        down_block_types=("CogVideoXDownBlock3D",) * 4,
        up_block_types=("CogVideoXUpBlock3D",) * 4,
    ),
}
TEXT_PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(d_model=32, d_ff=64, d_kv=16, num_layers=2, num_heads=2),
}
TRANSFORMER_PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(
        num_attention_heads=2,
        attention_head_dim=16,
        num_layers=2,
        time_embed_dim=32,
        patch_size=2,
        sample_height=8,
        sample_width=8,
        sample_frames=9,
        temporal_compression_ratio=4,
    ),
    # Published CogVideoX-2b shape, for users with a GPU who pretrain from scratch.
    "2b": dict(
        num_attention_heads=30,
        attention_head_dim=64,
        num_layers=30,
        time_embed_dim=512,
        patch_size=2,
        sample_height=60,
        sample_width=90,
        sample_frames=49,
        temporal_compression_ratio=4,
    ),
}
# CogVideoX-2b's scheduler_config.json. The 5B releases (5b, 5b-I2V) ship the same file with
# snr_shift_scale 1.0 (diffusers scripts/convert_cogvideox_to_diffusers.py: "For 5B, it is 1.0"); so do 1.5's
# SAT configs (ZeroSNRDDPMDiscretization's default shift_scale). Each family's presets take its release's value.
SCHEDULER_CONFIG: dict[str, Any] = dict(
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    clip_sample=False,
    prediction_type="v_prediction",
    rescale_betas_zero_snr=True,
    set_alpha_to_one=True,
    snr_shift_scale=3.0,
    steps_offset=0,
    timestep_spacing="trailing",
)


def load_t5(cfg: ModelConfig) -> tuple[Any, nn.Module]:
    """A T5-family encoder (T5, UMT5, mT5: encoder weights only) and its tokenizer from a local folder or hub id,
    or the tiny preset with the byte-level tokenizer; CogVideoX's, and the video DiTs' of engines/models/dits."""
    comp = cfg.text_encoder
    if comp.pretrained:
        # A diffusers layout keeps the tokenizer beside the encoder, in `tokenizer/`.
        tok_sub = "tokenizer" if comp.subfolder == "text_encoder" else comp.subfolder
        tok_comp = comp.model_copy(update={"subfolder": tok_sub})
        tokenizer = from_pretrained(AutoTokenizer, tok_comp, "text_encoder")
        config = from_pretrained(AutoConfig, comp, "text_encoder")
        # T5 checkpoints hold encoder+decoder weights; AutoModel would build both.
        cls = T5EncoderModel if config.model_type in ("t5", "umt5", "mt5") else AutoModel
        encoder = from_pretrained(cls, comp, "text_encoder")
    else:
        tokenizer = byte_level_tokenizer()
        preset = pick_preset(comp, TEXT_PRESETS, "text_encoder")
        t5 = T5Config(
            vocab_size=len(tokenizer),
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
            decoder_start_token_id=tokenizer.pad_token_id,
            **preset,
        )
        with seeded_init(cfg.seed + 2):
            encoder = T5EncoderModel(t5)
    return tokenizer, encoder.eval().requires_grad_(False)


class CogVideoX(LatentFamily, GeneratingFamily):
    name = "cogvideox"
    temporal_compression = 4
    spatial_compression = 8
    size_multiple = 16  # 8x VAE, 2x2 patches
    pipeline_cls: type = CogVideoXPipeline  # what the export is (image-to-video subclasses change it)
    snr_shift_scale = 3.0  # the presets' noise schedule: CogVideoX-2b's (the 1.0 T2V presets are 2B-shaped)

    def frame_count_error(self, num_frames: int) -> str | None:
        if (num_frames - 1) % self.temporal_compression:
            k = (num_frames - 1) // 4
            return f"CogVideoX's VAE takes 4k+1 frames (e.g. {4 * k + 1} or {4 * k + 5}), not {num_frames}"
        return None

    # ---- loading -------------------------------------------------------------------------------
    def load_vae(self, cfg: ModelConfig) -> nn.Module:
        if cfg.vae.pretrained:
            vae = from_pretrained(AutoencoderKLCogVideoX, cfg.vae, "vae")
        else:
            with seeded_init(cfg.seed + 1):
                vae = AutoencoderKLCogVideoX(**pick_preset(cfg.vae, VAE_PRESETS, "vae"))
        return vae.eval().requires_grad_(False)

    def load_text_encoder(self, cfg: ModelConfig) -> tuple[Any, nn.Module]:
        return load_t5(cfg)

    def load_transformer(self, cfg: ModelConfig, text_embed_dim: int, latent_channels: int) -> nn.Module:
        if cfg.transformer.pretrained:
            return from_pretrained(CogVideoXTransformer3DModel, cfg.transformer, "transformer")
        preset = pick_preset(cfg.transformer, TRANSFORMER_PRESETS, "transformer")
        with seeded_init(cfg.seed + 3):
            return CogVideoXTransformer3DModel(
                in_channels=latent_channels,
                out_channels=latent_channels,
                text_embed_dim=text_embed_dim,
                max_text_seq_length=cfg.max_text_length,
                **preset,
            )

    def load_scheduler(self, cfg: ModelConfig) -> CogVideoXDDIMScheduler:
        """A pretrained transformer trains on its own release's noise schedule (2b and 5b differ:
        `snr_shift_scale` 3.0 vs 1.0), read from the `scheduler/` folder beside it; presets use their
        family's release value (`snr_shift_scale`). Training needs only the schedule (add_noise,
        get_velocity, alphas_cumprod: identical in the DDIM and DPM classes); the sampler is `generate`'s."""
        comp = cfg.transformer
        if comp.pretrained and comp.subfolder:
            local = Path(comp.pretrained) / "scheduler" / "scheduler_config.json"
            if local.is_file() or not Path(comp.pretrained).exists():  # a local release, or a hub id
                return CogVideoXDDIMScheduler.from_pretrained(comp.pretrained, subfolder="scheduler")
        return CogVideoXDDIMScheduler(**{**SCHEDULER_CONFIG, "snr_shift_scale": self.snr_shift_scale})

    # ---- encoding (prep) ------------------------------------------------------------------------
    def encode_video(self, vae: nn.Module, frames: torch.Tensor) -> torch.Tensor:
        return encode_pixels(vae, to_pixels(frames))  # (B, 2*Cz, T', H', W'): mean ++ logvar

    def encode_text(self, tokenizer: Any, encoder: nn.Module, captions: list[str], max_length: int) -> torch.Tensor:
        # A text-only pipeline: the prompt path is the pipeline's own, so train == inference.
        pipe = CogVideoXPipeline(tokenizer=tokenizer, text_encoder=encoder, vae=None, transformer=None, scheduler=None)
        embeds, _ = pipe.encode_prompt(
            captions,
            do_classifier_free_guidance=False,
            max_sequence_length=max_length,
            device=encoder.device,
            dtype=encoder.dtype,
        )
        return embeds  # (B, L, D)

    # ---- training -------------------------------------------------------------------------------
    def training_loss(
        self, transformer: nn.Module, scheduler: Any, batch: dict[str, torch.Tensor], generator: torch.Generator
    ) -> torch.Tensor:
        """THUDM's finetune objective: t ~ U{0..999}, noise ~ N(0, 1) on the (padded) clip latents."""
        core = self.core_module(transformer)
        z = sample_latents(batch, generator).permute(0, 2, 1, 3, 4)  # (B, T', C, H', W') as the transformer takes it
        latents, condition = self.denoiser_latents(core, z, generator)
        device = latents.device
        noise = torch.randn(latents.shape, generator=generator).to(device)
        t = uniform_timesteps(scheduler, latents.shape[0], generator, device)
        return self.v_loss(transformer, scheduler, latents, noise, t, batch["text_embeds"], condition)

    def denoiser_latents(
        self, core: nn.Module, z: torch.Tensor, generator: torch.Generator | None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Sampled latents (B, T', C, H', W') -> (clean latents the loss is on, channel condition or None).
        1.0 T2V: as they are. `generator` draws any training-time randomness (None: none drawn)."""
        return z, None

    def v_loss(
        self,
        transformer: nn.Module,
        scheduler: Any,
        latents: torch.Tensor,
        noise: torch.Tensor,
        t: torch.Tensor,
        text: torch.Tensor,
        condition: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """CogVideoX's objective on latents (B, F, C, H', W') for given noise and timesteps: v-prediction
        turned into an x0 estimate, MSE weighted by 1/(1-alpha_bar), averaged per sample then over the
        batch. `condition` (B, F, C', H', W') is concatenated to the noisy latents on channels
        (image-to-video); 1.5 I2V's ofs embedding gets the pipeline's (and the trainer's) 2.0."""
        core = self.core_module(transformer)
        device = latents.device
        noisy = scheduler.add_noise(latents, noise.to(device), t)
        inputs = noisy if condition is None else torch.cat([noisy, condition.to(noisy.dtype)], dim=2)
        ofs = None if core.config.ofs_embed_dim is None else noisy.new_full((1,), 2.0)
        pred_v = transformer(
            hidden_states=inputs,
            encoder_hidden_states=text.to(noisy.dtype),
            timestep=t,
            ofs=ofs,
            image_rotary_emb=self._rotary(core, latents.shape, device),
            return_dict=False,
        )[0]
        pred_x0 = scheduler.get_velocity(pred_v.float(), noisy, t)  # v -> x0 for a v-prediction model
        alpha_bar = scheduler.alphas_cumprod.to(device, torch.float32)[t]
        weight = (1.0 / (1.0 - alpha_bar)).view(-1, 1, 1, 1, 1)
        return batch_loss((weight * (pred_x0 - latents) ** 2).flatten(1).mean(1))

    def _rotary(self, core: nn.Module, shape: torch.Size, device: torch.device) -> Any:
        if not core.config.use_rotary_positional_embeddings:
            return None
        _, t, _, h, w = shape
        pipe = SimpleNamespace(vae_scale_factor_spatial=self.spatial_compression, transformer=core)
        return CogVideoXPipeline._prepare_rotary_positional_embeddings(
            pipe, h * self.spatial_compression, w * self.spatial_compression, t, device
        )

    def latent_tokens(self, transformer_config: Any, latent_shape: tuple[int, ...]) -> int:
        _, t, h, w = latent_shape[-4:]  # (2*Cz, T', H', W')
        p, pt = transformer_config.patch_size, transformer_config.patch_size_t or 1
        return (t // pt) * (h // p) * (w // p)

    # ---- export and inference -------------------------------------------------------------------
    def save_pretrained(self, out_dir: Path, cfg: ModelConfig, transformer: nn.Module) -> Path:
        tokenizer, encoder = self.load_text_encoder(cfg)
        pipe = self.pipeline_cls(
            tokenizer=tokenizer,
            text_encoder=encoder,
            vae=self.load_vae(cfg),
            transformer=transformer,
            scheduler=self.load_scheduler(cfg),
        )
        pipe.save_pretrained(out_dir, safe_serialization=True)
        return out_dir

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
        """(N, T, H, W, 3) uint8 videos from `pipeline_cls` with the authors' sampler; an image-to-video family
        continues one image per prompt (`check_images`: any size, the pipeline resizes it to height x width;
        without images every video starts from a mid-grey frame, which keeps eval comparable across runs)."""
        firsts = self.check_images(images, prompts, height, width)
        pipe = self.sampling_pipe(pretrained_dir, device)
        kw = dict(num_frames=num_frames, height=height, width=width, steps=steps, guidance_scale=guidance_scale)
        return np.stack(
            [
                sample_video(pipe, seed + i, **self.pipeline_inputs(p, img), **kw)
                for i, (p, img) in enumerate(zip(prompts, firsts, strict=True))
            ]
        )

    def pipeline_inputs(self, prompt: str, image: np.ndarray | None) -> dict[str, Any]:
        """What one pipeline call takes besides the sampling settings: the prompt (and, image-to-video, the
        first frame)."""
        return {"prompt": prompt}


def to_pixels(frames: torch.Tensor) -> torch.Tensor:
    """(B, T, H, W, C) uint8 -> (B, C, T, H, W) float in [-1, 1], as the pipelines' video processor gives it."""
    return frames.permute(0, 4, 1, 2, 3).float() / 127.5 - 1.0


def encode_pixels(vae: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """(B, C, T, H, W) in [-1, 1] -> the posterior's parameters (B, 2*Cz, T', H', W'): mean ++ logvar."""
    return vae.encode(x.to(vae.device, vae.dtype)).latent_dist.parameters


def affine_posterior(params: torch.Tensor, mean: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """The posterior (mean ++ logvar, (B, 2*Cz, ...)) of z' = (z - mean) * scale per channel, for families that train
    on normalised latents (Wan, LTX-Video): z ~ N(mu, sigma^2) gives N((mu - mean) scale, (sigma scale)^2), so the
    cache still holds a posterior and the engine's shared sampling from it needs no per-family step."""
    mu, logvar = params.float().chunk(2, dim=1)
    return torch.cat([(mu - mean) * scale, logvar + 2 * torch.log(scale)], dim=1)


def authors_sampler(pipe: Any) -> bool:
    """Put the sampler THUDM recommends on `pipe`; True where it takes dynamic CFG.

    CogVideo `inference/cli_demo.py`: CogVideoXDDIMScheduler for CogVideoX-2B, CogVideoXDPMScheduler
    with `use_dynamic_cfg=True` for the 5B line (5b, 5b-I2V, 1.5), "for DDIM it should be False" (the
    SAT configs sample every 5B with DPM++ 2M and DynamicCFG(scale 6, exp 5)). The released folders ship
    the DDIM class for all; the 2B line is the one without rotary embeddings."""
    if not pipe.transformer.config.use_rotary_positional_embeddings:
        return False
    if not isinstance(pipe.scheduler, CogVideoXDPMScheduler):
        pipe.scheduler = CogVideoXDPMScheduler.from_config(pipe.scheduler.config, timestep_spacing="trailing")
    return True


def sample_video(
    pipe: Any, seed: int, *, steps: int, guidance_scale: float, num_frames: int, height: int, width: int, **inputs: Any
) -> np.ndarray:
    """One (T, H, W, 3) uint8 video from a CogVideoX pipeline with the authors' sampler; `inputs` are the
    prompt (and image)."""
    pipe.set_progress_bar_config(disable=True)
    dynamic = authors_sampler(pipe)
    video = pipe(
        num_frames=num_frames,
        height=height,
        width=width,
        num_inference_steps=steps,
        guidance_scale=guidance_scale,
        generator=torch.Generator("cpu").manual_seed(seed),
        max_sequence_length=pipe.transformer.config.max_text_seq_length,
        output_type="np",
        use_dynamic_cfg=dynamic,
        **inputs,
    ).frames[0]  # (T, H, W, C) in [0, 1]
    return frames_out(video)


register_family(CogVideoX())
