"""Text encoders, image VAEs and the image-family base shared by SD3, Flux, SDXL, Kolors, Hunyuan-DiT.

Tiny CLIP and T5 encoders use the byte-level tokenizer; pretrained ones load from a diffusers
layout's `text_encoder*/` and `tokenizer*/` subfolders.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from diffusers import AutoencoderKL
from flowspeed.configs.schema import ComponentConfig, ModelConfig
from flowspeed.engines.models.registry import (
    GeneratingFamily,
    LatentFamily,
    frames_out,
    from_pretrained,
    pick_preset,
    seeded_init,
)
from flowspeed.engines.models.tokenizer import byte_level_tokenizer
from torch import nn
from transformers import AutoTokenizer, CLIPTextConfig, T5Config, T5EncoderModel

CLIP_MAX = 77
CLIP_PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, projection_dim=32,
                 max_position_embeddings=CLIP_MAX),
}  # fmt: skip
T5_PRESETS: dict[str, dict[str, Any]] = {"tiny": dict(d_model=64, d_ff=128, d_kv=16, num_layers=2, num_heads=2)}
# 4 blocks -> 8x spatial compression like the published image VAEs (16 latent channels there, 4 here).
IMAGE_VAE_TINY: dict[str, Any] = dict(
    in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1, norm_num_groups=4,
    block_out_channels=(16, 16, 16, 16), down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4, use_quant_conv=False, use_post_quant_conv=False,
)  # fmt: skip


def denoiser_config(cfg: ModelConfig, cls: Any, presets: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The denoiser's config before it is built (the `pretrained:` folder's config.json, else the preset), for the
    families whose released variants train or sample differently (FLUX dev/schnell, Hunyuan-DiT <= 1.1 / 1.2)."""
    comp = cfg.transformer
    if comp.pretrained:
        return dict(cls.load_config(comp.pretrained, **({"subfolder": comp.subfolder} if comp.subfolder else {})))
    return pick_preset(comp, presets, "transformer")


def load_image_vae(cfg: ModelConfig, scaling_factor: float, shift_factor: float) -> nn.Module:
    if cfg.vae.pretrained:
        vae = from_pretrained(AutoencoderKL, cfg.vae, "vae")
    else:
        preset = pick_preset(cfg.vae, {"tiny": IMAGE_VAE_TINY}, "vae")
        with seeded_init(cfg.seed + 1):
            vae = AutoencoderKL(**preset, scaling_factor=scaling_factor, shift_factor=shift_factor)
    return vae.eval().requires_grad_(False)


def load_text_encoders(
    cfg: ModelConfig, parts: list[tuple[str, str, type]], max_lengths: list[int]
) -> tuple[tuple[Any, ...], nn.ModuleList]:
    """((tokenizers...), ModuleList(encoders...)) for `parts` = [(encoder subfolder, tokenizer subfolder, class)].

    Tiny presets build each class from CLIP_PRESETS or T5_PRESETS (by class), seeded per position.
    """
    comp = cfg.text_encoder
    toks: list[Any] = []
    encs: list[nn.Module] = []
    for i, ((enc_sub, tok_sub, cls), max_len) in enumerate(zip(parts, max_lengths, strict=True)):
        if comp.pretrained:
            toks.append(from_pretrained(AutoTokenizer, ComponentConfig(pretrained=comp.pretrained, subfolder=tok_sub),
                                        "text_encoder"))  # fmt: skip
            encs.append(from_pretrained(cls, ComponentConfig(pretrained=comp.pretrained, subfolder=enc_sub),
                                        "text_encoder"))  # fmt: skip
            continue
        tok = byte_level_tokenizer()
        tok.model_max_length = max_len  # pipelines pad CLIP prompts to model_max_length
        ids = dict(vocab_size=len(tok), pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
        if cls is T5EncoderModel:
            config: Any = T5Config(decoder_start_token_id=tok.pad_token_id, **ids,
                                   **pick_preset(comp, T5_PRESETS, "text_encoder"))  # fmt: skip
        else:
            config = CLIPTextConfig(bos_token_id=tok.pad_token_id, **ids,
                                    **pick_preset(comp, CLIP_PRESETS, "text_encoder"))  # fmt: skip
        with seeded_init(cfg.seed + 2 + i):
            encs.append(cls(config))
        toks.append(tok)
    return tuple(toks), nn.ModuleList(encs).eval().requires_grad_(False)


class ImageFamily(LatentFamily, GeneratingFamily):
    """What SD3, Flux, SDXL, Kolors and Hunyuan-DiT share: one frame per sample, an 8x AutoencoderKL, a text-only
    pipeline for prompt encoding, and export/generation through the family's diffusers pipeline."""

    temporal_compression = 1
    spatial_compression = 8
    size_multiple = 16
    pipeline_cls: type
    #: the tokenizer whose length `generate` pads prompts to (`max_sequence_length`), None: the pipeline's default
    max_sequence_tokenizer: str | None = None
    #: constructor arguments the pipeline takes besides its text, denoiser, VAE and scheduler components
    pipeline_extras: dict[str, Any] = {}

    def frame_count_error(self, num_frames: int) -> str | None:
        if num_frames == 1:
            return None
        return f"{self.name} is an image model: set data.num_frames: 1 (got {num_frames})"

    def encode_video(self, vae: nn.Module, frames: torch.Tensor) -> torch.Tensor:
        x = frames[:, 0].permute(0, 3, 1, 2).to(vae.device, vae.dtype) / 127.5 - 1.0  # (B, C, H, W) in [-1, 1]
        return vae.encode(x).latent_dist.parameters  # (B, 2*Cz, H', W')

    def latent_tokens(self, transformer_config: Any, latent_shape: tuple[int, ...]) -> int:
        _, h, w = latent_shape[-3:]
        p = getattr(transformer_config, "patch_size", None) or 1
        return (h // p) * (w // p)

    #: [(encoder component, tokenizer component, encoder class)] in the pipeline's order
    text_parts: list[tuple[str, str, type]]

    def text_max_lengths(self, cfg: ModelConfig) -> list[int]:
        """Padded length per text encoder: CLIP's 77, T5's configured length."""
        return [cfg.max_text_length if cls is T5EncoderModel else CLIP_MAX for _, _, cls in self.text_parts]

    def load_text_encoder(self, cfg: ModelConfig) -> tuple[Any, nn.Module]:
        return load_text_encoders(cfg, self.text_parts, self.text_max_lengths(cfg))

    def _text_pipe(self, tokenizers: Any, encoders: nn.Module) -> Any:
        """The family's pipeline holding only its text side: `encode_prompt` is then the pipeline's own."""
        text = {}
        for (enc_name, tok_name, _), tok, enc in zip(self.text_parts, tokenizers, encoders, strict=True):
            text[enc_name], text[tok_name] = enc, tok
        return self.pipeline_cls(
            **text, **{self.denoiser_subfolder: None, "vae": None, "scheduler": None}, **self.pipeline_extras
        )

    def export_scheduler(self, cfg: ModelConfig) -> Any:
        return self.load_scheduler(cfg)

    def save_pretrained(self, out_dir: Path, cfg: ModelConfig, transformer: nn.Module) -> Path:
        pipe = self._text_pipe(*self.load_text_encoder(cfg))
        pipe.register_modules(**{self.denoiser_subfolder: transformer}, vae=self.load_vae(cfg),
                              scheduler=self.export_scheduler(cfg))  # fmt: skip
        pipe.save_pretrained(out_dir, safe_serialization=True)
        return out_dir

    def generate(
        self, pretrained_dir: Path, prompts: list[str], *, num_frames: int, height: int, width: int,
        steps: int, guidance_scale: float, seed: int, device: torch.device, images: list[np.ndarray] | None = None,
    ) -> np.ndarray:  # fmt: skip
        self.check_images(images, prompts, height, width)  # text-to-image: refuses images
        pipe = self.sampling_pipe(pretrained_dir, device)
        pipe.set_progress_bar_config(disable=True)
        extra = self.call_extras(pipe, height, width)
        out = []
        for i, prompt in enumerate(prompts):
            gen = torch.Generator("cpu").manual_seed(seed + i)
            image = pipe(prompt=prompt, height=height, width=width, num_inference_steps=steps,
                         guidance_scale=guidance_scale, generator=gen, output_type="np", **extra).images[0]  # fmt: skip
            out.append(frames_out(image)[None])  # (1, H, W, C)
        return np.stack(out)

    def call_extras(self, pipe: Any, height: int, width: int) -> dict[str, Any]:
        """Pipeline-call arguments besides the prompt and the sampling settings: the prompt length training used."""
        if not self.max_sequence_tokenizer:
            return {}
        return {"max_sequence_length": getattr(pipe, self.max_sequence_tokenizer).model_max_length}
