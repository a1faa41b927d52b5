"""Model families by name. A family is everything model-specific behind one interface.

`ModelFamily` is the core every family has (build, train and export the trained model); capability
mixins add the rest (`LatentFamily`, `GeneratingFamily` here; the token-loss and responding mixins in
engines/models/sequence.py). Prep, the engines, eval and serving ask `family.can(Capability.X)`, never a
family's class, so a new family is one module plus one `register_family` call (and a recipe), never an
edit to the stages.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from enum import StrEnum
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import numpy as np
import torch
from flowspeed.configs.schema import ComponentConfig, ModelConfig
from torch import nn

T = TypeVar("T")


class Capability(StrEnum):
    """What a family can do. Prep, eval and serving ask `family.can(...)` instead of testing a class or kind."""

    LATENTS = "latents"  #: prep encodes media with a VAE and captions with text encoders, cached as latents
    GENERATION = "generation"  #: `generate` makes images/videos from prompts (eval samples, serving)
    TOKEN_LOSS = "token-loss"  #: prep runs the family's processor; the loss is on answer tokens
    ANSWERS = "answers"  #: `respond` answers conversations about media (held-out answers, benchmarks)
    TRANSCRIPTION = "transcription"  #: `respond` transcribes speech (WER/CER)


class ModelFamily(ABC):
    """The core every family has: what the engine needs to build, train and export the trained model.

    What a family can do beyond that comes from capability mixins, each an ABC of its own members:
    `LatentFamily` (VAE + text encoders, latents cached by prep), `GeneratingFamily` (`generate`), and in
    engines/models/sequence.py `TokenLossFamily`, `AnsweringFamily`, `TranscribingFamily`. A family class
    lists the mixins it is; `capabilities` is read off them, so no family carries a member it cannot honour.
    """

    name: str
    #: what this family can do (see Capability): derived from the capability mixins in its bases, never set
    capabilities: ClassVar[frozenset[Capability]] = frozenset()
    #: the capabilities a mixin itself adds (each capability mixin sets it in its own body)
    provides: ClassVar[tuple[Capability, ...]] = ()

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "capabilities" in cls.__dict__:
            raise TypeError(
                f"{cls.__name__} sets `capabilities`; they are derived from the capability mixins it inherits "
                "(LatentFamily, GeneratingFamily, TokenLossFamily, AnsweringFamily, TranscribingFamily)"
            )
        cls.capabilities = frozenset(c for k in cls.__mro__ for c in k.__dict__.get("provides", ()))

    def can(self, capability: Capability) -> bool:
        return capability in self.capabilities

    @staticmethod
    def core_module(model: nn.Module) -> nn.Module:
        """The model inside an engine's wrapper (DDP's `.module`), for its config and the pipelines' helpers; a
        loss still calls the wrapper, so gradients are synchronised."""
        return getattr(model, "module", model)

    #: where the export keeps the trained model: a subfolder ("transformer", "unet"), or "" for the export itself
    denoiser_subfolder: str = "transformer"
    #: modules LoRA adapts by default: the attention projections, in diffusers' naming
    lora_targets: tuple[str, ...] = ("to_q", "to_k", "to_v", "to_out.0")
    #: a regex of modules LoRA must leave alone though their names match (a VLM's vision tower)
    lora_exclude: str | None = None
    #: parameter-name prefixes of the vision tower (projector excluded), frozen in a full finetune unless
    #: `model.freeze_vision_tower: false`; empty for families without one
    vision_tower: tuple[str, ...] = ()
    #: pixel sizes of the media must be multiples of this (a latent family: VAE downsampling x patch size)
    size_multiple: int = 1

    def size_multiple_for(self, cfg: ModelConfig) -> int:
        """What pixel sides must divide by with `cfg`'s components: `size_multiple`, unless a family's VAEs compress
        differently (Wan2.1's 8x vs Wan2.2's 16x); prep checks and buckets with it."""
        return self.size_multiple

    def frame_count_error(self, num_frames: int) -> str | None:
        """Why the family cannot take `num_frames` per sample, or None when it can (config checks and prep ask
        every family; a family reading media whole takes any count)."""
        return None

    # ---- the trained model -----------------------------------------------------------------------
    @abstractmethod
    def load_transformer(self, cfg: ModelConfig, *args: Any, **model_args: Any) -> nn.Module:
        """The trainable model: a seeded preset or `pretrained:` weights; `model_args` are what only the cached
        data knows (see `model_args`)."""

    def model_args(self, record: dict[str, Any]) -> dict[str, int]:
        """Arguments `load_transformer` needs that only the cached data knows (none by default)."""
        return {}

    def load_scheduler(self, cfg: ModelConfig) -> Any:
        """What `training_loss` needs besides the model (a noise schedule); None where the loss needs nothing."""
        return None

    @abstractmethod
    def training_loss(
        self, transformer: nn.Module, scheduler: Any, batch: dict[str, torch.Tensor], generator: torch.Generator
    ) -> torch.Tensor:
        """The family's objective on one collated batch; randomness from `generator` only (a CPU generator, so a
        seed gives the same draw on any device). `transformer` may be wrapped (DDP): see `core_module`."""

    # ---- how the engine reads this family's cache ------------------------------------------------
    @abstractmethod
    def bucket_key(self, record: dict[str, Any]) -> Any:
        """Records with equal keys batch together (their cached tensors stack or pad into one batch)."""

    @abstractmethod
    def sample_tokens(self, transformer_config: Any, record: dict[str, Any]) -> int:
        """Tokens the model sees for this record, for tokens/s and MFU."""

    def collate(self, items: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        """Same-bucket samples stack as they are."""
        from flowspeed.datasets_prep.cache import collate

        return collate(items)

    # ---- what a finetune trains ------------------------------------------------------------------
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
        from flowspeed.engines.torch_engine.context_parallel import supported_cp_models
        from flowspeed.engines.torch_engine.tensor_parallel import supported_tp_models

        names = {c.__name__ for c in type(model).__mro__}
        return {"tp": bool(names & set(supported_tp_models())), "cp": bool(names & set(supported_cp_models()))}

    # ---- export ----------------------------------------------------------------------------------
    @abstractmethod
    def save_pretrained(self, out_dir: Path, cfg: ModelConfig, transformer: nn.Module) -> Path:
        """Export the trained model in the family's native (diffusers or transformers) layout."""

    @abstractmethod
    def export_files(self, final_dir: Path) -> list[Path]:
        """Files whose presence means an export is whole (Prefect's cache checks them); the first is the one
        eval and serving test for."""


class LatentFamily(ModelFamily):
    """Capability LATENTS: prep encodes media with the family's VAE and captions with its text encoder(s) and
    caches the results; the engine trains on the cached latents, with a noise schedule."""

    provides = (Capability.LATENTS,)
    #: pixel frames per latent frame and pixels per latent pixel; prep validates sizes against these.
    temporal_compression: int = 1
    spatial_compression: int = 1

    #: how a refused frame count names this family's VAE, and the frame count its authors use (the refusal's hint)
    vae_name: str = ""
    authors_frames: str = ""

    def frame_count_error(self, num_frames: int) -> str | None:
        """Why the VAE cannot take `num_frames`, or None when it can: by default a causal video VAE's rule, t*k + 1
        frames for `temporal_compression` t (a family whose VAE differs overrides this)."""
        if self.latent_frame_count(num_frames) is not None:
            return None
        t, k = self.temporal_compression, max(num_frames - 1, 0) // self.temporal_compression
        hint = f"e.g. {t * k + 1} or {t * k + t + 1}" + (f"; {self.authors_frames}" if self.authors_frames else "")
        return f"{self.vae_name or self.name}'s VAE takes {t}k+1 frames ({hint}), not {num_frames}"

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
    def load_transformer(self, cfg: ModelConfig, text_embed_dim: int, latent_channels: int) -> nn.Module:
        """The denoiser, sized to the cache's text width and latent channels (`model_args`)."""

    @abstractmethod
    def load_scheduler(self, cfg: ModelConfig) -> Any:
        """The noise schedule (or objective) `training_loss` draws timesteps and noise from."""

    def load_image_encoder(self, cfg: ModelConfig) -> tuple[Any, nn.Module] | None:
        """(processor, encoder) whose features of each clip's first frame condition the denoiser (Wan2.1 I2V's
        CLIP): prep loads it beside the VAE and hands it to `encode_video`. None for the families without one; the
        config refuses `model.image_encoder` for them (configs/schema.py IMAGE_ENCODER_FAMILIES)."""
        return None

    @abstractmethod
    def encode_video(
        self, vae: nn.Module, frames: torch.Tensor, image_encoder: tuple[Any, nn.Module] | None = None
    ) -> torch.Tensor | dict[str, torch.Tensor]:
        """uint8 (B, T, H, W, C) -> per-sample latent distribution parameters, cached as-is.

        One (B, ...) tensor is cached as `latent_params`; a family that conditions on more than the clip (an image
        encoder's features, the VAE encoding of a first-frame-only video) returns {"latent_params": ..., name:
        (B, ...)} and every name is cached and batched. Prep passes `image_encoder=(processor, encoder)` only to
        families whose `load_image_encoder` gives one, so the others keep their two-argument method.
        """

    @abstractmethod
    def encode_text(
        self, tokenizer: Any, encoder: nn.Module, captions: list[str], max_length: int
    ) -> torch.Tensor | dict[str, torch.Tensor]:
        """Captions -> embeddings exactly as the inference pipeline computes them.

        One (B, L, D) tensor is cached as `text_embeds`; a family with several text outputs (SD3's
        pooled + per-token states) returns {name: (B, ...)} and every name is cached and batched.
        """

    @abstractmethod
    def latent_tokens(self, transformer_config: Any, latent_shape: tuple[int, ...]) -> int:
        """Tokens the denoiser sees per sample, for tokens/s and MFU."""

    def model_args(self, record: dict[str, Any]) -> dict[str, int]:
        return {"text_embed_dim": record["text_shape"][-1], "latent_channels": record["latent_shape"][0] // 2}

    def bucket_key(self, record: dict[str, Any]) -> Any:
        return tuple(record["latent_shape"])

    def sample_tokens(self, transformer_config: Any, record: dict[str, Any]) -> int:
        return self.latent_tokens(transformer_config, tuple(record["latent_shape"]))

    def export_files(self, final_dir: Path) -> list[Path]:
        return [
            final_dir / "model_index.json",
            final_dir / self.denoiser_subfolder / "diffusion_pytorch_model.safetensors",
        ]


class GeneratingFamily(ModelFamily):
    """Capability GENERATION: `generate` makes images or videos from prompts with an export (eval samples,
    serving)."""

    provides = (Capability.GENERATION,)
    #: the diffusers pipeline class an export is (what `generate` loads it as)
    pipeline_cls: type
    #: what a generation is conditioned on besides text: None, or "image" (image-to-video)
    conditioning: str | None = None

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
        images: list[np.ndarray] | None = None,
    ) -> np.ndarray:
        """(N, T, H, W, C) uint8 videos from an exported checkpoint. `images` (image-to-video families only):
        one (H, W, 3) uint8 first frame per prompt; see `check_images`."""

    def denoisers(self, pipe: Any) -> list[nn.Module]:
        """The modules a sampling step calls (what eval.parallel splits and eval.cache caches): the pipeline's
        denoiser and, for a two-expert pipeline (Wan 2.2 A14B), its second one."""
        names = (self.denoiser_subfolder or "transformer", "transformer_2")
        return [m for n in names if isinstance(m := getattr(pipe, n, None), nn.Module)]

    def sampling_pipe(self, pretrained_dir: Path, device: torch.device) -> Any:
        """The export as `pipeline_cls` on `device` (kept loaded inside `keep_loaded`), set up by `ready`."""
        return self.ready(loaded(lambda: self.pipeline_cls.from_pretrained(pretrained_dir).to(device), pretrained_dir,
                                 device))  # fmt: skip

    def ready(self, pipe: T) -> T:
        """`pipe` with the active `sampling_setup` applied to its denoisers (once per module): every `generate`
        passes its loaded pipeline through here, so eval and serving parallelise or cache any family alike."""
        setup = _SAMPLING_SETUP
        if setup is not None:
            for module in self.denoisers(pipe):
                if getattr(module, "_flowspeed_sampling_setup", None) is not setup:
                    if hasattr(module, "_flowspeed_sampling_setup"):
                        raise RuntimeError(
                            f"{type(module).__name__} was set up for another sampling layout in this process; load "
                            "the export again (outside keep_loaded) to change eval.parallel or eval.cache"
                        )
                    setup(module)
                    module._flowspeed_sampling_setup = setup
        return pipe

    def check_images(
        self, images: list[np.ndarray] | None, prompts: list[str], height: int, width: int
    ) -> list[np.ndarray | None]:
        """One conditioning image per prompt for `conditioning == "image"` (mid-grey frames when none are given,
        see `conditioning_images`), else a None per prompt: a text-to-video family refuses images."""
        if self.conditioning != "image":
            if images is not None:
                raise ValueError(f"generate: {self.name} is text-to-video; it takes no images")
            return [None] * len(prompts)
        return conditioning_images(images, prompts, height, width)


_FAMILIES: dict[str, ModelFamily] = {}


def register_family(family: ModelFamily) -> ModelFamily:
    if family.name in _FAMILIES:
        raise ValueError(f"model family {family.name!r} is registered twice")
    _FAMILIES[family.name] = family
    return family


def _family_modules() -> list[str]:
    """Every module directly under engines/models, in name order (a new family's module included)."""
    import pkgutil

    from flowspeed.engines import models

    return [info.name for info in pkgutil.iter_modules(models.__path__, f"{models.__name__}.")]


def _import_family(name: str) -> None:
    """Import the module that registers family `name`, and nothing else that is not needed.

    Importing every family module means diffusers and transformers model code for families a run never
    uses (seconds, growing with the zoo), so the catalog's `module` is imported first; a family the catalog
    does not list yet is found by importing the modules under engines/models one by one until it is
    registered, so a new family works with only its own module (its catalog line is then a speed-up)."""
    import importlib

    try:
        from flowspeed.configs.catalog import FAMILIES
    except ImportError:  # an install without the config package: the scan below still finds it
        FAMILIES = {}
    facts = FAMILIES.get(name)
    if facts is not None and facts.module:
        importlib.import_module(facts.module)
        if name in _FAMILIES:
            return
    for module in _family_modules():
        importlib.import_module(module)
        if name in _FAMILIES:
            return


def get_family(name: str) -> ModelFamily:
    """The registered family `name`, importing its module (only its module) on first use."""
    if name not in _FAMILIES:
        _import_family(name)
    try:
        return _FAMILIES[name]
    except KeyError:
        known = ", ".join(known_families()) or "none"
        raise ValueError(f"unknown model family {name!r}; known families: {known}") from None


def known_families() -> list[str]:
    """Every family's name. Imports every family module (slow): for listings and tests, never a stage."""
    import importlib

    for module in _family_modules():
        importlib.import_module(module)
    return sorted(_FAMILIES)


_KEPT: dict[tuple[str, ...], Any] | None = None
_SAMPLING_SETUP: Callable[[nn.Module], None] | None = None
_FLOAT_FRAMES = False


@contextmanager
def sampling_setup(setup: Callable[[nn.Module], None] | None) -> Iterator[None]:
    """Inside, `GeneratingFamily.ready` applies `setup` (in place) to each denoiser a `generate` loads: the eval's
    context-parallel / CFG-parallel hooks and step cache. Outside, pipelines sample as loaded. Keep the same `setup`
    object for a whole eval: a denoiser kept loaded is set up once."""
    global _SAMPLING_SETUP
    outer, _SAMPLING_SETUP = _SAMPLING_SETUP, setup
    try:
        yield
    finally:
        _SAMPLING_SETUP = outer


_PAIRED: list[list[Callable[[], None]]] = []


@contextmanager
def paired_guidance(active: bool = True) -> Iterator[None]:
    """Around a pipeline call that guides with two denoiser calls per step (conditional, then unconditional on the
    same latents, both outputs combined after the second: diffusers' Wan and HunyuanVideo 1.5 pipelines): CFG
    parallelism may then run the two calls on two ranks (engines/torch_engine/sampling.py `_Pairs`). On a clean exit
    every pair must be complete, else the call raises (a half pair guided with a placeholder)."""
    if not active:
        yield
        return
    checks: list[Callable[[], None]] = []
    _PAIRED.append(checks)
    try:
        yield
    finally:
        _PAIRED.pop()
    for check in checks:
        check()


def paired_guidance_checks() -> list[Callable[[], None]] | None:
    """Inside `paired_guidance`: the list a pair-splitting denoiser registers its end-of-call check in; else None."""
    return _PAIRED[-1] if _PAIRED else None


@contextmanager
def float_frames() -> Iterator[None]:
    """Inside, `generate` returns float32 frames in [0, 1] instead of uint8: what a parity check compares (a uint8
    frame can flip a level at a rounding boundary under an error of 1e-7)."""
    global _FLOAT_FRAMES
    outer, _FLOAT_FRAMES = _FLOAT_FRAMES, True
    try:
        yield
    finally:
        _FLOAT_FRAMES = outer


def frames_out(frames: np.ndarray | torch.Tensor) -> np.ndarray:
    """Frames in [0, 1] (any float layout ending in channels) as `generate` returns them: uint8, or float32 inside
    `float_frames`."""
    if isinstance(frames, torch.Tensor):
        frames = frames.float().cpu().numpy()
    frames = np.clip(frames, 0, 1)
    return frames.astype(np.float32) if _FLOAT_FRAMES else (frames * 255).round().astype(np.uint8)


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


_PER_SAMPLE = False


@contextmanager
def per_sample_losses() -> Iterator[None]:
    """Inside, a family's `training_loss` returns one loss per sample (B,) instead of the batch mean: what
    Diffusion-DPO compares pair by pair (engines/methods/diffusion_dpo.py). Families end their objective with
    `batch_loss`, so the two are the same numbers."""
    global _PER_SAMPLE
    outer, _PER_SAMPLE = _PER_SAMPLE, True
    try:
        yield
    finally:
        _PER_SAMPLE = outer


def batch_loss(per_sample: torch.Tensor) -> torch.Tensor:
    """A family objective's last step: the (B,) per-sample losses -> their mean, or the losses themselves inside
    `per_sample_losses`."""
    return per_sample if _PER_SAMPLE else per_sample.mean()


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


def latents_and_noise(batch: dict[str, torch.Tensor], generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(x0, noise): x0 from the cached posterior (`sample_latents`), then N(0, 1) noise of its shape, drawn in
    that order from `generator`: the start of every image objective's step."""
    x0 = sample_latents(batch, generator)
    return x0, torch.randn(x0.shape, generator=generator).to(x0.device)


def uniform_timesteps(
    scheduler: Any, batch_size: int, generator: torch.Generator, device: torch.device
) -> torch.Tensor:
    """Integer timesteps t ~ U{0 .. num_train_timesteps - 1}, one per sample (the DDPM-style objectives)."""
    steps = scheduler.config.num_train_timesteps
    return torch.randint(0, steps, (batch_size,), generator=generator).to(device)


def ddpm_noised(
    batch: dict[str, torch.Tensor], scheduler: Any, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x0, noise, t, x_t) of a DDPM-style step: `latents_and_noise`, `uniform_timesteps`, then the scheduler's
    `add_noise` (the UNet families' and Hunyuan-DiT's forward process)."""
    x0, noise = latents_and_noise(batch, generator)
    t = uniform_timesteps(scheduler, x0.shape[0], generator, x0.device)
    return x0, noise, t, scheduler.add_noise(x0, noise, t)


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
