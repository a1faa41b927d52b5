"""The torch engine's training step: one process, or one rank of a torchrun job (NCCL, HCCL or gloo).

    torchrun --nproc_per_node 2 -m flowspeed.engines.torch_engine.trainer --config runs/x/train/config.yaml

`TorchBackend` is what flowspeed.engines.loop.run_training (the loop both engines share: tracking, cadence,
resume, export, result) calls for this engine. The layout (train.parallel: FSDP2/HSDP/DDP x TP x CP)
is applied by flowspeed.engines.torch_engine.setup; the step only sees a module to call, an optimizer and the
data-parallel coordinates.

Reads the prep stage's cached latents, never raw media. Exact resume: the sample order and the
noise of every step are pure functions of (seed, step), and the checkpoint carries the optimizer,
LR schedule, RNG states and data position, so k steps + resume == an uninterrupted run.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Iterator
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from flowspeed.configs import PipelineConfig, load_config
from flowspeed.datasets_prep.cache import CachedLatents
from flowspeed.engines.common.device import synchronize
from flowspeed.engines.common.io import text_digest
from flowspeed.engines.export import export_weights, plain_model
from flowspeed.engines.loop import Facts, OptimizerOutput, StepOutput, TrainResult, lr_lambda, rank_main, run_training
from flowspeed.engines.methods import MethodContext, get_method, reduce_metrics
from flowspeed.engines.models import get_family
from flowspeed.engines.models.registry import Capability
from flowspeed.engines.torch_engine import checkpoint as ckpt
from flowspeed.engines.torch_engine.setup import (
    Ema,
    build_model,
    full_value,
    grad_sync,
    init_distributed,
    step_profiler,
    unwrap,
)
from torch.distributed.elastic.multiprocessing.errors import record


def step_generator(seed: int, step: int, micro: int) -> torch.Generator:
    """Noise for global micro-batch `micro` of `step`: the same draw whichever rank computes it."""
    return torch.Generator().manual_seed(int(text_digest(str(seed), str(step), str(micro))[:15], 16))


def _active_parameters(core: torch.nn.Module, model: torch.nn.Module) -> int:
    """Parameters one step computes with, what model FLOPs (MFU) count: all of them, unless the model says fewer run
    per step (`active_parameter_count`: Wan2.2 A14B's expert pair runs one expert a step), or it is a transformers
    mixture of experts (`num_experts`, `num_experts_per_tok` in its text config), whose tokens each run top-k of the
    routed experts: those count k/num_experts of their size. A DTensor's numel is its global size."""
    active = getattr(core, "active_parameter_count", None)
    if callable(active):
        return int(active())
    total = sum(p.numel() for p in model.parameters())
    config = getattr(core, "config", None)
    text = getattr(config, "text_config", None) or config
    experts, top_k = getattr(text, "num_experts", None), getattr(text, "num_experts_per_tok", None)
    if experts and top_k:
        routed = sum(p.numel() for n, p in model.named_parameters() if ".experts." in n)
        total -= routed - routed * top_k // experts
    return total


class TorchBackend:
    """The torch engine behind flowspeed.engines.loop.run_training: FSDP2/HSDP/DDP x TP x CP, DCP checkpoints."""

    def __init__(self, cfg: PipelineConfig) -> None:
        self.cfg = cfg
        self.t = cfg.train
        self.async_checkpoint = self.t.async_checkpoint
        self.family = get_family(cfg.model.family)
        self.method = get_method(cfg.train.method.name)
        self.method.check(self.family, cfg)

    def init(self) -> tuple[int, int, torch.device]:
        self.env = env = init_distributed(self.cfg)
        if env.dims.pp > 1:
            raise ValueError(
                "train.parallel.pp > 1: pipeline parallel is available for transformers language backbones "
                "(flowspeed.engines.torch_engine.pipeline_parallel); the diffusion denoisers train with fsdp/tp/cp "
                "instead"
            )
        return env.rank, env.world, env.device

    def build(self, records: list[dict], dataset: CachedLatents) -> Facts:
        cfg, t, env, family = self.cfg, self.t, self.env, self.family
        self.records, self.dataset = records, dataset
        self.model_args = family.model_args(records[0])
        self.model = model = build_model(family, cfg, self.model_args, env)
        self.core = unwrap(model)
        model.train()
        self.scheduler = family.load_scheduler(cfg.model)
        self.trainable = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.trainable, lr=t.lr, weight_decay=t.weight_decay)
        self.lr_sched = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lr_lambda(t.warmup_steps, t.max_steps, t.min_lr_ratio)
        )
        self.ema = Ema(model, t.ema.decay) if t.ema.enabled else None
        self.autocast = (
            torch.autocast(env.device.type, dtype=torch.bfloat16) if t.mixed_precision == "bf16" else nullcontext()
        )
        self.dp_group = env.mesh["dp"].get_group() if env.mesh is not None else None
        # Async saves talk over a gloo group of their own, so they never queue behind training collectives.
        self.async_group = dist.new_group(backend="gloo") if t.async_checkpoint and env.world > 1 else None
        self.method_ctx = MethodContext(
            cfg=cfg, family=family, model=model, scheduler=self.scheduler, device=env.device, rank=env.rank,
            world=env.world, dp_rank=env.dp_rank, dp_world=env.dp_world, dp_group=self.dp_group,
            build_frozen=lambda: build_model(family, cfg, self.model_args, env, frozen=True), records=records,
            dataset=dataset,
        )  # fmt: skip
        bf16 = t.mixed_precision == "bf16" or t.fsdp.param_dtype == "bfloat16"
        return Facts(
            rank=env.rank,
            world=env.world,
            dp_rank=env.dp_rank,
            dp_world=env.dp_world,
            device=env.device,
            n_params=_active_parameters(self.core, model),
            n_trainable=sum(p.numel() for p in self.trainable),
            layout=env.dims.describe(),
            compute_dtype="bfloat16" if bf16 else "float32",
            flops_config=self.core.config,
        )

    def load(self, path: Path | None) -> dict[str, Any] | None:
        if path is None:
            torch.manual_seed(self.t.seed)
            state = None
        else:
            state = ckpt.load(path, self.model, self.optimizer, self.lr_sched, self.ema.shadow if self.ema else None)
        self.method_ctx.resumed_from = path
        self.method.setup(self.method_ctx)  # after the load: a resumed run's reference is still the starting model
        return state

    def forward_backward(self, step: int, batches: Iterator[list[int]]) -> StepOutput:
        t, env, family, device = self.t, self.env, self.family, self.env.device
        accum = t.grad_accum
        tw = time.perf_counter()
        drawn = [next(batches) for _ in range(accum)]
        micro_batches, normalizer, slots = self.step_batches(drawn)
        data_wait = time.perf_counter() - tw
        loss_acc = torch.zeros((), device=device)
        counts = [0, 0, 0]  # samples, frames, tokens (latent tokens, or real text + vision tokens) of this rank
        step_metrics: list[dict[str, torch.Tensor]] = []
        for micro, (idx, cpu_batch) in enumerate(zip(drawn, micro_batches, strict=True)):
            tw = time.perf_counter()
            batch: dict[str, Any] = {k: v.to(device) for k, v in cpu_batch.items()}
            if normalizer is not None:
                batch["loss_normalizer"] = normalizer
            recs = [self.records[i] for i in idx]
            data_wait += time.perf_counter() - tw
            # Global micro-batch index: dp ranks x accumulation covers the same batches (and the
            # same noise) as one process accumulating dp x as many micro-batches.
            gen = step_generator(t.seed, step, micro * env.dp_world + env.dp_rank)
            with grad_sync(self.model, micro == accum - 1), self.autocast:
                loss, metrics = self.method.loss(self.method_ctx, batch, recs, gen)
            step_metrics.append(metrics)
            # a token loss is already a share of the global batch's mean; other losses are micro-batch means
            (loss if normalizer is not None else loss / accum).backward()
            loss_acc += loss.detach().float()  # stays on device: no sync per micro-batch
            counts[0] += len(idx)
            counts[1] += sum(r.get("num_frames", 0) for r in recs)
            counts[2] += sum(self.method.sample_tokens(family, self.core.config, r) for r in recs)
        if env.dims.cp > 1:  # each CP rank's weight gradients cover only its part of the sequence
            from flowspeed.engines.torch_engine.context_parallel import reduce_cp_grads

            reduce_cp_grads(self.model, env.mesh["cp"])
        # [loss sum, samples, frames, tokens, slots, the method's metrics] summed over the data-parallel ranks in one
        # collective, before the update: every rank sees the same loss, so on a non-finite one all of them stop before
        # applying it.
        method_metrics = reduce_metrics(step_metrics)
        totals = torch.cat([
            loss_acc.double().view(1), torch.tensor([*counts, slots], dtype=torch.float64, device=device),
            *(v.double().view(1).to(device) for v in method_metrics.values()),
        ])  # fmt: skip
        if self.dp_group is not None:
            dist.all_reduce(totals, op=dist.ReduceOp.SUM, group=self.dp_group)
        loss_total, n_samples, n_frames, n_tokens, n_slots, *summed = totals.tolist()  # syncs the device
        mean = loss_total / env.dp_world if normalizer is not None else loss_total / (accum * env.dp_world)
        averaged = {k: v / env.dp_world for k, v in zip(method_metrics, summed, strict=True)}
        return StepOutput(mean, int(n_samples), int(n_frames), int(n_tokens), data_wait, int(n_slots), averaged)

    def step_batches(self, drawn: list[list[int]]) -> tuple[list[dict[str, torch.Tensor]], float | None, int]:
        """(this rank's micro-batches on the CPU, the token-loss normaliser, token positions computed).

        A token-loss family's micro-batches are packed rows under train.packing, padded rows otherwise; its
        loss is then normalised by the labelled tokens of the whole global batch, counted here over this
        rank's micro-batches and summed over the data-parallel ranks (one small collective) before any forward,
        and divided by the ranks the gradient reduction averages over. So the update is the per-token mean of
        the global batch, equal whether its samples come padded or packed, in few micro-batches or many."""
        family = self.family
        pack = self.t.packing.max_tokens is not None
        out = [self.method.collate(family, [self.dataset[i] for i in idx], pack) for idx in drawn]
        if not family.can(Capability.TOKEN_LOSS) or not self.method.token_normalized:
            return out, None, 0
        targets = torch.tensor(float(sum(family.loss_targets(b) for b in out)), dtype=torch.float64)
        if self.dp_group is not None:
            targets = targets.to(self.env.device)
            dist.all_reduce(targets, op=dist.ReduceOp.SUM, group=self.dp_group)
        normalizer = max(float(targets), 1.0) / self.env.dp_world
        return out, normalizer, sum(family.token_slots(b) for b in out)

    def optimizer_step(self, step: int) -> OptimizerOutput:
        t_opt = time.perf_counter()
        grad_norm = full_value(torch.nn.utils.clip_grad_norm_(self.trainable, self.t.max_grad_norm))
        lr = self.optimizer.param_groups[0]["lr"]
        self.optimizer.step()
        self.lr_sched.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.ema is not None:
            self.ema.update()
        synchronize(self.env.device)  # the time covers the update, not just its launch
        return OptimizerOutput(float(grad_norm), lr, time.perf_counter() - t_opt)

    def save(self, step: int, data_state: dict[str, Any]) -> ckpt.PendingCheckpoint:
        t = self.t
        extra = {"model_args": self.model_args, "layout": self.env.dims.describe()}
        return ckpt.save(
            self.cfg.train_dir, step, self.model, self.optimizer, self.lr_sched, data_state, self.cfg,
            t.keep_checkpoints, extra=extra, ema=self.ema.shadow if self.ema else None,
            async_save=t.async_checkpoint, group=self.async_group,
        )  # fmt: skip

    def export(self, final_dir: Path) -> None:
        full = ckpt.full_model_state(self.model)  # collective: every rank sends its shards to rank 0
        if self.ema is not None:  # the release model is the EMA one
            shadow = {n: full_value(t).cpu() for n, t in self.ema.shadow.items()}  # collective for DTensors
            if self.env.rank == 0:
                full.update(shadow)
        if self.env.rank == 0:
            export_weights(self.family, self.cfg, self.model_args, full, final_dir)

    def profiler(self, out_dir: Path) -> AbstractContextManager:
        return step_profiler(self.t.profile, self.env.device, out_dir, self.env.rank)


def train(cfg: PipelineConfig, run_id: str | None = None, tracking_uri: str | None = None) -> TrainResult:
    """One rank of the torch engine: the shared loop with this engine's backend."""
    # Family objectives never modify the denoiser's output in place, which is what this FSDP2 warning guards.
    warnings.filterwarnings("ignore", message="FSDP2-wrapped module .* returned a view tensor")
    return run_training(cfg, TorchBackend(cfg), run_id, tracking_uri)


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
    return export_weights(family, cfg, state["model_args"], model.state_dict(), Path(out_dir), steps=state["step"])


@record
def main() -> None:
    rank_main(train, __doc__)


if __name__ == "__main__":
    from flowspeed.engines.common.lifetime import run_rank

    run_rank(main)
