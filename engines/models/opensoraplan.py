"""OpenSoraPlan text-to-video (v1.3 `OpenSoraT2V_v1_3` with Skiparse, v1.2 `OpenSoraT2V`) and image-to-video
(v1.3 `OpenSoraInpaint_v1_3`) families (PKU-YuanGroup/Open-Sora-Plan v1.2.0 / v1.3.0).

Each variant trains and samples with the objective its weights were released with, chosen by its denoiser class
(`OBJECTIVES`; engines/models/video_objectives.py): v1.2 `OpenSoraT2V` (`OpenSoraT2V-ROPE-L/122`, `tiny-v1.2`) uses
eps prediction on the default DDPM betas, min-SNR 5, noise offset 0.02 and a default Euler-ancestral sampler
(v1.2.0 train_t2v.sh / sample_t2v.sh); v1.3 `OpenSoraT2V_v1_3` / `OpenSoraInpaint_v1_3` (`OpenSoraT2V_v1_3-2B/122`,
`OpenSoraInpaint_v1_3-2B/122`, `tiny`, `tiny-i2v`) use v prediction on zero-terminal-SNR betas, min-SNR 5 and Euler
ancestral on trailing timesteps (v1.3.0 train_t2v_v1_3.sh / sample_t2v_v1_3.sh). `family.objective_for(cfg)` says
which (its `describe()`), the trainer's `load_scheduler` logs it, and an export's scheduler/scheduler_config.json
records the sampler's prediction type. Captions are mT5-XXL states (512 tokens) with their mask.
VAEs: WF-VAE (v1.3, 8 channels) or CausalVAE (v1.2, 4 channels), both 4x8x8 and causal, so clips are 4k+1 frames.
The variant decides the version: `model.transformer.preset: OpenSoraT2V_v1_3-2B/122` + `model.vae.preset:
wfvae-v1.3` (the released v1.3 pair), or `OpenSoraT2V-ROPE-L/122` + `causalvae-v1.2-488`; `tiny` (v1.3 layout,
Skiparse on) and `tiny-v1.2` are the random-init presets, `tiny` / `tiny-causalvae` their VAEs.

Image-to-video (`opensoraplan_i2v`): the denoiser takes [noisy latents | masked-video latents | latent mask]. The
masked video is the clip with every frame but the first set to black (-1), encoded by the same VAE; prep caches its
posterior after the clip's, as extra latent frames (`latent_params` (2C, 2T', h, w)), so training draws both from
their posteriors and builds the mask (frame 0 given, the rest generated) as the authors' `MaskCompressor` does.

Not reproduced (docs/fidelity.md (opensoraplan) lists each with its source): the authors' text dropout (they
re-encode an empty caption for 10% of samples, and the I2V trainer half of those a default caption, which a cached
text embedding cannot), their caption cleaning (`clean_caption`: lowercasing, URL/HTML stripping) and sampling
prompt template / negative prompt, their mixed image/video joint batches, the per-rank stratified timesteps of
v1.3.1 (`explicit_uniform_sampling`: the same uniform marginal), the I2V trainer's other mask types (transition,
continuation, random frames, clear, t2v): only the first-frame condition is trained.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import torch
from flowspeed.configs.schema import ModelConfig
from flowspeed.engines.models.dits import causalvae, opensoraplan, wfvae
from flowspeed.engines.models.dits.causalvae import CausalVAEModel
from flowspeed.engines.models.dits.opensoraplan import (
    MODEL_CLASSES,
    OpenSoraInpaint_v1_3,
    OpenSoraT2V,
    OpenSoraT2V_v1_3,
    compress_mask,
)
from flowspeed.engines.models.dits.wfvae import WFVAEModel
from flowspeed.engines.models.registry import register_family
from flowspeed.engines.models.video_dit import (
    Specs,
    VideoDiTFamily,
    VideoDiTPipeline,
    build_component,
    export_class,
    normalized_posterior,
)
from flowspeed.engines.models.video_objectives import EpsilonPrediction, Objective, VPrediction
from PIL import Image
from torch import nn

log = logging.getLogger(__name__)

OSP_VAES: Specs = {
    "tiny": (WFVAEModel, wfvae.PRESETS["tiny"]),
    "tiny-causalvae": (CausalVAEModel, causalvae.PRESETS["tiny"]),
    "wfvae-v1.3": (WFVAEModel, wfvae.PRESETS["wfvae-v1.3"]),
    "causalvae-v1.2-488": (CausalVAEModel, causalvae.PRESETS["causalvae-v1.2-488"]),
}
OSP_KEY_MAPS = {
    **{cls: opensoraplan.from_published for cls in MODEL_CLASSES.values()},
    WFVAEModel: wfvae.from_published,
    CausalVAEModel: causalvae.from_published,
}
#: denoiser class -> the objective (and sampler) its released weights were trained with
OBJECTIVES: dict[type, Objective] = {
    OpenSoraT2V: EpsilonPrediction(),  # v1.2.0: train_t2v.sh --snr_gamma 5.0 --noise_offset 0.02, parser eps default
    OpenSoraT2V_v1_3: VPrediction(),  # v1.3.0: --prediction_type v_prediction --rescale_betas_zero_snr --snr_gamma 5
    OpenSoraInpaint_v1_3: VPrediction(),  # initialised from the v1.3 T2V; sampled with zero-SNR v (see docs)
}
_ATTN = "attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0", "attn2.to_q", "attn2.to_k", "attn2.to_v"


class OpenSoraPlan(VideoDiTFamily):
    name = "opensoraplan"
    transformer_specs = {n: (MODEL_CLASSES[n], kw) for n, kw in opensoraplan.PRESETS.items() if "i2v" not in n.lower()}
    vae_specs = OSP_VAES
    key_maps = OSP_KEY_MAPS
    lora_targets = (*_ATTN, "attn2.to_out.0")

    def load_vae(self, cfg: ModelConfig) -> nn.Module:
        """A named VAE with `pretrained` is the authors' folder (config.json naming WFVAEModel / CausalVAEModel, as
        ours do, beside a .ckpt or weights under their names): read through `from_published`, its config.json's
        values (scale and shift included) over the preset's."""
        vae = build_component(cfg, "vae", self.vae_specs, self.key_maps, seed_offset=1, published=True)
        return vae.eval().requires_grad_(False)

    def transformer_class(self, cfg: ModelConfig) -> type:
        """The denoiser class `model.transformer` builds: our export's recorded class, else the named variant's."""
        comp = cfg.transformer
        classes = list(dict.fromkeys(cls for cls, _ in self.transformer_specs.values()))
        if comp.pretrained and (cls := export_class(comp, classes)):
            return cls
        if comp.preset not in self.transformer_specs:
            raise ValueError(f"model.transformer.preset {comp.preset!r} is not a variant of this family; known: "
                             f"{', '.join(self.transformer_specs)}")  # fmt: skip
        return self.transformer_specs[comp.preset][0]

    def objective_for(self, cfg: ModelConfig) -> Objective:
        """The objective of the variant `cfg` names: v1.2 layouts eps, v1.3 layouts v (see the module docstring)."""
        return OBJECTIVES[self.transformer_class(cfg)]

    def load_scheduler(self, cfg: ModelConfig) -> Objective:
        objective = self.objective_for(cfg)
        log.info("%s %s trains with %s", self.name, cfg.transformer.preset or cfg.transformer.pretrained,
                 objective.describe())  # fmt: skip
        return objective

    def sampling_objective(self, pipe: VideoDiTPipeline) -> Objective:
        return OBJECTIVES[type(pipe.transformer)]


class OpenSoraPlanI2V(OpenSoraPlan):
    name = "opensoraplan_i2v"
    conditioning = "image"
    transformer_specs = {
        "tiny": (OpenSoraInpaint_v1_3, opensoraplan.PRESETS["tiny-i2v"]),
        "OpenSoraInpaint_v1_3-2B/122": (OpenSoraInpaint_v1_3, opensoraplan.PRESETS["OpenSoraInpaint_v1_3-2B/122"]),
    }

    def load_transformer(self, cfg: ModelConfig, text_embed_dim: int, latent_channels: int) -> nn.Module:
        model = super().load_transformer(cfg, text_embed_dim, latent_channels)
        if not isinstance(model, OpenSoraInpaint_v1_3):
            raise ValueError(
                f"model.transformer is a {type(model).__name__}, not an image-to-video OpenSoraInpaint_v1_3; use "
                "preset tiny-i2v / OpenSoraInpaint_v1_3-2B/122, or `model.family: opensoraplan` for text-to-video"
            )
        return model

    # ---- the condition -----------------------------------------------------------------------------
    @staticmethod
    def first_frame_mask(b: int, latent_frames: int, h: int, w: int, temporal: int, device: torch.device):
        """The latent mask (B, temporal, T', h, w) of "frame 0 given, the rest generated": the authors' pixel mask
        compressed by their `MaskCompressor`; built at latent resolution (a frame's mask is constant in space, so
        resizing it to h x w changes nothing)."""
        pixel_frames = temporal * (latent_frames - 1) + 1
        mask = torch.ones(b, 1, pixel_frames, h, w, device=device)
        mask[:, :, 0] = 0
        return compress_mask(mask, (temporal, 1, 1))

    def encode_video(self, vae: nn.Module, frames: torch.Tensor) -> torch.Tensor:
        """(B, T, H, W, 3) -> (B, 2C, 2T', h, w): the clip's posterior, then the masked video's (frame 0 only)."""
        clip = super().encode_video(vae, frames)
        param = next(vae.parameters())
        masked = frames.permute(0, 4, 1, 2, 3).to(param.device, param.dtype) / 127.5 - 1.0
        masked[:, :, 1:] = -1.0  # the authors black out the frames to generate
        return torch.cat([clip, normalized_posterior(vae, vae.encode(masked))], dim=2)

    def split_condition(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        t = z.shape[2] // 2
        video, masked = z[:, :, :t], z[:, :, t:]
        mask = self.first_frame_mask(z.shape[0], t, z.shape[3], z.shape[4], self.temporal_compression, z.device)
        return video, torch.cat([masked, mask.to(z.dtype)], dim=1)

    def latent_tokens(self, transformer_config: Any, latent_shape: tuple[int, ...]) -> int:
        c, t, h, w = latent_shape[-4:]  # the second half of the frames is the condition
        return super().latent_tokens(transformer_config, (c, t // 2, h, w))

    def condition_for(
        self, pipe: VideoDiTPipeline, image: np.ndarray | None, num_frames: int, height: int, width: int
    ) -> torch.Tensor:
        """The image as frame 0 of a black clip, encoded (posterior mean, normalised) + the first-frame mask."""
        vae = pipe.vae
        param = next(vae.parameters())
        first = np.array(Image.fromarray(image).convert("RGB").resize((width, height), Image.BICUBIC))
        video = torch.full((1, 3, num_frames, height, width), -1.0, device=param.device, dtype=param.dtype)
        video[0, :, 0] = torch.from_numpy(first).to(video).permute(2, 0, 1) / 127.5 - 1.0
        latents = normalized_posterior(vae, vae.encode(video))
        masked = latents[:, : latents.shape[1] // 2]
        t, h, w = masked.shape[2:]
        mask = self.first_frame_mask(1, t, h, w, self.temporal_compression, masked.device).to(masked)
        return torch.cat([masked, mask], dim=1)


register_family(OpenSoraPlan())
register_family(OpenSoraPlanI2V())
