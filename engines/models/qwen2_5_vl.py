"""Qwen2.5-VL image/video understanding: transformers' `Qwen2_5_VLForConditionalGeneration` and processor.

The Qwen2-VL family with Qwen2.5-VL's model and processor: a vision tower with window attention (full
attention only in `fullatt_block_indexes`), RMSNorm and SwiGLU MLPs, and M-RoPE whose time axis counts
absolute seconds for videos (each 2-frame temporal patch advances `tokens_per_second * second_per_grid_ts`
positions). `second_per_grid_ts` comes from the frame rate of the sampled frames: prep records it per
video (`SequenceSample.video_fps`) and the processor receives it as video metadata, as it does when it
decodes a file itself, so cached training inputs match what the release's own processor gives.

The tiny preset is that architecture at toy width, with an offline byte-level tokenizer that carries
the release's 22 special tokens in its order and the release's chat template (Qwen2.5-VL-*-Instruct).
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any

from flowspeed.engines.models.qwen2_vl import PRESETS as QWEN2_VL_PRESETS
from flowspeed.engines.models.qwen2_vl import TINY_PIXELS, Qwen2VL
from flowspeed.engines.models.registry import register_family
from flowspeed.engines.models.sequence import SequenceSample
from flowspeed.engines.models.tokenizer import byte_vocab, chat_tokenizer
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
from transformers import (
    PreTrainedTokenizerFast,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2_5_VLProcessor,
    Qwen2VLImageProcessor,
    Qwen2VLVideoProcessor,
)

# Qwen2.5-VL-*-Instruct tokenizer_config.json added_tokens_decoder, ids 151643..151664 in this order; the first 14
# are special (skipped when decoding), the tool-call and fill-in-the-middle tokens are not.
SPECIAL_TOKENS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
)
ADDED_TOKENS = (
    "<tool_call>",
    "</tool_call>",
    "<|fim_prefix|>",
    "<|fim_middle|>",
    "<|fim_suffix|>",
    "<|fim_pad|>",
    "<|repo_name|>",
    "<|file_sep|>",
)
# Qwen2.5-VL-*-Instruct chat_template.json, verbatim: ChatML, the default system turn, one
# <|vision_start|><|image_pad|><|vision_end|> per image (the processor expands the pad to one per merged patch),
# "Picture N: " / "Video N: " labels only with add_vision_id.
CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}"
    "{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(
        text=QWEN2_VL_PRESETS["tiny"]["text"],  # the same toy decoder; Qwen2.5-VL's is Qwen2's too
        vision=dict(
            depth=2,
            hidden_size=32,
            intermediate_size=64,
            num_heads=2,
            hidden_act="silu",
            patch_size=14,
            spatial_merge_size=2,
            temporal_patch_size=2,
            # 28 px windows (one merged token each) so the tiny images really split into windows; the release's
            # 112 px windows and full attention in every 8th block (7, 15, 23, 31) scale down to block 1 of 2
            window_size=28,
            fullatt_block_indexes=[1],
            tokens_per_second=2,  # the release's config.json value
        ),
    ),
}


@lru_cache(maxsize=1)
def _tokenizer_json() -> str:
    tok = Tokenizer(models.BPE(vocab=byte_vocab(tail=SPECIAL_TOKENS + ADDED_TOKENS), merges=[], unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in ADDED_TOKENS])
    return tok.to_str()  # no post-processor: like Qwen2.5's, no BOS/EOS added


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """278 ids: 256 bytes then the release's 22 added tokens; the same ids in every process."""
    return chat_tokenizer(
        _tokenizer_json(), CHAT_TEMPLATE, eos_token="<|im_end|>", pad_token="<|endoftext|>", model_max_length=32768
    )


def tiny_processor() -> Qwen2_5_VLProcessor:
    return Qwen2_5_VLProcessor(
        image_processor=Qwen2VLImageProcessor(**TINY_PIXELS),
        video_processor=Qwen2VLVideoProcessor(**TINY_PIXELS, cap_pixels_per_frame=False),
        tokenizer=tiny_tokenizer(),
        chat_template=CHAT_TEMPLATE,
    )


def video_metadata(samples: list[SequenceSample]) -> list[dict[str, Any]]:
    """One transformers VideoMetadata per video of `samples`, in the processor's order, whose `sampled_fps` is the
    frame rate prep recorded (None where unknown: the processor then assumes 24 fps, as it does without metadata).
    The frames are already sampled, so they are all the frames the processor sees."""
    out = []
    for s in samples:
        fps = list(s.video_fps) + [None] * (len(s.videos) - len(s.video_fps))
        for video, f in zip(s.videos, fps, strict=False):
            out.append({"total_num_frames": len(video), "fps": f, "frames_indices": list(range(len(video)))})
    return out


class Qwen2_5_VL(Qwen2VL):  # noqa: N801  (transformers' spelling)
    name = "qwen2_5_vl"
    model_cls = Qwen2_5_VLForConditionalGeneration
    config_cls = Qwen2_5_VLConfig
    presets = PRESETS
    # the merger (inside `visual`) still trains in full finetunes; patch embedding and blocks stay frozen
    vision_tower = ("model.visual.patch_embed.", "model.visual.blocks.")
    # (videos,) seconds per temporal patch concatenate like the grids they pair with
    concat_keys = (*Qwen2VL.concat_keys, "second_per_grid_ts")

    def tiny_tokenizer(self) -> PreTrainedTokenizerFast:
        return tiny_tokenizer()

    def tiny_processor(self) -> Qwen2_5_VLProcessor:
        return tiny_processor()

    def tiny_vision_config(self, preset: dict[str, Any]) -> dict[str, Any]:
        """Qwen2.5-VL's vision config names its own width `hidden_size`; the merger projects to `out_hidden_size`."""
        return dict(out_hidden_size=preset["text"]["hidden_size"], **preset["vision"])

    def processor_kwargs(self, samples: list[SequenceSample]) -> dict[str, Any]:
        """The sampled frame rate of each video, as the metadata Qwen2_5_VLProcessor reads `second_per_grid_ts` from."""
        meta = video_metadata(samples)
        return {"video_metadata": meta} if meta else {}


register_family(Qwen2_5_VL())
