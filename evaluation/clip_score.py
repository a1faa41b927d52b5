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
from PIL import Image

from configs import ClipConfig
from engines.models.registry import seeded_init

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


@torch.no_grad()
def video_clip_score(clip: tuple, video: np.ndarray, prompt: str, device: torch.device) -> tuple[float, float]:
    """(CLIP score, mean cosine) of one video's frames against its prompt, with a `load_clip` result."""
    model, preprocess, tokenizer = clip
    images = torch.stack([preprocess(Image.fromarray(frame)) for frame in video]).to(device)
    img = torch.nn.functional.normalize(model.encode_image(images).float(), dim=-1)
    txt = torch.nn.functional.normalize(model.encode_text(tokenizer([prompt]).to(device)).float(), dim=-1)
    cos = (img @ txt.T).squeeze(-1)  # (frames,)
    return (100 * cos.clamp(min=0)).mean().item(), cos.mean().item()


@torch.no_grad()
def clip_image_features(clip: tuple, video: np.ndarray, device: torch.device) -> np.ndarray:
    """(T, D) CLIP image features of a (T, H, W, 3) uint8 video: VBench's background-consistency encoder."""
    model, preprocess, _ = clip
    images = torch.stack([preprocess(Image.fromarray(frame)) for frame in video]).to(device)
    return model.encode_image(images).float().cpu().numpy()


def clip_score(videos: np.ndarray, prompts: list[str], cfg: ClipConfig, device: torch.device) -> dict[str, float]:
    """CLIP score (mean of 100 * max(cos, 0), torchmetrics' definition) and the raw mean cosine.

    The raw cosine is kept because a weak or random-init CLIP often scores below zero, where the
    clamped score reads 0 for every model and says nothing.
    """
    clip = load_clip(cfg, device)
    pairs = [video_clip_score(clip, video, prompt, device) for video, prompt in zip(videos, prompts, strict=True)]
    return {"clip_score": float(np.mean([s for s, _ in pairs])), "clip_cosine": float(np.mean([c for _, c in pairs]))}
