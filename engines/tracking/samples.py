"""Samples at checkpoints: what the model makes at each checkpoint, in MLflow, so the run page shows it improving.

    checkpoint_samples(cfg, export, tracker, step, rank, device)   # every rank, right after a checkpoint

Generating families (`Capability.GENERATION`) make one sample per prompt from fixed prompts and seeds
(`tracking.samples.prompts`, default the first `count` of `eval.prompts`; seed `eval.seed + i`, as the eval
stage seeds them): a grid image, one row per prompt and up to 8 evenly spaced frames per row (image families:
the images side by side), is logged with `MlflowClient.log_image(key="samples", step=step)`, which MLflow's
Images view shows with a step slider; the clips (mp4) or images (png) themselves go to the run's artifacts under
`samples/step-XXXXXXXX/`. Families that answer or transcribe (`respond`) answer the first `count` held-out
samples (training samples when nothing is held out), appended with their step to the table
`samples/answers.json` (`MlflowClient.log_table`, one table across checkpoints). Seconds spent go to
`perf/sample_seconds`. Everything is also kept under `<train_dir>/samples/`.

The families generate and answer from an export (`generate(pretrained_dir, ...)`, `respond(pretrained_dir,
...)`), the way the eval stage calls them, so the model is first written with the engine's own `export`
(collective: FSDP/TP/CP/PP shards are gathered to rank 0 exactly as for `final/`, LoRA merged, EMA weights
when EMA is on), to a scratch folder removed afterwards. Rank 0 alone then generates, with the RNG state of
every generator saved and restored, so sampling never changes what training draws next (a resumed run stays
bit-identical), while the other ranks wait at a barrier. Sampling must never end a training run: a failure
(out of memory beside the training state, a family that cannot generate at this size) is logged, tagged
`flowspeed.samples_skipped` with its reason, and training goes on.
"""

from __future__ import annotations

import json
import logging
import random
import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from flowspeed.configs import PipelineConfig
from flowspeed.engines.common.io import atomic_write, atomic_write_text
from flowspeed.engines.models import get_family
from flowspeed.engines.models.registry import Capability, ModelFamily
from flowspeed.engines.tracking.tracker import Tracker

log = logging.getLogger(__name__)

SAMPLES_DIR = "samples"  # under the training folder
IMAGE_KEY = "samples"  # the MLflow image key: the run's Images view, one entry per step
TABLE = "samples/answers.json"  # the MLflow table of answers, one row per sample and checkpoint
SKIPPED_TAG = "flowspeed.samples_skipped"
STRIP_FRAMES = 8  # frames per prompt in the grid
GAP = 2  # pixels between tiles


def due(cfg: PipelineConfig, step: int, end_step: int) -> bool:
    """Whether the checkpoint at `step` gets samples: every `every`-th checkpoint, and the run's last step."""
    s = cfg.tracking.samples
    if not s.enabled:
        return False
    return step == end_step or (step // cfg.train.checkpoint_every) % s.every == 0


def prompts_of(cfg: PipelineConfig) -> list[str]:
    s = cfg.tracking.samples
    return list(s.prompts if s.prompts is not None else cfg.eval.prompts[: s.count])


def skip_reason(cfg: PipelineConfig, family: ModelFamily) -> str | None:
    """Why this run cannot log samples (the same on every rank, so all skip the collective export), or None."""
    if family.can(Capability.GENERATION):
        return None if prompts_of(cfg) else "no prompts: set tracking.samples.prompts or eval.prompts"
    if family.can(Capability.ANSWERS) or family.can(Capability.TRANSCRIPTION):
        return None
    return f"family {family.name} neither generates nor answers"


def checkpoint_samples(
    cfg: PipelineConfig,
    export: Callable[[Path], None],
    tracker: Tracker,
    step: int,
    rank: int,
    device: torch.device,
) -> None:
    """Export (collective, every rank), then rank 0 samples and logs; never raises (see the module docstring)."""
    family = get_family(cfg.model.family)
    reason = skip_reason(cfg, family)
    if reason is not None:
        if rank == 0:
            log.warning("samples at step %d skipped: %s", step, reason)
            tracker.set_tags({SKIPPED_TAG: reason})
        return
    t0 = time.perf_counter()
    folder = cfg.train_dir / SAMPLES_DIR
    model_dir = folder / ".model"
    failure: BaseException | None = None
    try:
        export(model_dir)  # collective; writes on rank 0 only
    except Exception as exc:  # noqa: BLE001 - a failed sample must not end the training run
        failure = exc
    if rank == 0:
        try:
            if failure is not None:
                raise failure
            with isolated_rng(device):
                if family.can(Capability.GENERATION):
                    _generated(cfg, family, model_dir, folder / f"step-{step:08d}", tracker, step, device)
                else:
                    _answered(cfg, family, model_dir, folder, tracker, step, device)
        except Exception as exc:  # noqa: BLE001 - see above
            log.warning("samples at step %d skipped: %s: %s", step, type(exc).__name__, exc)
            tracker.set_tags({SKIPPED_TAG: f"step {step}: {type(exc).__name__}: {exc}"[:500]})
        finally:
            shutil.rmtree(model_dir, ignore_errors=True)
            if device.type == "cuda":
                torch.cuda.empty_cache()  # the pipeline's memory back to the training state
        tracker.log_metrics({"perf/sample_seconds": time.perf_counter() - t0}, step=step)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()  # the other ranks wait for rank 0's samples before the next step


@contextmanager
def isolated_rng(device: torch.device) -> Iterator[None]:
    """Python's, NumPy's and torch's (CPU and this device's) RNG states put back afterwards: a pipeline may
    seed or draw from the global generators, and training must draw exactly what it would have."""
    py, np_state = random.getstate(), np.random.get_state()
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices, device_type=device.type if devices else "cuda"):
        try:
            yield
        finally:
            random.setstate(py)
            np.random.set_state(np_state)


# --------------------------------------------------------------------------- generating families


def grid(videos: np.ndarray, frames: int = STRIP_FRAMES) -> np.ndarray:
    """(N, T, H, W, 3) uint8 -> one image: a row per video of up to `frames` evenly spaced frames; one-frame
    samples (images) side by side in one row. Tiles are separated by black lines."""
    n, t, h, w, c = videos.shape
    if t == 1:
        videos = videos.transpose(1, 0, 2, 3, 4)  # one row of the N images
        n, t = 1, n
    picked = np.unique(np.linspace(0, t - 1, min(t, frames)).round().astype(int))
    out = np.zeros((n * h + (n - 1) * GAP, len(picked) * w + (len(picked) - 1) * GAP, c), np.uint8)
    for r in range(n):
        for k, f in enumerate(picked):
            out[r * (h + GAP) : r * (h + GAP) + h, k * (w + GAP) : k * (w + GAP) + w] = videos[r, f]
    return out


def _generated(
    cfg: PipelineConfig,
    family: Any,
    model_dir: Path,
    out: Path,
    tracker: Tracker,
    step: int,
    device: torch.device,
) -> None:
    """One sample per prompt, each its own call and seed (eval.seed + i, as the eval stage seeds sample i)."""
    from flowspeed.datasets_prep.mp4 import write_sample
    from PIL import Image

    e, d, s = cfg.eval, cfg.data, cfg.tracking.samples
    prompts = prompts_of(cfg)
    videos = np.concatenate([
        family.generate(model_dir, [prompt], num_frames=d.num_frames, height=d.height, width=d.width,
                        steps=s.num_inference_steps or e.num_inference_steps, guidance_scale=e.guidance_scale,
                        seed=e.seed + i, device=device)
        for i, prompt in enumerate(prompts)
    ])  # fmt: skip
    for i, video in enumerate(videos):
        write_sample(out, i, video, e.fps)
    image = grid(videos)
    atomic_write(out / "grid.png", lambda tmp: Image.fromarray(image).save(tmp, format="PNG"))
    rows = [{"sample": i, "prompt": p, "seed": e.seed + i} for i, p in enumerate(prompts)]
    atomic_write_text(out / "prompts.json", json.dumps(rows, indent=2))
    client = getattr(tracker, "client", None)  # None: a run without tracking keeps the local files only
    if client is not None:
        _upload(lambda: client.log_image(tracker.run_id, image, key=IMAGE_KEY, step=step), out)
        _upload(lambda: client.log_artifacts(tracker.run_id, str(out), f"{SAMPLES_DIR}/{out.name}"), out)


# --------------------------------------------------------------------------- answering and transcribing families


def _answered(
    cfg: PipelineConfig,
    family: Any,
    model_dir: Path,
    folder: Path,
    tracker: Tracker,
    step: int,
    device: torch.device,
) -> None:
    """The first `count` held-out samples answered (or transcribed), appended to the answers table."""
    from flowspeed.datasets_prep.cache import split_records
    from flowspeed.datasets_prep.prep import load_samples
    from flowspeed.datasets_prep.sequence_prep import sample_of
    from flowspeed.evaluation.common import max_new_tokens

    train, val = split_records(load_samples(cfg.prep_dir), cfg.train.val_fraction)
    split, records = ("held_out", val) if val else ("train", train)
    records = records[: cfg.tracking.samples.count]
    transcribes = family.can(Capability.TRANSCRIPTION)  # the reference is the transcript; there is no prompt
    samples = [sample_of(r, family, cfg) for r in records]
    answers = family.respond(model_dir, samples, max_new_tokens=max_new_tokens(cfg), device=device)
    rows = []
    for r, sample, answer in zip(records, samples, answers, strict=True):
        prompt = "" if transcribes else next(m["content"] for m in sample.messages if m["role"] == "user")
        reference = sample.text if transcribes else sample.messages[-1]["content"]
        rows.append({"step": step, "split": split, "source": r["source"], "prompt": prompt,
                     "reference": reference, "response": answer})  # fmt: skip
    path = folder / "answers.jsonl"
    old = path.read_text() if path.is_file() else ""
    atomic_write_text(path, old + "".join(json.dumps(row) + "\n" for row in rows))
    client = getattr(tracker, "client", None)
    if client is not None:
        table = {k: [row[k] for row in rows] for k in rows[0]}
        _upload(lambda: client.log_table(tracker.run_id, data=table, artifact_file=TABLE), path)


def _upload(send: Callable[[], None], local: Path) -> None:
    """An upload that fails (server away) is a warning: the samples stay on local disk."""
    try:
        send()
    except Exception as exc:  # noqa: BLE001 - any transport or server error
        log.warning("could not upload samples to MLflow (%s); they stay at %s", exc, local)
