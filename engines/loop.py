"""The training loop both engines share: everything around the step that does not depend on the engine.

    run_training(cfg, backend, run_id, tracking_uri) -> TrainResult

The loop owns the bookkeeping: MLflow tracker and system metrics, the train split, the bucketed sampler
and its position, resume, rank 0's run tags, progress, step timing and the metric dict (`train/loss,
train/lr, train/grad_norm, perf/*`), the checkpoint cadence (steps persisted to MLflow before each
save, the checkpoint tags), `final/` only when the run reached train.max_steps, `losses.json` and the
result. An engine plugs in through `TrainBackend` (build, forward_backward, optimizer_step, save/load,
export), in the spirit of torchtitan's train_step / forward_backward_step split: the torch engine
(engines/torch_engine/trainer.py) and the megatron engine (engines/megatron/trainer.py).

A non-finite loss stops the run before the optimizer applies it (`NonFiniteLoss`): the error names the
step, the last good checkpoint and what to change, MLflow gets a `flowspeed.stopped_reason` tag, and no checkpoint
of the bad state is written.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import statistics
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import psutil
import torch
import torch.distributed as dist
from flowspeed.configs import PipelineConfig, load_config, save_config
from flowspeed.datasets_prep.cache import CachedLatents, split_records
from flowspeed.datasets_prep.prep import load_samples
from flowspeed.engines.common.checkpoints import (
    STEP_RE,
    PendingCheckpoint,
    check_resumable,
    clean_partial,
    latest,
    latest_intact,
    list_checkpoints,
    verify,
)
from flowspeed.engines.common.device import device_name, peak_memory_bytes
from flowspeed.engines.common.flops import mfu, peak_tflops, train_flops
from flowspeed.engines.common.io import atomic_write_text
from flowspeed.engines.common.progress import log_train_step, reporter
from flowspeed.engines.common.safe_load import CheckpointError
from flowspeed.engines.common.sampler import BucketBatchSampler, TokenBudgetBatchSampler
from flowspeed.engines.models import get_family
from flowspeed.engines.tracking.samples import checkpoint_samples
from flowspeed.engines.tracking.samples import due as checkpoint_due
from flowspeed.engines.tracking.tracker import UNDELIVERED_DIR, make_tracker, start_system_metrics, stop_system_metrics

log = logging.getLogger(__name__)


@dataclass
class TrainResult:
    final_dir: str
    checkpoint: str
    steps: int
    resumed_from: int
    losses: list[float]
    samples_per_s: float
    median_step_s: float = 0.0

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass
class Facts:
    """What the loop needs to know about the job and the model an engine built (tags, MFU, sampler)."""

    rank: int
    world: int
    dp_rank: int
    dp_world: int
    device: torch.device
    n_params: int
    n_trainable: int
    layout: str  # the `flowspeed.engine_layout` tag
    compute_dtype: str  # "bfloat16" or "float32": which peak FLOPS MFU is measured against
    flops_config: Any  # the model config train_flops reads (layers, hidden size)
    tags: dict[str, Any] = field(default_factory=dict)  # engine-specific run tags, e.g. {"engine": "megatron"}


@dataclass
class StepOutput:
    """One step's forward and backward over every micro-batch, summed over the data-parallel ranks."""

    loss: float  # the step's mean loss, the same on every rank
    samples: int
    frames: int
    tokens: int  # latent or text tokens, for throughput and FLOPs
    data_wait_s: float  # time spent loading and collating this step's batches
    # token positions the model computed, pads included, when the family batches tokens (0: no padding notion);
    # `tokens` counts only the real ones, so 1 - tokens / slots is what padding wasted
    slots: int = 0
    # a training method's per-step metrics (engines/methods: train/reward_mean, train/margin, ...), averaged over the
    # micro-batches and data-parallel ranks
    metrics: dict[str, float] = field(default_factory=dict)


@dataclass
class OptimizerOutput:
    grad_norm: float
    lr: float  # the learning rate the update used
    optimizer_s: float  # clipping, the update, the LR schedule (and any gather they need)


class TrainBackend(Protocol):
    """An engine, as the loop sees it. Every method is called on every rank; collective ones say so."""

    #: checkpoints are written in the background and waited for before the next one (the torch engine)
    async_checkpoint: bool

    def init(self) -> tuple[int, int, torch.device]:
        """Join the process group, if any: (rank, world, device). Before anything else, even the tracker."""
        ...

    def build(self, records: list[dict], dataset: CachedLatents) -> Facts:
        """Load the model, apply the parallel layout, make the optimizer (collective)."""
        ...

    def load(self, path: Path | None) -> dict[str, Any] | None:
        """Restore a checkpoint (model, optimizer, schedule, RNG) and return its trainer state (`step`,
        `samples_seen`, `data`), or seed a fresh start when `path` is None (collective)."""
        ...

    def forward_backward(self, step: int, batches: Iterator[list[int]]) -> StepOutput:
        """Run this step's micro-batches (drawn from `batches`), leaving the gradients to apply. An engine
        whose schedule fuses the optimizer into the step may apply it here if it skips non-finite gradients."""
        ...

    def optimizer_step(self, step: int) -> OptimizerOutput:
        """Clip and apply the gradients of `forward_backward`, advance the LR schedule."""
        ...

    def save(self, step: int, data_state: dict[str, Any]) -> PendingCheckpoint:
        """Start writing checkpoint `step` (collective); `.wait()` publishes it."""
        ...

    def export(self, final_dir: Path) -> None:
        """Write the trained model to `final_dir` in the family's native layout (collective)."""
        ...

    def profiler(self, out_dir: Path) -> AbstractContextManager:
        """A step profiler (`.step()` after each step), or a null context."""
        ...


class NonFiniteLoss(FloatingPointError):
    """The step's loss is NaN or infinite: the run stops before the update, with what to do about it."""


def lr_lambda(warmup: int, total: int, min_ratio: float) -> Callable[[int], float]:
    """Linear warmup, then cosine decay to `min_ratio` of the peak."""

    def f(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return f


def make_sampler(
    cfg: PipelineConfig, records: list[dict], rank: int, world: int
) -> BucketBatchSampler | TokenBudgetBatchSampler:
    """Batches never mix shapes: the bucket is the cached latent shape. Open-Sora bucket configs
    carry their own batch size per bucket; otherwise every bucket uses train.batch_size. With
    train.packing.max_tokens (token-loss families) micro-batches are cut by token budget instead."""
    family = get_family(cfg.model.family)
    packing = cfg.train.packing
    if packing.max_tokens is not None:
        return TokenBudgetBatchSampler(
            [family.sample_tokens(None, r) for r in records],
            packing.max_tokens,
            vision_lengths=[family.vision_tokens(r) for r in records],
            max_vision_tokens=packing.max_vision_tokens,
            seed=cfg.train.seed,
            rank=rank,
            world=world,
        )
    shapes = [family.bucket_key(r) for r in records]
    bs: int | dict = cfg.train.batch_size
    if cfg.data.buckets.mode == "opensora" and all("bucket_batch_size" in r for r in records):
        bs = {family.bucket_key(r): int(r["bucket_batch_size"]) for r in records}
    return BucketBatchSampler(shapes, bs, seed=cfg.train.seed, rank=rank, world=world)


def elastic_restarts() -> int:
    """How many times torchrun's elastic agent has restarted this rank's group (0: the first attempt, or no agent)."""
    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0)


def _this_jobs_latest(train_dir: Path) -> Path | None:
    """The newest intact checkpoint written since this torchrun job began (its agent, our parent, started).

    A restarted group continues its job, so `train.resume: never` or a path only decide where the first attempt
    starts; older checkpoints in the folder (a previous run's, when the run started over) are not this job's."""
    started = psutil.Process(os.getppid()).create_time()
    ours = [c for c in list_checkpoints(train_dir) if (c / "trainer_state.pt").stat().st_mtime >= started]
    for candidate in reversed(ours):
        try:
            verify(candidate)
        except CheckpointError as exc:
            log.warning("skipping damaged checkpoint %s: %s", candidate, exc)
            continue
        return candidate
    return None


def resume_path(cfg: PipelineConfig) -> Path | None:
    """The checkpoint train.resume asks for: none (`never`), the newest intact one (`auto`), or a path. A group
    torchrun's elastic agent restarted resumes from the newest checkpoint its job published, whatever the mode."""
    mode = cfg.train.resume
    if mode != "auto" and elastic_restarts() and (ours := _this_jobs_latest(cfg.train_dir)) is not None:
        check_resumable(ours, cfg)
        return ours
    if mode == "never":
        return None
    if mode == "auto":
        path = latest_intact(cfg.train_dir)  # a damaged newest one is skipped, with a warning
    else:
        path = Path(mode)
        if not (path / "trainer_state.pt").is_file():
            raise FileNotFoundError(f"train.resume={mode} is not a checkpoint directory (no trainer_state.pt)")
    if path is not None:
        check_resumable(path, cfg)  # another model's checkpoint: refused by name, not a DCP failure per rank
    return path


def non_finite_message(cfg: PipelineConfig, step: int, loss: float, last_good: Path | None) -> str:
    """What a person needs to act on a diverged run: where, from what to restart, what to change."""
    t = cfg.train
    good = str(last_good) if last_good is not None else "none: the run starts from scratch"
    bf16 = t.mixed_precision == "bf16" or t.fsdp.param_dtype == "bfloat16"
    precision = (
        f"train.mixed_precision is {t.mixed_precision} and train.fsdp.param_dtype {t.fsdp.param_dtype}: "
        + ("try fp32 (mixed_precision=no, param_dtype=float32) to rule out bf16 overflow" if bf16 else
           "the step ran in fp32, so bf16 overflow is not the cause")
    )  # fmt: skip
    again = "Resume from that checkpoint with train.resume=auto." if last_good else "Then run again."
    return (
        f"training stopped at step {step + 1}: the loss is {loss} (not finite), so this step's update was not "
        f"applied and no checkpoint of it was written. Last good checkpoint: {good}. To go on: lower train.lr "
        f"(now {t.lr}) or lengthen train.warmup_steps (now {t.warmup_steps}), clip harder with "
        f"train.max_grad_norm (now {t.max_grad_norm}); {precision}; and check the data (a corrupt or "
        f"empty sample, a cache from another model). {again}"
    )


def run_training(
    cfg: PipelineConfig, backend: TrainBackend, run_id: str | None = None, tracking_uri: str | None = None
) -> TrainResult:
    """Train `cfg` with `backend` on this rank; every rank of the job calls it."""
    t_cfg = cfg.train
    rank, world, device = backend.init()
    train_dir = cfg.train_dir
    undelivered = train_dir / UNDELIVERED_DIR
    tracker = make_tracker(tracking_uri, run_id, rank, t_cfg.metrics_flush_every, undelivered_dir=undelivered,
                           grace_s=cfg.tracking.outage_grace_s)  # fmt: skip
    monitor = start_system_metrics(cfg, tracking_uri, run_id)
    try:
        resume_from = resume_path(cfg)  # before the model is built: a refused checkpoint fails in a second
        records, _ = split_records(load_samples(cfg.prep_dir), t_cfg.val_fraction)
        facts = backend.build(records, CachedLatents(cfg.cache_dir, records))
        sampler = make_sampler(cfg, records, facts.dp_rank, facts.dp_world)
        state = backend.load(resume_from)
        start_step, samples_seen = 0, 0
        if state is not None:
            start_step, samples_seen = state["step"], state["samples_seen"]
            sampler.load_state_dict(state["data"])
        peak = peak_tflops(device, facts.compute_dtype, t_cfg.peak_tflops)
        if rank == 0:
            clean_partial(train_dir)
            save_config(cfg, train_dir)
            tracker.set_tags({  # every tag under flowspeed.: the config's layout and device are the run's
                **{k if k.startswith("flowspeed.") else f"flowspeed.{k}": v for k, v in facts.tags.items()},
                "flowspeed.resumed_from_step": start_step,
                "flowspeed.world_size": world,
                "flowspeed.engine_layout": facts.layout,  # what the engine built (flowspeed.parallel_layout: asked)
                "flowspeed.device_type": device.type,
                "flowspeed.device_name": device_name(device),
                "flowspeed.n_params": facts.n_params,
                "flowspeed.n_trainable_params": facts.n_trainable,
                "flowspeed.mfu": "measured" if peak else f"n/a (no peak FLOPS known for {device_name(device)})",
            })  # fmt: skip
            if t_cfg.elastic is not None:  # each attempt of an elastic job: how many restarts came before it
                restarts = elastic_restarts()
                tracker.set_tags({"flowspeed.elastic.restarts": restarts})
                # at the step this attempt resumes from, which the killed attempt's metrics already hold
                tracker.log_event({"elastic/restarts": restarts}, step=start_step)
                if restarts:
                    log.warning("elastic restart %d: resuming from step %d (%s)", restarts, start_step, resume_from)
        batches = iter(sampler)
        state_samples = samples_seen
        end_step = t_cfg.max_steps
        if t_cfg.stop_after_steps is not None:
            end_step = min(end_step, start_step + t_cfg.stop_after_steps)
        losses: list[float] = []
        step_times: list[float] = []
        rep = reporter()
        if rank == 0:
            rep.start("train", max(end_step - start_step, 0))
        last_ckpt = resume_from
        pending: PendingCheckpoint | None = None

        def published(path: Path) -> Path:
            if rank == 0:
                step = int(STEP_RE.match(path.name).group(1))
                tracker.set_tags({"flowspeed.checkpoint_path": str(path.resolve()), "flowspeed.checkpoint_step": step})
            return path

        with backend.profiler(train_dir / "profile") as prof:
            for step in range(start_step, end_step):
                t0 = time.perf_counter()
                out = backend.forward_backward(step, batches)
                if not math.isfinite(out.loss):  # every rank holds the same reduced loss: all stop here
                    if pending is not None:  # the state it holds is from before this step: good
                        last_ckpt = published(pending.wait())
                    message = non_finite_message(cfg, step, out.loss, last_ckpt)
                    if rank == 0:
                        tracker.set_tags({"flowspeed.stopped_reason": f"non-finite loss at step {step + 1}"})
                    raise NonFiniteLoss(message)
                opt = backend.optimizer_step(step)
                dt = time.perf_counter() - t0
                samples_seen += out.samples
                step_times.append(dt)
                losses.append(out.loss)
                if prof is not None:
                    prof.step()
                if rank == 0:
                    rep.advance("train")
                    if (step + 1) % t_cfg.log_every == 0 or step + 1 == t_cfg.max_steps:
                        per_sample = out.tokens / max(out.samples, 1)
                        flops = train_flops(facts.n_params, facts.flops_config, int(per_sample), out.samples)
                        metrics = {
                            "train/loss": out.loss,
                            "train/lr": opt.lr,
                            "train/grad_norm": float(opt.grad_norm),
                            "perf/step_time_s": dt,
                            "perf/data_wait_s": out.data_wait_s,
                            "perf/fwd_bwd_s": dt - out.data_wait_s - opt.optimizer_s,
                            "perf/optimizer_s": opt.optimizer_s,
                            "perf/samples_per_s": out.samples / dt,
                            "perf/frames_per_s": out.frames / dt,
                            "perf/tokens_per_s": out.tokens / dt,
                            **({"perf/padding_ratio": 1 - out.tokens / out.slots} if out.slots else {}),
                            "perf/model_tflops_per_s_per_rank": flops / dt / world / 1e12,
                            "perf/peak_memory_gb": peak_memory_bytes(device) / 2**30,
                            **out.metrics,
                        }
                        m = mfu(flops, dt, peak, world)
                        if m is not None:
                            metrics["perf/mfu"] = m
                        tracker.log_metrics(metrics, step=step + 1)
                        log_train_step(step + 1, end_step, out.loss, out.samples / dt, step_times)  # flow-run logs
                done = step + 1
                if done % t_cfg.checkpoint_every == 0 or done == end_step:
                    data_state = {**sampler.state_dict(), "samples_seen": samples_seen}
                    if pending is not None:  # the previous async save must land before the next starts
                        last_ckpt = published(pending.wait())
                    # Before the checkpoint can be published: the steps it covers are in MLflow or on disk,
                    # so a kill after it loses none (the resume starts after them). Bounded wait, rank 0.
                    tracker.persist()
                    pending = backend.save(done, data_state)
                    if not backend.async_checkpoint:
                        last_ckpt = published(pending.wait())
                        pending = None
                    if checkpoint_due(cfg, done, end_step):  # samples in MLflow: engines/tracking/samples.py
                        checkpoint_samples(cfg, backend.export, tracker, done, rank, device)
        if pending is not None:
            last_ckpt = published(pending.wait())
        if rank == 0:
            rep.finish("train")
            if t_cfg.profile.enabled and (train_dir / "profile").is_dir():
                tracker.log_artifacts(train_dir / "profile", "profile")
        # A time-sliced invocation that stops early leaves checkpoints only: `final/` means finished.
        final_dir = train_dir / "final"
        if end_step == t_cfg.max_steps:
            backend.export(final_dir)
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.barrier()
        last_ckpt = latest(train_dir) or last_ckpt
        busy = sum(step_times)
        sps = (samples_seen - state_samples) / busy if busy else 0.0
        median = statistics.median(step_times) if step_times else 0.0
        result = TrainResult(str(final_dir), str(last_ckpt or ""), end_step, start_step, losses, sps, median)
        if rank == 0:
            atomic_write_text(train_dir / "losses.json", json.dumps(result.as_dict(), indent=2))
        return result
    finally:
        stop_system_metrics(monitor)
        tracker.close()


def rank_main(train: Callable[[PipelineConfig, str | None, str | None], TrainResult], doc: str | None) -> None:
    """An engine's torchrun entry point (`python -m <engine trainer> --config ...`, see engines/launch.py):
    one rank's training, then its process group torn down however the run ended."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, type=Path)
    parser.add_argument("--run-id", default=None)
    parser.add_argument("--tracking-uri", default=None)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        train(load_config(args.config), args.run_id, args.tracking_uri or None)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
