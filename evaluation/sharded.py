"""Eval work split across ranks, gathered on rank 0, and resumable after a crash.

Every eval task (generating samples, answering held-out conversations, scoring a benchmark) is a list
of N items processed by `run_sharded`:

- rank r of W takes a contiguous block of the items (contiguous so a batch of neighbours is the same
  batch on any world size that puts them on one rank, and per-item seeds follow the global index);
- it works through its block in batches of `batch_size`, appending one JSON row per item to its own
  shard file in `folder` (flushed and fsynced per batch), after the batch's media files are written;
- a rerun first reads every shard in `folder`, whatever world size wrote it, and skips the items that
  already have a row: a killed eval continues where it stopped, on the same or another world size;
- each rank's rows (read back or new) go to rank 0 with `gather_object`; rank 0 returns all N rows in
  item order, the other ranks return [].

`folder` must identify the model and settings being evaluated (callers name it by a digest of both):
rows of a different model are never reused.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from flowspeed.engines.common.progress import reporter
from flowspeed.engines.torch_engine.sampling import contiguous_block

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Ranks:
    """This rank's place in an eval job. `group` consecutive ranks make each item together (a video sampled with
    CFG / context parallelism, `eval.parallel`): items are split across the world // group groups, and only a
    group's first rank writes and returns rows."""

    rank: int = 0
    world: int = 1
    group: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def writes(self) -> bool:
        return self.rank % self.group == 0

    def shards(self) -> Ranks:
        """The item split: this rank's group among all groups."""
        return Ranks(self.rank // self.group, self.world // self.group)


def join(device: torch.device, timeout_s: int = 1800, group: int = 1) -> Ranks:
    """This process's place in a torchrun eval job (joining its process group), or a lone rank 0."""
    world = int(os.environ.get("WORLD_SIZE", 1))
    if world > 1 and not dist.is_initialized():
        from flowspeed.engines.common.device import init_process_group

        init_process_group(device, timeout_s)
    if dist.is_initialized():
        return Ranks(dist.get_rank(), dist.get_world_size(), group)
    return Ranks()


def block(n: int, ranks: Ranks) -> range:
    """Rank r's contiguous share of n items; sizes differ by at most one."""
    return contiguous_block(n, ranks.world, ranks.rank)


def contiguous_batches(indices: list[int], batch_size: int) -> Iterator[list[int]]:
    """Runs of consecutive indices, at most batch_size long (a resumed gap starts a new batch)."""
    run: list[int] = []
    for i in indices:
        if run and (i != run[-1] + 1 or len(run) == batch_size):
            yield run
            run = []
        run.append(i)
    if run:
        yield run


def task_folder(eval_dir: Path, name: str, export_files: list[Path], settings: dict[str, Any]) -> Path:
    """Where one eval task keeps its shards: named by the evaluated export (path, size and mtime of its
    files) and the settings that change its rows, so a rerun reuses rows only of the same work. The
    world size and batch size are left out on purpose: a crashed eval may resume on other ranks."""
    from flowspeed.engines.common.io import text_digest

    stamps = [f"{f.resolve()}:{f.stat().st_size}:{f.stat().st_mtime_ns}" for f in export_files if f.exists()]
    return (
        eval_dir / ".partial" / f"{name}-{text_digest(*stamps, json.dumps(settings, sort_keys=True, default=str))[:16]}"
    )


def read_rows(folder: Path) -> dict[int, dict[str, Any]]:
    """Every complete row of every shard; a line cut short by a crash is skipped."""
    rows: dict[int, dict[str, Any]] = {}
    for shard in sorted(folder.glob("rank*.jsonl")):
        for line in shard.read_text().splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(row, dict) and isinstance(row.get("index"), int):
                rows[row["index"]] = row
    return rows


def _end_cut_line(shard: Path) -> None:
    """A crash may have left half a line at the end: later rows start on a fresh one."""
    if not shard.is_file() or shard.stat().st_size == 0:
        return
    with open(shard, "rb+") as f:
        f.seek(-1, os.SEEK_END)
        if f.read(1) != b"\n":
            f.write(b"\n")


def _append(shard: Path, rows: list[dict[str, Any]]) -> None:
    with open(shard, "ab") as f:
        f.write("".join(json.dumps(r) + "\n" for r in rows).encode())
        f.flush()
        os.fsync(f.fileno())


def run_sharded(
    folder: Path,
    n: int,
    work: Callable[[list[int]], list[dict[str, Any]]],
    ranks: Ranks,
    batch_size: int = 1,
    what: str = "items",
) -> list[dict[str, Any]]:
    """`work(indices)` returns one JSON-able row per index, in order; rows gain their "index".

    Returns all n rows in order on rank 0, [] elsewhere. With `ranks.group > 1` every rank of a group calls `work`
    on the same batches (its collectives pair up), and the rows of the group's first rank are kept.
    """
    folder.mkdir(parents=True, exist_ok=True)
    shard_ranks = ranks.shards()
    mine = block(n, shard_ranks)
    done = read_rows(folder)
    rows = {i: done[i] for i in mine if i in done}
    todo = [i for i in mine if i not in done]
    if rows:
        log.info("%s: rank %d reuses %d of its %d %s from an earlier run", folder.name, ranks.rank, len(rows),
                 len(mine), what)  # fmt: skip
    shard = folder / f"rank{shard_ranks.rank:03d}-of{shard_ranks.world:03d}.jsonl"
    if ranks.writes:
        _end_cut_line(shard)
    rep = reporter()
    rep.start(what, len(todo))
    for batch in contiguous_batches(todo, batch_size):
        out = work(batch)
        if len(out) != len(batch):
            raise RuntimeError(f"eval work returned {len(out)} rows for {len(batch)} {what}")
        new = [{**row, "index": i} for i, row in zip(batch, out, strict=True)]
        if ranks.writes:
            _append(shard, new)
        rows.update((r["index"], r) for r in new)
        rep.advance(what, len(batch))
    rep.finish(what)
    local = [rows[i] for i in mine] if ranks.writes else []
    if ranks.world == 1:
        return local
    parts: list[list[dict[str, Any]]] | None = [[] for _ in range(ranks.world)] if ranks.main else None
    dist.gather_object(local, parts, dst=0)
    if not ranks.main:
        return []
    assert parts is not None
    merged = sorted((r for part in parts for r in part), key=lambda r: r["index"])
    if [r["index"] for r in merged] != list(range(n)):
        raise RuntimeError(f"gathered {len(merged)} rows for {n} {what}: a rank lost its share")
    return merged
