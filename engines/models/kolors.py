"""Kolors text-to-image: diffusers' KolorsPipeline, an SDXL-shaped UNet2DConditionModel with `text_time` size
conditioning and a `text_proj` input projection, the SDXL VAE, and ChatGLM3 (diffusers' `ChatGLMModel`) as
the only text encoder.

Prompt embeddings come from `KolorsPipeline.encode_prompt`: ChatGLM's penultimate-layer states (B, L, 4096)
for cross-attention and the last layer's state at the last position (B, 4096) as the pooled vector; prompts
are left-padded so that position is always a real token. Size conditioning is the pipeline's
`_get_add_time_ids`. The objective is Kolors' released one: DDPM epsilon-prediction on its scheduler config
(scaled-linear betas 0.00085..0.014 over 1100 steps; their DreamBooth script trains with `DDPMScheduler`
built from that config), sampled with EulerDiscrete as the release does.

Tokenizer: real Kolors weights bring `ChatGLMTokenizer` (a sentencepiece model; `pretrained:` loads it with
`ChatGLMTokenizer.from_pretrained`, which needs the `sentencepiece` package). No sentencepiece model ships
offline, so the tiny preset uses `ByteGLMTokenizer`: the byte-level tokenizer, padded on the left and
returning ChatGLM's `position_ids`, which is all `encode_prompt` asks of a tokenizer. It has no [gMASK]/sop
prefix and ends prompts with </s>; an export records it as `flowspeed.engines.models.kolors.ByteGLMTokenizer`, so
loading a tiny export needs this package importable.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from diffusers import UNet2DConditionModel

# From the subpackage: without sentencepiece installed, `diffusers.KolorsPipeline` is an import-error dummy,
# while diffusers.pipelines.kolors exports the real classes (only ChatGLMTokenizer needs sentencepiece).
from diffusers.pipelines.kolors import ChatGLMModel, ChatGLMTokenizer, KolorsPipeline
from diffusers.pipelines.kolors.text_encoder import ChatGLMConfig, RMSNorm
from flowspeed.configs.schema import ComponentConfig, ModelConfig
from flowspeed.engines.models import sdxl
from flowspeed.engines.models.registry import from_pretrained, pick_preset, register_family, seeded_init
from flowspeed.engines.models.tokenizer import byte_level_tokenizer
from tokenizers import Tokenizer
from torch import nn
from transformers import BatchEncoding, PreTrainedTokenizerFast

GLM_PRESETS: dict[str, dict[str, Any]] = {
    # ChatGLM3-6B's layout (multi-query attention, qkv bias, RMSNorm, original RoPE) at toy width;
    # seq_length only sizes the rotary table: 4096 is model.max_text_length's ceiling.
    "tiny": dict(num_layers=2, hidden_size=32, ffn_hidden_size=64, kv_channels=16, num_attention_heads=2,
                 multi_query_attention=True, multi_query_group_num=1, add_qkv_bias=True, original_rope=True,
                 seq_length=4096),
}  # fmt: skip
UNET_PRESETS: dict[str, dict[str, Any]] = {
    # SDXL's tiny UNet; text_proj maps the GLM width to cross_attention_dim (4096 -> 2048 in the release).
    "tiny": dict(sdxl.UNET_PRESETS["tiny"], cross_attention_dim=64, encoder_hid_dim_type="text_proj"),
}
# Kwai-Kolors/Kolors-diffusers scheduler_config.json (EulerDiscreteScheduler); the DDPM training scheduler
# takes the same betas and steps.
SCHEDULER_CONFIG = dict(num_train_timesteps=1100, beta_start=0.00085, beta_end=0.014, beta_schedule="scaled_linear",
                        prediction_type="epsilon", steps_offset=1, timestep_spacing="leading")  # fmt: skip
EULER_CONFIG = dict(SCHEDULER_CONFIG, interpolation_type="linear", use_karras_sigmas=False)


class ByteGLMTokenizer(PreTrainedTokenizerFast):
    """The byte-level tokenizer as ChatGLMTokenizer presents itself to `KolorsPipeline.encode_prompt`:
    left padding and `position_ids` (0 over the padding, then 0, 1, ... over the prompt)."""

    model_input_names = ["input_ids", "attention_mask", "position_ids"]

    def _encode_plus(self, *args: Any, **kwargs: Any) -> BatchEncoding:
        enc = super()._encode_plus(*args, **kwargs)
        mask = enc.get("attention_mask")
        if mask is not None:
            pos = (torch.as_tensor(mask).cumsum(-1) - 1).clamp(min=0)  # (B, L) or (L,)
            enc["position_ids"] = pos if isinstance(mask, torch.Tensor) else pos.tolist()
        return enc


def byte_glm_tokenizer(max_length: int) -> ByteGLMTokenizer:
    base = byte_level_tokenizer()
    return ByteGLMTokenizer(tokenizer_object=Tokenizer.from_str(base.backend_tokenizer.to_str()),
                            pad_token=base.pad_token, eos_token=base.eos_token, unk_token=base.unk_token,
                            padding_side="left", model_max_length=max_length)  # fmt: skip


def _tokenizer_cls(root: str) -> type:
    """What an exported pipeline's tokenizer/ holds: ByteGLMTokenizer's tokenizer.json (tiny preset) or
    ChatGLMTokenizer's sentencepiece tokenizer.model (real Kolors weights)."""
    folder = Path(root) / "tokenizer"
    byte = (folder / "tokenizer.json").is_file() and not (folder / "tokenizer.model").is_file()
    return ByteGLMTokenizer if byte else ChatGLMTokenizer


class Kolors(sdxl.SDXL):
    """SDXL's VAE, UNet objective and scheduler split (inherited); ChatGLM3 as the text side, Kolors' schedules."""

    name = "kolors"
    text_parts = [("text_encoder", "tokenizer", ChatGLMModel)]
    pipeline_cls = KolorsPipeline
    max_sequence_tokenizer = "tokenizer"  # generation pads to the length training used
    scheduler_config = SCHEDULER_CONFIG
    euler_config = EULER_CONFIG

    def load_text_encoder(self, cfg: ModelConfig) -> tuple[Any, nn.Module]:
        """((tokenizer,), ModuleList([ChatGLMModel])); tokenizers pad to model.max_text_length (256 in Kolors)."""
        comp = cfg.text_encoder
        if comp.pretrained:
            sub = {
                part: ComponentConfig(pretrained=comp.pretrained, subfolder=part)
                for part in ("tokenizer", "text_encoder")
            }
            tok = from_pretrained(_tokenizer_cls(comp.pretrained), sub["tokenizer"], "text_encoder")
            enc = from_pretrained(ChatGLMModel, sub["text_encoder"], "text_encoder")
        else:
            tok = byte_glm_tokenizer(cfg.max_text_length)
            config = ChatGLMConfig(padded_vocab_size=len(tok), **pick_preset(comp, GLM_PRESETS, "text_encoder"))
            with seeded_init(cfg.seed + 2):
                enc = ChatGLMModel(config, empty_init=False)  # empty_init=True would leave torch.empty weights
            for norm in (m for m in enc.modules() if isinstance(m, RMSNorm)):
                nn.init.ones_(norm.weight)  # RMSNorm allocates torch.empty and ChatGLM's _init_weights is a no-op
        tok.model_max_length = cfg.max_text_length
        return (tok,), nn.ModuleList([enc]).eval().requires_grad_(False)

    def load_transformer(self, cfg: ModelConfig, text_embed_dim: int, latent_channels: int) -> nn.Module:
        if cfg.transformer.pretrained:
            return from_pretrained(UNet2DConditionModel, cfg.transformer, "transformer")
        with seeded_init(cfg.seed + 3):
            return UNet2DConditionModel(
                in_channels=latent_channels, out_channels=latent_channels, encoder_hid_dim=text_embed_dim,
                projection_class_embeddings_input_dim=text_embed_dim + 6 * sdxl.TIME_EMBED,  # pooled ++ 6 size ids
                **pick_preset(cfg.transformer, UNET_PRESETS, "transformer"),
            )  # fmt: skip

    def encode_text(self, tokenizer: Any, encoder: nn.Module, captions: list[str], max_length: int) -> dict:
        device = next(encoder.parameters()).device
        if device.type == "meta":  # a variant's shape-only build: ChatGLM's padding-mask check reads values
            width = encoder[0].config.hidden_size
            return {"text_embeds": torch.empty(len(captions), max_length, width, device=device),
                    "pooled_embeds": torch.empty(len(captions), width, device=device)}  # fmt: skip
        embeds, _, pooled, _ = self._text_pipe(tokenizer, encoder).encode_prompt(
            captions, device=device, do_classifier_free_guidance=False, max_sequence_length=max_length
        )
        return {"text_embeds": embeds, "pooled_embeds": pooled}  # (B, L, D_glm), (B, D_glm)


register_family(Kolors())
