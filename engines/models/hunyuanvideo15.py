"""HunyuanVideo 1.5 text-to-video: diffusers' `HunyuanVideo15Transformer3DModel`, `AutoencoderKLHunyuanVideo15` and
`HunyuanVideo15Pipeline`; two text encoders, Qwen2.5-VL's language model and a ByT5 glyph encoder.

Every piece is the library's own class; the facts carry their sources (Tencent-Hunyuan/HunyuanVideo-1.5@60783e7
`train.py`, `hyvideo/commons/__init__.py`; huggingface/diffusers `scripts/convert_hunyuan_video1_5_to_diffusers.py`):

- **Latents**: the VAE compresses 16x in space and 4x in time into 32 channels, and the transformer's patch is 1x1x1,
  so clips take 4k+1 frames and sides that are multiples of 16. The authors train on `latent_dist.sample() *
  scaling_factor` (train.py `encode_vae`; the VAE has no shift), which is the engine's shared posterior sampling with
  the scaling prep records, so the cache holds the VAE's raw posterior.
- **Text**: cached as `HunyuanVideo15Pipeline.encode_prompt` computes it (train == inference): the caption in the
  authors' video chat template (system message, ChatML), Qwen2.5-VL's hidden states two layers before the last
  (`hidden_state_skip_layer=2`), the template's prefix cropped off (the authors find the crop after
  `<|im_start|>user\\n`; the pipeline's 108 for the released tokenizer), padded to 1000 tokens with its mask; and
  the ByT5 glyph states of the quoted text in the caption (`Text "..."`), 256 tokens with their mask, zeros where the
  caption quotes nothing. Four cached tensors: text_embeds, text_mask, text_embeds_2, text_mask_2.
- **Objective** (train.py `TimestepSampler`, `timestep_transform`, `LinearInterpolationSchedule`, `train_step`, with
  its CLI defaults `--flow_snr_type lognorm --train_timestep_shift 3.0`): t = sigmoid(u) (1 - 2e-5) + 1e-5 with
  u ~ N(0, 1), shifted t' = 3 t / (1 + 2 t), x_t = (1 - t') x0 + t' eps, the model fed timestep 1000 t' and the
  zero condition (32 zero channels and a zero mask channel: `get_condition("t2v")`), target eps - x0, plain MSE.
  Text-to-video trains without vision tokens (the authors pass `vision_states=None`); diffusers' forward needs an
  `image_embeds` tensor, so training passes an empty one, which adds no token (inference's 729 all-zero image tokens
  are masked out of attention, so both give the same prediction). Likewise the text goes in cut after the batch's
  last real token (`trim_text_padding`): padded tokens are zeroed and masked by the model, so they change nothing.
- **Sampling**: the 480p text-to-video settings (hyvideo/commons `PIPELINE_CONFIGS['480p_t2v']`, the diffusers
  conversion's `SCHEDULER_CONFIGS` / `GUIDANCE_CONFIGS`): Euler flow matching with shift 5.0, classifier-free
  guidance 6.0, 50 steps, 121 frames, the empty negative prompt of generate.py. A pretrained release keeps its own
  `scheduler/` (720p ships shift 9.0).

docs/fidelity.md (HunyuanVideo 1.5) lists each choice and what is not reproduced.
"""

from __future__ import annotations

import inspect
import math
from pathlib import Path
from typing import Any

import torch
from diffusers import (
    AutoencoderKLHunyuanVideo15,
    ClassifierFreeGuidance,
    FlowMatchEulerDiscreteScheduler,
    HunyuanVideo15Pipeline,
    HunyuanVideo15Transformer3DModel,
)
from flowspeed.configs.schema import ComponentConfig, ModelConfig
from flowspeed.engines.models.cogvideox import encode_pixels, to_pixels
from flowspeed.engines.models.registry import (
    LatentFamily,
    from_pretrained,
    pick_preset,
    register_family,
    sample_latents,
    seeded_init,
)
from flowspeed.engines.models.text_video import TextToVideoPipelineFamily
from torch import nn
from transformers import (
    AutoTokenizer,
    ByT5Tokenizer,
    Qwen2_5_VLTextConfig,
    Qwen2_5_VLTextModel,
    T5Config,
    T5EncoderModel,
)

#: HunyuanVideo15Pipeline `tokenizer_max_length = 1000` (the authors' TextEncoder `max_length=1000`) and
#: `tokenizer_2_max_length = 256` (their `byt5_max_length=256`)
TEXT_LENGTH = 1000
GLYPH_LENGTH = 256
#: train.py: `num_train_timesteps = 1000`, `--train_timestep_shift 3.0`, TimestepSampler.TRAIN_EPS = 1e-5
NUM_TRAIN_TIMESTEPS = 1000
TRAIN_SHIFT = 3.0
TRAIN_EPS = 1e-5
#: hyvideo/commons PIPELINE_CONFIGS['480p_t2v'] (flow_shift 5.0, guidance_scale 6.0), generate.py's 50 steps, its
#: `--video_length 121` and empty `--negative_prompt`
SAMPLE_SHIFT = 5.0
GUIDANCE_SCALE = 6.0
SAMPLE_STEPS = 50
NUM_FRAMES = 121
NEGATIVE_PROMPT = ""
#: the authors' video-template system message, as the pipeline's prompt encoder has it by default
SYSTEM_MESSAGE: str = (
    inspect.signature(HunyuanVideo15Pipeline._get_mllm_prompt_embeds).parameters["system_message"].default
)
#: the chat-template marker the prompt's prefix is cropped after (hyvideo TextEncoder.calculate_crop_start)
USER_MARKER = "<|im_start|>user\n"

VAE_PRESETS: dict[str, dict[str, Any]] = {
    # the released layout (5 levels, 4 spatial 2x downsamples -> 16x, the last 2 of them temporal -> 4x, 32 latent
    # channels, the released scaling factor) at 1/16 of the width and one layer per level
    "tiny": dict(latent_channels=32, block_out_channels=(8, 16, 32, 64, 64), layers_per_block=1),
}
TEXT_PRESETS: dict[str, dict[str, Any]] = {
    # Qwen2.5-VL's language model (GQA, M-RoPE) of width 32; 3 layers so the layer the pipeline takes (the third
    # from the last hidden state) is a decoder layer's output, not the embeddings
    "tiny": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2,
                 num_key_value_heads=1, max_position_embeddings=4096, rms_norm_eps=1e-6,
                 rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [2, 3, 3]}),
}  # fmt: skip
GLYPH_PRESETS: dict[str, dict[str, Any]] = {
    # ByT5 (T5 v1.1 encoder on bytes: gated GELU, untied) with 1 layer of width 32; ByT5Tokenizer needs no vocab file
    "tiny": dict(d_model=32, d_ff=64, d_kv=16, num_layers=1, num_heads=2, feed_forward_proj="gated-gelu",
                 tie_word_embeddings=False),
}  # fmt: skip
TRANSFORMER_PRESETS: dict[str, dict[str, Any]] = {
    # the released block (dual-stream joint attention with RMS qk-norm, 3-D RoPE, token refiner, ByT5 and image
    # projections, condition-type embeddings) with 2 layers of 2 x 16-wide heads, 1 refiner layer
    "tiny": dict(num_attention_heads=2, attention_head_dim=16, num_layers=2, num_refiner_layers=1, mlp_ratio=2.0,
                 image_embed_dim=16, rope_axes_dim=(4, 6, 6), task_type="t2v"),
}  # fmt: skip


def crop_start(tokenizer: Any, system_message: str) -> int:
    """Tokens of the chat template before the caption: where `USER_MARKER` ends (the authors' crop, computed for
    whichever tokenizer the model has, since a tiny tokenizer's prefix is not the released 108 tokens)."""
    conversation = [{"role": "system", "content": system_message}, {"role": "user", "content": " "}]
    ids = tokenizer.apply_chat_template(conversation, add_generation_prompt=True, tokenize=True, return_dict=True)
    ids = list(ids["input_ids"])
    marker = tokenizer(USER_MARKER, add_special_tokens=False)["input_ids"]
    for i in range(len(ids) - len(marker) + 1):
        if ids[i : i + len(marker)] == marker:
            return i + len(marker)
    raise ValueError(
        f"the tokenizer's chat template has no {USER_MARKER!r}: HunyuanVideo 1.5 needs Qwen2.5-VL's ChatML template"
    )


def shifted(t: torch.Tensor, shift: float = TRAIN_SHIFT) -> torch.Tensor:
    """train.py `timestep_transform` on t in [0, 1]: shift t / (1 + (shift - 1) t)."""
    return shift * t / (1 + (shift - 1) * t)


#: what the trimmed text lengths are rounded up to: context parallel splits the text stream into cp equal parts, and
#: the cached lengths (1000 and 256 tokens) are multiples of it, so any cp up to 8 divides a trimmed batch too
TRIM_MULTIPLE = 8


def trim_text_padding(text: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The cached text cut after the batch's last real token, per encoder, rounded up to `TRIM_MULTIPLE` tokens
    (capped at the cached length). The transformer zeroes padded tokens and masks them out of every attention (and of
    the refiner's pooled mean), so the prediction is the same; the cut spares the 2048-wide glyph projection its 256
    mostly padded tokens. A batch without quoted text keeps no glyph token at all."""
    out = dict(text)
    for states, mask in (("text_embeds", "text_mask"), ("text_embeds_2", "text_mask_2")):
        real = text[mask].bool().any(0).nonzero()
        keep = int(real.max()) + 1 if len(real) else 0
        keep = min(-(-keep // TRIM_MULTIPLE) * TRIM_MULTIPLE, text[states].shape[1])
        out[states], out[mask] = text[states][:, :keep], text[mask][:, :keep]
    return out


class HunyuanVideo15(LatentFamily, TextToVideoPipelineFamily):
    """HunyuanVideo 1.5 text-to-video (the 8.3B 480p/720p layouts); export (its own `save_pretrained`: two text
    encoders and the guider) and sampling (engines/models/text_video.py, the guider set by `pipeline_call`) through
    `HunyuanVideo15Pipeline`."""

    name = "hunyuanvideo15"
    temporal_compression = 4
    spatial_compression = 16
    size_multiple = 16  # 16x VAE, 1x1 patches
    vae_name = "HunyuanVideo 1.5"
    authors_frames = f"the authors: {NUM_FRAMES}"
    pipeline_cls: type = HunyuanVideo15Pipeline
    negative_prompt = NEGATIVE_PROMPT
    text_length = TEXT_LENGTH
    #: every nn.Linear of the transformer, by the suffixes diffusers names them with: what peft's "all-linear" picks,
    #: the authors' LoRA default (train.py `lora_target_modules=None` -> target_modules="all-linear"): both streams'
    #: attention and MLPs, the adaLN tables, the refiner, the text/time/image embedders and the output projection
    lora_targets = (
        "to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out",
        "net.0.proj", "net.2", "linear", "linear_1", "linear_2", "linear_3", "proj_in", "proj_out",
    )  # fmt: skip
    #: the pipeline's text components, in its order (the variants' tiny build names its parts by these)
    text_parts: list[tuple[str, str, type]] = [
        ("text_encoder", "tokenizer", Qwen2_5_VLTextModel),
        ("text_encoder_2", "tokenizer_2", T5EncoderModel),
    ]

    # ---- loading -------------------------------------------------------------------------------
    def load_vae(self, cfg: ModelConfig) -> nn.Module:
        if cfg.vae.pretrained:
            vae = from_pretrained(AutoencoderKLHunyuanVideo15, cfg.vae, "vae")
        else:
            with seeded_init(cfg.seed + 1):
                vae = AutoencoderKLHunyuanVideo15(**pick_preset(cfg.vae, VAE_PRESETS, "vae"))
        # one clip at a time: diffusers 0.42.1's mid-block attention broadcasts its (B, S, S) causal mask against
        # (B, 1, S, C) queries, which fails for B > 1; slicing gives each clip the batch-1 pass the authors run
        vae.enable_slicing()
        return vae.eval().requires_grad_(False)

    def load_text_encoder(self, cfg: ModelConfig) -> tuple[Any, nn.Module]:
        """((Qwen tokenizer, ByT5 tokenizer), ModuleList(Qwen2.5-VL text model, ByT5 encoder)). `pretrained:` is a
        release folder holding both (text_encoder/, tokenizer/, text_encoder_2/, tokenizer_2/); the tiny preset uses
        a byte-level ChatML tokenizer (Qwen2-VL's tiny one) and the real, vocabulary-free ByT5Tokenizer."""
        comp = cfg.text_encoder
        if comp.pretrained and comp.subfolder:
            raise ValueError(
                f"model.text_encoder.pretrained is the release folder holding text_encoder/, tokenizer/, "
                f"text_encoder_2/ and tokenizer_2/ (HunyuanVideo 1.5 has two text encoders): remove subfolder: "
                f"{comp.subfolder}"
            )
        if comp.pretrained:
            tokenizers, encoders = [], []
            for enc_sub, tok_sub, cls in self.text_parts:
                tokenizers.append(from_pretrained(AutoTokenizer, self._part(comp, tok_sub), "text_encoder"))
                encoders.append(from_pretrained(cls, self._part(comp, enc_sub), "text_encoder"))
            return tuple(tokenizers), nn.ModuleList(encoders).eval().requires_grad_(False)
        from flowspeed.engines.models.qwen2_vl import tiny_tokenizer

        tokenizer, glyph_tokenizer = tiny_tokenizer(), ByT5Tokenizer()
        qwen = Qwen2_5_VLTextConfig(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id, bos_token_id=None,
                                    eos_token_id=tokenizer.eos_token_id,
                                    **pick_preset(comp, TEXT_PRESETS, "text_encoder"))  # fmt: skip
        byt5 = T5Config(vocab_size=len(glyph_tokenizer), pad_token_id=glyph_tokenizer.pad_token_id,
                        eos_token_id=glyph_tokenizer.eos_token_id, decoder_start_token_id=glyph_tokenizer.pad_token_id,
                        **pick_preset(comp, GLYPH_PRESETS, "text_encoder"))  # fmt: skip
        with seeded_init(cfg.seed + 2):
            encoder = Qwen2_5_VLTextModel(qwen)
        with seeded_init(cfg.seed + 3):
            glyph = T5EncoderModel(byt5)
        return (tokenizer, glyph_tokenizer), nn.ModuleList([encoder, glyph]).eval().requires_grad_(False)

    @staticmethod
    def _part(comp: ComponentConfig, subfolder: str) -> ComponentConfig:
        return ComponentConfig(pretrained=comp.pretrained, subfolder=subfolder)

    def glyph_width(self, cfg: ModelConfig) -> int:
        """The ByT5 encoder's width (the transformer's `text_embed_2_dim`): the release's, or the tiny preset's."""
        comp = cfg.text_encoder
        if comp.pretrained:
            return T5Config.from_pretrained(comp.pretrained, subfolder="text_encoder_2").d_model
        return pick_preset(comp, GLYPH_PRESETS, "text_encoder")["d_model"]

    def load_transformer(self, cfg: ModelConfig, text_embed_dim: int, latent_channels: int) -> nn.Module:
        """The denoiser; its input is the noisy latent, the condition latent and the condition mask (2 C + 1)."""
        if cfg.transformer.pretrained:
            return from_pretrained(HunyuanVideo15Transformer3DModel, cfg.transformer, "transformer")
        preset = pick_preset(cfg.transformer, TRANSFORMER_PRESETS, "transformer")
        with seeded_init(cfg.seed + 4):
            return HunyuanVideo15Transformer3DModel(
                in_channels=2 * latent_channels + 1, out_channels=latent_channels, text_embed_dim=text_embed_dim,
                text_embed_2_dim=self.glyph_width(cfg), **preset,
            )  # fmt: skip

    def load_scheduler(self, cfg: ModelConfig) -> None:
        """The authors draw t in closed form (logit-normal, shifted by 3); no grid is needed."""
        return None

    def sample_scheduler(self, cfg: ModelConfig) -> FlowMatchEulerDiscreteScheduler:
        """A release's own `scheduler/` where it has one, else Euler flow matching with the 480p shift (5.0)."""
        comp = cfg.transformer
        if comp.pretrained and (Path(comp.pretrained) / "scheduler" / "scheduler_config.json").is_file():
            return FlowMatchEulerDiscreteScheduler.from_pretrained(comp.pretrained, subfolder="scheduler")
        return FlowMatchEulerDiscreteScheduler(num_train_timesteps=NUM_TRAIN_TIMESTEPS, shift=SAMPLE_SHIFT)

    # ---- encoding (prep) ------------------------------------------------------------------------
    def encode_video(self, vae: nn.Module, frames: torch.Tensor) -> torch.Tensor:
        """uint8 (B, T, H, W, C) -> the VAE posterior (B, 2*32, T', H', W'), mean ++ logvar, as it is: the engine
        samples it and multiplies by the scaling factor prep records (the authors' `sample() * scaling_factor`)."""
        if frames.shape[2] % self.size_multiple or frames.shape[3] % self.size_multiple:
            raise ValueError(
                f"HunyuanVideo 1.5 needs sides that are multiples of {self.size_multiple} (16x VAE, 1x1 patches), "
                f"not {frames.shape[2]}x{frames.shape[3]}"
            )
        if error := self.frame_count_error(frames.shape[1]):
            raise ValueError(error)
        return encode_pixels(vae, to_pixels(frames))

    def encode_text(
        self, tokenizer: Any, encoder: nn.Module, captions: list[str], max_length: int
    ) -> dict[str, torch.Tensor]:
        """{"text_embeds": (B, L, D), "text_mask": (B, L), "text_embeds_2": (B, 256, D2), "text_mask_2": (B, 256)}:
        the pipeline's own two prompt encoders (its `encode_prompt` calls exactly these), L = `max_length`."""
        (tok, glyph_tok), (qwen, glyph) = tokenizer, encoder
        device = next(qwen.parameters()).device
        b = len(captions)
        if device.type == "meta":  # sizing on meta (variants): shapes only
            return {"text_embeds": torch.empty(b, max_length, qwen.config.hidden_size, device="meta"),
                    "text_mask": torch.empty(b, max_length, device="meta"),
                    "text_embeds_2": torch.empty(b, GLYPH_LENGTH, glyph.config.d_model, device="meta"),
                    "text_mask_2": torch.empty(b, GLYPH_LENGTH, device="meta")}  # fmt: skip
        system = SYSTEM_MESSAGE
        embeds, mask = HunyuanVideo15Pipeline._get_mllm_prompt_embeds(
            text_encoder=qwen, tokenizer=tok, prompt=captions, device=device, tokenizer_max_length=max_length,
            system_message=system, crop_start=crop_start(tok, system),
        )  # fmt: skip
        embeds_2, mask_2 = HunyuanVideo15Pipeline._get_byt5_prompt_embeds(
            tokenizer=glyph_tok, text_encoder=glyph, prompt=captions, device=device, tokenizer_max_length=GLYPH_LENGTH
        )
        return {"text_embeds": embeds, "text_mask": mask.float(), "text_embeds_2": embeds_2,
                "text_mask_2": mask_2.float()}  # fmt: skip

    # ---- training -------------------------------------------------------------------------------
    def training_loss(
        self, transformer: nn.Module, scheduler: Any, batch: dict[str, torch.Tensor], generator: torch.Generator
    ) -> torch.Tensor:
        """train.py's step for text-to-video, in its draw order: x0 from the posterior times the scaling factor,
        eps, then u ~ N(0, 1) for the logit-normal t, shifted by 3."""
        x0 = sample_latents(batch, generator)  # (B, 32, T', H', W')
        noise = torch.randn(x0.shape, generator=generator).to(x0.device)
        u = torch.randn((x0.shape[0],), generator=generator)
        t = torch.sigmoid(u) * (1 - 2 * TRAIN_EPS) + TRAIN_EPS
        return self.flow_loss(transformer, x0, noise, shifted(t).to(x0.device), batch)

    def flow_loss(
        self,
        transformer: nn.Module,
        x0: torch.Tensor,
        noise: torch.Tensor,
        sigma: torch.Tensor,
        text: dict[str, torch.Tensor],
    ) -> torch.Tensor:
        """The MSE of the predicted velocity against eps - x0 at the shifted t (`sigma`, (B,)), the model fed
        [x_t, zero condition latent, zero mask], timestep 1000 sigma and the text without its padding tail."""
        s = sigma.float().view(-1, 1, 1, 1, 1)
        noisy = (1 - s) * x0 + s * noise
        b, c, f, h, w = x0.shape
        cond = torch.zeros(b, c + 1, f, h, w, device=x0.device, dtype=x0.dtype)  # train.py get_condition("t2v")
        text = trim_text_padding(text)
        dtype = text["text_embeds"].dtype
        image = torch.zeros(b, 0, self.core_module(transformer).config.image_embed_dim, device=x0.device, dtype=dtype)
        pred = transformer(
            hidden_states=torch.cat([noisy, cond], dim=1).to(dtype), timestep=sigma.float() * NUM_TRAIN_TIMESTEPS,
            encoder_hidden_states=text["text_embeds"], encoder_attention_mask=text["text_mask"],
            encoder_hidden_states_2=text["text_embeds_2"], encoder_attention_mask_2=text["text_mask_2"],
            image_embeds=image, return_dict=False,
        )[0].float()  # fmt: skip
        return ((pred - (noise - x0)) ** 2).mean()

    def latent_tokens(self, transformer_config: Any, latent_shape: tuple[int, ...]) -> int:
        _, t, h, w = latent_shape[-4:]  # (2*Cz, T', H', W')
        p, pt = transformer_config.patch_size, transformer_config.patch_size_t
        return (t // pt) * (h // p) * (w // p)

    # ---- export and sampling ---------------------------------------------------------------------
    def save_pretrained(self, out_dir: Path, cfg: ModelConfig, transformer: nn.Module) -> Path:
        """The pipeline folder, with the 480p text-to-video guider (CFG 6.0) and sampler. The Qwen tokenizer's
        `model_max_length` records the text length the cache had, which `generate` pads prompts to."""
        (tok, glyph_tok), (qwen, glyph) = self.load_text_encoder(cfg)
        tok.model_max_length = cfg.max_text_length
        pipe = HunyuanVideo15Pipeline(
            text_encoder=qwen, tokenizer=tok, transformer=self.core_module(transformer), vae=self.load_vae(cfg),
            scheduler=self.sample_scheduler(cfg), text_encoder_2=glyph, tokenizer_2=glyph_tok,
            guider=ClassifierFreeGuidance(guidance_scale=GUIDANCE_SCALE),
        )  # fmt: skip
        pipe.save_pretrained(out_dir, safe_serialization=True)
        return out_dir

    def paired_guidance(self, pipe: Any, call: dict[str, Any]) -> bool:
        """The pipeline runs its guider's batches one call each: a conditional and an unconditional call per step when
        the guider is classifier-free guidance on every step (enabled, scale not 1, start 0, stop 1)."""
        g = pipe.guider
        off = 0.0 if getattr(g, "use_original_formulation", False) else 1.0  # the scale at which it does not guide
        return (isinstance(g, ClassifierFreeGuidance) and g._enabled and not math.isclose(g.guidance_scale, off)
                and g._start == 0.0 and g._stop == 1.0)  # fmt: skip

    def pipeline_call(self, pipe: Any, guidance_scale: float) -> dict[str, Any]:
        """This pipeline takes its guidance from its guider and its text length and template crop from attributes,
        not from call arguments: set them (the text length the cache had, recorded in the tokenizer; the crop for this
        tokenizer) and call with the negative prompt only."""
        length = pipe.tokenizer.model_max_length
        pipe.tokenizer_max_length = length if length <= 4096 else TEXT_LENGTH  # unset in a hub tokenizer: huge
        pipe.prompt_template_encode_start_idx = crop_start(pipe.tokenizer, pipe.system_message)
        pipe.guider = pipe.guider.new(guidance_scale=guidance_scale)
        return {"negative_prompt": self.negative_prompt}


register_family(HunyuanVideo15())
