"""One megatron-core training step over model chunks: megatron's DDP (and distributed optimizer), its
optimizer and its pipeline schedules (no pipelining, 1F1B, interleaved 1F1B with virtual stages).

The loss is megatron's per-token mean over the whole global batch (`calculate_per_token_loss`): each
micro-batch's loss function returns (summed loss, token count), the schedule sums both over
micro-batches, and `finalize_model_grads` divides the gradients by the global token count after the
data-parallel reduction. So any data-parallel size, micro-batch count or pipeline layout computes the
same gradient as one process over the same global batch, which is what the layout tests check.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from functools import partial
from typing import Any, Literal

import torch

Batch = dict[str, torch.Tensor]


@dataclass(frozen=True)
class Layout:
    """The megatron parallel layout of one job; data parallel takes what TP x PP x CP leave of the world."""

    tp: int = 1
    pp: int = 1
    vpp: int | None = None  # model chunks (virtual stages) per pipeline rank: interleaved 1F1B
    cp: int = 1
    sequence_parallel: bool = False
    distributed_optimizer: bool = False
    recompute: Literal["none", "full", "selective"] = "none"
    bf16: bool = False  # bf16 weights and activations, fp32 main weights in the optimizer

    def dp(self, world: int) -> int:
        return world // (self.tp * self.pp * self.cp)

    def check(self, world: int, num_layers: int | None, num_microbatches: int) -> None:
        """Refuse, before anything is built, a layout the ranks or the model cannot form (the layer split
        is checked where the model's depth is known)."""
        if world % (self.tp * self.pp * self.cp):
            raise ValueError(
                f"tp={self.tp} x pp={self.pp} x cp={self.cp} = {self.tp * self.pp * self.cp} does not divide "
                f"the {world} ranks"
            )
        chunks = self.pp * (self.vpp or 1)
        if num_layers is not None and num_layers % chunks:
            raise ValueError(
                f"{num_layers} layers do not split into pp={self.pp} x vpp={self.vpp or 1} = {chunks} equal stages"
            )
        if self.sequence_parallel and self.tp == 1:
            raise ValueError("sequence_parallel needs tp > 1: it splits the sequence across the TP group")
        if self.vpp and self.vpp > 1:
            if self.pp < 2:
                raise ValueError("virtual pipeline stages (vpp > 1) need pp > 1")
            if num_microbatches % self.pp:
                raise ValueError(
                    f"interleaved 1F1B needs the micro-batches per step ({num_microbatches}) to be a multiple of "
                    f"pp={self.pp}: set train.grad_accum (or train.parallel.pp_microbatches) accordingly"
                )
        if self.cp > 1 and not torch.cuda.is_available():
            raise ValueError(
                "context parallel (cp > 1) on the megatron engine needs Transformer Engine attention on CUDA; "
                "this process has no CUDA device"
            )

    def config_fields(self) -> dict[str, Any]:
        """The TransformerConfig fields this layout sets."""
        fields: dict[str, Any] = {
            "tensor_model_parallel_size": self.tp,
            "pipeline_model_parallel_size": self.pp,
            "context_parallel_size": self.cp,
            "sequence_parallel": self.sequence_parallel,
            "calculate_per_token_loss": True,
            "pipeline_dtype": torch.bfloat16 if self.bf16 else torch.float32,
        }
        if self.bf16:
            fields.update(bf16=True, params_dtype=torch.bfloat16)
        if self.vpp and self.vpp > 1:
            # Unbatched p2p, as Megatron-LM runs interleaved schedules by default: its even/odd ordering keeps
            # the forward activation and the backward gradient that two stages swap in one exchange (same
            # peer, same shape, same tag when pp == 2) from being matched to each other's receive.
            fields.update(virtual_pipeline_model_parallel_size=self.vpp, batch_p2p_comm=False)
        if self.recompute == "full":
            fields.update(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1)
        elif self.recompute == "selective":
            fields.update(recompute_granularity="selective")
        return fields


def build_chunks(
    make_chunk: Callable[[bool, bool, int | None], torch.nn.Module],
    config: Any,
    layout: Layout,
    device: torch.device,
) -> list[Any]:
    """This rank's model chunks (one, or `vpp` virtual stages), wrapped in megatron's DDP.

    `make_chunk(pre_process, post_process, vp_stage)` builds one chunk; which chunk holds the embedding
    and which the output layer is megatron's decision (`is_pipeline_first_stage(vp_stage=...)`).
    """
    from megatron.core import parallel_state
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads

    n = layout.vpp if layout.vpp and layout.vpp > 1 else 1
    chunks = []
    for i in range(n):
        vp = i if n > 1 else None
        pre = parallel_state.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp)
        post = parallel_state.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp)
        chunk = make_chunk(pre, post, vp).to(device)
        if config.bf16:
            from megatron.core.transformer.module import Float16Module

            chunk = Float16Module(config, chunk)  # bf16 copy; fp32 in on the first stage, fp32 out on the last
        chunks.append(chunk)
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        overlap_grad_reduce=False,
        use_distributed_optimizer=layout.distributed_optimizer,
    )
    wrapped = [
        DistributedDataParallel(config=config, ddp_config=ddp_config, module=chunk, disable_bucketing=i > 0)
        for i, chunk in enumerate(chunks)
    ]
    config.finalize_model_grads_func = finalize_model_grads
    return wrapped


def make_optimizer(chunks: list[Any], layout: Layout, *, lr: float, weight_decay: float, clip_grad: float) -> Any:
    """megatron's Adam(W) over the chunks; with `distributed_optimizer`, its state sharded across DP ranks."""
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    config = OptimizerConfig(
        optimizer="adam",
        lr=lr,
        weight_decay=weight_decay,
        adam_beta1=0.9,
        adam_beta2=0.999,
        adam_eps=1e-8,
        clip_grad=clip_grad,
        use_distributed_optimizer=layout.distributed_optimizer,
        bf16=layout.bf16,
        fp16=False,
    )
    return get_megatron_optimizer(config, chunks)


def unwrap(chunk: Any) -> torch.nn.Module:
    """The model inside megatron's DDP (and Float16Module) wrappers."""
    while type(chunk).__name__ in ("DistributedDataParallel", "Float16Module"):
        chunk = chunk.module
    return chunk


def token_loss(loss_mask: torch.Tensor, per_token: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """Summed loss and token count of one micro-batch, as megatron's per-token-loss schedules expect."""
    mask = loss_mask.float()
    total = (per_token.float() * mask).sum()
    count = mask.sum().to(torch.int)
    return total, count, {"lm loss": torch.stack([total.detach(), mask.sum().detach()])}


def gpt_forward_step(data: Iterator[Batch], model: Any) -> tuple[torch.Tensor, Callable]:
    """A decoder-only micro-batch: `tokens`, `position_ids`, `labels` (already shifted), `loss_mask`."""
    batch = next(data)
    out = model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"])
    return out, partial(token_loss, batch["loss_mask"])


@dataclass
class StepResult:
    loss: float  # per-token mean over the global batch (every rank gets it)
    tokens: int  # labelled tokens in the global batch
    grad_norm: float
    skipped: bool
    optimizer_s: float = 0.0  # megatron's optimizer step: grad norm, clipping, the update (and its all-gather)


def forward_backward(
    chunks: list[Any],
    microbatches: list[Batch],
    *,
    forward_step: Callable = gpt_forward_step,
    seq_length: int,
    micro_batch_size: int,
) -> tuple[float, int]:
    """Gradients of one global batch in the chunks' grad buffers, and its (per-token mean loss, labelled tokens).

    After `finalize_model_grads` the gradients are those of the per-token mean loss over the whole global batch (all
    micro-batches, all data-parallel ranks), whatever the micro-batches hold: padded rows or packed ones. The
    packing tests compare these gradients directly; `train_step` applies them."""
    from megatron.core import parallel_state
    from megatron.core.pipeline_parallel import get_forward_backward_func

    for chunk in chunks:
        chunk.zero_grad_buffer()
    iterators: Iterator[Batch] | list[Iterator[Batch]]
    iterators = [iter(microbatches) for _ in chunks] if len(chunks) > 1 else iter(microbatches)
    outputs = get_forward_backward_func()(
        forward_step_func=forward_step,
        data_iterator=iterators,
        model=chunks if len(chunks) > 1 else chunks[0],
        num_microbatches=len(microbatches),
        seq_length=seq_length,
        micro_batch_size=micro_batch_size,
        forward_only=False,
    )
    return _global_loss(outputs, parallel_state)


def train_step(
    chunks: list[Any],
    optimizer: Any,
    microbatches: list[Batch],
    *,
    forward_step: Callable = gpt_forward_step,
    seq_length: int,
    micro_batch_size: int,
    lr: float | None = None,
) -> StepResult:
    """One optimizer step over this rank's micro-batches (every TP/PP rank of a DP group passes the same)."""
    if lr is not None:
        for group in optimizer.param_groups:
            group["lr"] = lr
    optimizer.zero_grad()
    loss, tokens = forward_backward(
        chunks, microbatches, forward_step=forward_step, seq_length=seq_length, micro_batch_size=micro_batch_size
    )
    t_opt = time.perf_counter()
    ok, grad_norm, _ = optimizer.step()
    optimizer_s = time.perf_counter() - t_opt
    return StepResult(loss, tokens, float(grad_norm or 0.0), not ok, optimizer_s)


def _global_loss(outputs: Iterable[dict], parallel_state: Any) -> tuple[float, int]:
    """(loss sum, tokens) live on the last pipeline stage: sum them over data parallel, then hand them to
    every pipeline stage so rank 0 (a first stage) can log them."""
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else None
    totals = torch.zeros(2, dtype=torch.float64, device=device)
    if parallel_state.is_pipeline_last_stage(ignore_virtual=True):
        for out in outputs:
            totals += out["lm loss"].detach().to(totals)
        torch.distributed.all_reduce(totals, group=parallel_state.get_data_parallel_group(with_context_parallel=True))
    if parallel_state.get_pipeline_model_parallel_world_size() > 1:
        torch.distributed.all_reduce(totals, group=parallel_state.get_pipeline_model_parallel_group())
    loss_sum, tokens = totals.tolist()
    return loss_sum / max(tokens, 1.0), int(tokens)


def _sharded_state(chunks: list[Any], optimizer: Any, loading: bool) -> dict[str, Any]:
    state: dict[str, Any] = (
        {"model": chunks[0].sharded_state_dict()}
        if len(chunks) == 1
        else {f"model{i}": c.sharded_state_dict() for i, c in enumerate(chunks)}
    )
    # The distributed optimizer's fully reshardable form: its state stored per parameter, so a checkpoint
    # loads into another TP/PP/DP layout (the default form reshards only along data parallel).
    state["optimizer"] = optimizer.sharded_state_dict(
        state, is_loading=loading, metadata={"distrib_optim_sharding_type": "fully_reshardable"}
    )
    return state


def save_state(chunks: list[Any], optimizer: Any, directory: str) -> None:
    """Collective: model and optimizer as a megatron dist checkpoint (tensors stored by global name and shape)."""
    from megatron.core import dist_checkpointing

    dist_checkpointing.save(_sharded_state(chunks, optimizer, loading=False), directory)


def load_state(chunks: list[Any], optimizer: Any, directory: str) -> None:
    """Collective: restore `save_state`'s checkpoint into this job's layout, whatever layout wrote it."""
    from megatron.core import dist_checkpointing

    for inner in getattr(optimizer, "chained_optimizers", [optimizer]):
        # megatron's distributed optimizer without Apex/TE can describe its state only once it has some: one
        # zero-gradient step at lr 0 creates it (no weight decay either); the loaded values replace it.
        if hasattr(inner, "_init_optimizer_states_with_dummy_values") and not inner.optimizer.state:
            lrs = [g["lr"] for g in inner.optimizer.param_groups]
            for g in inner.optimizer.param_groups:
                g["lr"] = 0.0
            inner._init_optimizer_states_with_dummy_values()
            for g, lr in zip(inner.optimizer.param_groups, lrs, strict=True):
                g["lr"] = lr
    loaded = dist_checkpointing.load(_sharded_state(chunks, optimizer, loading=True), directory)
    for i, chunk in enumerate(chunks):
        # keys as the DDP wrapper names them ("module.<name>"), the way `sharded_state_dict` gave them
        part = loaded["model" if len(chunks) == 1 else f"model{i}"]
        missing, unexpected = torch.nn.Module.load_state_dict(chunk, part, strict=False)  # DDP's returns None
        if unexpected or any(not k.endswith("_extra_state") for k in missing):
            raise ValueError(f"{directory} does not fit this model: missing {missing[:5]}, unexpected {unexpected[:5]}")
    optimizer.load_state_dict(loaded["optimizer"])
