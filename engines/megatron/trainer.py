"""The megatron-core engine's training loop (`train.engine: megatron`), one rank of a torchrun job.

    torchrun --nproc_per_node 2 -m engines.megatron.trainer --config runs/x/train/launch_config.yaml

Same contract as the torch engine (engines/torch_engine/trainer.py): it reads the prep stage's cache,
logs the same metric names to MLflow, writes resumable checkpoints under `<train_dir>/checkpoints/`
and exports `final/` in the family's native (transformers) layout, so eval, registry and serving do
not know which engine trained the model. What differs is the parallelism: megatron-core's TP, SP,
PP (1F1B, interleaved with virtual stages), its DDP and distributed optimizer, its recomputation.

Checkpoints are megatron `dist_checkpointing` directories (model and optimizer stored by global
tensor, the distributed optimizer in its fully reshardable form), so a run can resume on another
TP/PP/DP layout. The weights start from the family's HF model (tiny preset or `from_pretrained`),
converted per rank in memory (engines/megatron/convert.py).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.elastic.multiprocessing.errors import record

from configs import PipelineConfig, load_config, save_config
from datasets_prep.cache import CachedLatents, split_records
from datasets_prep.prep import load_samples
from engines.common.device import device_name, dist_backend, peak_memory_bytes, resolve_device, set_current, synchronize
from engines.common.io import atomic_write_text
from engines.common.progress import reporter
from engines.megatron.convert import hf_to_megatron, megatron_to_hf
from engines.megatron.gpt import DecoderShape, transformer_config
from engines.megatron.training import (
    Layout,
    build_chunks,
    load_state,
    make_optimizer,
    save_state,
    token_loss,
    train_step,
    unwrap,
)
from engines.megatron.vlm import MODELS, frozen_vision, join_hf_state, split_hf_state
from engines.models import get_family
from engines.models.sequence import IGNORE_INDEX
from engines.torch_engine import checkpoint as ckpt
from engines.torch_engine.flops import mfu, peak_tflops, train_flops
from engines.torch_engine.safe_load import check_state_dir
from engines.torch_engine.trainer import TrainResult, export_weights, lr_lambda, make_sampler, resume_path
from engines.tracking.tracker import UNDELIVERED_DIR, make_tracker, start_system_metrics, stop_system_metrics

#: families whose model the megatron engine builds (engines/megatron/vlm.py)
FAMILIES = tuple(MODELS)
MEDIA_KEYS = ("pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw")


def layout_of(cfg: PipelineConfig) -> Layout:
    p = cfg.train.parallel
    return Layout(
        tp=p.tp,
        pp=p.pp,
        vpp=p.pp_virtual_stages if p.pp_virtual_stages > 1 else None,
        cp=p.cp,
        sequence_parallel=p.sequence_parallel,
        distributed_optimizer=cfg.train.megatron.distributed_optimizer,
        recompute=cfg.train.activation_checkpointing,
        bf16=cfg.train.mixed_precision == "bf16",
    )


def num_microbatches(cfg: PipelineConfig) -> int:
    return cfg.train.parallel.pp_microbatches or cfg.train.grad_accum


def validate(cfg: PipelineConfig) -> None:
    """What can be refused before any process starts: the family, LoRA, the torch-engine-only settings."""
    from configs.validate import check_layout  # the rules load_config applies too: one place for both engines

    check_layout(cfg)
    get_family(cfg.model.family).frozen_prefixes(cfg.model)  # refuses a freeze the family cannot honour
    t = cfg.train
    # what only this process can tell (CP needs CUDA here); the layer split is checked where the depth is known
    layout_of(cfg).check(t.nnodes * t.nproc_per_node, None, num_microbatches(cfg))


def _init(cfg: PipelineConfig) -> tuple[int, int, torch.device]:
    t = cfg.train
    device = resolve_device(t.device)
    set_current(device)
    if not dist.is_initialized():  # megatron needs a process group even for one rank
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", "29511")
        os.environ.setdefault("RANK", "0")
        os.environ.setdefault("WORLD_SIZE", "1")
        dist.init_process_group(backend=dist_backend(device), timeout=timedelta(seconds=t.collective_timeout_s))
    return dist.get_rank(), dist.get_world_size(), device


def megatron_batch(
    family: Any, hf_config: Any, items: list[dict[str, torch.Tensor]], multiple: int
) -> dict[str, torch.Tensor]:
    """A collated family batch -> what the family's megatron chunk takes: labels shifted left (megatron
    scores position t against token t+1), a loss mask, positions as the HF model computes them (3-D for
    Qwen2-VL), and the sequence padded to `multiple` (the TP size under sequence parallelism)."""
    batch = family.collate(items)
    length = batch["input_ids"].shape[1]
    pad = -length % multiple
    if pad:
        for key, value in (("input_ids", 0), ("labels", IGNORE_INDEX), ("attention_mask", 0), ("mm_token_type_ids", 0)):
            if key in batch:
                batch[key] = torch.nn.functional.pad(batch[key], (0, pad), value=value)
    labels = torch.full_like(batch["labels"], IGNORE_INDEX)
    labels[:, :-1] = batch["labels"][:, 1:]
    out = {
        "input_ids": batch["input_ids"],
        "position_ids": MODELS[family.name].positions(hf_config, batch),
        "labels": labels.clamp(min=0),
        "loss_mask": (labels != IGNORE_INDEX).long(),
    }
    out.update({k: batch[k] for k in MEDIA_KEYS if k in batch})
    return out


def vlm_forward_step(data: Any, model: Any) -> tuple[torch.Tensor, Any]:
    from functools import partial

    batch = next(data)
    media = {k: batch[k] for k in MEDIA_KEYS if k in batch}
    out = model(batch["input_ids"], batch["position_ids"], labels=batch["labels"], **media)
    return out, partial(token_loss, batch["loss_mask"])


class Chunks:
    """This rank's model chunks and where they sit: chunk i on pipeline rank r is global stage i * pp + r."""

    def __init__(self, cfg: PipelineConfig, hf: torch.nn.Module, layout: Layout, device: torch.device) -> None:
        from megatron.core import parallel_state as ps

        self.shape = DecoderShape.from_hf(hf.config)
        self.hf_config = hf.config
        self.config = transformer_config(self.shape, **layout.config_fields())
        if layout.pp > 1:
            self.config.variable_seq_lengths = True  # conversations differ in length from micro-batch to micro-batch
        self.layout = layout
        self.stages = layout.pp * (layout.vpp or 1)
        self.tp_rank, self.pp_rank = ps.get_tensor_model_parallel_rank(), ps.get_pipeline_model_parallel_rank()
        self.model_class = MODELS[cfg.model.family]
        decoder, vision = split_hf_state(hf.state_dict(), self.model_class.vision_prefixes)
        frozen = frozen_vision(get_family(cfg.model.family).frozen_prefixes(cfg.model), self.model_class)
        self.stage_ids: list[int] = []

        def make(pre: bool, post: bool, vp: int | None) -> torch.nn.Module:
            stage = (vp or 0) * layout.pp + self.pp_rank
            self.stage_ids.append(stage)
            model = self.model_class(self.hf_config, self.config, pre_process=pre, post_process=post, vp_stage=vp)
            part = hf_to_megatron(decoder, self.shape, layout.tp, self.tp_rank, self.stages, stage)
            state = {f"language_model.{k}": v for k, v in part.items()}
            if pre:
                state.update(vision)
                for name, param in model.named_parameters():  # before megatron's DDP, which skips frozen ones
                    if name.startswith(frozen):
                        param.requires_grad_(False)
            missing, unexpected = model.load_state_dict(state, strict=False)
            if unexpected or any(not k.endswith("_extra_state") for k in missing):
                raise ValueError(f"converted weights do not fit the megatron model: missing {missing[:5]}, "
                                 f"unexpected {unexpected[:5]}")  # fmt: skip
            return model

        self.models = build_chunks(make, self.config, layout, device)

    def full_hf_state(self) -> dict[str, torch.Tensor]:
        """Collective: the whole model in transformers' names on global rank 0 (empty elsewhere)."""
        from megatron.core import parallel_state as ps

        mine: dict[tuple[int, int], dict[str, torch.Tensor]] = {}
        if ps.get_data_parallel_rank(with_context_parallel=True) == 0:
            for stage, model in zip(self.stage_ids, self.models, strict=True):
                state = {k: v.detach().float().cpu() for k, v in unwrap(model).state_dict().items()
                         if "_extra_state" not in k}  # fmt: skip
                mine[(stage, self.tp_rank)] = state
        gathered: list[Any] = [None] * dist.get_world_size() if dist.get_rank() == 0 else None  # type: ignore[assignment]
        dist.gather_object(mine, gathered, dst=0)
        if dist.get_rank() != 0:
            return {}
        parts: dict[tuple[int, int], dict[str, torch.Tensor]] = {}
        for got in gathered:
            parts.update(got)
        lm_prefix = "language_model."
        shards = [
            [{k[len(lm_prefix) :]: v for k, v in parts[(s, t)].items() if k.startswith(lm_prefix)}
             for t in range(self.layout.tp)]
            for s in range(self.stages)
        ]  # fmt: skip
        hf = megatron_to_hf(shards, self.shape, prefix="model.language_model.")
        vision = {k: v for k, v in parts[(0, 0)].items() if not k.startswith(lm_prefix)}
        hf.update(join_hf_state(vision, self.model_class.vision_prefixes))
        return hf


def save_checkpoint(
    cfg: PipelineConfig, step: int, chunks: Chunks, optimizer: Any, data_state: dict, device: torch.device
) -> Path:
    """Collective. Written into a temp directory every rank shares, published by one rename (the torch
    engine's PendingCheckpoint), so `latest()` never sees half a checkpoint."""
    root = ckpt.checkpoint_dir(cfg.train_dir)
    rank = dist.get_rank()
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:08d}"
    tmp = ckpt.shared_tmp(root, final.name)
    pending = ckpt.PendingCheckpoint(tmp, final, cfg.train.keep_checkpoints, device)
    try:
        (tmp / "megatron").mkdir(exist_ok=True)
        save_state(chunks.models, optimizer, str(tmp / "megatron"))
        if rank == 0:
            layout = chunks.layout
            torch.save({"step": step, "data": data_state, "world_size": dist.get_world_size(), "engine": "megatron",
                        "layout": f"tp{layout.tp} pp{layout.pp} vpp{layout.vpp or 1} cp{layout.cp}"},
                       tmp / "trainer_state.pt")  # fmt: skip
            save_config(cfg, tmp)
    except BaseException as exc:  # reported after the ranks agree, so none waits forever
        pending.error = exc
    return pending.wait()


def load_checkpoint(path: Path, chunks: Chunks, optimizer: Any) -> dict[str, Any]:
    """Restore model and optimizer into whatever layout this job has (dist_checkpointing reshards)."""
    state = torch.load(path / "trainer_state.pt", weights_only=True, map_location="cpu")
    if state.get("engine") != "megatron":
        raise ValueError(f"{path} was written by the torch engine; resume it with train.engine=torch")
    check_state_dir(path / "megatron")  # megatron-core unpickles its files with code allowed: refuse tampered ones
    load_state(chunks.models, optimizer, str(path / "megatron"))
    return {**state, "step": int(state["step"]), "samples_seen": int(state["data"]["samples_seen"])}


def train(cfg: PipelineConfig, run_id: str | None = None, tracking_uri: str | None = None) -> TrainResult:
    from megatron.core import parallel_state as ps

    from engines.megatron.setup import init_model_parallel

    validate(cfg)
    t_cfg = cfg.train
    rank, world, device = _init(cfg)
    layout = layout_of(cfg)
    family = get_family(cfg.model.family)
    train_dir = cfg.train_dir
    undelivered = train_dir / UNDELIVERED_DIR
    tracker = make_tracker(tracking_uri, run_id, rank, t_cfg.metrics_flush_every, undelivered_dir=undelivered,
                           grace_s=cfg.tracking.outage_grace_s)  # fmt: skip
    monitor = start_system_metrics(cfg, tracking_uri, run_id)
    try:
        hf = family.load_model(cfg.model)
        n_total = sum(p.numel() for p in hf.parameters())
        text_config = hf.config.text_config
        layout.check(world, text_config.num_hidden_layers, num_microbatches(cfg))
        init_model_parallel(tp=layout.tp, pp=layout.pp, vpp=layout.vpp, cp=layout.cp, seed=t_cfg.seed)
        chunks = Chunks(cfg, hf, layout, device)
        del hf
        optimizer = make_optimizer(chunks.models, layout, lr=t_cfg.lr, weight_decay=t_cfg.weight_decay,
                                   clip_grad=t_cfg.max_grad_norm)  # fmt: skip
        schedule = lr_lambda(t_cfg.warmup_steps, t_cfg.max_steps, t_cfg.min_lr_ratio)
        dp_rank = ps.get_data_parallel_rank(with_context_parallel=True)
        dp_world = ps.get_data_parallel_world_size(with_context_parallel=True)
        records, _ = split_records(load_samples(cfg.prep_dir), t_cfg.val_fraction)
        dataset = CachedLatents(cfg.cache_dir, records)
        sampler = make_sampler(cfg, records, dp_rank, dp_world)
        start_step, samples_seen = 0, 0
        resume_from = resume_path(cfg)
        if resume_from is not None:
            state = load_checkpoint(resume_from, chunks, optimizer)
            start_step, samples_seen = state["step"], state["samples_seen"]
            sampler.load_state_dict(state["data"])
        peak = peak_tflops(device, "bfloat16" if layout.bf16 else "float32", t_cfg.peak_tflops)
        if rank == 0:
            ckpt.clean_partial(train_dir)
            save_config(cfg, train_dir)
            tracker.set_tags({
                "engine": "megatron",
                "resumed_from_step": start_step,
                "world_size": world,
                "parallel_layout": f"megatron tp={layout.tp} pp={layout.pp} vpp={layout.vpp or 1} cp={layout.cp} "
                                   f"dp={layout.dp(world)} sp={layout.sequence_parallel} "
                                   f"distributed_optimizer={layout.distributed_optimizer} recompute={layout.recompute}",
                "device": device.type,
                "device_name": device_name(device),
                "n_params": n_total,
                "n_trainable_params": n_total,
                "mfu": "measured" if peak else f"n/a (no peak FLOPS known for {device_name(device)})",
            })  # fmt: skip
        micro = num_microbatches(cfg)
        multiple = layout.tp if layout.sequence_parallel else 1
        batches = iter(sampler)
        end_step = t_cfg.max_steps
        if t_cfg.stop_after_steps is not None:
            end_step = min(end_step, start_step + t_cfg.stop_after_steps)
        losses: list[float] = []
        step_times: list[float] = []
        state_samples = samples_seen
        last_ckpt = resume_from
        rep = reporter()
        if rank == 0:
            rep.start("train", max(end_step - start_step, 0))
        for step in range(start_step, end_step):
            t0 = time.perf_counter()
            mbs, n_frames, n_tokens = [], 0, 0
            for _ in range(micro):
                idx = next(batches)
                items = [dataset[i] for i in idx]
                batch = megatron_batch(family, chunks.hf_config, items, multiple)
                mbs.append({k: v.to(device) for k, v in batch.items()})
                n_frames += sum(int(records[i].get("num_frames", 0)) for i in idx)
                n_tokens += int(batch["input_ids"].numel())
            data_wait = time.perf_counter() - t0
            seq = max(b["input_ids"].shape[1] for b in mbs)
            lr = t_cfg.lr * schedule(step)
            result = train_step(chunks.models, optimizer, mbs, forward_step=vlm_forward_step, seq_length=seq,
                                micro_batch_size=mbs[0]["input_ids"].shape[0], lr=lr)  # fmt: skip
            synchronize(device)
            counts = torch.tensor([sum(b["input_ids"].shape[0] for b in mbs), n_frames, n_tokens],
                                  dtype=torch.float64, device=device)  # fmt: skip
            dist.all_reduce(counts, group=ps.get_data_parallel_group(with_context_parallel=True))
            n_samples, frames, tokens = counts.tolist()
            dt = time.perf_counter() - t0
            samples_seen += int(n_samples)
            step_times.append(dt)
            losses.append(result.loss)
            if rank == 0:
                rep.advance("train")
                if (step + 1) % t_cfg.log_every == 0 or step + 1 == t_cfg.max_steps:
                    flops = train_flops(n_total, text_config, int(tokens / max(n_samples, 1)), int(n_samples))
                    metrics = {
                        "train/loss": result.loss,
                        "train/lr": lr,
                        "train/grad_norm": result.grad_norm,
                        "perf/step_time_s": dt,
                        "perf/data_wait_s": data_wait,
                        "perf/fwd_bwd_s": dt - data_wait - result.optimizer_s,
                        "perf/optimizer_s": result.optimizer_s,
                        "perf/samples_per_s": n_samples / dt,
                        "perf/frames_per_s": frames / dt,
                        "perf/tokens_per_s": tokens / dt,
                        "perf/model_tflops_per_s_per_rank": flops / dt / world / 1e12,
                        "perf/peak_memory_gb": peak_memory_bytes(device) / 2**30,
                    }
                    m = mfu(flops, dt, peak, world)
                    if m is not None:
                        metrics["perf/mfu"] = m
                    tracker.log_metrics(metrics, step=step + 1)
            done = step + 1
            if done % t_cfg.checkpoint_every == 0 or done == end_step:
                data_state = {**sampler.state_dict(), "samples_seen": samples_seen}
                tracker.persist()  # the steps this checkpoint covers survive a kill (see engines.tracking.tracker)
                last_ckpt = save_checkpoint(cfg, done, chunks, optimizer, data_state, device)
                if rank == 0:
                    tracker.set_tags({"checkpoint_path": str(last_ckpt.resolve()), "checkpoint_step": done})
        if rank == 0:
            rep.finish("train")
        final_dir = train_dir / "final"
        if end_step == t_cfg.max_steps:
            full = chunks.full_hf_state()  # collective
            if rank == 0:
                export_weights(family, cfg, {}, full, final_dir)
        dist.barrier()
        last_ckpt = ckpt.latest(train_dir) or last_ckpt
        busy = sum(step_times)
        sps = (samples_seen - state_samples) / busy if busy else 0.0
        median = statistics.median(step_times) if step_times else 0.0
        result_ = TrainResult(str(final_dir), str(last_ckpt or ""), end_step, start_step, losses, sps, median)
        if rank == 0:
            atomic_write_text(train_dir / "losses.json", json.dumps(result_.as_dict(), indent=2))
        return result_
    finally:
        stop_system_metrics(monitor)
        tracker.close()


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
        train(cfg, args.run_id, args.tracking_uri or None)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
