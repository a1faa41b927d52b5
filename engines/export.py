"""A trained model as a release: the family's native layout in `final/`, whichever engine trained it.

Both engines end a finished run here (engines/loop.py calls their `export`), and `flowspeed export` turns a
torch-engine checkpoint into the same folder (engines/torch_engine/trainer.py:export_checkpoint).
"""

from __future__ import annotations

from pathlib import Path

import torch
from flowspeed.configs import PipelineConfig, save_config
from flowspeed.engines.common.io import replaced_dir
from flowspeed.engines.model_card import write_model_card


def plain_model(family, cfg: PipelineConfig, model_args: dict[str, int]) -> torch.nn.Module:  # noqa: ANN001
    """The family's model as one process builds it (with adapters when LoRA is on), on CPU."""
    model = family.load_transformer(cfg.model, **model_args)
    if cfg.train.lora.enabled:  # LoRA trains on the torch engine only (the megatron engine refuses it)
        from flowspeed.engines.torch_engine.lora import apply_lora

        apply_lora(model, cfg.train.lora, family.lora_targets, family.lora_exclude)
    return model


def base_model_name(cfg: PipelineConfig) -> str:
    """What an adapter records as its base model (peft's `base_model_name_or_path`): the weights' source, or
    `family/preset` for a seeded preset, which only flowspeed builds."""
    comp = cfg.model.transformer
    return comp.pretrained or f"{cfg.model.family}/{comp.preset}"


def export_weights(  # noqa: ANN001
    family, cfg: PipelineConfig, model_args: dict, state: dict, final_dir: Path, *, steps: int | None = None
) -> Path:
    """Unsharded weights -> the family's native (diffusers) layout, written beside and swapped in,
    so `final/` is always whole. With LoRA: the adapter alone, then a plain model with it merged.
    A model card (README.md, engines/model_card.py) says what made it; `steps` defaults to train.max_steps,
    the only step a run writes `final/` at (a checkpoint's export passes its own step)."""
    model = plain_model(family, cfg, model_args)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(f"checkpoint does not fit {type(model).__name__}: missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]}")  # fmt: skip
    with replaced_dir(final_dir) as tmp:  # `final/` is always whole: the old one until the new one is in
        if cfg.train.lora.enabled:
            from flowspeed.engines.torch_engine.lora import merge, save_adapter

            # peft's format, plus diffusers' LoRA file where the family's pipeline loads LoRA (see lora.py)
            save_adapter(model, tmp / "lora", base_model_name(cfg), getattr(family, "pipeline_cls", None),
                         family.denoiser_subfolder)  # fmt: skip
            merge(model)
        family.save_pretrained(tmp, cfg.model, model)
        save_config(cfg, tmp)
        write_model_card(tmp, cfg, family, steps=cfg.train.max_steps if steps is None else steps)
    return final_dir
