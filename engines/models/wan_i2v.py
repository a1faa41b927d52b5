"""Wan2.1 image-to-video (14B, 480P and 720P): diffusers' `WanImageToVideoPipeline`, its `WanTransformer3DModel` with
an image embedding, `AutoencoderKLWan`, UMT5 and the CLIP ViT-H/14 vision tower (`CLIPVisionModel`).

Everything the text-to-video family does (engines/models/wan.py: normalised latents, UMT5 at 512 tokens, DiffSynth-
Studio's shift-5 flow matching with its timestep weights, the UniPC sampler) holds; the first frame adds two inputs,
built by the pipeline's own methods at prep so training sees exactly what sampling sees:

- **image condition** (B, 4 + 16, T', H', W'): `WanImageToVideoPipeline.prepare_latents` on the first frame (the
  pipeline's `video_processor`): the VAE's mode of [first frame, zeros for the other T - 1 frames], normalised per
  channel as the clip's latents, after the 4-channel frame mask (ones over the first latent frame's 4 pixel frames,
  zeros after). The authors' `wan/image2video.py` builds the same `y = concat([msk, vae.encode(...)])`. The denoiser
  takes the noisy latents and this concatenated on channels: in_channels 36 = 16 + 4 + 16.
- **image features** (B, 257, 1280): `WanImageToVideoPipeline.encode_image`: the pipeline's `image_processor` (CLIP's
  resize, centre crop and normalisation) and the vision tower's second-to-last hidden states (`hidden_states[-2]`:
  the authors' `clip.visual` runs 31 of the 32 blocks, `use_31_block=True`), taken by the transformer's image
  embedding (`image_dim`) into the cross-attention's image keys and values (`added_kv_proj_dim`).

Both are cached by prep (`encode_video` returns them beside `latent_params`; the CLIP model is `model.image_encoder`).
The objective is the text-to-video one: DiffSynth-Studio trains Wan2.1-I2V-14B with the same `FlowMatchSFTLoss`
(`--extra_inputs input_image`, the video's first frame; examples/wanvideo/model_training/full/Wan2.1-I2V-14B-480P.sh),
the loss over every latent frame (the first frame is noised too: only Wan2.2 TI2V keeps it clean). Sampling: the
authors' generate.py for i2v-14B: 40 steps, guidance 5.0, shift 3.0 at 480P and 5.0 otherwise, their negative prompt
with "镜头晃动，" in front (wan/configs/wan_i2v_14B.py). docs/fidelity.md (Wan2.1 image-to-video) has the audit.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from diffusers import WanImageToVideoPipeline, WanTransformer3DModel
from flowspeed.configs.schema import ComponentConfig, ModelConfig
from flowspeed.engines.models.registry import (
    ModelFamily,
    from_pretrained,
    pick_preset,
    register_family,
    seeded_init,
)
from flowspeed.engines.models.wan import NEGATIVE_PROMPT, TEXT_LENGTH, VAE_PRESETS, Wan
from flowspeed.engines.models.wan import TRANSFORMER_PRESETS as T2V_PRESETS
from PIL import Image
from torch import nn
from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel

#: wan/configs/wan_i2v_14B.py: `i2v_14B.sample_neg_prompt = "镜头晃动，" + i2v_14B.sample_neg_prompt`
I2V_NEGATIVE_PROMPT = "镜头晃动，" + NEGATIVE_PROMPT
#: generate.py `_validate_args`: 40 sampling steps for i2v (shift 3.0 for the 480P sizes, else 5.0: the export samples
#: with a release's own scheduler/, diffusers' I2V folders ship 3.0, and presets with Wan's 5.0)
SAMPLE_STEPS = 40
#: the pipeline's frame mask spans one latent frame's pixel frames (`vae_scale_factor_temporal`): 4 channels
MASK_CHANNELS = 4

#: Wan2.1 I2V runs on the Wan2.1 VAE (16 latent channels, `Wan2.1_VAE.pth` in wan_i2v_14B.py); Wan2.2's is TI2V-5B's
WAN21_VAE_PRESETS: dict[str, dict[str, Any]] = {"tiny": VAE_PRESETS["tiny"]}
WAN21_LATENT_CHANNELS = 16
IMAGE_ENCODER_PRESETS: dict[str, dict[str, Any]] = {
    # CLIP's vision tower (pre-LN ViT, GELU, class token) at 32 px with 8 px patches: 16 + 1 tokens of width 32
    "tiny": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=32,
                 patch_size=8, hidden_act="gelu"),
}  # fmt: skip
TRANSFORMER_PRESETS: dict[str, dict[str, Any]] = {
    # Wan2.1's tiny block plus the I2V image path: image_dim = the tiny CLIP's width, image keys/values projected from
    # the model width (added_kv_proj_dim = heads x head dim, as the release's 5120)
    "tiny": dict(T2V_PRESETS["tiny"], image_dim=32, added_kv_proj_dim=32),
}


class _WithImage:
    """The transformer as Wan's flow loss calls it (hidden_states, timestep, encoder_hidden_states), with the cached
    image condition concatenated on channels and the CLIP features passed, as the pipeline's denoising step does."""

    def __init__(self, transformer: nn.Module, condition: torch.Tensor, image_embeds: torch.Tensor) -> None:
        self.transformer = transformer
        self.module = ModelFamily.core_module(transformer)  # what `core_module` finds: the model's config
        self.condition, self.image_embeds = condition, image_embeds

    def __call__(self, hidden_states: torch.Tensor, **kwargs: Any) -> Any:
        cond = self.condition.to(hidden_states.device, hidden_states.dtype)
        return self.transformer(
            hidden_states=torch.cat([hidden_states, cond], dim=1),  # (B, 16 + 4 + 16, T', H', W')
            encoder_hidden_states_image=self.image_embeds.to(hidden_states.device, hidden_states.dtype),
            **kwargs,
        )


class WanI2V(Wan):
    """Wan2.1 image-to-video (the 14B at 480P and 720P): the first frame of each clip conditions it."""

    name = "wan_i2v"
    conditioning = "image"
    pipeline_cls: type = WanImageToVideoPipeline
    negative_prompt = I2V_NEGATIVE_PROMPT

    # ---- loading -------------------------------------------------------------------------------
    def load_vae(self, cfg: ModelConfig) -> nn.Module:
        """Wan's VAE loader, limited to the Wan2.1 VAE the I2V-14B releases use (Wan2.2's 48-channel one is not an
        image-to-video 14B's: `model.family: wan` trains TI2V-5B on it)."""
        if not cfg.vae.pretrained:
            pick_preset(cfg.vae, WAN21_VAE_PRESETS, "vae")  # refuses Wan2.2's preset, naming the ones it takes
        vae = super().load_vae(cfg)
        if vae.config.z_dim != WAN21_LATENT_CHANNELS or getattr(vae.config, "is_residual", False):
            raise ValueError(
                f"model.vae: a {vae.config.z_dim}-channel VAE is not the Wan2.1 VAE the I2V-14B releases use "
                f"({WAN21_LATENT_CHANNELS} channels); use a Wan2.1-I2V-14B-*-Diffusers vae/ or `preset: tiny`"
            )
        return vae

    def load_image_encoder(self, cfg: ModelConfig) -> tuple[Any, nn.Module]:
        """CLIP's image processor and vision tower: a release's `image_processor/` beside its `image_encoder/`
        (diffusers' Wan2.1-I2V folders: laion/CLIP-ViT-H-14-laion2B-s32B-b79K), or the tiny preset."""
        comp = cfg.image_encoder or ComponentConfig()
        if comp.pretrained:
            sub = "image_processor" if comp.subfolder == "image_encoder" else comp.subfolder
            processor = from_pretrained(CLIPImageProcessor, comp.model_copy(update={"subfolder": sub}), "image_encoder")
            encoder = from_pretrained(CLIPVisionModel, comp, "image_encoder")
        else:
            config = CLIPVisionConfig(**pick_preset(comp, IMAGE_ENCODER_PRESETS, "image_encoder"))
            side = config.image_size  # CLIP's own preprocessing (bicubic resize, centre crop, OpenAI mean/std)
            processor = CLIPImageProcessor(size={"shortest_edge": side}, crop_size={"height": side, "width": side})
            with seeded_init(cfg.seed + 4):
                encoder = CLIPVisionModel(config)
        return processor, encoder.eval().requires_grad_(False)

    def load_transformer(self, cfg: ModelConfig, text_embed_dim: int, latent_channels: int) -> nn.Module:
        if cfg.transformer.pretrained:
            model = from_pretrained(WanTransformer3DModel, cfg.transformer, "transformer")
        else:
            preset = pick_preset(cfg.transformer, TRANSFORMER_PRESETS, "transformer")
            with seeded_init(cfg.seed + 3):
                model = WanTransformer3DModel(
                    in_channels=2 * latent_channels + MASK_CHANNELS, out_channels=latent_channels,
                    text_dim=text_embed_dim, **preset,
                )  # fmt: skip
        c = model.config
        if c.image_dim is None or c.in_channels != 2 * c.out_channels + MASK_CHANNELS:
            raise ValueError(
                f"model.transformer: image_dim={c.image_dim}, in_channels={c.in_channels}, out_channels="
                f"{c.out_channels} is not a Wan2.1 image-to-video transformer (it takes CLIP features and the noisy "
                f"latents + {MASK_CHANNELS} mask + image-latent channels: image_dim 1280, 36 in, 16 out); use a "
                "Wan2.1-I2V-14B-*-Diffusers transformer/, or `model.family: wan` for text-to-video"
            )
        return model

    # ---- encoding (prep) ------------------------------------------------------------------------
    def encode_video(
        self, vae: nn.Module, frames: torch.Tensor, image_encoder: tuple[Any, nn.Module] | None = None
    ) -> dict[str, torch.Tensor]:
        """uint8 (B, T, H, W, C) -> {"latent_params": the clip's normalised posterior (B, 32, T', H', W'),
        "image_condition": (B, 20, T', H', W'), "image_embeds": (B, N, D)}, the last two from the first frame by
        `WanImageToVideoPipeline`'s own `prepare_latents` and `encode_image`."""
        if image_encoder is None:
            raise ValueError(
                "wan_i2v caches CLIP features of each clip's first frame: encode_video needs "
                "image_encoder=(processor, encoder), from load_image_encoder(model config)"
            )
        processor, clip = image_encoder
        _, t, h, w, _ = frames.shape
        pipe = WanImageToVideoPipeline(tokenizer=None, text_encoder=None, vae=vae, scheduler=None,
                                       image_processor=processor, image_encoder=clip)  # fmt: skip
        firsts = [Image.fromarray(f.cpu().numpy()) for f in frames[:, 0]]  # what `generate` hands the pipeline
        conditions = []
        for first in firsts:  # prepare_latents takes one image (a batch of them would be repeated per sample)
            pixels = pipe.video_processor.preprocess(first, height=h, width=w).to(vae.device, torch.float32)
            lat = torch.zeros(
                1,
                vae.config.z_dim,
                (t - 1) // self.temporal_compression + 1,
                h // self.spatial_compression,
                w // self.spatial_compression,
            )
            # given latents, prepare_latents draws no noise (it would from the global RNG); only the condition is kept
            _, condition = pipe.prepare_latents(
                pixels, 1, vae.config.z_dim, h, w, t, torch.float32, vae.device, latents=lat
            )
            conditions.append(condition)
        return {
            "latent_params": super().encode_video(vae, frames),
            "image_condition": torch.cat(conditions),  # (B, 4 + 16, T', H', W'): mask, then the image latents
            "image_embeds": pipe.encode_image(firsts, clip.device),  # (B, N, D): CLIP's second-to-last states
        }

    # ---- training -------------------------------------------------------------------------------
    def training_loss(
        self, transformer: nn.Module, scheduler: Any, batch: dict[str, torch.Tensor], generator: torch.Generator
    ) -> torch.Tensor:
        """The text-to-video objective (same draws: timestep index, noise) on a transformer that also takes the
        cached image condition and CLIP features, as DiffSynth-Studio's I2V training (`FlowMatchSFTLoss`)."""
        self.check_batch(self.core_module(transformer), batch)
        conditioned = _WithImage(transformer, batch["image_condition"], batch["image_embeds"])
        return super().training_loss(conditioned, scheduler, batch, generator)  # type: ignore[arg-type]

    def check_batch(self, core: nn.Module, batch: dict[str, torch.Tensor]) -> None:
        """Refuse a cache that is not this model's: a text-to-video cache (no image inputs), features of another
        image encoder width, or a text length diffusers' attention does not split correctly."""
        missing = {"image_condition", "image_embeds"} - set(batch)
        if missing:
            raise ValueError(
                f"the cache has no {sorted(missing)}: it was prepared for another family; prep it again with "
                "model.family: wan_i2v (the first frame's VAE condition and CLIP features are cached then)"
            )
        c, width = core.config, batch["image_embeds"].shape[-1]
        if width != c.image_dim:
            raise ValueError(
                f"the cached image features are {width} wide but the transformer's image_dim is {c.image_dim}: prep "
                "with the image encoder this transformer was trained with (model.image_encoder)"
            )
        if batch["text_embeds"].shape[1] != TEXT_LENGTH:
            raise ValueError(
                f"wan_i2v needs {TEXT_LENGTH} text tokens, not {batch['text_embeds'].shape[1]}: diffusers' Wan "
                f"attention takes the tokens before the last {TEXT_LENGTH} as the image's; set model.max_text_length:"
                f" {TEXT_LENGTH} and prep again"
            )

    # ---- export and inference -------------------------------------------------------------------
    def save_pretrained(self, out_dir: Path, cfg: ModelConfig, transformer: nn.Module) -> Path:
        """A `WanImageToVideoPipeline` folder: the text-to-video parts plus image_processor/ and image_encoder/."""
        tokenizer, encoder = self.load_text_encoder(cfg)
        tokenizer.model_max_length = cfg.max_text_length
        processor, image_encoder = self.load_image_encoder(cfg)
        pipe = WanImageToVideoPipeline(
            tokenizer=tokenizer,
            text_encoder=encoder,
            vae=self.load_vae(cfg),
            scheduler=self.sample_scheduler(cfg),
            image_processor=processor,
            image_encoder=image_encoder,
            transformer=self.core_module(transformer),
        )
        pipe.save_pretrained(out_dir, safe_serialization=True)
        return out_dir

    def pipeline_call(self, pipe: Any, guidance_scale: float) -> dict[str, Any]:
        """Always 512 text tokens, whatever the tokenizer records: diffusers' I2V attention splits the image tokens
        off before the last 512 (see `check_batch`). Sampling goes through text_video.py's `generate` with each
        prompt's first frame (mid-grey when none is given, `check_images`) and the authors' I2V negative prompt."""
        return {**super().pipeline_call(pipe, guidance_scale), "max_sequence_length": TEXT_LENGTH}


register_family(WanI2V())
