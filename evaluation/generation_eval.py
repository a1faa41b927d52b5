"""The generation side of the eval stage: samples generated across ranks, scored, and compared with real media.

Each sample (prompt p, repeat j; item i = p * samples_per_prompt + j, seed `eval.seed + i`, so any world size
makes the same samples) is generated, written to `videos/sample_XX.mp4` (or .png), and scored where it was
made: CLIP score against its prompt, the VBench-style dimensions, and its Inception (per frame) and I3D (per
clip) features, kept beside the shard rows so a resumed eval needs no regeneration. Rank 0 then reduces: mean
per-sample scores, and FID / FVD of all samples' features against the reference set's
(`eval.generation.reference`), whose features are computed once and cached under `<eval_dir>/.reference`.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from flowspeed.configs import PipelineConfig
from flowspeed.datasets_prep.mp4 import write_sample
from flowspeed.engines.common.io import atomic_write, text_digest
from flowspeed.engines.models.registry import ModelFamily, float_frames, frames_out, loaded
from flowspeed.engines.torch_engine.sampling import SamplingLayout
from flowspeed.engines.torch_engine.step_cache import denoiser_seconds, step_cache_off
from flowspeed.evaluation import generation_metrics as gm
from flowspeed.evaluation.clip_score import clip_image_features, clip_score_of, load_clip, video_clip_score
from flowspeed.evaluation.rewards import Reward
from flowspeed.evaluation.sharded import Ranks, run_sharded, task_folder

log = logging.getLogger(__name__)

VIDEO_SUFFIXES = {".mp4", ".mov", ".mkv", ".webm", ".avi", ".m4v", ".gif"}


def _save_npz(path: Path, **arrays: np.ndarray) -> None:
    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:  # a file object: given a path, np.savez would append ".npz" to the temp name
            np.savez(f, **arrays)

    atomic_write(path, write)


# --------------------------------------------------------------------------- feature extractors


def _inception(cfg: PipelineConfig, device: torch.device) -> gm.InceptionFeatures:
    g = cfg.eval.generation
    return loaded(lambda: gm.load_inception(g.inception_weights, image_size=g.fid_size).to(device),
                  "inception", g.inception_weights, g.fid_size, device)  # fmt: skip


def _i3d(cfg: PipelineConfig, device: torch.device) -> gm.I3DFeatures:
    g = cfg.eval.generation
    return loaded(lambda: gm.load_i3d(g.i3d_weights, input_size=g.fvd_size, layer=g.fvd_layer).to(device),
                  "i3d", g.i3d_weights, g.fvd_size, g.fvd_layer, device)  # fmt: skip


def dino_pixels(video: np.ndarray) -> torch.Tensor:
    """(T, 3, 224, W') DINO input from (T, H, W, 3) uint8 frames as VBench makes it (`dino_transform(224)`):
    shortest side to 224, bilinear without antialiasing on the uint8 frames, aspect kept, ImageNet mean/std."""
    from torchvision.transforms import functional as TF

    frames = TF.resize(torch.from_numpy(np.ascontiguousarray(video)).permute(0, 3, 1, 2), 224, antialias=False)
    return TF.normalize(frames.float() / 255.0, [0.485, 0.456, 0.406], [0.229, 0.224, 0.225])


def _dino(path: str, device: torch.device) -> Any:
    """Per-frame CLS features from a local transformers DINO/ViT folder: VBench's subject encoder, fed the way
    VBench feeds its DINO ViT-B/16 (`dino_pixels`), not with the checkpoint's own image processor."""
    import inspect

    from transformers import AutoModel

    if not Path(path).is_dir():
        raise FileNotFoundError(f"eval.generation.dino={path} is not a folder (a transformers DINO/ViT checkpoint)")
    model = AutoModel.from_pretrained(path).to(device).eval()
    # ViT needs asking to interpolate its position table for a non-square 224 x W input; DINOv2 always does
    asks = "interpolate_pos_encoding" in inspect.signature(model.forward).parameters
    kwargs = {"interpolate_pos_encoding": True} if asks else {}

    @torch.no_grad()
    def encode(video: np.ndarray) -> np.ndarray:
        out = model(pixel_values=dino_pixels(video).to(device), **kwargs)
        return out.last_hidden_state[:, 0].float().cpu().numpy()  # (T, D)

    return encode


def _fvd_applies(cfg: PipelineConfig) -> bool:
    g = cfg.eval.generation
    return bool(g.reference and g.fvd and cfg.data.num_frames > 1)


# --------------------------------------------------------------------------- the reference set


def _reference_sources(cfg: PipelineConfig) -> list[tuple[Path, list[int] | None]]:
    """(file, frame indices or None = sample them as prep would) for every reference clip."""
    ref = cfg.eval.generation.reference
    assert ref is not None
    if ref == "held_out":
        from flowspeed.datasets_prep.cache import split_records
        from flowspeed.datasets_prep.prep import load_samples

        _, val = split_records(load_samples(cfg.prep_dir), cfg.train.val_fraction)
        return [(Path(r["source"]), list(r["frame_indices"])) for r in val]
    folder = Path(ref)
    if not folder.is_dir():
        raise FileNotFoundError(f"eval.generation.reference={ref}: not a folder of videos/images (or held_out)")
    from flowspeed.datasets_prep.probe import IMAGE_SUFFIXES

    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in VIDEO_SUFFIXES | IMAGE_SUFFIXES)
    return [(p, None) for p in files]


def reference_videos(cfg: PipelineConfig) -> list[np.ndarray]:
    """The reference clips as the model's samples look: (T, H, W, 3) uint8 at data.num_frames x height x
    width, decoded and cropped the way prep treats training clips. Unreadable or too-short files are
    skipped with a warning naming them."""
    from flowspeed.datasets_prep.decode import cover_size, decode, resize_center_crop, sample_indices
    from flowspeed.datasets_prep.probe import ProbeError, probe

    d = cfg.data
    out, skipped = [], []
    for path, indices in _reference_sources(cfg):
        try:
            info = probe(path)
            idx = indices or sample_indices(info, d.num_frames, d.target_fps, d.stride)
            frames, _ = decode(info, idx, d.decoder, cover_size(info.height, info.width, d.height, d.width))
        except (ProbeError, FileNotFoundError) as exc:
            skipped.append(f"{path.name} ({exc})")
            continue
        out.append(resize_center_crop(frames, d.height, d.width).numpy())
    if skipped:
        log.warning("reference set: skipped %d file(s): %s", len(skipped), "; ".join(skipped[:5]))
    return out


def reference_features(cfg: PipelineConfig, device: torch.device) -> dict[str, np.ndarray]:
    """Inception features of every reference frame and I3D features of every reference clip, cached by
    the reference files, the extractors and the sample shape: a recurring eval pays for them once."""
    g, d = cfg.eval.generation, cfg.data
    sources = _reference_sources(cfg)
    stamps = [f"{p}:{p.stat().st_size}:{p.stat().st_mtime_ns}:{i}" for p, i in sources if p.exists()]
    settings = [g.fid, _fvd_applies(cfg), g.inception_weights, g.i3d_weights, g.fid_size, g.fvd_size, g.fvd_layer,
                d.num_frames, d.height, d.width, d.target_fps, d.stride]  # fmt: skip
    cache = cfg.eval_dir / ".reference" / f"{text_digest(*stamps, *map(str, settings))[:16]}.npz"
    if cache.is_file():
        with np.load(cache) as z:
            return dict(z)
    videos = reference_videos(cfg)
    feats: dict[str, np.ndarray] = {}
    if g.fid:
        frames = [frame for v in videos for frame in v]
        feats["frames"] = gm.extract_image_features(frames, _inception(cfg, device))
    if _fvd_applies(cfg):
        feats["clips"] = gm.extract_video_features(videos, _i3d(cfg, device))
    _save_npz(cache, **feats)
    return feats


# --------------------------------------------------------------------------- generate and score


def _check_counts(cfg: PipelineConfig, n: int) -> None:
    """Fréchet distances need two samples a side: fail before generating anything, not after."""
    if _fvd_applies(cfg) and n < 2:
        raise ValueError(
            f"eval.generation: FVD needs at least 2 generated videos, this eval makes {n}: add eval.prompts or "
            "raise eval.samples_per_prompt (or set eval.generation.fvd: false)"
        )


def _score(cfg: PipelineConfig, video: np.ndarray, prompt: str, device: torch.device, feat_path: Path) -> dict:
    e, g = cfg.eval, cfg.eval.generation
    clip = loaded(lambda: load_clip(e.clip, device), "clip", e.clip.model, e.clip.pretrained, device)
    score, cosine = video_clip_score(clip, video, prompt, device)
    row: dict[str, Any] = {"clip_score": score, "clip_cosine": cosine}
    if g.vbench and len(video) >= 3:
        row["temporal_flickering"] = gm.temporal_flickering(video)
        row["motion_smoothness"] = gm.motion_smoothness(video)
        row["background_consistency"] = gm.background_consistency(video, lambda v: clip_image_features(clip, v, device))
        if g.dino:
            row["subject_consistency"] = gm.subject_consistency(video, loaded(lambda: _dino(g.dino, device), g.dino))
    feats: dict[str, np.ndarray] = {}
    if g.reference and g.fid:
        feats["frames"] = gm.extract_image_features(list(video), _inception(cfg, device))
    if _fvd_applies(cfg):
        feats["clips"] = gm.extract_video_features([video], _i3d(cfg, device))
    if feats:
        _save_npz(feat_path, **feats)
    return row


def generate_and_score(
    cfg: PipelineConfig,
    family: ModelFamily,
    final_dir: Path,
    device: torch.device,
    ranks: Ranks,
    reward: Reward | None = None,
) -> tuple[dict[str, float], list[dict[str, Any]], dict[str, str]]:
    """(metrics, one row per sample, labels such as which features FID/FVD used); rank 0 only, else empty. With
    `reward`, each sample's row gets its reward for its prompt, and `eval/reward` is their mean."""
    e, d, g = cfg.eval, cfg.data, cfg.eval.generation
    n = len(e.prompts) * e.samples_per_prompt
    _check_counts(cfg, n)
    # without a step cache the key is the one it was before eval.cache existed; with one, cached samples get a folder
    off = set() if e.cache.on else {"cache"}
    settings = {"eval": e.model_dump(exclude={"nproc_per_node", "batch_size", "benchmarks", "output_dir", "parallel",
                                              *off}),
                "shape": [d.num_frames, d.height, d.width]}  # fmt: skip
    if reward is not None:  # only then: an eval without rewards keeps the folder (and the rows) it had before them
        settings["rewards"] = [[t.name, t.weight] for t in reward.terms]
    folder = task_folder(cfg.eval_dir, "generate", family.export_files(final_dir), settings)
    out = cfg.eval_dir / "videos"

    def generate(first: int, prompts: list[str]) -> np.ndarray:
        return family.generate(
            final_dir,
            prompts,
            num_frames=d.num_frames,
            height=d.height,
            width=d.width,
            steps=e.num_inference_steps,
            guidance_scale=e.guidance_scale,
            seed=e.seed + first,
            device=device,
        )  # fmt: skip  (batches are contiguous)

    def work(batch: list[int]) -> list[dict[str, Any]]:
        prompts = [e.prompts[i // e.samples_per_prompt] for i in batch]
        start = time.perf_counter()
        compared = sum(i < e.cache.compare_samples for i in batch) if e.cache.on else 0
        costs: list[dict[str, float]] = []
        if compared:  # every rank of the group runs it (collectives); the writer scores it
            videos, costs, seconds = cache_comparison(lambda n: generate(batch[0], prompts[:n]), compared)
            start = time.perf_counter()  # the uncached run is no sample's time
            if rest := batch[compared:]:
                videos = np.concatenate([videos, generate(rest[0], prompts[compared:])])
            seconds = (seconds + time.perf_counter() - start) / len(batch)
        else:
            videos = generate(batch[0], prompts)
            seconds = (time.perf_counter() - start) / len(batch)
        if not ranks.writes:  # a CFG / context-parallel peer: the group's first rank writes and scores the samples
            return [{} for _ in batch]
        # scored where the samples are made (as uint8 frames, what a reward reads); the mean below is eval/reward
        rewards = reward.media(videos, prompts).tolist() if reward is not None else None
        rows = []
        for k, (i, prompt, video) in enumerate(zip(batch, prompts, videos, strict=True)):
            path = write_sample(out, i, video, e.fps)
            row = _score(cfg, video, prompt, device, folder / f"features-{i:05d}.npz")
            if rewards is not None:
                row["reward"] = rewards[k]
            if k < len(costs):
                row["step_cache"] = costs[k]  # a dict: not averaged with the per-sample floats
            rows.append({"prompt": prompt, "seed": e.seed + i, "sample": path.name, "sample_seconds": seconds, **row})
        return rows

    rows = run_sharded(folder, n, work, ranks, e.batch_size, "samples")
    memory = _peak_memory_gb(device, ranks)
    if not ranks.main:
        return {}, [], {}
    keys = [k for k in rows[0] if isinstance(rows[0][k], float)] if rows else []
    # Every sample has data.num_frames frames, so these means of per-sample means are also the means over all
    # frame pairs: VBench's set figures (sim / cnt for the consistencies) and torchmetrics' pair average.
    metrics = {f"eval/{k}": float(np.mean([r[k] for r in rows])) for k in keys}
    if rows:  # torchmetrics' CLIPScore of the whole set: the clamp at 0 comes after the mean
        metrics["eval/clip_score"] = clip_score_of([r["clip_cosine"] for r in rows])
    metrics |= {f"eval/peak_memory_gb_rank{r}": gb for r, gb in enumerate(memory)}
    info = _labels(cfg, rows) | {"parallel": SamplingLayout.of(e.parallel, ranks.world).describe()}
    if e.cache.on:
        metrics |= cache_metrics(rows)
        info["step_cache"] = e.cache.describe()
    if g.reference and (g.fid or _fvd_applies(cfg)):
        metrics, frechet_info = _frechet(cfg, device, folder, n, metrics)
        info |= frechet_info
    return metrics, rows, info


def cache_comparison(generate: Callable[[int], np.ndarray], n: int) -> tuple[np.ndarray, list[dict[str, float]], float]:
    """What `eval.cache` costs on the first `n` samples of a batch: `generate(n)` makes them without the cache, then
    with it (the same seeds, the same loaded denoiser). Returns the cached samples as `generate` returns them (the
    eval's samples), one cost row per sample (what `cache_metrics` reduces), and the cached run's wall seconds.

    The uncached run goes first, so a first call's loading and warm-up count against the cache, never for it; the
    speedup is timed on the denoiser calls alone (`denoiser_seconds`), which is all the cache changes."""
    with denoiser_seconds() as plain_s, step_cache_off(), float_frames():
        plain = generate(n)
    start = time.perf_counter()
    with denoiser_seconds() as cached_s, float_frames():
        cached = generate(n)
    wall = time.perf_counter() - start
    costs = [
        {"mse": float(np.mean((c - p) ** 2)), "max_abs_diff": float(np.abs(c - p).max()),
         "uncached_denoiser_s": plain_s[0] / n, "cached_denoiser_s": cached_s[0] / n}
        for c, p in zip(cached.astype(np.float64), plain.astype(np.float64), strict=True)
    ]  # fmt: skip
    return frames_out(cached), costs, wall


def cache_metrics(rows: list[dict[str, Any]]) -> dict[str, float]:
    """eval/cache_psnr (dB, frames in [0, 1], of the compared samples' pooled squared error; inf when the cache
    changed nothing), eval/cache_max_abs_diff and eval/cache_speedup (the denoiser's uncached seconds over its cached
    seconds) from the rows `cache_comparison` scored; empty when none was."""
    costs = [r["step_cache"] for r in rows if "step_cache" in r]
    if not costs:
        return {}
    mse = float(np.mean([c["mse"] for c in costs]))
    cached_s = sum(c["cached_denoiser_s"] for c in costs)
    return {
        "eval/cache_psnr": 10 * math.log10(1 / mse) if mse > 0 else math.inf,
        "eval/cache_max_abs_diff": max(c["max_abs_diff"] for c in costs),
        "eval/cache_speedup": sum(c["uncached_denoiser_s"] for c in costs) / cached_s if cached_s > 0 else math.nan,
        "eval/cache_compared_samples": float(len(costs)),
    }


def _peak_memory_gb(device: torch.device, ranks: Ranks) -> list[float]:
    """Every rank's peak memory (accelerator memory, or the process's peak RSS on CPU), gathered on rank 0: what
    splitting one video over ranks saves per device."""
    from flowspeed.engines.common.device import peak_memory_bytes

    mine = peak_memory_bytes(device) / 2**30
    if ranks.world == 1:
        return [mine]
    parts: list[float] | None = [0.0] * ranks.world if ranks.main else None
    dist.gather_object(mine, parts, dst=0)
    return parts or []


def _labels(cfg: PipelineConfig, rows: list[dict[str, Any]]) -> dict[str, str]:
    """Run tags naming what each score was computed with where that differs from its reference scorer
    (docs/fidelity.md): a number is only comparable with a published one when these match."""
    e, g = cfg.eval, cfg.eval.generation
    clip = f"open_clip {e.clip.model} ({Path(e.clip.pretrained).name if e.clip.pretrained else gm.RANDOM_INIT})"
    info = {"clip_score_model": clip}
    if rows and "motion_smoothness" in rows[0]:
        info["motion_smoothness_interpolator"] = gm.MOTION_SMOOTHNESS_INTERPOLATOR
        info["background_consistency_encoder"] = f"{clip}, open_clip preprocessing (VBench: OpenAI CLIP ViT-B/32)"
    if rows and "subject_consistency" in rows[0] and g.dino:
        info["subject_consistency_encoder"] = f"{Path(g.dino).name} (VBench: DINO ViT-B/16)"
    if g.reference and g.fid:
        info["fid_network"] = "torchvision Inception-v3 (pytorch-fid: TF 2015 FID Inception)"
    if g.reference and _fvd_applies(cfg):
        info["fvd_layer"] = "logits (400-d)" if g.fvd_layer == "logits" else "pool (1024-d; original FVD: 400-d logits)"
    return info


def _frechet(
    cfg: PipelineConfig, device: torch.device, folder: Path, n: int, metrics: dict[str, float]
) -> tuple[dict[str, float], dict[str, str]]:
    g = cfg.eval.generation
    ref = reference_features(cfg, device)
    parts: dict[str, list[np.ndarray]] = {"frames": [], "clips": []}
    for i in range(n):
        with np.load(folder / f"features-{i:05d}.npz") as z:
            for k in z.files:
                parts[k].append(z[k])
    info = {}
    for key, name, extractor, source in (
        ("frames", "fid", g.fid, g.inception_weights),
        ("clips", "fvd", _fvd_applies(cfg), g.i3d_weights),
    ):
        if not extractor:
            continue
        ours = np.concatenate(parts[key])
        if len(ref.get(key, ())) < 2 or len(ours) < 2:
            raise ValueError(
                f"eval.generation: {name.upper()} needs at least 2 {key} a side, got {len(ours)} generated and "
                f"{len(ref.get(key, ()))} in the reference set ({g.reference})"
            )
        mu_a, s_a = gm.feature_stats(ours)
        mu_b, s_b = gm.feature_stats(ref[key])
        metrics[f"eval/{name}"] = gm.frechet_distance(mu_a, s_a, mu_b, s_b)
        info[f"{name}_features"] = Path(source).name if source else gm.RANDOM_INIT
        info[f"{name}_samples"] = f"{len(ours)} generated vs {len(ref[key])} reference {key}"
    return metrics, info
