"""Export and sampling for video families whose export is one diffusers pipeline folder (tokenizer, text encoder,
VAE, transformer, sampling scheduler) sampled prompt by prompt with the authors' negative prompt: Wan (and its I2V and
Wan2.2 variants), LTX-Video, HunyuanVideo and HunyuanVideo 1.5. A family sets `pipeline_cls`, `negative_prompt`,
`text_length` and `sample_scheduler`, adds what else its pipeline call takes in `pipeline_extras` (or changes the
call in `pipeline_call`), and overrides the few hooks where its export differs (`pipeline_denoisers`,
`export_size_multiple`, `first_frames`, `sampling_pipeline`); nothing here is specific to one of them.
"""

from __future__ import annotations

from abc import abstractmethod
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flowspeed.configs.schema import ModelConfig
from flowspeed.engines.models.registry import GeneratingFamily, frames_out, loaded, paired_guidance
from PIL import Image
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

    def paired_guidance(self, pipe: Any, call: dict[str, Any]) -> bool:
        """Whether `pipe`, called with `call`, guides with two denoiser calls per step (conditional, then unconditional
        on the same latents) at every step, which CFG parallelism can run on two ranks (registry.paired_guidance).
        False: one call per step, on a doubled batch or unguided."""
        return False

    def pipeline_call(self, pipe: Any, guidance_scale: float) -> dict[str, Any]:
        """The pipeline call's negative prompt, guidance and text length (what a family's pipeline takes differently,
        it overrides: Wan2.2 A14B adds the low-noise expert's scale, HunyuanVideo 1.5 sets its guider), plus
        `pipeline_extras`. The text length is the one the model trained on, recorded in the export's tokenizer by
        `save_pretrained`."""
        length = pipe.tokenizer.model_max_length
        length = length if length <= 4096 else self.text_length  # unset in a hub tokenizer: huge
        return {"negative_prompt": self.negative_prompt, "guidance_scale": guidance_scale,
                "max_sequence_length": length, **self.pipeline_extras(pipe)}  # fmt: skip

    def export_size_multiple(self, folder: Path) -> int:
        """What the sides a generation asks for must divide by with this export (its VAE's factor x the patch)."""
        return self.size_multiple

    def first_frames(
        self, folder: Path, images: list[np.ndarray] | None, prompts: list[str], height: int, width: int
    ) -> list[np.ndarray | None]:
        """One first frame per prompt where this export is conditioned on one, else a None per prompt (see
        `check_images`: a text-to-video export refuses images)."""
        return self.check_images(images, prompts, height, width)

    def sampling_pipeline(self, folder: Path, device: torch.device, with_images: bool) -> Any:
        """The export loaded as `pipeline_cls` (kept loaded across calls, see `loaded`)."""
        return loaded(lambda: self.pipeline_cls.from_pretrained(folder).to(device), folder, device)

    def pipeline_denoisers(self, cfg: ModelConfig, transformer: nn.Module) -> dict[str, Any]:
        """The export pipeline's denoiser arguments: the trained model as `transformer`, plus what a family's
        pipeline keeps beside it (Wan2.2 A14B: the other expert and the boundary)."""
        return {"transformer": self.core_module(transformer)}

    def pipeline_components(self, cfg: ModelConfig) -> dict[str, Any]:
        """What else the export pipeline holds (Wan2.1 I2V: its image processor and encoder)."""
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
            scheduler=self.sample_scheduler(cfg),
            **self.pipeline_components(cfg),
            **self.pipeline_denoisers(cfg, transformer),
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
        """(N, T, H, W, 3) uint8 videos from the export's pipeline, prompt by prompt (each from its own seed, so a
        prompt's video does not depend on the others), called with `pipeline_call`'s arguments (the authors' negative
        prompt, guidance, text length) and, for an image-conditioned export, each prompt's first frame; the frame,
        size and image rules are checked before the pipeline loads."""
        folder = Path(pretrained_dir)
        firsts = self.first_frames(folder, images, prompts, height, width)
        if error := self.frame_count_error(num_frames):
            raise ValueError(f"generate: {error}")
        multiple = self.export_size_multiple(folder)
        if height % multiple or width % multiple:
            raise ValueError(
                f"generate: {self.name} needs sides that are multiples of {multiple}, not {height}x{width}"
            )
        pipe = self.ready(self.sampling_pipeline(folder, device, with_images=any(f is not None for f in firsts)))
        pipe.set_progress_bar_config(disable=True)
        call = self.pipeline_call(pipe, guidance_scale)
        videos = []
        for i, (prompt, first) in enumerate(zip(prompts, firsts, strict=True)):
            image = {} if first is None else {"image": Image.fromarray(first)}
            with paired_guidance(self.paired_guidance(pipe, call)):
                video = pipe(
                    prompt=prompt,
                    num_frames=num_frames,
                    height=height,
                    width=width,
                    num_inference_steps=steps,
                    generator=torch.Generator("cpu").manual_seed(seed + i),
                    output_type="np",
                    **image,
                    **call,
                ).frames[0]  # (T, H, W, C) in [0, 1]
            videos.append(frames_out(video))
        return np.stack(videos)
