"""Wan image-to-video: Wan2.1 I2V-14B (480P and 720P) and the Wan2.2 I2V-A14B expert pair. diffusers'
`WanImageToVideoPipeline`, its `WanTransformer3DModel` (Wan2.1: with an image embedding), `AutoencoderKLWan` (Wan2.1's
VAE for both), UMT5 and, for Wan2.1 only, the CLIP ViT-H/14 vision tower (`CLIPVisionModel`).

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
with "镜头晃动，" in front (wan/configs/wan_i2v_14B.py).

**Wan2.2 I2V-A14B** (Wan-Video/Wan2.2 wan/configs/wan_i2v_A14B.py, wan/image2video.py) has no image encoder: its
transformer has no image embedding (diffusers' convert_wan_to_diffusers.py "Wan2.2-I2V-14B-720p": `image_dim` unset,
`added_kv_proj_dim` None; in_channels 36), so only the image condition above conditions it (`model.image_encoder:
null`; prep caches the condition alone; the tiny layout is the transformer preset `tiny-2.2`). Two experts split at
boundary 0.900 as the T2V pair (`model.experts`, engines/models/wan.py: each trains on its own timesteps,
DiffSynth-Studio's `--max/min_timestep_boundary 0.358`, or both in one run, `train: both`); the export is a
`WanImageToVideoPipeline` with `transformer` (high noise), `transformer_2`, `boundary_ratio` and no image encoder, the
layout diffusers' conversion writes; sampled with the authors' shift 5.0, 40 steps, guidance (3.5, 3.5) and the shared
negative prompt (wan_i2v_A14B.py adds no "镜头晃动，").

docs/fidelity.md (Wan2.1 image-to-video and Wan2.2 I2V-A14B) has the audit.
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers import WanImageToVideoPipeline, WanTransformer3DModel
from flowspeed.configs.schema import ModelConfig
from flowspeed.engines.models.registry import (
    ModelFamily,
    from_pretrained,
    pick_preset,
    register_family,
    seeded_init,
)
from flowspeed.engines.models.wan import HIGH_NOISE, NEGATIVE_PROMPT, TEXT_LENGTH, VAE_PRESETS, Wan
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
#: Wan-Video/Wan2.2@42bf4cf wan/configs/wan_i2v_A14B.py: `boundary = 0.900`, `sample_shift = 5.0`, `sample_steps =
#: 40`, `sample_guide_scale = (3.5, 3.5)` (low noise, high noise); no `sample_neg_prompt` of its own (shared_config's)
I2V_A14B_BOUNDARY = 0.9
I2V_A14B_SAMPLE_SHIFT = 5.0
I2V_A14B_SAMPLE_STEPS = 40
I2V_A14B_GUIDANCE_LOW, I2V_A14B_GUIDANCE_HIGH = 3.5, 3.5

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
    # Wan2.2 I2V-A14B's layout (each expert): the same block without the image embedding (image_dim and
    # added_kv_proj_dim unset, convert_wan_to_diffusers.py "Wan2.2-I2V-14B-720p"), still 36 input channels
    "tiny-2.2": dict(T2V_PRESETS["tiny"]),
}


class _WithImage:
    """The transformer as Wan's flow loss calls it (hidden_states, timestep, encoder_hidden_states), with the cached
    image condition concatenated on channels and the CLIP features passed (Wan2.1; None for Wan2.2 I2V-A14B), as the
    pipeline's denoising step does."""

    def __init__(self, transformer: nn.Module, condition: torch.Tensor, image_embeds: torch.Tensor | None) -> None:
        self.transformer = transformer
        self.module = ModelFamily.core_module(transformer)  # what `core_module` finds: the model's config
        self.condition, self.image_embeds = condition, image_embeds

    def __call__(self, hidden_states: torch.Tensor, **kwargs: Any) -> Any:
        cond = self.condition.to(hidden_states.device, hidden_states.dtype)
        image = None if self.image_embeds is None else self.image_embeds.to(hidden_states.device, hidden_states.dtype)
        return self.transformer(
            hidden_states=torch.cat([hidden_states, cond], dim=1),  # (B, 16 + 4 + 16, T', H', W')
            encoder_hidden_states_image=image,
            **kwargs,
        )


class WanI2V(Wan):
    """Wan image-to-video (Wan2.1's 14B at 480P and 720P; Wan2.2's A14B pair): the first frame of each clip
    conditions it."""

    name = "wan_i2v"
    conditioning = "image"
    pipeline_cls: type = WanImageToVideoPipeline
    negative_prompt = I2V_NEGATIVE_PROMPT  # Wan2.1's; an export without image encoder (Wan2.2) samples with Wan's
    a14b_sample_shift = I2V_A14B_SAMPLE_SHIFT
    a14b_guidance = (I2V_A14B_GUIDANCE_LOW, I2V_A14B_GUIDANCE_HIGH)

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

    def load_image_encoder(self, cfg: ModelConfig) -> tuple[Any, nn.Module] | None:
        """CLIP's image processor and vision tower: a release's `image_processor/` beside its `image_encoder/`
        (diffusers' Wan2.1-I2V folders: laion/CLIP-ViT-H-14-laion2B-s32B-b79K), or the tiny preset; None for
        `model.image_encoder: null` (Wan2.2 I2V-A14B). Refuses an encoder the transformer cannot take, and none for one
        that needs it, before prep spends time on either."""
        comp = cfg.image_encoder
        if (transformer_config := _transformer_config(cfg)) is not None:  # unreadable: training's check_batch tells
            self.check_image_path(cfg, transformer_config)
        if comp is None:
            return None
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
        """The trained denoiser (with `model.experts`, Wan2.2 I2V-A14B, the expert `experts.train` names: wan.py's
        slot logic), checked to be an image-to-video layout that matches `model.image_encoder`."""
        model = super().load_transformer(cfg, text_embed_dim, latent_channels)
        self.check_image_path(cfg, self.core_module(model).config)
        return model

    def _denoiser(self, cfg: ModelConfig, comp: Any, expert: str, text_embed_dim: int, channels: int) -> nn.Module:
        """One image-to-video transformer (Wan's `load_transformer` and `load_other_expert` build through this):
        `channels` latent channels out, 2 x channels + the 4 mask channels in."""
        if comp.pretrained:
            model = from_pretrained(WanTransformer3DModel, comp, "transformer")
        else:
            preset = pick_preset(comp, TRANSFORMER_PRESETS, "transformer")
            with seeded_init(cfg.seed + (3 if expert == HIGH_NOISE else 4)):  # a random pair: two different experts
                model = WanTransformer3DModel(
                    in_channels=2 * channels + MASK_CHANNELS, out_channels=channels, text_dim=text_embed_dim, **preset
                )
        c = model.config
        if c.in_channels != 2 * c.out_channels + MASK_CHANNELS:
            raise ValueError(
                f"model.transformer: in_channels={c.in_channels}, out_channels={c.out_channels} is not a Wan "
                f"image-to-video transformer (it takes the noisy latents + {MASK_CHANNELS} mask + image-latent "
                "channels: 36 in, 16 out); use a Wan2.1-I2V-14B-*-Diffusers or Wan2.2-I2V-A14B-Diffusers transformer/"
                ", or `model.family: wan` for text-to-video"
            )
        return model

    def check_image_path(self, cfg: ModelConfig, transformer_config: Any) -> None:
        """`model.image_encoder` and the transformer agree: CLIP features exactly when it has an image embedding
        (Wan2.1 I2V: `image_dim`), none when it has not (Wan2.2 I2V-A14B)."""
        image_dim = _get(transformer_config, "image_dim")
        if image_dim is None and cfg.image_encoder is not None:
            raise ValueError(
                "model.image_encoder: this transformer has no image embedding (image_dim unset: Wan2.2 I2V-A14B, "
                "conditioned on the first frame's latents alone), so it takes no image features; set "
                "model.image_encoder: null"
            )
        if image_dim is not None and cfg.image_encoder is None:
            raise ValueError(
                f"model.image_encoder is null, but this transformer takes image features (image_dim={image_dim}: "
                "Wan2.1 I2V-14B's CLIP ViT-H/14); name its image encoder (a release's image_encoder/, or preset: tiny)"
            )

    # ---- encoding (prep) ------------------------------------------------------------------------
    def encode_video(
        self, vae: nn.Module, frames: torch.Tensor, image_encoder: tuple[Any, nn.Module] | None = None
    ) -> dict[str, torch.Tensor]:
        """uint8 (B, T, H, W, C) -> {"latent_params": the clip's normalised posterior (B, 32, T', H', W'),
        "image_condition": (B, 20, T', H', W'), "image_embeds": (B, N, D)}, the last two from the first frame by
        `WanImageToVideoPipeline`'s own `prepare_latents` and `encode_image`. Without `image_encoder` (what
        `load_image_encoder` gives for `model.image_encoder: null`, Wan2.2 I2V-A14B) no "image_embeds"."""
        processor, clip = image_encoder if image_encoder is not None else (None, None)
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
        out = {
            "latent_params": super().encode_video(vae, frames),
            "image_condition": torch.cat(conditions),  # (B, 4 + 16, T', H', W'): mask, then the image latents
        }
        if clip is not None:
            out["image_embeds"] = pipe.encode_image(firsts, clip.device)  # (B, N, D): CLIP's second-to-last states
        return out

    # ---- training -------------------------------------------------------------------------------
    def training_loss(
        self, transformer: nn.Module, scheduler: Any, batch: dict[str, torch.Tensor], generator: torch.Generator
    ) -> torch.Tensor:
        """The text-to-video objective (same draws: timestep index, noise) on a transformer that also takes the
        cached image condition and CLIP features, as DiffSynth-Studio's I2V training (`FlowMatchSFTLoss`)."""
        self.check_batch(self.core_module(transformer), batch)
        conditioned = _WithImage(transformer, batch["image_condition"], batch.get("image_embeds"))
        return super().training_loss(conditioned, scheduler, batch, generator)  # type: ignore[arg-type]

    def check_batch(self, core: nn.Module, batch: dict[str, torch.Tensor]) -> None:
        """Refuse a cache that is not this model's: a text-to-video cache (no image inputs), image features for a
        transformer without an image embedding or none for one with it, features of another image encoder width,
        or a text length diffusers' attention does not split correctly."""
        c = core.config
        if "image_condition" not in batch:
            raise ValueError(
                "the cache has no ['image_condition']: it was prepared for another family; prep it again with "
                "model.family: wan_i2v (the first frame's VAE condition, and CLIP features where the transformer "
                "takes them, are cached then)"
            )
        if c.image_dim is None:
            if "image_embeds" in batch:
                raise ValueError(
                    "the cache holds image features, but this transformer has no image embedding (Wan2.2 I2V-A14B); "
                    "prep again with model.image_encoder: null"
                )
            return  # no image tokens: diffusers' attention splits nothing off the text
        if "image_embeds" not in batch:
            raise ValueError(
                f"the cache has no image features, but this transformer takes them (image_dim={c.image_dim}, Wan2.1 "
                "I2V-14B); prep again with its image encoder (model.image_encoder)"
            )
        width = batch["image_embeds"].shape[-1]
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
    def pipeline_components(self, cfg: ModelConfig) -> dict[str, Any]:
        """The export is a `WanImageToVideoPipeline` folder: Wan2.1's also holds image_processor/ and image_encoder/;
        Wan2.2 I2V-A14B's none (as diffusers' conversion writes Wan-AI/Wan2.2-I2V-A14B-Diffusers)."""
        processor, image_encoder = self.load_image_encoder(cfg) or (None, None)
        return {"image_processor": processor, "image_encoder": image_encoder}

    def pipeline_denoisers(self, cfg: ModelConfig, transformer: nn.Module) -> dict[str, Any]:
        """Wan's (the trained model; with `model.experts` both experts and the boundary), refused where the two
        experts' image embeddings differ."""
        denoisers = super().pipeline_denoisers(cfg, transformer)
        dims = {n: m.config.image_dim for n, m in denoisers.items() if n.startswith("transformer")}
        if len(set(dims.values())) > 1:
            raise ValueError(
                f"model.experts.other: the two experts' image embeddings differ ({dims}); both are one release's "
                "(a Wan2.2-I2V-A14B-Diffusers transformer/ and transformer_2/)"
            )
        return denoisers

    def pipeline_call(self, pipe: Any, guidance_scale: float) -> dict[str, Any]:
        """With image features (Wan2.1), always 512 text tokens, whatever the tokenizer records: diffusers' I2V
        attention splits the image tokens off before the last 512 (see `check_batch`), and the authors' I2V negative
        prompt; without (Wan2.2 I2V-A14B) the recorded length and Wan's shared negative prompt (wan_i2v_A14B.py). A
        two-expert export also gets the low-noise expert's guidance (wan.py: this release's (3.5, 3.5)). Sampling goes
        through text_video.py's `generate` with each prompt's first frame (mid-grey when none is given)."""
        call = super().pipeline_call(pipe, guidance_scale)
        if pipe.transformer.config.image_dim is None:
            return {**call, "negative_prompt": NEGATIVE_PROMPT}
        return {**call, "max_sequence_length": TEXT_LENGTH}


def _get(config: Any, key: str) -> Any:
    """`key` of a model config, a FrozenDict or a plain dict (a preset's)."""
    return config.get(key) if isinstance(config, dict) else getattr(config, key, None)


def _transformer_config(cfg: ModelConfig) -> dict[str, Any] | None:
    """The trained transformer's config without building it: its preset's, or the pretrained folder's config.json
    (a release's experts share one layout, so either slot tells); None where prep cannot read it (weights not on
    this machine), which prep does not need."""
    comp = cfg.transformer
    if not comp.pretrained:
        return pick_preset(comp, TRANSFORMER_PRESETS, "transformer")
    try:
        return dict(WanTransformer3DModel.load_config(comp.pretrained, **({"subfolder": comp.subfolder} if
                                                                          comp.subfolder else {})))  # fmt: skip
    except (OSError, ValueError):
        return None


register_family(WanI2V())
