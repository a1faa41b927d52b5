"""Families trained with a token-level loss: vision-language models and speech recognition.

They share the generation families' stages (prep caches tensors, the engine trains on the cache,
eval measures and samples) but not their internals: prep runs the family's own processor (chat
template, image/video patches, log-mel features) instead of a VAE, the objective is the causal LM
loss on the answer tokens, and inference is text. The trained network is `model.transformer` in
the config: the whole VLM or ASR model (`preset: tiny` or `pretrained: <dir or hub id>`).

A family implements `load_model`, `load_processor`, `encode_sample` and `respond`; everything the
diffusion interface asks for (VAE, scheduler, latents) is answered here once.
"""

from __future__ import annotations

from abc import abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from configs.schema import ModelConfig
from engines.models.registry import Capability, ModelFamily

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


class SequenceFamily(ModelFamily):
    kind: str = "understanding"  # or "speech"
    capabilities = frozenset({Capability.TOKEN_LOSS, Capability.ANSWERS})
    denoiser_subfolder = ""  # the export is one transformers folder: final/ itself
    lora_targets = ("q_proj", "k_proj", "v_proj", "o_proj")
    #: media this family reads from a manifest entry: "image", "video", "audio"
    media: tuple[str, ...] = ("image",)

    # ---- what a family implements ---------------------------------------------------------------
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

    @abstractmethod
    def respond(
        self, pretrained_dir: Path, samples: list[SequenceSample], *, max_new_tokens: int, device: torch.device
    ) -> list[str]:
        """Greedy answers (or transcripts) from an exported model, for eval and inference."""

    # ---- shared behaviour -----------------------------------------------------------------------
    def model_args(self, record: dict[str, Any]) -> dict[str, int]:
        return {}

    def load_transformer(self, cfg: ModelConfig, text_embed_dim: int = 0, latent_channels: int = 0) -> nn.Module:
        return self.load_model(cfg)

    def load_scheduler(self, cfg: ModelConfig) -> None:
        return None

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

    # ---- the diffusion interface does not apply --------------------------------------------------
    def frame_count_error(self, num_frames: int) -> str | None:
        return None

    def _not_here(self, what: str) -> NotImplementedError:
        return NotImplementedError(f"{self.name} is a {self.kind} family: it has no {what}")

    def load_vae(self, cfg: ModelConfig) -> nn.Module:
        raise self._not_here("VAE")

    def load_text_encoder(self, cfg: ModelConfig) -> tuple[Any, nn.Module]:
        raise self._not_here("separate text encoder")

    def encode_video(self, vae: nn.Module, frames: torch.Tensor) -> torch.Tensor:
        raise self._not_here("VAE")

    def encode_text(self, tokenizer: Any, encoder: nn.Module, captions: list[str], max_length: int) -> torch.Tensor:
        raise self._not_here("text encoder")

    def latent_tokens(self, transformer_config: Any, latent_shape: tuple[int, ...]) -> int:
        raise self._not_here("latents")

    def generate(self, pretrained_dir: Path, prompts: list[str], **kwargs: Any) -> np.ndarray:
        raise self._not_here("image/video generation; use respond()")
