"""The latent cache: sharded safetensors whose metadata carries the index records.

Layout under the cache root:
    shards/r000-000000.safetensors   tensors `<key>/<name>` (names listed in the record's "tensors"); metadata
                                     "flowspeed.records" = JSON list of per-sample records
    index.jsonl                      every record of every shard (rebuilt from the shards)

Records live inside the shard they describe, so a shard and its index entries appear together in
one atomic rename: a SIGKILL can lose at most the shard being written, never expose half of one.
Keys are content addresses (file hash, caption, prep config hash, encoder identity): a changed
file or config adds entries, and old ones stay reusable by the runs that made them.

This module is the cache's one home: prep writes it (`LatentCache`), the engines and eval read it
(`CachedLatents`, `split_records`, `collate`).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import re
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

import torch
from flowspeed.engines.common.io import atomic_write, write_jsonl
from safetensors import safe_open
from safetensors.torch import save_file

# r<rank>-<seq>-<writer>.safetensors: the writer token keeps two runs sharing one cache from ever
# picking the same name (the old r<rank>-<seq> form is still read).
SHARD_RE = re.compile(r"^r(\d{3})-(\d{6})(?:-([0-9a-f]{8}))?\.safetensors$")
TMP_RE = re.compile(r"^\.r\d{3}-\d{6}(?:-([0-9a-f]{8}))?\.safetensors\..*\.tmp$")
RECORDS_KEY = "flowspeed.records"
log = logging.getLogger(__name__)


class LatentCache:
    """One cache directory; safe to share between runs, experiments and concurrent writers.

    A writer holds an exclusive flock on `shards/.locks/<token>.lock` for its lifetime; the kernel
    drops it when the process dies, even by SIGKILL, so `clean_partial` can tell a dead writer's
    temp files from a live one's.
    """

    def __init__(self, root: Path, rank: int = 0) -> None:
        self.root = Path(root)
        self.shard_dir = self.root / "shards"
        self.rank = rank
        self.token = uuid.uuid4().hex[:8]
        self._lock_fd: int | None = None

    def shards(self) -> list[Path]:
        if not self.shard_dir.is_dir():
            return []
        return sorted(p for p in self.shard_dir.iterdir() if SHARD_RE.match(p.name))

    def _lock_path(self, token: str) -> Path:
        return self.shard_dir / ".locks" / f"{token}.lock"

    def _hold_writer_lock(self) -> None:
        if self._lock_fd is None:
            path = self._lock_path(self.token)
            path.parent.mkdir(parents=True, exist_ok=True)
            self._lock_fd = os.open(path, os.O_CREAT | os.O_RDWR)
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)

    def _writer_alive(self, token: str | None) -> bool:
        if token is None or token == self.token:
            return token == self.token
        path = self._lock_path(token)
        if not path.exists():
            return False
        fd = os.open(path, os.O_RDWR)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True  # its owner still runs
        finally:
            os.close(fd)
        path.unlink(missing_ok=True)
        return False

    def clean_partial(self) -> int:
        """Remove temp files that dead writers left; they were never visible as shards."""
        if not self.shard_dir.is_dir():
            return 0
        removed = 0
        for p in self.shard_dir.iterdir():
            m = TMP_RE.match(p.name)
            if m and not self._writer_alive(m.group(1)):
                p.unlink(missing_ok=True)
                removed += 1
        return removed

    @staticmethod
    def read_records(shard: Path) -> list[dict[str, Any]]:
        with safe_open(str(shard), framework="pt") as fh:
            meta = fh.metadata() or {}
        return json.loads(meta.get(RECORDS_KEY, "[]"))

    def records(self) -> list[dict[str, Any]]:
        """All records, first writer wins on a duplicate key.

        An unreadable shard counts as missing (logged by name): its samples are re-encoded from their
        sources, which prep can always do, instead of one bad file stopping every later prep. It is
        left in place for `flowspeed cache verify --fix` to remove, not deleted behind the user's back.
        """
        seen: dict[str, dict[str, Any]] = {}
        for shard in self.shards():
            for rec in self._readable_records(shard) or []:
                seen.setdefault(rec["key"], rec)
        return list(seen.values())

    def _readable_records(self, shard: Path) -> list[dict[str, Any]] | None:
        """A shard's records, or None (logged with the shard's path) when it cannot be read."""
        try:
            return self.read_records(shard)
        except Exception as exc:  # safetensors raises its own error types for a damaged header
            log.warning(
                "latent cache shard %s is unreadable (%s: %s); its samples count as not cached and are re-encoded. "
                "Run `flowspeed cache verify --fix` to remove it",
                shard, type(exc).__name__, exc,
            )  # fmt: skip
            return None

    def _next_shard_path(self) -> Path:
        nums = [
            int(m.group(2)) for p in self.shards() if (m := SHARD_RE.match(p.name)) and int(m.group(1)) == self.rank
        ]
        return self.shard_dir / f"r{self.rank:03d}-{(max(nums) + 1 if nums else 0):06d}-{self.token}.safetensors"

    def write_shard(self, samples: list[tuple[dict[str, Any], dict[str, torch.Tensor]]]) -> Path:
        """samples: (record, {name: tensor}) pairs; a family stores whatever it trains on."""
        self._hold_writer_lock()
        tensors: dict[str, torch.Tensor] = {}
        records = []
        target = self._next_shard_path()
        for rec, ts in samples:
            ts = {name: t.detach().cpu().contiguous() for name, t in ts.items()}
            rec = {**rec, "shard": target.name, "digest": tensor_digest(ts), "tensors": sorted(ts)}
            for name, t in ts.items():
                tensors[f"{rec['key']}/{name}"] = t
            records.append(rec)
        meta = {RECORDS_KEY: json.dumps(records, sort_keys=True)}
        return atomic_write(target, lambda tmp: save_file(tensors, str(tmp), metadata=meta))

    def write_index(self, records: list[dict[str, Any]] | None = None) -> Path:
        """`records`: what the caller already read with `records()`, to skip a second pass over the shards."""
        return write_jsonl(self.root / "index.jsonl", self.records() if records is None else records)

    def load(self, record: dict[str, Any], names: tuple[str, ...] | None = None) -> dict[str, torch.Tensor]:
        with safe_open(str(self.shard_dir / record["shard"]), framework="pt") as fh:
            return {n: fh.get_tensor(f"{record['key']}/{n}") for n in names or tensor_names(record)}

    # ---- maintenance: `flowspeed cache list | verify | prune` ---------------------------------------
    def summary(self) -> dict[str, Any]:
        recs = self.records()
        groups = Counter((r.get("prep_hash", "?"), r.get("encoder", "?")) for r in recs)
        return {
            "root": str(self.root), "shards": len(self.shards()), "samples": len(recs),
            "bytes": sum(p.stat().st_size for p in self.shards()),
            "groups": [{"prep_hash": h, "encoder": e, "samples": n} for (h, e), n in groups.most_common()],
        }  # fmt: skip

    def verify(self) -> list[dict[str, str]]:
        """Re-read every tensor and compare it with the digest its record was written with."""
        problems = []
        for shard in self.shards():
            try:
                recs = self.read_records(shard)
                with safe_open(str(shard), framework="pt") as fh:
                    for rec in recs:
                        ts = {n: fh.get_tensor(f"{rec['key']}/{n}") for n in tensor_names(rec)}
                        if "digest" in rec and tensor_digest(ts) != rec["digest"]:
                            problems.append({"shard": shard.name, "key": rec["key"], "problem": "checksum mismatch"})
                        elif list(ts["latent_params"].shape) != rec.get(
                            "latent_shape", list(ts["latent_params"].shape)
                        ):
                            problems.append({"shard": shard.name, "key": rec["key"], "problem": "shape mismatch"})
            except Exception as exc:  # a truncated or overwritten file fails inside safetensors
                problems.append(
                    {"shard": shard.name, "key": "*", "problem": f"unreadable: {type(exc).__name__}: {exc}"}
                )
        return problems

    def remove_shards(self, names: set[str]) -> None:
        for name in names:
            (self.shard_dir / name).unlink(missing_ok=True)
        self.write_index()

    def prune(self, keep: set[str], dry_run: bool = False) -> dict[str, int]:
        """Drop every record whose key is not in `keep`; shards are rewritten atomically or deleted."""
        removed = rewritten = deleted = 0
        for shard in self.shards():
            recs = self._readable_records(shard)
            if recs is None:
                continue  # `verify --fix` removes it; prune only drops what it can read
            kept = [r for r in recs if r["key"] in keep]
            removed += len(recs) - len(kept)
            if len(kept) == len(recs) or dry_run:
                continue
            if not kept:
                shard.unlink()
                deleted += 1
                continue
            with safe_open(str(shard), framework="pt") as fh:
                tensors = {f"{r['key']}/{n}": fh.get_tensor(f"{r['key']}/{n}") for r in kept for n in tensor_names(r)}
            meta = {RECORDS_KEY: json.dumps(kept, sort_keys=True)}
            atomic_write(shard, lambda tmp, t=tensors, m=meta: save_file(t, str(tmp), metadata=m))
            rewritten += 1
        if not dry_run:
            self.write_index()
        return {"removed_samples": removed, "rewritten_shards": rewritten, "deleted_shards": deleted}


def tensor_names(record: dict[str, Any]) -> list[str]:
    """What a record stored; records written before "tensors" existed hold the CogVideoX pair."""
    return record.get("tensors", ["latent_params", "text_embeds"])


def tensor_digest(tensors: dict[str, torch.Tensor]) -> str:
    h = hashlib.blake2b(digest_size=16)
    for name in sorted(tensors):
        t = tensors[name].contiguous()
        h.update(name.encode())
        h.update(str((t.dtype, tuple(t.shape))).encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


# ---- reading the cache: what the engines and eval train and score on ------------------------------
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
