"""Cached-latent dataset and the train/validation split (sample order: engines.torch_engine.sampler)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from datasets_prep.cache import tensor_names


def split_records(records: list[dict[str, Any]], val_fraction: float) -> tuple[list[dict], list[dict]]:
    """Hash-based split: a sample stays on its side when the dataset grows."""
    if val_fraction <= 0 or len(records) < 2:
        return list(records), []
    ranked = sorted(records, key=lambda r: r["key"])
    val = [r for r in ranked if int(r["key"][:8], 16) / 0xFFFFFFFF < val_fraction]
    if not val:
        val = ranked[:1]
    val_keys = {r["key"] for r in val}
    train = [r for r in ranked if r["key"] not in val_keys]
    if not train:
        raise ValueError(f"train.val_fraction={val_fraction} leaves no training samples out of {len(records)}")
    return train, val


class CachedLatents(torch.utils.data.Dataset):
    def __init__(self, cache_dir: Path, records: list[dict[str, Any]]) -> None:
        self.shard_dir = Path(cache_dir) / "shards"
        self.records = records
        self._handles: dict[str, Any] = {}

    def __len__(self) -> int:
        return len(self.records)

    def _handle(self, shard: str) -> Any:
        if shard not in self._handles:  # safe_open memory-maps: one open per shard, not per sample
            self._handles[shard] = safe_open(str(self.shard_dir / shard), framework="pt")
        return self._handles[shard]

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        rec = self.records[i]
        fh = self._handle(rec["shard"])
        out = {n: fh.get_tensor(f"{rec['key']}/{n}") for n in tensor_names(rec)}
        if "latent_shape" in rec:  # generation families: the VAE's latent normalisation travels with the sample
            out["scaling_factor"] = torch.tensor(float(rec.get("scaling_factor", 1.0)))
            out["shift_factor"] = torch.tensor(float(rec.get("shift_factor", 0.0)))
        return out


def collate(items: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    return {k: torch.stack([it[k] for it in items]) for k in items[0]}
