"""Context parallelism on 2 real gloo CPU ranks: CP=2 forward and 5 AdamW steps match one process within 1e-5.

Each spawned rank trains a single-process reference model and a CP model from the same seed on the same inputs,
so one spawn per model family checks both modes; the parent compares what the ranks return.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from flowspeed.engines.torch_engine.context_parallel import apply_context_parallel, reduce_cp_grads, supported_cp_models
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor

from tests.distributed import run_ranks

TOL = 1e-5
STEPS = 5


def _cogvideox(rotary: bool = True) -> tuple[torch.nn.Module, dict]:
    from diffusers import CogVideoXTransformer3DModel
    from flowspeed.engines.models.cogvideox import TRANSFORMER_PRESETS, CogVideoX

    torch.manual_seed(0)
    kwargs = dict(TRANSFORMER_PRESETS["tiny"], in_channels=4, out_channels=4, text_embed_dim=32, max_text_seq_length=8)
    model = CogVideoXTransformer3DModel(**kwargs, use_rotary_positional_embeddings=rotary)
    g = torch.Generator().manual_seed(1)
    latents = torch.randn(1, 3, 4, 8, 8, generator=g)  # (B, T', C, H', W'): 3*4*4 = 48 video tokens
    inputs = dict(hidden_states=latents, encoder_hidden_states=torch.randn(1, 8, 32, generator=g),
                  timestep=torch.tensor([500]), image_rotary_emb=CogVideoX()._rotary(model, latents.shape, "cpu"),
                  return_dict=False)  # fmt: skip
    return model, inputs


def _flux() -> tuple[torch.nn.Module, dict]:
    from diffusers import FluxPipeline, FluxTransformer2DModel
    from flowspeed.engines.models.flux import TRANSFORMER_PRESETS

    torch.manual_seed(0)
    model = FluxTransformer2DModel(in_channels=16, joint_attention_dim=32, pooled_projection_dim=32,
                                   **TRANSFORMER_PRESETS["tiny"])  # fmt: skip
    g = torch.Generator().manual_seed(1)
    inputs = dict(
        hidden_states=torch.randn(1, 16, 16, generator=g),  # (B, h*w/4, 4c): 16 image tokens
        encoder_hidden_states=torch.randn(1, 8, 32, generator=g),  # (B, L, D): 8 text tokens
        pooled_projections=torch.randn(1, 32, generator=g),
        timestep=torch.tensor([0.7]),
        txt_ids=torch.zeros(8, 3),
        img_ids=FluxPipeline._prepare_latent_image_ids(1, 4, 4, "cpu", torch.float32),
        return_dict=False,
    )
    return model, inputs


def _wan() -> tuple[torch.nn.Module, dict]:
    from diffusers import WanTransformer3DModel

    torch.manual_seed(0)
    config = dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4)
    model = WanTransformer3DModel(**config, text_dim=32, freq_dim=32, ffn_dim=64, num_layers=1, rope_max_seq_len=32)
    g = torch.Generator().manual_seed(1)
    inputs = dict(
        hidden_states=torch.randn(1, 4, 2, 8, 8, generator=g),  # (B, C, F, H, W): 2*4*4 = 32 video tokens
        encoder_hidden_states=torch.randn(1, 8, 32, generator=g),
        timestep=torch.tensor([500]),
        return_dict=False,
    )
    return model, inputs


BUILDERS = {"cogvideox": _cogvideox, "flux": _flux, "wan": _wan}


def _train(model: torch.nn.Module, inputs: dict, target: torch.Tensor, mesh=None) -> list[float]:
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(STEPS):
        loss = torch.nn.functional.mse_loss(model(**inputs)[0], target)
        loss.backward()
        if mesh is not None:
            reduce_cp_grads(model, mesh)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


def _errors(ref: torch.nn.Module, cp: torch.nn.Module, ref_losses: list[float], cp_losses: list[float]) -> dict:
    full = [p.full_tensor() if isinstance(p, DTensor) else p for p in cp.parameters()]
    return dict(
        losses=max(abs(a - b) for a, b in zip(ref_losses, cp_losses, strict=True)),
        weights=max((a - b).abs().max().item() for a, b in zip(ref.parameters(), full, strict=True)),
    )


def _family_on_ranks(rank: int, world: int, family: str) -> dict:
    """Both modes for one family; returns per-mode max errors and this rank's CP output (to compare across ranks)."""
    mesh = init_device_mesh("cpu", (world,), mesh_dim_names=("cp",))
    result: dict = {}
    for mode in ("ulysses", "ring"):
        ref, inputs = BUILDERS[family]()
        cp, _ = BUILDERS[family]()
        init = [p.detach().clone() for p in cp.parameters()]
        apply_context_parallel(cp, mesh, mode)
        with torch.no_grad():
            want, got = ref(**inputs)[0], cp(**inputs)[0]
        target = torch.randn(want.shape, generator=torch.Generator().manual_seed(2))
        ref_losses, cp_losses = _train(ref, inputs, target), _train(cp, inputs, target, mesh)
        result[mode] = dict(
            forward=(got - want).abs().max().item(),
            moved=max((a - b).abs().max().item() for a, b in zip(ref.parameters(), init, strict=True)),
            output=got,
            **_errors(ref, cp, ref_losses, cp_losses),
        )
    # A sequence CP cannot split evenly is refused with an error naming it (both ranks raise before any collective).
    odd = dict(inputs, encoder_hidden_states=inputs["encoder_hidden_states"][:, :7])
    if family == "flux":
        odd["txt_ids"] = inputs["txt_ids"][:7]
    try:
        cp(**odd)
        result["odd"] = "no error"
    except ValueError as exc:
        result["odd"] = str(exc)
    if family == "flux":  # Wan rides along (diffusers' own plan, like Flux): forward and one step's gradients
        for mode in ("ulysses", "ring"):
            ref, inputs = _wan()
            cp, _ = _wan()
            apply_context_parallel(cp, mesh, mode)
            want, got = ref(**inputs)[0], cp(**inputs)[0]
            target = torch.randn(want.shape, generator=torch.Generator().manual_seed(2))
            torch.nn.functional.mse_loss(want, target).backward()
            torch.nn.functional.mse_loss(got, target).backward()
            reduce_cp_grads(cp, mesh)
            grads = zip(ref.parameters(), cp.parameters(), strict=True)
            result[f"wan_{mode}"] = max(
                [(got - want).abs().max().item()] + [(a.grad - b.grad).abs().max().item() for a, b in grads]
            )
    if family == "cogvideox":
        # CP on one dim of a 2-D mesh, FSDP2 on the other (size 1 here, but grads are DTensors), with activation
        # checkpointing: the same 5 steps as the single-process reference above (same seeds, inputs and target).
        mesh2 = init_device_mesh("cpu", (1, world), mesh_dim_names=("dp", "cp"))
        sharded, _ = _cogvideox()
        apply_context_parallel(sharded, mesh2["cp"], "ulysses")
        sharded.enable_gradient_checkpointing()
        for block in sharded.transformer_blocks:
            fully_shard(block, mesh=mesh2["dp"])
        fully_shard(sharded, mesh=mesh2["dp"])  # (no no_grad forward first: FSDP2 then trains stale unsharded params)
        result["fsdp"] = _errors(ref, sharded, ref_losses, _train(sharded, inputs, target, mesh2["cp"]))
        # CogVideoX-2b's layout: sincos positional embeddings instead of rotary
        ref, inputs = _cogvideox(rotary=False)
        cp, _ = _cogvideox(rotary=False)
        apply_context_parallel(cp, mesh, "ring")
        with torch.no_grad():
            result["sincos_forward"] = (cp(**inputs)[0] - ref(**inputs)[0]).abs().max().item()
    return result


FAMILIES = ("cogvideox", "flux")


def _every_family(rank: int, world: int) -> dict[str, dict]:
    return {family: _family_on_ranks(rank, world, family) for family in FAMILIES}


@pytest.fixture(scope="module")
def cp_ranks() -> list[dict[str, dict]]:
    """Both families on one pair of ranks (each on its own CP mesh): one spawn for the module."""
    return run_ranks(_every_family, 2)


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
def test_cp2_matches_single_process(family: str, cp_ranks: list[dict[str, dict]]) -> None:
    ranks = [r[family] for r in cp_ranks]
    for mode in ("ulysses", "ring"):
        for r in ranks:
            stats = r[mode]
            assert stats["forward"] < TOL and stats["losses"] < TOL and stats["weights"] < TOL, (mode, stats)
            assert stats["moved"] > 1e-4, "training did not change the weights: the comparison would be vacuous"
        assert torch.equal(ranks[0][mode]["output"], ranks[1][mode]["output"])  # the full output on every rank
    for r in ranks:
        assert "not divisible by the CP degree 2" in r["odd"] and "encoder_hidden_states" in r["odd"], r["odd"]
        if family == "flux":
            assert r["wan_ulysses"] < TOL and r["wan_ring"] < TOL, r
        if family == "cogvideox":
            assert r["sincos_forward"] < TOL
            assert r["fsdp"]["losses"] < TOL and r["fsdp"]["weights"] < TOL, r["fsdp"]


def test_errors_name_the_fix() -> None:
    assert {"CogVideoXTransformer3DModel", "FluxTransformer2DModel"} <= set(supported_cp_models())
    with pytest.raises(ValueError, match="supported models: .*CogVideoXTransformer3DModel"):
        apply_context_parallel(torch.nn.Linear(2, 2), None)  # type: ignore[arg-type]
    model, _ = _cogvideox()
    with pytest.raises(ValueError, match=r"valid modes: \['ulysses', 'ring'\]"):
        apply_context_parallel(model, None, mode="megatron")  # type: ignore[arg-type]
    # Checks that run before any collective, so a stand-in mesh suffices: 2 heads cannot be split over 4 ranks.
    mesh4 = SimpleNamespace(ndim=1, size=lambda: 4, device_type="cpu", mesh_dim_names=("cp",))
    with pytest.raises(ValueError, match="2 heads, not divisible by the CP degree 4; use mode='ring'"):
        apply_context_parallel(model, mesh4)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="cp_mesh must be 1-D"):
        apply_context_parallel(model, SimpleNamespace(ndim=2, mesh_dim_names=("dp", "cp")), "ring")  # type: ignore[arg-type]
