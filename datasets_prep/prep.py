"""The prep stage: manifest -> probe -> decode -> VAE/text encode -> latent cache.

    python -c "from configs import load_config; from datasets_prep.prep import run_prep; \
               print(run_prep(load_config('configs/quickstart.yaml')))"

Idempotent: samples whose content key is already cached are neither decoded nor encoded, and the
encoders are not even loaded when nothing is new. Outputs (under `cfg.prep_dir`):
    cache/            the latent cache (see datasets_prep.cache)
    samples.jsonl     the records this run's manifest and config select: the training set
    rejects.jsonl     {"path", "stage", "reason"} per unusable line or file
    summary.json      counts; config.yaml the resolved config
"""

from __future__ import annotations

import json
import time
from collections import Counter, deque
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from itertools import islice
from pathlib import Path

import torch

from configs import PipelineConfig, save_config
from datasets_prep.cache import LatentCache
from datasets_prep.decode import decode, resize_center_crop, sample_indices
from datasets_prep.io import atomic_write_text, file_digest, text_digest, write_jsonl
from datasets_prep.manifest import Entry, Rejection, read_manifest
from datasets_prep.probe import MediaInfo, ProbeError, probe
from datasets_prep.progress import reporter
from engines.device import resolve_device, torch_dtype
from engines.models import get_family


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

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass
class _Pending:
    entry: Entry
    info: MediaInfo
    indices: list[int]
    record: dict


def _plan(cfg: PipelineConfig, cached: set[str], rejects: list[Rejection]) -> tuple[list[dict], list[_Pending]]:
    """Split the manifest into records already cached and samples still to encode."""
    d = cfg.data
    prep_hash, encoder = cfg.prep_hash(), cfg.encoder_identity()
    selected: dict[str, dict] = {}
    pending: dict[str, _Pending] = {}
    items = list(read_manifest(d.manifest, d.manifest_format, d.roots))
    rep = reporter()
    rep.start("probe", len(items))
    for item in items:
        rep.advance("probe")
        if isinstance(item, Rejection):
            rejects.append(item)
            continue
        path = str(item.path)
        if not item.caption:
            rejects.append(Rejection(path, "manifest", f"record {item.line} has no caption", "no_caption"))
            continue
        try:
            if not item.path.is_file():
                raise ProbeError("not_found", "file not found")
            content = file_digest(item.path)
            key = text_digest(content, item.caption, prep_hash, encoder)
            if key in selected or key in pending:
                continue  # the same file and caption listed twice: one sample
            record = {
                "key": key,
                "source": path,
                "content_hash": content,
                "caption": item.caption,
                "prep_hash": prep_hash,
                "encoder": encoder,
                "manifest_line": item.line,
            }
            if key in cached:
                selected[key] = record
                continue
            info = probe(item.path)
            if min(info.width, info.height) < d.min_side:
                raise ProbeError(
                    "too_small", f"too small: {info.width}x{info.height}, shorter side below data.min_side={d.min_side}"
                )
            indices = sample_indices(info, d.num_frames, d.target_fps, d.stride)
            record.update(
                kind=info.kind,
                src_fps=info.fps,
                src_size=[info.width, info.height],
                src_frames=info.num_frames,
                duration=info.duration,
                codec=info.codec,
                container=info.container,
                rotation=info.rotation,
                vfr=info.vfr,
                frame_indices=indices,
            )
            pending[key] = _Pending(item, info, indices, record)
        except ProbeError as exc:
            rejects.append(Rejection(path, "probe", str(exc), exc.code))
    rep.finish("probe")
    return list(selected.values()), list(pending.values())


def _decoded(
    cfg: PipelineConfig, pending: list[_Pending], rejects: list[Rejection]
) -> Iterator[tuple[_Pending, torch.Tensor]]:
    d = cfg.data

    def work(p: _Pending) -> tuple[_Pending, torch.Tensor | ProbeError]:
        try:
            frames, used = decode(p.info, p.indices, d.decoder)
        except ProbeError as exc:
            return p, exc
        p.record["decoder"] = used
        return p, resize_center_crop(frames, d.height, d.width)

    # decord and PyAV release the GIL while decoding: threads overlap decode with encode.
    rep = reporter()
    # A bounded window of in-flight decodes: pool.map would decode everything ahead of the encoder
    # and hold every clip's frames in memory at once.
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
            if isinstance(out, ProbeError):
                rejects.append(Rejection(str(p.entry.path), "decode", str(out), out.code))
            else:
                yield p, out
    rep.finish("decode")


def run_prep(cfg: PipelineConfig) -> PrepResult:
    t0 = time.perf_counter()
    d = cfg.data
    family = get_family(cfg.model.family)
    if err := family.frame_count_error(d.num_frames):
        raise ValueError(f"data.num_frames: {err}")
    for side, name in ((d.height, "height"), (d.width, "width")):
        if side % family.spatial_compression:
            raise ValueError(f"data.{name}={side} must be a multiple of {family.spatial_compression} for {family.name}")
    out = cfg.prep_dir
    cache = LatentCache(out / "cache")
    cache.clean_partial()
    save_config(cfg, out)
    rejects: list[Rejection] = []
    done, pending = _plan(cfg, {r["key"] for r in cache.records()}, rejects)
    if d.max_samples is not None:
        pending = pending[: max(d.max_samples - len(done), 0)]

    encoder_calls, encoded = 0, []
    if pending:
        device, dtype = resolve_device(d.device), torch_dtype(d.dtype)
        vae = family.load_vae(cfg.model).to(device)
        tokenizer, text_encoder = family.load_text_encoder(cfg.model)
        text_encoder = text_encoder.to(device)
        if dtype != torch.float32:
            vae, text_encoder = vae.to(dtype=dtype), text_encoder.to(dtype=dtype)
        scaling = float(getattr(vae.config, "scaling_factor", 1.0))
        rep = reporter()
        rep.start("decode", len(pending))
        rep.start("encode", len(pending))
        shard: list[tuple[dict, dict[str, torch.Tensor]]] = []
        batch: list[tuple[_Pending, torch.Tensor]] = []

        def flush_batch() -> None:
            nonlocal encoder_calls
            with torch.no_grad():
                frames = torch.stack([f for _, f in batch])
                latents = family.encode_video(vae, frames)
                texts = family.encode_text(
                    tokenizer, text_encoder, [p.entry.caption for p, _ in batch], cfg.model.max_text_length
                )
            encoder_calls += 1
            for (p, _), lat, txt in zip(batch, latents, texts, strict=True):
                rec = {
                    **p.record,
                    "latent_shape": list(lat.shape),
                    "text_shape": list(txt.shape),
                    "scaling_factor": scaling,
                    "num_frames": d.num_frames,
                }
                shard.append((rec, {"latent_params": lat.to(dtype), "text_embeds": txt.to(dtype)}))
            rep.advance("encode", len(batch))
            batch.clear()

        for item in _decoded(cfg, pending, rejects):
            batch.append(item)
            if len(batch) == d.batch_size:
                flush_batch()
            if len(shard) >= d.shard_size:
                cache.write_shard(shard[: d.shard_size])
                encoded.extend(r for r, _ in shard[: d.shard_size])
                del shard[: d.shard_size]
        if batch:
            flush_batch()
        if shard:
            cache.write_shard(shard)
            encoded.extend(r for r, _ in shard)
        rep.finish("encode")

    index = cache.write_index()
    by_key = {r["key"]: r for r in cache.records()}
    selected = [by_key[r["key"]] for r in done + encoded]
    samples = write_jsonl(out / "samples.jsonl", selected)
    rejects_path = write_jsonl(out / "rejects.jsonl", [r.as_row() for r in rejects])
    result = PrepResult(
        prep_dir=str(out),
        samples=str(samples),
        rejects=str(rejects_path),
        index=str(index),
        num_samples=len(selected),
        num_rejected=len(rejects),
        num_cached=len(done),
        num_encoded=len(encoded),
        encoder_calls=encoder_calls,
        seconds=round(time.perf_counter() - t0, 3),
        rejected_by_reason=dict(Counter(r.code for r in rejects).most_common()),
    )
    atomic_write_text(out / "summary.json", json.dumps(result.as_dict(), indent=2))
    if not selected:
        raise ValueError(
            f"prep produced no usable samples from {d.manifest}: see {rejects_path} for why each was rejected"
        )
    return result


def load_samples(prep_dir: Path) -> list[dict]:
    path = Path(prep_dir) / "samples.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: run `flowspeed prep` first")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
