"""The latent cache: sharded safetensors whose metadata carries the index records.

Layout under the cache root:
    shards/r000-000000.safetensors   tensors `<key>/latent_params`, `<key>/text_embeds`; metadata
                                     "flowspeed.records" = JSON list of per-sample records
    index.jsonl                      every record of every shard (rebuilt from the shards)

Records live inside the shard they describe, so a shard and its index entries appear together in
one atomic rename: a SIGKILL can lose at most the shard being written, never expose half of one.
Keys are content addresses (file hash, caption, prep config hash, encoder identity): a changed
file or config adds entries, and old ones stay reusable by the runs that made them.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from datasets_prep.io import atomic_write, write_jsonl

SHARD_RE = re.compile(r"^r(\d{3})-(\d{6})\.safetensors$")
RECORDS_KEY = "flowspeed.records"


class LatentCache:
    def __init__(self, root: Path, rank: int = 0) -> None:
        self.root = Path(root)
        self.shard_dir = self.root / "shards"
        self.rank = rank

    def shards(self) -> list[Path]:
        if not self.shard_dir.is_dir():
            return []
        return sorted(p for p in self.shard_dir.iterdir() if SHARD_RE.match(p.name))

    def clean_partial(self) -> int:
        """Remove temp files a killed writer left; they were never visible as shards."""
        if not self.shard_dir.is_dir():
            return 0
        stale = [p for p in self.shard_dir.glob(f".r{self.rank:03d}-*.tmp")]
        for p in stale:
            p.unlink(missing_ok=True)
        return len(stale)

    @staticmethod
    def read_records(shard: Path) -> list[dict[str, Any]]:
        with safe_open(str(shard), framework="pt") as fh:
            meta = fh.metadata() or {}
        return json.loads(meta.get(RECORDS_KEY, "[]"))

    def records(self) -> list[dict[str, Any]]:
        """All records, first writer wins on a duplicate key."""
        seen: dict[str, dict[str, Any]] = {}
        for shard in self.shards():
            for rec in self.read_records(shard):
                seen.setdefault(rec["key"], rec)
        return list(seen.values())

    def _next_shard_path(self) -> Path:
        nums = [
            int(m.group(2)) for p in self.shards() if (m := SHARD_RE.match(p.name)) and int(m.group(1)) == self.rank
        ]
        return self.shard_dir / f"r{self.rank:03d}-{(max(nums) + 1 if nums else 0):06d}.safetensors"

    def write_shard(self, samples: list[tuple[dict[str, Any], dict[str, torch.Tensor]]]) -> Path:
        """samples: (record, {"latent_params": t, "text_embeds": t}) pairs."""
        tensors: dict[str, torch.Tensor] = {}
        records = []
        target = self._next_shard_path()
        for rec, ts in samples:
            rec = {**rec, "shard": target.name}
            for name, t in ts.items():
                tensors[f"{rec['key']}/{name}"] = t.detach().cpu().contiguous()
            records.append(rec)
        meta = {RECORDS_KEY: json.dumps(records, sort_keys=True)}
        return atomic_write(target, lambda tmp: save_file(tensors, str(tmp), metadata=meta))

    def write_index(self) -> Path:
        return write_jsonl(self.root / "index.jsonl", self.records())

    def load(
        self, record: dict[str, Any], names: tuple[str, ...] = ("latent_params", "text_embeds")
    ) -> dict[str, torch.Tensor]:
        with safe_open(str(self.shard_dir / record["shard"]), framework="pt") as fh:
            return {n: fh.get_tensor(f"{record['key']}/{n}") for n in names}
