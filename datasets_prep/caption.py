"""Captioning with vision-language models from transformers, through a registry of captioners.

    qwen2_vl   Qwen2-VL: sampled frames as images; `preset: tiny` is a random-init model with a
               byte-level tokenizer (nonsense text, real processor and generate path) for CPU tests
    llava      LLaVA-1.5 (llava-hf checkpoints): the middle frame, since it takes one image
    internvl   InternVL (-hf checkpoints): sampled frames as images

Every captioner is `AutoProcessor` + `AutoModelForImageTextToText` with the processor's chat
template, batched with left padding and greedy decoding. Captions are cached per (file content,
captioner, prompt) under `<prep>/curation/`, so re-runs caption nothing twice; each records the
model that wrote it.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flowspeed.configs.schema import CaptionConfig, PipelineConfig
from flowspeed.datasets_prep.decode import cover_size, decode
from flowspeed.datasets_prep.manifest import Entry
from flowspeed.datasets_prep.probe import ProbeError, probe
from flowspeed.engines.common.device import resolve_device
from flowspeed.engines.common.io import RecordStore, file_digest
from flowspeed.engines.common.progress import reporter
from flowspeed.engines.models.registry import seeded_init
from PIL import Image

SINGLE_IMAGE = {"llava"}


@dataclass
class VLMCaptioner:
    model: Any
    processor: Any
    identity: str
    cfg: CaptionConfig

    @torch.no_grad()
    def __call__(self, clips: list[list[Image.Image]]) -> list[str]:
        if self.cfg.model in SINGLE_IMAGE:
            clips = [[c[len(c) // 2]] for c in clips]
        texts = []
        for frames in clips:
            content = [{"type": "image"} for _ in frames] + [{"type": "text", "text": self.cfg.prompt}]
            messages = [{"role": "user", "content": content}]
            texts.append(self.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False))
        inputs = self.processor(text=texts, images=clips, return_tensors="pt", padding=True).to(self.model.device)
        out = self.model.generate(**inputs, max_new_tokens=self.cfg.max_new_tokens, do_sample=False,
                                  min_new_tokens=min(4, self.cfg.max_new_tokens))  # fmt: skip
        new = out[:, inputs["input_ids"].shape[1] :]
        decoded = self.processor.batch_decode(new, skip_special_tokens=True)
        return [" ".join(t.split()) for t in decoded]


def _pretrained(cfg: CaptionConfig, device: torch.device) -> VLMCaptioner:
    from transformers import AutoModelForImageTextToText, AutoProcessor

    try:
        processor = AutoProcessor.from_pretrained(cfg.pretrained)
        model = AutoModelForImageTextToText.from_pretrained(cfg.pretrained).to(device).eval()
    except (OSError, ValueError) as exc:
        raise FileNotFoundError(
            f"could not load captioner {cfg.model} from {cfg.pretrained}: {exc}. Set data.caption.pretrained to a "
            "local checkpoint directory (e.g. a download of Qwen/Qwen2-VL-2B-Instruct)."
        ) from exc
    processor.tokenizer.padding_side = "left"  # decoder-only generation continues from the right edge
    return VLMCaptioner(model, processor, cfg.identity(), cfg)


QWEN2_VL_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}{% for c in message['content'] %}"
    "{% if c['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif c['type'] == 'video' %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% else %}{{ c['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
QWEN2_VL_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                     "<|image_pad|>", "<|video_pad|>"]  # fmt: skip


def tiny_qwen2_vl(seed: int = 0) -> tuple[Any, Any]:
    """A 146k-parameter Qwen2-VL and its processor, built offline (no hub): Qwen2-VL's real classes."""
    from flowspeed.engines.models.tokenizer import _tokenizer_json
    from tokenizers import Tokenizer
    from transformers import (
        PreTrainedTokenizerFast,
        Qwen2VLConfig,
        Qwen2VLForConditionalGeneration,
        Qwen2VLImageProcessor,
        Qwen2VLProcessor,
    )
    from transformers.models.qwen2_vl.video_processing_qwen2_vl import Qwen2VLVideoProcessor

    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(_tokenizer_json()), pad_token="<pad>",
                                  eos_token="<|im_end|>", unk_token="<unk>", padding_side="left")  # fmt: skip
    tok.add_special_tokens({"additional_special_tokens": QWEN2_VL_SPECIALS})
    ids = {t: tok.convert_tokens_to_ids(t) for t in QWEN2_VL_SPECIALS}
    pixels = {"min_pixels": 28 * 28, "max_pixels": 56 * 56}
    processor = Qwen2VLProcessor(
        image_processor=Qwen2VLImageProcessor(**pixels),
        tokenizer=tok,
        video_processor=Qwen2VLVideoProcessor(**pixels),
        chat_template=QWEN2_VL_TEMPLATE,
    )
    config = Qwen2VLConfig(
        text_config=dict(
            vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=2,
            num_key_value_heads=1, max_position_embeddings=2048, bos_token_id=ids["<|im_start|>"],
            eos_token_id=ids["<|im_end|>"], pad_token_id=tok.pad_token_id,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [4, 6, 6]},
        ),
        vision_config=dict(depth=1, embed_dim=32, hidden_size=64, num_heads=2, patch_size=14, spatial_merge_size=2,
                           temporal_patch_size=2),
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
    )  # fmt: skip
    with seeded_init(seed):
        model = Qwen2VLForConditionalGeneration(config).eval()
    return model, processor


def _qwen2_vl(cfg: CaptionConfig, device: torch.device) -> VLMCaptioner:
    if cfg.pretrained:
        return _pretrained(cfg, device)
    if cfg.preset != "tiny":
        raise ValueError(f"unknown qwen2_vl preset {cfg.preset!r}; known presets: tiny (or set pretrained)")
    model, processor = tiny_qwen2_vl()
    return VLMCaptioner(model.to(device), processor, cfg.identity(), cfg)


def _pretrained_only(cfg: CaptionConfig, device: torch.device) -> VLMCaptioner:
    if not cfg.pretrained:
        raise ValueError(f"captioner {cfg.model} has no tiny preset: set data.caption.pretrained to its checkpoint")
    return _pretrained(cfg, device)


CAPTIONERS: dict[str, Callable[[CaptionConfig, torch.device], VLMCaptioner]] = {
    "qwen2_vl": _qwen2_vl,
    "llava": _pretrained_only,
    "internvl": _pretrained_only,
}


def load_captioner(cfg: CaptionConfig, device: torch.device) -> VLMCaptioner:
    if cfg.model not in CAPTIONERS:
        raise ValueError(f"unknown captioner {cfg.model!r}; known captioners: {', '.join(sorted(CAPTIONERS))}")
    return CAPTIONERS[cfg.model](cfg, device)


class CaptionCache:
    def __init__(self, root: Path, cfg: CaptionConfig, writer: int = 0) -> None:
        what = {"id": cfg.identity(), "prompt": cfg.prompt, "frames": cfg.frames, "max": cfg.max_new_tokens}
        tag = hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()[:12]
        self.rows = RecordStore(root, f"captions-{tag}", "content_hash", writer)

    def save(self) -> None:
        self.rows.save()


def to_images(frames: np.ndarray) -> list[Image.Image]:
    return [Image.fromarray(np.ascontiguousarray(f)) for f in frames]


def caption_items(cfg: PipelineConfig, items: list, writer: int = 0) -> list:
    """Fill in captions (missing ones, or all with `recaption`) with the configured VLM captioner."""
    c = cfg.data.caption
    if not c.enabled:
        return items
    cache = CaptionCache(cfg.prep_dir / "curation", c, writer)
    todo = []
    for e in items:
        if not isinstance(e, Entry) or (e.caption and not c.recaption) or not e.path.is_file():
            continue
        e.meta["content_hash"] = h = file_digest(e.path)
        if h in cache.rows:
            row = cache.rows.get(h)
            e.caption, e.meta["caption_model"] = row["caption"], row["caption_model"]
        else:
            todo.append(e)
    captioner = load_captioner(c, resolve_device(cfg.data.device)) if todo else None
    rep = reporter()
    rep.start("caption", len(todo))
    for start in range(0, len(todo), c.batch_size):
        batch, clips = [], []
        for e in todo[start : start + c.batch_size]:
            try:
                info = probe(e.path)
                idx = sorted({int(round(i * (info.num_frames - 1) / max(c.frames - 1, 1))) for i in range(c.frames)})
                big = min(info.height, info.width) > 448  # the processor resizes anyway: decode smaller
                frames, _ = decode(
                    info, idx, cfg.data.decoder, cover_size(info.height, info.width, 448, 448) if big else None
                )
            except ProbeError as exc:
                e.meta["caption_error"] = str(exc)
                continue
            batch.append(e)
            clips.append(to_images(frames))
        for e, text in zip(batch, captioner(clips) if clips else [], strict=True):
            e.caption, e.meta["caption_model"] = text or None, captioner.identity
            cache.rows.put({"content_hash": e.meta["content_hash"], "caption": text,
                            "caption_model": captioner.identity})  # fmt: skip
        rep.advance("caption", len(todo[start : start + c.batch_size]))
    rep.finish("caption")
    cache.save()
    return items
