"""Families trained with a token-level loss: vision-language models and speech recognition.

They share the generation families' stages (prep caches tensors, the engine trains on the cache,
eval measures and samples) but not their internals: prep runs the family's own processor (chat
template, image/video patches, log-mel features) instead of a VAE, the objective is the causal LM
loss on the answer tokens, and inference is text. The trained network is `model.transformer` in
the config: the whole VLM or ASR model (`preset: tiny` or `pretrained: <dir or hub id>`).

A family subclasses `VisionLanguageFamily` or `SpeechFamily` and implements `load_model`,
`load_processor`, `encode_sample` and `respond`; it has no VAE, scheduler or latents because it is not a
`LatentFamily` (the capability mixins are below: TokenLossFamily, AnsweringFamily, TranscribingFamily).
"""

from __future__ import annotations

from abc import abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flowspeed.configs.schema import ModelConfig
from flowspeed.engines.models.registry import Capability, ModelFamily, loaded
from torch import nn

IGNORE_INDEX = -100  # label value transformers' losses skip: prompt, system and padding tokens


@dataclass
class SequenceSample:
    """One training example as prep hands it to a family, media already decoded.

    messages: [{"role": "system"|"user"|"assistant", "content": str}], images as (H, W, C) uint8,
    videos as (T, H, W, C) uint8, audio as mono float32 at `sampling_rate`; `text` is the target of
    a speech sample (its transcript).
    """

    messages: list[dict[str, str]] = field(default_factory=list)
    images: list[np.ndarray] = field(default_factory=list)
    videos: list[np.ndarray] = field(default_factory=list)
    audio: np.ndarray | None = None
    sampling_rate: int = 16000
    text: str = ""


def chat_with_media(sample: SequenceSample, system: str | None = None) -> list[dict[str, Any]]:
    """`sample.messages` as a VLM chat template takes them: the images, then the videos, as typed parts of the
    first user turn before its text; `system` first where the sample brings no system turn of its own."""
    media = [{"type": "image"}] * len(sample.images) + [{"type": "video"}] * len(sample.videos)
    out: list[dict[str, Any]] = []
    placed = not media
    if system is not None and (not sample.messages or sample.messages[0]["role"] != "system"):
        out.append({"role": "system", "content": system})
    for m in sample.messages:
        if m["role"] == "user" and not placed:
            out.append({"role": "user", "content": [*media, {"type": "text", "text": m["content"]}]})
            placed = True
        else:
            out.append({"role": m["role"], "content": m["content"]})
    if not placed:
        what = "images or videos" if sample.videos else "images"
        raise ValueError(f"the sample has {what} but no user turn to show them in")
    return out


def prompt_of(sample: SequenceSample) -> SequenceSample:
    """The sample as a prompt: an eval sample ends with its reference answer, the prompt is everything before it."""
    msgs = sample.messages
    if msgs and msgs[-1]["role"] == "assistant":
        msgs = msgs[:-1]
    return SequenceSample(messages=msgs, images=sample.images, videos=sample.videos)


class TokenLossFamily(ModelFamily):
    """Capability TOKEN_LOSS: prep runs the family's own processor (chat template, media patches, log-mel
    features) and caches its tensors; the loss is transformers' causal LM loss on the answer tokens."""

    provides = (Capability.TOKEN_LOSS,)
    denoiser_subfolder = ""  # the export is one transformers folder: final/ itself
    lora_targets = ("q_proj", "k_proj", "v_proj", "o_proj")
    #: media this family reads from a manifest entry: "image", "video", "audio"
    media: tuple[str, ...] = ("image",)

    @abstractmethod
    def load_model(self, cfg: ModelConfig) -> nn.Module:
        """The trainable model: a seeded tiny preset, or from_pretrained(cfg.transformer.pretrained)."""

    @abstractmethod
    def load_processor(self, cfg: ModelConfig) -> Any:
        """Tokenizer + media processor; built offline for the tiny preset, from_pretrained otherwise."""

    @abstractmethod
    def encode_sample(self, processor: Any, sample: SequenceSample, max_length: int) -> dict[str, torch.Tensor]:
        """One example -> the tensors the model's forward takes, cached as-is by prep.

        Always `input_ids` (L,) and `labels` (L,) with IGNORE_INDEX everywhere but the answer tokens
        (assistant turns, or the transcript); plus whatever the processor makes for media
        (pixel_values, image_grid_thw, input_features...). Raise ValueError for an unusable sample
        (no assistant turn, too long): prep records it as a rejection.
        """

    def load_transformer(self, cfg: ModelConfig, text_embed_dim: int = 0, latent_channels: int = 0) -> nn.Module:
        """`load_model`: the cache sizes nothing of a token-loss model (the engine's call takes the latent
        families' arguments too)."""
        return self.load_model(cfg)

    def bucket_key(self, record: dict[str, Any]) -> Any:
        """Batches stack without padding only when shapes agree: bucket by every cached shape."""
        return tuple(sorted((k, tuple(v)) for k, v in record.get("shapes", {}).items()))

    def sample_tokens(self, transformer_config: Any, record: dict[str, Any]) -> int:
        return int(record["shapes"]["input_ids"][0])

    #: token rows right-padded to the longest, with these values. Pad ids are 0 (a byte token):
    #: the attention mask and IGNORE_INDEX labels hide them, and 0 is never a media placeholder id.
    pad_values: dict[str, int] = {"input_ids": 0, "labels": IGNORE_INDEX, "attention_mask": 0}
    #: media tensors concatenated on dim 0 (patches, tiles, grids): how these VLMs batch media
    concat_keys: tuple[str, ...] = ("pixel_values",)

    def collate(self, items: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        from torch.nn.utils.rnn import pad_sequence

        batch: dict[str, torch.Tensor] = {}
        for key, value in self.pad_values.items():
            if key in items[0]:
                batch[key] = pad_sequence([it[key] for it in items], batch_first=True, padding_value=value)  # (B, L)
        for key in self.concat_keys:
            parts = [it[key] for it in items if key in it]
            if parts:
                batch[key] = torch.cat(parts, dim=0)  # (sum over the batch, ...) in token order
        return batch

    def training_loss(
        self, transformer: nn.Module, scheduler: Any, batch: dict[str, torch.Tensor], generator: torch.Generator
    ) -> torch.Tensor:
        """transformers' own shifted cross-entropy over the labelled (answer) tokens."""
        return transformer(**batch).loss

    def export_files(self, final_dir: Path) -> list[Path]:
        index = final_dir / "model.safetensors.index.json"  # big models save sharded weights
        return [final_dir / "config.json", index if index.exists() else final_dir / "model.safetensors"]

    def save_pretrained(self, out_dir: Path, cfg: ModelConfig, transformer: nn.Module) -> Path:
        out_dir.mkdir(parents=True, exist_ok=True)
        transformer.save_pretrained(out_dir, safe_serialization=True)
        self.load_processor(cfg).save_pretrained(out_dir)
        return out_dir


class RespondingFamily(ModelFamily):
    """What ANSWERS and TRANSCRIPTION share: `respond` turns media (and a conversation) into text with an
    export. A family is one of the two mixins below, which say what the text is."""

    @abstractmethod
    def respond(
        self, pretrained_dir: Path, samples: list[SequenceSample], *, max_new_tokens: int, device: torch.device
    ) -> list[str]:
        """Greedy answers (or transcripts) from an exported model, for eval and inference."""


class AnsweringFamily(RespondingFamily):
    """Capability ANSWERS: `respond` answers conversations about images or videos (held-out answers,
    benchmarks; serving takes a prompt and an optional image)."""

    provides = (Capability.ANSWERS,)


class TranscribingFamily(RespondingFamily):
    """Capability TRANSCRIPTION: `respond` transcribes speech (WER/CER; serving takes an audio file)."""

    provides = (Capability.TRANSCRIPTION,)


class SequenceFamily(TokenLossFamily, RespondingFamily):
    """The VLMs' and the speech families' common base: trained on the token loss, read by `respond`.
    A concrete family adds what its answers are: `VisionLanguageFamily` or `SpeechFamily`."""

    @property
    def kind(self) -> str:
        """A label for people and cache records ("speech" or "understanding"); code asks `can(...)`."""
        return "speech" if self.can(Capability.TRANSCRIPTION) else "understanding"


class VisionLanguageFamily(SequenceFamily, AnsweringFamily):
    """A VLM: conversations about images/videos in, answers out (TOKEN_LOSS + ANSWERS)."""

    #: the transformers class an export loads as (`load_export`)
    model_cls: type

    def load_export(self, pretrained_dir: Path, device: torch.device) -> tuple[nn.Module, Any]:
        """(model in eval mode on `device`, processor) of an export, kept across batches inside `keep_loaded`."""
        from transformers import AutoProcessor

        model = loaded(lambda: self.model_cls.from_pretrained(pretrained_dir).to(device).eval(), pretrained_dir, device)
        processor = loaded(lambda: AutoProcessor.from_pretrained(pretrained_dir), pretrained_dir, "processor")
        return model, processor


class SpeechFamily(SequenceFamily, TranscribingFamily):
    """Speech recognition: audio in, transcript out (TOKEN_LOSS + TRANSCRIPTION)."""

    media = ("audio",)
