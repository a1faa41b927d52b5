"""A trained model as a release: the family's native layout in `final/`, whichever engine trained it.

Both engines end a finished run here (engines/loop.py calls their `export`), and `flowspeed export` turns a
torch-engine checkpoint into the same folder (engines/torch_engine/trainer.py:export_checkpoint).
"""

from __future__ import annotations

from pathlib import Path

import torch
from flowspeed.configs import PipelineConfig, save_config
from flowspeed.engines.common.io import replaced_dir


def plain_model(family, cfg: PipelineConfig, model_args: dict[str, int]) -> torch.nn.Module:  # noqa: ANN001
    """The family's model as one process builds it (with adapters when LoRA is on), on CPU."""
    model = family.load_transformer(cfg.model, **model_args)
    if cfg.train.lora.enabled:  # LoRA trains on the torch engine only (the megatron engine refuses it)
        from flowspeed.engines.torch_engine.lora import apply_lora

        apply_lora(model, cfg.train.lora, family.lora_targets, family.lora_exclude)
    return model


def export_weights(family, cfg: PipelineConfig, model_args: dict, state: dict, final_dir: Path) -> Path:  # noqa: ANN001
    """Unsharded weights -> the family's native (diffusers) layout, written beside and swapped in,
    so `final/` is always whole. With LoRA: the adapter alone, then a plain model with it merged."""
    model = plain_model(family, cfg, model_args)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(f"checkpoint does not fit {type(model).__name__}: missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]}")  # fmt: skip
    with replaced_dir(final_dir) as tmp:  # `final/` is always whole: the old one until the new one is in
        if cfg.train.lora.enabled:
            from flowspeed.engines.torch_engine.lora import merge, save_adapter

            save_adapter(model, tmp / "lora", cfg.train.lora, family.lora_targets)
            merge(model)
        family.save_pretrained(tmp, cfg.model, model)
        save_config(cfg, tmp)
    return final_dir
