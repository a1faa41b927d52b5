"""GLM-4.1V image/video understanding: transformers' `Glm4vForConditionalGeneration` and `Glm4vProcessor`.

GLM-4.1V-9B-Thinking (and -Base) is a Qwen2-VL-style tower (14-px patches, 2-frame temporal patches, 2x2 merge, a
2D-RoPE ViT with interpolated absolute position embeddings) in front of GLM-4-9B-0414, with M-RoPE in the decoder.
The tiny preset is that architecture at toy width, with the real processor classes and a byte-level tokenizer that
carries the release's special tokens and chat template, so prep, training and inference run the code path a
downloaded checkpoint runs, offline.

What differs from Qwen2-VL (engines/models/qwen2_vl.py), and why this is its own family:

* the chat format is GLM's, not ChatML: `[gMASK]<sop>`, `<|system|>`/`<|user|>`/`<|assistant|>` role tokens and no
  end-of-turn token (a turn ends where the next role token starts);
* images render as `<|begin_of_image|><|image|><|end_of_image|>` and a video as one such block per temporal patch
  followed by its time in whole seconds, all inside `<|begin_of_video|>...<|end_of_video|>`: the processor needs
  each video's frame rate to write those timestamps;
* the Thinking release answers `<think>...</think><answer>...</answer>`: training adds the empty thought that
  LLaMA-Factory's `glm4v` template adds, and `respond` returns the answer without the thought.
"""

from __future__ import annotations

import re
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
    Glm4vConfig,
    Glm4vForConditionalGeneration,
    Glm4vImageProcessor,
    Glm4vProcessor,
    Glm4vVideoProcessor,
    PreTrainedTokenizerFast,
)
from transformers.video_utils import VideoMetadata

# GLM-4's specials in their vocabulary order (glm-4-9b's tokenization_chatglm.py: <|endoftext|> 151329 ...
# <|end_of_video|> 151342), then GLM-4.1V's <|image|> 151343 and <|video|> 151344 (Glm4vConfig's image_token_id and
# video_token_id), then the Thinking release's reasoning and grounding tokens (single tokens: the authors'
# inference/trans_infer_bench.py looks each up with convert_tokens_to_ids). The tiny vocabulary keeps this order
# after its 256 byte tokens, so tiny id - 256 == release id - 151329 for the first 16.
SPECIAL_TOKENS = (
    "<|endoftext|>",
    "[MASK]",
    "[gMASK]",
    "[sMASK]",
    "<sop>",
    "<eop>",
    "<|system|>",
    "<|user|>",
    "<|assistant|>",
    "<|observation|>",
    "<|begin_of_image|>",
    "<|end_of_image|>",
    "<|begin_of_video|>",
    "<|end_of_video|>",
    "<|image|>",
    "<|video|>",
    "<think>",
    "</think>",
    "<answer>",
    "</answer>",
    "<|begin_of_box|>",
    "<|end_of_box|>",
)
# zai-org/GLM-4.1V-9B-Thinking's chat_template, verbatim (quoted with its revision 3c1471e5 by a renderer audit, and
# without the extra blank line by sgl-project/sglang test/srt/test_jinja_template_utils.py; the blank line renders
# nothing: `{%-` strips it). A video or image part is one placeholder the processor expands; an assistant turn is
# `<|assistant|>\n{content}`; nothing closes a turn.
CHAT_TEMPLATE = (
    "[gMASK]<sop>\n"
    "{%- for msg in messages %}\n"
    "    {%- if msg.role == 'system' %}\n"
    "<|system|>\n"
    "{{ msg.content }}\n"
    "    {%- elif msg.role == 'user' %}\n"
    "<|user|>{{ '\\n' }}\n"
    "\n"
    "        {%- if msg.content is string %}\n"
    "{{ msg.content }}\n"
    "        {%- else %}\n"
    "            {%- for item in msg.content %}\n"
    "                {%- if item.type == 'video' or 'video' in item %}\n"
    "<|begin_of_video|><|video|><|end_of_video|>\n"
    "                {%- elif item.type == 'image' or 'image' in item %}\n"
    "<|begin_of_image|><|image|><|end_of_image|>\n"
    "                {%- elif item.type == 'text' %}\n"
    "{{ item.text }}\n"
    "                {%- endif %}\n"
    "            {%- endfor %}\n"
    "        {%- endif %}\n"
    "    {%- elif msg.role == 'assistant' %}\n"
    "        {%- if msg.metadata %}\n"
    "<|assistant|>{{ msg.metadata }}\n"
    "{{ msg.content }}\n"
    "        {%- else %}\n"
    "<|assistant|>\n"
    "{{ msg.content }}\n"
    "        {%- endif %}\n"
    "    {%- endif %}\n"
    "{%- endfor %}\n"
    "{% if add_generation_prompt %}<|assistant|>\n"
    "{% endif %}"
)
# LLaMA-Factory's `glm4v` template is a ReasoningTemplate with the default thought words ("<think>\n", "\n</think>\n\n")
# and enable_thinking on by default: an answer without a thought is trained with this empty one in front.
EMPTY_THOUGHT = "<think>\n\n</think>\n\n"
# GLM-4's stop tokens (generation_config eos_token_id [151329, 151336, 151338]): the document end, the next user turn,
# a tool call.
STOP_TOKENS = ("<|endoftext|>", "<|user|>", "<|observation|>")
# 28*28 .. 56*56 px per image (1-4 merged tokens); a 2-frame video clip the same per temporal patch.
TINY_IMAGE_SIZE = {"shortest_edge": 28 * 28, "longest_edge": 56 * 56}
TINY_VIDEO_SIZE = {"shortest_edge": 2 * 28 * 28, "longest_edge": 2 * 56 * 56}  # GLM's video budget is t*h*w
PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(
        text=dict(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=1,
            max_position_embeddings=4096,
            # GLM-4's sandwich norms (post_self_attn_layernorm, post_mlp_layernorm) hand the residual stream unit-RMS
            # layer outputs, which drown the release's 0.02-std token embeddings in a toy model trained for seconds
            # (a fixed batch is not learnt in 25 steps): embeddings (and weights) drawn 10x wider learn it in ~12
            initializer_range=0.2,
            # head_dim 32, half of it rotary (GLM's partial_rotary_factor 0.5) -> 8 frequencies split over
            # (time, height, width) like the 9B's (8, 12, 12) of 32
            rope_parameters={
                "rope_type": "default",
                "rope_theta": 10000.0,
                "partial_rotary_factor": 0.5,
                "mrope_section": [2, 3, 3],
            },
        ),
        # 9B: depth 24, 1536 wide, 12 heads, merger 13696 (vision_config.intermediate_size), 336 px (24x24
        # learned positions, interpolated to each grid)
        vision=dict(
            depth=2,
            hidden_size=32,
            num_heads=2,
            intermediate_size=128,
            image_size=112,
            patch_size=14,
            spatial_merge_size=2,
            temporal_patch_size=2,
        ),
    ),
}


@lru_cache(maxsize=1)
def _tokenizer_json() -> str:
    return byte_level_bpe(tail=SPECIAL_TOKENS).to_str()  # no post-processor: the template writes [gMASK]<sop>


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """278 ids: 256 bytes then GLM-4.1V's specials; the same ids in every process. eos and pad are <|endoftext|>
    as in the release's tokenizer_config (LLaMA-Factory's efficient_eos labels it after each answer)."""
    return chat_tokenizer(
        _tokenizer_json(), CHAT_TEMPLATE, eos_token="<|endoftext|>", pad_token="<|endoftext|>", model_max_length=65536
    )


def tiny_processor() -> Glm4vProcessor:
    """The release's processor classes at toy pixel budgets, so the tiny preset expands placeholders, writes frame
    timestamps and marks mm_token_type_ids with transformers' own code."""
    return Glm4vProcessor(
        image_processor=Glm4vImageProcessor(size=TINY_IMAGE_SIZE),
        video_processor=Glm4vVideoProcessor(size=TINY_VIDEO_SIZE),
        tokenizer=tiny_tokenizer(),
        chat_template=CHAT_TEMPLATE,
    )


def with_thought(content: str) -> str:
    """An answer as LLaMA-Factory's glm4v template trains it: the empty thought in front unless it has one.

    LLaMA-Factory appends the thought's ids before its assistant slot `\\n{{content}}` (so `<|assistant|><think>..`);
    here it goes inside the content, after the release template's `<|assistant|>\\n`, so that the generation prompt
    the release renders (`...<|assistant|>\\n`) is exactly a prefix of what was trained.
    """
    if "<think>" in content or "</think>" in content:
        return content
    return EMPTY_THOUGHT + content


def to_chat(sample: SequenceSample) -> list[dict[str, Any]]:
    """SequenceSample.messages with its media as typed parts of the first user turn and each answer as trained."""
    chat = chat_with_media(sample)
    return [{**m, "content": with_thought(m["content"])} if m["role"] == "assistant" else m for m in chat]


def video_kwargs(processor: Any, samples: list[SequenceSample]) -> dict[str, Any]:
    """Frame rates for GLM's video timestamps: the processor writes each temporal patch's time (whole seconds)
    after its frame block, from the video's metadata. Prep hands already-sampled frames, so the processor must not
    resample them (`do_sample_frames=False`); their rate is the sample's `video_fps` where prep knows it, else the
    rate GLM's video processor samples at itself (`fps`, 2): timestamps 0, 1, 2... seconds."""
    videos = [(v, fps) for s in samples for v, fps in zip(s.videos, _fps_of(s), strict=True)]
    if not videos:
        return {}
    default = float(getattr(processor.video_processor, "fps", 2) or 2)
    metadata = [
        VideoMetadata(total_num_frames=len(v), fps=fps or default, frames_indices=list(range(len(v))))
        for v, fps in videos
    ]
    return {"do_sample_frames": False, "video_metadata": metadata}


def _fps_of(sample: SequenceSample) -> list[float | None]:
    fps = list(getattr(sample, "video_fps", None) or [])
    return fps + [None] * (len(sample.videos) - len(fps))


class Glm4v(VisionLanguageFamily):
    name = "glm4v"
    model_cls = Glm4vForConditionalGeneration
    media = ("image", "video")
    # The language model's attention; the vision tower's are attn.qkv/attn.proj, so LoRA leaves it alone.
    lora_targets = ("q_proj", "k_proj", "v_proj", "o_proj")
    # Frozen in full finetunes: LLaMA-Factory's glm4v composite model (vision_model_keys visual.patch_embed and
    # visual.blocks; the projector visual.merger trained), as for Qwen2-VL.
    vision_tower = ("model.visual.patch_embed.", "model.visual.blocks.")
    # transformers 5 wants mm_token_type_ids (1 image, 2 video) beside the media for M-RoPE; patches and grids concat.
    # (the same layout as engines/models/qwen2_vl.py's, not imported from it: only this family's module loads)
    pad_values = {**VisionLanguageFamily.pad_values, "mm_token_type_ids": 0}
    concat_keys = ("pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw")

    def load_model(self, cfg: ModelConfig) -> nn.Module:
        """A GLM-4.1V checkpoint (Thinking or Base), or the seeded tiny preset with the tiny tokenizer's ids; either
        way able to take images and videos in one batch (`mixed_media`)."""
        if cfg.transformer.pretrained:
            return mixed_media(from_pretrained(Glm4vForConditionalGeneration, cfg.transformer, "transformer"))
        preset = pick_preset(cfg.transformer, PRESETS, "transformer")
        tok = tiny_tokenizer()
        ids = {t: tok.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
        config = Glm4vConfig(
            text_config=dict(vocab_size=len(tok), pad_token_id=ids["<|endoftext|>"], **preset["text"]),
            # the merger projects to the text width (out_hidden_size); vision blocks' MLPs are that wide too
            vision_config=dict(out_hidden_size=preset["text"]["hidden_size"], **preset["vision"]),
            image_token_id=ids["<|image|>"],
            video_token_id=ids["<|video|>"],
            image_start_token_id=ids["<|begin_of_image|>"],
            image_end_token_id=ids["<|end_of_image|>"],
            video_start_token_id=ids["<|begin_of_video|>"],
            video_end_token_id=ids["<|end_of_video|>"],
        )
        with seeded_init(cfg.seed):
            model = Glm4vForConditionalGeneration(config)
        mixed_media(model)
        model.generation_config.eos_token_id = [ids[t] for t in STOP_TOKENS]
        model.generation_config.pad_token_id = ids["<|endoftext|>"]
        return model

    def load_processor(self, cfg: ModelConfig) -> Glm4vProcessor:
        """The checkpoint's own processor (its tokenizer and chat template), or the tiny one."""
        if cfg.transformer.pretrained:
            return from_pretrained(AutoProcessor, cfg.transformer, "transformer")
        pick_preset(cfg.transformer, PRESETS, "transformer")
        return tiny_processor()

    # ---- prep -----------------------------------------------------------------------------------
    def encode_sample(self, processor: Any, sample: SequenceSample, max_length: int) -> dict[str, torch.Tensor]:
        """The release template's text plus a closing <|endoftext|> (LLaMA-Factory's efficient_eos), its media
        tensors, and labels on the answers only (`answer_labels`). Per sample, unpadded: packing can join them."""
        roles = [m["role"] for m in sample.messages]
        if "assistant" not in roles:
            raise ValueError("the conversation has no assistant turn: nothing to train on")
        tok = processor.tokenizer
        text = processor.apply_chat_template(to_chat(sample), tokenize=False) + tok.eos_token
        enc = self.process_chat(processor, text, sample, max_length, **video_kwargs(processor, [sample]))
        ids = enc["input_ids"][0]  # (L,)
        out = {k: v[0] for k, v in enc.items() if k in ("input_ids", "attention_mask", "mm_token_type_ids")}
        out["labels"] = answer_labels(tok, ids, roles)
        # (patches, C*temporal_patch*patch*patch) and (media, 3): already flat, the model's own layout
        out.update({k: v for k, v in enc.items() if k.startswith("pixel_values") or k.endswith("grid_thw")})
        return out

    def set_trainable(self, model: nn.Module, cfg: ModelConfig) -> nn.Module:
        """The tower frozen as the base class does, and `mixed_media` applied: the engine calls this on every rank's
        model (the meta-device copies the other ranks shard included), which `load_model` alone would miss."""
        return super().set_trainable(mixed_media(model), cfg)

    # ---- inference ------------------------------------------------------------------------------
    def load_export(self, pretrained_dir: Path, device: torch.device) -> tuple[nn.Module, Any]:
        """The base class's export loading, with `mixed_media` (an instance patch, not saved in the export)."""
        model, processor = super().load_export(pretrained_dir, device)
        return mixed_media(model), processor

    @torch.no_grad()
    def respond(
        self, pretrained_dir: Path, samples: list[SequenceSample], *, max_new_tokens: int, device: torch.device
    ) -> list[str]:
        """Greedy answers after the release's generation prompt `<|assistant|>\\n`, without their thought
        (`final_answer`)."""
        model, processor = self.load_export(pretrained_dir, device)
        # earlier answers as trained (with their empty thought): the prompt is then a prefix of a training text
        chats = [to_chat(prompt_of(s)) for s in samples]
        raw = self.generate_answers(
            model, processor, samples, chats, max_new_tokens=max_new_tokens, device=device, skip_special_tokens=False,
            **video_kwargs(processor, samples),
        )  # fmt: skip
        return [final_answer(r, processor.tokenizer) for r in raw]


def mixed_media(model: nn.Module) -> nn.Module:
    """`model` able to take images and videos in one batch (or one sample), as GLM-4.1V's processor renders them.

    A video frame's placeholder is the image token (<|image|>), told apart only by the <|begin_of_video|> ...
    <|end_of_video|> around it; transformers 5.25's Glm4vModel.get_placeholder_mask counts every <|image|> as an image
    AND as a video placeholder, so a batch holding both fails ("Image features and image tokens do not match").
    This gives the model the mask the processor's own mm_token_type_ids use (Glm4vProcessor.create_mm_token_type_ids):
    inside a video segment a video token, outside an image token. Idempotent; an instance attribute, so the saved
    export stays a stock Glm4vForConditionalGeneration.
    """
    inner = model.model
    cfg = inner.config

    def get_placeholder_mask(
        input_ids: torch.Tensor | None,
        inputs_embeds: torch.Tensor,
        image_features: torch.Tensor | None = None,
        video_features: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if input_ids is None:  # embeddings only: transformers' own matching
            return type(inner).get_placeholder_mask(inner, input_ids, inputs_embeds, image_features, video_features)
        placeholder = input_ids == cfg.image_token_id
        in_video = (input_ids == cfg.video_start_token_id).cumsum(-1) > (input_ids == cfg.video_end_token_id).cumsum(-1)
        masks = []
        for mask, features, what in ((placeholder & ~in_video, image_features, "Image"),
                                     (placeholder & in_video, video_features, "Video")):  # fmt: skip
            if features is not None and int(mask.sum()) * inputs_embeds.shape[-1] != features.numel():
                raise ValueError(
                    f"{what} features and {what.lower()} tokens do not match, tokens: {int(mask.sum())}, "
                    f"features: {features.shape[0]}"
                )
            masks.append(mask.unsqueeze(-1).expand_as(inputs_embeds).to(inputs_embeds.device))
        return masks[0], masks[1]

    inner.get_placeholder_mask = get_placeholder_mask
    return model


def final_answer(raw: str, tokenizer: Any) -> str:
    """What the user reads of a GLM-4.1V reply: up to the first stop token, the `<think>...</think>` part removed,
    and inside `<answer>...</answer>` when the model wrote one (as the authors' inference/trans_infer_cli.py
    reads it); other special tokens dropped."""
    for stop in STOP_TOKENS:
        raw = raw.split(stop, 1)[0]
    raw = re.sub(r"<think>.*?</think>", "", raw, flags=re.DOTALL)
    raw = raw.split("</think>", 1)[-1]  # a thought whose <think> was in the prompt
    if "<think>" in raw:  # cut off while thinking: no answer yet
        raw = raw.split("<think>", 1)[0]
    answer = re.search(r"<answer>(.*?)(?:</answer>|$)", raw, flags=re.DOTALL)
    if answer:
        raw = answer.group(1)
    for special in tokenizer.all_special_tokens + list(SPECIAL_TOKENS):
        raw = raw.replace(special, "")
    return raw.strip()


def answer_labels(tokenizer: Any, ids: torch.Tensor, roles: list[str]) -> torch.Tensor:
    """IGNORE_INDEX but on what LLaMA-Factory's glm4v template trains of each answer.

    Its assistant slot is `\\n{{content}}` after the user slot's `<|assistant|>` (not trained), it adds the empty
    thought in front of a thought-less answer (trained: `with_thought`), and with efficient_eos the answer's end is
    the eos token: supervised.py labels the first token of the next turn's prompt (`<|user|>` here) with
    `<|endoftext|>` instead of itself, and appends one `<|endoftext|>` (input and label) after the last answer. So
    per answer: the `\\n`, the thought, the text, then the label `<|endoftext|>` on the position that follows it.
    A turn ends at the next role token, so message texts must not contain them.
    """
    role_ids = tokenizer.convert_tokens_to_ids(["<|system|>", "<|user|>", "<|assistant|>", "<|observation|>"])
    assistant_id = role_ids[2]
    eos_id = tokenizer.convert_tokens_to_ids(tokenizer.eos_token)
    starts = (ids == assistant_id).nonzero().flatten().tolist()
    if len(starts) != roles.count("assistant"):
        raise ValueError(
            f"the chat template made {len(starts)} <|assistant|> tokens for {roles.count('assistant')} assistant "
            "messages: a message text must not contain GLM's role tokens"
        )
    if int(ids[-1]) != eos_id:
        raise ValueError("the encoded sample must end with the <|endoftext|> encode_sample appends")
    is_role = torch.isin(ids, torch.tensor(role_ids))
    labels = torch.full_like(ids, IGNORE_INDEX)
    for a in starts:
        later = is_role[a + 1 :].nonzero().flatten()
        end = a + 1 + int(later[0]) if len(later) else len(ids) - 1  # the next role token, or the final eos
        labels[a + 1 : end] = ids[a + 1 : end]
        labels[end] = eos_id
    return labels


register_family(Glm4v())
