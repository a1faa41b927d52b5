"""Curation: scene splitting, aesthetic and motion scores, near-duplicate removal.

    scenes      PySceneDetect's ContentDetector over PyAV: frame ranges [start, end), no re-encode
    aesthetic   open_clip image embedding -> a LAION-style linear/MLP head loaded from a local file
    motion      mean Farneback optical-flow magnitude (OpenCV), or mean absolute frame difference
    dedup       cosine of the clips' mean CLIP embeddings; the first of a near-duplicate group stays

Scores are written into each sample record, and cached per (sample key, curation settings) under
`<prep>/curation/`, so re-running with other thresholds rescores nothing.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flowspeed.configs.schema import AestheticConfig, CurateConfig, PipelineConfig, SceneSplitConfig
from flowspeed.datasets_prep.decode import decode
from flowspeed.datasets_prep.probe import MediaInfo, ProbeError, probe
from flowspeed.engines.common.device import resolve_device
from flowspeed.engines.common.extras import require
from flowspeed.engines.common.io import RecordStore, atomic_write
from flowspeed.engines.common.progress import reporter
from PIL import Image
from safetensors.torch import load_file, save_file


def config_hash(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj.model_dump(mode="json"), sort_keys=True).encode()).hexdigest()[:12]


# ---- scenes -------------------------------------------------------------------------------------


def detect_scenes(path: Path, cfg: SceneSplitConfig) -> list[tuple[int, int]]:
    scenedetect = require("scenedetect", "data.curate.scene_split")
    detector = scenedetect.ContentDetector(threshold=cfg.threshold, min_scene_len=cfg.min_scene_frames)
    try:
        scenes = scenedetect.detect(str(path), detector, backend="pyav")
    except Exception as exc:  # scenedetect wraps decoder errors in its own types
        raise ProbeError("scene_detect_failed", f"scene detection failed: {type(exc).__name__}: {exc}") from exc
    return [(int(s.frame_num), int(e.frame_num)) for s, e in scenes]


def clip_view(info: MediaInfo, start: int, end: int) -> MediaInfo:
    """The MediaInfo of frames [start, end) of a video, for sampling and bucketing within a scene."""
    n = end - start
    return replace(info, num_frames=n, duration=n / info.fps if info.fps else 0.0)


def write_scene_clip(path: Path, info: MediaInfo, start: int, end: int, out_dir: Path, content_hash: str) -> Path:
    """Frames [start, end) as their own mp4 (for tools that want files, not ranges); idempotent."""
    from flowspeed.datasets_prep.decode import DECODERS
    from flowspeed.datasets_prep.mp4 import write_mp4

    target = Path(out_dir) / f"{content_hash}_{start:06d}_{end:06d}.mp4"
    if not target.exists():
        frames = DECODERS["pyav"](Path(path), list(range(start, end)))
        h, w = frames.shape[1] // 2 * 2, frames.shape[2] // 2 * 2  # 4:2:0 needs even sides
        write_mp4(target, np.ascontiguousarray(frames[:, :h, :w]), info.fps or 24.0)
    return target


class SceneCache:
    """Scenes per (file content, scene settings): a re-run detects nothing again."""

    def __init__(self, root: Path, cfg: SceneSplitConfig, writer: int = 0) -> None:
        self.store = RecordStore(root, f"scenes-{config_hash(cfg)}", "content_hash", writer)
        self.cfg = cfg

    def get(self, content_hash: str, path: Path) -> list[tuple[int, int]]:
        if content_hash not in self.store:
            scenes = [list(r) for r in detect_scenes(path, self.cfg)]
            self.store.put({"content_hash": content_hash, "scenes": scenes})
        return [tuple(r) for r in self.store.get(content_hash)["scenes"]]

    def save(self) -> None:
        self.store.save()


# ---- scores -------------------------------------------------------------------------------------


def motion_score(frames: np.ndarray, method: str = "farneback") -> float:
    """(T, H, W, C) uint8 -> mean motion between consecutive frames, in pixels (flow) or grey levels (diff)."""
    cv2 = require("cv2", "data.curate.motion")

    grey = [cv2.cvtColor(np.ascontiguousarray(f), cv2.COLOR_RGB2GRAY) for f in frames]
    if len(grey) < 2:
        return 0.0
    vals = []
    for a, b in zip(grey, grey[1:], strict=False):
        if method == "diff":
            vals.append(float(np.abs(a.astype(np.int16) - b.astype(np.int16)).mean()))
        else:
            flow = cv2.calcOpticalFlowFarneback(a, b, None, 0.5, 3, 15, 3, 5, 1.2, 0)
            vals.append(float(np.linalg.norm(flow, axis=-1).mean()))
    return float(np.mean(vals))


def load_head(path: str | None, dim: int, seed: int = 0) -> torch.nn.Sequential:
    """A chain of Linear layers rebuilt from a state dict, in key order.

    LAION's improved aesthetic predictor is exactly that (5 Linear layers; its Dropouts hold no
    weights and do nothing at inference), and a linear probe is the 1-layer case.
    """
    if path is None:
        torch.manual_seed(seed)
        return torch.nn.Sequential(torch.nn.Linear(dim, 1)).eval()
    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"data.curate.aesthetic.head={path} does not exist")
    state = load_file(str(file)) if file.suffix == ".safetensors" else torch.load(file, weights_only=True)
    state = state.get("state_dict", state)
    weights = [k for k in state if k.endswith("weight") and state[k].ndim == 2]
    layers = [torch.nn.Linear(state[k].shape[1], state[k].shape[0]) for k in weights]
    for layer, k in zip(layers, weights, strict=True):
        layer.weight.data.copy_(state[k])
        layer.bias.data.copy_(state[k[: -len("weight")] + "bias"])
    if not layers or layers[0].in_features != dim or layers[-1].out_features != 1:
        maps = f"{layers[0].in_features} -> {layers[-1].out_features}" if layers else "nothing"
        raise ValueError(f"aesthetic head {path} maps {maps}; the CLIP model gives {dim}-dim embeddings: {dim} -> 1")
    return torch.nn.Sequential(*layers).eval()


class ClipScorer:
    """CLIP embeddings (for dedup) and aesthetic scores from the same forward pass."""

    def __init__(self, cfg: AestheticConfig, device: torch.device) -> None:
        from flowspeed.evaluation.clip_score import load_clip

        self.model, self.preprocess, _ = load_clip(cfg.clip, device)
        self.device = device
        dim = self.model.visual.output_dim if hasattr(self.model.visual, "output_dim") else None
        if dim is None:
            dim = int(self.model.encode_image(torch.zeros(1, 3, 224, 224, device=device)).shape[-1])
        self.head = load_head(cfg.head, dim).to(device)

    @torch.no_grad()
    def __call__(self, frames: np.ndarray) -> tuple[torch.Tensor, float]:
        images = torch.stack([self.preprocess(Image.fromarray(f)) for f in frames]).to(self.device)
        emb = torch.nn.functional.normalize(self.model.encode_image(images).float(), dim=-1)  # (T, D)
        score = float(self.head(emb).mean())
        return torch.nn.functional.normalize(emb.mean(0), dim=0).cpu(), score


class ScoreCache:
    """Scores and CLIP embeddings per sample key under one set of scorers, one file pair per writer."""

    def __init__(self, root: Path, cfg: CurateConfig, writer: int = 0) -> None:
        # Thresholds are not in the tag: re-running with other thresholds rescores nothing.
        what = {"frames": cfg.sample_frames, "clip": cfg.aesthetic.clip.model_dump(), "head": cfg.aesthetic.head,
                "motion": cfg.motion.method}  # fmt: skip
        tag = hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()[:12]
        self.scores = RecordStore(root, f"scores-{tag}", "key", writer)
        self.emb_path = Path(root) / f"embeddings-{tag}-w{writer:03d}.safetensors"
        self.emb: dict[str, torch.Tensor] = {}
        for path in sorted(Path(root).glob(f"embeddings-{tag}-w*.safetensors")):
            self.emb.update(load_file(str(path)))
        self._own_emb = load_file(str(self.emb_path)) if self.emb_path.is_file() else {}

    def put_embedding(self, key: str, emb: torch.Tensor) -> None:
        self.emb[key] = self._own_emb[key] = emb

    def save(self) -> None:
        self.scores.save()
        if self._own_emb:
            atomic_write(self.emb_path, lambda tmp: save_file(dict(self._own_emb), str(tmp)))


def near_duplicates(keys: list[str], emb: dict[str, torch.Tensor], threshold: float) -> dict[str, str]:
    """{dropped key: the kept key it duplicates}; order decides which of a group is kept."""
    kept: list[str] = []
    dropped: dict[str, str] = {}
    for key in keys:
        if key not in emb:
            continue
        if kept:
            sims = torch.stack([emb[k] for k in kept]) @ emb[key]
            j = int(sims.argmax())
            if float(sims[j]) >= threshold:
                dropped[key] = kept[j]
                continue
        kept.append(key)
    return dropped


def score_all(cfg: PipelineConfig, cands: list[tuple[str, dict]], writer: int = 0) -> ScoreCache:
    """Motion, aesthetic and CLIP embedding for every candidate not scored under these settings."""
    cur = cfg.data.curate
    cache = ScoreCache(cfg.curation_dir, cur, writer)

    def missing(key: str) -> bool:  # scores made with other scorers enabled may lack a field
        sc = cache.scores.get(key)
        if sc is None:
            return True
        if "error" in sc:
            return False
        return ((cur.motion.enabled and "motion" not in sc) or (cur.aesthetic.enabled and "aesthetic" not in sc)
                or (cur.dedup.enabled and key not in cache.emb))  # fmt: skip

    todo = [(k, r) for k, r in cands if missing(k)]
    needs_clip = cur.aesthetic.enabled or cur.dedup.enabled
    scorer = ClipScorer(cur.aesthetic, resolve_device(cfg.data.device)) if todo and needs_clip else None
    rep = reporter()
    rep.start("score", len(todo))
    for key, rec in todo:
        rep.advance("score")
        idx = rec["frame_indices"]
        n = cur.sample_frames
        pick = sorted({idx[round(i * (len(idx) - 1) / (n - 1))] for i in range(n)})
        try:
            frames, _ = decode(probe(Path(rec["source"])), pick, cfg.data.decoder)
        except ProbeError as exc:
            cache.scores.put({"key": key, "error": str(exc)})
            continue
        scores: dict[str, Any] = {**cache.scores.get(key, {}), "key": key}
        if cur.motion.enabled:
            scores["motion"] = motion_score(frames, cur.motion.method)
        if scorer is not None:
            emb, aesthetic = scorer(frames)
            cache.put_embedding(key, emb)
            if cur.aesthetic.enabled:
                scores["aesthetic"] = aesthetic
        cache.scores.put(scores)
    rep.finish("score")
    cache.save()
    return cache


def curate(
    cfg: PipelineConfig, cands: list[tuple[str, dict]], writer: int = 0
) -> tuple[dict[str, tuple[str, str]], dict]:
    """Score candidates (key, record) and apply thresholds: ({key: (code, reason)}, {key: scores}).

    Near-duplicates are decided later, by `dedup`, over every slice's survivors at once.
    """
    cur = cfg.data.curate
    cache = score_all(cfg, cands, writer)
    drop: dict[str, tuple[str, str]] = {}
    for key, _ in cands:
        sc = cache.scores.get(key, {})
        if "error" in sc:
            drop[key] = ("score_failed", sc["error"])
        elif cur.aesthetic.min_score is not None and sc.get("aesthetic", np.inf) < cur.aesthetic.min_score:
            drop[key] = ("low_aesthetic", f"aesthetic {sc['aesthetic']:.3f} below {cur.aesthetic.min_score}")
        elif cur.motion.min_score is not None and sc.get("motion", np.inf) < cur.motion.min_score:
            drop[key] = ("low_motion", f"motion {sc['motion']:.3f} below {cur.motion.min_score}")
        elif cur.motion.max_score is not None and sc.get("motion", -np.inf) > cur.motion.max_score:
            drop[key] = ("high_motion", f"motion {sc['motion']:.3f} above {cur.motion.max_score}")
    scores = {k: {n: v for n, v in cache.scores.get(k).items() if n != "key"} for k, _ in cands if k in cache.scores}
    return drop, scores


def dedup(cfg: PipelineConfig, keys: list[str]) -> dict[str, tuple[str, str]]:
    """Near-duplicates among `keys` (manifest order: the first of a group stays), across all slices."""
    cur = cfg.data.curate
    if not cur.dedup.enabled:
        return {}
    emb = ScoreCache(cfg.curation_dir, cur).emb
    found = near_duplicates(keys, emb, cur.dedup.threshold)
    return {k: ("duplicate", f"near duplicate (CLIP cosine >= {cur.dedup.threshold}) of sample {o}")
            for k, o in found.items()}  # fmt: skip
