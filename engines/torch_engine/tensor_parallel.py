"""Tensor parallelism (Megatron-style) applied to an unmodified diffusers/transformers model from outside.

    apply_tp(model, init_device_mesh("cuda", (tp,), mesh_dim_names=("tp",)), sequence_parallel=True)

Why: a block's matmuls split across `tp` ranks cut its weights, optimizer state and matmul time by `tp`
at the price of one all-reduce (or all-gather + reduce-scatter) per attention and per MLP.

How: each supported model class has a plan, registered by class name. A plan is data: a dict of torch
ParallelStyles applied to every transformer block (q/k/v and MLP-in ColwiseParallel, so a rank keeps
heads/tp heads; attention-out and MLP-out RowwiseParallel), a dict for model-level modules, and an
optional fix-up (diffusers' attention processor reshapes with `attn.heads`, which must become heads/tp).
`torch.distributed.tensor.parallel.parallelize_module` applies both. Every parameter left over (norms,
embeddings, heads) becomes a Replicate DTensor computed on local tensors, so all parameters are DTensors
and clip_grad_norm_, AdamW and DCP see one kind of tensor. The model's inputs and outputs stay full
replicated tensors: loss code does not change.

Sequence parallel shards the activations of norm regions on the sequence dim (Shard(1)) between the
first and the last block: norms run as SequenceParallel, attention/MLP inputs are all-gathered and
their outputs reduce-scattered. Any replicated parameter that sees sequence shards gets Partial grads.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Partial, Placement, Replicate, Shard, distribute_tensor
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    ParallelStyle,
    PrepareModuleInput,
    PrepareModuleInputOutput,
    RowwiseParallel,
    SequenceParallel,
    parallelize_module,
)
from torch.utils._pytree import tree_map_only


@dataclass
class TPPlan:
    blocks: str  # attribute path of the nn.ModuleList of transformer blocks
    block: dict[str, ParallelStyle]  # applied to every block; keys are relative to a block
    model: dict[str, ParallelStyle] = field(default_factory=dict)  # keys relative to the model
    post: Callable[[nn.Module, int], None] | None = None  # fix-ups after sharding: post(model, tp)


PlanFn = Callable[[nn.Module, int, bool], TPPlan]  # plan_fn(model, tp, sequence_parallel) -> TPPlan
_PLANS: dict[str, PlanFn] = {}


def register_tp_plan(class_name: str, plan_fn: PlanFn) -> None:
    """Make `apply_tp` handle models whose class is named `class_name`."""
    _PLANS[class_name] = plan_fn


def supported_tp_models() -> list[str]:
    return sorted(_PLANS)


def apply_tp(model: nn.Module, tp_mesh: DeviceMesh, sequence_parallel: bool = False) -> None:
    """Shard `model` in place over the 1-D `tp_mesh` (real or meta weights; materialize afterwards)."""
    name = type(model).__name__
    if name not in _PLANS:
        raise ValueError(
            f"no tensor-parallel plan for {name}; supported: {supported_tp_models()}. "
            "Set train.parallel.tp: 1, or add a plan with register_tp_plan"
        )
    tp = tp_mesh.size()
    plan = _PLANS[name](model, tp, sequence_parallel)
    for block in model.get_submodule(plan.blocks):
        parallelize_module(block, tp_mesh, plan.block)
    if plan.model:
        parallelize_module(model, tp_mesh, plan.model)
    if plan.post is not None:
        plan.post(model, tp)
    _replicate_remaining(model, tp_mesh)


# ---- styles torch does not ship ----------------------------------------------------------------------


class ReplicateParams(ParallelStyle):
    """The module's own parameters become Replicate DTensors; it computes on local tensors.

    Inputs arrive as local tensors and leave as local tensors. `grad_placement` says how the output's
    gradient is spread over ranks: Replicate() when every rank sees the same activations downstream,
    Partial() when the output modulates sequence shards (each rank then holds part of the gradient).
    """

    def __init__(self, *, grad_placement: Placement | None = None, memo: dict | None = None):
        super().__init__()
        self.grad_placement = grad_placement or Replicate()
        self.memo = memo if memo is not None else {}  # id(param) -> DTensor param: ties stay tied

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        for name, p in list(module._parameters.items()):
            if p is None or isinstance(p, DTensor):
                continue
            if id(p) not in self.memo:
                dt = distribute_tensor(p.detach(), device_mesh, [Replicate()], src_data_rank=self.src_data_rank)
                self.memo[id(p)] = nn.Parameter(dt, requires_grad=p.requires_grad)
            module.register_parameter(name, self.memo[id(p)])

        def to_dtensor(t: torch.Tensor) -> torch.Tensor:
            return t if isinstance(t, DTensor) else DTensor.from_local(t, device_mesh, [Replicate()], run_check=False)

        grad = (self.grad_placement,)
        module.register_forward_pre_hook(
            lambda _, args, kwargs: tree_map_only(torch.Tensor, to_dtensor, (args, kwargs)), with_kwargs=True
        )
        module.register_forward_hook(
            lambda _, __, out: tree_map_only(DTensor, lambda t: t.to_local(grad_placements=grad), out)
        )
        return module


class SequenceBoundary(ParallelStyle):
    """Enter/leave the sequence-parallel region at a block: chunk the named inputs (positional in the
    order given, or keyword) from full to Shard(1), and/or all-gather every tensor output to full."""

    def __init__(self, names: tuple[str, ...], *, shard_inputs: bool, gather_outputs: bool):
        super().__init__()
        self.names, self.shard_inputs, self.gather_outputs = names, shard_inputs, gather_outputs

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        tp = device_mesh.size()

        def shard(name: str, t: torch.Tensor) -> torch.Tensor:  # (B, S, D) -> (B, S/tp, D)
            if t.shape[1] % tp:
                raise ValueError(
                    f"sequence parallel splits {name} of {t.shape[1]} tokens over tp={tp} ranks: make the "
                    f"token count divisible by {tp} (text length, frames/patches) or set sequence_parallel: false"
                )
            dt = DTensor.from_local(t, device_mesh, [Replicate()], run_check=False)
            return dt.redistribute(device_mesh, [Shard(1)]).to_local()

        def gather(t: torch.Tensor) -> torch.Tensor:  # (B, S/tp, D) -> (B, S, D)
            dt = DTensor.from_local(t, device_mesh, [Shard(1)], run_check=False)
            return dt.redistribute(device_mesh, [Replicate()]).to_local()

        def pre(_: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
            args = tuple(shard(self.names[i], a) if i < len(self.names) else a for i, a in enumerate(args))
            kwargs = {k: shard(k, v) if k in self.names else v for k, v in kwargs.items()}
            return args, kwargs

        if self.shard_inputs:
            module.register_forward_pre_hook(pre, with_kwargs=True)
        if self.gather_outputs:
            module.register_forward_hook(lambda _, __, out: tree_map_only(torch.Tensor, gather, out))
        return module


class CloneOutput(ParallelStyle):
    """`style`, then a copy of the output: to_local() returns a view that autograd forbids writing into,
    and diffusers' CogVideoX processor writes rotary embeddings into q/k in place."""

    def __init__(self, style: ParallelStyle):
        super().__init__()
        self.style = style

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        module = self.style._apply(module, device_mesh)
        module.register_forward_hook(lambda _, __, out: out.clone())
        return module


def _replicate_remaining(model: nn.Module, mesh: DeviceMesh) -> None:
    """Every module that still owns plain parameters (in practice leaves: Linear, norms, Conv, Embedding)
    computes replicated with Replicate DTensor params."""
    style = ReplicateParams()
    for mod in list(model.modules()):
        if any(p is not None and not isinstance(p, DTensor) for p in mod._parameters.values()):
            style._apply(mod, mesh)


def _boundaries(blocks: str, n: int, names: tuple[str, ...]) -> dict[str, ParallelStyle]:
    if n == 1:
        return {f"{blocks}.0": SequenceBoundary(names, shard_inputs=True, gather_outputs=True)}
    return {
        f"{blocks}.0": SequenceBoundary(names, shard_inputs=True, gather_outputs=False),
        f"{blocks}.{n - 1}": SequenceBoundary(names, shard_inputs=False, gather_outputs=True),
    }


def _check_divisible(model: nn.Module, what: str, n: int, tp: int) -> None:
    if n % tp:
        raise ValueError(
            f"{type(model).__name__} has {n} {what}, not divisible by the tensor-parallel degree tp={tp}: "
            f"set train.parallel.tp to a divisor of {n}"
        )


# ---- plans -------------------------------------------------------------------------------------------


def _cogvideox_plan(model: nn.Module, tp: int, sp: bool) -> TPPlan:
    """CogVideoXTransformer3DModel: joint text+video attention and one FFN over both streams."""
    cfg = model.config
    _check_divisible(model, "attention heads", cfg.num_attention_heads, tp)
    seq = Shard(1) if sp else Replicate()
    qk_norm = model.transformer_blocks[0].attn1.norm_q is not None
    rope_writable = ColwiseParallel() if qk_norm else CloneOutput(ColwiseParallel())
    block: dict[str, ParallelStyle] = {
        "attn1.to_q": rope_writable,
        "attn1.to_k": rope_writable,
        "attn1.to_v": ColwiseParallel(),
        # the processor splits the joint [text, video] sequence after to_out: keep it whole there
        "attn1.to_out.0": RowwiseParallel(),
        "ff.net.0.proj": ColwiseParallel(input_layouts=seq),
        "ff.net.2": RowwiseParallel(output_layouts=seq),
    }
    if qk_norm:
        # LayerNorm over head_dim on (B, heads/tp, S, head_dim): weights replicated, heads (dim 1) sharded
        block["attn1.norm_q"] = CloneOutput(SequenceParallel(sequence_dim=1, use_local_output=True))
        block["attn1.norm_k"] = CloneOutput(SequenceParallel(sequence_dim=1, use_local_output=True))
    top: dict[str, ParallelStyle] = {}
    if sp:
        # Text and video streams are sharded separately on the sequence dim. The FFN sees the local
        # [text shard, video shard] concat: token-wise, so the all-gather/reduce-scatter around it is exact.
        kw = ("hidden_states", "encoder_hidden_states")
        block |= {
            "norm1.norm": SequenceParallel(use_local_output=True),
            "norm2.norm": SequenceParallel(use_local_output=True),
            # shift/scale/gate from temb modulate sequence shards: their grads are per-rank partial sums
            "norm1.linear": ReplicateParams(grad_placement=Partial()),
            "norm2.linear": ReplicateParams(grad_placement=Partial()),
            "attn1": PrepareModuleInputOutput(
                input_kwarg_layouts=dict.fromkeys(kw, Shard(1)),
                desired_input_kwarg_layouts=dict.fromkeys(kw, Replicate()),
                use_local_input=True,
                output_layouts=(Replicate(), Replicate()),  # (video, text), full after to_out's all-reduce
                desired_output_layouts=(Shard(1), Shard(1)),
            ),
        }
        top = _boundaries("transformer_blocks", len(model.transformer_blocks), kw)

    def post(m: nn.Module, tp: int) -> None:
        for b in m.transformer_blocks:
            b.attn1.heads = cfg.num_attention_heads // tp  # CogVideoXAttnProcessor2_0 views q/k/v with it

    return TPPlan("transformer_blocks", block, top, post)


def _causal_lm_plan(model: nn.Module, tp: int, sp: bool) -> TPPlan:
    """Qwen2/Llama *ForCausalLM (transformers): the plan of their `base_model_tp_plan`, plus SP."""
    cfg = model.config
    _check_divisible(model, "attention heads", cfg.num_attention_heads, tp)
    _check_divisible(model, "key/value heads", cfg.num_key_value_heads, tp)
    _check_divisible(model, "MLP channels (intermediate_size)", cfg.intermediate_size, tp)
    seq = Shard(1) if sp else Replicate()  # the residual stream between sub-layers
    block: dict[str, ParallelStyle] = {
        "self_attn.q_proj": ColwiseParallel(),
        "self_attn.k_proj": ColwiseParallel(),
        "self_attn.v_proj": ColwiseParallel(),
        "self_attn.o_proj": RowwiseParallel(output_layouts=seq),
        "mlp.gate_proj": ColwiseParallel(),
        "mlp.up_proj": ColwiseParallel(),
        "mlp.down_proj": RowwiseParallel(output_layouts=seq),
    }
    top: dict[str, ParallelStyle] = {}
    if sp:
        block |= {
            "input_layernorm": SequenceParallel(use_local_output=True),
            "post_attention_layernorm": SequenceParallel(use_local_output=True),
            "self_attn": PrepareModuleInput(
                input_kwarg_layouts={"hidden_states": Shard(1)},
                desired_input_kwarg_layouts={"hidden_states": Replicate()},
                use_local_output=True,
            ),
            "mlp": PrepareModuleInput(
                input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),), use_local_output=True
            ),
        }
        # The region starts at the first layer, not the embeddings: the model derives positions and the
        # causal mask from the embeddings' sequence length.
        top = _boundaries("model.layers", cfg.num_hidden_layers, ("hidden_states",))
    embed, head = model.get_input_embeddings(), model.get_output_embeddings()
    tied = head is not None and head.weight is embed.weight
    if cfg.vocab_size % tp == 0:  # otherwise both stay replicated
        top["model.embed_tokens"] = RowwiseParallel(input_layouts=Replicate())  # vocab-sharded table
        top["lm_head"] = ColwiseParallel(output_layouts=Replicate())  # (B, S, V) logits gathered

    def post(m: nn.Module, tp: int) -> None:
        if tied and m.lm_head.weight is not m.model.embed_tokens.weight:
            m.lm_head.weight = m.model.embed_tokens.weight  # both Shard(0) over the vocabulary: re-tie

    return TPPlan("model.layers", block, top, post)


register_tp_plan("CogVideoXTransformer3DModel", _cogvideox_plan)
register_tp_plan("Qwen2ForCausalLM", _causal_lm_plan)
register_tp_plan("LlamaForCausalLM", _causal_lm_plan)
