"""HunyuanVideo (13B) text-to-video: diffusers' `HunyuanVideoTransformer3DModel`, `AutoencoderKLHunyuanVideo`,
`HunyuanVideoPipeline`; two text encoders (LLaVA-Llama-3 decoder states + CLIP-L pooled output).

Every piece is the library's own class; the facts carry their sources:

- **Latents**: the causal 3-D VAE compresses 8x in space and 4x in time (16 channels), so clips take 4k+1 frames, and
  with the transformer's 2x2 patches sides are multiples of 16. The cache holds the raw posterior (mean ++ logvar);
  training draws x0 from it and multiplies by the VAE's `scaling_factor` (0.476986, the released vae/config.json;
  `HunyuanVideoPipeline` divides by it before decoding), as finetrainers' HunyuanVideo spec does.
- **Text**, through `HunyuanVideoPipeline.encode_prompt` so train == inference: the Llama decoder's hidden states
  three from the top (`hidden_states[-(2 + 1)]`, the authors' `hidden_state_skip_layer = 2`) of the caption wrapped
  in the authors' video prompt template, the template's tokens cropped off (`crop_start` 95 for their Llama-3
  tokenizer, Tencent/HunyuanVideo hyvideo/constants.py `PROMPT_TEMPLATE["dit-llm-encode-video"]`), 256 tokens
  (`--text-len`), with their attention mask (cached as `text_mask`, fed to the transformer as
  `encoder_attention_mask`, which masks the padding in the refiner and in every joint attention); and CLIP-L's
  pooled output at 77 tokens (cached as `pooled_embeds`).
- **Objective**: the authors publish no training code (Tencent/HunyuanVideo is inference only); the published
  trainer is finetrainers' HunyuanVideo spec (a-r-r-o-w/finetrainers@f476c37 `finetrainers/models/hunyuan_video/
  base_specification.py`, its SFT trainer and `utils/diffusion.py`, and the HunyuanVideo example
  `examples/training/sft/hunyuan_video/modal_labs_dissolve/train.sh`): u = sigmoid(N(0, 1)) (`--flow_weighting_scheme
  logit_normal`), sigma = the unshifted 1000-point grid of `FlowMatchEulerDiscreteScheduler()` at index
  floor(1000 u), x_t = (1 - sigma) x0 + sigma eps, timestep floor(1000 sigma), target eps - x0, weight 1, MSE; the
  guidance embedding is fed 1.0 x 1000 (the spec's `forward(guidance=1.0)` default, the trainer passes none).
- **Sampling**: the authors' sample_video.py defaults: Euler flow matching with shift 7.0 (`--flow-shift`, also
  diffusers' conversion script), 50 steps, embedded guidance 6.0 (`--embedded-cfg-scale`), true CFG off
  (`--cfg-scale 1.0`), 129 frames at 720x1280. A pretrained release folder keeps its own scheduler.

docs/fidelity.md (HunyuanVideo) lists each choice and what is not reproduced.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from diffusers import (
    AutoencoderKLHunyuanVideo,
    FlowMatchEulerDiscreteScheduler,
    HunyuanVideoPipeline,
    HunyuanVideoTransformer3DModel,
)
from diffusers.pipelines.hunyuan_video.pipeline_hunyuan_video import DEFAULT_PROMPT_TEMPLATE
from diffusers.training_utils import compute_density_for_timestep_sampling
from flowspeed.configs.schema import ModelConfig
from flowspeed.engines.models.cogvideox import encode_pixels, to_pixels
from flowspeed.engines.models.encoders import CLIP_MAX, CLIP_PRESETS, load_text_encoders
from flowspeed.engines.models.registry import (
    LatentFamily,
    from_pretrained,
    latents_and_noise,
    pick_preset,
    register_family,
    seeded_init,
)
from flowspeed.engines.models.text_video import TextToVideoPipelineFamily
from flowspeed.engines.models.tokenizer import byte_level_tokenizer
from torch import nn
from transformers import CLIPTextConfig, CLIPTextModel, LlamaConfig, LlamaModel

#: Tencent/HunyuanVideo hyvideo/config.py `--text-len 256` (diffusers' pipeline default max_sequence_length)
TEXT_LENGTH = 256
#: the authors' video template and its crop for their Llama-3 tokenizer (hyvideo/constants.py; diffusers'
#: DEFAULT_PROMPT_TEMPLATE holds the same text and crop_start 95)
PROMPT_TEMPLATE = DEFAULT_PROMPT_TEMPLATE["template"]
AUTHORS_CROP_START = DEFAULT_PROMPT_TEMPLATE["crop_start"]
NUM_TRAIN_TIMESTEPS = 1000
#: finetrainers' HunyuanVideo example (train.sh `--flow_weighting_scheme "logit_normal"`; args.py defaults
#: flow_logit_mean 0.0, flow_logit_std 1.0) and its spec's `forward(guidance=1.0)`, scaled by 1000 as the pipeline does
WEIGHTING_SCHEME, LOGIT_MEAN, LOGIT_STD = "logit_normal", 0.0, 1.0
TRAIN_GUIDANCE = 1.0
#: the authors' sampling defaults (hyvideo/config.py): flow shift 7.0, 50 steps, embedded guidance 6.0, 129 frames
SAMPLE_SHIFT, SAMPLE_STEPS, EMBEDDED_GUIDANCE, SAMPLE_FRAMES = 7.0, 50, 6.0, 129

VAE_PRESETS: dict[str, dict[str, Any]] = {
    # the released causal 3-D VAE's layout (4 down blocks -> 8x spatial, 4x temporal, 16 latent channels, the released
    # scaling_factor 0.476986: AutoencoderKLHunyuanVideo's defaults) at 1/16 of the width, one layer per block
    "tiny": dict(latent_channels=16, block_out_channels=(8, 16, 32, 32), layers_per_block=1, norm_num_groups=4),
}
TEXT_PRESETS: dict[str, dict[str, Any]] = {
    # a Llama decoder of 3 layers (the pipeline takes the states 2 below the top) of width 32, rotary positions long
    # enough for the byte-level template (~500 tokens) plus the caption
    "tiny": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2,
                 num_key_value_heads=2, max_position_embeddings=2048),
}  # fmt: skip
TRANSFORMER_PRESETS: dict[str, dict[str, Any]] = {
    # the released block types (token refiner, dual-stream then single-stream blocks, RMS qk-norm, 3-D RoPE, 1x2x2
    # patches, guidance embedding as the cfg-distilled T2V): 1 refiner, 1 double and 1 single block, 2 heads of 16
    "tiny": dict(num_attention_heads=2, attention_head_dim=16, num_layers=1, num_single_layers=1, num_refiner_layers=1,
                 mlp_ratio=4.0, patch_size=2, patch_size_t=1, rope_axes_dim=(4, 6, 6), guidance_embeds=True),
}  # fmt: skip
TEXT_PARTS: list[tuple[str, str, type]] = [
    ("text_encoder", "tokenizer", LlamaModel),
    ("text_encoder_2", "tokenizer_2", CLIPTextModel),
]


def prompt_template(tokenizer: Any) -> dict[str, Any]:
    """The authors' template with the number of its leading tokens to crop for `tokenizer`: their 95 for the Llama-3
    tokenizer the template is written in (it has the header tokens as single ids), else the count of tokens this
    tokenizer gives the text before the caption (the tiny byte-level one: one per byte), so the cached states and the
    mask start at the caption either way."""
    if "<|start_header_id|>" in tokenizer.get_vocab():
        return {"template": PROMPT_TEMPLATE, "crop_start": AUTHORS_CROP_START}
    ids = tokenizer(PROMPT_TEMPLATE.split("{}")[0])["input_ids"]
    if tokenizer.eos_token_id is not None and ids and ids[-1] == tokenizer.eos_token_id:
        ids = ids[:-1]  # a tokenizer that appends EOS: the crop ends where the caption begins
    return {"template": PROMPT_TEMPLATE, "crop_start": len(ids)}


class HunyuanVideo(LatentFamily, TextToVideoPipelineFamily):
    """HunyuanVideo text-to-video (the 13B cfg-distilled release's layout); export and sampling:
    engines/models/text_video.py with the two text encoders (`save_pretrained`) and the authors' prompt template and
    true CFG off (`pipeline_extras`)."""

    name = "hunyuanvideo"
    temporal_compression = 4
    spatial_compression = 8
    size_multiple = 16  # 8x VAE, 2x2 patches
    vae_name = "HunyuanVideo"
    authors_frames = f"the authors: {SAMPLE_FRAMES}"
    pipeline_cls: type = HunyuanVideoPipeline
    negative_prompt: str | None = None  # the authors sample without one (true CFG off; guidance is embedded)
    text_length = TEXT_LENGTH
    text_parts = TEXT_PARTS
    #: finetrainers' HunyuanVideo example (train.sh `--target_modules
    #: (transformer_blocks|single_transformer_blocks).*(...)`): both streams' attention projections in the blocks,
    #: not the text token refiner's attention
    lora_targets = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")
    lora_exclude = r"context_embedder\..*"

    # ---- loading -------------------------------------------------------------------------------
    def load_vae(self, cfg: ModelConfig) -> nn.Module:
        if cfg.vae.pretrained:
            vae = from_pretrained(AutoencoderKLHunyuanVideo, cfg.vae, "vae")
        else:
            with seeded_init(cfg.seed + 1):
                vae = AutoencoderKLHunyuanVideo(**pick_preset(cfg.vae, VAE_PRESETS, "vae"))
        return vae.eval().requires_grad_(False)

    def load_text_encoder(self, cfg: ModelConfig) -> tuple[Any, nn.Module]:
        """((Llama tokenizer, CLIP tokenizer), ModuleList(LlamaModel, CLIPTextModel)): a release's `text_encoder/`,
        `tokenizer/`, `text_encoder_2/`, `tokenizer_2/` under `model.text_encoder.pretrained`, or the tiny presets
        (byte-level tokenizers; CLIP padded to its 77 positions)."""
        comp = cfg.text_encoder
        if comp.pretrained:
            return load_text_encoders(cfg, TEXT_PARTS, [cfg.max_text_length, CLIP_MAX])
        toks, encs = [], []
        for i, cls in enumerate((LlamaModel, CLIPTextModel)):
            tok = byte_level_tokenizer()
            ids = dict(vocab_size=len(tok), pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
            if cls is LlamaModel:
                config: Any = LlamaConfig(bos_token_id=None, **ids, **pick_preset(comp, TEXT_PRESETS, "text_encoder"))
            else:
                tok.model_max_length = CLIP_MAX
                config = CLIPTextConfig(bos_token_id=tok.pad_token_id, **ids, **CLIP_PRESETS["tiny"])
            with seeded_init(cfg.seed + 2 + i):
                encs.append(cls(config))
            toks.append(tok)
        return tuple(toks), nn.ModuleList(encs).eval().requires_grad_(False)

    def load_transformer(self, cfg: ModelConfig, text_embed_dim: int, latent_channels: int) -> nn.Module:
        if cfg.transformer.pretrained:
            return from_pretrained(HunyuanVideoTransformer3DModel, cfg.transformer, "transformer")
        preset = pick_preset(cfg.transformer, TRANSFORMER_PRESETS, "transformer")
        with seeded_init(cfg.seed + 3):
            return HunyuanVideoTransformer3DModel(
                in_channels=latent_channels, out_channels=latent_channels, text_embed_dim=text_embed_dim,
                pooled_projection_dim=CLIP_PRESETS["tiny"]["hidden_size"], **preset,
            )  # fmt: skip

    def load_scheduler(self, cfg: ModelConfig) -> FlowMatchEulerDiscreteScheduler:
        """finetrainers' training grid: `FlowMatchEulerDiscreteScheduler()`, 1000 unshifted sigmas (1000 - i) / 1000."""
        return FlowMatchEulerDiscreteScheduler(num_train_timesteps=NUM_TRAIN_TIMESTEPS)

    def sample_scheduler(self, cfg: ModelConfig) -> FlowMatchEulerDiscreteScheduler:
        """A release's own `scheduler/` where it has one, else the authors' Euler flow sampler with shift 7.0."""
        comp = cfg.transformer
        if comp.pretrained and (Path(comp.pretrained) / "scheduler" / "scheduler_config.json").is_file():
            return FlowMatchEulerDiscreteScheduler.from_pretrained(comp.pretrained, subfolder="scheduler")
        return FlowMatchEulerDiscreteScheduler(num_train_timesteps=NUM_TRAIN_TIMESTEPS, shift=SAMPLE_SHIFT)

    # ---- encoding (prep) ------------------------------------------------------------------------
    def encode_video(self, vae: nn.Module, frames: torch.Tensor) -> torch.Tensor:
        """uint8 (B, T, H, W, C) -> the posterior (B, 2*16, T', H', W'): mean ++ logvar; the engine scales x0 by the
        VAE's scaling_factor (recorded per sample by prep)."""
        return encode_pixels(vae, to_pixels(frames))

    def _text_pipe(self, tokenizers: Any, encoders: nn.Module) -> HunyuanVideoPipeline:
        """The pipeline holding only its text side, so `encode_prompt` is the pipeline's own."""
        return HunyuanVideoPipeline(
            tokenizer=tokenizers[0], text_encoder=encoders[0], tokenizer_2=tokenizers[1], text_encoder_2=encoders[1],
            transformer=None, vae=None, scheduler=None,
        )  # fmt: skip

    def encode_text(self, tokenizer: Any, encoder: nn.Module, captions: list[str], max_length: int) -> dict:
        """{"text_embeds": (B, L, D_llama), "text_mask": (B, L), "pooled_embeds": (B, D_clip)}: what the pipeline
        feeds the transformer as encoder_hidden_states, encoder_attention_mask and pooled_projections."""
        llama, clip = encoder[0], encoder[1]
        device = next(llama.parameters()).device
        if device.type == "meta":  # sizing on meta (variants): shapes only
            return {"text_embeds": torch.empty(len(captions), max_length, llama.config.hidden_size, device="meta"),
                    "text_mask": torch.empty(len(captions), max_length, device="meta"),
                    "pooled_embeds": torch.empty(len(captions), clip.config.hidden_size, device="meta")}  # fmt: skip
        embeds, pooled, mask = self._text_pipe(tokenizer, encoder).encode_prompt(
            captions, prompt_template=prompt_template(tokenizer[0]), device=device, dtype=llama.dtype,
            max_sequence_length=max_length,
        )  # fmt: skip
        return {"text_embeds": embeds, "text_mask": mask.float(), "pooled_embeds": pooled}

    # ---- training -------------------------------------------------------------------------------
    def training_loss(
        self, transformer: nn.Module, scheduler: Any, batch: dict[str, torch.Tensor], generator: torch.Generator
    ) -> torch.Tensor:
        """finetrainers' step, its draws in its order: u (logit-normal) for the grid index, then x0 from the cached
        posterior (scaled by the VAE's scaling_factor), then eps."""
        b = batch["latent_params"].shape[0]
        u = compute_density_for_timestep_sampling(
            WEIGHTING_SCHEME, b, logit_mean=LOGIT_MEAN, logit_std=LOGIT_STD, generator=generator
        )
        idx = (u * NUM_TRAIN_TIMESTEPS).long()
        x0, noise = latents_and_noise(batch, generator)
        sigma = scheduler.sigmas[idx].to(x0.device, torch.float32)
        return self.flow_loss(transformer, x0, noise, sigma, batch)

    def flow_loss(
        self,
        transformer: nn.Module,
        x0: torch.Tensor,
        noise: torch.Tensor,
        sigma: torch.Tensor,
        batch: dict[str, torch.Tensor],
    ) -> torch.Tensor:
        """The loss for given x0, eps (B, C, T', H', W') and sigma (B,), conditioned on the batch's `text_embeds`,
        `text_mask` and `pooled_embeds`: MSE of the predicted velocity against eps - x0 (weight 1: logit-normal)."""
        core = self.core_module(transformer)
        s = sigma.view(-1, 1, 1, 1, 1)
        noisy = (1.0 - s) * x0 + s * noise
        timestep = (sigma * 1000.0).long()
        text = batch["text_embeds"]
        guidance = None
        if core.config.guidance_embeds:
            guidance = torch.full((x0.shape[0],), TRAIN_GUIDANCE * 1000.0, device=x0.device, dtype=text.dtype)
        pred = transformer(
            hidden_states=noisy.to(text.dtype), timestep=timestep, encoder_hidden_states=text,
            encoder_attention_mask=batch["text_mask"], pooled_projections=batch["pooled_embeds"].to(text.dtype),
            guidance=guidance, return_dict=False,
        )[0].float()  # fmt: skip
        return ((pred - (noise - x0)) ** 2).flatten(1).mean(1).mean()

    def latent_tokens(self, transformer_config: Any, latent_shape: tuple[int, ...]) -> int:
        _, t, h, w = latent_shape[-4:]  # (2*Cz, T', H', W')
        p, pt = transformer_config.patch_size, transformer_config.patch_size_t
        return (t // pt) * (h // p) * (w // p)

    # ---- export and sampling --------------------------------------------------------------------
    def save_pretrained(self, out_dir: Path, cfg: ModelConfig, transformer: nn.Module) -> Path:
        """The pipeline folder with both text encoders; the Llama tokenizer's `model_max_length` records the text
        length the model trained on, so `generate` encodes prompts as the cache did."""
        (tokenizer, tokenizer_2), encoders = self.load_text_encoder(cfg)
        tokenizer.model_max_length = cfg.max_text_length
        pipe = HunyuanVideoPipeline(
            tokenizer=tokenizer, text_encoder=encoders[0], tokenizer_2=tokenizer_2, text_encoder_2=encoders[1],
            vae=self.load_vae(cfg), transformer=self.core_module(transformer), scheduler=self.sample_scheduler(cfg),
        )  # fmt: skip
        pipe.save_pretrained(out_dir, safe_serialization=True)
        return out_dir

    def pipeline_extras(self, pipe: Any) -> dict[str, Any]:
        """The template and crop the cache was encoded with, and true CFG off (the authors' `--cfg-scale 1.0`): the
        `guidance_scale` `generate` is given is the embedded guidance (the authors: 6.0)."""
        return {"prompt_template": prompt_template(pipe.tokenizer), "true_cfg_scale": 1.0}


register_family(HunyuanVideo())
