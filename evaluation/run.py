"""The eval stage: validation loss, generated videos and CLIP score for a trained checkpoint.

Outputs under `cfg.eval_dir`: videos/sample_XX.mp4, metrics.json, config.yaml.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from configs import ComponentConfig, PipelineConfig, save_config
from datasets_prep.io import atomic_write, atomic_write_text
from datasets_prep.mp4 import write_mp4
from datasets_prep.prep import load_samples
from engines.device import resolve_device
from engines.models import get_family
from engines.models.sequence import SequenceFamily
from engines.torch_engine.data import CachedLatents, split_records
from evaluation.clip_score import clip_score
from evaluation.sequence_eval import run_sequence_eval


@dataclass
class EvalResult:
    eval_dir: str
    metrics: dict[str, float]
    videos: list[str] = field(default_factory=list)

    def as_dict(self) -> dict:
        return asdict(self)


def _trained_transformer(cfg: PipelineConfig, final_dir: Path) -> torch.nn.Module:
    family = get_family(cfg.model.family)
    trained = ComponentConfig(preset=None, pretrained=str(final_dir), subfolder=family.denoiser_subfolder)
    model_cfg = cfg.model.model_copy(update={"transformer": trained})
    return family.load_transformer(model_cfg, 0, 0)


@torch.no_grad()
def validation_loss(cfg: PipelineConfig, final_dir: Path, device: torch.device) -> tuple[float, int]:
    """Mean training loss over the held-out set with fixed noise and timesteps: deterministic."""
    family = get_family(cfg.model.family)
    _, val = split_records(load_samples(cfg.prep_dir), cfg.train.val_fraction)
    if not val:
        return float("nan"), 0
    model = _trained_transformer(cfg, final_dir).to(device).eval()
    scheduler = family.load_scheduler(cfg.model)
    data = CachedLatents(cfg.cache_dir, val)
    bs = cfg.train.batch_size
    losses = []
    for rep in range(cfg.eval.val_batches):
        for start in range(0, len(data), bs):
            batch = {
                k: v.to(device)
                for k, v in family.collate([data[i] for i in range(start, min(start + bs, len(data)))]).items()
            }
            gen = torch.Generator().manual_seed(cfg.eval.seed * 1000 + rep * 100 + start)
            losses.append(family.training_loss(model, scheduler, batch, gen).item())
    return float(sum(losses) / len(losses)), len(val)


def _write_sample(folder: Path, i: int, frames: np.ndarray, fps: int) -> Path:
    """A video as mp4; a one-frame sample (image families) as png."""
    if len(frames) == 1:
        from PIL import Image

        path = folder / f"sample_{i:02d}.png"
        atomic_write(path, lambda tmp: Image.fromarray(frames[0]).save(tmp, format="PNG"))
        return path
    return write_mp4(folder / f"sample_{i:02d}.mp4", frames, fps)


def trained_export(cfg: PipelineConfig) -> Path:
    """The export an eval of this config reads. `<train_dir>/final`, except after `train.init_from:
    champion`, whose runs train in `<train_dir>/from-<model>-v<N>-<data>/` (one per champion and
    data): then the newest of those, so `flowspeed eval` alone finds what the last finetune made."""
    if cfg.eval.model:
        return model_to_evaluate(cfg, cfg.eval.model)
    final = cfg.train_dir / "final"
    if cfg.train.init_from != "champion":
        return final
    family = get_family(cfg.model.family)
    done = [d / "final" for d in cfg.train_dir.glob("from-*") if family.export_files(d / "final")[0].is_file()]
    return max(done, key=lambda p: family.export_files(p)[0].stat().st_mtime) if done else final


def model_to_evaluate(cfg: PipelineConfig, model: str) -> Path:
    """`eval.model` as a local export folder: a registry version (downloaded once under the
    workdir), a training checkpoint (exported once beside the eval outputs), or an export."""
    from engines.serving import SETTINGS, weights_dir

    if model.startswith("models:/"):
        from engines.model_registry import fetch_version, resolve_version
        from engines.tracking import tracking_uri

        uri = tracking_uri(cfg)
        name, version = resolve_version(uri, model)
        local = fetch_version(uri, name, version, cfg.workdir / ".registry" / name)
        settings = local / SETTINGS
        family = json.loads(settings.read_text()).get("family") if settings.is_file() else None
        if family and family != cfg.model.family:
            raise ValueError(f"{model} is a {family} model but this config's model.family is {cfg.model.family}: "
                             f"evaluate it with a {family} config")  # fmt: skip
        return weights_dir(local)
    path = Path(model)
    if (path / "trainer_state.pt").is_file():
        from engines.torch_engine.trainer import export_checkpoint

        out = cfg.eval_dir.parent / ".eval-exports" / f"{path.parent.parent.name}-{path.name}"
        if not get_family(cfg.model.family).export_files(out)[0].is_file():
            export_checkpoint(path, out)
        return out
    if not path.is_dir():
        raise FileNotFoundError(f"eval.model={model}: no such folder (a models:/ URI, a checkpoint or an export)")
    return weights_dir(path)


def run_eval(cfg: PipelineConfig, final_dir: Path | None = None) -> EvalResult:
    t0 = time.perf_counter()
    final_dir = Path(final_dir or trained_export(cfg))
    family = get_family(cfg.model.family)
    if not family.export_files(final_dir)[0].is_file():
        raise FileNotFoundError(f"no exported model at {final_dir}: run `flowspeed train` first")
    out = cfg.eval_dir
    save_config(cfg, out)
    device = resolve_device(cfg.train.device)
    if isinstance(family, SequenceFamily):  # text out: held-out loss and answers, no media metrics
        res = run_sequence_eval(cfg, family, final_dir, device)
        res["metrics"]["eval/seconds"] = time.perf_counter() - t0
        result = EvalResult(str(out), res["metrics"], res["paths"])
        atomic_write_text(out / "metrics.json", json.dumps(result.as_dict(), indent=2))
        return result
    val_loss, n_val = validation_loss(cfg, final_dir, device)
    e, d = cfg.eval, cfg.data
    videos = family.generate(
        final_dir,
        e.prompts,
        num_frames=d.num_frames,
        height=d.height,
        width=d.width,
        steps=e.num_inference_steps,
        guidance_scale=e.guidance_scale,
        seed=e.seed,
        device=device,
    )
    paths = [str(_write_sample(out / "videos", i, v, e.fps)) for i, v in enumerate(videos)]
    metrics = {"eval/val_loss": val_loss, "eval/val_samples": float(n_val)}
    metrics.update({f"eval/{k}": v for k, v in clip_score(videos, e.prompts, e.clip, device).items()})
    metrics["eval/seconds"] = time.perf_counter() - t0
    result = EvalResult(str(out), metrics, paths)
    atomic_write_text(out / "metrics.json", json.dumps(result.as_dict(), indent=2))
    return result
