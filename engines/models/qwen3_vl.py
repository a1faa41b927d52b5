"""Qwen3-VL image/video understanding, dense and MoE: transformers' `Qwen3VLForConditionalGeneration`,
`Qwen3VLMoeForConditionalGeneration` and `Qwen3VLProcessor`.

What changes from Qwen2-VL (engines/models/qwen2_vl.py, which this family subclasses): 16-px patches with a
learned position table, DeepStack (features of early vision layers merged and added to the first decoder
layers' hidden states), interleaved M-RoPE (time/height/width frequencies interleaved instead of in three
blocks), QK-norm in the decoder, the MoE decoder of the A3B releases, no default system turn in the chat
template, and videos rendered frame group by frame group, each after its timestamp as text (`<0.2 seconds>`):
the processor expands one `<|vision_start|><|video_pad|><|vision_end|>` into that structure.

Two tiny presets, both the real architecture at toy width: `tiny` (dense) and `tiny-moe` (4 experts, top-2,
every layer sparse like Qwen3-VL-30B-A3B). Their tokenizer is byte-level with the release's 26 added tokens (14
special) in the release's order, so prep, training and inference run a downloaded checkpoint's code path offline.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Any

import torch
from flowspeed.configs.schema import ModelConfig
from flowspeed.engines.models.qwen2_5_vl import ADDED_TOKENS as QWEN25_ADDED_TOKENS
from flowspeed.engines.models.qwen2_5_vl import SPECIAL_TOKENS as QWEN25_SPECIAL_TOKENS
from flowspeed.engines.models.qwen2_vl import Qwen2VL
from flowspeed.engines.models.registry import from_pretrained, loaded, pick_preset, register_family
from flowspeed.engines.models.sequence import SequenceSample
from flowspeed.engines.models.tokenizer import byte_level_bpe, chat_tokenizer
from tokenizers import AddedToken
from torch import nn
from transformers import (
    AutoConfig,
    AutoModelForImageTextToText,
    AutoProcessor,
    PreTrainedModel,
    PreTrainedTokenizerFast,
    Qwen2VLImageProcessor,
    Qwen3VLConfig,
    Qwen3VLForConditionalGeneration,
    Qwen3VLMoeConfig,
    Qwen3VLMoeForConditionalGeneration,
    Qwen3VLProcessor,
    Qwen3VLVideoProcessor,
)

# Qwen3-VL-*-Instruct tokenizer_config.json added tokens, ids 151643..151668 there and 256..281 here, in this order:
# the first 14 special (skipped when decoding); tool-call, fill-in-the-middle, tool-response and think tokens not.
# pad is <|endoftext|>, eos <|im_end|>.
SPECIAL_TOKENS = QWEN25_SPECIAL_TOKENS  # the same 14 specials as Qwen2.5-VL, at the same ids
ADDED_TOKENS = (*QWEN25_ADDED_TOKENS, "<tool_response>", "</tool_response>", "<think>", "</think>")
# Renders what Qwen3-VL-*-Instruct's chat_template renders for string or typed-part content without tools: ChatML
# with NO default system turn (Qwen2-VL's had one), each image/video as <|vision_start|><|*_pad|><|vision_end|>,
# which the processor expands (an image: one pad per merged patch; a video: per frame group, after its
# timestamp). LLaMA-Factory's qwen3_vl(_nothink) template agrees: no default_system, assistant slot
# `{{content}}<|im_end|>\n` (src/llamafactory/data/template.py).
CHAT_TEMPLATE = (
    "{% for message in messages %}"
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
# 16-px patches merged 2x2: 32-px units. 32*32 .. 64*64 px: an image is 1-4 merged tokens, a 2-frame group the same.
TINY_PIXELS = {"min_pixels": 32 * 32, "max_pixels": 64 * 64}
# Frames reach encode_sample already sampled (datasets_prep decodes data.num_frames of them) with the frame rate of
# those frames (`SequenceSample.video_fps`); where it is unknown the timestamps read them as consecutive frames at
# Qwen3-VL's own sampling rate (its video processor's fps=2): frame groups at 0.2 s, 1.2 s, ... ("<0.2 seconds>").
VIDEO_FPS = 2.0

_TEXT = dict(
    hidden_size=64,
    tie_word_embeddings=False,  # 8B and 30B-A3B are untied
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    max_position_embeddings=4096,
    # head_dim 16 -> 8 rotary frequencies over (t, h, w), interleaved like 8B's [24, 20, 20] of 64
    rope_parameters={"rope_type": "default", "rope_theta": 5000000.0, "mrope_section": [2, 3, 3],
                     "mrope_interleaved": True},
)  # fmt: skip
# 3 vision blocks; DeepStack taps blocks 0 and 1 (8B taps 8, 16, 24 of 27) into decoder layers 0 and 1.
_VISION = dict(depth=3, hidden_size=32, intermediate_size=64, num_heads=2, patch_size=16, spatial_merge_size=2,
               temporal_patch_size=2, num_position_embeddings=16, deepstack_visual_indexes=[0, 1])  # fmt: skip
PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(moe=False, text=dict(_TEXT, intermediate_size=128), vision=_VISION),
    # every decoder layer sparse (decoder_sparse_step 1, like 30B-A3B's 128 experts, top-8): 4 experts, top-2
    "tiny-moe": dict(
        moe=True,
        text=dict(_TEXT, intermediate_size=128, moe_intermediate_size=32, num_experts=4, num_experts_per_tok=2,
                  decoder_sparse_step=1),
        vision=_VISION,
    ),
}  # fmt: skip


@lru_cache(maxsize=1)
def _tokenizer_json() -> str:
    tok = byte_level_bpe(tail=SPECIAL_TOKENS)  # the specials at 256..269, registered as special
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in ADDED_TOKENS])  # 270..281
    return tok.to_str()  # no post-processor: like Qwen3's, no BOS/EOS added


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """282 ids: 256 bytes then the release's 26 added tokens; the same ids in every process."""
    return chat_tokenizer(
        _tokenizer_json(), CHAT_TEMPLATE, eos_token="<|im_end|>", pad_token="<|endoftext|>", model_max_length=262144
    )


def tiny_processor() -> Qwen3VLProcessor:
    # the release's preprocessor configs: Qwen2-VL's image processor with 16-px patches, mean/std 0.5
    half = [0.5, 0.5, 0.5]
    return Qwen3VLProcessor(
        image_processor=Qwen2VLImageProcessor(patch_size=16, image_mean=half, image_std=half, **TINY_PIXELS),
        video_processor=Qwen3VLVideoProcessor(
            size={"shortest_edge": TINY_PIXELS["min_pixels"], "longest_edge": 4 * TINY_PIXELS["max_pixels"]},
            cap_pixels_per_frame=False,
        ),
        tokenizer=tiny_tokenizer(),
        chat_template=CHAT_TEMPLATE,
    )


def video_metadata(samples: list[SequenceSample]) -> list[dict[str, Any]]:
    """One transformers VideoMetadata per video of `samples`, in the processor's order: the frames are all the
    processor sees (already sampled), at the frame rate prep recorded (`SequenceSample.video_fps`), else VIDEO_FPS."""
    out = []
    for s in samples:
        fps = list(getattr(s, "video_fps", [])) + [None] * len(s.videos)
        for video, f in zip(s.videos, fps, strict=False):
            out.append(
                {"total_num_frames": len(video), "fps": f or VIDEO_FPS, "frames_indices": list(range(len(video)))}
            )
    return out


def model_class(config: Any) -> type[PreTrainedModel]:
    """The dense or the MoE class, by the config's model_type (`qwen3_vl` / `qwen3_vl_moe`)."""
    return (
        Qwen3VLMoeForConditionalGeneration if config.model_type == "qwen3_vl_moe" else Qwen3VLForConditionalGeneration
    )


class Qwen3VL(Qwen2VL):
    name = "qwen3_vl"
    model_cls = Qwen3VLForConditionalGeneration  # the MoE preset and releases: Qwen3VLMoe... (see load_model)
    config_cls = Qwen3VLConfig
    presets = PRESETS
    # Frozen in full finetunes, the patch merger (`visual.merger`) trained: QwenLM/Qwen3-VL's qwen-vl-finetune
    # set_model (tune_mm_vision False freezes all of `visual`, tune_mm_mlp True re-enables `visual.merger` only),
    # so the learned position table and the DeepStack mergers stay frozen with the blocks.
    vision_tower = (
        "model.visual.patch_embed.",
        "model.visual.pos_embed.",
        "model.visual.blocks.",
        "model.visual.deepstack_merger_list.",
    )

    def tiny_tokenizer(self) -> PreTrainedTokenizerFast:
        return tiny_tokenizer()

    def tiny_processor(self) -> Qwen3VLProcessor:
        return tiny_processor()

    def tiny_vision_config(self, preset: dict[str, Any]) -> dict[str, Any]:
        """The merger and the DeepStack mergers project to the decoder's width (`out_hidden_size`)."""
        return dict(out_hidden_size=preset["text"]["hidden_size"], **preset["vision"])

    def processor_kwargs(self, samples: list[SequenceSample]) -> dict[str, Any]:
        """Each video's frame timestamps (`video_metadata`) and no resampling of the already-sampled frames."""
        meta = video_metadata(samples)
        return {"video_metadata": meta, "do_sample_frames": False} if meta else {}

    def load_model(self, cfg: ModelConfig) -> nn.Module:
        """A release through the Auto class (its config.json says dense or MoE); `tiny-moe` built as Qwen2VL builds
        `tiny`, with the MoE classes."""
        if cfg.transformer.pretrained:
            return from_pretrained(AutoModelForImageTextToText, cfg.transformer, "transformer")
        if pick_preset(cfg.transformer, self.presets, "transformer")["moe"]:
            return Qwen2VL.load_model(_MOE_CLASSES, cfg)
        return super().load_model(cfg)

    def load_export(self, pretrained_dir: Path, device: torch.device) -> tuple[nn.Module, Any]:
        """VisionLanguageFamily's, with the export's own class: a dense or an MoE config.json."""

        def build() -> nn.Module:
            cls = model_class(AutoConfig.from_pretrained(pretrained_dir))
            return cls.from_pretrained(pretrained_dir).to(device).eval()

        model = loaded(build, pretrained_dir, device)
        processor = loaded(lambda: AutoProcessor.from_pretrained(pretrained_dir), pretrained_dir, "processor")
        return model, processor


class _Qwen3VLMoeClasses(Qwen3VL):
    """Qwen3VL with the MoE model and config classes: what builds `tiny-moe` (not a family of its own)."""

    model_cls = Qwen3VLMoeForConditionalGeneration
    config_cls = Qwen3VLMoeConfig


_MOE_CLASSES = _Qwen3VLMoeClasses()

register_family(Qwen3VL())
