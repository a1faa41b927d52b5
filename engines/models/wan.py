"""Wan2.1 text-to-video and Wan2.2 (TI2V-5B, the T2V-A14B expert pair): diffusers' `WanTransformer3DModel`,
`AutoencoderKLWan`, `WanPipeline`; UMT5 text encoder.

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
- **Wan2.2 T2V-A14B** (`model.experts`): two 14B experts split at timestep boundary * 1000 (0.875, wan_t2v_A14B.py),
  the high-noise one above. A run trains one expert on its own timesteps only, as DiffSynth-Studio trains Wan2.2
  A14B (its `--max/min_timestep_boundary 0.417` are the grid indices of t = 875, `expert_indices`); the export is
  the two-expert `WanPipeline` (`transformer` high noise, `transformer_2` low noise, `boundary_ratio`), the other
  expert unchanged, sampled with the authors' shift 12, 40 steps and guidance (3.0 low noise, 4.0 high noise).
  `train: both` (ours; DiffSynth runs one expert per run) trains the pair in one run as a `WanExpertPair`: each
  training call runs one expert, the same on every rank (FSDP2 needs it), on its own timesteps, the high-noise one for
  its grid share (417 of 1000 calls, `high_noise_call`), and the export holds both as trained.
- **Wan2.2 TI2V-5B** (Wan2.2's VAE: 16x, 48 channels, so sides are multiples of 32): training conditions on the clip's
  clean first latent frame at timestep 0, outside the loss, as DiffSynth-Studio trains TI2V-5B and the authors'
  textimage2video.py samples it; the export is `WanPipeline(expand_timesteps=True)`, and `generate` given first
  frames samples image-to-video through `WanImageToVideoPipeline` on the same components.

docs/fidelity.md (Wan) lists each choice and what is not reproduced.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from diffusers import (
    AutoencoderKLWan,
    FlowMatchEulerDiscreteScheduler,
    UniPCMultistepScheduler,
    WanImageToVideoPipeline,
    WanPipeline,
    WanTransformer3DModel,
)
from flowspeed.configs.adapters import DIFFUSERS_WEIGHTS, PEFT_CONFIG
from flowspeed.configs.schema import ModelConfig
from flowspeed.engines.models.cogvideox import affine_posterior, encode_pixels, to_pixels
from flowspeed.engines.models.registry import (
    LatentFamily,
    batch_loss,
    conditioning_images,
    from_pretrained,
    loaded,
    pick_preset,
    register_family,
    seeded_init,
)
from flowspeed.engines.models.text_video import TextToVideoPipelineFamily
from flowspeed.engines.models.tokenizer import byte_level_tokenizer
from torch import nn
from torch.nn.parallel import DistributedDataParallel
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
#: Wan-Video/Wan2.2@42bf4cf wan/configs/wan_t2v_A14B.py, the A14B pair: `boundary = 0.875` (the high-noise expert
#: for t >= 0.875 * 1000, text2video.py `_prepare_model_for_timestep`), `sample_shift = 12.0`, `sample_steps = 40`,
#: `sample_guide_scale = (3.0, 4.0)` (low noise, high noise); frames, fps and text length as Wan2.1 (shared_config)
A14B_BOUNDARY = 0.875
A14B_SAMPLE_SHIFT = 12.0
A14B_SAMPLE_STEPS = 40
A14B_GUIDANCE_LOW, A14B_GUIDANCE_HIGH = 3.0, 4.0
HIGH_NOISE, LOW_NOISE, BOTH = "high_noise", "low_noise", "both"
#: the transformers' patch, (1, 2, 2) in every Wan config (`patch_size`): pixel sides divide by the VAE's factor x 2
PATCH = 2
NEGATIVE_PROMPT = (
    "色调艳丽，过曝，静态，细节模糊不清，字幕，风格，作品，画作，画面，静止，整体发灰，最差质量，低质量，JPEG压缩残留，"
    "丑陋的，残缺的，多余的手指，画得不好的手部，画得不好的脸部，畸形的，毁容的，形态畸形的肢体，手指融合，"
    "静止不动的画面，杂乱的背景，三条腿，背景人很多，倒着走"
)

#: Wan2.2's VAE (TI2V-5B): per-channel latent statistics of its 48 channels, huggingface/diffusers@58eb52c
#: scripts/convert_wan_to_diffusers.py `vae22_diffusers_config` (= Wan-Video/Wan2.2@42bf4cf wan/modules/vae2_2.py
#: `Wan2_2_VAE`'s `mean` and `std`)
WAN22_LATENTS_MEAN = [
    -0.2289, -0.0052, -0.1323, -0.2339, -0.2799, 0.0174, 0.1838, 0.1557, -0.1382, 0.0542, 0.2813, 0.0891, 0.1570,
    -0.0098, 0.0375, -0.1825, -0.2246, -0.1207, -0.0698, 0.5109, 0.2665, -0.2108, -0.2158, 0.2502, -0.2055, -0.0322,
    0.1109, 0.1567, -0.0729, 0.0899, -0.2799, -0.1230, -0.0313, -0.1649, 0.0117, 0.0723, -0.2839, -0.2083, -0.0520,
    0.3748, 0.0152, 0.1957, 0.1433, -0.2944, 0.3573, -0.0548, -0.1681, -0.0667,
]  # fmt: skip
WAN22_LATENTS_STD = [
    0.4765, 1.0364, 0.4514, 1.1677, 0.5313, 0.4990, 0.4818, 0.5013, 0.8158, 1.0344, 0.5894, 1.0901, 0.6885, 0.6165,
    0.8454, 0.4978, 0.5759, 0.3523, 0.7135, 0.6804, 0.5833, 1.4146, 0.8986, 0.5659, 0.7069, 0.5338, 0.4889, 0.4917,
    0.4069, 0.4999, 0.6866, 0.4093, 0.5709, 0.6065, 0.6415, 0.4944, 0.5726, 1.2042, 0.5458, 1.6887, 0.3971, 1.0600,
    0.3943, 0.5537, 0.5444, 0.4089, 0.7468, 0.7744,
]  # fmt: skip
VAE_PRESETS: dict[str, dict[str, Any]] = {
    # Wan2.1's VAE layout (3 spatial downsamples -> 8x, temporal [False, True, True] -> 4x, 16 latent channels and
    # the released per-channel latents_mean/std, AutoencoderKLWan's defaults) at 1/12 of the width.
    "tiny": dict(base_dim=8, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=1, attn_scales=[],
                 temperal_downsample=[False, True, True]),
    # Wan2.2's VAE layout (`vae22_diffusers_config`: residual blocks, 2x2 patchified input -> 12 channels, then 3
    # spatial downsamples -> 16x, 4x in time, 48 latent channels and their released statistics) at 1/20 of the width.
    "tiny-2.2": dict(base_dim=8, decoder_base_dim=8, z_dim=48, is_residual=True, in_channels=12, out_channels=12,
                     patch_size=2, scale_factor_spatial=16, scale_factor_temporal=4, dim_mult=[1, 2, 4, 4],
                     num_res_blocks=1, attn_scales=[], temperal_downsample=[False, True, True],
                     latents_mean=WAN22_LATENTS_MEAN, latents_std=WAN22_LATENTS_STD),
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


def is_high_noise(timesteps: torch.Tensor, boundary: float) -> torch.Tensor:
    """Which timesteps the high-noise expert takes: t >= boundary * 1000, as the authors switch (text2video.py
    `t.item() >= boundary`) and diffusers' `WanPipeline` (`t >= boundary_ratio * num_train_timesteps`)."""
    return timesteps >= boundary * NUM_TRAIN_TIMESTEPS


def expert_indices(scheduler: Any, boundary: float, expert: str) -> tuple[int, int]:
    """The training grid's indices [lo, hi) whose timesteps are `expert`'s. The grid runs from t = 1000 down, so the
    high-noise expert's are a prefix: on the shift-5 grid at boundary 0.875 that is [0, 417), DiffSynth-Studio's
    `--max_timestep_boundary 0.417` for the high-noise expert and `--min_timestep_boundary 0.417` for the low-noise one
    (examples/wanvideo/model_training/full/Wan2.2-T2V-A14B.sh: "boundary corresponds to timesteps [875, 1000]")."""
    n_high = int(is_high_noise(scheduler.timesteps[:NUM_TRAIN_TIMESTEPS], boundary).sum())
    if not 0 < n_high < NUM_TRAIN_TIMESTEPS:
        raise ValueError(f"model.experts.boundary={boundary} leaves one expert no training timestep")
    if expert not in (HIGH_NOISE, LOW_NOISE):
        raise ValueError(f"unknown expert {expert!r}; use {HIGH_NOISE} or {LOW_NOISE}")
    return (0, n_high) if expert == HIGH_NOISE else (n_high, NUM_TRAIN_TIMESTEPS)


def high_noise_call(calls: int, n_high: int, steps: int = NUM_TRAIN_TIMESTEPS) -> bool:
    """Whether training call `calls` (0, 1, ...) of `train: both` trains the high-noise expert: the calls are shared
    out in proportion to the experts' shares of the training grid (n_high of `steps` indices), spread evenly (a
    Bresenham line: high iff floor((k + 1) p) > floor(k p), p = n_high / steps, in integers). Every rank computes
    the same answer from the same count, so every rank runs the same expert, which FSDP2 requires."""
    return (calls + 1) * n_high // steps > calls * n_high // steps


class WanExpertPair(nn.Module):
    """Wan2.2 A14B's two experts as ONE trained model (`model.experts.train: both`), under the names diffusers'
    `WanPipeline` gives them, `transformer` (high noise) and `transformer_2` (low noise): the engine's FSDP2,
    activation checkpointing and compile then find both experts' blocks (parallelize.py BLOCK_LISTS), and the export
    puts each expert in its own slot as it is.

    A call runs ONE expert on the whole batch (`expert="high_noise"` or "low_noise"), or, given a per-sample bool
    mask (evaluation's loss over the whole grid), both experts on the whole batch in a fixed order, each sample then
    taking its own expert's output. Every rank must run the same expert(s) in the same order: under FSDP2 the
    per-block all-gathers of two same-shaped experts run in different orders on different ranks would silently pair
    one expert's shards with the other's.

    `calls` counts training calls (a persistent buffer: checkpoints carry it, so a resumed run continues the same
    expert sequence, and every rank holds the same count); `next_expert` turns it into the schedule."""

    #: both experts are this class with one config (the A14B pair: two 14B layouts)
    expert_cls: type = WanTransformer3DModel

    def __init__(self, transformer: nn.Module, transformer_2: nn.Module) -> None:
        super().__init__()
        arch = [{k: v for k, v in dict(m.config).items() if not k.startswith("_")}
                for m in (transformer, transformer_2)]  # fmt: skip
        if type(transformer) is not type(transformer_2) or arch[0] != arch[1]:
            raise ValueError(
                "model.experts.train: both trains two experts of one layout (Wan2.2 A14B: two 14B transformers); "
                f"model.transformer and model.experts.other differ: {arch[0]} vs {arch[1]}"
            )
        self.transformer = transformer
        self.transformer_2 = transformer_2
        self.register_buffer("calls", torch.zeros((), dtype=torch.int64))

    def active_parameter_count(self) -> int:
        """One expert's parameters: a step runs one expert (what the trainer's model FLOPs and MFU count)."""
        return sum(p.numel() for p in self.transformer.parameters())

    @property
    def config(self) -> Any:
        """One expert's config: what the engine sizes tokens and FLOPs by, and rebuilds the pair from on meta."""
        return self.transformer.config

    @classmethod
    def from_config(cls, config: Any) -> WanExpertPair:
        """Both experts from one config (the engine's meta-device build on every rank; weights arrive afterwards)."""
        return cls(cls.expert_cls.from_config(config), cls.expert_cls.from_config(config))

    def expert(self, name: str) -> nn.Module:
        if name not in (HIGH_NOISE, LOW_NOISE):
            raise ValueError(f"unknown expert {name!r}; use {HIGH_NOISE} or {LOW_NOISE}")
        return self.transformer if name == HIGH_NOISE else self.transformer_2

    @torch.no_grad()
    def next_expert(self, n_high: int) -> str:
        """The expert of this training call (`high_noise_call` of the count), counting the call."""
        k = int(self.calls)
        self.calls += 1
        return HIGH_NOISE if high_noise_call(k, n_high) else LOW_NOISE

    def forward(self, *, expert: str | torch.Tensor, **inputs: Any) -> tuple[torch.Tensor]:
        inputs["return_dict"] = False
        if isinstance(expert, str):
            return self.expert(expert)(**inputs)
        high, low = self.transformer(**inputs)[0], self.transformer_2(**inputs)[0]  # same order on every rank
        pick = expert.to(high.device).view(-1, *(1,) * (high.ndim - 1))
        return (torch.where(pick, high, low),)


class Wan(LatentFamily, TextToVideoPipelineFamily):
    """Wan2.1 text-to-video (1.3B and 14B layouts), Wan2.2 TI2V-5B and the T2V-A14B pair; export and sampling:
    engines/models/text_video.py (with the pair's and TI2V's pipeline arguments, and TI2V's image path here)."""

    name = "wan"
    temporal_compression = 4
    spatial_compression = 8
    size_multiple = 16  # 8x VAE, 2x2 patches
    vae_name = "Wan"
    authors_frames = "the authors: 81"
    pipeline_cls: type = WanPipeline
    negative_prompt = NEGATIVE_PROMPT
    text_length = TEXT_LENGTH
    #: an A14B release's sampling facts, per release (the I2V-A14B family sets its own): shift, (low, high) guidance
    a14b_sample_shift = A14B_SAMPLE_SHIFT
    a14b_guidance = (A14B_GUIDANCE_LOW, A14B_GUIDANCE_HIGH)

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
        """The trained denoiser; with `model.experts` (Wan2.2 A14B) the expert `experts.train` names. A two-expert
        pipeline folder named by its `transformer` subfolder (how evaluation reads an export back) gives the trained
        expert's own slot: `transformer_2` for the low-noise expert. `train: both` gives the pair (`WanExpertPair`):
        model.transformer the high-noise expert, experts.other the low-noise one, except that a two-expert pipeline
        named by its `transformer` subfolder (a release, an export read back, a champion) gives its own pair."""
        self.check_experts(cfg)
        comp = cfg.transformer
        if cfg.experts is not None and cfg.experts.train == BOTH:
            other = cfg.experts.other
            if _pair_slot(comp, "transformer"):
                other = comp.model_copy(update={"subfolder": "transformer_2"})
            high = self._denoiser(cfg, comp, HIGH_NOISE, text_embed_dim, latent_channels)
            return WanExpertPair(high, self._denoiser(cfg, other, LOW_NOISE, text_embed_dim, latent_channels))
        if cfg.experts is not None and cfg.experts.train == LOW_NOISE and _pair_slot(comp, "transformer"):
            comp = comp.model_copy(update={"subfolder": "transformer_2"})
        train = cfg.experts.train if cfg.experts is not None else HIGH_NOISE
        return self._denoiser(cfg, comp, train, text_embed_dim, latent_channels)

    def load_other_expert(self, cfg: ModelConfig, trained: nn.Module) -> nn.Module:
        """The expert a run leaves as it is (`model.experts.other`), sized like the trained one when a preset."""
        if cfg.experts is None or cfg.experts.train == BOTH:
            raise ValueError("only a run training one expert (model.experts.train high_noise or low_noise) has another")
        other = LOW_NOISE if cfg.experts.train == HIGH_NOISE else HIGH_NOISE
        c = self.core_module(trained).config
        return self._denoiser(cfg, cfg.experts.other, other, c.text_dim, c.out_channels).eval().requires_grad_(False)

    def _denoiser(self, cfg: ModelConfig, comp: Any, expert: str, text_embed_dim: int, channels: int) -> nn.Module:
        if comp.pretrained:
            return from_pretrained(WanTransformer3DModel, comp, "transformer")
        preset = pick_preset(comp, TRANSFORMER_PRESETS, "transformer")
        with seeded_init(cfg.seed + (3 if expert == HIGH_NOISE else 4)):  # a random pair: two different experts
            return WanTransformer3DModel(in_channels=channels, out_channels=channels, text_dim=text_embed_dim, **preset)

    def check_experts(self, cfg: ModelConfig) -> None:
        """`model.experts` is the A14B pair on the Wan2.1 VAE (TI2V-5B, on Wan2.2's VAE, is one dense model), naming two
        different experts (the same weights twice is a config slip)."""
        if cfg.experts is not None and self.first_frame_conditioned(cfg):
            raise ValueError(
                "model.experts is Wan2.2 A14B's expert pair, on the Wan2.1 VAE; this model.vae is Wan2.2's (TI2V-5B, "
                "one dense model conditioned on the first frame): remove model.experts, or use the Wan2.1 VAE"
            )
        if cfg.experts is not None and cfg.transformer.pretrained and cfg.experts.other.pretrained:
            if cfg.transformer.identity() == cfg.experts.other.identity():
                raise ValueError(
                    f"model.transformer and model.experts.other name the same weights ({cfg.transformer.identity()}); "
                    "the two experts are different models (a release's transformer/ and transformer_2/)"
                )

    def load_scheduler(self, cfg: ModelConfig) -> FlowMatchEulerDiscreteScheduler:
        """The training grid: 1000 sigmas (1000 - i) / 1000 shifted by 5, DiffSynth-Studio's training schedule. With
        `model.experts` it also records the grid indices the trained expert draws from (`expert_indices`)."""
        scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=NUM_TRAIN_TIMESTEPS, shift=TRAIN_SHIFT)
        if cfg.experts is not None and cfg.experts.train == BOTH:  # both: each call draws from its expert's range
            scheduler.expert_ranges = {
                e: expert_indices(scheduler, cfg.experts.boundary, e) for e in (HIGH_NOISE, LOW_NOISE)
            }
        elif cfg.experts is not None:
            scheduler.expert_indices = expert_indices(scheduler, cfg.experts.boundary, cfg.experts.train)
        scheduler.first_frame = self.first_frame_conditioned(cfg)  # TI2V-5B: the clean first frame conditions
        return scheduler

    def first_frame_conditioned(self, cfg: ModelConfig) -> bool:
        """Whether training conditions on the clean first frame as TI2V-5B does: with Wan2.2's VAE (residual, 48
        channels), on which TI2V-5B is the one released model."""
        return bool(_vae_config(cfg).get("is_residual", False))

    def size_multiple_for(self, cfg: ModelConfig) -> int:
        """What pixel sides must divide by with `cfg`'s VAE: its spatial factor x the 2x2 patches. Wan2.1's VAE: 8 x 2
        = 16; Wan2.2's: 16 x 2 = 32 (wan/configs/wan_ti2v_5B.py `vae_stride = (4, 16, 16)`, sizes 704*1280)."""
        return int(_vae_config(cfg).get("scale_factor_spatial", self.spatial_compression)) * PATCH

    def sample_scheduler(self, cfg: ModelConfig) -> Any:
        """What the export samples with: a pretrained release's own `scheduler/` folder where it has one, else the
        authors' sampler (UniPC flow solver; shift 5.0 for text-to-video, 12.0 for the A14B pair)."""
        comp = cfg.transformer
        if comp.pretrained and (Path(comp.pretrained) / "scheduler" / "scheduler_config.json").is_file():
            return UniPCMultistepScheduler.from_pretrained(comp.pretrained, subfolder="scheduler")
        return UniPCMultistepScheduler(
            prediction_type="flow_prediction", use_flow_sigmas=True, num_train_timesteps=NUM_TRAIN_TIMESTEPS,
            flow_shift=self.a14b_sample_shift if cfg.experts is not None else SAMPLE_SHIFT,
        )  # fmt: skip

    def pipeline_denoisers(self, cfg: ModelConfig, transformer: nn.Module) -> dict[str, Any]:
        """With `model.experts`: both experts in diffusers' slots (`transformer` high noise, `transformer_2` low
        noise) and the boundary as `boundary_ratio`, the layout of Wan-AI/Wan2.2-T2V-A14B-Diffusers; on Wan2.2's VAE
        `expand_timesteps` (Wan-AI/Wan2.2-TI2V-5B-Diffusers' layout, as diffusers' conversion script writes it)."""
        if cfg.experts is None:  # TI2V-5B: per-token timesteps, the first frame's at 0 when an image conditions
            ti2v = {"expand_timesteps": True} if self.first_frame_conditioned(cfg) else {}
            return {**super().pipeline_denoisers(cfg, transformer), **ti2v}
        if cfg.experts.train == BOTH:  # both trained: each in its own slot
            pair = self.core_module(transformer)
            if not isinstance(pair, WanExpertPair):
                raise TypeError(f"model.experts.train: both exports a WanExpertPair, not {type(pair).__name__}")
            return {"transformer": pair.transformer, "transformer_2": pair.transformer_2,
                    "boundary_ratio": cfg.experts.boundary}  # fmt: skip
        trained, other = self.core_module(transformer), self.load_other_expert(cfg, transformer)
        high, low = (trained, other) if cfg.experts.train == HIGH_NOISE else (other, trained)
        return {"transformer": high, "transformer_2": low, "boundary_ratio": cfg.experts.boundary}

    def save_pretrained(self, out_dir: Path, cfg: ModelConfig, transformer: nn.Module) -> Path:
        """The pipeline folder (text_video.py); after `train: both` with LoRA also diffusers' LoRA file per expert
        (`split_pair_lora`), since the engine's adapter export names the pair's layers as one transformer's."""
        out = super().save_pretrained(out_dir, cfg, transformer)
        if cfg.experts is not None and cfg.experts.train == BOTH:
            split_pair_lora(Path(out_dir) / "lora")
        return out

    def paired_guidance(self, pipe: Any, call: dict[str, Any]) -> bool:
        """diffusers' Wan pipelines call each expert twice per step (conditional, then the negative prompt) whenever
        `guidance_scale` > 1 (the low-noise expert's `guidance_scale_2` only scales the same pair)."""
        return call.get("guidance_scale", 1.0) > 1.0

    def pipeline_call(self, pipe: Any, guidance_scale: float) -> dict[str, Any]:
        """A two-expert export also gives the low-noise expert the authors' low/high ratio of the guidance (3.0 / 4.0,
        so `guidance_scale` 4.0 gives their (3.0, 4.0)); diffusers' default would give both experts the same."""
        call = super().pipeline_call(pipe, guidance_scale)
        if pipe.config.get("boundary_ratio") is not None and getattr(pipe, "transformer_2", None) is not None:
            call["guidance_scale_2"] = guidance_scale * self.a14b_guidance[0] / self.a14b_guidance[1]
        return call

    # ---- sampling -------------------------------------------------------------------------------
    def export_size_multiple(self, folder: Path) -> int:
        """The export's own VAE decides: 16 px on Wan2.1's (8x), 32 on Wan2.2's (16x), with the 2x2 patches."""
        vae_config = folder / "vae" / "config.json"
        factor = json.loads(vae_config.read_text()).get("scale_factor_spatial", 8) if vae_config.is_file() else 8
        return int(factor) * PATCH

    def first_frames(
        self, folder: Path, images: list[np.ndarray] | None, prompts: list[str], height: int, width: int
    ) -> list[np.ndarray | None]:
        """A TI2V export (`expand_timesteps`) also takes one first frame per prompt (none: text-to-video); the
        others follow `check_images`."""
        if images is not None and _is_ti2v_export(folder):
            return conditioning_images(images, prompts, height, width)
        return super().first_frames(folder, images, prompts, height, width)

    def sampling_pipeline(self, folder: Path, device: torch.device, with_images: bool) -> Any:
        """A TI2V export with first frames samples through diffusers' `WanImageToVideoPipeline` on the same
        components: the image latent replaces the first latent frame, whose tokens denoise at timestep 0 (the authors'
        textimage2video.py `i2v`); everything else through the export's own pipeline."""
        if not (with_images and _is_ti2v_export(folder)):
            return super().sampling_pipeline(folder, device, with_images)

        def load() -> Any:
            return WanImageToVideoPipeline.from_pipe(WanPipeline.from_pretrained(folder)).to(device)

        return loaded(load, folder, device, "image-to-video")

    # ---- encoding (prep) ------------------------------------------------------------------------
    def encode_video(self, vae: nn.Module, frames: torch.Tensor) -> torch.Tensor:
        """uint8 (B, T, H, W, C) -> the posterior of the *normalised* latent, (B, 2*16, T', H', W'): mean ++ logvar.

        Wan trains on (z - latents_mean) / latents_std per channel; z ~ N(mu, sigma^2) gives N((mu - m) / s,
        (sigma / s)^2), so the cache holds mean (mu - m) / s and log-variance logvar - 2 log s, and the engine's
        scaling (1.0) and shift (0.0) leave it as it is."""
        multiple = int(getattr(vae.config, "scale_factor_spatial", self.spatial_compression)) * PATCH
        if frames.shape[2] % multiple or frames.shape[3] % multiple:
            raise ValueError(
                f"this Wan VAE ({multiple // PATCH}x) with 2x2 patches takes sides that are multiples of {multiple}, "
                f"not {frames.shape[2]}x{frames.shape[3]}; set data.height/width accordingly"
            )
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
        VAE wrapper encodes to `mu`), index i ~ U{0..999} on the shifted grid (an A14B expert: U over its own indices,
        `expert_indices`), flow target eps - x0, bsmntw weight; TI2V-5B's first frame conditions (`flow_loss`).
        `train: both` (a `WanExpertPair`): one expert per call, see `_pair_call`."""
        params = batch["latent_params"].float()
        x0 = params[:, : params.shape[1] // 2]  # (B, C, T', H', W'), already normalised at prep
        noise = torch.randn(x0.shape, generator=generator).to(x0.device)
        pair = self.core_module(transformer)
        if isinstance(pair, WanExpertPair):  # train: both
            call, idx = self._pair_call(transformer, pair, scheduler, x0.shape[0], generator)
            return self.flow_loss(call, scheduler, x0, noise, idx, batch["text_embeds"])
        lo, hi = getattr(scheduler, "expert_indices", (0, NUM_TRAIN_TIMESTEPS))  # an A14B expert: its own range
        idx = torch.randint(lo, hi, (x0.shape[0],), generator=generator)
        first_frame = getattr(scheduler, "first_frame", False)
        return self.flow_loss(transformer, scheduler, x0, noise, idx, batch["text_embeds"], first_frame=first_frame)

    @staticmethod
    def _pair_call(
        transformer: nn.Module, pair: WanExpertPair, scheduler: Any, batch_size: int, generator: torch.Generator
    ) -> tuple[Callable[..., Any], torch.Tensor]:
        """(the denoiser call, grid indices) of `train: both`. Training: ONE expert for the whole micro-batch, the
        same on every rank (`next_expert`: the high-noise one for 417 of every 1000 calls at boundary 0.875, spread
        evenly), its timesteps drawn from its own index range, as a one-expert run draws them. Over many calls that is
        the per-sample mixture (index uniform on the whole grid, each sample to its expert) in expectation: a call
        trains the high-noise expert with the high range's share of the grid. The expert not run gets no gradient
        (None, which AdamW skips). Evaluation (not `training`): indices over the whole grid, both experts run on the
        whole batch, each sample scored on its own expert's output: the pair's loss as sampling uses it.
        `transformer` may be the pair, its engine wrapper or wan_i2v's image wrapper (its `.transformer`)."""
        callers = (transformer, getattr(transformer, "transformer", None))
        if any(isinstance(m, DistributedDataParallel) for m in callers):
            raise ValueError(
                "model.experts.train: both runs one expert per step, which DDP (dp_replicate > 1, dp_shard = 1) "
                "counts as unused parameters; train the pair with FSDP2/HSDP (train.parallel.dp_shard > 1)"
            )
        n_high = scheduler.expert_ranges[HIGH_NOISE][1]  # the high-noise expert's indices are [0, n_high)
        if pair.training:
            expert = pair.next_expert(n_high)
            lo, hi = scheduler.expert_ranges[expert]
            return partial(transformer, expert=expert), torch.randint(lo, hi, (batch_size,), generator=generator)
        idx = torch.randint(0, NUM_TRAIN_TIMESTEPS, (batch_size,), generator=generator)
        return partial(transformer, expert=idx < n_high), idx

    def flow_loss(
        self,
        transformer: nn.Module,
        scheduler: Any,
        x0: torch.Tensor,
        noise: torch.Tensor,
        idx: torch.Tensor,
        text: torch.Tensor,
        *,
        first_frame: bool = False,
    ) -> torch.Tensor:
        """The loss at given grid indices `idx` (B,) and noise: per sample the weighted mean squared error of the
        predicted velocity against eps - x0, then the batch mean.

        `first_frame` (TI2V-5B): the first latent frame is the clean latent (the image's: the VAE is causal, so a
        clip's first latent frame encodes its first frame alone), its tokens get timestep 0 and the rest t (a (B, S)
        timestep, diffusers' `expand_timesteps`, the authors' textimage2video.py `mask2 * t`), and the loss leaves it
        out, as DiffSynth-Studio trains TI2V-5B (`FlowMatchSFTLoss` with `first_frame_latents`)."""
        device = x0.device
        sigma = scheduler.sigmas[idx].to(device, torch.float32).view(-1, 1, 1, 1, 1)
        timestep = scheduler.timesteps[idx].to(device)
        noisy = (1.0 - sigma) * x0 + sigma * noise
        target = noise - x0
        if first_frame:
            if x0.shape[2] < 2:
                raise ValueError("first-frame conditioning needs clips of 2+ latent frames (5+ frames), not 1")
            noisy = torch.cat([x0[:, :, :1], noisy[:, :, 1:]], dim=2)
            _, _, t, h, w = x0.shape
            frames = torch.ones(t, h // PATCH, w // PATCH, device=device)
            frames[0] = 0  # one entry per token: (T', H'/2, W'/2), the first frame's at 0
            timestep = frames.flatten()[None] * timestep.view(-1, 1)  # (B, S)
        pred = transformer(
            hidden_states=noisy, timestep=timestep, encoder_hidden_states=text.to(noisy.dtype), return_dict=False
        )[0].float()
        if first_frame:
            pred, target = pred[:, :, 1:], target[:, :, 1:]
        weight = bsmntw_weights(scheduler.timesteps[:NUM_TRAIN_TIMESTEPS])[idx].to(device)
        return batch_loss(weight * ((pred - target) ** 2).flatten(1).mean(1))

    def latent_tokens(self, transformer_config: Any, latent_shape: tuple[int, ...]) -> int:
        _, t, h, w = latent_shape[-4:]  # (2*Cz, T', H', W')
        pt, ph, pw = transformer_config.patch_size
        return (t // pt) * (h // ph) * (w // pw)


def split_pair_lora(folder: Path) -> None:
    """`train: both` with LoRA: the adapter export (engines/torch_engine/lora.py `save_adapter`) is ONE peft adapter
    covering the pair, its keys under `transformer.` and `transformer_2.` (`load_adapter` and
    `PeftModel.from_pretrained` put it onto a `WanExpertPair`), but diffusers keeps a LoRA per expert: the high-noise
    one's in `folder` (`pipe.load_lora_weights(folder)`), the low-noise one's in `folder/transformer_2`
    (`pipe.load_lora_weights(folder / "transformer_2", load_into_transformer_2=True)`, diffusers'
    WanLoraLoaderMixin). The engine wrote the pair's layers as one transformer's; this rewrites them per expert from
    the peft file. Nothing to do without a diffusers file (no LoRA)."""
    if not (folder / DIFFUSERS_WEIGHTS).is_file():
        return
    from flowspeed.engines.torch_engine.lora import PEFT_PREFIX
    from peft.utils import load_peft_weights

    state = load_peft_weights(str(folder))  # keys under peft's wrapper prefix, as PeftModel.save_pretrained writes
    config = json.loads((folder / PEFT_CONFIG).read_text())
    for slot, out in (("transformer", folder), ("transformer_2", folder / "transformer_2")):
        prefix = f"{PEFT_PREFIX}{slot}."
        layers = {k.removeprefix(prefix): v for k, v in state.items() if k.startswith(prefix)}
        if not layers:
            raise ValueError(f"{folder} holds no LoRA layers of the pair's {slot}: not a train: both adapter")
        meta = {"transformer_lora_adapter_metadata": config}
        WanPipeline.save_lora_weights(str(out), transformer_lora_layers=layers, **meta)


def _vae_config(cfg: ModelConfig) -> dict[str, Any]:
    """The VAE's config without building it: its preset's, or the pretrained folder's config.json."""
    comp = cfg.vae
    if not comp.pretrained:
        return pick_preset(comp, VAE_PRESETS, "vae")
    try:
        return dict(AutoencoderKLWan.load_config(comp.pretrained, **({"subfolder": comp.subfolder} if comp.subfolder
                                                                      else {})))  # fmt: skip
    except (OSError, ValueError) as exc:
        raise FileNotFoundError(f"could not read the VAE config under {comp.identity()}: {exc}") from exc


def _is_ti2v_export(folder: Path) -> bool:
    """Whether `folder` is a Wan2.2 TI2V-5B export (per-token timesteps: `expand_timesteps` in its model_index.json)."""
    index = folder / "model_index.json"
    return index.is_file() and bool(json.loads(index.read_text()).get("expand_timesteps"))


def _pair_slot(comp: Any, subfolder: str) -> bool:
    """Whether `comp` names a two-expert pipeline folder (its model_index.json has a `transformer_2`), through
    `subfolder` ("" for any)."""
    if not comp.pretrained or (subfolder and comp.subfolder != subfolder):
        return False
    index = Path(comp.pretrained) / "model_index.json"
    return index.is_file() and (json.loads(index.read_text()).get("transformer_2") or [None])[0] is not None


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
