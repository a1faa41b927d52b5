"""What a LoRA adapter on disk says about its shape (rank, alpha, adapted modules), read without torch.

    train.lora: {enabled: true, init_from: /models/my-style-lora}

`train.lora.init_from` names an adapter trained elsewhere, in one of the formats the ecosystem shares:
- a peft `save_pretrained` folder (`adapter_config.json` + `adapter_model.safetensors`), as peft, ms-swift,
  LLaMA-Factory and flowspeed's own `final/lora/` write it;
- a diffusers LoRA file (`pytorch_lora_weights.safetensors`, as a pipeline's `save_lora_weights` writes it for
  finetrainers, DiffSynth and diffusers' own training scripts) or the folder holding one;
- `final/lora/` of a flowspeed export made before the peft format (its `{enabled, rank, alpha, ...}` JSON).

The config takes rank, alpha and target modules from the adapter (configs/schema.py) and refuses a mismatch
(configs/validate.py) at load, in milliseconds: only the JSON and the safetensors header are read. The weights
are loaded when training starts (engines/torch_engine/lora.py:load_adapter).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

PEFT_CONFIG = "adapter_config.json"  # peft.utils.CONFIG_NAME
PEFT_WEIGHTS = "adapter_model.safetensors"  # peft.utils.SAFETENSORS_WEIGHTS_NAME
DIFFUSERS_WEIGHTS = "pytorch_lora_weights.safetensors"  # diffusers' LORA_WEIGHT_NAME_SAFE
DIFFUSERS_METADATA = "lora_adapter_metadata"  # diffusers' LORA_ADAPTER_METADATA_KEY (its LoraConfig, prefixed)
TEXT_ENCODERS = ("text_encoder", "text_encoder_2", "text_encoder_3")
#: peft LoraConfig options that change what the weights mean; flowspeed's LoRA is plain LoRA, one rank and alpha
_UNSUPPORTED = ("use_dora", "use_rslora", "rank_pattern", "alpha_pattern", "modules_to_save", "lora_bias")


@dataclass(frozen=True)
class AdapterSettings:
    """The shape of an adapter: what `train.lora` must say for its weights to fit."""

    format: Literal["peft", "diffusers", "flowspeed-0"]  #: flowspeed-0: final/lora before the peft format
    weights: Path  #: the safetensors file
    rank: int
    alpha: float
    target_modules: list[str]
    component: str | None = None  #: diffusers: the pipeline component it adapts ("transformer", "unet")


def adapter_settings(path: str | Path) -> AdapterSettings:
    """The settings of the adapter at `path`; FileNotFoundError when nothing is there, ValueError (saying what
    to do) for a file that is no LoRA adapter flowspeed can start from."""
    p = Path(path).expanduser()
    if p.is_file() and p.name == PEFT_WEIGHTS and (p.parent / PEFT_CONFIG).is_file():
        p = p.parent  # peft's weights file named instead of its folder
    if p.is_dir() and (p / PEFT_CONFIG).is_file():
        return _peft_folder(p)
    weights = p / DIFFUSERS_WEIGHTS if p.is_dir() else p
    if weights.is_file() and weights.suffix == ".safetensors":
        return _diffusers_file(weights)
    if not p.exists():
        raise FileNotFoundError(f"no adapter at {p.resolve()}")
    raise ValueError(
        f"{p} is neither a peft adapter folder ({PEFT_CONFIG} + {PEFT_WEIGHTS}, as `save_pretrained` writes it) "
        f"nor a diffusers LoRA file ({DIFFUSERS_WEIGHTS} or a folder holding it, as `save_lora_weights` writes it)"
    )


def _peft_folder(folder: Path) -> AdapterSettings:
    cfg = json.loads((folder / PEFT_CONFIG).read_text())
    weights = folder / PEFT_WEIGHTS
    if not weights.is_file():
        raise ValueError(
            f"{folder} has {PEFT_CONFIG} but no {PEFT_WEIGHTS}: save the adapter with safetensors "
            "(peft's default, `save_pretrained(dir, safe_serialization=True)`)"
        )
    if "peft_type" not in cfg:
        if {"rank", "alpha", "target_modules"} <= cfg.keys():  # flowspeed's own JSON before the peft format
            return AdapterSettings("flowspeed-0", weights, int(cfg["rank"]), float(cfg["alpha"]),
                                   list(cfg["target_modules"]))  # fmt: skip
        raise ValueError(f"{folder / PEFT_CONFIG} has no peft_type: it is not a peft adapter config")
    if cfg["peft_type"] != "LORA":
        raise ValueError(f"{folder} is a {cfg['peft_type']} adapter; train.lora.init_from takes LoRA adapters")
    _refuse_options(cfg, str(folder))
    targets = cfg.get("target_modules")
    if not isinstance(targets, list):
        raise ValueError(
            f"{folder}: target_modules is {targets!r}, not a list of module names; train.lora.target_modules "
            "takes names (a regex adapter cannot be matched to flowspeed's targets)"
        )
    return AdapterSettings("peft", weights, int(cfg["r"]), float(cfg["lora_alpha"]), sorted(targets))


def _diffusers_file(file: Path) -> AdapterSettings:
    from safetensors import safe_open  # reads the header only; numpy is never asked for a tensor

    with safe_open(str(file), framework="numpy") as f:
        metadata = f.metadata() or {}
        keys = list(f.keys())
        ranks = {f.get_slice(k).get_shape()[0] for k in keys if ".lora_A." in k}
    if not keys or not all(".lora_A." in k or ".lora_B." in k for k in keys):
        raise ValueError(
            f"{file} is not a LoRA file in diffusers' peft layout (keys `<component>.<module>.lora_A.weight`): "
            "load it with the family's pipeline (`pipe.load_lora_weights`, which converts kohya and older "
            "diffusers files) and save it again with `pipe.save_lora_weights`"
        )
    components = {k.split(".", 1)[0] for k in keys}
    if text := sorted(components & set(TEXT_ENCODERS)):
        raise ValueError(f"{file} also adapts the text encoders ({', '.join(text)}); flowspeed trains the "
                         "denoiser's adapters only: save the denoiser's layers alone")  # fmt: skip
    if len(components) != 1:
        raise ValueError(f"{file} adapts several components ({', '.join(sorted(components))}); expected one denoiser")
    component = components.pop()
    if DIFFUSERS_METADATA in metadata:  # the LoraConfig the trainer saved beside the weights, keys `<component>.`
        packed = json.loads(metadata[DIFFUSERS_METADATA])
        cfg = {k.removeprefix(f"{component}."): v for k, v in packed.items() if k.startswith(f"{component}.")}
        _refuse_options(cfg, str(file))
        return AdapterSettings("diffusers", file, int(cfg["r"]), float(cfg["lora_alpha"]),
                               sorted(cfg["target_modules"]), component)  # fmt: skip
    if len(ranks) != 1:
        raise ValueError(f"{file}: the adapters have different ranks {sorted(ranks)}; train.lora has one rank")
    # No config saved: diffusers' own rule (peft_utils.get_peft_kwargs) - the adapted modules by their full
    # names, and alpha = rank (a scale of 1) where the file carries no alphas.
    rank = ranks.pop()
    modules = sorted({k.split(".", 1)[1].split(".lora_")[0] for k in keys})
    return AdapterSettings("diffusers", file, rank, float(rank), modules, component)


def _refuse_options(cfg: dict, where: str) -> None:
    used = [k for k in _UNSUPPORTED if cfg.get(k)]
    if cfg.get("bias", "none") != "none":
        used.append(f"bias={cfg['bias']}")
    if used:
        raise ValueError(
            f"{where} uses {', '.join(used)}: flowspeed trains plain LoRA (one rank and alpha, no DoRA/rsLoRA, "
            "no extra trained modules or biases), so it cannot continue this adapter"
        )
