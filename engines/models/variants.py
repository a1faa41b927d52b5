"""Named real model variants per family: the published shapes, no weights.

Sizing a run (memory, MFU, parallel layout) needs the real model's shape before anyone downloads
weights. Built on the meta device, a variant gives exact per-component parameter counts in
milliseconds and no memory; tests/engines/models/test_variants.py holds every denoiser to the count its
release documents, so a wrong config value cannot hide here.

Variants are dimensions only. Training still builds `preset: tiny` (random init) or loads
`pretrained:` weights; "tiny" is listed here too and built through the family's own loaders, so its
counts are exactly what `preset: tiny` trains.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from diffusers import (
    AutoencoderKL,
    AutoencoderKLCogVideoX,
    CogVideoXTransformer3DModel,
    FluxTransformer2DModel,
    HunyuanDiT2DModel,
    SD3Transformer2DModel,
    UNet2DConditionModel,
)
from diffusers.pipelines.kolors import ChatGLMModel
from flowspeed.configs.schema import ModelConfig
from flowspeed.engines.models.registry import Capability, get_family, known_families
from torch import nn
from transformers import (
    BertModel,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    InternVLForConditionalGeneration,
    LlavaForConditionalGeneration,
    PreTrainedModel,
    Qwen2VLForConditionalGeneration,
    T5EncoderModel,
    WhisperForConditionalGeneration,
)

TINY = "tiny"
MODEL = "model"  # a token-loss family's one component


@dataclass(frozen=True)
class Component:
    """A model class and the config kwargs of its published config.json."""

    cls: type
    kwargs: Mapping[str, Any]

    def build(self) -> nn.Module:
        if issubclass(self.cls, PreTrainedModel):  # transformers: config object first
            return self.cls(self.cls.config_class(**self.kwargs))
        return self.cls(**self.kwargs)


@dataclass(frozen=True)
class Variant:
    family: str
    name: str
    #: keyed by the diffusers pipeline's subfolder names; empty for "tiny" (the family's own loaders)
    components: Mapping[str, Component] = field(default_factory=dict)
    #: denoiser parameters of the released weights; the test allows 1%
    published: int | None = None
    #: how the model card / paper states the size ("12B" is rounded; `source` says what `published` is)
    published_as: str | None = None
    source: str | None = None


# ---- shared encoders and VAEs (config.json of the released checkpoints) -------------------------
# google/t5-v1_1-xxl, encoder only: 4,762,310,656 parameters
T5_XXL = Component(T5EncoderModel, dict(
    vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64, feed_forward_proj="gated-gelu",
    tie_word_embeddings=False))  # fmt: skip
_CLIP_L = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
               max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768)  # fmt: skip
CLIP_L = Component(CLIPTextModel, _CLIP_L)  # openai/clip-vit-large-patch14 text tower: 123,060,480
CLIP_L_PROJ = Component(CLIPTextModelWithProjection, _CLIP_L)  # SD3's text_encoder: 123,650,304
# OpenCLIP ViT-bigG/14 text tower with projection (SDXL's and SD3's text_encoder_2): 694,659,840
CLIP_G_PROJ = Component(CLIPTextModelWithProjection, dict(
    vocab_size=49408, hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
    max_position_embeddings=77, hidden_act="gelu", projection_dim=1280))  # fmt: skip
_IMAGE_VAE = dict(in_channels=3, out_channels=3, block_out_channels=(128, 256, 512, 512), layers_per_block=2,
                  down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                  norm_num_groups=32, sample_size=1024)  # fmt: skip
# 16-channel VAEs without quant convs: 83,819,683 each; SDXL's 4-channel one with them: 83,653,863
_VAE_16 = dict(_IMAGE_VAE, latent_channels=16, use_quant_conv=False, use_post_quant_conv=False)
SD3_VAE = Component(AutoencoderKL, dict(_VAE_16, scaling_factor=1.5305, shift_factor=0.0609))
FLUX_VAE = Component(AutoencoderKL, dict(_VAE_16, scaling_factor=0.3611, shift_factor=0.1159))
SDXL_VAE = Component(AutoencoderKL, dict(_IMAGE_VAE, latent_channels=4, scaling_factor=0.13025))


def _cogvideox_vae(scaling_factor: float, **extra: Any) -> Component:
    # THUDM/CogVideoX-{2b,5b} vae/config.json (same shape, own scaling factor): 215,583,907
    return Component(AutoencoderKLCogVideoX, dict(
        in_channels=3, out_channels=3, latent_channels=16, block_out_channels=(128, 256, 256, 512), layers_per_block=3,
        norm_num_groups=32, temporal_compression_ratio=4, down_block_types=("CogVideoXDownBlock3D",) * 4,
        up_block_types=("CogVideoXUpBlock3D",) * 4, use_quant_conv=False, use_post_quant_conv=False,
        scaling_factor=scaling_factor, **extra))  # fmt: skip


def _cogvideox(heads: int, layers: int, rotary: bool) -> Component:
    # THUDM/CogVideoX-{2b,5b} transformer/config.json
    return Component(CogVideoXTransformer3DModel, dict(
        num_attention_heads=heads, attention_head_dim=64, num_layers=layers, in_channels=16, out_channels=16,
        time_embed_dim=512, text_embed_dim=4096, max_text_seq_length=226, patch_size=2, sample_height=60,
        sample_width=90, sample_frames=49, temporal_compression_ratio=4,
        use_rotary_positional_embeddings=rotary))  # fmt: skip


def _flux(guidance: bool) -> Component:
    # black-forest-labs/FLUX.1-{dev,schnell} transformer/config.json; schnell is distilled without guidance input
    return Component(FluxTransformer2DModel, dict(
        patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
        num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=guidance,
        axes_dims_rope=(16, 56, 56)))  # fmt: skip


def _sd3(layers: int, caption_dim: int, **extra: Any) -> Component:
    # stabilityai/stable-diffusion-3{,.5}-*-diffusers transformer/config.json: heads = layers, 64 per head
    return Component(SD3Transformer2DModel, dict(
        sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=layers, attention_head_dim=64,
        num_attention_heads=layers, joint_attention_dim=4096, caption_projection_dim=caption_dim,
        pooled_projection_dim=2048, pos_embed_max_size=192, **extra))  # fmt: skip


# stabilityai/stable-diffusion-xl-base-1.0 unet/config.json
SDXL_UNET = Component(UNet2DConditionModel, dict(
    sample_size=128, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"), transformer_layers_per_block=(1, 2, 10),
    attention_head_dim=(5, 10, 20), cross_attention_dim=2048, use_linear_projection=True, norm_num_groups=32,
    addition_embed_type="text_time", addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816))  # fmt: skip

_SD3_TEXT = {"text_encoder": CLIP_L_PROJ, "text_encoder_2": CLIP_G_PROJ, "text_encoder_3": T5_XXL}
_FLUX_TEXT = {"text_encoder": CLIP_L, "text_encoder_2": T5_XXL}

_VARIANTS: dict[str, dict[str, Variant]] = {}


def register_variant(variant: Variant) -> Variant:
    """Add a named variant; names are unique across families so `known_variants()` is unambiguous."""
    if variant.name == TINY or any(variant.name in v for v in _VARIANTS.values()):
        raise ValueError(f"model variant {variant.name!r} is registered twice")
    _VARIANTS.setdefault(variant.family, {})[variant.name] = variant
    return variant


# Published figures. A card's "2B"/"12B" is rounded, so `published` is the exact count of the released
# weights where one is public, and the comment says where it comes from.
for _v in (
    # CogVideoX-2B: the card names it "2B" (no exact count found there). 1,693,783,872 is the element count
    # of the released THUDM/CogVideoX-2b transformer safetensors.
    Variant("cogvideox", "cogvideox-2b", {"transformer": _cogvideox(30, 30, rotary=False),
            "text_encoder": T5_XXL, "vae": _cogvideox_vae(1.15258426)},
            1_693_783_872, "2B (model name)", "THUDM/CogVideoX-2b released transformer weights"),
    # CogVideoX-5B: named "5B"; 5,570,283,072 trainable parameters is what huggingface/finetrainers'
    # docs/models/cogvideox.md logs for a full finetune of THUDM/CogVideoX-5b.
    Variant("cogvideox", "cogvideox-5b", {"transformer": _cogvideox(48, 42, rotary=True),
            "text_encoder": T5_XXL, "vae": _cogvideox_vae(0.7)},
            5_570_283_072, "5B (model name)", "finetrainers docs/models/cogvideox.md, full finetune of CogVideoX-5b"),
    # SD3 Medium: the model card says "2 billion parameter" MMDiT (rounded); 2,028,328,000 is the loaded
    # transformer of stabilityai/stable-diffusion-3-medium-diffusers (public profiling logs).
    Variant("sd3", "sd3-medium", {"transformer": _sd3(24, 1536), **_SD3_TEXT, "vae": SD3_VAE},
            2_028_328_000, "2B", "SD3 Medium model card (2B); exact: released transformer weights"),
    # SD3.5 Large: Stability AI's release announcement gives 8.1 billion parameters; no exact count found,
    # so the test compares against 8.1B (the build gives 8.057B, 0.5% under: inside the rounding of "8.1B").
    # QK RMS-norm, no MMDiT-X dual-attention layers (those are 3.5 Medium's).
    Variant("sd3", "sd3.5-large", {"transformer": _sd3(38, 2432, qk_norm="rms_norm"), **_SD3_TEXT,
            "vae": SD3_VAE}, 8_100_000_000, "8.1B", "Stability AI SD3.5 announcement (Oct 2024)"),
    # FLUX.1 [dev]/[schnell]: the model cards say "12 billion parameter" (rounded). Exact: 11,901,408,320 is
    # the safetensors parameter total of flux1-dev.safetensors on the Hugging Face Hub ("11.9B params");
    # schnell lacks dev's guidance embedder, 11,891,178,560 in its released single-file transformer.
    Variant("flux", "flux.1-dev", {"transformer": _flux(guidance=True), **_FLUX_TEXT, "vae": FLUX_VAE},
            11_901_408_320, "12B", "FLUX.1 [dev] model card (12B); exact: HF Hub safetensors metadata (11.9B)"),
    Variant("flux", "flux.1-schnell", {"transformer": _flux(guidance=False), **_FLUX_TEXT, "vae": FLUX_VAE},
            11_891_178_560, "12B", "FLUX.1 [schnell] model card (12B); exact: released transformer weights"),
    # SDXL base 1.0: the SDXL paper (Podell et al. 2023, Table 1) gives 2.6B UNet parameters; 2,567,463,684
    # is the released unet/ weights (public training logs, e.g. "unet params = 2567463684").
    Variant("sdxl", "sdxl-base-1.0", {"unet": SDXL_UNET, "text_encoder": CLIP_L, "text_encoder_2": CLIP_G_PROJ,
            "vae": SDXL_VAE}, 2_567_463_684, "2.6B", "SDXL paper Table 1 (2.6B UNet); exact: released unet weights"),
):  # fmt: skip
    register_variant(_v)

# ---- understanding and speech families: one transformers model each ------------------------------
_QWEN2_VISION = dict(depth=32, embed_dim=1280, num_heads=16, mlp_ratio=4, patch_size=14, spatial_merge_size=2,
                     temporal_patch_size=2, in_channels=3)  # fmt: skip


def _qwen2_vl(vocab: int, hidden: int, ffn: int, heads: int, kv: int, tied: bool, layers: int = 28) -> Component:
    text = dict(vocab_size=vocab, hidden_size=hidden, intermediate_size=ffn, num_hidden_layers=layers,
                num_attention_heads=heads, num_key_value_heads=kv, tie_word_embeddings=tied,
                rope_scaling={"type": "mrope", "mrope_section": [16, 24, 24]})  # fmt: skip
    return Component(Qwen2VLForConditionalGeneration, dict(
        text_config=text, vision_config=dict(_QWEN2_VISION, hidden_size=hidden), tie_word_embeddings=tied))  # fmt: skip


def _whisper(vocab: int, mels: int, width: int, layers: int, heads: int) -> Component:
    return Component(WhisperForConditionalGeneration, dict(
        vocab_size=vocab, num_mel_bins=mels, d_model=width, encoder_layers=layers, decoder_layers=layers,
        encoder_attention_heads=heads, decoder_attention_heads=heads, encoder_ffn_dim=4 * width,
        decoder_ffn_dim=4 * width, max_source_positions=1500, max_target_positions=448))  # fmt: skip


def _llava(hidden: int, ffn: int, layers: int, heads: int) -> Component:
    # llava-hf/llava-1.5-*-hf config.json: CLIP ViT-L/14-336 (features of the second-to-last layer) + Vicuna
    return Component(LlavaForConditionalGeneration, dict(
        vision_config=dict(model_type="clip_vision_model", hidden_size=1024, intermediate_size=4096,
                           num_hidden_layers=24, num_attention_heads=16, image_size=336, patch_size=14,
                           projection_dim=768),
        text_config=dict(model_type="llama", vocab_size=32064, hidden_size=hidden, intermediate_size=ffn,
                         num_hidden_layers=layers, num_attention_heads=heads),
        image_token_index=32000, vision_feature_layer=-2))  # fmt: skip


# Exact counts: the safetensors parameter totals the Hugging Face Hub shows for each released checkpoint
# (the cards round them: "7B", "2B", "large"); each build here reproduces them to the parameter.
for _v in (
    # Qwen/Qwen2-VL-7B-Instruct: Hub "8.29B params" (8,291,375,616); the name says 7B (the language model).
    Variant("qwen2_vl", "qwen2-vl-7b", {MODEL: _qwen2_vl(152064, 3584, 18944, 28, 4, tied=False)},
            8_291_375_616, "7B (model name)", "Qwen/Qwen2-VL-7B-Instruct on the HF Hub: 8.29B params"),
    # Qwen/Qwen2-VL-2B-Instruct: Hub "2.21B params" (2,208,985,600), tied embeddings.
    Variant("qwen2_vl", "qwen2-vl-2b", {MODEL: _qwen2_vl(151936, 1536, 8960, 12, 2, tied=True)},
            2_208_985_600, "2B (model name)", "Qwen/Qwen2-VL-2B-Instruct on the HF Hub: 2.21B params"),
    # Qwen/Qwen2-VL-72B-Instruct config.json (80 layers, 8192 wide, 64 heads, 8 kv heads, 29568 ffn, vocab 152064,
    # untied); Hub "73.4B params", which the build gives (73,405,560,320); the name says 72B (the language model).
    Variant("qwen2_vl", "qwen2-vl-72b", {MODEL: _qwen2_vl(152064, 8192, 29568, 64, 8, tied=False, layers=80)},
            73_405_560_320, "72B (model name)", "Qwen/Qwen2-VL-72B-Instruct on the HF Hub: 73.4B params"),
    # llava-hf/llava-1.5-7b-hf: CLIP ViT-L/14 at 336 px + Vicuna-7B + 2-layer MLP projector; Hub "7.06B".
    Variant("llava", "llava-1.5-7b", {MODEL: _llava(4096, 11008, 32, 32)},
        7_063_427_072, "7B (model name)", "llava-hf/llava-1.5-7b-hf on the HF Hub: 7.06B params"),
    # llava-hf/llava-1.5-13b-hf: the same tower and projector + Vicuna-13B (5120 wide, 40 layers, 40 heads, 13824
    # ffn); Hub "13.4B params" (rounded; the build gives 13,351,494,656).
    Variant("llava", "llava-1.5-13b", {MODEL: _llava(5120, 13824, 40, 40)},
        13_400_000_000, "13B (model name)", "llava-hf/llava-1.5-13b-hf on the HF Hub: 13.4B params"),
    # openai/whisper-large-v3: 128 mel bins, 51866 tokens; Hub "1.54B params" (the paper's large: 1550M).
    Variant("whisper", "whisper-large-v3", {MODEL: _whisper(51866, 128, 1280, 32, 20)},
            1_543_490_560, "1550M (paper, large)", "openai/whisper-large-v3 on the HF Hub: 1.54B params"),
    # openai/whisper-small: Hub "242M params" (the paper's small: 244M).
    Variant("whisper", "whisper-small", {MODEL: _whisper(51865, 80, 768, 12, 12)},
            241_734_912, "244M (paper, small)", "openai/whisper-small on the HF Hub: 242M params"),
):  # fmt: skip
    register_variant(_v)


def known_variants(family: str | None = None) -> list[str]:
    """Names `get_variant` takes: "tiny" (every family's preset) then the family's real variants;
    with no family, every name any family takes."""
    if family is None:
        return [TINY] + sorted(n for f in known_families() for n in _VARIANTS.get(f, {}))
    get_family(family)  # unknown family -> ValueError listing the known ones
    return [TINY] + sorted(_VARIANTS.get(family, {}))


def get_variant(family: str, name: str) -> Variant:
    known = known_variants(family)
    if name not in known:
        raise ValueError(f"unknown {family} variant {name!r}; known variants: {', '.join(known)}")
    return _VARIANTS[family][name] if name != TINY else Variant(family, TINY)


def build_on_meta(family: str, name: str) -> dict[str, nn.Module]:
    """Every component of the variant on the meta device: real shapes, no memory, no weights."""
    variant = get_variant(family, name)
    with torch.device("meta"):
        if name == TINY:
            return _build_tiny(family)
        return {part: comp.build() for part, comp in variant.components.items()}


def _build_tiny(family: str) -> dict[str, nn.Module]:
    """`preset: tiny` through the family's own loaders; the denoiser's text width is measured by
    encoding a caption (shapes only, on meta), the way the trainer reads it off the cached embeddings."""
    fam, cfg = get_family(family), ModelConfig(family=family)
    if not fam.can(Capability.LATENTS):  # one transformers model: vision/audio tower and decoder inside
        return {MODEL: fam.load_transformer(cfg)}
    vae = fam.load_vae(cfg)
    tokenizer, encoder = fam.load_text_encoder(cfg)
    text = fam.encode_text(tokenizer, encoder, ["a"], 8)
    text = text["text_embeds"] if isinstance(text, dict) else text
    # OpenSoraPlan's VAEs: an attribute; Wan's AutoencoderKLWan: `z_dim`
    channels = getattr(vae.config, "latent_channels", None) or getattr(vae.config, "z_dim", None) or vae.latent_channels
    denoiser = fam.load_transformer(cfg, text.shape[-1], channels)
    parts: dict[str, nn.Module] = {fam.denoiser_subfolder: denoiser}
    if isinstance(encoder, nn.ModuleList):  # image families: one encoder per pipeline text part
        parts.update({p[0]: enc for p, enc in zip(fam.text_parts, encoder, strict=True)})
    else:
        parts["text_encoder"] = encoder
    parts["vae"] = vae
    return parts


def parameter_counts(family: str, name: str) -> dict[str, Any]:
    """{"family", "variant", "parameters": trainable denoiser total, "components": {part: count}}
    plus the published figure and its source for real variants."""
    parts = build_on_meta(family, name)
    variant = get_variant(family, name)
    denoiser = parts[_trained_part(family)]
    return {
        "family": family,
        "variant": name,
        "parameters": sum(p.numel() for p in denoiser.parameters() if p.requires_grad),
        "components": {part: sum(p.numel() for p in m.parameters()) for part, m in parts.items()},
        "denoiser": type(denoiser).__name__,
        "parallel_plans": get_family(family).parallel_plans(denoiser),
        "published": variant.published,
        "published_as": variant.published_as,
        "source": variant.source,
    }


def family_summary(family: str) -> dict[str, Any]:
    """What a family can be trained for, read off the family and its tiny build rather than declared:
    t2v when the VAE takes multi-frame clips, pretrain when a random-init preset builds, finetune
    when the denoiser loads `pretrained:` weights, lora when its default LoRA targets exist in it."""
    fam = get_family(family)
    denoiser = _build_tiny_denoiser(family)
    modules = [n for n, _ in denoiser.named_modules()]
    if fam.can(Capability.TOKEN_LOSS):  # what its data is: conversations about media, or speech
        kind = "asr" if fam.can(Capability.TRANSCRIPTION) else "sft(" + "+".join(fam.media) + ")"
        tasks = [kind, "pretrain"]
    elif fam.can(Capability.GENERATION) and fam.conditioning == "image":  # image-to-video: a first frame conditions
        tasks = ["i2v", "pretrain"]
    else:
        tasks = ["t2v" if fam.frame_count_error(fam.temporal_compression + 1) is None else "t2i", "pretrain"]
    if hasattr(type(denoiser), "from_pretrained"):
        tasks.append("finetune")
    if fam.lora_targets:  # apply_lora adapts any torch module (peft injection where no adapter API exists)
        if all(any(n.endswith(t) for n in modules) for t in fam.lora_targets):
            tasks.append("lora")
    return {"family": family, "denoiser": type(denoiser).__name__, "tasks": tasks, "variants": known_variants(family)}


def _build_tiny_denoiser(family: str) -> nn.Module:
    return build_on_meta(family, TINY)[_trained_part(family)]


def _trained_part(family: str) -> str:
    """The component a run trains: the denoiser's pipeline subfolder, or the whole model."""
    return get_family(family).denoiser_subfolder or MODEL


# ---- InternVL (transformers-native OpenGVLab `-hf` conversions) ----------------------------------

for _v in (
    # OpenGVLab/InternVL3-1B-hf config.json: InternViT-300M-448px-V2.5 (qkv bias, layer scale, LayerNorm) +
    # pixel shuffle 0.5 + MLP projector + Qwen2.5-0.5B (vocab 151674 with InternVL's tokens), lm_head kept
    # separate from the embeddings. The build gives 938,193,024. Published figure, rounded (the test allows 1%):
    # the Hub shows "938M params" for OpenGVLab/InternVL2-1B (a copy of its weights), the same shapes but a
    # few vocabulary rows fewer; InternVL3-1B-hf's own count could not be read here, but its 1.88 GB BF16
    # model.safetensors (Hub file listing) fits 938M (a tied lm_head would be 802M, 1.60 GB). Card: "1B".
    Variant("internvl", "internvl3-1b", {MODEL: Component(InternVLForConditionalGeneration, dict(
        vision_config=dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                           image_size=448, patch_size=14, attention_bias=True, use_qk_norm=False,
                           norm_type="layer_norm", layer_scale_init_value=0.1, use_mean_pooling=True),
        text_config=dict(model_type="qwen2", vocab_size=151674, hidden_size=896, intermediate_size=4864,
                         num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
                         max_position_embeddings=32768, tie_word_embeddings=False, bos_token_id=151643,
                         eos_token_id=151645),
        image_token_id=151667, image_seq_length=256, downsample_ratio=0.5, tie_word_embeddings=False))},
        938_000_000, "1B (model name)",
        "938M: the Hub's rounded count for InternVL2-1B (same shapes); InternVL3-1B-hf weights: 1.88 GB BF16"),
):  # fmt: skip
    register_variant(_v)

# ---- InternVL2, the original remote-code releases (engines/models/internvl_remote.py) -----------------------------
# InternViT-300M-448px (qkv bias, LayerNorm) or InternViT-6B-448px-V1-5 (its config.json: 3200 wide, 45 layers, 25
# heads, 12800 ffn, no qkv bias, RMS q/k norm and RMSNorm) + pixel shuffle 0.5 + MLP + the LLM of the InternVL README's
# model table: internlm2-chat-1_8b, internlm2_5-7b-chat, internlm2-chat-20b, Hermes-2-Theta-Llama-3-70B. InternLM2 is
# Llama's computation under other names (fused wqkv), so transformers' InternVL class with a Llama text config holds
# exactly the release's parameters; OriginalLayoutInternVL names them as the release does. Vocabularies: the base LLM's
# plus the 9 tokens internvl_chat_finetune.py adds (92544 + 9, 128256 + 9). Counts: the model cards' "Model Size"
# rows (rounded: 2.2B, 8.1B, 25.5B, 76B); OpenGVLab's own InternVLChatModel built on meta from these configs gives
# 2,205,754,368 / 8,075,365,376 / 25,514,186,112 / 76,262,358,400, equal to these builds
# (docs/fidelity/ref_vlm_tables.py).
_VIT_300M = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                 image_size=448, patch_size=14, attention_bias=True, use_qk_norm=False, norm_type="layer_norm",
                 layer_scale_init_value=0.1, use_mean_pooling=True)  # fmt: skip
_VIT_6B = dict(_VIT_300M, hidden_size=3200, intermediate_size=12800, num_hidden_layers=45, num_attention_heads=25,
               attention_bias=False, use_qk_norm=True, norm_type="rms_norm")  # fmt: skip


def _internvl2(vision: dict[str, Any], vocab: int, hidden: int, ffn: int, layers: int, heads: int) -> Component:
    from flowspeed.engines.models.internvl_remote import OriginalLayoutInternVL, OriginalLayoutInternVLLlama

    cls = OriginalLayoutInternVLLlama if vocab > 100_000 else OriginalLayoutInternVL  # Llama-3's vocabulary
    return Component(cls, dict(
        vision_config=vision, image_seq_length=256, downsample_ratio=0.5, tie_word_embeddings=False,
        text_config=dict(model_type="llama", vocab_size=vocab, hidden_size=hidden, intermediate_size=ffn,
                         num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=8,
                         tie_word_embeddings=False)))  # fmt: skip


for _v in (
    Variant("internvl", "internvl2-2b", {MODEL: _internvl2(_VIT_300M, 92553, 2048, 8192, 24, 16)},
            2_200_000_000, "2.2B (model card)", "OpenGVLab/InternVL2-2B model card: Model Size 2.2B"),
    Variant("internvl", "internvl2-8b", {MODEL: _internvl2(_VIT_300M, 92553, 4096, 14336, 32, 32)},
            8_100_000_000, "8.1B (model card)", "OpenGVLab/InternVL2-8B model card: Model Size 8.1B"),
    Variant("internvl", "internvl2-26b", {MODEL: _internvl2(_VIT_6B, 92553, 6144, 16384, 48, 48)},
            25_500_000_000, "26B (model name)",
            "25.5B: Model Size of InternVL-Chat-V1-5 (same tower + internlm2-chat-20b) in the InternVL2-8B card"),
    Variant("internvl", "internvl2-76b", {MODEL: _internvl2(_VIT_6B, 128265, 8192, 28672, 80, 64)},
            76_000_000_000, "76B (model card)", "OpenGVLab/InternVL2-Llama3-76B model card: Model Size 76B"),
):  # fmt: skip
    register_variant(_v)


# ---- InternVL3.5, the transformers-native OpenGVLab/InternVL3_5-*-HF releases (engines/models/internvl.py) ------
# OpenGVLab's -HF conversion: InternViT-300M-448px-V2.5 (the 6B tower for 38B) + pixel shuffle 0.5 + MLP + the
# original release's llm_config, i.e. Qwen3's config.json (Qwen3-0.6B, -1.7B, -4B, -8B, -14B, -32B, -30B-A3B:
# vocab 151936, head_dim 128, rope_theta 1e6, an untied lm_head even where the Qwen3 base ties it: 2.35B needs
# it), image_token_id 151671, image_seq_length 256. Published totals: the InternVL3.5 model cards' / report's
# table, "#Total Param" 1.06B, 2.35B, 4.73B, 8.53B, 15.12B, 38.40B, 30.85B (A3B); for 1B the stored
# InternVL3_5-1B-HF checkpoint counts 1,060,897,792 (304,012,288 vision + 751,632,384 language + 5,253,120
# projector, quoted on GitHub), which this build equals exactly. Builds: 2,348,347,392 / 4,732,489,216 /
# 8,528,318,464 / 15,119,523,840 / 38,390,405,504 / 30,848,730,112.
def _internvl35(vision: dict[str, Any], hidden: int, ffn: int, layers: int, heads: int, kv: int,
                **moe: Any) -> Component:  # fmt: skip
    text = dict(model_type="qwen3_moe" if moe else "qwen3", vocab_size=151936, hidden_size=hidden,
                intermediate_size=ffn, num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv,
                head_dim=128, max_position_embeddings=40960, rope_theta=1_000_000.0, tie_word_embeddings=False,
                bos_token_id=151643, eos_token_id=151645, **moe)  # fmt: skip
    return Component(InternVLForConditionalGeneration, dict(
        vision_config=vision, text_config=text, image_token_id=151671, image_seq_length=256, downsample_ratio=0.5,
        tie_word_embeddings=False))  # fmt: skip


for _v in (
    Variant("internvl", "internvl3.5-1b", {MODEL: _internvl35(_VIT_300M, 1024, 3072, 28, 16, 8)},
            1_060_897_792, "1.06B (model card)", "InternVL3_5-1B-HF safetensors: 1,060,897,792 parameters"),
    Variant("internvl", "internvl3.5-2b", {MODEL: _internvl35(_VIT_300M, 2048, 6144, 28, 16, 8)},
            2_350_000_000, "2.35B (model card)", "InternVL3.5 model card table: #Total Param 2.35B"),
    Variant("internvl", "internvl3.5-4b", {MODEL: _internvl35(_VIT_300M, 2560, 9728, 36, 32, 8)},
            4_730_000_000, "4.73B (model card)", "InternVL3.5 model card table: #Total Param 4.73B"),
    Variant("internvl", "internvl3.5-8b", {MODEL: _internvl35(_VIT_300M, 4096, 12288, 36, 32, 8)},
            8_530_000_000, "8.53B (model card)", "InternVL3.5 model card table: #Total Param 8.53B"),
    Variant("internvl", "internvl3.5-14b", {MODEL: _internvl35(_VIT_300M, 5120, 17408, 40, 40, 8)},
            15_120_000_000, "15.12B (model card)", "InternVL3.5 model card table: #Total Param 15.12B"),
    Variant("internvl", "internvl3.5-38b", {MODEL: _internvl35(_VIT_6B, 5120, 25600, 64, 64, 8)},
            38_400_000_000, "38.40B (model card)", "InternVL3.5 model card table: #Total Param 38.40B"),
    Variant("internvl", "internvl3.5-30b-a3b", {MODEL: _internvl35(
        _VIT_300M, 2048, 6144, 48, 32, 4, num_experts=128, num_experts_per_tok=8, moe_intermediate_size=768,
        decoder_sparse_step=1, norm_topk_prob=True)},
            30_850_000_000, "30.85B-A3B (model card)", "InternVL3.5 model card table: #Total Param 30.85B"),
):  # fmt: skip
    register_variant(_v)

# ---- CogVideoX image-to-video and 1.5 (engines/models/cogvideox_i2v.py, cogvideox15.py) ------------
# CogVideoX-5B's transformer with what the I2V and 1.5 transformer/config.json files change: 32 input
# channels (noisy + image latents), 5B-I2V's learned positional table, 1.5's temporal patches of 2
# without patch bias (RoPE sliced from a 300x300 latent grid) and 1.5 I2V's 512-wide ofs embedding.
_COGVIDEOX15 = dict(patch_size_t=2, patch_bias=False, sample_height=300, sample_width=300, sample_frames=81)
_COGVIDEOX_5B_REST = {"text_encoder": T5_XXL, "vae": _cogvideox_vae(0.7)}  # T5-XXL; the 1.5 VAE is 5B's
# ... with `invert_scale_latents` set (diffusers scripts/convert_cogvideox_to_diffusers.py, version 1.5): the I2V
# pipeline divides its image latent by the scaling factor instead of multiplying.
_COGVIDEOX15_REST = {"text_encoder": T5_XXL, "vae": _cogvideox_vae(0.7, invert_scale_latents=True)}


def _cogvideox_5b(in_channels: int, **changes: Any) -> Component:
    return Component(CogVideoXTransformer3DModel, {**_cogvideox(48, 42, rotary=True).kwargs,
                                                   "in_channels": in_channels, **changes})  # fmt: skip


# No exact counts are published; the cards say "5B". `published` is read off the released transformer
# shards on the Hugging Face Hub (bf16, 2 bytes a tensor element; sizes in GB shown to 3 digits, so
# +-7.5M elements).
for _v in (
    # THUDM/CogVideoX-5b-I2V: 4.99 + 4.99 + 1.27 GB = 5.625B elements, of which 1 x (226 + 13*30*45) x 3072 =
    # 54,607,872 are the learned positional table diffusers keeps as a buffer: 5.570B parameters.
    Variant("cogvideox_i2v", "cogvideox-5b-i2v",
            {"transformer": _cogvideox_5b(32, use_learned_positional_embeddings=True), **_COGVIDEOX_5B_REST},
            5_570_000_000, "5B (model name)",
            "THUDM/CogVideoX-5b-I2V transformer shards (11.25 GB bf16) less the positional table"),
    # THUDM/CogVideoX1.5-5B and CogVideoX1.5-5B-I2V: 4.98 + 4.95 + 1.22 GB = 5.575B elements each (the
    # CogVideoX1.5-5B-SAT card: the VAE is unchanged from CogVideoX-5B).
    Variant("cogvideox1.5", "cogvideox1.5-5b", {"transformer": _cogvideox_5b(16, **_COGVIDEOX15), **_COGVIDEOX15_REST},
            5_575_000_000, "5B (model name)",
            "THUDM/CogVideoX1.5-5B transformer shards (11.15 GB bf16)"),
    Variant("cogvideox_i2v", "cogvideox1.5-5b-i2v",
            {"transformer": _cogvideox_5b(32, ofs_embed_dim=512, **_COGVIDEOX15), **_COGVIDEOX15_REST},
            5_575_000_000, "5B (model name)",
            "THUDM/CogVideoX1.5-5B-I2V transformer shards (11.15 GB bf16)"),
):  # fmt: skip
    register_variant(_v)

# ---- Hunyuan-DiT and Kolors (engines/models/hunyuandit.py, kolors.py) -------------------------------


class _ChatGLMOnMeta(ChatGLMModel):
    """ChatGLMModel's default `empty_init` builds through torch.nn.utils.skip_init, which materialises every
    weight on the CPU (25 GB for ChatGLM3-6B) even under the meta device; `default_init` stays on meta."""

    def __init__(self, config: Any) -> None:
        super().__init__(config, empty_init=False)


for _v in (
    # Tencent-Hunyuan/HunyuanDiT-v1.2-Diffusers transformer/config.json (DiT-g/2: 40 blocks, 1408 wide, 16 x 88
    # heads, mlp 4.3637, learned sigma; v1.2 drops the size/style conditions). The Tencent/HunyuanDiT README
    # model table gives "1.5B" for v1.0-v1.2 (no exact count found); the build gives 1,499,952,032.
    # Text towers sized as the README's table: bilingual CLIP as BertModel (1024 wide, 24 layers, vocab 47020:
    # 352M, "350M") and the mT5-XL encoder loaded as T5EncoderModel (1.67B, "1.6B"); VAE sdxl-vae-fp16-fix.
    Variant("hunyuandit", "hunyuandit-v1.2", {"transformer": Component(HunyuanDiT2DModel, dict(
        in_channels=4, patch_size=2, sample_size=128, hidden_size=1408, num_layers=40, num_attention_heads=16,
        attention_head_dim=88, mlp_ratio=4.3637, learn_sigma=True, activation_fn="gelu-approximate",
        norm_type="layer_norm", cross_attention_dim=1024, cross_attention_dim_t5=2048, pooled_projection_dim=1024,
        text_len=77, text_len_t5=256, use_style_cond_and_image_meta_size=False)),
        "text_encoder": Component(BertModel, dict(vocab_size=47020, hidden_size=1024, num_hidden_layers=24,
                                                  num_attention_heads=16, intermediate_size=4096,
                                                  max_position_embeddings=512, type_vocab_size=2)),
        "text_encoder_2": Component(T5EncoderModel, dict(
            vocab_size=250112, d_model=2048, d_kv=64, d_ff=5120, num_layers=24, num_heads=32,
            feed_forward_proj="gated-gelu", tie_word_embeddings=False)),
        "vae": SDXL_VAE},
        1_500_000_000, "1.5B", "Tencent/HunyuanDiT README model table (Hunyuan-DiT-v1.2: 1.5B)"),
    # Kwai-Kolors/Kolors-diffusers: SDXL's UNet (the Kolors report keeps SDXL's U-Net) with a text_proj from
    # ChatGLM3's 4096 to the 2048-wide cross-attention and a pooled input of 4096 + 6 x 256 = 5632. No count
    # is published for it; SDXL's U-Net is "2.6B" (SDXL paper), and SDXL's released 2,567,463,684 plus the
    # text_proj (8,390,656) and the wider add_embedding (+3,604,480) is 2,579,458,820, what the build gives
    # (0.8% under 2.6B). Text encoder: ChatGLM3-6B-base's config.json (6,243,584,000); VAE: SDXL's.
    Variant("kolors", "kolors", {"unet": Component(UNet2DConditionModel, dict(
        SDXL_UNET.kwargs, encoder_hid_dim=4096, encoder_hid_dim_type="text_proj",
        projection_class_embeddings_input_dim=5632)),
        "text_encoder": Component(_ChatGLMOnMeta, dict(
            num_layers=28, padded_vocab_size=65024, hidden_size=4096, ffn_hidden_size=13696, kv_channels=128,
            num_attention_heads=32, seq_length=32768, multi_query_attention=True, multi_query_group_num=2,
            add_bias_linear=False, add_qkv_bias=True, rmsnorm=True, post_layer_norm=True, original_rope=True)),
        "vae": SDXL_VAE},
        2_600_000_000, "2.6B (SDXL's U-Net)", "SDXL paper Table 1 (2.6B U-Net), which Kolors keeps"),
):  # fmt: skip
    register_variant(_v)


# ---- the video DiTs flowspeed defines (engines/models/dits; families in opensora.py, opensoraplan.py,
# qihoo_t2x.py). Each `published` figure and its source sit beside the model's PRESETS in its dits module; where the
# authors' stated size is rounded or disagrees with their own module tree, that module says so. ----------------------
def _dits_variants() -> list[Variant]:
    from flowspeed.engines.models.dits import causalvae, opensora_vae, opensoraplan, pt_dit, stdit, stdit3, wfvae
    from flowspeed.engines.models.opensora import SD_VAE

    # google/mt5-xxl, encoder only (OpenSoraPlan's text encoder)
    mt5_xxl = Component(
        T5EncoderModel,
        dict(
            vocab_size=250112,
            d_model=4096,
            d_kv=64,
            d_ff=10240,
            num_layers=24,
            num_heads=64,
            feed_forward_proj="gated-gelu",
            tie_word_embeddings=False,
        ),
    )
    wf = Component(wfvae.WFVAEModel, wfvae.PRESETS["wfvae-v1.3"])
    causal = Component(causalvae.CausalVAEModel, causalvae.PRESETS["causalvae-v1.2-488"])

    # how the authors state each size (the exact figure the test holds to, and its source, is in PUBLISHED)
    stated = {"STDiT-XL/2": "724M (README v1.0.0)", "STDiT-XL/2-512": "724M (README v1.0.0)",
              "STDiT3-XL/2": "1.1B (report v1.2)", "OpenSoraT2V-ROPE-L/122": "2.7B (report v1.3)",
              "OpenSoraT2V_v1_3-2B/122": "2.7B (source comment)", "OpenSoraInpaint_v1_3-2B/122": "2.7B + inpaint",
              "Qihoo-T2I-1.1B": "1.1B (MindSpeed-MM README)"}  # fmt: skip

    def dit(family: str, name: str, module: Any, preset: str, cls: type, text: Component, vae: Component) -> Variant:
        count, source = module.PUBLISHED[preset]
        return Variant(family, name, {"transformer": Component(cls, module.PRESETS[preset]), "text_encoder": text,
                                      "vae": vae}, count, stated[preset], f"preset {preset}: {source}")  # fmt: skip

    sd_vae = Component(AutoencoderKL, SD_VAE)
    os_vae = Component(opensora_vae.OpenSoraVAE, opensora_vae.PRESETS["opensora-vae-v1.2"])
    osp = opensoraplan.MODEL_CLASSES
    return [
        dit("opensora", "opensora-v1.0-256", stdit, "STDiT-XL/2", stdit.STDiT, T5_XXL, sd_vae),
        dit("opensora", "opensora-v1.0-512", stdit, "STDiT-XL/2-512", stdit.STDiT, T5_XXL, sd_vae),
        dit("opensora1.2", "opensora-v1.2", stdit3, "STDiT3-XL/2", stdit3.STDiT3, T5_XXL, os_vae),
        dit("opensoraplan", "opensoraplan-v1.2", opensoraplan, "OpenSoraT2V-ROPE-L/122",
            osp["OpenSoraT2V-ROPE-L/122"], mt5_xxl, causal),
        dit("opensoraplan", "opensoraplan-v1.3", opensoraplan, "OpenSoraT2V_v1_3-2B/122",
            osp["OpenSoraT2V_v1_3-2B/122"], mt5_xxl, wf),
        dit("opensoraplan_i2v", "opensoraplan-v1.3-i2v", opensoraplan, "OpenSoraInpaint_v1_3-2B/122",
            osp["OpenSoraInpaint_v1_3-2B/122"], mt5_xxl, wf),
        dit("qihoo_t2x", "qihoo-t2x-1.1b", pt_dit, "Qihoo-T2I-1.1B", pt_dit.PTDiT, T5_XXL, causal),
    ]  # fmt: skip


for _v in _dits_variants():
    register_variant(_v)


# ---- Wan2.1 (engines/models/wan.py) ------------------------------------------------------------------------------
def _umt5_xxl() -> Component:
    """google/umt5-xxl config.json, encoder only (what every Wan release's text_encoder/ holds): 5,680,910,336."""
    from transformers import UMT5EncoderModel

    return Component(UMT5EncoderModel, dict(
        vocab_size=256384, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
        feed_forward_proj="gated-gelu", tie_word_embeddings=False))  # fmt: skip


def _wan_variants() -> list[Variant]:
    from diffusers import AutoencoderKLWan, WanTransformer3DModel

    umt5_xxl = _umt5_xxl()
    # Wan-AI/Wan2.1-*-Diffusers vae/config.json = AutoencoderKLWan's defaults (base_dim 96, z_dim 16, dim_mult
    # [1, 2, 4, 4], 2 res blocks, temporal downsample [False, True, True], Wan's latents_mean/std): 126,892,531
    vae = Component(AutoencoderKLWan, {})

    def wan(dim_heads: int, ffn: int, layers: int) -> Component:
        # transformer/config.json as diffusers' scripts/convert_wan_to_diffusers.py writes it (get_transformer_config)
        return Component(WanTransformer3DModel, dict(
            patch_size=(1, 2, 2), num_attention_heads=dim_heads, attention_head_dim=128, in_channels=16,
            out_channels=16, text_dim=4096, freq_dim=256, ffn_dim=ffn, num_layers=layers, cross_attn_norm=True,
            qk_norm="rms_norm_across_heads", eps=1e-6))  # fmt: skip

    # Exact counts: the authors' WanModel (Wan-Video/Wan2.1@9737cba wan/modules/model.py) built on meta with their
    # wan/configs/wan_t2v_{1_3B,14B}.py (dim 1536 / 5120, ffn 8960 / 13824, 12 / 40 heads, 30 / 40 layers), which
    # is the released checkpoint's layout (docs/fidelity/ref_wan_facts.py); the names say 1.3B and 14B.
    return [
        Variant("wan", "wan2.1-t2v-1.3b", {"transformer": wan(12, 8960, 30), "text_encoder": umt5_xxl, "vae": vae},
                1_418_996_800, "1.3B (model name)", "Wan-Video/Wan2.1 WanModel(t2v_1_3B) built on meta"),
        Variant("wan", "wan2.1-t2v-14b", {"transformer": wan(40, 13824, 40), "text_encoder": umt5_xxl, "vae": vae},
                14_288_491_584, "14B (model name)", "Wan-Video/Wan2.1 WanModel(t2v_14B) built on meta"),
        # Wan2.2 TI2V-5B: Wan-Video/Wan2.2 wan/configs/wan_ti2v_5B.py (dim 3072, ffn 14336, 24 heads, 30 layers) on
        # the 48-channel high-compression VAE (convert_wan_to_diffusers.py `vae22_diffusers_config`: base 160,
        # decoder 256, residual, 2x2 patchified input, 16x spatial): 704,688,668. Its clips need sides that are
        # multiples of 32 (16x VAE x 2x2 patches) and 4k+1 frames; this family trains it text-to-video.
        Variant("wan", "wan2.2-ti2v-5b", {"transformer": Component(WanTransformer3DModel, {
            **wan(24, 14336, 30).kwargs, "in_channels": 48, "out_channels": 48}), "text_encoder": umt5_xxl,
            "vae": Component(AutoencoderKLWan, dict(base_dim=160, decoder_base_dim=256, z_dim=48, is_residual=True,
                                                    in_channels=12, out_channels=12, scale_factor_spatial=16,
                                                    scale_factor_temporal=4, patch_size=2))},
                4_999_787_712, "5B (model name)", "Wan-Video/Wan2.2 WanModel(ti2v_5B) built on meta"),
        # Wan2.2 T2V-A14B: two experts of Wan-Video/Wan2.2@42bf4cf wan/configs/wan_t2v_A14B.py (dim 5120, ffn 13824,
        # 40 heads, 40 layers: each the 14B layout) on the Wan2.1 VAE (`vae_checkpoint = 'Wan2.1_VAE.pth'`); in
        # Wan-AI/Wan2.2-T2V-A14B-Diffusers `transformer/` is the high-noise expert, `transformer_2/` the low-noise one.
        # The README: "Each expert model has about 14B parameters, ... 27B parameters but only 14B active".
        Variant("wan", "wan2.2-t2v-a14b", {"transformer": wan(40, 13824, 40), "transformer_2": wan(40, 13824, 40),
                                           "text_encoder": umt5_xxl, "vae": vae},
                14_288_491_584, "A14B (14B per expert, 27B in all)",
                "Wan-Video/Wan2.2 WanModel(t2v_A14B) built on meta, per expert"),
    ]  # fmt: skip


for _v in _wan_variants():
    register_variant(_v)


# ---- Wan2.1 image-to-video (engines/models/wan_i2v.py) ------------------------------------------------------------
def _wan_i2v_variants() -> list[Variant]:
    from diffusers import AutoencoderKLWan, WanTransformer3DModel
    from transformers import CLIPVisionModelWithProjection

    # diffusers' scripts/convert_wan_to_diffusers.py `"Wan-I2V-14B-480p"` and `"-720p"` (one diffusers_config for both):
    # the 14B block with CLIP features (image_dim 1280) projected to the image keys/values (added_kv_proj_dim 5120)
    # and 36 input channels (16 noisy + 4 frame mask + 16 image latents)
    transformer = Component(WanTransformer3DModel, dict(
        patch_size=(1, 2, 2), num_attention_heads=40, attention_head_dim=128, in_channels=36, out_channels=16,
        text_dim=4096, freq_dim=256, ffn_dim=13824, num_layers=40, cross_attn_norm=True,
        qk_norm="rms_norm_across_heads", eps=1e-6, image_dim=1280, added_kv_proj_dim=5120))  # fmt: skip
    # the conversion's image_encoder: laion/CLIP-ViT-H-14-laion2B-s32B-b79K's vision tower with projection (open_clip
    # ViT-H-14: width 1280, 32 layers, 16 heads of 80, 14 px patches at 224, embed 1024, GELU): 632,076,800
    clip = Component(CLIPVisionModelWithProjection, dict(
        hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=16, patch_size=14,
        image_size=224, projection_dim=1024, hidden_act="gelu"))  # fmt: skip
    parts = {"transformer": transformer, "text_encoder": _umt5_xxl(), "image_encoder": clip,
             "vae": Component(AutoencoderKLWan, {})}  # fmt: skip
    # Exact count: the authors' WanModel(model_type="i2v") (Wan-Video/Wan2.1@9737cba wan/modules/model.py, sized by
    # wan/configs/wan_i2v_14B.py, in_dim 36) built on meta (docs/fidelity/ref_wan_i2v_facts.py); the name says 14B
    # (the T2V 14B plus per-block image keys/values and the CLIP projection: 16.39B). 480P and 720P: one layout.
    return [
        Variant("wan_i2v", f"wan2.1-i2v-14b-{res}", parts, 16_394_878_784, "14B (model name)",
                "Wan-Video/Wan2.1 WanModel(i2v_14B) built on meta")
        for res in ("480p", "720p")
    ]  # fmt: skip


for _v in _wan_i2v_variants():
    register_variant(_v)


# ---- Wan2.2 image-to-video, the I2V-A14B expert pair (engines/models/wan_i2v.py) ----------------------------------
def _wan22_i2v_variants() -> list[Variant]:
    from diffusers import AutoencoderKLWan, WanTransformer3DModel

    # diffusers' scripts/convert_wan_to_diffusers.py "Wan2.2-I2V-14B-720p" (one diffusers_config for both experts):
    # the 14B block, 36 input channels (16 noisy + 4 frame mask + 16 image latents), and NO image embedding
    # (added_kv_proj_dim None, image_dim unset): Wan2.2's I2V has no CLIP; the pipeline has no image_encoder/
    expert = Component(WanTransformer3DModel, dict(
        patch_size=(1, 2, 2), num_attention_heads=40, attention_head_dim=128, in_channels=36, out_channels=16,
        text_dim=4096, freq_dim=256, ffn_dim=13824, num_layers=40, cross_attn_norm=True,
        qk_norm="rms_norm_across_heads", eps=1e-6))  # fmt: skip
    # Exact count per expert: the authors' WanModel(model_type="i2v") (Wan-Video/Wan2.2@42bf4cf wan/modules/model.py,
    # sized by wan/configs/wan_i2v_A14B.py: dim 5120, ffn 13824, 40 heads, 40 layers, in_dim 36) built on meta
    # (docs/fidelity/ref_wan22_facts.py): the T2V 14B plus the patch embedding's 20 extra input channels. On the
    # Wan2.1 VAE and UMT5-XXL (wan_i2v_A14B.py `vae_checkpoint = 'Wan2.1_VAE.pth'`); `transformer/` is the high-noise
    # expert, `transformer_2/` the low-noise one.
    return [
        Variant("wan_i2v", "wan2.2-i2v-a14b", {"transformer": expert, "transformer_2": expert,
                                               "text_encoder": _umt5_xxl(), "vae": Component(AutoencoderKLWan, {})},
                14_288_901_184, "A14B (14B per expert, 27B in all)",
                "Wan-Video/Wan2.2 WanModel(i2v_A14B) built on meta, per expert"),
    ]  # fmt: skip


for _v in _wan22_i2v_variants():
    register_variant(_v)


# ---- LTX-Video (engines/models/ltx.py) ----------------------------------------------------------------------------
def _ltx_variants() -> list[Variant]:
    from diffusers import AutoencoderKLLTXVideo, LTXVideoTransformer3DModel

    # transformer/config.json as diffusers' scripts/convert_ltx_to_diffusers.py `get_transformer_config` writes it (the
    # 2B values are also the authors' DIFFUSERS_TRANSFORMER_CONFIG, Lightricks/LTX-Video utils/diffusers_config_mapping)
    def dit(head_dim: int, cross_dim: int, layers: int) -> Component:
        return Component(LTXVideoTransformer3DModel, dict(
            in_channels=128, out_channels=128, num_attention_heads=32, attention_head_dim=head_dim,
            cross_attention_dim=cross_dim, num_layers=layers, caption_channels=4096))  # fmt: skip

    # the 0.9.7 VAE: get_vae_config("0.9.7") (4 LTXVideo095 down blocks, timestep-conditioned residual decoder)
    vae_097 = Component(AutoencoderKLLTXVideo, dict(
        block_out_channels=(128, 256, 512, 1024, 2048), down_block_types=("LTXVideo095DownBlock3D",) * 4,
        decoder_block_out_channels=(256, 512, 1024), layers_per_block=(4, 6, 6, 2, 2),
        decoder_layers_per_block=(5, 5, 5, 5), spatio_temporal_scaling=(True, True, True, True),
        decoder_spatio_temporal_scaling=(True, True, True), decoder_inject_noise=(False, False, False, False),
        downsample_type=("spatial", "temporal", "spatiotemporal", "spatiotemporal"),
        upsample_residual=(True, True, True), upsample_factor=(2, 2, 2), timestep_conditioning=True,
        spatial_compression_ratio=32, temporal_compression_ratio=8))  # fmt: skip
    # Exact counts: the authors' Transformer3DModel built on meta (docs/fidelity/ref_ltx_facts.py): the 2B from their
    # own OURS_TRANSFORMER_CONFIG, the 13B at the conversion's 0.9.7 sizes; the names say 2B and 13B.
    return [
        # Lightricks/LTX-Video (0.9.0, diffusers folders): the VAE is AutoencoderKLLTXVideo's defaults =
        # get_vae_config("0.9.0") (patch 4, 3 spatio-temporal downsamples: 32x / 8x), 419,193,649
        Variant("ltx", "ltx-video-2b-v0.9", {"transformer": dit(64, 2048, 28), "text_encoder": T5_XXL,
                                             "vae": Component(AutoencoderKLLTXVideo, {})},
                1_923_385_472, "2B (model name)", "Lightricks/LTX-Video Transformer3DModel (2B config) built on meta"),
        Variant("ltx", "ltx-video-13b-v0.9.7", {"transformer": dit(128, 4096, 48), "text_encoder": T5_XXL,
                                                "vae": vae_097},
                13_042_569_344, "13B (model name)", "Lightricks/LTX-Video Transformer3DModel (0.9.7 sizes) on meta"),
    ]  # fmt: skip


for _v in _ltx_variants():
    register_variant(_v)


# ---- HunyuanVideo 1.5 (engines/models/hunyuanvideo15.py) ----------------------------------------------------------
def _hunyuanvideo15_variants() -> list[Variant]:
    from diffusers import AutoencoderKLHunyuanVideo15, HunyuanVideo15Transformer3DModel
    from transformers import Qwen2_5_VLTextModel

    # transformer/config.json as diffusers' scripts/convert_hunyuan_video1_5_to_diffusers.py writes it
    # (TRANSFORMER_CONFIGS["480p_t2v"]): 54 dual-stream blocks of 16 x 128, 65 input channels (latent, condition
    # latent, mask), Qwen2.5-VL states 3584 wide, ByT5 1472, SigLIP 1152
    transformer = Component(HunyuanVideo15Transformer3DModel, dict(
        in_channels=65, out_channels=32, num_attention_heads=16, attention_head_dim=128, num_layers=54,
        num_refiner_layers=2, mlp_ratio=4.0, patch_size=1, patch_size_t=1, qk_norm="rms_norm", text_embed_dim=3584,
        text_embed_2_dim=1472, image_embed_dim=1152, rope_theta=256.0, rope_axes_dim=(16, 56, 56),
        use_meanflow=False, target_size=640, task_type="t2v"))  # fmt: skip
    # the conversion's `AutoencoderKLHunyuanVideo15()`: its defaults (32 latent channels, 16x / 4x), 1,260,634,115
    vae = Component(AutoencoderKLHunyuanVideo15, {})
    # Qwen/Qwen2.5-VL-7B-Instruct config.json, the language model (the conversion's `load_mllm`): 7,070,619,136.
    # The ByT5 glyph encoder (text_encoder_2: byt5-small plus Glyph-SDXL-v2's color/font tokens, whose count is in
    # asset files not read here) is left out of the variant; see docs/fidelity/ref_hunyuanvideo15_facts.py.
    qwen = Component(Qwen2_5_VLTextModel, dict(
        vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
        num_key_value_heads=4, rms_norm_eps=1e-6, max_position_embeddings=128000, tie_word_embeddings=False,
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [16, 24, 24]}))  # fmt: skip
    # Exact count: the authors' HunyuanVideo_1_5_DiffusionTransformer built on meta at the 480p_t2v sizes
    # (docs/fidelity/ref_hunyuanvideo15_facts.py): 8,326,608,160; their README: "only 8.3 billion parameters".
    return [
        Variant("hunyuanvideo15", "hunyuanvideo1.5-t2v-480p",
                {"transformer": transformer, "text_encoder": qwen, "vae": vae}, 8_326_608_160, "8.3B (README)",
                "Tencent-Hunyuan/HunyuanVideo-1.5 HunyuanVideo_1_5_DiffusionTransformer (480p_t2v) built on meta"),
    ]  # fmt: skip


for _v in _hunyuanvideo15_variants():
    register_variant(_v)


# ---- HunyuanVideo (engines/models/hunyuanvideo.py) ----------------------------------------------------------------
def _hunyuanvideo_variants() -> list[Variant]:
    from diffusers import AutoencoderKLHunyuanVideo, HunyuanVideoTransformer3DModel
    from transformers import LlamaModel

    # transformer/config.json as diffusers' scripts/convert_hunyuan_video_to_diffusers.py writes it
    # (TRANSFORMER_CONFIGS["HYVideo-T/2-cfgdistill"]): 20 dual- + 40 single-stream blocks, 24 heads of 128, 2 refiner
    # layers, 1x2x2 patches, RoPE (16, 56, 56), guidance embedding, Llama 4096 + CLIP-L 768 text
    transformer = Component(HunyuanVideoTransformer3DModel, dict(
        in_channels=16, out_channels=16, num_attention_heads=24, attention_head_dim=128, num_layers=20,
        num_single_layers=40, num_refiner_layers=2, mlp_ratio=4.0, patch_size=2, patch_size_t=1, qk_norm="rms_norm",
        guidance_embeds=True, text_embed_dim=4096, pooled_projection_dim=768, rope_theta=256.0,
        rope_axes_dim=(16, 56, 56)))  # fmt: skip
    # text_encoder/config.json: the text tower of xtuner/llava-llama-3-8b-v1_1-transformers as a LlamaModel (the
    # authors' hyvideo/utils/preprocess_text_encoder_tokenizer_utils.py extracts it): vocab 128320, 4096 wide, 14336
    # ffn, 32 layers, 32 heads, 8 key/value heads, rope_theta 500000, 8192 positions, untied: 7,505,186,816
    llama = Component(LlamaModel, dict(
        vocab_size=128320, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=8, rope_theta=500000.0, max_position_embeddings=8192, rms_norm_eps=1e-5,
        tie_word_embeddings=False))  # fmt: skip
    # vae/config.json = AutoencoderKLHunyuanVideo's defaults (what convert_vae builds and strictly loads the authors'
    # 884-16c-hy VAE into: 4 down blocks, 128..512 wide, 16 latent channels, scaling_factor 0.476986): 246,478,803,
    # the released config's layout (tests/facts/hunyuanvideo_vae.json)
    vae = Component(AutoencoderKLHunyuanVideo, {})
    # Exact count: the authors' HYVideoDiffusionTransformer (Tencent/HunyuanVideo@fa14b00 hyvideo/modules/models.py,
    # HUNYUAN_VIDEO_CONFIG["HYVideo-T/2-cfgdistill"]) built on meta (docs/fidelity/ref_hunyuanvideo_facts.py); the
    # README and model card say 13B.
    return [
        Variant("hunyuanvideo", "hunyuanvideo-13b", {"transformer": transformer, "text_encoder": llama,
                                                     "text_encoder_2": CLIP_L, "vae": vae},
                12_821_012_544, "13B (README)",
                "Tencent/HunyuanVideo HYVideoDiffusionTransformer(HYVideo-T/2-cfgdistill) built on meta"),
    ]  # fmt: skip


for _v in _hunyuanvideo_variants():
    register_variant(_v)


# ---- Qwen2.5-VL (engines/models/qwen2_5_vl.py) --------------------------------------------------------------------
def _qwen2_5_vl_variants() -> list[Variant]:
    from transformers import Qwen2_5_VLForConditionalGeneration

    # Qwen/Qwen2.5-VL-*-Instruct config.json: one vision tower for every size (32 blocks 1280 wide, 16 heads, SwiGLU
    # 3420, window attention but in blocks 7/15/23/31, 112 px windows, 2 tokens per second), its merger projecting to
    # the language model's width; the language model is Qwen2.5's of the same size.
    vision = dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, hidden_act="silu", patch_size=14,
                  spatial_merge_size=2, temporal_patch_size=2, window_size=112, fullatt_block_indexes=[7, 15, 23, 31],
                  tokens_per_second=2, in_channels=3)  # fmt: skip

    def model(vocab: int, hidden: int, ffn: int, layers: int, heads: int, kv: int, tied: bool) -> Component:
        text = dict(vocab_size=vocab, hidden_size=hidden, intermediate_size=ffn, num_hidden_layers=layers,
                    num_attention_heads=heads, num_key_value_heads=kv, tie_word_embeddings=tied, rms_norm_eps=1e-6,
                    max_position_embeddings=128000,
                    rope_scaling={"type": "mrope", "mrope_section": [16, 24, 24]})  # fmt: skip
        merger = dict(vision, out_hidden_size=hidden)  # the merger projects into the language model's width
        return Component(Qwen2_5_VLForConditionalGeneration, dict(
            text_config=text, vision_config=merger, tie_word_embeddings=tied))  # fmt: skip

    # Totals: the safetensors parameter totals the HF Hub shows for each checkpoint (3.75B, 8.29B, 33.5B, 73.4B; the
    # names count the language model). The builds give them: 3B = 668,684,288 vision + merger (a public torchinfo
    # dump of Qwen2.5-VL-3B-Instruct: 19,702,200 per vision block, 36,707,328 merger MLP, 77,076,992 per decoder
    # layer) + 3,085,938,688 language model; 7B = 676.55M vision + 7.07B language model + 545.00M lm_head, as a
    # public parameter analysis of the loaded Qwen/Qwen2.5-VL-7B-Instruct prints them.
    return [
        # Qwen/Qwen2.5-VL-3B-Instruct: 36 layers, 2048 wide, 16 heads, 2 kv heads, 11008 ffn, vocab 151936, tied
        Variant("qwen2_5_vl", "qwen2.5-vl-3b", {MODEL: model(151936, 2048, 11008, 36, 16, 2, tied=True)},
                3_754_622_976, "3B (model name)", "Qwen/Qwen2.5-VL-3B-Instruct on the HF Hub: 3.75B params; exact: "
                "the sum of a torchinfo dump's per-module counts"),
        # Qwen/Qwen2.5-VL-7B-Instruct: 28 layers, 3584 wide, 28 heads, 4 kv heads, 18944 ffn, vocab 152064, untied
        Variant("qwen2_5_vl", "qwen2.5-vl-7b", {MODEL: model(152064, 3584, 18944, 28, 28, 4, tied=False)},
                8_290_000_000, "7B (model name)", "Qwen/Qwen2.5-VL-7B-Instruct on the HF Hub: 8.29B params "
                "(rounded; the build gives 8,292,166,656)"),
        # Qwen/Qwen2.5-VL-32B-Instruct: Qwen2.5-32B's decoder (64 layers, 5120 wide, 40 heads, 8 kv heads, 27648 ffn)
        Variant("qwen2_5_vl", "qwen2.5-vl-32b", {MODEL: model(152064, 5120, 27648, 64, 40, 8, tied=False)},
                33_500_000_000, "32B (model name)", "Qwen/Qwen2.5-VL-32B-Instruct on the HF Hub: 33.5B params "
                "(rounded; the build gives 33,448,292,352)"),
        # Qwen/Qwen2.5-VL-72B-Instruct: 80 layers, 8192 wide, 64 heads, 8 kv heads, 29568 ffn, vocab 152064
        Variant("qwen2_5_vl", "qwen2.5-vl-72b", {MODEL: model(152064, 8192, 29568, 80, 64, 8, tied=False)},
                73_400_000_000, "72B (model name)", "Qwen/Qwen2.5-VL-72B-Instruct on the HF Hub: 73.4B params "
                "(rounded; the build gives 73,406,351,360)"),
    ]  # fmt: skip


for _v in _qwen2_5_vl_variants():
    register_variant(_v)


# ---- Qwen3-VL, dense and MoE (engines/models/qwen3_vl.py) ---------------------------------------------------------
def _qwen3_vl_variants() -> list[Variant]:
    from transformers import Qwen3VLForConditionalGeneration, Qwen3VLMoeForConditionalGeneration

    # config.json of both releases: a 27-block SigLIP-2-style tower (1152 wide, 4304 ffn, 16 heads, 16 px patches,
    # 48x48 learned positions), DeepStack taps at blocks 8/16/24, merger -> the decoder's width; Qwen3's decoder
    # (head_dim 128, QK-norm, vocab 151936, untied) with interleaved M-RoPE (24, 20, 20), theta 5e6
    def vision(width: int) -> dict[str, Any]:
        return dict(depth=27, hidden_size=1152, intermediate_size=4304, num_heads=16, patch_size=16,
                    spatial_merge_size=2, temporal_patch_size=2, num_position_embeddings=2304,
                    deepstack_visual_indexes=[8, 16, 24], out_hidden_size=width)  # fmt: skip

    rope = {"rope_type": "default", "rope_theta": 5000000.0, "mrope_section": [24, 20, 20], "mrope_interleaved": True}
    text = dict(vocab_size=151936, head_dim=128, tie_word_embeddings=False, rope_parameters=rope,
                max_position_embeddings=262144)  # fmt: skip
    # Qwen/Qwen3-VL-8B-Instruct: 36 layers, 4096 wide, 12288 ffn, 32 heads, 8 kv heads (Qwen3-8B's decoder)
    dense = Component(Qwen3VLForConditionalGeneration, dict(
        text_config=dict(text, hidden_size=4096, intermediate_size=12288, num_hidden_layers=36,
                         num_attention_heads=32, num_key_value_heads=8),
        vision_config=vision(4096), tie_word_embeddings=False))  # fmt: skip
    # Qwen/Qwen3-VL-30B-A3B-Instruct: Qwen3-30B-A3B's decoder, 48 layers, 2048 wide, 32 heads, 4 kv heads, every
    # layer 128 experts of 768 ffn with top-8 routing (no shared expert)
    moe = Component(Qwen3VLMoeForConditionalGeneration, dict(
        text_config=dict(text, hidden_size=2048, intermediate_size=6144, num_hidden_layers=48,
                         num_attention_heads=32, num_key_value_heads=4, moe_intermediate_size=768,
                         num_experts=128, num_experts_per_tok=8, decoder_sparse_step=1),
        vision_config=vision(2048), tie_word_embeddings=False))  # fmt: skip
    # Exact counts: the safetensors parameter totals the Hugging Face Hub shows ("8.77B params", "31.1B params");
    # each build gives them to the parameter. 30B-A3B's ~3B active (the name's A3B) are the decoder without the 120
    # unrouted experts of every layer: 3.35B, 3.89B with the 0.54B vision tower (this build, 8 of 128 experts).
    return [
        Variant("qwen3_vl", "qwen3-vl-8b", {MODEL: dense}, 8_767_123_696, "8B (model name)",
                "Qwen/Qwen3-VL-8B-Instruct on the HF Hub: 8.77B params"),
        Variant("qwen3_vl", "qwen3-vl-30b-a3b", {MODEL: moe}, 31_070_754_032, "30B total, 3B active (model name)",
                "Qwen/Qwen3-VL-30B-A3B-Instruct on the HF Hub: 31.1B params"),
    ]  # fmt: skip


for _v in _qwen3_vl_variants():
    register_variant(_v)


# ---- GLM-4.1V (engines/models/glm4v.py) -----------------------------------------------------------------------------
def _glm4v_variants() -> list[Variant]:
    from transformers import Glm4vForConditionalGeneration

    # zai-org/GLM-4.1V-9B-Thinking (and -Base) config.json: GLM-4-9B-0414 decoder (151552 vocab, 4096 wide, 13696
    # ffn, 40 layers, 32 heads, 2 kv heads, half-rotary M-RoPE (8, 12, 12), untied) + a 24-layer 1536-wide ViT
    # (12 heads, 336 px, 14-px patches, 2x2 merge to 4096, merger ffn 13696) = Glm4vConfig's defaults. Hub
    # "10.3B params"; the build gives 10,292,777,472 (892,498,432 of it the vision tower and merger); the name says
    # 9B (the language model).
    model = Component(Glm4vForConditionalGeneration, dict(
        text_config=dict(vocab_size=151552, hidden_size=4096, intermediate_size=13696, num_hidden_layers=40,
                         num_attention_heads=32, num_key_value_heads=2, max_position_embeddings=65536,
                         rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5,
                                          "mrope_section": [8, 12, 12]}),
        vision_config=dict(depth=24, hidden_size=1536, num_heads=12, intermediate_size=13696, out_hidden_size=4096,
                           image_size=336, patch_size=14, spatial_merge_size=2, temporal_patch_size=2),
        tie_word_embeddings=False))  # fmt: skip
    return [
        Variant("glm4v", "glm-4.1v-9b", {MODEL: model}, 10_292_777_472, "9B (model name)",
                "zai-org/GLM-4.1V-9B-Thinking on the HF Hub: 10.3B params"),
    ]  # fmt: skip


for _v in _glm4v_variants():
    register_variant(_v)
