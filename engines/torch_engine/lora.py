"""LoRA applied to a denoiser from outside it (peft through diffusers' adapter API), in the ecosystem's formats.

    train.lora: {enabled: true, rank: 16, alpha: 16}            # or init_from: <peft folder | diffusers file>

`apply_lora` freezes the base weights and adds trainable adapters; `save_adapter` writes them as peft's
`PeftModel.save_pretrained` does (`adapter_config.json` + `adapter_model.safetensors`, so
`PeftModel.from_pretrained(base, final/lora)` loads them) and, for a family whose diffusers pipeline loads LoRA,
diffusers' `pytorch_lora_weights.safetensors` through the pipeline's own `save_lora_weights` (so
`pipe.load_lora_weights(final/lora)` does); `load_adapter` puts any of those (or a flowspeed export's older
`final/lora`) into a model with the same adapters, which is how `train.lora.init_from` starts a run; `merge` folds
the adapters into the base weights and removes the adapter layers, for a plain export.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

from flowspeed.configs.adapters import PEFT_WEIGHTS, adapter_settings
from flowspeed.configs.schema import LoraConfig
from flowspeed.engines.common.io import atomic_write
from peft import LoraConfig as PeftLoraConfig
from peft import get_peft_model_state_dict, inject_adapter_in_model, set_peft_model_state_dict
from peft.utils import load_peft_weights
from safetensors.torch import save_file
from torch import nn

ADAPTER_FILE = PEFT_WEIGHTS
#: where PeftModel keeps the wrapped model: `PeftModel.save_pretrained` writes every key under this prefix
PEFT_PREFIX = "base_model.model."


def apply_lora(
    model: nn.Module, cfg: LoraConfig, default_targets: tuple[str, ...], exclude: str | None = None
) -> nn.Module:
    """`exclude`: a regex of modules the targets must not reach (a VLM's vision tower shares names)."""
    targets = list(cfg.target_modules or default_targets)
    missing = [t for t in targets if not any(name.endswith(t) for name, _ in model.named_modules())]
    if missing:
        source = f" (taken from the adapter {cfg.init_from})" if cfg.init_from else ""
        raise ValueError(f"train.lora.target_modules {missing}{source} match no module of {type(model).__name__}")
    config = PeftLoraConfig(r=cfg.rank, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, target_modules=targets,
                            init_lora_weights=True, exclude_modules=exclude)  # fmt: skip
    if hasattr(model, "fuse_lora"):  # diffusers models: their own adapter API
        model.add_adapter(config)
    else:
        # transformers 5's add_adapter demands a newer peft than PyPI has; peft's injection is what it wraps.
        inject_adapter_in_model(config, model, adapter_name="default")  # freezes the base, adapters trainable
        model.peft_config = {"default": config}  # what get/set_peft_model_state_dict read
    return model


def save_adapter(
    model: nn.Module, out_dir: Path, base_model: str, pipeline_cls: type | None = None, component: str = "transformer"
) -> Path:
    """The adapters of `model` in peft's format, plus diffusers' LoRA file when `pipeline_cls` loads LoRA into
    its `component`. `base_model`: what peft records as `base_model_name_or_path` (the weights' source).
    The export calls it on its staging folder (engines/export.py), which is swapped in whole, so the libraries'
    own writers (peft's config, diffusers' LoRA file) need no atomic rename of their own."""
    config = copy.deepcopy(model.peft_config["default"])
    config.base_model_name_or_path = base_model
    config.inference_mode = True  # as PeftModel.save_pretrained writes it
    state = {k: v.detach().cpu().contiguous() for k, v in get_peft_model_state_dict(model).items()}
    out_dir.mkdir(parents=True, exist_ok=True)
    # PeftModel.save_pretrained's file: the adapter state under the wrapper's prefix, config via peft's own writer
    # (task_type None: the auto mapping names the base class, as peft writes it for AutoPeftModel).
    wrapped = {PEFT_PREFIX + k: v for k, v in state.items()}
    atomic_write(out_dir / ADAPTER_FILE, lambda tmp: save_file(wrapped, str(tmp), metadata={"format": "pt"}))
    mapping = {"base_model_class": type(model).__name__, "parent_library": type(model).__module__}
    config.save_pretrained(str(out_dir), auto_mapping_dict=mapping)
    if pipeline_cls is not None and component in getattr(pipeline_cls, "_lora_loadable_modules", ()):
        # what diffusers' training scripts write (train_dreambooth_lora_*.py: the layers + _collate_lora_metadata)
        layers = {f"{component}_lora_layers": state, f"{component}_lora_adapter_metadata": config.to_dict()}
        pipeline_cls.save_lora_weights(str(out_dir), **layers)
    return out_dir


def load_adapter(
    model: nn.Module, path: str | Path, pipeline_cls: type | None = None, component: str = "transformer"
) -> nn.Module:
    """Adapter weights from `path` (a peft folder, a diffusers LoRA file or folder read by `pipeline_cls`, or an
    older flowspeed `final/lora`) into `model`, which has adapters of the same rank on the same modules. An
    adapter that leaves one of the model's adapters without weights, or has weights for modules the model does
    not adapt, is refused: loading part of it would train from a state nobody made."""
    found = adapter_settings(path)
    if found.format == "diffusers":
        if pipeline_cls is None or not hasattr(pipeline_cls, "lora_state_dict"):
            raise ValueError(f"{path} is a diffusers LoRA file; {type(model).__name__} has no diffusers pipeline that "
                             "reads one: give a peft adapter folder (save_pretrained)")  # fmt: skip
        state: Any = pipeline_cls.lora_state_dict(str(found.weights.parent), weight_name=found.weights.name)
        state = state[0] if isinstance(state, tuple) else state  # some mixins also return network alphas
        prefix = f"{found.component or component}."
        state = {k.removeprefix(prefix): v for k, v in state.items() if k.startswith(prefix)}
    else:  # peft's reader; flowspeed's older files hold the same keys without the wrapper prefix
        state = load_peft_weights(str(found.weights.parent))
    try:
        result = set_peft_model_state_dict(model, state)
    except RuntimeError as exc:  # a size mismatch: another base model or rank
        raise ValueError(f"the adapter {path} does not fit {type(model).__name__}: {exc}") from None
    missing = [k for k in result.missing_keys if ".lora_" in k]
    if missing or result.unexpected_keys:
        raise ValueError(
            f"the adapter {path} does not fit {type(model).__name__} with train.lora's targets: {len(missing)} "
            f"adapted weights are not in it (e.g. {missing[:3]}), {len(result.unexpected_keys)} of its weights have "
            f"no adapter here (e.g. {result.unexpected_keys[:3]}); was it trained on this base model?"
        )
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
