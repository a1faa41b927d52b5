"""What a micro-batch of a token-loss family becomes on the megatron engine: the family's padded batch (`collate`)
or packed row (`pack`) with labels shifted for megatron's loss, a loss mask and the model's position ids, and the
forward step that feeds it to one model chunk.

Kept apart from trainer.py (which pulls in the shared loop, MLflow and checkpointing) so the parity tests and
anything else that only builds batches import little.
"""

from __future__ import annotations

from typing import Any

import torch
from flowspeed.engines.megatron.packing import attention_inputs
from flowspeed.engines.megatron.training import token_loss, unwrap
from flowspeed.engines.megatron.vlm import MODELS
from flowspeed.engines.models.sequence import IGNORE_INDEX, per_sample_positions

#: batch keys the chunks' vision parts read (second_per_grid_ts only shapes Qwen2.5-VL's positions)
MEDIA_KEYS = ("pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw")


def _shift(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(labels shifted left, clamped to valid ids; loss mask): megatron scores position t against token t+1."""
    shifted = torch.full_like(labels, IGNORE_INDEX)
    shifted[:, :-1] = labels[:, 1:]
    return shifted.clamp(min=0), (shifted != IGNORE_INDEX).long()


def megatron_batch(
    family: Any, hf_config: Any, items: list[dict[str, torch.Tensor]], multiple: int
) -> dict[str, torch.Tensor]:
    """A collated family batch -> what the family's megatron chunk takes: labels shifted left (megatron
    scores position t against token t+1), a loss mask, positions as the HF model computes them (3-D for
    Qwen2-VL), and the sequence padded to `multiple` (the TP size under sequence parallelism)."""
    batch = family.collate(items)
    length = batch["input_ids"].shape[1]
    pad = -length % multiple
    if pad:
        for key, value in (("input_ids", 0), ("labels", IGNORE_INDEX), ("attention_mask", 0), ("mm_token_type_ids", 0)):
            if key in batch:
                batch[key] = torch.nn.functional.pad(batch[key], (0, pad), value=value)
    labels, loss_mask = _shift(batch["labels"])
    out = {
        "input_ids": batch["input_ids"],
        "position_ids": MODELS[family.name].positions(hf_config, batch),
        "labels": labels,
        "loss_mask": loss_mask,
    }
    out.update({k: batch[k] for k in MEDIA_KEYS if k in batch})
    return out


def packed_positions(family: Any, hf_config: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Position ids of a packed row ((3, 1, L) for M-RoPE, (1, L) otherwise), each sample's as it has alone: the
    chunk's own position function (transformers' get_rope_index for the Qwen-VLs) through the shared padded-layout
    helper the torch engine uses too."""
    return per_sample_positions(batch, lambda rows: MODELS[family.name].positions(hf_config, rows))


def megatron_packed_batch(
    family: Any, hf_config: Any, items: list[dict[str, torch.Tensor]], multiple: int
) -> dict[str, torch.Tensor]:
    """The family's packed row (`pack`: the samples end to end, each one's first label masked) -> the chunk's
    inputs: `megatron_batch`'s keys, with positions restarting at each sample and `cu_seqlens` (the samples'
    boundaries, from which the forward step builds the attention's). Padding to `multiple` (sequence parallel)
    is one more segment at the end, unlabelled, so no sample attends to it."""
    batch = family.pack(items)
    positions = packed_positions(family, hf_config, batch)
    length = batch["input_ids"].shape[1]
    pad = -length % multiple
    cu = batch["cu_seqlens"].to(torch.int32)
    if pad:
        batch["input_ids"] = torch.nn.functional.pad(batch["input_ids"], (0, pad), value=0)
        batch["labels"] = torch.nn.functional.pad(batch["labels"], (0, pad), value=IGNORE_INDEX)
        positions = torch.nn.functional.pad(positions, (0, pad), value=0)
        cu = torch.cat([cu, cu.new_tensor([length + pad])])
    labels, loss_mask = _shift(batch["labels"])
    out = {"input_ids": batch["input_ids"], "position_ids": positions, "labels": labels, "loss_mask": loss_mask,
           "cu_seqlens": cu}  # fmt: skip
    out.update({k: batch[k] for k in MEDIA_KEYS if k in batch})
    return out


def vlm_forward_step(data: Any, model: Any) -> tuple[torch.Tensor, Any]:
    """One micro-batch through one chunk: a padded batch, or a packed row (`cu_seqlens`) whose attention is kept
    inside each sample the way this chunk's attention backend can (engines/megatron/packing.py)."""
    from functools import partial

    batch = next(data)
    media = {k: batch[k] for k in MEDIA_KEYS if k in batch}
    if "cu_seqlens" in batch:
        media.update(attention_inputs(unwrap(model), batch["cu_seqlens"], batch["input_ids"].shape[1]))
    out = model(batch["input_ids"], batch["position_ids"], labels=batch["labels"], **media)
    return out, partial(token_loss, batch["loss_mask"])
