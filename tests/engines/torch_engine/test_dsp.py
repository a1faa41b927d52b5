"""Dynamic Sequence Parallel (engines/torch_engine/dsp.py) for STDiT3 on 2 real gloo CPU ranks against one process.

One spawn runs every distributed check; each rank builds the single-process reference itself (same seed, inputs and
target), so the comparisons are rank-local and the parent only asserts on what the ranks return.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from flowspeed.configs.schema import ParallelConfig, TrainConfig
from flowspeed.engines.models.dits import stdit3
from flowspeed.engines.torch_engine.context_parallel import apply_context_parallel, reduce_cp_grads
from flowspeed.engines.torch_engine.dsp import apply_dsp
from flowspeed.engines.torch_engine.parallel_dims import ParallelDims
from flowspeed.engines.torch_engine.parallelize import apply_ac, parallelize
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor
from torch.utils._python_dispatch import TorchDispatchMode

from tests.distributed import run_ranks

TOL = 1e-5
FRAMES, HW = 4, 8  # latent T = 4 frames, 8 x 8 latent -> S = 4 x 4 = 16 tokens per frame; both split over 2 ranks
A2A = torch.ops._c10d_functional.all_to_all_single.default
GATHER = torch.ops._c10d_functional.all_gather_into_tensor.default


class _Collectives(TorchDispatchMode):
    """Counts the c10d collectives (functional and in-place) dispatched while active; waits are not collectives."""

    def __init__(self) -> None:
        super().__init__()
        self.counts: dict = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        if func.namespace in ("_c10d_functional", "c10d") and "wait" not in func.name() and "wrap" not in func.name():
            self.counts[func] = self.counts.get(func, 0) + 1
        return func(*args, **(kwargs or {}))

    def total(self) -> int:
        return sum(self.counts.values())


def _tiny() -> stdit3.STDiT3:
    torch.manual_seed(0)
    model = stdit3.STDiT3(**stdit3.PRESETS["tiny"])
    with torch.no_grad():  # random offsets so no parameter (or gradient) is trivially zero
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return model


def _inputs(frames: int = FRAMES, hw: int = HW) -> dict:
    g = torch.Generator().manual_seed(1)
    caption_mask = torch.ones(2, 8)
    caption_mask[1, 5:] = 0
    x_mask = torch.ones(2, frames, dtype=torch.bool)
    x_mask[0, 0] = x_mask[1, frames - 2] = False  # a clean conditioning frame on each rank's half of the frames
    return dict(
        hidden_states=torch.randn(2, 4, frames, hw, hw, generator=g),
        timestep=torch.tensor([10.0, 700.0]),
        encoder_hidden_states=torch.randn(2, 8, 16, generator=g),
        encoder_attention_mask=caption_mask,
        x_mask=x_mask,
        fps=torch.tensor([8.0, 24.0]),
        height=torch.tensor([256.0, 256.0]),
        width=torch.tensor([320.0, 320.0]),
    )


def _step(model: torch.nn.Module, inputs: dict, mesh=None) -> tuple[torch.Tensor, dict, dict]:
    """Forward + MSE backward (+ the trainer's CP gradient sum); output, grads by name, collective counts."""
    target = torch.randn(2, 8, FRAMES, HW, HW, generator=torch.Generator().manual_seed(2))  # pred_sigma: 2 x 4 ch
    with _Collectives() as fwd:
        out = model(**inputs)
    with _Collectives() as bwd:
        torch.nn.functional.mse_loss(out, target).backward()
    counts = {
        "fwd": (fwd.counts.get(A2A, 0), fwd.counts.get(GATHER, 0), fwd.total()),
        "bwd": (bwd.counts.get(A2A, 0), bwd.total()),
    }
    if mesh is not None:
        reduce_cp_grads(model, mesh)
    grads = {}
    for name, p in model.named_parameters():
        g = p.grad.full_tensor() if isinstance(p.grad, DTensor) else p.grad
        grads[name.replace("_checkpoint_wrapped_module.", "")] = g
    return out.detach(), grads, counts


def _errors(ref: tuple, got: tuple) -> dict:
    """Max abs output error, and max over parameters of |grad error| / max(1, |grad|)."""
    (out_r, grads_r, _), (out, grads, _) = ref, got
    assert grads.keys() == grads_r.keys() and all(g is not None for g in grads.values()), sorted(grads)
    rel = {n: ((grads[n] - g).abs().max() / g.abs().max().clamp(min=1.0)).item() for n, g in grads_r.items()}
    return dict(forward=(out - out_r).abs().max().item(), grad=max(rel.values()), worst=max(rel, key=rel.get))


def _raises(fn) -> str:
    try:
        fn()
    except ValueError as exc:
        return str(exc)
    return "no error"


def _on_ranks(rank: int, world: int) -> dict:
    mesh = init_device_mesh("cpu", (world,), mesh_dim_names=("cp",))
    ref = _step(_tiny(), _inputs())
    result: dict = {}

    # apply_dsp directly; record what the blocks and the final layer really get on this rank
    model, seen = _tiny(), []
    apply_dsp(model, mesh)
    for kind, blocks in (("spatial", model.spatial_blocks), ("temporal", model.temporal_blocks)):
        blocks[0].register_forward_hook(
            lambda m, a, kw, out, kind=kind: seen.append((kind, tuple(a[0].shape), kw["T"], kw["S"], a[4].shape[1])),
            with_kwargs=True,
        )
    model.final_layer.register_forward_hook(lambda m, a, out: seen.append(("final", tuple(a[0].shape), a[2].shape)))
    got = _step(model, _inputs(), mesh)
    result["direct"] = dict(_errors(ref, got), counts=got[2], seen=seen, output=got[0])

    # the engine path: parallelize() with cp=2, cp_mode=dsp and full activation checkpointing
    dims = ParallelDims(dp_replicate=1, dp_shard=1, cp=world, tp=1, pp=1, world_size=world)
    cfg = TrainConfig(parallel=ParallelConfig(cp=world, dp_shard=1, cp_mode="dsp"), activation_checkpointing="full")
    model = parallelize(_tiny(), dims.build_mesh("cpu"), dims, cfg)
    wrapped = type(model.temporal_blocks[0]).__name__
    got = _step(model, _inputs(), mesh)
    result["engine_ac"] = dict(_errors(ref, got), counts=got[2], wrapped=wrapped)

    # DSP applied BEFORE selective AC (hooks inside the checkpointed region), then FSDP2 on a size-1 dp dim of a 2-D
    # mesh (grads are DTensors): still exact, only the recomputation repeats the temporal blocks' all-to-alls
    mesh2 = init_device_mesh("cpu", (1, world), mesh_dim_names=("dp", "cp"))
    model = _tiny()
    apply_dsp(model, mesh2["cp"])
    apply_ac(model, "selective")
    for blocks in (model.spatial_blocks, model.temporal_blocks):
        for block in blocks:
            fully_shard(block, mesh=mesh2["dp"])
    fully_shard(model, mesh=mesh2["dp"])
    got = _step(model, _inputs(), mesh2["cp"])
    result["fsdp_ac_inside"] = dict(_errors(ref, got), counts=got[2])

    # errors on this real mesh, raised on both ranks before any collective (a hang would time the spawn out)
    model = _tiny()
    apply_context_parallel(model, mesh, "dsp")  # the CP entry point delegates "dsp" here
    result["odd_frames"] = _raises(lambda: model(**_inputs(frames=3)))
    result["odd_tokens"] = _raises(lambda: model(**_inputs(hw=6)))  # 3 x 3 = 9 tokens per frame
    result["twice"] = _raises(lambda: apply_dsp(model, mesh))
    with torch.no_grad():  # the same model still works after the refused calls
        result["after_errors"] = (model(**_inputs()) - ref[0]).abs().max().item()
    return result


@pytest.mark.slow
def test_dsp_matches_single_process() -> None:
    ranks = run_ranks(_on_ranks, 2)
    depth = stdit3.PRESETS["tiny"]["depth"]
    b, c, s, t = 2, stdit3.PRESETS["tiny"]["hidden_size"], HW * HW // 4, FRAMES
    for r in ranks:
        for case in ("direct", "engine_ac", "fsdp_ac_inside"):
            assert r[case]["forward"] < TOL and r[case]["grad"] < TOL, (case, r[case])
        # each rank's spatial blocks hold T/2 whole frames, its temporal blocks all T frames of S/2 tokens; the
        # spatial block sees its frames' x_mask, the temporal block the full one; the final layer runs on T/2 frames
        assert r["direct"]["seen"] == [
            ("spatial", (b, t // 2 * s, c), t // 2, s, t // 2),
            ("temporal", (b, t * s // 2, c), t, s // 2, t),
            ("final", (b, t // 2, s, c), torch.Size([b, t // 2])),
        ], r["direct"]["seen"]
        # exactly 2 all-to-alls per depth and one output all-gather forward, 2 all-to-alls per depth backward; the
        # engine path (hooks outside the checkpoint wrappers) adds none for recomputation, DSP inside AC repeats them
        assert r["direct"]["counts"] == {"fwd": (2 * depth, 1, 2 * depth + 1), "bwd": (2 * depth, 2 * depth)}
        assert r["engine_ac"]["counts"] == r["direct"]["counts"] and r["engine_ac"]["wrapped"] == "CheckpointWrapper"
        assert r["fsdp_ac_inside"]["counts"]["bwd"][0] > 2 * depth
        assert "T x S = 3 x 16" in r["odd_frames"] and "multiples of 2" in r["odd_frames"], r["odd_frames"]
        assert "T x S = 4 x 9" in r["odd_tokens"] and "cp_mode 'ulysses'/'ring'" in r["odd_tokens"], r["odd_tokens"]
        assert "already applied" in r["twice"] and r["after_errors"] < TOL
    assert torch.equal(ranks[0]["direct"]["output"], ranks[1]["direct"]["output"])  # the full output on every rank


def test_dsp_refuses_before_any_collective() -> None:
    with pytest.raises(ValueError, match="supports STDiT3 .* use cp_mode 'ulysses' or 'ring' for other models"):
        apply_dsp(torch.nn.Linear(2, 2), None)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="cp_mesh must be 1-D"):
        apply_dsp(_tiny(), SimpleNamespace(ndim=2, mesh_dim_names=("dp", "cp")))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="valid modes: .*'dsp' for STDiT3"):
        apply_context_parallel(_tiny(), None, mode="megatron")  # type: ignore[arg-type]
    assert ParallelConfig(cp=2, cp_mode="dsp").cp_mode == "dsp"
