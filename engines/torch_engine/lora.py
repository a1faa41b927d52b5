"""LoRA applied to a denoiser from outside it (peft through diffusers' adapter API).

    train.lora: {enabled: true, rank: 16, alpha: 16}

`apply_lora` freezes the base weights and adds trainable adapters; `save_adapter` writes only the
adapter tensors (safetensors); `load_adapter` puts them back into a model with the same adapters;
`merge` folds them into the base weights and removes the adapter layers, for a plain export.
"""

from __future__ import annotations

import json
from pathlib import Path

from flowspeed.configs.schema import LoraConfig
from flowspeed.engines.common.io import atomic_write, atomic_write_text
from peft import LoraConfig as PeftLoraConfig
from peft import get_peft_model_state_dict, inject_adapter_in_model, set_peft_model_state_dict
from safetensors.torch import load_file, save_file
from torch import nn

ADAPTER_FILE = "adapter_model.safetensors"


def apply_lora(
    model: nn.Module, cfg: LoraConfig, default_targets: tuple[str, ...], exclude: str | None = None
) -> nn.Module:
    """`exclude`: a regex of modules the targets must not reach (a VLM's vision tower shares names)."""
    targets = list(cfg.target_modules or default_targets)
    missing = [t for t in targets if not any(name.endswith(t) for name, _ in model.named_modules())]
    if missing:
        raise ValueError(f"train.lora.target_modules {missing} match no module of {type(model).__name__}")
    config = PeftLoraConfig(r=cfg.rank, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, target_modules=targets,
                            init_lora_weights=True, exclude_modules=exclude)  # fmt: skip
    if hasattr(model, "fuse_lora"):  # diffusers models: their own adapter API
        model.add_adapter(config)
    else:
        # transformers 5's add_adapter demands a newer peft than PyPI has; peft's injection is what it wraps.
        inject_adapter_in_model(config, model, adapter_name="default")  # freezes the base, adapters trainable
        model.peft_config = {"default": config}  # what get/set_peft_model_state_dict read
    return model


def save_adapter(model: nn.Module, out_dir: Path, cfg: LoraConfig, default_targets: tuple[str, ...]) -> Path:
    state = {k: v.detach().cpu().contiguous() for k, v in get_peft_model_state_dict(model).items()}
    out_dir.mkdir(parents=True, exist_ok=True)
    meta = {**cfg.model_dump(), "target_modules": list(cfg.target_modules or default_targets)}
    atomic_write_text(out_dir / "adapter_config.json", json.dumps(meta, indent=2))
    return atomic_write(out_dir / ADAPTER_FILE, lambda tmp: save_file(state, str(tmp)))


def load_adapter(model: nn.Module, adapter_dir: Path) -> nn.Module:
    result = set_peft_model_state_dict(model, load_file(str(Path(adapter_dir) / ADAPTER_FILE)))
    if getattr(result, "unexpected_keys", None):
        raise ValueError(f"adapter {adapter_dir} does not fit this model: unexpected {result.unexpected_keys[:5]}")
    return model


def merge(model: nn.Module) -> nn.Module:
    """Fold the adapters into the base weights and put the plain layers back."""
    if hasattr(model, "fuse_lora"):  # diffusers models
        model.fuse_lora()
        model.unload_lora()  # the fused weights stay; the adapter layers go
        return model
    from diffusers.utils.peft_utils import recurse_remove_peft_layers
    from peft.tuners.tuners_utils import BaseTunerLayer

    for module in model.modules():
        if isinstance(module, BaseTunerLayer):
            module.merge(safe_merge=True)
    recurse_remove_peft_layers(model)
    if hasattr(model, "peft_config"):
        del model.peft_config
    return model
