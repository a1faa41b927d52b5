"""InternVL image/video understanding: transformers' `InternVLForConditionalGeneration` and processor.

The tiny preset is InternVL's shape at toy width: an InternViT tower (14-px patches, CLS token,
layer scale), a pixel-shuffle (0.5) + 2-layer MLP projector and a Qwen2 decoder, with the real
`InternVLProcessor` (a `GotOcr2ImageProcessor` that tiles images, an `InternVLVideoProcessor` that
makes each frame one tile) and an offline byte-level tokenizer carrying InternVL's `<img>`,
`</img>`, `<IMG_CONTEXT>`, `<video>` and ChatML tokens. Its chat template renders what the
OpenGVLab `-hf` checkpoints' template renders: each image as `<IMG_CONTEXT>\\n` and each video as
`<video>\\n`, which the processor expands to `<img>` + one `<IMG_CONTEXT>` per token of every tile +
`</img>` (a video: one such block per frame). The -hf template adds no system turn; `to_chat` adds
the one InternVL2.5/3 were trained with (preprocess_internvl2_5), and labels are each answer and
its `<|im_end|>`, not the newline after it, as that function masks them.

InternVL3.5 (`OpenGVLab/InternVL3_5-*-HF`) is the same class, processor, chat template, system turn and
answer masking with a Qwen3 decoder (q/k RMSNorm, head_dim apart from hidden/heads; Qwen3-MoE for 30B-A3B)
and Qwen3's vocabulary, whose `<think>`/`</think>` precede InternVL's tokens: presets `tiny-3.5` and
`tiny-3.5-moe`. OpenGVLab's -HF conversion writes InternVL3-hf's chat template and the same
`<img>`/`<IMG_CONTEXT>`/`</img>`/`<video>` tokens, image_seq_length 256 (ms-swift drives InternVL3-hf and
InternVL3.5-HF with one `internvl_hf` template), and the authors' InternVL3.5 finetunes run
internvl_chat_gpt_oss/internvl/train/internvl_chat_finetune.py --conv_style internvl2_5 (shell/
internvl3_5_qwen3/*_sft.sh), i.e. preprocess_internvl2_5: InternVL3's system turn and masking.

Transformers-native checkpoints (`OpenGVLab/InternVL3-*-hf`, `OpenGVLab/InternVL3_5-*-HF`) load by default.
The original OpenGVLab releases (InternVL2-*, InternVL2_5-*, InternVL3-*, InternVL3_5-* without `-hf`/`-HF`)
ship their own modelling code: they are refused with the conversion to do, unless
`model.transformer.trust_remote_code: true` and `pretrained` is a LOCAL copy; then internvl_remote.py loads
them with that code and encodes samples in the original layout. Code from a hub id is never executed.
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch
from flowspeed.configs.schema import ComponentConfig, ModelConfig
from flowspeed.engines.models.internvl_remote import (
    MARKER,
    SYSTEM_V25,
    RemoteInternVLProcessor,
    encode_remote,
    load_remote_model,
    load_remote_processor,
    remote_config,
    respond_remote,
)
from flowspeed.engines.models.qwen2_vl import answer_labels  # ChatML answers located in token space, shared
from flowspeed.engines.models.registry import from_pretrained, pick_preset, register_family, seeded_init
from flowspeed.engines.models.sequence import SequenceSample, VisionLanguageFamily, chat_with_media, prompt_of
from flowspeed.engines.models.tokenizer import byte_level_bpe, chat_tokenizer
from torch import nn
from transformers import (
    AutoProcessor,
    GotOcr2ImageProcessor,
    InternVLConfig,
    InternVLForConditionalGeneration,
    InternVLProcessor,
    InternVLVideoProcessor,
    PreTrainedTokenizerFast,
)
from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeTopKRouter, load_balancing_loss_func

# Qwen2's specials first, then InternVL's (in the same relative order as InternVL3-hf's vocabulary).
SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<img>", "</img>", "<IMG_CONTEXT>", "<video>")
# InternVL3.5-HF: Qwen3's vocabulary adds <think> 151667 and </think> 151668 before InternVL's <img> 151669,
# </img> 151670, <IMG_CONTEXT> 151671 (config.json image_token_id); <video> is added last by the -HF conversion.
SPECIAL_TOKENS_35 = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>", "<img>", "</img>",
                     "<IMG_CONTEXT>", "<video>")  # fmt: skip
# The names InternVLProcessor reads off its tokenizer (tokenizer.start_image_token, ..._id).
MM_TOKENS = {
    "start_image_token": "<img>",
    "end_image_token": "</img>",
    "context_image_token": "<IMG_CONTEXT>",
    "video_token": "<video>",
}
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<IMG_CONTEXT>\n"
    "{% elif part['type'] == 'video' %}<video>\n"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(
        # 56-px tiles / 14 -> 4x4 patches, pixel-shuffled 0.5 -> 2x2 = 4 tokens a tile (InternVL3: 448 -> 256)
        vision=dict(
            hidden_size=32,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=2,
            image_size=56,
            patch_size=14,
            attention_bias=True,
            layer_scale_init_value=0.1,
        ),
        text=dict(
            model_type="qwen2",
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=4096,
        ),
        max_tiles=4,  # an image is 1 tile, or up to 4 tiles + a thumbnail (InternVL3: 12)
        tokens=SPECIAL_TOKENS,
    ),
}
# InternVL3.5: the same tower and projector with a Qwen3 decoder. Like Qwen3-0.6B (1024 wide, 16 heads of 128),
# heads x head_dim (4 x 32) differs from the width (64), and q/k are RMS-normed per head.
_QWEN3_TEXT = dict(PRESETS["tiny"]["text"], model_type="qwen3", head_dim=32)
PRESETS["tiny-3.5"] = dict(PRESETS["tiny"], text=_QWEN3_TEXT, tokens=SPECIAL_TOKENS_35)
# InternVL3.5-30B-A3B: Qwen3-MoE (every layer sparse, top-8 of 128 experts with normalised top-k weights): 2 of 4
PRESETS["tiny-3.5-moe"] = dict(PRESETS["tiny-3.5"], text=dict(
    _QWEN3_TEXT, model_type="qwen3_moe", num_experts=4, num_experts_per_tok=2, moe_intermediate_size=64,
    decoder_sparse_step=1, norm_topk_prob=True))  # fmt: skip


def tokens_per_tile(vision: dict[str, Any], downsample_ratio: float = 0.5) -> int:
    """<IMG_CONTEXT> tokens per tile: the patch grid after pixel shuffle (processor and config must agree)."""
    return int((vision["image_size"] // vision["patch_size"]) ** 2 * downsample_ratio**2)


@lru_cache(maxsize=2)
def _tokenizer_json(tail: tuple[str, ...] = SPECIAL_TOKENS) -> str:
    return byte_level_bpe(tail=tail).to_str()  # no post-processor: like Qwen2's and Qwen3's, no BOS/EOS added


def tiny_tokenizer(preset: str = "tiny") -> PreTrainedTokenizerFast:
    """256 bytes then the preset's specials (263 ids; 265 for InternVL3.5's); the same ids in every process."""
    return chat_tokenizer(
        _tokenizer_json(PRESETS[preset]["tokens"]), CHAT_TEMPLATE, eos_token="<|im_end|>",
        pad_token="<|endoftext|>", extra_special_tokens=MM_TOKENS, model_max_length=8192,
    )  # fmt: skip


def tiny_processor(preset: str = "tiny") -> InternVLProcessor:
    """The InternVL3(.5)-HF processor at the preset's tile size (both releases ship the same processor)."""
    spec = PRESETS[preset]
    side = {"height": spec["vision"]["image_size"], "width": spec["vision"]["image_size"]}
    return InternVLProcessor(
        image_processor=GotOcr2ImageProcessor(size=side, crop_to_patches=True, max_patches=spec["max_tiles"]),
        video_processor=InternVLVideoProcessor(size=side),
        tokenizer=tiny_tokenizer(preset),
        image_seq_length=tokens_per_tile(spec["vision"]),
        chat_template=CHAT_TEMPLATE,
    )


def to_chat(sample: SequenceSample) -> list[dict[str, Any]]:
    """SequenceSample.messages with its media as typed parts of the first user turn, images then videos."""
    if len({v.shape[0] for v in sample.videos}) > 1:
        raise ValueError(
            "InternVLProcessor stacks a sample's videos: give them the same frame count (data.num_frames), "
            f"not {[v.shape[0] for v in sample.videos]}"
        )
    # InternVL2.5/3 are trained (internvl_chat_finetune.py --conv_style internvl2_5) and chat with this system
    # turn first; the -hf chat template adds none, so it is added here
    return chat_with_media(sample, system=SYSTEM_V25)


def refuse_remote_code(comp: ComponentConfig) -> dict[str, Any] | None:
    """Stop before from_pretrained on an original (custom-code) InternVL checkpoint, unless opted in.

    Those directories declare `auto_map` (their own Python modules) and model_type `internvl_chat`;
    loading them needs trust_remote_code, i.e. running code that came with the weights, and their
    weight names are not the native class's. The default fix is a one-time conversion; the opt-in
    (`trust_remote_code: true`) is honoured for a local directory only. Hub ids are judged by name:
    OpenGVLab publishes its native conversions as `*-hf`. Returns the opted-in checkpoint's config.
    """
    if not comp.pretrained:
        return None
    config = Path(comp.pretrained, comp.subfolder or "", "config.json")
    if config.is_file():
        meta = remote_config(comp)
        if meta is None:
            return None
        if comp.trust_remote_code:
            return meta
        kind = meta.get("model_type")
        what = f"{config.parent} is an original InternVL checkpoint (model_type {kind!r} with auto_map"
    elif comp.pretrained.startswith("OpenGVLab/") and not comp.pretrained.lower().endswith("-hf"):
        what = f"{comp.pretrained} is an original OpenGVLab release (no -hf suffix"
    else:
        return None  # another hub id or a missing directory: from_pretrained reports it
    hub = " (trust_remote_code applies to local directories only)" if comp.trust_remote_code else ""
    raise ValueError(
        f"{what}: it ships its own modelling code, which flowspeed does not execute by default){hub}. flowspeed "
        "trains transformers' native InternVLForConditionalGeneration. Use a converted release, e.g. "
        "OpenGVLab/InternVL3-1B-hf, OpenGVLab/InternVL3-8B-hf, OpenGVLab/InternVL3_5-1B-HF or "
        "OpenGVLab/InternVL3_5-8B-HF (OpenGVLab publishes every InternVL3.5 size as -HF), or convert the "
        "checkpoint once with transformers' src/transformers/models/internvl/convert_internvl_weights_to_hf.py "
        "(--input_dir <hub id> --output_dir <dir>; it knows the InternVL2.5-MPO and InternVL3 releases, "
        "InternVL2 is not in its table), then set model.transformer.pretrained to the converted directory. "
        "Or, to run the checkpoint's own code: download it to a local directory you trust, set "
        "model.transformer.pretrained to that directory and model.transformer.trust_remote_code: true "
        "(code from a hub id is never executed)."
    )


class InternVL(VisionLanguageFamily):
    name = "internvl"
    model_cls = InternVLForConditionalGeneration
    media = ("image", "video")
    # Qwen2's attention. The InternViT tower names its projections q/k/v_proj too: without the
    # exclude pattern these suffixes would also adapt the vision tower.
    lora_targets = ("q_proj", "k_proj", "v_proj", "o_proj")
    lora_exclude = r".*vision_tower.*"
    # The authors' full finetunes: --freeze_backbone True (InternViT), --freeze_mlp False, --freeze_llm False.
    # Native layout, then the original remote-code one (vision_model / mlp1 / language_model).
    vision_tower = ("model.vision_tower.", "vision_model.")
    # tiles concatenate (the model scatters their features onto <IMG_CONTEXT> ids in row-major order);
    # original checkpoints also take image_flags, 1 per tile and 0 for a text-only sample's blank one
    concat_keys = ("pixel_values", "image_flags")

    def load_model(self, cfg: ModelConfig) -> nn.Module:
        if cfg.transformer.pretrained:
            if refuse_remote_code(cfg.transformer) is not None:
                return load_remote_model(cfg.transformer)  # opted in: the checkpoint's InternVLChatModel
            return from_pretrained(InternVLForConditionalGeneration, cfg.transformer, "transformer")
        preset = pick_preset(cfg.transformer, PRESETS, "transformer")
        tok = tiny_tokenizer(cfg.transformer.preset)
        ids = dict(zip(preset["tokens"], tok.convert_tokens_to_ids(list(preset["tokens"])), strict=True))
        config = InternVLConfig(
            vision_config=dict(**preset["vision"]),
            text_config=dict(  # model_type: qwen2 (InternVL3), qwen3 or qwen3_moe (InternVL3.5)
                vocab_size=len(tok),
                bos_token_id=ids["<|endoftext|>"],
                eos_token_id=ids["<|im_end|>"],
                pad_token_id=ids["<|endoftext|>"],
                tie_word_embeddings=False,  # InternVL3-1B and InternVL3.5-1B keep a separate lm_head
                **preset["text"],
            ),
            image_token_id=ids["<IMG_CONTEXT>"],
            image_seq_length=tokens_per_tile(preset["vision"]),
            downsample_ratio=0.5,
            tie_word_embeddings=False,
        )
        with seeded_init(cfg.seed):
            model = InternVLForConditionalGeneration(config)
        # InternVL3-hf's and InternVL3.5-HF's generation_config: stop at <|im_end|>; pad with <|endoftext|>.
        model.generation_config.eos_token_id = ids["<|im_end|>"]
        model.generation_config.pad_token_id = ids["<|endoftext|>"]
        return model

    def load_processor(self, cfg: ModelConfig) -> InternVLProcessor | RemoteInternVLProcessor:
        if cfg.transformer.pretrained:
            meta = refuse_remote_code(cfg.transformer)
            if meta is not None:
                return load_remote_processor(cfg.transformer, meta)
            return from_pretrained(AutoProcessor, cfg.transformer, "transformer")
        pick_preset(cfg.transformer, PRESETS, "transformer")
        return tiny_processor(cfg.transformer.preset)

    # ---- prep -----------------------------------------------------------------------------------
    def encode_sample(self, processor: Any, sample: SequenceSample, max_length: int) -> dict[str, torch.Tensor]:
        roles = [m["role"] for m in sample.messages]
        if "assistant" not in roles:
            raise ValueError("the conversation has no assistant turn: nothing to train on")
        if isinstance(processor, RemoteInternVLProcessor):
            out = encode_remote(processor, sample)
            _check_length(len(out["input_ids"]), max_length)
            return out
        enc = _encode(processor, processor.apply_chat_template(to_chat(sample), tokenize=False), sample)
        ids = enc["input_ids"][0]  # (L,)
        _check_length(len(ids), max_length)
        labels = answer_labels(processor.tokenizer, ids, roles, newline=False)  # preprocess_internvl2_5 masks it
        out = {"input_ids": ids, "attention_mask": enc["attention_mask"][0], "labels": labels}
        if "pixel_values" in enc:
            out["pixel_values"] = enc["pixel_values"]  # (tiles and frames in token order, 3, H, W)
        return out

    # ---- training -------------------------------------------------------------------------------
    def training_loss(
        self, transformer: nn.Module, scheduler: Any, batch: dict[str, torch.Tensor], generator: torch.Generator
    ) -> torch.Tensor:
        """The answer tokens' cross-entropy; with a Qwen3-MoE decoder (InternVL3.5-30B-A3B) plus the router
        load-balancing loss the authors train with.

        Their finetune sets llm_config.output_router_logits (internvl_chat_gpt_oss/internvl/train/
        internvl_chat_finetune.py) and InternVLChatModel.forward adds router_aux_loss_coef x
        load_balancing_loss_func(router logits, num_experts, top_k, attention_mask); transformers' InternVL class
        cannot return router logits, so they are read off the routers here. A packed row has no attention mask
        and no pads: every token counts, as in the padded batch with its mask.
        """
        routers = [m for m in transformer.modules() if isinstance(m, Qwen3MoeTopKRouter)]
        if not routers:
            return super().training_loss(transformer, scheduler, batch, generator)
        logits: list[torch.Tensor] = []
        hooks = [r.register_forward_hook(lambda _m, _args, out: logits.append(out[0])) for r in routers]
        try:
            loss = super().training_loss(transformer, scheduler, batch, generator)
        finally:
            for hook in hooks:
                hook.remove()
        text = next(m.config.text_config for m in transformer.modules() if hasattr(getattr(m, "config", None),
                                                                                  "text_config"))  # fmt: skip
        mask = None if "cu_seqlens" in batch else batch.get("attention_mask")
        aux = load_balancing_loss_func(tuple(logits), routers[0].num_experts, routers[0].top_k, mask)
        # the engine's CE is this micro-batch's share of the global batch's mean: weight its balancing term alike
        # (by its labelled tokens), so it counts once per step whatever the accumulation and data-parallel split
        normalizer = batch.get("loss_normalizer")
        share = self.loss_targets(batch) / normalizer if normalizer is not None else 1.0
        return loss + text.router_aux_loss_coef * aux * share

    def save_pretrained(self, out_dir: Path, cfg: ModelConfig, transformer: nn.Module) -> Path:
        """The native export; for an opted-in original checkpoint also the marker `respond` asks for
        (transformers copies the checkpoint's code files next to the weights)."""
        super().save_pretrained(out_dir, cfg, transformer)
        if remote_config(cfg.transformer) is not None and cfg.transformer.trust_remote_code:
            (out_dir / MARKER).write_text(json.dumps({"trust_remote_code": True, "source": cfg.transformer.pretrained}))
        return out_dir

    # ---- inference ------------------------------------------------------------------------------
    @torch.no_grad()
    def respond(
        self, pretrained_dir: Path, samples: list[SequenceSample], *, max_new_tokens: int, device: torch.device
    ) -> list[str]:
        """Greedy answers for a batch, each prompt encoded alone then left-padded.

        One processor call per sample: InternVLProcessor stacks all videos of a call, so a batch of
        clips with different frame counts would not encode together. An export of an opted-in original
        checkpoint answers through its own `generate` (internvl_remote.respond_remote).
        """
        if remote_config(ComponentConfig(pretrained=str(pretrained_dir), preset=None)) is not None:
            return respond_remote(pretrained_dir, samples, max_new_tokens=max_new_tokens, device=device)
        model, processor = self.load_export(pretrained_dir, device)
        rows, tiles = [], []
        for s in samples:
            prompt = prompt_of(s)
            text = processor.apply_chat_template(to_chat(prompt), tokenize=False, add_generation_prompt=True)
            enc = _encode(processor, text, prompt)
            rows.append(enc["input_ids"][0])
            if "pixel_values" in enc:
                tiles.append(enc["pixel_values"])
        width = max(len(r) for r in rows)
        pad_id = processor.tokenizer.pad_token_id
        input_ids = torch.stack([torch.cat([r.new_full((width - len(r),), pad_id), r]) for r in rows])  # (B, L)
        attention_mask = torch.stack([torch.arange(width) >= width - len(r) for r in rows]).long()
        inputs = {"input_ids": input_ids, "attention_mask": attention_mask}
        if tiles:
            inputs["pixel_values"] = torch.cat(tiles, dim=0)
        out = model.generate(**{k: v.to(device) for k, v in inputs.items()}, max_new_tokens=max_new_tokens,
                             do_sample=False)  # fmt: skip
        return processor.batch_decode(out[:, width:], skip_special_tokens=True)


def _check_length(n: int, max_length: int) -> None:
    if n > max_length:
        raise ValueError(
            f"the sample is {n} tokens (text + image tiles/frames x tokens per tile), over "
            f"model.max_text_length={max_length}: raise model.max_text_length, or shorten the conversation, "
            "the video (data.num_frames) or the images' tiling"
        )


def _encode(processor: Any, text: str, sample: SequenceSample) -> Any:
    return processor(text=[text], images=sample.images or None, videos=sample.videos or None, return_tensors="pt")


register_family(InternVL())
