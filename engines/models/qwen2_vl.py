"""Qwen2-VL image/video understanding: transformers' `Qwen2VLForConditionalGeneration` and processor.

The tiny preset is the real architecture (M-RoPE, 14-px patches merged 2x2, 2-frame temporal
patches) at toy width, with the real processor classes and a byte-level tokenizer that carries
Qwen2-VL's special tokens and ChatML template, so prep, training and inference run the code path a
downloaded checkpoint runs, offline. Media go in the first user turn, images then videos then the
text, as in Qwen2-VL's own examples.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Any

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
from torch import nn
from transformers import (
    AutoProcessor,
    PreTrainedTokenizerFast,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
    Qwen2VLImageProcessor,
    Qwen2VLProcessor,
    Qwen2VLVideoProcessor,
)

# In Qwen2-VL's vocabulary order (after the regular tokens); pad is <|endoftext|>, eos <|im_end|>.
SPECIAL_TOKENS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
)
# Renders what Qwen2-VL-Instruct's chat_template renders for string or typed-part content: ChatML,
# a default system turn, each image/video as one <|vision_start|><|*_pad|><|vision_end|> that the
# processor then expands to one pad per merged patch.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif part['type'] == 'video' %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
# 28*28 .. 56*56 px: an image is 1-4 merged tokens (4-16 patches of 14 px), a 2-frame video clip the same.
TINY_PIXELS = {"min_pixels": 28 * 28, "max_pixels": 56 * 56}
# processor outputs cached beside pixel_values*: (media, 3) grids, Qwen2.5-VL's (videos,) seconds per temporal patch
MEDIA_SUFFIXES = ("grid_thw", "second_per_grid_ts")
PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(
        text=dict(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=4096,
            # head_dim 16 -> 8 rotary frequencies split over (time, height, width) like 7B's (16, 24, 24) of 64
            rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [2, 3, 3]},
        ),
        vision=dict(
            depth=2, embed_dim=32, num_heads=2, mlp_ratio=4, patch_size=14, spatial_merge_size=2, temporal_patch_size=2
        ),
    ),
}


@lru_cache(maxsize=1)
def _tokenizer_json() -> str:
    return byte_level_bpe(tail=SPECIAL_TOKENS).to_str()  # no post-processor: like Qwen2's, no BOS/EOS added


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """263 ids: 256 bytes then Qwen2-VL's specials; the same ids in every process."""
    return chat_tokenizer(
        _tokenizer_json(), CHAT_TEMPLATE, eos_token="<|im_end|>", pad_token="<|endoftext|>", model_max_length=32768
    )


def tiny_processor() -> Qwen2VLProcessor:
    return Qwen2VLProcessor(
        image_processor=Qwen2VLImageProcessor(**TINY_PIXELS),
        video_processor=Qwen2VLVideoProcessor(**TINY_PIXELS, cap_pixels_per_frame=False),
        tokenizer=tiny_tokenizer(),
        chat_template=CHAT_TEMPLATE,
    )


def to_chat(sample: SequenceSample) -> list[dict[str, Any]]:
    """SequenceSample.messages with its media as typed parts of the first user turn."""
    return chat_with_media(sample)


class Qwen2VL(VisionLanguageFamily):
    """Qwen2-VL; the later Qwen-VL releases subclass it and swap the class attributes and hooks below (config,
    model and processor classes, presets, tokenizer, vision config, the processor's per-video arguments)."""

    name = "qwen2_vl"
    model_cls = Qwen2VLForConditionalGeneration
    config_cls: type = Qwen2VLConfig
    presets: dict[str, dict[str, Any]] = PRESETS
    media = ("image", "video")
    # The language model's attention; the vision tower names its own qkv/proj, so it stays frozen.
    lora_targets = ("q_proj", "k_proj", "v_proj", "o_proj")
    # Frozen in full finetunes, the patch merger (the projector, inside `visual`) trained: QwenLM's
    # qwen-vl-finetune recipe (tune_mm_vision False, tune_mm_mlp True, tune_mm_llm True).
    vision_tower = ("model.visual.patch_embed.", "model.visual.blocks.")
    # transformers 5 wants mm_token_type_ids beside media; patches and (t, h, w) grids concatenate.
    pad_values = {**VisionLanguageFamily.pad_values, "mm_token_type_ids": 0}
    concat_keys = ("pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw")

    # ---- hooks a later release overrides --------------------------------------------------------
    def tiny_tokenizer(self) -> PreTrainedTokenizerFast:
        """The tiny preset's offline tokenizer (the release's specials and chat template)."""
        return tiny_tokenizer()

    def tiny_processor(self) -> Any:
        """The tiny preset's processor: the release's processor classes at toy pixel budgets."""
        return tiny_processor()

    def tiny_vision_config(self, preset: dict[str, Any]) -> dict[str, Any]:
        """vision_config kwargs of a preset: Qwen2-VL's merger projects to the text width (`hidden_size`)."""
        return dict(hidden_size=preset["text"]["hidden_size"], **preset["vision"])

    def processor_kwargs(self, samples: list[SequenceSample]) -> dict[str, Any]:
        """Extra processor arguments for these samples' media (Qwen2-VL's processor needs none)."""
        return {}

    def load_model(self, cfg: ModelConfig) -> nn.Module:
        if cfg.transformer.pretrained:
            return from_pretrained(self.model_cls, cfg.transformer, "transformer")
        preset = pick_preset(cfg.transformer, self.presets, "transformer")
        tok = self.tiny_tokenizer()
        ids = {t: tok.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}  # the roles every Qwen-VL release shares
        config = self.config_cls(
            text_config=dict(
                vocab_size=len(tok),
                bos_token_id=ids["<|endoftext|>"],
                eos_token_id=ids["<|im_end|>"],
                pad_token_id=ids["<|endoftext|>"],
                **preset["text"],
            ),
            vision_config=self.tiny_vision_config(preset),
            image_token_id=ids["<|image_pad|>"],
            video_token_id=ids["<|video_pad|>"],
            vision_start_token_id=ids["<|vision_start|>"],
            vision_end_token_id=ids["<|vision_end|>"],
        )
        with seeded_init(cfg.seed):
            model = self.model_cls(config)
        # Qwen2-VL-Instruct's generation_config: stop at <|im_end|> (or <|endoftext|>), pad with <|endoftext|>.
        model.generation_config.eos_token_id = [ids["<|im_end|>"], ids["<|endoftext|>"]]
        model.generation_config.pad_token_id = ids["<|endoftext|>"]
        return model

    def load_processor(self, cfg: ModelConfig) -> Any:
        if cfg.transformer.pretrained:
            return from_pretrained(AutoProcessor, cfg.transformer, "transformer")
        pick_preset(cfg.transformer, self.presets, "transformer")
        return self.tiny_processor()

    # ---- prep -----------------------------------------------------------------------------------
    def encode_sample(self, processor: Any, sample: SequenceSample, max_length: int) -> dict[str, torch.Tensor]:
        roles = [m["role"] for m in sample.messages]
        if "assistant" not in roles:
            raise ValueError("the conversation has no assistant turn: nothing to train on")
        text = processor.apply_chat_template(to_chat(sample), tokenize=False)
        enc = self.process_chat(processor, text, sample, max_length, **self.processor_kwargs([sample]))
        ids = enc["input_ids"][0]  # (L,)
        out = {k: v[0] for k, v in enc.items() if k in ("input_ids", "attention_mask", "mm_token_type_ids")}
        out["labels"] = answer_labels(processor.tokenizer, ids, roles, newline=True)  # as LLaMA-Factory trains
        # (patches, C*temporal_patch*patch*patch), (media, 3) and Qwen2.5-VL's (videos,) seconds per temporal
        # patch: already flat, the model's own layout
        out.update({k: v for k, v in enc.items() if k.startswith("pixel_values") or k.endswith(MEDIA_SUFFIXES)})
        return out

    # ---- training -------------------------------------------------------------------------------
    # ---- inference ------------------------------------------------------------------------------
    @torch.no_grad()
    def respond(
        self, pretrained_dir: Path, samples: list[SequenceSample], *, max_new_tokens: int, device: torch.device
    ) -> list[str]:
        model, processor = self.load_export(pretrained_dir, device)
        chats = [to_chat(prompt_of(s)) for s in samples]
        return self.generate_answers(
            model, processor, samples, chats, max_new_tokens=max_new_tokens, device=device,
            **self.processor_kwargs(samples),
        )  # fmt: skip


def answer_labels(tokenizer: Any, ids: torch.Tensor, roles: list[str], *, newline: bool) -> torch.Tensor:
    """IGNORE_INDEX but on each assistant answer and its <|im_end|> (and the newline after it when `newline`).

    ChatML gives every message one <|im_start|> ... <|im_end|> pair (special tokens, so they are
    single ids with any tokenizer); the last len(roles) pairs are the messages, earlier ones a
    default system turn. The answer starts after the `<|im_start|>assistant\\n` header. Which tokens
    the authors train differs: LLaMA-Factory's qwen2_vl template trains `answer<|im_end|>\\n` (its
    assistant slot is `{{content}}<|im_end|>\\n`), InternVL's preprocess_internvl2_5 masks the `\\n`.
    """
    start_id, end_id = tokenizer.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"])
    header = tokenizer("<|im_start|>assistant\n", add_special_tokens=False)["input_ids"]
    nl = tokenizer("\n", add_special_tokens=False)["input_ids"]
    starts = (ids == start_id).nonzero().flatten().tolist()
    ends = (ids == end_id).nonzero().flatten().tolist()
    if len(starts) != len(ends) or len(starts) < len(roles):
        raise ValueError(
            f"the chat template made {len(starts)} <|im_start|> and {len(ends)} <|im_end|> tokens for "
            f"{len(roles)} messages: a message text must not contain ChatML tokens"
        )
    labels = torch.full_like(ids, IGNORE_INDEX)
    skip = len(starts) - len(roles)
    for role, s, e in zip(roles, starts[skip:], ends[skip:], strict=True):
        if role != "assistant":
            continue
        if ids[s : s + len(header)].tolist() != header:
            raise ValueError("an assistant turn does not start with <|im_start|>assistant\\n: unexpected chat template")
        stop = e + 1 + (len(nl) if newline and ids[e + 1 : e + 1 + len(nl)].tolist() == nl else 0)
        labels[s + len(header) : stop] = ids[s + len(header) : stop]
    return labels


register_family(Qwen2VL())
