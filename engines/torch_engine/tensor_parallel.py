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

Where a model's own code does not fit torch's styles (Wan's q/k RMSNorm over all heads after a column split,
HunyuanVideo's row-parallel linear over a concat of two column splits, a parameter read by its parent module's
forward), a style here gives the module a same-named subclass with a forward that computes on local shards,
as FSDP2's fully_shard does to the modules it wraps; parameter names and state dicts do not change.

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


class CopyOutput(ParallelStyle):
    """Return a copy of output `index` of the module's tuple output instead of a view. Done in the
    module's forward (a same-named subclass, see _swap_class), not in a hook: regional compile
    traces forward, and runs forward hooks outside the compiled graph."""

    def __init__(self, index: int):
        super().__init__()
        self.index = index

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        module._tp_copied_output = self.index
        _swap_class(module, "copy_output", _copying_output)
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


# A module whose own forward reads a parameter (`self.scale_shift_table + temb`) cannot get it as a DTensor
# while its children hand back local tensors. Such modules get a same-named subclass of their class (what
# FSDP2's fully_shard does to every module it wraps) whose forward first puts local views of those parameters
# in the instance dict, where attribute lookup finds them before nn.Module's `_parameters`, and removes them
# after. Outside forward, `_parameters` (state dicts, optimizers, FSDP2's unshard/reshard, DCP) see the
# DTensors. One subclass per original class, so identical blocks stay one type and share one compiled graph.
_SUBCLASSES: dict[tuple[type, str], type] = {}


def _swap_class(module: nn.Module, kind: str, attrs: Callable[[type], dict[str, object]]) -> None:
    cls = type(module)
    if (cls, kind) not in _SUBCLASSES:
        _SUBCLASSES[cls, kind] = type(cls.__name__, (cls,), {**attrs(cls), "__module__": cls.__module__})
    module.__class__ = _SUBCLASSES[cls, kind]


def _with_local_params(cls: type) -> dict[str, object]:
    base = cls.forward

    def forward(self: nn.Module, *args: object, **kwargs: object) -> object:
        for name in self._tp_local_params:  # after FSDP2's pre-forward hook: the unsharded (TP-only) parameter
            local = self._parameters[name].to_local(grad_placements=self._tp_grad_placements)
            object.__setattr__(self, name, local)
        try:
            return base(self, *args, **kwargs)
        finally:
            for name in self._tp_local_params:
                self.__dict__.pop(name, None)

    return {"forward": forward}


def _copying_output(cls: type) -> dict[str, object]:
    base = cls.forward

    def forward(self: nn.Module, *args: object, **kwargs: object) -> tuple:
        out, i = base(self, *args, **kwargs), self._tp_copied_output
        return (*out[:i], out[i].clone(), *out[i + 1 :])

    return {"forward": forward}


def _sum_over_ranks(t: torch.Tensor, mesh: DeviceMesh, grad: Placement) -> torch.Tensor:
    """All-reduce a per-rank partial sum. `grad` says how its gradient arrives: Partial() when each rank
    uses the sum only for its own shard downstream (the gradient is all-reduced on the way back),
    Replicate() when every rank computes the same thing from it."""
    dt = DTensor.from_local(t, mesh, [Partial()], run_check=False)
    return dt.redistribute(mesh, [Replicate()]).to_local(grad_placements=[grad])


class LocalParams(ParallelStyle):
    """The module's own parameters become Replicate DTensors that its forward reads as local tensors.

    For modules with children that own a parameter too: Wan's per-block and final `scale_shift_table`.
    `grad_placement` as for ReplicateParams."""

    def __init__(self, *, grad_placement: Placement | None = None, memo: dict | None = None):
        super().__init__()
        self.grad_placement = grad_placement or Replicate()
        self.memo = memo if memo is not None else {}

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        names = []
        for name, p in list(module._parameters.items()):
            if p is None or isinstance(p, DTensor):
                continue
            if id(p) not in self.memo:
                dt = distribute_tensor(p.detach(), device_mesh, [Replicate()], src_data_rank=self.src_data_rank)
                self.memo[id(p)] = nn.Parameter(dt, requires_grad=p.requires_grad)
            module.register_parameter(name, self.memo[id(p)])
            names.append(name)
        module._tp_local_params, module._tp_grad_placements = tuple(names), (self.grad_placement,)
        _swap_class(module, "local_params", _with_local_params)
        return module


def _across_ranks_rms_norm(self: nn.RMSNorm, x: torch.Tensor) -> torch.Tensor:
    """torch.nn.RMSNorm over channels split across the TP ranks: x is (..., D/tp), this rank's heads.
    The mean square over all D channels is an all-reduce of each rank's sum of squares; the rest is
    F.rms_norm's own arithmetic (float32 statistics, cast back, then the weight)."""
    x32 = x.float()
    sum_sq = _sum_over_ranks(x32.pow(2).sum(-1, keepdim=True), self._tp_mesh, Partial())  # (..., 1)
    eps = self.eps if self.eps is not None else torch.finfo(x.dtype).eps
    out = (x32 * torch.rsqrt(sum_sq / self.normalized_shape[-1] + eps)).type_as(x)
    return out * self.weight.to_local() if self.weight is not None else out


class AcrossHeadsRMSNorm(ParallelStyle):
    """An RMSNorm whose statistics span every head (Wan's q/k norm, "rms_norm_across_heads") after a
    column-sharded projection. Exact: each rank normalises its heads by the full mean square (one
    all-reduce of a (B, S, 1) tensor) and scales them by its Shard(0) slice of the weight. Normalising
    the local heads alone would be wrong; gathering q/k to normalise them whole would cost a full
    all-gather per projection."""

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        if not isinstance(module, nn.RMSNorm) or len(module.normalized_shape) != 1:
            raise ValueError(f"AcrossHeadsRMSNorm shards a torch.nn.RMSNorm over one dim, not {module}")
        if module.weight is not None:
            dt = distribute_tensor(module.weight.detach(), device_mesh, [Shard(0)], src_data_rank=self.src_data_rank)
            module.weight = nn.Parameter(dt, requires_grad=module.weight.requires_grad)
        module._tp_mesh = device_mesh
        _swap_class(module, "rms_across_heads", lambda _: {"forward": _across_ranks_rms_norm})
        return module


def _grouped_rowwise_linear(self: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """x: (..., sum(groups)/tp), this rank's part of every input group, side by side."""
    w = self.weight.to_local(grad_placements=(Partial(),))  # (out, in), full; this rank's grad covers its columns
    w = torch.cat([w[:, a:b] for a, b in self._tp_columns], dim=1)
    out = _sum_over_ranks(nn.functional.linear(x, w), self._tp_mesh, Replicate())  # downstream is replicated
    return out + self.bias.to_local() if self.bias is not None else out


class GroupedRowwiseParallel(ParallelStyle):
    """Row-parallel Linear whose input is a concat of groups that are each column-sharded upstream:
    HunyuanVideo's single-stream `proj_out` (the authors' linear2) reads [attention (H) | MLP (M)], and a
    rank holds heads/tp of the first and M/tp channels of the second. No Shard placement of the weight
    matches that column order, so the weight stays a Replicate DTensor: each rank multiplies its input by
    its own columns and the partial outputs are all-reduced (Megatron's communication); the price is a
    replicated weight (FSDP2 still shards it over the data-parallel ranks) and an all-reduce of its grad.
    """

    def __init__(self, groups: tuple[int, ...]):
        super().__init__()
        self.groups = groups  # the full width of each input group, in order

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        tp, rank = device_mesh.size(), device_mesh.get_local_rank()
        groups = self.groups
        if not isinstance(module, nn.Linear) or module.in_features != sum(groups) or any(g % tp for g in groups):
            raise ValueError(
                f"GroupedRowwiseParallel: {module} is not a Linear over {groups} channels divisible by {tp}"
            )
        starts = [sum(groups[:i]) for i in range(len(groups))]
        module._tp_columns = [
            (s + rank * g // tp, s + (rank + 1) * g // tp) for s, g in zip(starts, groups, strict=True)
        ]
        module._tp_mesh = device_mesh
        for name in ("weight", "bias"):
            p = getattr(module, name)
            if p is not None:
                dt = distribute_tensor(p.detach(), device_mesh, [Replicate()], src_data_rank=self.src_data_rank)
                module.register_parameter(name, nn.Parameter(dt, requires_grad=p.requires_grad))
        _swap_class(module, "grouped_rowwise", lambda _: {"forward": _grouped_rowwise_linear})
        return module


class Sequentially(ParallelStyle):
    """Several styles on one module, in order."""

    def __init__(self, *styles: ParallelStyle):
        super().__init__()
        self.styles = styles

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        for style in self.styles:
            module = style._apply(module, device_mesh)
        return module


class ModulationInput(ParallelStyle):
    """Under sequence parallel, the adaLN modulation a block takes as positional input `index` (Wan's
    timestep projection) scales this rank's sequence shard only. Per-sample (B, 6, D): every rank uses it
    whole, and its gradient is a per-rank partial sum, all-reduced on the way back. Per-token (B, S, 6, D),
    Wan2.2 TI2V: chunked on the token dim like the hidden states, its gradient all-gathered back."""

    def __init__(self, index: int):
        super().__init__()
        self.index = index

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        tp, i = device_mesh.size(), self.index

        def split(t: torch.Tensor) -> torch.Tensor:
            dt = DTensor.from_local(t, device_mesh, [Replicate()], run_check=False)
            if t.ndim < 4:
                return dt.to_local(grad_placements=[Partial()])
            if t.shape[1] % tp:
                raise ValueError(f"sequence parallel splits {t.shape[1]} per-token timesteps over tp={tp} ranks")
            return dt.redistribute(device_mesh, [Shard(1)]).to_local()

        module.register_forward_pre_hook(lambda _, args: (*args[:i], split(args[i]), *args[i + 1 :]))
        return module


def _replicate_remaining(model: nn.Module, mesh: DeviceMesh) -> None:
    """Every module that still owns plain parameters computes replicated with Replicate DTensor params:
    leaves (Linear, norms, Conv, Embedding) through DTensor, and modules that also have children (an adaLN
    table on a block or on the model) on local tensors, so that their children's local outputs mix with them."""
    memo: dict = {}
    leaf, parent = ReplicateParams(memo=memo), LocalParams(memo=memo)
    for mod in list(model.modules()):
        if any(p is not None and not isinstance(p, DTensor) for p in mod._parameters.values()):
            (leaf if next(mod.children(), None) is None else parent)._apply(mod, mesh)


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


def _no_sequence_parallel(model: nn.Module) -> None:
    raise ValueError(
        f"sequence parallel is not implemented in the tensor-parallel plan of {type(model).__name__}: set "
        "train.parallel.sequence_parallel: false (context parallel, train.parallel.cp, splits this model's sequence)"
    )


def _set_heads(attentions: list[nn.Module], tp: int) -> None:
    for attn in attentions:  # diffusers' processors view q/k/v as (B, S, attn.heads, head_dim)
        attn.heads //= tp


def _wan_plan(model: nn.Module, tp: int, sp: bool) -> TPPlan:
    """diffusers' WanTransformer3DModel (Wan2.1/2.2 T2V, I2V, TI2V): per block, self-attention, cross-attention
    to the text (and, for I2V, the added image key/value projections), a GELU FFN, and the block's adaLN
    table; the model's time projection to every block's six modulation vectors.

    Wan's q/k RMSNorm spans all heads (the authors' WanRMSNorm over dim = heads * head_dim): on column-sharded
    q/k it runs as AcrossHeadsRMSNorm, exact through one all-reduce of the sum of squares.

    Sequence parallel is exact too: between the first and the last block the residual stream is split on
    the token dim; what sees those shards and has per-sample values (the adaLN table, the timestep
    projection) gets its gradient summed over ranks, and Wan2.2 TI2V's per-token timesteps are split too.
    """
    cfg = model.config
    _check_divisible(model, "attention heads", cfg.num_attention_heads, tp)
    _check_divisible(model, "FFN channels (ffn_dim)", cfg.ffn_dim, tp)
    blocks = model.blocks
    if any(getattr(m, "fused_projections", False) for b in blocks for m in (b.attn1, b.attn2)):
        raise ValueError("WanTransformer3DModel has fused q/k/v projections: unfuse_qkv_projections() before TP")
    block: dict[str, ParallelStyle] = {}
    for attn in ("attn1", "attn2"):
        block |= {f"{attn}.{p}": ColwiseParallel() for p in ("to_q", "to_k", "to_v")}
        block |= {f"{attn}.norm_q": AcrossHeadsRMSNorm(), f"{attn}.norm_k": AcrossHeadsRMSNorm()}
        block[f"{attn}.to_out.0"] = RowwiseParallel()
    if blocks[0].attn2.add_k_proj is not None:  # I2V: image tokens' own key/value (the authors' k_img, v_img)
        block |= {"attn2.add_k_proj": ColwiseParallel(), "attn2.add_v_proj": ColwiseParallel(),
                  "attn2.norm_added_k": AcrossHeadsRMSNorm()}  # fmt: skip
    seq = Shard(1) if sp else Replicate()  # the residual stream between sub-layers
    block |= {"ffn.net.0.proj": ColwiseParallel(input_layouts=seq), "ffn.net.2": RowwiseParallel(output_layouts=seq)}
    # The time projection (dim -> 6 dim: every block's shift/scale/gate) is as large as a block's
    # attention projections: column-sharded, its small (B, 6 dim) output all-gathered.
    top: dict[str, ParallelStyle] = {"condition_embedder.time_proj": ColwiseParallel(output_layouts=Replicate())}
    if sp:
        # Norms (no parameters, but the cross-attention norm's affine ones), modulation and residuals run on
        # sequence shards; each attention all-gathers its query input (the block calls attn(x, text, mask,
        # rotary) positionally) and reduce-scatters its output. Text and rotary tables stay whole. The
        # gathered query input stays a DTensor into to_q/k/v, so its gradient is one reduce-scatter.
        gather_query = PrepareModuleInput(input_layouts=(Shard(1), None, None, None),
                                          desired_input_layouts=(Replicate(), None, None, None))  # fmt: skip
        block |= {"attn1": gather_query, "attn2": gather_query,
                  "attn1.to_out.0": RowwiseParallel(output_layouts=seq),
                  "attn2.to_out.0": RowwiseParallel(output_layouts=seq),
                  # the block's adaLN table modulates shards: its grads are per-rank partial sums
                  "": Sequentially(LocalParams(grad_placement=Partial()), ModulationInput(2))}  # fmt: skip
        if cfg.cross_attn_norm:
            block["norm2"] = SequenceParallel(use_local_output=True)
        top |= _boundaries("blocks", len(blocks), ("hidden_states",))

    def post(m: nn.Module, tp: int) -> None:
        _set_heads([a for b in m.blocks for a in (b.attn1, b.attn2)], tp)

    return TPPlan("blocks", block, top, post)


def _hunyuan_video_plan(model: nn.Module, tp: int, sp: bool) -> TPPlan:
    """diffusers' HunyuanVideoTransformer3DModel: double-stream blocks (separate video and text projections,
    norms and FFNs around one joint attention) and single-stream blocks (the authors' linear1 = q/k/v + MLP-in,
    here to_q/to_k/to_v and proj_mlp; linear2 = proj_out over [attention | MLP]). Its q/k RMSNorm is per head
    (over head_dim), so it runs on the local heads with replicated weights whose grads are per-rank partial.
    The adaLN projections (dim -> 6 dim / 3 dim per block) are column-sharded and their output all-gathered.
    The token refiner, embedders and final layer (a few percent of the weights) stay replicated.
    HunyuanVideo15Transformer3DModel has only double-stream blocks, with the same module layout.
    """
    if sp:
        _no_sequence_parallel(model)
    cfg = model.config
    heads, dim = cfg.num_attention_heads, cfg.num_attention_heads * cfg.attention_head_dim
    mlp = int(dim * cfg.mlp_ratio)
    _check_divisible(model, "attention heads", heads, tp)
    _check_divisible(model, "MLP channels (mlp_ratio * hidden size)", mlp, tp)
    per_head_norm = SequenceParallel(sequence_dim=2, use_local_output=True)  # on (B, S, heads/tp, head_dim)
    has_qk_norm = model.transformer_blocks[0].attn.norm_q is not None  # config qk_norm: None builds none
    double: dict[str, ParallelStyle] = {
        "norm1.linear": ColwiseParallel(output_layouts=Replicate()),
        "norm1_context.linear": ColwiseParallel(output_layouts=Replicate()),
        **{f"attn.{p}": ColwiseParallel() for p in ("to_q", "to_k", "to_v", "add_q_proj", "add_k_proj", "add_v_proj")},
        **{f"attn.{n}": per_head_norm for n in ("norm_q", "norm_k", "norm_added_q", "norm_added_k") if has_qk_norm},
        "attn.to_out.0": RowwiseParallel(),
        "attn.to_add_out": RowwiseParallel(),
        "ff.net.0.proj": ColwiseParallel(),
        "ff.net.2": RowwiseParallel(),
        "ff_context.net.0.proj": ColwiseParallel(),
        "ff_context.net.2": RowwiseParallel(),
    }
    single: dict[str, ParallelStyle] = {
        "norm.linear": ColwiseParallel(output_layouts=Replicate()),
        **{f"attn.{p}": ColwiseParallel() for p in ("to_q", "to_k", "to_v")},
        **{f"attn.{n}": per_head_norm for n in ("norm_q", "norm_k") if has_qk_norm},
        "proj_mlp": ColwiseParallel(),
        "proj_out": GroupedRowwiseParallel((dim, mlp)),
        # The block returns its video and text tokens as two slices of one tensor; torch.compile refuses
        # aliased outputs from a graph with DTensor (parameter) inputs, so the text slice leaves as a copy.
        "": CopyOutput(1),
    }
    # Two block lists with different layouts: the single-stream blocks are sharded here, as the plan's model part.
    n_single = len(getattr(model, "single_transformer_blocks", ()))  # HunyuanVideo 1.5 has none
    top = {f"single_transformer_blocks.{i}.{k}".rstrip("."): v for i in range(n_single) for k, v in single.items()}

    def post(m: nn.Module, tp: int) -> None:
        _set_heads([b.attn for b in (*m.transformer_blocks, *getattr(m, "single_transformer_blocks", ()))], tp)

    return TPPlan("transformer_blocks", double, top, post)


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
register_tp_plan("WanTransformer3DModel", _wan_plan)
register_tp_plan("HunyuanVideoTransformer3DModel", _hunyuan_video_plan)
register_tp_plan("HunyuanVideo15Transformer3DModel", _hunyuan_video_plan)
