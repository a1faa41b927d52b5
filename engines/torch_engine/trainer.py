"""The training loop: one process, or one rank of a torchrun job (DDP over gloo/NCCL/HCCL).

    torchrun --nproc_per_node 2 -m engines.torch_engine.trainer --config runs/x/train/config.yaml

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
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.elastic.multiprocessing.errors import record
from torch.nn.parallel import DistributedDataParallel

from configs import PipelineConfig, load_config, save_config
from datasets_prep.io import atomic_write_text, text_digest
from datasets_prep.prep import load_samples
from datasets_prep.progress import reporter
from engines.device import dist_backend, peak_memory_bytes, resolve_device
from engines.models import get_family
from engines.torch_engine import checkpoint as ckpt
from engines.torch_engine.data import CachedLatents, collate, split_records
from engines.torch_engine.lora import apply_lora, merge, save_adapter
from engines.torch_engine.sampler import BucketBatchSampler
from engines.tracking import make_tracker


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


def step_generator(seed: int, step: int, micro: int, rank: int) -> torch.Generator:
    return torch.Generator().manual_seed(int(text_digest(str(seed), str(step), str(micro), str(rank))[:15], 16))


def _init_distributed(cfg: PipelineConfig) -> tuple[int, int, torch.device]:
    world = int(os.environ.get("WORLD_SIZE", 1))
    rank = int(os.environ.get("RANK", 0))
    device = resolve_device(cfg.train.device)
    if world > 1 and not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(backend=dist_backend(device))
    return rank, world, device


def train(cfg: PipelineConfig, run_id: str | None = None, tracking_uri: str | None = None) -> TrainResult:
    t_cfg = cfg.train
    rank, world, device = _init_distributed(cfg)
    family = get_family(cfg.model.family)
    train_dir = cfg.train_dir
    tracker = make_tracker(tracking_uri, run_id, rank, t_cfg.metrics_flush_every)
    try:
        records, _ = split_records(load_samples(cfg.prep_dir), t_cfg.val_fraction)
        dataset = CachedLatents(cfg.cache_dir, records)
        first = records[0]
        latent_channels = first["latent_shape"][0] // 2
        model = family.load_transformer(cfg.model, first["text_shape"][-1], latent_channels).to(device)
        if t_cfg.lora.enabled:
            apply_lora(model, t_cfg.lora, family.lora_targets)
        model.train()
        scheduler = family.load_scheduler(cfg.model)
        trainable = [p for p in model.parameters() if p.requires_grad]
        n_params = sum(p.numel() for p in trainable)
        optimizer = torch.optim.AdamW(trainable, lr=t_cfg.lr, weight_decay=t_cfg.weight_decay)
        lr_sched = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lr_lambda(t_cfg.warmup_steps, t_cfg.max_steps, t_cfg.min_lr_ratio)
        )
        sampler = make_sampler(cfg, records, rank, world)
        start_step, samples_seen = 0, 0
        resume_from = _resume_path(cfg)
        if resume_from is not None:
            state = ckpt.load(resume_from, model, optimizer, lr_sched)
            start_step, samples_seen = state["step"], state["samples_seen"]
            sampler.load_state_dict(state["data"])
        else:
            torch.manual_seed(t_cfg.seed)
        if rank == 0:
            ckpt.clean_partial(train_dir)
            save_config(cfg, train_dir)
            tracker.set_tags(
                {"resumed_from_step": start_step, "world_size": world, "device": device.type, "n_params": n_params}
            )
        ddp = DistributedDataParallel(model) if world > 1 else model
        autocast = (
            torch.autocast(device.type, dtype=torch.bfloat16) if t_cfg.mixed_precision == "bf16" else nullcontext()
        )
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
        for step in range(start_step, end_step):
            t0 = time.perf_counter()
            data_wait = 0.0
            loss_acc = torch.zeros((), device=device)
            counts = [0, 0, 0]  # samples, frames, latent tokens of this rank's micro-batches
            for micro in range(accum):
                tw = time.perf_counter()
                idx = next(batches)
                batch = {k: v.to(device) for k, v in collate([dataset[i] for i in idx]).items()}
                rec = records[idx[0]]
                tokens = family.latent_tokens(model.config, tuple(rec["latent_shape"]))
                data_wait += time.perf_counter() - tw
                sync = nullcontext() if (world == 1 or micro == accum - 1) else ddp.no_sync()
                with sync, autocast:
                    loss = family.training_loss(ddp, scheduler, batch, step_generator(t_cfg.seed, step, micro, rank))
                (loss / accum).backward()
                loss_acc += loss.detach().float()  # stays on device: no sync per micro-batch
                n = len(idx)
                counts = [counts[0] + n, counts[1] + n * rec["num_frames"], counts[2] + n * tokens]
            grad_norm = torch.nn.utils.clip_grad_norm_(trainable, t_cfg.max_grad_norm)
            lr = optimizer.param_groups[0]["lr"]
            optimizer.step()
            lr_sched.step()
            optimizer.zero_grad(set_to_none=True)
            # [loss sum, samples, frames, tokens], summed over ranks in one collective
            totals = torch.cat([loss_acc.double().view(1), torch.tensor(counts, dtype=torch.float64, device=device)])
            if world > 1:
                dist.all_reduce(totals, op=dist.ReduceOp.SUM)
            loss_total, n_samples, n_frames, n_tokens = totals.tolist()
            step_loss = loss_total / (accum * world)
            samples_seen += int(n_samples)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            dt = time.perf_counter() - t0
            step_times.append(dt)
            losses.append(step_loss)
            if rank == 0:
                rep.advance("train")
                if (step + 1) % t_cfg.log_every == 0 or step + 1 == t_cfg.max_steps:
                    tracker.log_metrics(
                        {
                            "train/loss": step_loss,
                            "train/lr": lr,
                            "train/grad_norm": float(grad_norm),
                            "perf/step_time_s": dt,
                            "perf/data_wait_s": data_wait,
                            "perf/samples_per_s": n_samples / dt,
                            "perf/frames_per_s": n_frames / dt,
                            "perf/tokens_per_s": n_tokens / dt,
                            # 6 * params * tokens: the usual dense-transformer estimate (attention excluded).
                            "perf/model_tflops_per_s": 6 * n_params * n_tokens / dt / 1e12,
                            "perf/peak_memory_gb": peak_memory_bytes(device) / 2**30,
                        },
                        step=step + 1,
                    )
            done = step + 1
            if done % t_cfg.checkpoint_every == 0 or done == end_step:
                if rank == 0:
                    data_state = {**sampler.state_dict(), "samples_seen": samples_seen}
                    last_ckpt = ckpt.save(
                        train_dir, done, model, optimizer, lr_sched, data_state, cfg, t_cfg.keep_checkpoints
                    )
                    tracker.set_tags({"checkpoint_path": str(last_ckpt.resolve()), "checkpoint_step": done})
                if world > 1:
                    dist.barrier()
        if rank == 0:
            rep.finish("train")
        # A time-sliced invocation that stops early leaves checkpoints only: `final/` means finished.
        final_dir = train_dir / "final"
        if rank == 0 and end_step == t_cfg.max_steps:
            _export(family, cfg, model, final_dir)
        if world > 1:
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
        tracker.close()


def make_sampler(cfg: PipelineConfig, records: list[dict], rank: int, world: int) -> BucketBatchSampler:
    """Batches never mix shapes: the bucket is the cached latent shape. Open-Sora bucket configs
    carry their own batch size per bucket; otherwise every bucket uses train.batch_size."""
    shapes = [tuple(r["latent_shape"]) for r in records]
    bs: int | dict = cfg.train.batch_size
    if cfg.data.buckets.mode == "opensora":
        bs = {tuple(r["latent_shape"]): int(r["bucket_batch_size"]) for r in records}
    return BucketBatchSampler(shapes, bs, seed=cfg.train.seed, rank=rank, world=world)


def _resume_path(cfg: PipelineConfig) -> Path | None:
    mode = cfg.train.resume
    if mode == "never":
        return None
    if mode == "auto":
        return ckpt.latest(cfg.train_dir)
    path = Path(mode)
    if not (path / "trainer_state.pt").is_file():
        raise FileNotFoundError(f"train.resume={mode} is not a checkpoint directory (no trainer_state.pt)")
    return path


def _export(family, cfg: PipelineConfig, model: torch.nn.Module, final_dir: Path) -> None:
    """Native diffusers layout, written beside and swapped in, so `final/` is always whole."""
    final_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".final.", dir=final_dir.parent))
    try:
        model = model.to("cpu")
        if cfg.train.lora.enabled:  # the adapter alone, then a plain pipeline with it merged in
            save_adapter(model, tmp / "lora", cfg.train.lora, family.lora_targets)
            merge(model)
        family.save_pretrained(tmp, cfg.model, model)
        save_config(cfg, tmp)
        if final_dir.exists():
            shutil.rmtree(final_dir)
        os.replace(tmp, final_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


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
