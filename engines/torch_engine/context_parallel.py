"""Context parallelism (CP) for video DiTs: split one sample's token sequence across the ranks of a CP mesh.

Why: a video DiT's activations grow with frames x height x width tokens; past a few thousand tokens one sample no
longer fits a GPU. CP gives each rank 1/N of the tokens through every transformer block (activations shrink N-fold,
weights stay replicated or FSDP-sharded on another mesh dim); only attention needs the whole sequence, which it gets
by either
- "ulysses": an all-to-all turns (B, S/N, H, D) into (B, S, H/N, D), attention runs on whole sequences for H/N heads,
  and a second all-to-all turns the result back (needs heads % N == 0), or
- "ring": each rank keeps its query chunk and sees every key/value chunk in turn, merging the partial results with
  their log-sum-exp (any head count). diffusers 0.42 fetches the chunks with one all-gather (`rotate_method=
  "allgather"`, the only one it has), so a rank briefly holds all keys/values of one layer, not 1/N of them.
Every CP rank must be fed the same batch, noise and timesteps: the ranks of a CP group are one data-parallel replica.

How: through diffusers' own CP machinery (`ContextParallelConfig` + `ModelMixin.enable_parallelism`), which hooks
the model from outside: a *plan* names the module inputs to split and the module output to all-gather, and the
attention processors route through `dispatch_attention_fn`'s Ulysses/ring autograd functions. Plans are data kept
in a registry keyed by model class name (`register_cp_plan`): diffusers' shipped `_cp_plan` where there is one
(Flux, Wan), our own plan plus a CP-aware attention processor for CogVideoX, HunyuanVideo, HunyuanVideo 1.5 and
LTX-Video. The gather's backward keeps each rank's own slice of the output gradient, so after backward every CP rank
holds a partial weight gradient over its tokens; `reduce_cp_grads` sums them.

CPU (gloo) path, patched only when the mesh is on CPU: diffusers takes `rank % torch.accelerator.device_count()`,
which is 0 without an accelerator, and its native attention backend cannot return the log-sum-exp that ring
attention merges with; we supply both (see `_cpu_device_count` and `_install_cpu_ring_attention`).
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_nn
import torch.nn.functional as F
from diffusers.models._modeling_parallel import ContextParallelConfig, ContextParallelInput, ContextParallelOutput
from diffusers.models.attention_dispatch import dispatch_attention_fn
from diffusers.models.embeddings import apply_rotary_emb
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor

MODES = ("ulysses", "ring")


# ---- plan registry ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class CPPlan:
    """How to split one model class. `plan` None: the class's own diffusers `_cp_plan`. `processor`: a zero-arg
    factory for a CP-aware attention processor, installed on every attention module (None: keep the model's), or
    only on those whose names start with one of `processor_on` (the others run on whole, unsplit inputs)."""

    plan: dict[str, Any] | None = None
    processor: type | None = None
    processor_on: tuple[str, ...] | None = None


_PLANS: dict[str, CPPlan] = {}


def register_cp_plan(
    class_name: str,
    plan: dict[str, Any] | None = None,
    processor: type | None = None,
    processor_on: tuple[str, ...] | None = None,
) -> None:
    """Register how to split `class_name` (diffusers plan syntax, see diffusers.models._modeling_parallel)."""
    _PLANS[class_name] = CPPlan(plan, processor, processor_on)


def supported_cp_models() -> list[str]:
    return sorted(_PLANS)


def _plan_for(model: nn.Module) -> tuple[str, CPPlan]:
    # Walk the MRO so subclasses (e.g. FSDP2's `FSDP<Name>` wrapper class) find their base's plan.
    for cls in type(model).__mro__:
        if cls.__name__ in _PLANS:
            return cls.__name__, _PLANS[cls.__name__]
    raise ValueError(
        f"context parallelism has no plan for {type(model).__name__}; supported models: {supported_cp_models()}. "
        "Use one of those, set context parallel degree to 1, or add a plan with register_cp_plan()."
    )


class CogVideoXCPAttnProcessor:
    """`CogVideoXAttnProcessor2_0` with its SDPA call routed through diffusers' dispatcher, which runs Ulysses/ring
    attention when `_parallel_config` is set. Inputs are this rank's tokens: text chunk ++ video chunk; the rotary
    tables arrive already sliced to the video chunk (see the plan below)."""

    _attention_backend = None
    _parallel_config = None

    def __call__(
        self,
        attn: nn.Module,
        hidden_states: torch.Tensor,  # (B, S_vid/N, C)
        encoder_hidden_states: torch.Tensor,  # (B, S_txt/N, C)
        attention_mask: torch.Tensor | None = None,
        image_rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,  # 2 x (S_vid/N, D)
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if attention_mask is not None:
            raise ValueError("CogVideoX context parallelism does not support an attention mask; pass none.")
        text_len = encoder_hidden_states.size(1)
        x = torch.cat([encoder_hidden_states, hidden_states], dim=1)  # (B, S, C), S = this rank's tokens
        q, k, v = (proj(x).unflatten(-1, (attn.heads, -1)) for proj in (attn.to_q, attn.to_k, attn.to_v))  # (B,S,H,D)
        if attn.norm_q is not None:
            q = attn.norm_q(q)
        if attn.norm_k is not None:
            k = attn.norm_k(k)
        if image_rotary_emb is not None:
            q = _rotate_video(q, text_len, image_rotary_emb)
            k = k if attn.is_cross_attention else _rotate_video(k, text_len, image_rotary_emb)
        out = dispatch_attention_fn(q, k, v, backend=self._attention_backend, parallel_config=self._parallel_config)
        out = attn.to_out[1](attn.to_out[0](out.flatten(2, 3)))  # (B, S, C)
        encoder_out, video_out = out.split([text_len, out.size(1) - text_len], dim=1)
        return video_out, encoder_out


def _rotate_video(x: torch.Tensor, text_len: int, rotary: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    # (B, S, H, D): rotary on the video tokens only, out of place (the original writes into a slice)
    return torch.cat([x[:, :text_len], apply_rotary_emb(x[:, text_len:], rotary, sequence_dim=1)], dim=1)


# CogVideoX runs text and video tokens as two streams that every block concatenates for attention, and its forward
# slices the patch embedding by the full text length, so the split happens at the first block's inputs (both streams
# by N, keeping each rank's text:video ratio) and at the model input for the rotary tables; proj_out gathers.
_COGVIDEOX_PLAN = {
    "": {"image_rotary_emb": [ContextParallelInput(split_dim=0, expected_dims=2)] * 2},  # 2 x (S_vid, D)
    "transformer_blocks.0": {
        "hidden_states": ContextParallelInput(split_dim=1, expected_dims=3),  # (B, S_vid, C)
        "encoder_hidden_states": ContextParallelInput(split_dim=1, expected_dims=3),  # (B, S_txt, C)
    },
    "proj_out": ContextParallelOutput(gather_dim=1, expected_dims=3),  # (B, S_vid/N, p*p*C_out) -> (B, S_vid, ...)
}
register_cp_plan("CogVideoXTransformer3DModel", _COGVIDEOX_PLAN, CogVideoXCPAttnProcessor)


class HunyuanVideoCPAttnProcessor:
    """HunyuanVideo's joint attention on this rank's tokens, video chunk ++ text chunk (both streams split by N, see
    the plan below), with the text padding mask kept. diffusers' `HunyuanVideoAttnProcessor2_0` receives the model's
    key mask over the *whole* sequence, [all video ; all text], which no longer matches the keys once they are
    sharded, so this processor builds the mask of its own keys ([ones ; its text chunk's mask], (B, 1, 1, S_local))
    and lets the collective lay it out as it lays out the keys: Ulysses through diffusers' dispatcher (its all-to-all
    gathers a local mask in rank order, [v_0 t_0 v_1 t_1 ...], as it gathers k and v); ring by gathering every rank's
    keys, values and mask at once (diffusers 0.42's ring does the same all-gather, but its ring template takes no
    mask) and attending this rank's queries to all of them in one masked SDPA call. Projections, RMS qk-norm and
    RoPE on the video part are the original processor's (the rotary tables arrive sliced to the video chunk)."""

    _attention_backend = None
    _parallel_config = None

    def __call__(
        self,
        attn: nn.Module,
        hidden_states: torch.Tensor,  # (B, S_vid/N, C)
        encoder_hidden_states: torch.Tensor,  # (B, S_txt/N, C)
        attention_mask: torch.Tensor | None = None,  # (B, 1, 1, S_vid + S_txt): the model's mask, whole
        image_rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,  # 2 x (S_vid/N, D)
    ) -> tuple[torch.Tensor, torch.Tensor]:
        text_len = encoder_hidden_states.size(1)
        joint = attn.add_q_proj is None  # single-stream blocks project both streams with the same weights
        x = torch.cat([hidden_states, encoder_hidden_states], dim=1) if joint else hidden_states
        q, k, v = (proj(x).unflatten(-1, (attn.heads, -1)) for proj in (attn.to_q, attn.to_k, attn.to_v))  # (B,S,H,D)
        if attn.norm_q is not None:
            q, k = attn.norm_q(q), attn.norm_k(k)
        if image_rotary_emb is not None:
            video = q.size(1) - text_len if joint else q.size(1)
            q, k = (torch.cat([apply_rotary_emb(t[:, :video], image_rotary_emb, sequence_dim=1), t[:, video:]], dim=1)
                    for t in (q, k))  # fmt: skip
        if not joint:  # dual-stream blocks: the text stream's own projections and norms, appended
            eq, ek, ev = (proj(encoder_hidden_states).unflatten(-1, (attn.heads, -1))
                          for proj in (attn.add_q_proj, attn.add_k_proj, attn.add_v_proj))  # fmt: skip
            if attn.norm_added_q is not None:
                eq, ek = attn.norm_added_q(eq), attn.norm_added_k(ek)
            q, k, v = torch.cat([q, eq], dim=1), torch.cat([k, ek], dim=1), torch.cat([v, ev], dim=1)
        mask = None if attention_mask is None else self._local_mask(attention_mask, q.size(1) - text_len, text_len)
        out = self._attend(q, k, v, mask).flatten(2, 3).to(q.dtype)  # (B, S_local, H*D)
        video_out, text_out = out.split([out.size(1) - text_len, text_len], dim=1)
        if getattr(attn, "to_out", None) is not None:
            video_out = attn.to_out[1](attn.to_out[0](video_out))
        if getattr(attn, "to_add_out", None) is not None:
            text_out = attn.to_add_out(text_out)
        return video_out, text_out

    def _local_mask(self, mask: torch.Tensor, video_len: int, text_len: int) -> torch.Tensor:
        """(B, 1, 1, S_vid + S_txt) over the whole sequence -> (B, 1, 1, video_len + text_len) over this rank's keys."""
        cp = getattr(self._parallel_config, "context_parallel_config", None)
        if cp is None:  # not split: the model's mask is this rank's
            return mask
        rank = dist.get_rank(cp._flattened_mesh.get_group())
        text = mask[..., mask.size(-1) - text_len * cp._flattened_mesh.size() :]  # (B, 1, 1, S_txt): text at the end
        ones = torch.ones(*mask.shape[:-1], video_len, dtype=mask.dtype, device=mask.device)
        return torch.cat([ones, text[..., rank * text_len : (rank + 1) * text_len]], dim=-1)

    def _attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """(B, S_local, H, D) x 3 -> (B, S_local, H, D) over every rank's keys."""
        cp = getattr(self._parallel_config, "context_parallel_config", None)
        if cp is None or cp.ring_degree == 1:  # one process, or Ulysses (diffusers' all-to-all; it gathers the mask)
            return dispatch_attention_fn(q, k, v, attn_mask=mask, backend=self._attention_backend,
                                         parallel_config=self._parallel_config)  # fmt: skip
        if cp.ulysses_degree != 1:
            raise ValueError("HunyuanVideo context parallelism runs Ulysses or ring, not both at once")
        group = cp._ring_mesh.get_group()
        k, v = (torch.cat(dist_nn.all_gather(t.contiguous(), group=group), dim=1) for t in (k, v))  # (B, S, H, D)
        if mask is not None:
            masks = [torch.empty_like(mask) for _ in range(cp.ring_degree)]
            dist.all_gather(masks, mask.contiguous(), group=group)
            mask = torch.cat(masks, dim=-1)  # (B, 1, 1, S) in the keys' rank order
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask)
        return out.transpose(1, 2)


# HunyuanVideo (diffusers 0.42 ships no `_cp_plan` for it): the token refiner (its own attention processor kept) and
# the embeddings run whole on every rank; the dual-stream blocks' inputs are split (video and text by N each, so
# every rank holds a [video ; text] chunk through the dual- and single-stream blocks), the RoPE tables at the rope
# module's output, and proj_out gathers.
_HUNYUANVIDEO_PLAN = {
    "rope": {i: ContextParallelInput(split_dim=0, expected_dims=2, split_output=True) for i in (0, 1)},  # (S_vid, D)
    "transformer_blocks.0": {
        "hidden_states": ContextParallelInput(split_dim=1, expected_dims=3),  # (B, S_vid, C)
        "encoder_hidden_states": ContextParallelInput(split_dim=1, expected_dims=3),  # (B, S_txt, C)
    },
    "proj_out": ContextParallelOutput(gather_dim=1, expected_dims=3),  # (B, S_vid/N, p*p*C_out) -> (B, S_vid, ...)
}
register_cp_plan(
    "HunyuanVideoTransformer3DModel",
    _HUNYUANVIDEO_PLAN,
    HunyuanVideoCPAttnProcessor,
    processor_on=("transformer_blocks.", "single_transformer_blocks."),
)


class HunyuanVideo15CPAttnProcessor(HunyuanVideoCPAttnProcessor):
    """HunyuanVideo 1.5's double-stream joint attention under CP. diffusers' `HunyuanVideo15AttnProcessor2_0`
    computes what HunyuanVideo's dual-stream path does (video q/k/v with RMS qk-norm and RoPE, the text stream's own
    projections and norms appended, joint attention, the two output projections), so the parent runs it, collectives
    included. Only the model's mask differs: HunyuanVideo 1.5 hands every block the text side alone, (B, S_txt) over
    its reordered [image ; glyph ; prompt] tokens (valid first), which the original processor left-pads with True
    for the video and turns into a query-and-key mask. Here it becomes HunyuanVideo's (B, 1, 1, S_vid + S_txt) key
    mask, which the parent cuts to this rank's keys. Masking keys only changes the padded text tokens' own outputs,
    which no video token ever attends to (they are masked keys) and which the model drops after the last block, so
    the prediction and its gradients are the one-process ones."""

    def _local_mask(self, mask: torch.Tensor, video_len: int, text_len: int) -> torch.Tensor:
        """(B, S_txt) text mask of the whole sequence -> (B, 1, 1, video_len + text_len) over this rank's keys."""
        cp = getattr(self._parallel_config, "context_parallel_config", None)
        ranks = 1 if cp is None else cp._flattened_mesh.size()
        if mask.dim() != 2 or mask.size(-1) != text_len * ranks:
            raise ValueError(
                f"HunyuanVideo 1.5 context parallelism expects the model's (batch, text tokens) mask over all "
                f"{text_len * ranks} text tokens; got {tuple(mask.shape)}"
            )
        whole = F.pad(mask.bool(), (video_len * ranks, 0), value=True)  # (B, S_vid + S_txt): video keys all kept
        return super()._local_mask(whole[:, None, None, :], video_len, text_len)


# HunyuanVideo 1.5 (diffusers 0.42 ships no `_cp_plan`; the authors' own Ulysses, Tencent-Hunyuan/HunyuanVideo-1.5
# @60783e7 `--sp_size`, `modules/attention.py` `sequence_parallel_attention`, keeps the text whole on every rank, cut
# to the rank's heads): HunyuanVideo's design on its double-stream-only blocks, so Ulysses and ring share one path.
# The refiner, the glyph and image projections and the reordering of the text tokens run whole on every rank; the
# first block's video and joint text streams are split by N (so the joint text length, image + glyph + prompt tokens
# after the family's padding trim, must be a multiple of N, as the video token count must), the RoPE tables at the
# rope module's output, and proj_out gathers. The processor goes on the blocks only (the refiner keeps its own).
_HUNYUANVIDEO15_PLAN = {
    "rope": {i: ContextParallelInput(split_dim=0, expected_dims=2, split_output=True) for i in (0, 1)},  # (S_vid, D)
    "transformer_blocks.0": {
        "hidden_states": ContextParallelInput(split_dim=1, expected_dims=3),  # (B, S_vid, C)
        "encoder_hidden_states": ContextParallelInput(split_dim=1, expected_dims=3),  # (B, S_txt, C)
    },
    "proj_out": ContextParallelOutput(gather_dim=1, expected_dims=3),  # (B, S_vid/N, C_out) -> (B, S_vid, C_out)
}
register_cp_plan(
    "HunyuanVideo15Transformer3DModel",
    _HUNYUANVIDEO15_PLAN,
    HunyuanVideo15CPAttnProcessor,
    processor_on=("transformer_blocks.",),
)


class LTXVideoCPAttnProcessor:
    """LTX-Video's attention with the video tokens split by N (see the plan below). Self-attention (`attn1`, no
    mask) goes through diffusers' dispatcher, which runs Ulysses or ring attention over the ranks' video chunks.
    Cross-attention (`attn2`) attends this rank's video queries to the WHOLE text, which every rank holds with its
    padding mask, so it is an ordinary local attention with no collective: it is dispatched without the parallel
    config. (diffusers 0.42's own `_cp_plan` leaves the per-token timesteps (B, S) of the training loss whole, a shape
    mismatch in the first block, and splits the text and its mask: with a (B,) timestep its Ulysses path then fails on
    the mask's shape on CPU, and ring attention refuses a mask.) Projections, RMS qk-norm, RoPE on q and k of the
    self-attention (tables arrive sliced to the video chunk) and the mask's head expansion are the original
    `LTXVideoAttnProcessor`'s."""

    _attention_backend = None
    _parallel_config = None

    def __call__(
        self,
        attn: nn.Module,
        hidden_states: torch.Tensor,  # (B, S_vid/N, C)
        encoder_hidden_states: torch.Tensor | None = None,  # (B, S_txt, C) whole, or None for self-attention
        attention_mask: torch.Tensor | None = None,  # (B, 1, S_txt) additive bias over the text (cross only)
        image_rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,  # 2 x (B, S_vid/N, D)
    ) -> torch.Tensor:
        cross = encoder_hidden_states is not None
        if attention_mask is not None and not cross:
            raise ValueError("LTX-Video context parallelism takes no self-attention mask (the model passes none).")
        context = encoder_hidden_states if cross else hidden_states
        b = hidden_states.size(0)
        if attention_mask is not None:  # (B, 1, S_txt) -> (B, H, 1, S_txt), as the original processor prepares it
            attention_mask = attn.prepare_attention_mask(attention_mask, context.size(1), b)
            attention_mask = attention_mask.view(b, attn.heads, -1, attention_mask.size(-1))
        q, k, v = attn.norm_q(attn.to_q(hidden_states)), attn.norm_k(attn.to_k(context)), attn.to_v(context)
        if image_rotary_emb is not None:  # LTX's interleaved-pair rotation over the channels (B, S, C), not diffusers'
            from diffusers.models.transformers.transformer_ltx import apply_rotary_emb as ltx_rotary

            q, k = ltx_rotary(q, image_rotary_emb), ltx_rotary(k, image_rotary_emb)
        q, k, v = (t.unflatten(2, (attn.heads, -1)) for t in (q, k, v))  # (B, S, H, D)
        out = dispatch_attention_fn(q, k, v, attn_mask=attention_mask, backend=self._attention_backend,
                                    parallel_config=None if cross else self._parallel_config)  # fmt: skip
        return attn.to_out[1](attn.to_out[0](out.flatten(2, 3).to(q.dtype)))


# LTX-Video: every block's self-attention runs on sequence shards; the text stream (caption projection, the key/value
# side of the cross-attention, its mask) stays whole on every rank. The split is at the model input: the packed video
# tokens and the per-token timesteps (B, S_vid) that the training loss passes (a (B,) timestep is left whole, it
# broadcasts), the RoPE tables (B, S_vid, D) at the rope module's output (it builds them from the frame/height/width
# counts, not from the split tokens); proj_out gathers.
_LTX_PLAN = {
    "": {
        "hidden_states": ContextParallelInput(split_dim=1, expected_dims=3),  # (B, S_vid, C_in)
        "timestep": ContextParallelInput(split_dim=1, expected_dims=2),  # (B, S_vid) per token
    },
    "rope": {i: ContextParallelInput(split_dim=1, expected_dims=3, split_output=True) for i in (0, 1)},  # cos, sin
    "proj_out": ContextParallelOutput(gather_dim=1, expected_dims=3),  # (B, S_vid/N, C_out) -> (B, S_vid, C_out)
}
register_cp_plan("LTXVideoTransformer3DModel", _LTX_PLAN, LTXVideoCPAttnProcessor)
# diffusers ships `_cp_plan` for these (tested here). (LTX-Video's shipped plan is not used: see above.)
for _name in ("FluxTransformer2DModel", "WanTransformer3DModel"):
    register_cp_plan(_name)
# The video DiTs flowspeed defines (engines/models/dits) carry their own `_cp_plan`, each tested against one process
# in tests/engines/models/dits.
# STDiT3 also takes DSP (engines/torch_engine/dsp.py, `cp_mode: dsp`), as MindSpeed-MM runs it.
for _name in ("STDiT", "STDiT3", "OpenSoraT2V", "OpenSoraT2V_v1_3", "OpenSoraInpaint_v1_3", "PTDiT"):
    register_cp_plan(_name)


# ---- apply --------------------------------------------------------------------------------------------------------
def apply_context_parallel(model: nn.Module, cp_mesh: DeviceMesh, mode: str = "ulysses") -> None:
    """In place. Afterwards model(**full_inputs) on every rank of cp_mesh returns the FULL output (identical on every
    CP rank) while attention runs on sequence shards. mode: "ulysses" (all-to-all over heads) or "ring" (ring
    attention); "dsp" is STDiT3's Dynamic Sequence Parallel, delegated to engines/torch_engine/dsp.py (no attention
    collective, so not in MODES). Every rank of the job must call this (building the CP sub-meshes is collective)."""
    if mode == "dsp":
        from flowspeed.engines.torch_engine.dsp import apply_dsp

        return apply_dsp(model, cp_mesh)
    if mode not in MODES:
        raise ValueError(
            f"unknown context parallel mode {mode!r}; valid modes: {list(MODES)}, or 'dsp' for STDiT3 "
            "(engines/torch_engine/dsp.py)"
        )
    name, entry = _plan_for(model)
    if cp_mesh.ndim != 1:
        raise ValueError(f"cp_mesh must be 1-D (slice it, e.g. mesh['cp']); got dims {cp_mesh.mesh_dim_names}")
    degree = cp_mesh.size()
    if degree == 1:
        return
    heads = getattr(getattr(model, "config", None), "num_attention_heads", None)
    if mode == "ulysses" and heads is not None and heads % degree:
        raise ValueError(
            f"ulysses splits attention heads across CP ranks: {name} has {heads} heads, not divisible by the CP "
            f"degree {degree}; use mode='ring' or a CP degree that divides {heads}."
        )
    plan = entry.plan if entry.plan is not None else getattr(model, "_cp_plan", None)
    if plan is None:
        raise ValueError(f"{name} has no `_cp_plan` in this diffusers version; register one with register_cp_plan().")
    if entry.processor is not None and entry.processor_on is None:
        model.set_attn_processor(entry.processor())
    elif entry.processor is not None:
        for module_name, module in model.named_modules():
            if module_name.startswith(entry.processor_on) and hasattr(module, "set_processor"):
                module.set_processor(entry.processor())
    sizes = (degree, 1) if mode == "ring" else (1, degree)
    config = ContextParallelConfig(
        ring_degree=sizes[0], ulysses_degree=sizes[1], mesh=cp_mesh._unflatten(0, sizes, ("ring", "ulysses"))
    )
    on_cpu = cp_mesh.device_type == "cpu"
    if on_cpu:
        _install_cpu_ring_attention()
    with _cpu_device_count() if on_cpu else contextlib.nullcontext():
        model.enable_parallelism(config=config, cp_plan=plan)
    _add_divisibility_checks(model, plan, degree)


def reduce_cp_grads(model: nn.Module, cp_mesh: DeviceMesh) -> None:
    """After backward: sum the CP ranks' partial weight gradients so every CP rank holds the full gradient. FSDP2
    grads are DTensors sharded on another mesh dim; CP ranks at the same FSDP coordinate hold the same shard, so their
    local tensors are summed. Every CP rank must have gradients for the same parameters (they run the same graph)."""
    if cp_mesh.size() == 1:
        return
    group = cp_mesh.get_group()
    buckets: dict[tuple[torch.dtype, torch.device], list[torch.Tensor]] = {}
    for p in model.parameters():
        if p.grad is not None:
            g = p.grad.to_local() if isinstance(p.grad, DTensor) else p.grad
            buckets.setdefault((g.dtype, g.device), []).append(g)
    for grads in buckets.values():  # one all-reduce per dtype/device instead of one per parameter
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat, group=group)
        for g, summed in zip(grads, flat.split([g.numel() for g in grads]), strict=True):
            g.copy_(summed.view_as(g))


def _add_divisibility_checks(model: nn.Module, plan: dict[str, Any], degree: int) -> None:
    """A forward pre-hook per planned module (it runs before diffusers' split hook) that turns diffusers' bare
    assertion into an error naming the input and the fix."""
    for module_name, spec in plan.items():
        if not isinstance(spec, dict):
            continue
        names = [k for k in spec if isinstance(k, str)]
        modules = [model] if module_name == "" else _resolve(model, module_name)
        for module in modules:
            params = list(inspect.signature(type(module).forward).parameters)[1:]  # skip self
            module.register_forward_pre_hook(_divisibility_hook(type(model).__name__, spec, names, params, degree),
                                             with_kwargs=True)  # fmt: skip


def _divisibility_hook(model_name: str, spec: dict, names: list[str], params: list[str], degree: int):
    def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
        for name in names:
            i = params.index(name) if name in params else len(args)
            value = kwargs.get(name, args[i] if i < len(args) else None)
            values, specs = (value, spec[name]) if isinstance(value, (list, tuple)) else ([value], [spec[name]])
            for t, s in zip(values, specs, strict=False):
                if not torch.is_tensor(t) or s.split_output or (s.expected_dims and t.dim() != s.expected_dims):
                    continue
                if t.shape[s.split_dim] % degree:
                    raise ValueError(
                        f"{model_name} context parallelism splits `{name}` {tuple(t.shape)} along dim {s.split_dim}, "
                        f"whose length {t.shape[s.split_dim]} is not divisible by the CP degree {degree}; make the "
                        f"token count a multiple of {degree} (text length, latent frames/height/width) or lower CP."
                    )

    return hook


def _resolve(model: nn.Module, dotted: str) -> list[nn.Module]:
    """'a.*.b' -> every `b` under the ModuleList `a` (diffusers' plan syntax)."""
    mods = [model]
    for atom in dotted.split("."):
        mods = [c for m in mods for c in (list(m) if atom == "*" else [getattr(m, atom)])]
    return mods


# ---- CPU (gloo) support -------------------------------------------------------------------------------------------
@contextlib.contextmanager
def _cpu_device_count() -> Iterator[None]:
    """diffusers 0.42's `_resolve_parallel_config` computes `rank % torch.accelerator.device_count()`, which is 0 on
    a CPU-only host; report one device for the duration of the call."""
    original = torch.accelerator.device_count
    torch.accelerator.device_count = lambda: max(original(), 1)
    try:
        yield
    finally:
        torch.accelerator.device_count = original


def _cpu_lse_forward(ctx, query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                     enable_gqa=False, return_lse=False, _save_ctx=True, _parallel_config=None):  # fmt: skip
    """A forward op for diffusers' templated ring attention: SDPA that also returns the log-sum-exp, on CPU."""
    if enable_gqa:
        raise ValueError("CPU ring attention does not support grouped-query attention.")
    q, k, v = (x.transpose(1, 2) for x in (query, key, value))  # (B, H, S, D)
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        q, k, v, dropout_p, is_causal, attn_mask=attn_mask, scale=scale
    )  # (B, H, S, D), (B, H, S)
    out, lse = out.transpose(1, 2), lse.transpose(1, 2)  # (B, S, H, D), (B, S, H): the templates' layout
    if _save_ctx:
        ctx.save_for_backward(query, key, value, out, lse)
        ctx.attn_mask, ctx.dropout_p, ctx.is_causal, ctx.scale = attn_mask, dropout_p, is_causal, scale
    return (out, lse) if return_lse else out


def _cpu_lse_backward(ctx, grad_out, *args, query=None, key=None, value=None, out=None, lse=None, **kwargs):
    """Ring backward passes the rotated key/value chunk and the globally merged out/lse; the kernel's gradient for
    that chunk is then exact (softmax normalised by the global lse)."""
    saved = dict(zip(("query", "key", "value", "out", "lse"), ctx.saved_tensors, strict=True))
    given = dict(query=query, key=key, value=value, out=out, lse=lse)
    t = {n: (given[n] if given[n] is not None else saved[n]).transpose(1, 2) for n in saved}  # (B, H, S, ...)
    grads = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
        grad_out.transpose(1, 2), t["query"], t["key"], t["value"], t["out"], t["lse"].to(torch.float32),
        ctx.dropout_p, ctx.is_causal, attn_mask=ctx.attn_mask, scale=ctx.scale,
    )  # fmt: skip
    return tuple(g.transpose(1, 2) for g in grads)  # (B, S, H, D) x 3


def _install_cpu_ring_attention() -> None:
    """Wrap diffusers' NATIVE attention backend (idempotently) so ring CP on CPU tensors uses the lse-returning ops
    above; every other call goes to the original function unchanged (where the original would raise anyway)."""
    from diffusers.models import attention_dispatch as ad

    registry, name = ad._AttentionBackendRegistry, ad.AttentionBackendName.NATIVE
    native = registry._backends[name]
    if getattr(native, "_cp_cpu_ring", False):
        return

    def native_or_cpu_ring(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                           enable_gqa=False, return_lse=False, _parallel_config=None):  # fmt: skip
        cp = getattr(_parallel_config, "context_parallel_config", None)
        if cp is None or cp.ring_degree == 1 or query.device.type != "cpu":
            return native(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa, return_lse,
                          _parallel_config)  # fmt: skip
        if attn_mask is not None:
            raise ValueError("ring context parallelism does not support an attention mask; use mode='ulysses'.")
        return ad._templated_context_parallel_attention(
            query, key, value, None, dropout_p, is_causal, scale, enable_gqa, return_lse,
            forward_op=_cpu_lse_forward, backward_op=_cpu_lse_backward, _parallel_config=_parallel_config,
        )  # fmt: skip

    native_or_cpu_ring._cp_cpu_ring = True
    registry._backends[name] = native_or_cpu_ring
