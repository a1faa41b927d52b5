"""The prep stage: manifest -> probe -> bucket -> decode -> VAE/text encode -> latent cache.

    flowspeed prep configs/quickstart.yaml                      # one process
    flowspeed prep configs/quickstart.yaml --set data.nproc_per_node=2   # torchrun, one slice per rank

Idempotent: samples whose content key is already cached are neither decoded nor encoded, and the
encoders are not even loaded when nothing is new. Under torchrun each rank takes the manifest
records i with i % world == rank, writes its own shards (`r<rank>-*`) and a part file; rank 0
merges the parts. A preference pair (manifest rows {"caption", "chosen", "rejected"}: Diffusion-DPO's data) is one
sample: the rejected file is probed and checked like any clip, decoded at the chosen one's bucket and cached beside
it (`rejected_latent_params`, ...; text once), under a key over both files; its failure rejects the pair. SFT on
such a cache trains the chosen side. Outputs (under `cfg.prep_dir`):
    cache/            the latent cache (see flowspeed.datasets_prep.cache)
    samples.jsonl     the records this run's manifest and config select: the training set
    rejects.jsonl     {"path", "stage", "reason", "code"} per unusable record or file
    summary.json      counts (per rejection reason too); config.yaml the resolved config
"""

from __future__ import annotations

import json
import os
import time
from collections import Counter, defaultdict, deque
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from itertools import islice
from pathlib import Path
from typing import Any

import torch
from flowspeed.configs import DataConfig, PipelineConfig, save_config
from flowspeed.datasets_prep.buckets import Bucket, assign, drop_minorities
from flowspeed.datasets_prep.cache import LatentCache
from flowspeed.datasets_prep.caption import caption_items
from flowspeed.datasets_prep.curate import SceneCache, clip_view, curate, dedup, write_scene_clip
from flowspeed.datasets_prep.decode import cover_size, decode, resize_center_crop, sample_indices
from flowspeed.datasets_prep.manifest import Entry, EscapedRoot, Rejection, media_digest, opened_under, read_sources
from flowspeed.datasets_prep.probe import IMAGE_SUFFIXES, MediaInfo, ProbeError, probe
from flowspeed.datasets_prep.sequence_prep import sequence_slice
from flowspeed.engines.common.device import resolve_device, torch_dtype
from flowspeed.engines.common.io import atomic_write_text, file_digest, read_jsonl, text_digest, write_jsonl
from flowspeed.engines.common.progress import reporter
from flowspeed.engines.models import ModelFamily, get_family
from flowspeed.engines.models.registry import Capability
from torch.distributed.elastic.multiprocessing.errors import record


@dataclass
class PrepResult:
    prep_dir: str
    samples: str
    rejects: str
    index: str
    num_samples: int
    num_rejected: int
    num_cached: int
    num_encoded: int
    encoder_calls: int
    seconds: float
    rejected_by_reason: dict[str, int] = field(default_factory=dict)
    world_size: int = 1
    num_records: int = 0  # manifest records read (in); num_samples are kept, num_rejected dropped
    encoded_frames: int = 0
    # The published samples.jsonl's content hash: a cached result whose file has since been replaced (by another
    # manifest's prep, or a killed one's publication) can be told from the file it describes.
    samples_digest: str = ""
    # Where the latents are: the workdir's shared content-addressed cache, not inside prep_dir (empty in
    # summaries written before the two were apart).
    cache_dir: str = ""

    @property
    def throughput(self) -> dict[str, float]:
        """Encoded clips and frames per second of stage time (cached samples excluded)."""
        s = max(self.seconds, 1e-9)
        return {"clips_per_s": self.num_encoded / s, "frames_per_s": self.encoded_frames / s}

    def as_dict(self) -> dict:
        return {**asdict(self), **self.throughput}


@dataclass
class _Pending:
    entry: Entry
    info: MediaInfo
    bucket: Bucket
    indices: list[int]
    record: dict
    rejected: _Side | None = None  # a preference pair's rejected side, decoded at this one's bucket


@dataclass
class _Side:
    path: Path
    info: MediaInfo
    indices: list[int]


def _rejected_path(entry: Entry) -> Path | None:
    """The rejected file of a generation preference pair (manifest `_pair_entry`: media = (chosen, rejected), the
    pair kept in meta as written), None for any other record (a VLM preference record's sides are answers)."""
    pair = len(entry.media) == 2 and all(isinstance(entry.meta.get(k), str) for k in ("chosen", "rejected"))
    return entry.media[1] if pair else None


def _side_error(path: Path, stage: str, exc: Exception) -> ProbeError:
    """A rejected side's failure as the pair's: its own reason and code, saying which side broke."""
    why = _rejection(str(path), stage, exc)
    return ProbeError(why.code, f"rejected side {path}: {why.reason}")


def _rejected_digest(entry: Entry, path: Path) -> str:
    """The content hash of a pair's rejected file (read from the descriptor checked under the entry's roots): part
    of the pair's cache key, so replacing either image makes a new sample."""
    try:
        if not path.is_file():
            raise ProbeError("not_found", "file not found")
        return media_digest(replace(entry, path=path))
    except Exception as exc:
        raise _side_error(path, "probe", exc) from exc


def _probe_rejected(path: Path, bucket: Bucket, d: DataConfig) -> _Side:
    """A pair's rejected file checked like any clip and sampled to the chosen one's bucket (its frame count; its
    size comes at decode), so both latents have one shape. Any failure refuses the pair."""
    try:
        info = probe(path)
        _check_clip(info, d)
        indices = sample_indices(info, bucket.frames, d.target_fps, d.stride)
        _check_budget(info, len(indices), d)
    except Exception as exc:
        raise _side_error(path, "probe", exc) from exc
    return _Side(path, info, indices)


def _check(cfg: PipelineConfig, family: ModelFamily) -> None:
    d = cfg.data
    if d.buckets.mode == "fixed":
        if err := family.frame_count_error(d.num_frames):
            raise ValueError(f"data.num_frames: {err}")
        multiple = family.size_multiple_for(cfg.model)
        for side, name in ((d.height, "height"), (d.width, "width")):
            if side % multiple:
                raise ValueError(f"data.{name}={side} must be a multiple of {multiple} for {family.name}")
    for res, frames in d.buckets.bucket_config.items():
        for n in frames:
            if err := family.frame_count_error(int(n)):
                raise ValueError(f"data.buckets.bucket_config[{res}]: {err}")


def _plan(
    cfg: PipelineConfig,
    family: ModelFamily,
    items: list,
    cached: dict[str, dict],
    rejects: list[Rejection],
    writer: int = 0,
) -> tuple[list[dict], list[_Pending]]:
    """Split manifest records into those already cached (their cache records) and those to encode."""
    d, cur = cfg.data, cfg.data.curate
    prep_hash, encoder = cfg.prep_hash(), cfg.encoder_identity()
    scenes = SceneCache(cfg.curation_dir, cur.scene_split, writer) if cur.scene_split.enabled else None
    size_multiple = family.size_multiple_for(cfg.model)  # this VAE's (Wan2.2's 16x VAE: 32 px)
    selected: dict[str, dict] = {}
    pending: dict[str, _Pending] = {}
    rep = reporter()
    rep.start("probe", len(items))
    for item in items:
        rep.advance("probe")
        if isinstance(item, Rejection):
            rejects.append(item)
            continue
        path = str(item.path)
        if not item.caption:
            why = item.meta.get("caption_error", "")
            why = f"record {item.line} has no caption" + (f" (captioning failed: {why})" if why else "")
            rejects.append(Rejection(path, "manifest", why, "no_caption"))
            continue
        try:
            if not item.path.is_file():
                raise ProbeError("not_found", "file not found")
            content = item.meta.get("content_hash") or media_digest(item)  # read from the checked descriptor
            info: MediaInfo | None = None
            ranges: list[tuple[int, int] | None] = [None]
            rejected = _rejected_path(item)  # a preference pair: one sample of two files, never scene-split
            if scenes is not None and rejected is None and item.path.suffix.lower() not in IMAGE_SUFFIXES:
                ranges = scenes.get(content, item.path)
            for rng in ranges:
                where = f"{path}[{rng[0]}:{rng[1]}]" if rng else path
                parts = [content, item.caption, prep_hash, encoder] + ([f"{rng[0]}:{rng[1]}"] if rng else [])
                if rejected is not None:  # the key covers both files: a new rejected image is a new sample
                    parts += ["rejected", _rejected_digest(item, rejected)]
                key = text_digest(*parts)
                if key in selected or key in pending:
                    continue  # the same file and caption listed twice: one sample
                if key in cached:
                    selected[key] = cached[key]
                    continue
                try:
                    info = info or probe(item.path)
                    view = clip_view(info, *rng) if rng else info
                    _check_clip(view, d)
                    bucket = assign(view, key, d, family.latent_frame_count, size_multiple, cfg.train.batch_size)
                    start = rng[0] if rng else 0
                    indices = [start + i for i in sample_indices(view, bucket.frames, d.target_fps, d.stride)]
                    _check_budget(view, len(indices), d)
                    side = _probe_rejected(rejected, bucket, d) if rejected is not None else None
                except Exception as exc:
                    rejects.append(_rejection(where, "probe", exc))
                    continue
                record = {
                    "key": key, "source": path, "content_hash": content, "caption": item.caption,
                    "prep_hash": prep_hash, "encoder": encoder, "manifest_line": item.line,
                    "clip_range": list(rng) if rng else None,
                    "caption_model": item.meta.get("caption_model", "manifest"),
                    "kind": info.kind, "src_fps": info.fps, "src_size": [info.width, info.height],
                    "src_frames": info.num_frames, "duration": view.duration, "codec": info.codec,
                    "container": info.container, "rotation": info.rotation, "vfr": info.vfr,
                    "frame_indices": indices, "bucket": list(bucket.shape), "bucket_batch_size": bucket.batch_size,
                    "num_frames": bucket.frames,
                }  # fmt: skip
                if rng and cur.scene_split.reencode:
                    clip = write_scene_clip(item.path, info, *rng, cfg.prep_dir / "clips", content)
                    record["clip_path"] = str(clip)
                if side is not None:  # trained by diffusion_dpo; SFT on this cache trains the chosen side
                    record.update({
                        "preference": True, "rejected_source": str(side.path), "rejected_content_hash": parts[-1],
                        "rejected_kind": side.info.kind, "rejected_src_size": [side.info.width, side.info.height],
                        "rejected_frame_indices": side.indices,
                    })  # fmt: skip
                pending[key] = _Pending(item, info, bucket, indices, record, side)
        except Exception as exc:  # one hostile record (a caption that cannot be encoded, ...) is its own loss
            rejects.append(_rejection(path, "probe", exc))
    if scenes is not None:
        scenes.save()
    rep.finish("probe")
    return list(selected.values()), list(pending.values())


def _rejection(where: str, stage: str, exc: Exception) -> Rejection:
    """Any failure of one record, as its rejection: a ProbeError's own reason, otherwise the exception's
    type and message, so one bad record never stops the stage and the reason still says what broke."""
    if isinstance(exc, ProbeError):
        return Rejection(where, stage, str(exc), exc.code)
    code = "escapes_root" if isinstance(exc, EscapedRoot) else "exception"
    return Rejection(where, stage, f"{type(exc).__name__}: {exc}", code)


def _check_budget(info: MediaInfo, frames: int, d: DataConfig) -> None:
    """Refuse before decoding what decoding cannot afford: a small file can declare a huge frame."""
    frames = 1 if info.kind == "image" else frames  # an image decodes once, whatever it is repeated to
    pixels = info.width * info.height * frames
    if pixels > d.max_decode_pixels:
        raise ProbeError(
            "over_budget",
            f"over the decode budget: {info.width}x{info.height} x {frames} frame(s) = {pixels / 1e6:.0f} Mpixels "
            f"(~{pixels * 12 / 2**30:.1f} GiB to decode and resize), above data.max_decode_pixels="
            f"{d.max_decode_pixels}; downscale the file or raise the limit",
        )


def _check_clip(info: MediaInfo, d: DataConfig) -> None:
    if min(info.width, info.height) < d.min_side:
        raise ProbeError(
            "too_small", f"too small: {info.width}x{info.height}, shorter side below data.min_side={d.min_side}"
        )
    cur = d.curate
    if info.kind == "video" and info.duration < cur.min_duration:
        raise ProbeError(
            "too_short", f"too short: {info.duration:.2f}s below data.curate.min_duration={cur.min_duration}"
        )
    aspect = max(info.width, info.height) / min(info.width, info.height)
    if cur.max_aspect is not None and aspect > cur.max_aspect:
        raise ProbeError("aspect", f"aspect ratio {aspect:.2f} above data.curate.max_aspect={cur.max_aspect}")


def _curate(cfg: PipelineConfig, done: list[dict], pending: list[_Pending], rejects: list[Rejection], writer: int = 0):
    """Drop what curation refuses (recorded as rejections); scores go into the samples manifest."""
    if not cfg.data.curate.scoring():
        return done, pending, {}
    cands = [(r["key"], r) for r in done] + [(p.record["key"], p.record) for p in pending]
    drop, scores = curate(cfg, cands, writer)
    by_key = dict(cands)
    for key, (code, reason) in drop.items():
        rec, rng = by_key[key], by_key[key].get("clip_range")
        rejects.append(Rejection(rec["source"] + (f"[{rng[0]}:{rng[1]}]" if rng else ""), "curate", reason, code))
    return [r for r in done if r["key"] not in drop], [p for p in pending if p.record["key"] not in drop], scores


def _drop_minority_buckets(cfg: PipelineConfig, selected: list[dict], rejects: list[dict]) -> list[dict]:
    """At merge time, so a bucket's count covers every slice's clips."""
    b = cfg.data.buckets
    if b.mode == "fixed" or b.min_bucket_count <= 1:
        return selected
    shapes = {r["key"]: tuple(r["bucket"]) for r in selected}
    drop = drop_minorities(shapes, b.min_bucket_count)
    for r in selected:
        if r["key"] in drop:
            why = f"bucket {shapes[r['key']]} has fewer than {b.min_bucket_count} clips"
            rejects.append(Rejection(r["source"], "bucket", why, "minority_bucket").as_row())
    return [r for r in selected if r["key"] not in drop]


def _decoded(
    cfg: PipelineConfig, pending: list[_Pending], rejects: list[Rejection]
) -> Iterator[tuple[_Pending, torch.Tensor | tuple[torch.Tensor, torch.Tensor]]]:
    """Each record's frames at its bucket; a preference pair's as (chosen, rejected), both at the chosen one's."""
    d = cfg.data

    def frames_of(p: _Pending, file: Path, info: MediaInfo, indices: list[int]) -> torch.Tensor:
        size = cover_size(info.height, info.width, p.bucket.height, p.bucket.width)
        # The decoder reads the file opened once and checked under the entry's roots, not the path again:
        # a symlink swapped in since the manifest was read cannot hand it a file from elsewhere.
        with opened_under(file, p.entry.roots) as path:
            frames, used = decode(replace(info, path=str(path)), indices, d.decoder, size)
        p.record.setdefault("decoder", used)
        return resize_center_crop(frames, p.bucket.height, p.bucket.width)

    def work(p: _Pending) -> tuple[_Pending, torch.Tensor | tuple[torch.Tensor, torch.Tensor] | Exception]:
        try:
            chosen = frames_of(p, p.entry.path, p.info, p.indices)
        except Exception as exc:  # MemoryError, a decoder's own types: this record's loss, not the stage's
            return p, exc
        if p.rejected is None:
            return p, chosen
        try:
            return p, (chosen, frames_of(p, p.rejected.path, p.rejected.info, p.rejected.indices))
        except Exception as exc:
            return p, _side_error(p.rejected.path, "decode", exc)

    # decord and PyAV release the GIL while decoding: threads overlap decode with encode. A bounded
    # window of in-flight decodes: pool.map would decode everything ahead of the encoder and hold
    # every clip's frames in memory at once.
    rep = reporter()
    window = 2 * d.num_workers + d.batch_size
    with ThreadPoolExecutor(max_workers=d.num_workers) as pool:
        todo, inflight = iter(pending), deque()
        for p in islice(todo, window):
            inflight.append(pool.submit(work, p))
        while inflight:
            p, out = inflight.popleft().result()
            if (nxt := next(todo, None)) is not None:
                inflight.append(pool.submit(work, nxt))
            rep.advance("decode")
            if isinstance(out, Exception):
                rejects.append(_rejection(str(p.entry.path), "decode", out))
            else:
                yield p, out
    rep.finish("decode")


def _encode(
    cfg: PipelineConfig, family: ModelFamily, pending: list[_Pending], cache: LatentCache, rejects: list[Rejection]
) -> tuple[list[dict], int]:
    """Encode in same-shape batches, write shards of `shard_size`; returns (records written, encoder calls)."""
    d = cfg.data
    device, dtype = resolve_device(d.device), torch_dtype(d.dtype)
    vae = family.load_vae(cfg.model).to(device)
    tokenizer, text_encoder = family.load_text_encoder(cfg.model)
    text_encoder = text_encoder.to(device)
    if dtype != torch.float32:
        vae, text_encoder = vae.to(dtype=dtype), text_encoder.to(dtype=dtype)
    # image-conditioned families (Wan2.1 I2V's CLIP): its features are cached with the latents; the rest get no kwarg
    image = {}
    if (loaded_image := family.load_image_encoder(cfg.model)) is not None:
        processor, image_encoder = loaded_image
        image = {"image_encoder": (processor, image_encoder.to(device=device, dtype=dtype))}
    scaling = float(getattr(vae.config, "scaling_factor", None) or 1.0)
    shift = float(getattr(vae.config, "shift_factor", None) or 0.0)
    rep = reporter()
    rep.start("decode", len(pending))
    rep.start("encode", len(pending))
    shard: list[tuple[dict, dict[str, torch.Tensor]]] = []
    written: list[dict] = []
    # (bucket shape, is a pair) -> decoded records: a batch is all pairs or all single clips
    by_shape: dict[tuple[tuple[int, int, int], bool], list[tuple[_Pending, Any]]] = defaultdict(list)
    calls = 0

    def latents(frames: torch.Tensor) -> dict[str, torch.Tensor]:
        videos = family.encode_video(vae, frames, **image)
        return videos if isinstance(videos, dict) else {"latent_params": videos}  # one tensor: the latent parameters

    def flush(batch: list[tuple[_Pending, Any]]) -> None:
        nonlocal calls
        pairs = batch[0][0].rejected is not None
        with torch.no_grad():
            videos = latents(torch.stack([f[0] if pairs else f for _, f in batch]))
            if pairs:  # the rejected side: every tensor the family caches, under rejected_<name>
                videos.update({f"rejected_{n}": t for n, t in latents(torch.stack([f[1] for _, f in batch])).items()})
            texts = family.encode_text(
                tokenizer, text_encoder, [p.entry.caption for p, _ in batch], cfg.model.max_text_length
            )
        calls += 1
        videos = [{name: t[i] for name, t in videos.items()} for i in range(len(batch))]
        if isinstance(texts, dict):  # {name: (B, ...)} -> one {name: (...)} per sample
            texts = [{name: t[i] for name, t in texts.items()} for i in range(len(batch))]
        for (p, _), vid, txt in zip(batch, videos, texts, strict=True):
            rec = {
                **p.record,
                "latent_shape": list(vid["latent_params"].shape),
                "text_shape": list((txt.get("text_embeds") if isinstance(txt, dict) else txt).shape),
                "scaling_factor": scaling,
                "shift_factor": shift,
            }
            shard.append((rec, {**{n: t.to(dtype) for n, t in vid.items()}, **_text_tensors(txt, dtype)}))
        rep.advance("encode", len(batch))
        batch.clear()
        while len(shard) >= d.shard_size:
            write(d.shard_size)

    def write(n: int) -> None:
        cache.write_shard(shard[:n])
        written.extend(r for r, _ in shard[:n])
        del shard[:n]

    for p, frames in _decoded(cfg, pending, rejects):
        group = by_shape[p.bucket.shape, p.rejected is not None]
        group.append((p, frames))
        if len(group) == d.batch_size:
            flush(group)
    for group in by_shape.values():
        if group:
            flush(group)
    if shard:
        write(len(shard))
    rep.finish("encode")
    return written, calls


def _text_tensors(txt: torch.Tensor | dict[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """A family's text encoding: one tensor (CogVideoX's T5 states) or several (pooled + per-token)."""
    if isinstance(txt, dict):
        return {name: t.to(dtype) for name, t in txt.items()}
    return {"text_embeds": txt.to(dtype)}


def _rank() -> tuple[int, int]:
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def prep_slice(cfg: PipelineConfig, index: int = 0, count: int = 1) -> dict[str, Any]:
    """Prep records i with i % count == index: their own shards (`r<index>-*`) and a part summary.

    One slice per torchrun rank, or per Prefect task when the flow maps slices over a task runner.
    """
    t0 = time.perf_counter()
    d = cfg.data
    family = get_family(cfg.model.family)
    _check(cfg, family)
    cache = LatentCache(cfg.cache_dir, rank=index)
    cache.clean_partial()
    items = list(islice(read_sources(d.manifest, d.manifest_format, d.roots, d.incoming), d.max_samples))
    rejects: list[Rejection] = []
    cached = {r["key"]: r for r in cache.records()}
    if family.can(Capability.TOKEN_LOSS):  # VLM / speech: the family's processor instead of a VAE
        done, encoded, calls = sequence_slice(cfg, family, items[index::count], cached, cache, rejects)
        scores: dict = {}
    else:
        done, pending = _plan(cfg, family, caption_items(cfg, items[index::count], index), cached, rejects, index)
        done, pending, scores = _curate(cfg, done, pending, rejects, index)
        encoded, calls = _encode(cfg, family, pending, cache, rejects) if pending else ([], 0)
    part = {"slice": index, "keys": [r["key"] for r in done + encoded], "rejects": [r.as_row() for r in rejects],
            "cached": len(done), "encoded": len(encoded), "calls": calls, "scores": scores,
            "records": len(items[index::count]), "frames": sum(r["num_frames"] for r in encoded),
            "seconds": time.perf_counter() - t0}  # fmt: skip
    atomic_write_text(part_path(cfg, index), json.dumps(part))
    return part


def part_path(cfg: PipelineConfig, index: int) -> Path:
    return cfg.prep_dir / "parts" / f"slice{index:03d}.json"


def merge_slices(cfg: PipelineConfig, count: int, t0: float | None = None) -> PrepResult:
    parts = [json.loads(part_path(cfg, i).read_text()) for i in range(count)]
    seconds = (time.perf_counter() - t0) if t0 is not None else max(p["seconds"] for p in parts)
    return _finish(cfg, LatentCache(cfg.cache_dir), parts, seconds)


def run_prep(cfg: PipelineConfig) -> PrepResult:
    """The whole stage in this process, or this rank's slice of it under torchrun (rank 0 merges)."""
    t0 = time.perf_counter()
    rank, world = _rank()
    prep_slice(cfg, rank, world)
    if world == 1:
        return merge_slices(cfg, 1, t0)
    import torch.distributed as dist

    dist.barrier()  # every rank's shards and part file are on disk
    result = merge_slices(cfg, world, t0) if rank == 0 else None
    dist.barrier()
    return result or _result_from_disk(cfg.prep_dir)


def _finish(cfg: PipelineConfig, cache: LatentCache, parts: list[dict], seconds: float) -> PrepResult:
    """Merge the slices' parts: index, the selected samples (in manifest order), rejects, summary.

    Nothing is published unless the run selected samples: a failed prep leaves the previous training
    set (samples, rejects, summary, config, index) as it was, and its own rejects beside them."""
    out = cfg.prep_dir
    records = cache.records()
    by_key = {r["key"]: r for r in records}
    keys = [k for p in parts for k in p["keys"]]
    scores = {k: v for p in parts for k, v in p.get("scores", {}).items()}
    # Curation scores go into the training manifest (they are not part of the cached record).
    selected = sorted(
        ({**by_key[k], **scores.get(k, {})} for k in dict.fromkeys(keys)),
        key=lambda r: (r["manifest_line"], r.get("clip_range") or [0]),
    )
    rejects = [r for p in parts for r in p["rejects"]]
    selected = _drop_minority_buckets(cfg, selected, rejects)
    dups = dedup(cfg, [r["key"] for r in selected])
    for r in selected:
        if r["key"] in dups:
            rng = r.get("clip_range")
            where = r["source"] + (f"[{rng[0]}:{rng[1]}]" if rng else "")
            rejects.append(Rejection(where, "curate", dups[r["key"]][1], "duplicate").as_row())
    selected = [r for r in selected if r["key"] not in dups]
    failed = out / "rejects.failed.jsonl"
    if not selected:
        write_jsonl(failed, rejects)
        raise ValueError(
            f"prep produced no usable samples from {cfg.data.manifest}: see {failed} for why each was rejected; "
            f"the previous outputs in {out} are left as they were"
        )
    index = cache.write_index(records)
    samples = write_jsonl(out / "samples.jsonl", selected)
    rejects_path = write_jsonl(out / "rejects.jsonl", rejects)
    result = PrepResult(
        prep_dir=str(out), samples=str(samples), rejects=str(rejects_path), index=str(index),
        num_samples=len(selected), num_rejected=len(rejects), num_cached=sum(p["cached"] for p in parts),
        num_encoded=sum(p["encoded"] for p in parts), encoder_calls=sum(p["calls"] for p in parts),
        seconds=round(seconds, 3),
        rejected_by_reason=dict(Counter(r["code"] for r in rejects).most_common()), world_size=len(parts),
        num_records=sum(p["records"] for p in parts),
        encoded_frames=sum(p["frames"] for p in parts), samples_digest=file_digest(samples),
        cache_dir=str(cfg.cache_dir),
    )  # fmt: skip
    save_config(cfg, out)
    atomic_write_text(out / "summary.json", json.dumps(result.as_dict(), indent=2))
    failed.unlink(missing_ok=True)
    return result


def _result_from_disk(prep_dir: Path) -> PrepResult:
    data = json.loads((Path(prep_dir) / "summary.json").read_text())
    return PrepResult(**{k: v for k, v in data.items() if k in PrepResult.__dataclass_fields__})


def launch_prep(cfg: PipelineConfig) -> PrepResult:
    """In this process, or as a torchrun job of `data.nproc_per_node` ranks."""
    from flowspeed.engines.common.torchrun import in_distributed_job, run_torchrun

    if in_distributed_job() or cfg.data.nproc_per_node == 1:
        return run_prep(cfg)
    cfg_path = save_config(cfg, cfg.prep_dir, "launch_config.yaml")
    run_torchrun("flowspeed.datasets_prep.prep", ["--config", str(cfg_path)], cfg.data.nproc_per_node)
    return _result_from_disk(cfg.prep_dir)


@record
def main() -> None:
    import argparse

    import torch.distributed as dist
    from flowspeed.configs import load_config
    from flowspeed.engines.common.device import init_process_group

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, type=Path)
    cfg = load_config(parser.parse_args().config)
    # Ranks only meet at barriers: gloo serves them on every device, and the encoders keep the GPU.
    init_process_group(backend="gloo")
    try:
        run_prep(cfg)
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    from flowspeed.engines.common.lifetime import run_rank

    run_rank(main)


def load_samples(prep_dir: Path) -> list[dict]:
    path = Path(prep_dir) / "samples.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: run `flowspeed prep` first")
    records = read_jsonl(path)
    if not records:
        raise ValueError(
            f"{path} holds no samples, so there is nothing to train on: check the manifest (rejects.jsonl beside it "
            "says why records were dropped) and rerun `flowspeed prep`"
        )
    return records
