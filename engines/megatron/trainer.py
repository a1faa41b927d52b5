"""The megatron-core engine's training loop (`train.engine: megatron`), one rank of a torchrun job.

    torchrun --nproc_per_node 2 -m flowspeed.engines.megatron.trainer --config runs/x/train/launch_config.yaml

`MegatronBackend` plugs into the loop both engines share (engines/loop.py: the prep stage's cache, the
same metric names in MLflow, resumable checkpoints under `<train_dir>/checkpoints/`, `final/` in the
family's native (transformers) layout), so eval, registry and serving do not know which engine trained
the model. What differs is the parallelism: megatron-core's TP, SP,
PP (1F1B, interleaved with virtual stages), its DDP and distributed optimizer, its recomputation.

Checkpoints are megatron `dist_checkpointing` directories (model and optimizer stored by global
tensor, the distributed optimizer in its fully reshardable form), so a run can resume on another
TP/PP/DP layout. The weights start from the family's HF model (tiny preset or `from_pretrained`),
converted per rank in memory (engines/megatron/convert.py).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from flowspeed.configs import PipelineConfig, save_config
from flowspeed.datasets_prep.cache import CachedLatents
from flowspeed.engines.common import checkpoints as ckpt
from flowspeed.engines.common.device import init_process_group, resolve_device, synchronize
from flowspeed.engines.common.extras import require
from flowspeed.engines.common.safe_load import check_state_dir
from flowspeed.engines.export import export_weights
from flowspeed.engines.loop import Facts, OptimizerOutput, StepOutput, TrainResult, lr_lambda, rank_main, run_training
from flowspeed.engines.megatron.batches import megatron_batch, megatron_packed_batch, vlm_forward_step
from flowspeed.engines.megatron.convert import hf_to_megatron, megatron_to_hf
from flowspeed.engines.megatron.gpt import DecoderShape, transformer_config
from flowspeed.engines.megatron.packing import packing_problems
from flowspeed.engines.megatron.training import (
    Layout,
    build_chunks,
    load_state,
    make_optimizer,
    save_state,
    train_step,
    unwrap,
)
from flowspeed.engines.megatron.vlm import MODELS, frozen_vision, join_hf_state, split_hf_state
from flowspeed.engines.models import get_family
from torch.distributed.elastic.multiprocessing.errors import record

#: families whose model the megatron engine builds (engines/megatron/vlm.py)
FAMILIES = tuple(MODELS)


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
    from flowspeed.configs.validate import check_layout  # the rules load_config applies too: one place for both engines

    check_layout(cfg)
    require("megatron.core", "train.engine: megatron")  # before torchrun starts any rank
    get_family(cfg.model.family).frozen_prefixes(cfg.model)  # refuses a freeze the family cannot honour
    t = cfg.train
    problems = packing_problems(cfg)
    if problems:
        raise ValueError("; ".join(problems))
    # what only this process can tell (CP needs CUDA here); the layer split is checked where the depth is known
    layout_of(cfg).check(t.nnodes * t.nproc_per_node, None, num_microbatches(cfg))


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
) -> ckpt.PendingCheckpoint:
    """Collective. Written into a temp directory every rank shares; `.wait()` publishes it by one rename
    (engines/common/checkpoints.py), so `latest()` never sees half a checkpoint."""
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
    return pending


def load_checkpoint(path: Path, chunks: Chunks, optimizer: Any) -> dict[str, Any]:
    """Restore model and optimizer into whatever layout this job has (dist_checkpointing reshards)."""
    state = torch.load(path / "trainer_state.pt", weights_only=True, map_location="cpu")
    if state.get("engine") != "megatron":
        raise ValueError(f"{path} was written by the torch engine; resume it with train.engine=torch")
    check_state_dir(path / "megatron")  # megatron-core unpickles its files with code allowed: refuse tampered ones
    load_state(chunks.models, optimizer, str(path / "megatron"))
    return {**state, "step": int(state["step"]), "samples_seen": int(state["data"]["samples_seen"])}


class MegatronBackend:
    """The megatron-core engine behind flowspeed.engines.loop.run_training: TP/SP/PP/CP, its DDP and distributed
    optimizer, dist_checkpointing checkpoints. Its schedule applies the optimizer inside the step (and skips
    an update whose gradients are not finite), so `forward_backward` runs both."""

    async_checkpoint = False

    def __init__(self, cfg: PipelineConfig) -> None:
        self.cfg = cfg
        self.t = cfg.train
        self.layout = layout_of(cfg)
        self.family = get_family(cfg.model.family)

    def init(self) -> tuple[int, int, torch.device]:
        validate(self.cfg)
        self.device = resolve_device(self.t.device)
        init_process_group(self.device, self.t.collective_timeout_s, alone=True)  # megatron needs one even alone
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        return self.rank, self.world, self.device

    def build(self, records: list[dict], dataset: CachedLatents) -> Facts:
        from flowspeed.engines.megatron.setup import init_model_parallel
        from megatron.core import parallel_state as ps

        cfg, t, layout = self.cfg, self.t, self.layout
        self.records, self.dataset = records, dataset
        hf = self.family.load_model(cfg.model)
        n_total = sum(p.numel() for p in hf.parameters())
        text_config = hf.config.text_config
        layout.check(self.world, text_config.num_hidden_layers, num_microbatches(cfg))
        init_model_parallel(tp=layout.tp, pp=layout.pp, vpp=layout.vpp, cp=layout.cp, seed=t.seed)
        self.chunks = Chunks(cfg, hf, layout, self.device)
        del hf
        self.optimizer = make_optimizer(self.chunks.models, layout, lr=t.lr, weight_decay=t.weight_decay,
                                        clip_grad=t.max_grad_norm)  # fmt: skip
        self.schedule = lr_lambda(t.warmup_steps, t.max_steps, t.min_lr_ratio)
        self.dp_group = ps.get_data_parallel_group(with_context_parallel=True)
        return Facts(
            rank=self.rank,
            world=self.world,
            dp_rank=ps.get_data_parallel_rank(with_context_parallel=True),
            dp_world=ps.get_data_parallel_world_size(with_context_parallel=True),
            device=self.device,
            n_params=n_total,
            n_trainable=n_total,
            layout=f"megatron tp={layout.tp} pp={layout.pp} vpp={layout.vpp or 1} cp={layout.cp} "
            f"dp={layout.dp(self.world)} sp={layout.sequence_parallel} "
            f"distributed_optimizer={layout.distributed_optimizer} recompute={layout.recompute}",
            compute_dtype="bfloat16" if layout.bf16 else "float32",
            flops_config=text_config,
            tags={"engine": "megatron"},
        )

    def load(self, path: Path | None) -> dict[str, Any] | None:
        return load_checkpoint(path, self.chunks, self.optimizer) if path is not None else None

    def forward_backward(self, step: int, batches: Iterator[list[int]]) -> StepOutput:
        t0 = time.perf_counter()
        multiple = self.layout.tp if self.layout.sequence_parallel else 1
        make = megatron_packed_batch if self.t.packing.max_tokens is not None else megatron_batch
        mbs, n_samples, n_frames, n_tokens, n_slots = [], 0, 0, 0, 0
        for _ in range(num_microbatches(self.cfg)):
            idx = next(batches)
            items = [self.dataset[i] for i in idx]
            batch = make(self.family, self.chunks.hf_config, items, multiple)
            mbs.append({k: v.to(self.device) for k, v in batch.items()})
            n_samples += len(idx)
            n_frames += sum(int(self.records[i].get("num_frames", 0)) for i in idx)
            n_tokens += sum(len(it["input_ids"]) for it in items)  # the samples' own tokens: no pad counted
            n_slots += int(batch["input_ids"].numel())  # what the decoder computed, pads included
        data_wait = time.perf_counter() - t0
        seq = max(b["input_ids"].shape[1] for b in mbs)
        self.lr = self.t.lr * self.schedule(step)
        self.result = train_step(self.chunks.models, self.optimizer, mbs, forward_step=vlm_forward_step,
                                 seq_length=seq, micro_batch_size=mbs[0]["input_ids"].shape[0], lr=self.lr)  # fmt: skip
        synchronize(self.device)
        counts = torch.tensor([n_samples, n_frames, n_tokens, n_slots], dtype=torch.float64, device=self.device)
        dist.all_reduce(counts, group=self.dp_group)
        samples, frames, tokens, slots = counts.tolist()
        return StepOutput(self.result.loss, int(samples), int(frames), int(tokens), data_wait, slots=int(slots))

    def optimizer_step(self, step: int) -> OptimizerOutput:
        return OptimizerOutput(self.result.grad_norm, self.lr, self.result.optimizer_s)  # applied in the step

    def save(self, step: int, data_state: dict[str, Any]) -> ckpt.PendingCheckpoint:
        return save_checkpoint(self.cfg, step, self.chunks, self.optimizer, data_state, self.device)

    def export(self, final_dir: Path) -> None:
        full = self.chunks.full_hf_state()  # collective
        if self.rank == 0:
            export_weights(self.family, self.cfg, {}, full, final_dir)

    def profiler(self, out_dir: Path) -> AbstractContextManager:  # noqa: ARG002
        return nullcontext()


def train(cfg: PipelineConfig, run_id: str | None = None, tracking_uri: str | None = None) -> TrainResult:
    """One rank of the megatron engine: the shared loop with this engine's backend."""
    return run_training(cfg, MegatronBackend(cfg), run_id, tracking_uri)


@record
def main() -> None:
    rank_main(train, __doc__)


if __name__ == "__main__":
    from flowspeed.engines.common.lifetime import run_rank

    run_rank(main)
