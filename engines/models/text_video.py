"""Export and sampling for text-to-video families whose export is one diffusers pipeline folder (tokenizer, text
encoder, VAE, transformer, sampling scheduler) sampled prompt by prompt with the authors' negative prompt: Wan and
LTX-Video. A family sets `pipeline_cls`, `negative_prompt`, `text_length` and `sample_scheduler`, and adds what
else its pipeline call takes in `pipeline_extras`; nothing here is specific to one of them.
"""

from __future__ import annotations

from abc import abstractmethod
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flowspeed.configs.schema import ModelConfig
from flowspeed.engines.models.registry import GeneratingFamily, loaded
from torch import nn


class TextToVideoPipelineFamily(GeneratingFamily):
    """GENERATION through one diffusers text-to-video pipeline, with the text length the model trained on."""

    #: the authors' negative prompt, sampled with
    negative_prompt: str = ""
    #: the authors' text length: what a released tokenizer without a recorded `model_max_length` is padded to
    text_length: int = 512

    @abstractmethod
    def sample_scheduler(self, cfg: ModelConfig) -> Any:
        """The scheduler the export samples with (the authors' sampler; a release keeps its own)."""

    def pipeline_extras(self, pipe: Any) -> dict[str, Any]:
        """What this family's pipeline call takes besides prompt, size, steps, guidance and text length."""
        return {}

    def save_pretrained(self, out_dir: Path, cfg: ModelConfig, transformer: nn.Module) -> Path:
        """The pipeline folder. The tokenizer's `model_max_length` records the text length the model trained on, so
        `generate` pads prompts to it (the cross-attention sees the zero tail the cache had)."""
        tokenizer, encoder = self.load_text_encoder(cfg)
        tokenizer.model_max_length = cfg.max_text_length
        pipe = self.pipeline_cls(
            tokenizer=tokenizer,
            text_encoder=encoder,
            vae=self.load_vae(cfg),
            transformer=self.core_module(transformer),
            scheduler=self.sample_scheduler(cfg),
        )
        pipe.save_pretrained(out_dir, safe_serialization=True)
        return out_dir

    def generate(
        self,
        pretrained_dir: Path,
        prompts: list[str],
        *,
        num_frames: int,
        height: int,
        width: int,
        steps: int,
        guidance_scale: float,
        seed: int,
        device: torch.device,
        images: list[np.ndarray] | None = None,
    ) -> np.ndarray:
        """(N, T, H, W, 3) uint8 videos from the export's pipeline, with the authors' negative prompt; the frame
        and size rules are checked here so a bad request is refused before the pipeline loads."""
        self.check_images(images, prompts, height, width)
        if error := self.frame_count_error(num_frames):
            raise ValueError(f"generate: {error}")
        if height % self.size_multiple or width % self.size_multiple:
            raise ValueError(
                f"generate: {self.name} needs sides that are multiples of {self.size_multiple}, not {height}x{width}"
            )
        pipe = loaded(lambda: self.pipeline_cls.from_pretrained(pretrained_dir).to(device), pretrained_dir, device)
        pipe.set_progress_bar_config(disable=True)
        text_length = pipe.tokenizer.model_max_length
        text_length = text_length if text_length <= 4096 else self.text_length  # unset in a hub tokenizer: huge
        extras = self.pipeline_extras(pipe)
        videos = []
        for i, prompt in enumerate(prompts):
            video = pipe(
                prompt=prompt,
                negative_prompt=self.negative_prompt,
                num_frames=num_frames,
                height=height,
                width=width,
                num_inference_steps=steps,
                guidance_scale=guidance_scale,
                generator=torch.Generator("cpu").manual_seed(seed + i),
                max_sequence_length=text_length,
                output_type="np",
                **extras,
            ).frames[0]  # (T, H, W, C) in [0, 1]
            videos.append((np.clip(video, 0, 1) * 255).round().astype(np.uint8))
        return np.stack(videos)
