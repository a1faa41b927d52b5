"""CLIP score (open_clip) between generated frames and their prompts.

`flowspeed-tiny-clip` is a random-init config registered from this package, for CPU tests and the
quickstart (no weights can be downloaded there); real use sets `eval.clip.model: ViT-B-32` and
`eval.clip.pretrained:` a local checkpoint file or an open_clip tag.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import open_clip
import torch
from flowspeed.configs import ClipConfig
from flowspeed.engines.models.registry import seeded_init
from PIL import Image

_CONFIGS = Path(__file__).parent / "clip_configs"
open_clip.add_model_config(_CONFIGS)


def load_clip(cfg: ClipConfig, device: torch.device) -> tuple[torch.nn.Module, object, object]:
    known = open_clip.list_models()
    if cfg.model not in known:
        raise ValueError(f"unknown open_clip model {cfg.model!r}; known models include: {', '.join(known[:12])}, ...")
    pretrained = cfg.pretrained
    if pretrained and Path(pretrained).suffix in {".pt", ".bin", ".safetensors"} and not Path(pretrained).is_file():
        raise FileNotFoundError(f"eval.clip.pretrained={pretrained} does not exist")
    with seeded_init(0):  # a random-init CLIP must score identically in every run
        model, _, preprocess = open_clip.create_model_and_transforms(cfg.model, pretrained=pretrained, device=device)
    return model.eval(), preprocess, open_clip.get_tokenizer(cfg.model)


def clip_score_of(cosines: torch.Tensor | np.ndarray | list[float]) -> float:
    """torchmetrics' CLIPScore over a set of (image, text) pairs: max(mean of 100 * cosine, 0).

    The clamp comes after the mean, as in torchmetrics (`CLIPScore.compute` and `clip_score`): clamping each
    frame first would lift a set of mostly negative cosines above zero.
    """
    cos = torch.as_tensor(cosines, dtype=torch.float32).flatten()
    if cos.numel() == 0:
        raise ValueError("no (image, text) pairs to score")
    return max((100 * cos).mean().item(), 0.0)


@torch.no_grad()
def frame_cosines(clip: tuple, video: np.ndarray, prompt: str, device: torch.device) -> torch.Tensor:
    """(frames,) cosine of each frame's CLIP image feature with the prompt's text feature."""
    model, preprocess, tokenizer = clip
    images = torch.stack([preprocess(Image.fromarray(frame)) for frame in video]).to(device)
    img = torch.nn.functional.normalize(model.encode_image(images).float(), dim=-1)
    txt = torch.nn.functional.normalize(model.encode_text(tokenizer([prompt]).to(device)).float(), dim=-1)
    return (img @ txt.T).squeeze(-1).cpu()


def video_clip_score(clip: tuple, video: np.ndarray, prompt: str, device: torch.device) -> tuple[float, float]:
    """(CLIP score, mean cosine) of one video's frames against its prompt: torchmetrics' CLIPScore with every
    frame paired with the prompt."""
    cos = frame_cosines(clip, video, prompt, device)
    return clip_score_of(cos), cos.mean().item()


@torch.no_grad()
def clip_image_features(clip: tuple, video: np.ndarray, device: torch.device) -> np.ndarray:
    """(T, D) CLIP image features of a (T, H, W, 3) uint8 video: VBench's background-consistency encoder."""
    model, preprocess, _ = clip
    images = torch.stack([preprocess(Image.fromarray(frame)) for frame in video]).to(device)
    return model.encode_image(images).float().cpu().numpy()


def clip_score(videos: np.ndarray, prompts: list[str], cfg: ClipConfig, device: torch.device) -> dict[str, float]:
    """CLIP score of a set of videos (torchmetrics' definition over every frame-prompt pair, so a longer video
    weighs more, as it would fed to `CLIPScore.update`) and the raw mean cosine.

    The raw cosine is kept because a weak or random-init CLIP often scores below zero, where the
    clamped score reads 0 for every model and says nothing.
    """
    clip = load_clip(cfg, device)
    cos = torch.cat([frame_cosines(clip, video, prompt, device) for video, prompt in zip(videos, prompts, strict=True)])
    return {"clip_score": clip_score_of(cos), "clip_cosine": cos.mean().item()}
