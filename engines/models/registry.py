"""Model families by name. A family is everything model-specific behind one interface.

Prep, the training engine and evaluation only ask a family for capabilities (load the VAE, encode
a clip, compute the training loss, build the inference pipeline), so a new family is one module
plus one `register_family` call, never an edit to the stages.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from enum import StrEnum
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch
from torch import nn

from configs.schema import ComponentConfig, ModelConfig

T = TypeVar("T")


class Capability(StrEnum):
    """What a family can do. Prep, eval and serving ask `family.can(...)` instead of testing a class or kind."""

    LATENTS = "latents"  #: prep encodes media with a VAE and captions with text encoders, cached as latents
    GENERATION = "generation"  #: `generate` makes images/videos from prompts (eval samples, serving)
    TOKEN_LOSS = "token-loss"  #: prep runs the family's processor; the loss is on answer tokens
    ANSWERS = "answers"  #: `respond` answers conversations about media (held-out answers, benchmarks)
    TRANSCRIPTION = "transcription"  #: `respond` transcribes speech (WER/CER)


class ModelFamily(ABC):
    name: str
    #: what this family can do (see Capability)
    capabilities: frozenset[Capability] = frozenset({Capability.LATENTS, Capability.GENERATION})

    def can(self, capability: Capability) -> bool:
        return capability in self.capabilities

    #: pixel frames per latent frame and pixels per latent pixel; prep validates sizes against these.
    temporal_compression: int = 1
    spatial_compression: int = 1
    #: pixel sizes must be multiples of this (VAE downsampling x transformer patch size)
    size_multiple: int = 1
    #: where the exported pipeline keeps the trained denoiser ("unet" for UNet families)
    denoiser_subfolder: str = "transformer"
    #: modules LoRA adapts by default: the attention projections, in diffusers' naming
    lora_targets: tuple[str, ...] = ("to_q", "to_k", "to_v", "to_out.0")
    #: a regex of modules LoRA must leave alone though their names match (a VLM's vision tower)
    lora_exclude: str | None = None
    #: what a generation is conditioned on besides text: None, or "image" (image-to-video)
    conditioning: str | None = None
    #: parameter-name prefixes of the vision tower (projector excluded), frozen in a full finetune unless
    #: `model.freeze_vision_tower: false`; empty for families without one
    vision_tower: tuple[str, ...] = ()

    @abstractmethod
    def frame_count_error(self, num_frames: int) -> str | None:
        """Why the VAE cannot take `num_frames`, or None when it can."""

    def latent_frame_count(self, num_frames: int) -> int | None:
        """Latent frames of a `num_frames` clip, None when the VAE cannot take it; prep's buckets pick frame counts
        whose latent length divides by the context-parallel degree with it."""
        t = self.temporal_compression
        return None if num_frames < 1 or (num_frames - 1) % t else (num_frames - 1) // t + 1

    @abstractmethod
    def load_vae(self, cfg: ModelConfig) -> nn.Module: ...

    @abstractmethod
    def load_text_encoder(self, cfg: ModelConfig) -> tuple[Any, nn.Module]: ...

    @abstractmethod
    def load_transformer(self, cfg: ModelConfig, text_embed_dim: int, latent_channels: int) -> nn.Module: ...

    @abstractmethod
    def load_scheduler(self, cfg: ModelConfig) -> Any: ...

    @abstractmethod
    def encode_video(self, vae: nn.Module, frames: torch.Tensor) -> torch.Tensor:
        """uint8 (B, T, H, W, C) -> per-sample latent distribution parameters, cached as-is."""

    @abstractmethod
    def encode_text(
        self, tokenizer: Any, encoder: nn.Module, captions: list[str], max_length: int
    ) -> torch.Tensor | dict[str, torch.Tensor]:
        """Captions -> embeddings exactly as the inference pipeline computes them.

        One (B, L, D) tensor is cached as `text_embeds`; a family with several text outputs (SD3's
        pooled + per-token states) returns {name: (B, ...)} and every name is cached and batched.
        """

    @abstractmethod
    def training_loss(
        self, transformer: nn.Module, scheduler: Any, batch: dict[str, torch.Tensor], generator: torch.Generator
    ) -> torch.Tensor: ...

    @abstractmethod
    def latent_tokens(self, transformer_config: Any, latent_shape: tuple[int, ...]) -> int:
        """Tokens the denoiser sees per sample, for tokens/s and MFU."""

    # ---- how the engine reads this family's cache (overridden by the token-loss families) ----------
    def model_args(self, record: dict[str, Any]) -> dict[str, int]:
        """Arguments `load_transformer` needs that only the cached data knows."""
        return {"text_embed_dim": record["text_shape"][-1], "latent_channels": record["latent_shape"][0] // 2}

    def bucket_key(self, record: dict[str, Any]) -> Any:
        return tuple(record["latent_shape"])

    def sample_tokens(self, transformer_config: Any, record: dict[str, Any]) -> int:
        return self.latent_tokens(transformer_config, tuple(record["latent_shape"]))

    def collate(self, items: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        """Same-bucket samples stack as they are."""
        from datasets_prep.cache import collate

        return collate(items)

    def frozen_prefixes(self, cfg: ModelConfig) -> tuple[str, ...]:
        """Parameter-name prefixes a full finetune leaves frozen (see `vision_tower`).

        Cheap and model-free, so the launchers call it before any process starts: asking a family
        without a vision tower to freeze (or train) one is a config mistake, refused here."""
        if not self.vision_tower:
            if cfg.freeze_vision_tower is not None:
                raise ValueError(
                    f"model.freeze_vision_tower applies to vision-language families; {self.name!r} has no vision "
                    "tower: remove the key"
                )
            return ()
        return self.vision_tower if cfg.freeze_vision_tower is not False else ()

    def set_trainable(self, model: nn.Module, cfg: ModelConfig) -> nn.Module:
        """Freeze `frozen_prefixes` on the model the engine trains (before LoRA and sharding, on the real
        and the meta-device copy alike). A prefix matching nothing means the layout is not the one the
        family knows, which would silently train the tower: refused."""
        prefixes = self.frozen_prefixes(cfg)
        if not prefixes:
            return model
        frozen = 0
        for name, param in model.named_parameters():
            if name.startswith(prefixes):
                param.requires_grad_(False)
                frozen += 1
        if not frozen:
            raise ValueError(f"no parameter of {type(model).__name__} is under the vision tower {prefixes}")
        return model

    def parallel_plans(self, model: nn.Module) -> dict[str, bool]:
        """Which of the engine's registered plans cover this family's trained model: tensor parallel
        (engines/torch_engine/tensor_parallel.py) and context parallel (context_parallel.py)."""
        from engines.torch_engine.context_parallel import supported_cp_models
        from engines.torch_engine.tensor_parallel import supported_tp_models

        names = {c.__name__ for c in type(model).__mro__}
        return {"tp": bool(names & set(supported_tp_models())), "cp": bool(names & set(supported_cp_models()))}

    def export_files(self, final_dir: Path) -> list[Path]:
        """Files whose presence means an export is whole (Prefect's cache checks them)."""
        return [
            final_dir / "model_index.json",
            final_dir / self.denoiser_subfolder / "diffusion_pytorch_model.safetensors",
        ]

    @abstractmethod
    def save_pretrained(self, out_dir: Path, cfg: ModelConfig, transformer: nn.Module) -> Path:
        """Export the trained model in the family's native (diffusers) layout."""

    @abstractmethod
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
    ) -> np.ndarray:
        """(N, T, H, W, C) uint8 videos from an exported checkpoint."""


_FAMILIES: dict[str, ModelFamily] = {}


def register_family(family: ModelFamily) -> ModelFamily:
    if family.name in _FAMILIES:
        raise ValueError(f"model family {family.name!r} is registered twice")
    _FAMILIES[family.name] = family
    return family


def get_family(name: str) -> ModelFamily:
    # Importing the package registers the built-in families.
    import engines.models  # noqa: F401

    try:
        return _FAMILIES[name]
    except KeyError:
        known = ", ".join(sorted(_FAMILIES)) or "none"
        raise ValueError(f"unknown model family {name!r}; known families: {known}") from None


def known_families() -> list[str]:
    import engines.models  # noqa: F401

    return sorted(_FAMILIES)


_KEPT: dict[tuple[str, ...], Any] | None = None


@contextmanager
def keep_loaded() -> Iterator[None]:
    """Inside, `loaded` hands back what it loaded before for the same key. An eval asks a family to
    generate or answer batch by batch (so work can be split across ranks and resumed), and must not
    reload a multi-GB export for every batch; outside an eval nothing is kept alive."""
    global _KEPT
    outer, _KEPT = _KEPT, {}
    try:
        yield
    finally:
        _KEPT = outer


def loaded(load: Callable[[], T], *key: Any) -> T:
    """`load()`, or inside `keep_loaded` the object loaded earlier under the same key."""
    if _KEPT is None:
        return load()
    k = tuple(str(part) for part in key)
    if k not in _KEPT:
        _KEPT[k] = load()
    return _KEPT[k]


@contextmanager
def seeded_init(seed: int):
    """Random-init presets must give the same weights in every stage and process."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def sample_latents(batch: dict[str, torch.Tensor], generator: torch.Generator) -> torch.Tensor:
    """x0 drawn from the cached VAE posterior and put in the denoiser's units: (z - shift) * scale.

    The noise comes from a CPU generator, so the same seed gives the same draw on any device.
    """
    from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

    params = batch["latent_params"]
    eps = torch.randn(params[:, : params.shape[1] // 2].shape, generator=generator).to(params.device)
    dist = DiagonalGaussianDistribution(params.float())
    view = (-1,) + (1,) * (params.ndim - 1)
    shift = batch["shift_factor"].view(view) if "shift_factor" in batch else 0.0
    return (dist.mean + dist.std * eps - shift) * batch["scaling_factor"].view(view)


GREY = 128  # the first frame an image-to-video eval starts from when it is given no image


def conditioning_images(images: list[np.ndarray] | None, prompts: list[str], height: int, width: int) -> list:
    """One (H, W, 3) uint8 first frame per prompt for an image-to-video `generate`, checked; without images every
    video starts from a mid-grey frame, which keeps evals comparable across runs without inventing content."""
    if images is None:
        return [np.full((height, width, 3), GREY, np.uint8)] * len(prompts)
    if len(images) != len(prompts):
        raise ValueError(f"generate: {len(images)} images for {len(prompts)} prompts; give one image per prompt")
    for img in images:
        if img.dtype != np.uint8 or img.ndim != 3 or img.shape[-1] != 3:
            raise ValueError(f"generate: images must be (H, W, 3) uint8 arrays, got {img.dtype} {img.shape}")
    return images


def pick_preset(comp: ComponentConfig, presets: dict[str, dict[str, Any]], what: str) -> dict[str, Any]:
    if comp.preset not in presets:
        raise ValueError(f"unknown {what} preset {comp.preset!r}; known presets: {', '.join(sorted(presets))}")
    return dict(presets[comp.preset])


def from_pretrained(cls: Any, comp: ComponentConfig, what: str, **kwargs: Any) -> Any:
    """`cls.from_pretrained` with an error that names the config key to fix."""
    assert comp.pretrained is not None
    extra = {"subfolder": comp.subfolder} if comp.subfolder else {}
    try:
        return cls.from_pretrained(comp.pretrained, **extra, **kwargs)
    except (OSError, ValueError) as exc:
        where = comp.pretrained + (f" (subfolder {comp.subfolder})" if comp.subfolder else "")
        raise FileNotFoundError(
            f"could not load the {what} from {where}: {exc}. Set model.{what}.pretrained to a local "
            "directory holding its config and weights, or use `preset: tiny` for a random init."
        ) from exc
