"""Dynamic Sequence Parallel (DSP) for OpenSora 1.2's STDiT3: context parallelism that re-shards between axes.

Why: STDiT3 never attends over the whole T*S sequence. A spatial block attends over the S tokens of each frame, a
temporal block over the T frames of each spatial position, so each attention is local as long as the sequence is
split along the *other* axis. DSP (Zhao et al., "DSP: Dynamic Sequence Parallelism for Multi-Dimensional
Transformers", 2024) therefore splits along T for spatial blocks and along S for temporal blocks, switching with one
all-to-all of the block's activations before and one after each temporal block: 2 all-to-alls of (B, T*S/N, C) per
depth, no collective inside attention. Ulysses (context_parallel.py) splits S throughout and runs 2 all-to-alls per
attention (q/k/v in, output back), so 4 of the same size per depth; and it needs heads % N == 0, which DSP does not
(heads are never split). Cross-attention to the caption, the MLP and the modulation are per token either way.
(The released OpenSora v1.2.0 code itself splits S and runs Ulysses-style attention in its spatial blocks, see
opensora/models/stdit/stdit3.py there; DSP is the paper's scheme for such spatial-temporal DiTs.)

How, from outside the model with forward hooks (like diffusers' CP plans; stdit3.py is not modified), N = CP degree,
r = this rank; the forward sees T_loc = T/N frames because the split happens at the embedding:
- `x_embedder` output (B, T, S, C) -> frames [r*T/N, (r+1)*T/N) (backward: zero gradient elsewhere). The model then
  adds the (1, S, C) pos table, calls the blocks with T=T/N, S=S, and `final_layer` on (B, T/N, S, C).
- `rope` (the temporal RoPE table) is asked for N x the frames it is called with: temporal blocks see all T.
- spatial blocks: x_mask (B, T) -> its local frames (spatial attention is already local to each frame).
- temporal blocks, before: all-to-all (B, T/N, S, C) -> (B, T, S/N, C), kwargs T=T, S=S/N (x_mask stays full: it is
  indexed by frame); after: the inverse all-to-all. Both are functional collectives with autograd (the backward of
  an all-to-all is the inverse all-to-all), traceable by torch.compile.
- `final_layer`: x_mask -> local frames; its (B, T/N, S, P) output is all-gathered along T. The gather's backward
  keeps this rank's slice of the output gradient (every rank computes the same loss from the same full output), so
  each rank's weight gradients are partial over its tokens and `reduce_cp_grads` sums them, as for Ulysses/ring.

Constraints: STDiT3 only (other models: cp_mode "ulysses" or "ring"); latent frames T (after the temporal patch) and
tokens per frame S = ceil(H/p_h)*ceil(W/p_w) must both be divisible by N (checked on every forward, before any
collective, with an error naming the sizes); every CP rank is fed the same batch, noise and timesteps (one data-parallel
replica), as for every CP mode.

Order with the rest of parallelize(): DSP goes AFTER activation checkpointing, so its hooks sit on the checkpoint
wrappers and the recomputation in backward re-runs no all-to-all (applied before AC it is still correct, but each
recomputed temporal block repeats its collectives). The hooks survive torch.compile's module compile and FSDP2's
fully_shard, which keep the module objects (and their hooks) in place.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed._functional_collectives as fc
from flowspeed.engines.models.dits.stdit3 import STDiT3
from torch import nn
from torch.distributed.device_mesh import DeviceMesh


def apply_dsp(model: nn.Module, cp_mesh: DeviceMesh) -> None:
    """In place. Afterwards model(**full_inputs) on every rank of cp_mesh returns the FULL output (identical on every
    CP rank) while every block runs on 1/N of the tokens; after backward, sum the partial weight gradients with
    `context_parallel.reduce_cp_grads`. Same contract as `context_parallel.apply_context_parallel`."""
    if not isinstance(model, STDiT3):
        raise ValueError(
            f"DSP (cp_mode='dsp') supports STDiT3 (OpenSora 1.2, engines/models/dits/stdit3.py) only, got "
            f"{type(model).__name__}; use cp_mode 'ulysses' or 'ring' for other models."
        )
    if cp_mesh.ndim != 1:
        raise ValueError(f"cp_mesh must be 1-D (slice it, e.g. mesh['cp']); got dims {cp_mesh.mesh_dim_names}")
    degree = cp_mesh.size()
    if degree == 1:
        return
    if getattr(model, "_dsp_degree", None) is not None:
        raise ValueError(f"DSP is already applied to this {type(model).__name__}; apply it once.")
    group, rank = cp_mesh.get_group(), cp_mesh.get_local_rank()
    patch = model.patch_size
    # Where the rewritten arguments sit in the callees' signatures (read off the classes: after activation
    # checkpointing the block slots hold wrappers whose forward is (*args, **kwargs)).
    block_mask = _position(_unwrapped(model.spatial_blocks[0]), "x_mask")
    final_mask = _position(type(model.final_layer), "x_mask")
    rope_frames = _position(type(model.rope), "frames")

    def split_frames(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        _, frames, tokens, _ = output.shape  # (B, T, S, C)
        if frames % degree or tokens % degree:
            raise ValueError(
                f"DSP splits STDiT3's latent frames and its tokens per frame across the CP degree {degree}, but the "
                f"token grid is T x S = {frames} x {tokens} ({frames} latent frames after the {patch[0]}-frame "
                f"temporal patch, {tokens} = ceil(H/{patch[1]}) x ceil(W/{patch[2]}) tokens per frame); use a "
                f"latent frame count and a latent height x width whose T and S are multiples of {degree}, a CP "
                f"degree that divides both, or cp_mode 'ulysses'/'ring'."
            )
        return output.narrow(1, rank * (frames // degree), frames // degree)

    def full_rope(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        return _rewrite(args, kwargs, rope_frames, "frames", lambda f: f * degree)

    def local_mask(position: int) -> Callable[[nn.Module, tuple, dict], tuple[tuple, dict]]:
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
            return _rewrite(args, kwargs, position, "x_mask", lambda m: None if m is None else _local(m, rank, degree))

        return hook

    def to_space(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        t_loc, s = kwargs["T"], kwargs["S"]  # the model always passes T and S by keyword
        x = _all_to_all(args[0], t_loc, s, degree, group, to_space=True)  # (B, T*S/N, C)
        return (x, *args[1:]), {**kwargs, "T": t_loc * degree, "S": s // degree}

    def to_time(module: nn.Module, args: tuple, kwargs: dict, output: torch.Tensor) -> torch.Tensor:
        # kwargs are the ones to_space returned: T = all frames, S = this rank's spatial chunk
        return _all_to_all(output, kwargs["T"], kwargs["S"], degree, group, to_space=False)  # (B, T/N*S, C)

    def gather_frames(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        return _gather(output, 1, rank, degree, group)  # (B, T/N, S, P) -> (B, T, S, P)

    model.x_embedder.register_forward_hook(split_frames)
    model.rope.register_forward_pre_hook(full_rope, with_kwargs=True)
    for block in model.spatial_blocks:
        block.register_forward_pre_hook(local_mask(block_mask), with_kwargs=True)
    for block in model.temporal_blocks:
        block.register_forward_pre_hook(to_space, with_kwargs=True)
        block.register_forward_hook(to_time, with_kwargs=True)
    model.final_layer.register_forward_pre_hook(local_mask(final_mask), with_kwargs=True)
    model.final_layer.register_forward_hook(gather_frames)
    model._dsp_degree = degree


# ---- pieces -------------------------------------------------------------------------------------------------------
def _unwrapped(module: nn.Module) -> type:
    """The block class under a checkpoint wrapper (or the module's own class)."""
    return type(getattr(module, "_checkpoint_wrapped_module", module))


def _position(cls: type, name: str) -> int:
    return list(inspect.signature(cls.forward).parameters).index(name) - 1  # without self


def _local(t: torch.Tensor, rank: int, degree: int) -> torch.Tensor:
    """This rank's frames of a (B, T, ...) tensor."""
    size = t.shape[1] // degree
    return t.narrow(1, rank * size, size)


def _rewrite(args: tuple, kwargs: dict, position: int, name: str, edit: Callable[[Any], Any]) -> tuple[tuple, dict]:
    """Replace one forward argument, passed positionally (at `position`) or by keyword, with edit(value)."""
    if position < len(args):
        args = (*args[:position], edit(args[position]), *args[position + 1 :])
    elif name in kwargs:
        kwargs = {**kwargs, name: edit(kwargs[name])}
    return args, kwargs


def _all_to_all(x: torch.Tensor, frames: int, tokens: int, degree: int, group: Any, to_space: bool) -> torch.Tensor:
    """to_space: (B, T/N * S, C), this rank's frames -> (B, T * S/N, C), this rank's spatial chunk of every frame
    (frames = T/N, tokens = S). Otherwise the inverse (frames = T, tokens = S/N). Both in (t, s) order."""
    b, _, c = x.shape
    n = degree
    if to_space:  # send chunk j = spatial slice j of my frames to rank j; receive rank i's frames, my spatial slice
        send = x.reshape(b, frames, n, tokens // n, c).permute(2, 0, 1, 3, 4)  # (N, B, T/N, S/N, C)
    else:  # send chunk j = frames of rank j, my spatial slice; receive my frames, rank i's spatial slice
        send = x.reshape(b, n, frames // n, tokens, c).permute(1, 0, 2, 3, 4)  # (N, B, T/N, S/N, C)
    recv = fc.wait_tensor(fc.all_to_all_single_autograd(send.contiguous(), None, None, group))  # (N, B, T/N, S/N, C)
    if to_space:
        return recv.permute(1, 0, 2, 3, 4).reshape(b, frames * n * (tokens // n), c)  # (B, N*T/N, S/N, C)
    return recv.permute(1, 2, 0, 3, 4).reshape(b, (frames // n) * n * tokens, c)  # (B, T/N, N*S/N, C)


def _gather(x: torch.Tensor, dim: int, rank: int, degree: int, group: Any) -> torch.Tensor:
    """All-gather along `dim`; the gradient flows to this rank's own slice only (the others are detached copies)."""
    gathered = fc.wait_tensor(fc.all_gather_single(x.detach().contiguous(), dim, group))
    chunks = list(gathered.chunk(degree, dim))
    chunks[rank] = x
    return torch.cat(chunks, dim)
