"""LLaVA-1.5 image understanding: transformers' `LlavaForConditionalGeneration` and `LlavaProcessor`.

The tiny preset is LLaVA-1.5's shape at toy width: a CLIP ViT (14-px patches, features from the
second-to-last layer, CLS dropped), a 2-layer GELU projector and a Llama decoder, with a tiny
`CLIPImageProcessor` (resize shortest edge + centre crop) and an offline byte-level tokenizer that
has Llama's specials and LLaVA's `<image>`.

Every processor renders conversations with LLaVA-1.5's own training format (preprocess_v1 with
conv_vicuna_v1: its system prompt, then `USER: <image>\\n{q} ASSISTANT: {a}</s>`). llava-hf's chat
template writes the same turns but no system prompt and no `</s>` after an answer, which would
train a model that never stops.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flowspeed.configs.schema import ModelConfig
from flowspeed.engines.models.registry import from_pretrained, pick_preset, register_family, seeded_init
from flowspeed.engines.models.sequence import (
    IGNORE_INDEX,
    SequenceSample,
    VisionLanguageFamily,
    chat_with_media,
    prompt_of,
)
from flowspeed.engines.models.tokenizer import byte_level_bpe, chat_tokenizer
from tokenizers import processors
from torch import nn
from transformers import (
    AutoProcessor,
    CLIPImageProcessor,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    PreTrainedTokenizerFast,
)

# Llama's <unk>=0, <s>=1, </s>=2 first; LLaVA adds <image> and <pad> after the vocabulary.
HEAD_SPECIALS = ("<unk>", "<s>", "</s>")
TAIL_SPECIALS = ("<image>", "<pad>")
# LLaVA's conv_vicuna_v1 system prompt (llava/conversation.py), which preprocess_v1 puts before every training
# conversation and LLaVA-1.5's evaluation before every question; a sample's own system message replaces it.
DEFAULT_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}" + DEFAULT_SYSTEM + " {% endif %}"
    "{% if message['role'] == 'system' %}{{ message['content'] }} "
    "{% elif message['role'] == 'user' %}USER: "
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<image>\n{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %} "
    "{% else %}ASSISTANT: {{ message['content'] }}</s>{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)
PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(
        # 56 px / 14 -> 16 patch tokens per image (LLaVA-1.5: 336 / 14 -> 576)
        vision=dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            image_size=56,
            patch_size=14,
        ),
        text=dict(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=4096,
        ),
    ),
}


@lru_cache(maxsize=1)
def _tokenizer_json() -> str:
    tok = byte_level_bpe(HEAD_SPECIALS, TAIL_SPECIALS, unk="<unk>")
    bos = tok.token_to_id("<s>")
    # Llama prepends <s> and appends nothing
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos)]
    )
    return tok.to_str()


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """261 ids, the same in every process."""
    return chat_tokenizer(
        _tokenizer_json(), CHAT_TEMPLATE, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>",
        model_max_length=4096,
    )  # fmt: skip


def tiny_processor() -> LlavaProcessor:
    side = PRESETS["tiny"]["vision"]["image_size"]
    return LlavaProcessor(
        image_processor=CLIPImageProcessor(size={"shortest_edge": side}, crop_size={"height": side, "width": side}),
        tokenizer=tiny_tokenizer(),
        patch_size=PRESETS["tiny"]["vision"]["patch_size"],
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,  # CLIP's CLS, which "default" then drops
        chat_template=CHAT_TEMPLATE,
    )


def to_chat(sample: SequenceSample) -> list[dict[str, Any]]:
    """Messages with the images as typed parts of the first user turn, before its text."""
    if sample.videos:
        raise ValueError("LLaVA-1.5 takes images, not videos: use the qwen2_vl family for video samples")
    return chat_with_media(sample)


def pad_to_square(image: np.ndarray, fill: tuple[int, int, int]) -> np.ndarray:
    """(H, W, 3) -> (S, S, 3), S = max(H, W), the image centred on `fill` (the first row/column offset rounds down).

    LLaVA-1.5 trains and evaluates with image_aspect_ratio "pad" (train.py, mm_utils.expand2square): every image
    is padded to a square in the CLIP mean colour before the processor's resize and centre crop, so a wide image
    is seen whole. llava-hf's processor does not pad, and its centre crop would cut the sides off.
    """
    h, w = image.shape[:2]
    if h == w:
        return image
    side = max(h, w)
    out = np.empty((side, side, image.shape[2]), dtype=image.dtype)
    out[:] = fill
    top, left = (side - h) // 2, (side - w) // 2
    out[top : top + h, left : left + w] = image
    return out


def square_images(processor: Any, images: list[np.ndarray]) -> list[np.ndarray]:
    fill = tuple(int(m * 255) for m in processor.image_processor.image_mean)  # LLaVA's int(x * 255), not round
    return [pad_to_square(im, fill) for im in images]


def _render(processor: Any, chat: list[dict[str, Any]], **kwargs: Any) -> str:
    """LLaVA-1.5's format whatever template the (pretrained) processor ships."""
    return processor.apply_chat_template(chat, chat_template=CHAT_TEMPLATE, tokenize=False, **kwargs)


class Llava(VisionLanguageFamily):
    name = "llava"
    model_cls = LlavaForConditionalGeneration
    media = ("image",)
    # Llama's attention. CLIP's attention names its projections q/k/v_proj too: without the exclude
    # pattern these suffixes would also adapt the vision tower.
    lora_targets = ("q_proj", "k_proj", "v_proj", "o_proj")
    lora_exclude = r".*vision_tower.*"
    # LLaVA-1.5's finetune stage: CLIP frozen, mm_projector and the LLM trained.
    vision_tower = ("model.vision_tower.",)

    def load_model(self, cfg: ModelConfig) -> nn.Module:
        if cfg.transformer.pretrained:
            return from_pretrained(LlavaForConditionalGeneration, cfg.transformer, "transformer")
        preset = pick_preset(cfg.transformer, PRESETS, "transformer")
        tok = tiny_tokenizer()
        vision = preset["vision"]
        config = LlavaConfig(
            vision_config=dict(model_type="clip_vision_model", **vision),
            text_config=dict(
                model_type="llama",
                vocab_size=len(tok),
                bos_token_id=tok.bos_token_id,
                eos_token_id=tok.eos_token_id,
                pad_token_id=tok.pad_token_id,
                **preset["text"],
            ),
            image_token_index=tok.convert_tokens_to_ids("<image>"),
            image_seq_length=(vision["image_size"] // vision["patch_size"]) ** 2,
            vision_feature_layer=-2,
            vision_feature_select_strategy="default",
            projector_hidden_act="gelu",
        )
        with seeded_init(cfg.seed):
            model = LlavaForConditionalGeneration(config)
        model.generation_config.eos_token_id = tok.eos_token_id
        model.generation_config.pad_token_id = tok.pad_token_id
        return model

    def load_processor(self, cfg: ModelConfig) -> LlavaProcessor:
        if cfg.transformer.pretrained:
            return from_pretrained(AutoProcessor, cfg.transformer, "transformer")
        pick_preset(cfg.transformer, PRESETS, "transformer")
        return tiny_processor()

    # ---- prep -----------------------------------------------------------------------------------
    def encode_sample(self, processor: Any, sample: SequenceSample, max_length: int) -> dict[str, torch.Tensor]:
        chat = to_chat(sample)
        answers = [i for i, m in enumerate(chat) if m["role"] == "assistant"]
        if not answers:
            raise ValueError("the conversation has no assistant turn: nothing to train on")
        enc = self._tokens(processor, chat, sample, add_generation_prompt=False)
        ids = enc["input_ids"][0]  # (L,)
        if len(ids) > max_length:
            raise ValueError(
                f"the sample is {len(ids)} tokens (text + image tokens), over model.max_text_length={max_length}: "
                "raise model.max_text_length, or shorten the conversation"
            )
        # Token spans of the answers: the prompt before turn k, then the conversation through turn k.
        # No SentencePiece merge crosses "ASSISTANT:" -> " answer", and both prefixes are checked.
        labels = torch.full_like(ids, IGNORE_INDEX)
        for k in answers:
            prompt = self._tokens(processor, chat[:k], sample, add_generation_prompt=True)["input_ids"][0]
            through = self._tokens(processor, chat[: k + 1], sample, add_generation_prompt=False)["input_ids"][0]
            start, end = len(prompt), len(through)
            if start > end or not (torch.equal(ids[:start], prompt) and torch.equal(ids[:end], through)):
                raise ValueError("the tokenizer merges across turn boundaries: cannot locate assistant answers")
            labels[start:end] = ids[start:end]
        out = {"input_ids": ids, "attention_mask": enc["attention_mask"][0], "labels": labels}
        if "pixel_values" in enc:
            out["pixel_values"] = enc["pixel_values"]  # (images, 3, H, W)
        return out

    @staticmethod
    def _tokens(processor: Any, chat: list[dict[str, Any]], sample: SequenceSample, **kwargs: Any) -> Any:
        text = _render(processor, chat, **kwargs)
        images = square_images(processor, sample.images) if "<image>" in text else None  # none before the image turn
        return processor(text=[text], images=images, return_tensors="pt")

    # ---- training -------------------------------------------------------------------------------
    # ---- inference ------------------------------------------------------------------------------
    @torch.no_grad()
    def respond(
        self, pretrained_dir: Path, samples: list[SequenceSample], *, max_new_tokens: int, device: torch.device
    ) -> list[str]:
        model, processor = self.load_export(pretrained_dir, device)
        processor.tokenizer.padding_side = "left"  # generation continues from the right edge
        texts, images = [], []
        for s in samples:
            chat = to_chat(prompt_of(s))
            texts.append(_render(processor, chat, add_generation_prompt=True))
            images += square_images(processor, s.images)
        enc = processor(text=texts, images=images or None, padding=True, return_tensors="pt")
        out = model.generate(**enc.to(device), max_new_tokens=max_new_tokens, do_sample=False)
        new = out[:, enc["input_ids"].shape[1] :]  # (B, new tokens)
        return [t.strip() for t in processor.batch_decode(new, skip_special_tokens=True)]


register_family(Llava())
