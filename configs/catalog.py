"""What a config may name, known without importing a model library (or pandas).

Checking `model.family`, its frame rule, its presets or `data.caption.model` through the real
registries means importing every family module, hence diffusers, transformers and torch: 10+ s before
a typo is reported. This table holds the few facts the config checks need, per registered name, and
`tests/configs/test_validation.py` holds it to the real registries (`flowspeed.engines.models.known_families()`,
each family's `frame_count_error`, `size_multiple`, `vision_tower` and the presets its loaders build,
megatron's `MODELS`, prep's `CAPTIONERS` and `DECODERS`, the task runners, the benchmarks and prompt
templates, open_clip's models), so the table cannot drift from what the stages will do.

A family that is not listed yet still works: `family_facts` asks the real registry for it (slow, it
imports the family's module, but correct), so a new family needs only its module and recipe to run;
its catalog line (which the test asks for) makes its configs fast to check.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field, replace
from functools import cache
from pathlib import Path
from typing import Any, Literal

#: "any": any frame count >= 1; "image": exactly 1; an int t: the VAE takes t*k+1 frames
FrameRule = Literal["any", "image"] | int


@dataclass(frozen=True)
class FamilyFacts:
    """What the config checks need to know about one registered model family."""

    module: str  #: the module whose import registers it (engines/models/<module>.py)
    frames: FrameRule
    size_multiple: int = 1  #: data.height/width must divide by this (VAE downsampling x patch size)
    vision_tower: bool = False  #: has a vision tower (model.freeze_vision_tower applies)
    #: model component (vae, text_encoder, transformer) -> the `preset:` names its loader builds without
    #: `pretrained:`; a component missing here is not built from the config by this family (a VLM's vae).
    #: None: not known without importing the family (not in the catalog), its loader refuses a wrong one
    presets: dict[str, tuple[str, ...]] | None = field(default_factory=dict)
    #: what the torch engine can split this family's trained model with beyond FSDP: "tp" (a tensor-parallel plan),
    #: "cp" (a context-parallel plan, ulysses/ring), "dsp" (cp_mode dsp); None: not known (not in the catalog)
    parallel: frozenset[str] | None = frozenset()
    #: the trained export's layout: "diffusers" (a pipeline folder: model_index.json + the denoiser's weights in
    #: `denoiser_subfolder`) or "transformers" (one model folder: config.json + its safetensors); what Prefect's
    #: cache checks test for, known here so a cached (no-op) stage never imports the family's model library
    export: Literal["diffusers", "transformers"] = "diffusers"
    denoiser_subfolder: str = "transformer"  #: the trained model's folder inside the export ("": the export itself)
    #: VAE presets whose sides divide by another multiple than `size_multiple` (Wan2.2's 16x VAE: 32); a pretrained
    #: VAE's own config decides at prep (the family's `size_multiple_for`)
    vae_size_multiples: dict[str, int] = field(default_factory=dict)

    def size_multiple_for(self, model: Any) -> int:
        """What data.height/width must divide by with `model`'s (a ModelConfig's) VAE preset."""
        if model.vae.pretrained is not None:
            return self.size_multiple
        return self.vae_size_multiples.get(model.vae.preset, self.size_multiple)

    def export_files(self, final_dir: Path) -> list[Path]:
        """Files whose presence means an export is whole, the first the one eval and serving test for: what the
        family's own `export_files` returns (the catalog test holds the two together)."""
        if self.export == "transformers":
            index = final_dir / "model.safetensors.index.json"  # big models save sharded weights
            return [final_dir / "config.json", index if index.exists() else final_dir / "model.safetensors"]
        return [
            final_dir / "model_index.json",
            final_dir / self.denoiser_subfolder / "diffusion_pytorch_model.safetensors",
        ]

    def frame_error(self, name: str, num_frames: int) -> str | None:
        """Why `name`'s VAE cannot take `num_frames` (the family's own rule, stated as data)."""
        if self.frames == "any":
            return None if num_frames >= 1 else f"{name} needs at least one frame, not {num_frames}"
        if self.frames == "image":
            return None if num_frames == 1 else f"{name} is an image model: it takes 1 frame, not {num_frames}"
        t = self.frames
        if num_frames >= 1 and (num_frames - 1) % t == 0:
            return None
        k = max(num_frames - 1, 0) // t
        return f"{name}'s VAE takes {t}k+1 frames (e.g. {t * k + 1} or {t * k + t + 1}), not {num_frames}"


class RegisteredFamilyFacts(FamilyFacts):
    """Facts read off a live family object: for a family the catalog does not list (yet)."""

    def __init__(self, family: Any) -> None:
        super().__init__(type(family).__module__, "any", family.size_multiple, bool(family.vision_tower), None, None)
        object.__setattr__(self, "family", family)
        object.__setattr__(self, "denoiser_subfolder", family.denoiser_subfolder)

    def frame_error(self, name: str, num_frames: int) -> str | None:
        return self.family.frame_count_error(num_frames)  # type: ignore[attr-defined]

    def export_files(self, final_dir: Path) -> list[Path]:
        return self.family.export_files(final_dir)  # type: ignore[attr-defined]


_TINY = ("tiny",)
_DIFFUSION = {"vae": _TINY, "text_encoder": _TINY, "transformer": _TINY}
_VIDEO = FamilyFacts("", 4, 16, presets=_DIFFUSION)  # 4x temporal VAE, 16-pixel multiples: CogVideoX / Open-Sora-Plan
_IMAGE = FamilyFacts("", "image", 16, presets=_DIFFUSION)
_SEQUENCE = FamilyFacts("", "any", 1, presets={"transformer": _TINY}, export="transformers", denoiser_subfolder="")
# (one transformers model, no VAE)


def _facts(module: str, like: FamilyFacts, vae: tuple[str, ...] = (), transformer: tuple[str, ...] = (),
           parallel: str = "", **changes: Any) -> FamilyFacts:  # fmt: skip
    """`like`, for the family registered by engines/models/<module>.py, with its extra vae/transformer presets and
    the torch engine's plans for it (`parallel`: space-separated)."""
    changes["parallel"] = frozenset(parallel.split())
    presets = dict(like.presets or {})
    for comp, extra in (("vae", vae), ("transformer", transformer)):
        if extra:
            presets[comp] += extra
    return replace(like, module=f"flowspeed.engines.models.{module}", presets=presets, **changes)


_OSP_VAES = ("tiny-causalvae", "wfvae-v1.3", "causalvae-v1.2-488")
_OSP_T2V = ("OpenSoraT2V-ROPE-L/122", "OpenSoraT2V_v1_3-2B/122")
_OSP_INPAINT = "OpenSoraInpaint_v1_3-2B/122"

#: every registered model family, by its `model.family` name
FAMILIES: dict[str, FamilyFacts] = {
    "cogvideox": _facts("cogvideox", _VIDEO, transformer=("2b",), parallel="tp cp"),
    "cogvideox1.5": _facts("cogvideox15", _VIDEO, transformer=("tiny-1.5",), parallel="tp cp"),
    "cogvideox_i2v": _facts("cogvideox_i2v", _VIDEO, transformer=("tiny-1.5",), parallel="tp cp"),
    "flux": _facts("flux", _IMAGE, transformer=("tiny-dev",), parallel="cp"),
    "glm4v": _facts("glm4v", _SEQUENCE, vision_tower=True),  # GLM-4.1V
    "hunyuandit": _facts("hunyuandit", _IMAGE),
    "hunyuanvideo": _facts("hunyuanvideo", _VIDEO, parallel="tp cp"),  # 4k+1 frames, 8x VAE; 2x2 patches
    "hunyuanvideo15": _facts("hunyuanvideo15", _VIDEO, parallel="tp cp"),  # 4k+1 frames, 16x VAE; 1x1 patches
    "internvl": _facts("internvl", _SEQUENCE, transformer=("tiny-3.5", "tiny-3.5-moe"), vision_tower=True),  # + 3.5
    "kolors": _facts("kolors", _IMAGE, denoiser_subfolder="unet"),
    "llava": _facts("llava", _SEQUENCE, vision_tower=True),
    "ltx": _facts("ltx", _VIDEO, parallel="cp", frames=8, size_multiple=32),  # LTX VAE: 8k+1 frames, 32x; 1x1 patch
    "opensora": _facts("opensora", _VIDEO, ("sd-vae-ft-ema",), ("STDiT-XL/2", "STDiT-XL/2-512"), "cp", frames="any"),
    "opensora1.2": _facts("opensora", _VIDEO, ("opensora-vae-v1.2",), ("STDiT3-XL/2",), "cp dsp", frames="any"),
    "opensoraplan": _facts("opensoraplan", _VIDEO, _OSP_VAES, ("tiny-v1.2", *_OSP_T2V, _OSP_INPAINT), "cp"),
    "opensoraplan_i2v": _facts("opensoraplan", _VIDEO, _OSP_VAES, (_OSP_INPAINT,), "cp"),
    "qihoo_t2x": _facts("qihoo_t2x", _VIDEO, ("causalvae-v1.2-488",), ("Qihoo-T2I-1.1B",), "cp", size_multiple=64),
    "qwen2_vl": _facts("qwen2_vl", _SEQUENCE, vision_tower=True),
    "qwen2_5_vl": _facts("qwen2_5_vl", _SEQUENCE, vision_tower=True),
    "qwen3_vl": _facts("qwen3_vl", _SEQUENCE, transformer=("tiny-moe",), vision_tower=True),  # + MoE tiny preset
    "sd3": _facts("sd3", _IMAGE, transformer=("tiny-3.5",)),
    "sdxl": _facts("sdxl", _IMAGE, denoiser_subfolder="unet"),
    # Wan2.1's VAE: 4k+1 frames, 8x; 2x2 patches (Wan2.2's `tiny-2.2`: 16x, so 32 px)
    "wan": _facts("wan", _VIDEO, ("tiny-2.2",), parallel="tp cp", vae_size_multiples={"tiny-2.2": 32}),
    # Wan2.1 I2V: Wan's VAE and patches, plus the CLIP image encoder (model.image_encoder); Wan2.2 I2V-A14B's
    # transformer without an image embedding: `tiny-2.2`
    "wan_i2v": _facts(
        "wan_i2v", replace(_VIDEO, presets={**_DIFFUSION, "image_encoder": _TINY}), (), ("tiny-2.2",), parallel="tp cp"
    ),
    "whisper": _facts("whisper", _SEQUENCE),
}

_MODELS_DIR = Path(__file__).resolve().parent.parent / "engines" / "models"


def _named_in_family_modules(name: str) -> bool:
    """Whether any module under engines/models spells `name` as a string literal: a family's name always is
    (`name = "..."`), so a typo is refused by reading ~40 small files instead of importing torch and diffusers."""
    if not _MODELS_DIR.is_dir():  # an unusual install: let the registry answer
        return True
    quoted = (f'"{name}"', f"'{name}'")
    return any(q in p.read_text(errors="replace") for p in _MODELS_DIR.rglob("*.py") for q in quoted)


@cache
def _registered(name: str) -> FamilyFacts | None:
    from flowspeed.engines.models import get_family

    try:
        return RegisteredFamilyFacts(get_family(name))
    except ValueError:
        return None


def family_facts(name: str) -> FamilyFacts | None:
    """What the checks need to know about family `name`: its catalog line, else the real registry's family (a new
    family before its catalog line exists: slow, it imports the family, but correct); None: no such family."""
    if (facts := FAMILIES.get(name)) is not None:
        return facts
    return _registered(name) if _named_in_family_modules(name) else None


#: families `train.engine: megatron` builds (engines/megatron/vlm.py MODELS), in its order
MEGATRON_FAMILIES: tuple[str, ...] = ("qwen2_vl", "llava", "qwen2_5_vl")

#: prep's captioners (datasets_prep/caption.py CAPTIONERS) -> the presets each can build without `pretrained`
CAPTIONERS: dict[str, tuple[str, ...]] = {"qwen2_vl": ("tiny",), "llava": (), "internvl": ()}

#: prep's Prefect task runners (`data.task_runner`, tasks/stages.py make_task_runner) -> the optional package each needs
TASK_RUNNERS: dict[str, str | None] = {"thread": None, "process": None, "dask": "prefect_dask", "ray": "prefect_ray"}

#: video decoders (`data.decoder`, datasets_prep/decode.py DECODERS)
DECODERS: tuple[str, ...] = ("decord", "pyav")

#: the metrics a pipeline run hands the registry gates: the eval stage's `eval/...` and `train/final_loss`
GATE_METRIC_PREFIXES: tuple[str, ...] = ("eval/", "train/")

#: flow-matching image families whose denoiser `flow_grpo` samples with an SDE (engines/methods/flow_grpo.py)
FLOW_GRPO_FAMILIES: tuple[str, ...] = ("sd3", "flux")
#: the built-in reward terms (evaluation/rewards.py) and what they score: answers ("text") or samples ("media")
REWARDS: dict[str, str] = {"exact_answer": "text", "format": "text", "brightness": "media", "clip_score": "media"}

#: where evaluation/clip_score.py adds its own open_clip model configs (beside open_clip's)
_CLIP_CONFIGS = Path(__file__).resolve().parent.parent / "evaluation" / "clip_configs"


@cache
def clip_models() -> frozenset[str] | None:
    """open_clip's model names (`eval.clip.model`, `data.curate.aesthetic.clip.model`), read from its config
    folder and ours without importing it (that imports torch); None when open_clip is not installed."""
    spec = importlib.util.find_spec("open_clip")
    if spec is None or spec.origin is None:
        return None
    folders = (Path(spec.origin).parent / "model_configs", _CLIP_CONFIGS)
    return frozenset(p.stem for folder in folders for p in folder.glob("*.json"))


#: understanding benchmarks (evaluation/benchmarks.py BENCHMARKS) and their prompt templates (PROMPT_TEMPLATES)
BENCHMARKS: tuple[str, ...] = ("mmmu", "ai2d", "chartqa", "docvqa", "infovqa")
PROMPT_TEMPLATES: tuple[str, ...] = ("default", "llava", "qwen2_vl", "internvl")
