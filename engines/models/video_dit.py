"""What the video DiTs flowspeed defines itself (OpenSora 1.0/1.2, OpenSoraPlan 1.2/1.3, Qihoo-T2X) share as families.

Each is a denoiser class from engines/models/dits (a diffusers ModelMixin), a VAE, a T5-family text encoder with
its attention mask, and its authors' objective (engines/models/video_objectives.py). The export is a
`VideoDiTPipeline` folder: diffusers' own `save_pretrained` layout (model_index.json, one subfolder per component),
so eval, the registry and serving find `transformer/diffusion_pytorch_model.safetensors` like any other family and
`VideoDiTPipeline.from_pretrained` imports our classes by module path.

`model.transformer` and `model.vae` take a variant name and, optionally, weights:
- `{preset: tiny}`: random init, seconds on a CPU (the tiny transformer is sized to the cached latents and text,
  also when `pretrained:` gives it weights);
- `{preset: STDiT3-XL/2, pretrained: /models/OpenSora-STDiT-v3}`: the authors' released checkpoint (a file or
  folder in their key layout) loaded into that variant by the model module's `from_published`, with a report
  (engines/models/dits/checkpoint.py: shape mismatches fail, missing/unexpected keys fail);
- `{pretrained: EXPORT_DIR, subfolder: transformer}`: one of our exports (a `config.json` diffusers wrote).

Latents are cached in the denoiser's units: the VAE's own normalisation (OpenSora 1.2's per-channel shift/scale,
OpenSoraPlan's `(z - shift) * scale`) is applied to the posterior at prep time (mean mapped, log-variance shifted
by 2 log|scale|), so a sample drawn from the cache is exactly the normalised sample of the raw posterior.
"""

from __future__ import annotations

import inspect
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from diffusers import DiffusionPipeline
from flowspeed.configs.schema import ComponentConfig, ModelConfig
from flowspeed.engines.models.cogvideox import load_t5
from flowspeed.engines.models.dits.checkpoint import load_published
from flowspeed.engines.models.registry import (
    GeneratingFamily,
    LatentFamily,
    frames_out,
    from_pretrained,
    sample_latents,
    seeded_init,
)
from flowspeed.engines.models.video_objectives import Objective
from torch import nn

#: preset name -> (module class, constructor kwargs)
Specs = dict[str, tuple[type, dict[str, Any]]]
FromPublished = Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]]


class VideoDiTPipeline(DiffusionPipeline):
    """A container for save/load only: sampling is the family's `generate`, which knows its objective."""

    def __init__(self, tokenizer: Any, text_encoder: Any, vae: Any, transformer: Any, scheduler: Any) -> None:
        super().__init__()
        self.register_modules(
            tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, transformer=transformer, scheduler=scheduler
        )


def t5_embeddings(tokenizer: Any, encoder: nn.Module, captions: list[str], max_length: int) -> dict[str, torch.Tensor]:
    """Per-token states padded to `max_length` and their mask, as OpenSora's and OpenSoraPlan's T5 wrappers give
    them: cross-attention ignores the padding through the mask."""
    device = next(encoder.parameters()).device
    tok = tokenizer(captions, padding="max_length", max_length=max_length, truncation=True, return_tensors="pt")
    ids, mask = tok.input_ids.to(device), tok.attention_mask.to(device)
    # on the meta device (engines/models/variants.py measures shapes) T5 cannot read the mask's values
    states = encoder(input_ids=ids, attention_mask=None if ids.is_meta else mask).last_hidden_state
    return {"text_embeds": states, "text_mask": mask.to(states.dtype)}  # (B, L, D), (B, L)


def export_class(comp: ComponentConfig, classes: list[type]) -> type | None:
    """The class whose name diffusers wrote into the folder's config.json (one of our exports), else None (the
    authors' release, or a file)."""
    assert comp.pretrained is not None
    config = Path(comp.pretrained) / (comp.subfolder or "") / "config.json"
    if not config.is_file():
        return None
    try:
        name = json.loads(config.read_text()).get("_class_name")
    except json.JSONDecodeError:
        return None
    return next((c for c in classes if c.__name__ == name), None)


def folder_config(comp: ComponentConfig, cls: type) -> dict[str, Any]:
    """The values of the folder's config.json that `cls` takes as arguments ({} without one)."""
    assert comp.pretrained is not None
    path = Path(comp.pretrained) / (comp.subfolder or "") / "config.json"
    if not path.is_file():
        return {}
    accepted = inspect.signature(cls.__init__).parameters
    return {k: v for k, v in json.loads(path.read_text()).items() if k in accepted and k != "self"}


def build_component(
    cfg: ModelConfig,
    what: str,
    specs: Specs,
    key_maps: dict[type, FromPublished],
    seed_offset: int,
    overrides: dict[str, Any] | None = None,
    published: bool = False,
) -> nn.Module:
    """A component from `model.<what>`: our export, or the named variant (random init, then the authors' weights,
    renamed by its class's entry in `key_maps`, when `pretrained` points at their release). `published`: a named
    variant's folder is always read as the authors' release, whose config.json may name our class (same class
    names) while its weights keep their names; the config values the class takes override the variant's."""
    comp: ComponentConfig = getattr(cfg, what)
    classes = list(dict.fromkeys(cls for cls, _ in specs.values()))
    if published and comp.pretrained and comp.preset in specs:
        overrides = {**folder_config(comp, specs[comp.preset][0]), **(overrides or {})}
    elif comp.pretrained and (cls := export_class(comp, classes)):
        return from_pretrained(cls, comp, what)
    if comp.preset not in specs:
        raise ValueError(
            f"model.{what}.preset {comp.preset!r} is not a variant of this family; known: {', '.join(specs)}. "
            f"To load the authors' released weights, name the variant they were trained as and set "
            f"model.{what}.pretrained to the file or folder."
        )
    cls, kwargs = specs[comp.preset]
    with seeded_init(cfg.seed + seed_offset):
        model = cls(**{**kwargs, **(overrides or {})})
    if comp.pretrained:
        src = Path(comp.pretrained) / (comp.subfolder or "")
        load_published(model, src, key_maps[cls])
    return model


def normalized_posterior(vae: nn.Module, params: torch.Tensor) -> torch.Tensor:
    """Raw posterior mean ++ logvar (B, 2C, ...) -> the posterior of `vae.normalize_latents(z)`, an affine map per
    channel: the mean goes through it, the log-variance moves by 2 log|slope|."""
    mean, logvar = params.float().chunk(2, dim=1)
    probe = mean[:, :, :1, :1, :1]
    zero = vae.normalize_latents(torch.zeros_like(probe))
    slope = vae.normalize_latents(torch.ones_like(probe)) - zero
    out = torch.cat([vae.normalize_latents(mean), logvar + 2 * torch.log(slope.abs())], dim=1)
    return out.to(params.dtype)


class VideoDiTFamily(LatentFamily, GeneratingFamily):
    """Subclasses name the denoiser and VAE variants and their key mappings, the objective and the text length."""

    temporal_compression = 4
    spatial_compression = 8
    size_multiple = 16  # 8x VAE, 2x2 patches
    pipeline_cls = VideoDiTPipeline
    transformer_specs: Specs
    vae_specs: Specs
    #: the authors' key layout -> ours, per module class (engines/models/dits/<model>.from_published)
    key_maps: dict[type, FromPublished]
    objective: Objective
    #: pass (latent frames, H, W) to the objective (OpenSora 1.2's resolution-dependent timestep shift)
    resolution_shift: bool = False
    #: fraction of captions replaced by the model's null caption in training (OpenSora's class_dropout_prob);
    #: only for denoisers that carry one (`y_embedder.y_embedding`)
    caption_dropout: float = 0.0
    #: latent channels classifier-free guidance mixes (None: all); OpenSora 1.0's sampler mixes only the first 3
    guidance_channels: int | None = None

    def frame_count_error(self, num_frames: int) -> str | None:
        t = self.temporal_compression
        if num_frames < 1 or (num_frames - 1) % t:
            k = max(num_frames - 1, 0) // t
            return f"the {self.name} VAE takes {t}k+1 frames (e.g. {t * k + 1} or {t * k + t + 1}), not {num_frames}"
        return None

    # ---- the VAE side ------------------------------------------------------------------------------
    def load_vae(self, cfg: ModelConfig) -> nn.Module:
        vae = build_component(cfg, "vae", self.vae_specs, self.key_maps, seed_offset=1)
        return vae.eval().requires_grad_(False)

    def latent_frames(self, vae: nn.Module | None, num_frames: int) -> int:
        """Latent frames the VAE makes of `num_frames` pixel frames (the loaded VAE's own rule where it has one)."""
        count = self.latent_frame_count(num_frames)
        assert count is not None, self.frame_count_error(num_frames)
        return count

    def vae_encode(self, vae: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, T, H, W) in [-1, 1] -> raw posterior mean ++ logvar (B, 2C, T', H', W')."""
        return vae.encode(x)

    def encode_video(self, vae: nn.Module, frames: torch.Tensor) -> torch.Tensor:
        param = next(vae.parameters())
        x = frames.permute(0, 4, 1, 2, 3).to(param.device, param.dtype) / 127.5 - 1.0  # (B, 3, T, H, W)
        return normalized_posterior(vae, self.vae_encode(vae, x))

    def decode(self, vae: nn.Module, z: torch.Tensor, num_frames: int) -> torch.Tensor:
        """Latents in the denoiser's units (B, C, T', H', W') -> (B, 3, T, H, W) in [-1, 1]."""
        return vae.decode(vae.denormalize_latents(z))

    # ---- text --------------------------------------------------------------------------------------
    def load_text_encoder(self, cfg: ModelConfig) -> tuple[Any, nn.Module]:
        return load_t5(cfg)

    def encode_text(self, tokenizer: Any, encoder: nn.Module, captions: list[str], max_length: int) -> dict:
        return t5_embeddings(tokenizer, encoder, captions, max_length)

    # ---- the denoiser ------------------------------------------------------------------------------
    def tiny_overrides(self, cfg: ModelConfig, text_embed_dim: int, latent_channels: int) -> dict[str, Any]:
        """The tiny preset sized to the cache (published variants keep their own channels)."""
        out = latent_channels * self.load_scheduler(cfg).out_channel_factor
        return {"in_channels": latent_channels, "out_channels": out, "caption_channels": text_embed_dim}

    def load_transformer(self, cfg: ModelConfig, text_embed_dim: int, latent_channels: int) -> nn.Module:
        # the tiny presets are sized to the cache, with or without weights (a tiny run's checkpoint in the authors'
        # layout loads back); released variants keep their own channels and the check below guards them
        tiny = (cfg.transformer.preset or "").startswith("tiny") and text_embed_dim > 0
        overrides = self.tiny_overrides(cfg, text_embed_dim, latent_channels) if tiny else None
        model = build_component(cfg, "transformer", self.transformer_specs, self.key_maps, 3, overrides)
        self.check_transformer(model, cfg, text_embed_dim)
        return model

    def check_transformer(self, model: nn.Module, cfg: ModelConfig, text_embed_dim: int) -> None:
        caption = getattr(model.config, "caption_channels", text_embed_dim)
        if text_embed_dim and caption != text_embed_dim:  # 0: not known (eval reloading an export)
            raise ValueError(
                f"model.transformer takes {caption}-d text states but the cache holds {text_embed_dim}-d ones: the "
                "text encoder is not the one this denoiser was trained with (re-run prep with the right "
                "model.text_encoder)"
            )
        null = self.null_caption(model)
        if null is not None and null.shape[0] != cfg.max_text_length:
            raise ValueError(
                f"model.max_text_length={cfg.max_text_length}, but this {type(model).__name__} was built for "
                f"{null.shape[0]} caption tokens (its null caption); set model.max_text_length: {null.shape[0]}"
            )

    def load_scheduler(self, cfg: ModelConfig) -> Objective:
        """The objective `cfg`'s variant trains with (a family whose variants differ picks per variant)."""
        return self.objective

    def sampling_objective(self, pipe: VideoDiTPipeline) -> Objective:
        """The objective whose sampler runs an export (its own scheduler config comes with the pipeline)."""
        return self.objective

    @staticmethod
    def null_caption(model: nn.Module) -> torch.Tensor | None:
        """OpenSora's learned-free null caption (L, D_text), the unconditional input of training and guidance."""
        y = getattr(LatentFamily.core_module(model), "y_embedder", None)
        return None if y is None else y.y_embedding

    # ---- training ----------------------------------------------------------------------------------
    def predictor(
        self,
        transformer: nn.Module,
        text: torch.Tensor,
        mask: torch.Tensor | None,
        condition: torch.Tensor | None = None,
    ) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
        """predict(x_t, t): the denoiser on x_t (with an image-to-video model's condition channels after it)."""

        def predict(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            inputs = x_t if condition is None else torch.cat([x_t, condition.to(x_t.dtype)], dim=1)
            return transformer(inputs, timestep=t.float(), encoder_hidden_states=text.to(x_t.dtype),
                               encoder_attention_mask=mask, **self.denoiser_inputs(x_t))  # fmt: skip

        return predict

    def denoiser_inputs(self, x_t: torch.Tensor) -> dict[str, Any]:
        """Inputs the denoiser takes besides x_t, t, text and mask (none here; OpenSora 1.2's fps)."""
        return {}

    def split_condition(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Cached latents -> (the latents to denoise, the condition channels); text-to-video has no condition."""
        return z, None

    def training_loss(
        self, transformer: nn.Module, scheduler: Any, batch: dict[str, torch.Tensor], generator: torch.Generator
    ) -> torch.Tensor:
        x0, condition = self.split_condition(sample_latents(batch, generator))  # (B, C, T', H', W')
        text, mask = batch["text_embeds"], batch.get("text_mask")
        null = self.null_caption(transformer) if self.caption_dropout else None
        if null is not None:  # OpenSora swaps the null caption in for some samples; the mask stays the caption's
            drop = (torch.rand(text.shape[0], generator=generator) < self.caption_dropout).to(text.device)
            text = torch.where(drop[:, None, None], null[None].to(text.dtype), text)
        predict = self.predictor(transformer, text, mask, condition)
        return scheduler.loss(predict, x0, generator, shape=self.schedule_shape(x0))

    def schedule_shape(self, x0: torch.Tensor) -> tuple[int, int, int] | None:
        if not self.resolution_shift:
            return None
        s = self.spatial_compression
        return (x0.shape[2], x0.shape[3] * s, x0.shape[4] * s)

    def latent_tokens(self, transformer_config: Any, latent_shape: tuple[int, ...]) -> int:
        _, t, h, w = latent_shape[-4:]
        patch = transformer_config.patch_size
        pt, ph, pw = (1, patch, patch) if isinstance(patch, int) else patch
        return -(-t // pt) * (h // ph) * (w // pw)

    # ---- export and inference ----------------------------------------------------------------------
    def save_pretrained(self, out_dir: Path, cfg: ModelConfig, transformer: nn.Module) -> Path:
        tokenizer, encoder = self.load_text_encoder(cfg)
        tokenizer.model_max_length = cfg.max_text_length  # generate pads prompts to what training saw
        scheduler = self.load_scheduler(cfg).inference_scheduler()
        pipe = VideoDiTPipeline(tokenizer=tokenizer, text_encoder=encoder, vae=self.load_vae(cfg),
                                transformer=transformer, scheduler=scheduler)  # fmt: skip
        pipe.save_pretrained(out_dir, safe_serialization=True)
        return out_dir

    def uncond_text(self, pipe: VideoDiTPipeline, cond: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The unconditional branch of classifier-free guidance: OpenSora's null caption under the prompt's mask
        (their `forward_with_cfg`), else the empty prompt (OpenSoraPlan's and PT-DiT's default negative prompt)."""
        null = self.null_caption(pipe.transformer)
        if null is not None:
            return {"text_embeds": null[None].to(cond["text_embeds"]), "text_mask": cond["text_mask"]}
        n, length = cond["text_mask"].shape
        return t5_embeddings(pipe.tokenizer, pipe.text_encoder, [""] * n, length)

    def condition_for(
        self, pipe: VideoDiTPipeline, image: np.ndarray | None, num_frames: int, height: int, width: int
    ) -> torch.Tensor | None:
        """The denoiser's condition channels for one generation (image-to-video), None for text-to-video."""
        return None

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
        """(N, T, H, W, 3) uint8 videos. `images` (image-to-video families only): one (H, W, 3) uint8 first frame
        per prompt, resized to height x width; without them every video starts from a mid-grey frame."""
        if err := self.frame_count_error(num_frames):
            raise ValueError(f"generate: {err}")
        if height % self.size_multiple or width % self.size_multiple:
            raise ValueError(f"generate: height and width must be multiples of {self.size_multiple}")
        images = self.check_images(images, prompts, height, width)
        pipe = self.sampling_pipe(pretrained_dir, device)
        model, vae = pipe.transformer, pipe.vae
        s = self.spatial_compression
        latent = (self.latent_frames(vae, num_frames), height // s, width // s)
        channels = model.config.in_channels  # the generated latents (an I2V model's condition comes on top)
        shape = (latent[0], height, width) if self.resolution_shift else None
        max_length = int(pipe.tokenizer.model_max_length)
        out = []
        for i, prompt in enumerate(prompts):
            gen = torch.Generator("cpu").manual_seed(seed + i)
            with torch.no_grad():
                cond = t5_embeddings(pipe.tokenizer, pipe.text_encoder, [prompt], max_length)
                uncond = self.uncond_text(pipe, cond)
                condition = self.condition_for(pipe, images[i], num_frames, height, width)
                noise = torch.randn((1, channels, *latent), generator=gen).to(device)
                predict = self.guided(model, cond, uncond, guidance_scale, condition)
                z = self.sampling_objective(pipe).sample(predict, pipe.scheduler, noise, steps, gen, shape)
                video = self.decode(vae, z, num_frames)  # (1, 3, T, H, W)
            out.append(frames_out((video[0].permute(1, 2, 3, 0).float() + 1) / 2)[:num_frames])  # (T, H, W, 3)
        return np.stack(out)

    def guided(
        self, model: nn.Module, cond: dict, uncond: dict, scale: float, condition: torch.Tensor | None
    ) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
        """Classifier-free guidance over one doubled batch; the guided output keeps the conditional variance
        channels (IDDPM's learned variance), as OpenSora's `forward_with_cfg` does."""
        text = torch.cat([cond["text_embeds"], uncond["text_embeds"]])
        mask = torch.cat([cond["text_mask"], uncond["text_mask"]])
        both = self.predictor(model, text, mask, None if condition is None else torch.cat([condition, condition]))

        def predict(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            pc, pu = both(torch.cat([x_t, x_t]), torch.cat([t, t])).chunk(2)
            c = self.guidance_channels or x_t.shape[1]
            return torch.cat([pu[:, :c] + scale * (pc[:, :c] - pu[:, :c]), pc[:, c:]], dim=1)

        return predict
