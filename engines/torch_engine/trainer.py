"""The training loop: one process, or one rank of a torchrun job (NCCL, HCCL or gloo).

    torchrun --nproc_per_node 2 -m engines.torch_engine.trainer --config runs/x/train/config.yaml

The layout (train.parallel: FSDP2/HSDP/DDP x TP x CP) is applied by engines.torch_engine.setup;
this loop only sees a module to call, an optimizer and the data-parallel coordinates.

Reads the prep stage's cached latents, never raw media. Exact resume: the sample order and the
noise of every step are pure functions of (seed, step), and the checkpoint carries the optimizer,
LR schedule, RNG states and data position, so k steps + resume == an uninterrupted run.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import shutil
import statistics
import tempfile
import time
import warnings
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.elastic.multiprocessing.errors import record

from configs import PipelineConfig, load_config, save_config
from datasets_prep.cache import CachedLatents, split_records
from datasets_prep.prep import load_samples
from engines.common.device import device_name, peak_memory_bytes, synchronize
from engines.common.io import atomic_write_text, default_modes, text_digest
from engines.common.progress import reporter
from engines.models import get_family
from engines.torch_engine import checkpoint as ckpt
from engines.torch_engine.flops import mfu, peak_tflops, train_flops
from engines.torch_engine.lora import apply_lora, merge, save_adapter
from engines.torch_engine.sampler import BucketBatchSampler
from engines.torch_engine.setup import Ema, build_model, full_value, grad_sync, init_distributed, step_profiler, unwrap
from engines.tracking.tracker import UNDELIVERED_DIR, make_tracker, start_system_metrics, stop_system_metrics


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


def lr_lambda(warmup: int, total: int, min_ratio: float):
    """Linear warmup, then cosine decay to `min_ratio` of the peak."""

    def f(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return f


def step_generator(seed: int, step: int, micro: int) -> torch.Generator:
    """Noise for global micro-batch `micro` of `step`: the same draw whichever rank computes it."""
    return torch.Generator().manual_seed(int(text_digest(str(seed), str(step), str(micro))[:15], 16))


def train(cfg: PipelineConfig, run_id: str | None = None, tracking_uri: str | None = None) -> TrainResult:
    # Family objectives never modify the denoiser's output in place, which is what this FSDP2 warning guards.
    warnings.filterwarnings("ignore", message="FSDP2-wrapped module .* returned a view tensor")
    t_cfg = cfg.train
    env = init_distributed(cfg)
    rank, device, dims = env.rank, env.device, env.dims
    if dims.pp > 1:
        raise ValueError(
            "train.parallel.pp > 1: pipeline parallel is available for transformers language backbones "
            "(engines.torch_engine.pipeline_parallel); the diffusion denoisers train with fsdp/tp/cp instead"
        )
    family = get_family(cfg.model.family)
    train_dir = cfg.train_dir
    undelivered = train_dir / UNDELIVERED_DIR
    tracker = make_tracker(tracking_uri, run_id, rank, t_cfg.metrics_flush_every, undelivered_dir=undelivered,
                           grace_s=cfg.tracking.outage_grace_s)  # fmt: skip
    monitor = start_system_metrics(cfg, tracking_uri, run_id)
    try:
        records, _ = split_records(load_samples(cfg.prep_dir), t_cfg.val_fraction)
        dataset = CachedLatents(cfg.cache_dir, records)
        first = records[0]
        model_args = family.model_args(first)
        model = build_model(family, cfg, model_args, env)
        core = unwrap(model)
        model.train()
        scheduler = family.load_scheduler(cfg.model)
        trainable = [p for p in model.parameters() if p.requires_grad]
        n_trainable = sum(_numel(p) for p in trainable)
        n_total = sum(_numel(p) for p in model.parameters())
        optimizer = torch.optim.AdamW(trainable, lr=t_cfg.lr, weight_decay=t_cfg.weight_decay)
        lr_sched = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lr_lambda(t_cfg.warmup_steps, t_cfg.max_steps, t_cfg.min_lr_ratio)
        )
        ema = Ema(model, t_cfg.ema.decay) if t_cfg.ema.enabled else None
        sampler = make_sampler(cfg, records, env.dp_rank, env.dp_world)
        start_step, samples_seen = 0, 0
        resume_from = resume_path(cfg)
        if resume_from is not None:
            state = ckpt.load(resume_from, model, optimizer, lr_sched, ema.shadow if ema else None)
            start_step, samples_seen = state["step"], state["samples_seen"]
            sampler.load_state_dict(state["data"])
        else:
            torch.manual_seed(t_cfg.seed)
        peak = peak_tflops(device, _compute_dtype(cfg), t_cfg.peak_tflops)
        if rank == 0:
            ckpt.clean_partial(train_dir)
            save_config(cfg, train_dir)
            tracker.set_tags(
                {
                    "resumed_from_step": start_step,
                    "world_size": env.world,
                    "parallel_layout": dims.describe(),
                    "device": device.type,
                    "device_name": device_name(device),
                    "n_params": n_total,
                    "n_trainable_params": n_trainable,
                    "mfu": "measured" if peak else f"n/a (no peak FLOPS known for {device_name(device)})",
                }
            )
        autocast = (
            torch.autocast(device.type, dtype=torch.bfloat16) if t_cfg.mixed_precision == "bf16" else nullcontext()
        )
        dp_group = env.mesh["dp"].get_group() if env.mesh is not None else None
        accum = t_cfg.grad_accum
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
        profiler = step_profiler(t_cfg.profile, device, train_dir / "profile", rank)
        pending: ckpt.PendingCheckpoint | None = None
        # Async saves talk over a gloo group of their own, so they never queue behind training collectives.
        async_group = dist.new_group(backend="gloo") if t_cfg.async_checkpoint and env.world > 1 else None
        with profiler as prof:
            for step in range(start_step, end_step):
                t0 = time.perf_counter()
                data_wait = 0.0
                loss_acc = torch.zeros((), device=device)
                counts = [0, 0, 0]  # samples, frames, latent tokens of this rank's micro-batches
                for micro in range(accum):
                    tw = time.perf_counter()
                    idx = next(batches)
                    batch = {k: v.to(device) for k, v in family.collate([dataset[i] for i in idx]).items()}
                    rec = records[idx[0]]
                    tokens = family.sample_tokens(core.config, rec)
                    data_wait += time.perf_counter() - tw
                    # Global micro-batch index: dp ranks x accumulation covers the same batches (and the
                    # same noise) as one process accumulating dp x as many micro-batches.
                    gen = step_generator(t_cfg.seed, step, micro * env.dp_world + env.dp_rank)
                    with grad_sync(model, micro == accum - 1), autocast:
                        loss = family.training_loss(model, scheduler, batch, gen)
                    (loss / accum).backward()
                    loss_acc += loss.detach().float()  # stays on device: no sync per micro-batch
                    n = len(idx)
                    counts = [counts[0] + n, counts[1] + n * rec.get("num_frames", 0), counts[2] + n * tokens]
                if dims.cp > 1:  # each CP rank's weight gradients cover only its part of the sequence
                    from engines.torch_engine.context_parallel import reduce_cp_grads

                    reduce_cp_grads(model, env.mesh["cp"])
                synchronize(device)
                t_opt = time.perf_counter()
                grad_norm = full_value(torch.nn.utils.clip_grad_norm_(trainable, t_cfg.max_grad_norm))
                lr = optimizer.param_groups[0]["lr"]
                optimizer.step()
                lr_sched.step()
                optimizer.zero_grad(set_to_none=True)
                if ema is not None:
                    ema.update()
                # [loss sum, samples, frames, tokens], summed over the data-parallel ranks in one collective
                counts_t = torch.tensor(counts, dtype=torch.float64, device=device)
                totals = torch.cat([loss_acc.double().view(1), counts_t])
                if dp_group is not None:
                    dist.all_reduce(totals, op=dist.ReduceOp.SUM, group=dp_group)
                loss_total, n_samples, n_frames, n_tokens = totals.tolist()  # syncs the device
                t_end = time.perf_counter()
                step_loss = loss_total / (accum * env.dp_world)
                samples_seen += int(n_samples)
                dt = t_end - t0
                step_times.append(dt)
                losses.append(step_loss)
                if prof is not None:
                    prof.step()
                if rank == 0:
                    rep.advance("train")
                    if (step + 1) % t_cfg.log_every == 0 or step + 1 == t_cfg.max_steps:
                        per_sample = n_tokens / max(n_samples, 1)
                        flops = train_flops(n_total, core.config, int(per_sample), int(n_samples))
                        metrics = {
                            "train/loss": step_loss,
                            "train/lr": lr,
                            "train/grad_norm": float(grad_norm),
                            "perf/step_time_s": dt,
                            "perf/data_wait_s": data_wait,
                            "perf/fwd_bwd_s": t_opt - t0 - data_wait,
                            "perf/optimizer_s": t_end - t_opt,
                            "perf/samples_per_s": n_samples / dt,
                            "perf/frames_per_s": n_frames / dt,
                            "perf/tokens_per_s": n_tokens / dt,
                            "perf/model_tflops_per_s_per_rank": flops / dt / env.world / 1e12,
                            "perf/peak_memory_gb": peak_memory_bytes(device) / 2**30,
                        }
                        m = mfu(flops, dt, peak, env.world)
                        if m is not None:
                            metrics["perf/mfu"] = m
                        tracker.log_metrics(metrics, step=step + 1)
                done = step + 1
                if done % t_cfg.checkpoint_every == 0 or done == end_step:
                    data_state = {**sampler.state_dict(), "samples_seen": samples_seen}
                    extra = {"model_args": model_args, "layout": dims.describe()}
                    if pending is not None:  # the previous async save must land before the next starts
                        _published(pending.wait(), tracker, rank)
                    # Before the checkpoint can be published: the steps it covers are in MLflow or on disk,
                    # so a kill after it loses none (the resume starts after them). Bounded wait, rank 0.
                    tracker.persist()
                    pending = ckpt.save(
                        train_dir, done, model, optimizer, lr_sched, data_state, cfg, t_cfg.keep_checkpoints,
                        extra=extra, ema=ema.shadow if ema else None, async_save=t_cfg.async_checkpoint,
                        group=async_group,
                    )  # fmt: skip
                    if not t_cfg.async_checkpoint:
                        last_ckpt = _published(pending.wait(), tracker, rank)
                        pending = None
        if pending is not None:
            last_ckpt = _published(pending.wait(), tracker, rank)
        if rank == 0:
            rep.finish("train")
            if t_cfg.profile.enabled and (train_dir / "profile").is_dir():
                tracker.log_artifacts(train_dir / "profile", "profile")
        # A time-sliced invocation that stops early leaves checkpoints only: `final/` means finished.
        final_dir = train_dir / "final"
        if end_step == t_cfg.max_steps:
            full = ckpt.full_model_state(model)  # collective: every rank sends its shards to rank 0
            if ema is not None:  # the release model is the EMA one
                shadow = {n: full_value(t).cpu() for n, t in ema.shadow.items()}  # collective for DTensors
                if rank == 0:
                    full.update(shadow)
            if rank == 0:
                export_weights(family, cfg, model_args, full, final_dir)
        if env.world > 1:
            dist.barrier()
        last_ckpt = ckpt.latest(train_dir) or last_ckpt
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


def _published(path: Path, tracker, rank: int) -> Path:  # noqa: ANN001
    if rank == 0:
        step = int(ckpt.STEP_RE.match(path.name).group(1))
        tracker.set_tags({"checkpoint_path": str(path.resolve()), "checkpoint_step": step})
    return path


def _numel(p: torch.Tensor) -> int:
    """Global size of a parameter (a DTensor's shape is its global shape)."""
    return p.numel()


def _compute_dtype(cfg: PipelineConfig) -> str:
    bf16 = cfg.train.mixed_precision == "bf16" or cfg.train.fsdp.param_dtype == "bfloat16"
    return "bfloat16" if bf16 else "float32"


def make_sampler(cfg: PipelineConfig, records: list[dict], rank: int, world: int) -> BucketBatchSampler:
    """Batches never mix shapes: the bucket is the cached latent shape. Open-Sora bucket configs
    carry their own batch size per bucket; otherwise every bucket uses train.batch_size."""
    family = get_family(cfg.model.family)
    shapes = [family.bucket_key(r) for r in records]
    bs: int | dict = cfg.train.batch_size
    if cfg.data.buckets.mode == "opensora" and all("bucket_batch_size" in r for r in records):
        bs = {family.bucket_key(r): int(r["bucket_batch_size"]) for r in records}
    return BucketBatchSampler(shapes, bs, seed=cfg.train.seed, rank=rank, world=world)


def resume_path(cfg: PipelineConfig) -> Path | None:
    mode = cfg.train.resume
    if mode == "never":
        return None
    if mode == "auto":
        return ckpt.latest_intact(cfg.train_dir)  # a damaged newest one is skipped, with a warning
    path = Path(mode)
    if not (path / "trainer_state.pt").is_file():
        raise FileNotFoundError(f"train.resume={mode} is not a checkpoint directory (no trainer_state.pt)")
    return path


def plain_model(family, cfg: PipelineConfig, model_args: dict[str, int]) -> torch.nn.Module:  # noqa: ANN001
    """The family's model as one process builds it (with adapters when LoRA is on), on CPU."""
    model = family.load_transformer(cfg.model, **model_args)
    if cfg.train.lora.enabled:
        apply_lora(model, cfg.train.lora, family.lora_targets, family.lora_exclude)
    return model


def export_weights(family, cfg: PipelineConfig, model_args: dict, state: dict, final_dir: Path) -> Path:  # noqa: ANN001
    """Unsharded weights -> the family's native (diffusers) layout, written beside and swapped in,
    so `final/` is always whole. With LoRA: the adapter alone, then a plain model with it merged."""
    model = plain_model(family, cfg, model_args)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(f"checkpoint does not fit {type(model).__name__}: missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]}")  # fmt: skip
    final_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".final.", dir=final_dir.parent))
    try:
        if cfg.train.lora.enabled:
            save_adapter(model, tmp / "lora", cfg.train.lora, family.lora_targets)
            merge(model)
        family.save_pretrained(tmp, cfg.model, model)
        save_config(cfg, tmp)
        default_modes(tmp)  # mkdtemp's 0700 would keep a shared export from teammates
        old = None
        if final_dir.exists():  # moved aside, not deleted first: a kill in between never leaves no final/
            old = Path(tempfile.mkdtemp(prefix=".final.", suffix=".old", dir=final_dir.parent))
            os.replace(final_dir, old)
        os.replace(tmp, final_dir)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final_dir


def export_checkpoint(checkpoint: Path, out_dir: Path, *, use_ema: bool = False) -> Path:
    """A sharded training checkpoint (any layout) -> a release folder in the family's native format,
    in one process. The checkpoint carries the config and model arguments that made it."""
    checkpoint = Path(checkpoint)
    if not (checkpoint / "trainer_state.pt").is_file():
        raise FileNotFoundError(f"{checkpoint} is not a checkpoint directory (no trainer_state.pt)")
    cfg = load_config(checkpoint / "config.yaml", check=False)  # a checkpoint made before a newer rule still exports
    state = torch.load(checkpoint / "trainer_state.pt", weights_only=True, map_location="cpu")
    family = get_family(cfg.model.family)
    model = plain_model(family, cfg, state["model_args"])
    ckpt.load_model_weights(checkpoint, model, ema=use_ema)
    return export_weights(family, cfg, state["model_args"], model.state_dict(), Path(out_dir))


@record
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, type=Path)
    parser.add_argument("--run-id", default=None)
    parser.add_argument("--tracking-uri", default=None)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    cfg = load_config(args.config)
    try:
        train(cfg, args.run_id, args.tracking_uri)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
