"""OpenSoraPlan v1.2 / v1.3 / v1.3-i2v DiTs: published counts, loading, Skiparse and RoPE against
independent references, the i2v condition, and CP=2 (Ulysses and ring) on the sparse model."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from flowspeed.engines.models.dits import checkpoint
from flowspeed.engines.models.dits.opensoraplan import (
    MODEL_CLASSES,
    PRESETS,
    PUBLISHED,
    OpenSoraInpaint_v1_3,
    OpenSoraT2V,
    OpenSoraT2V_v1_3,
    build,
    compress_mask,
    from_published,
    to_published,
)
from flowspeed.engines.models.dits.opensoraplan_layers import (
    OpenSoraAttention,
    OpenSoraPlanAttnProcessor,
    OpenSoraRoPE3D,
)
from safetensors.torch import save_file
from torch.distributed.device_mesh import init_device_mesh

from tests.distributed import run_ranks


def _inputs(model, frames=2, size=8, batch=2, seed=1) -> dict:
    g = torch.Generator().manual_seed(seed)
    channels = model.pos_embed.proj.in_channels
    if isinstance(model, OpenSoraInpaint_v1_3):
        channels = 2 * model.in_channels + model.vae_scale_factor_t
    return dict(
        hidden_states=torch.randn(batch, channels, frames, size, size, generator=g),
        timestep=torch.tensor([10.0, 700.0])[:batch],
        encoder_hidden_states=torch.randn(batch, 6, model.caption_projection.linear_1.in_features, generator=g),
        encoder_attention_mask=torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]])[:batch],
    )


def _randomise_condition(model: OpenSoraInpaint_v1_3) -> None:
    with torch.no_grad():
        for lin in (model.pos_embed_masked_hidden_states[1], model.pos_embed_mask[1]):
            lin.weight.normal_(0, 0.2)


@pytest.mark.parametrize("variant", sorted(PUBLISHED))
def test_published_parameter_counts(variant: str) -> None:
    with torch.device("meta"):
        model = build(variant)
    count = sum(p.numel() for p in model.parameters())
    assert abs(count / PUBLISHED[variant][0] - 1) < 0.01, (count, PUBLISHED[variant])  # source: PUBLISHED[variant][1]


# The released keys and shapes of every variant are tests/facts/osp-v1.{2,3}{,-i2v}-transformer.json, written from
# the authors' modules at v1.2.0 / v1.3.0 (docs/fidelity/ref_osp.py) and checked by
# tests/engines/models/test_fact_tables.py.


def test_load_published_roundtrip_and_shape_mismatch(tmp_path) -> None:
    torch.manual_seed(0)
    src = build("tiny-i2v")
    _randomise_condition(src)
    save_file({k: v.contiguous() for k, v in to_published(src.state_dict()).items()}, tmp_path / "w.safetensors")
    dst = build("tiny-i2v")
    report = checkpoint.load_published(dst, tmp_path / "w.safetensors", from_published)
    assert report.clean
    inputs = _inputs(src)
    with torch.no_grad():
        assert torch.equal(src(**inputs), dst(**inputs))
    with pytest.raises(ValueError, match="wrong shape"):  # 8 latent channels (WF-VAE) vs 4 in the checkpoint
        checkpoint.load_published(build("tiny-i2v", in_channels=8, out_channels=8), tmp_path / "w.safetensors",
                                  from_published)  # fmt: skip
    # our own exports are ordinary diffusers folders
    src.save_pretrained(tmp_path / "export")
    again = OpenSoraInpaint_v1_3.from_pretrained(tmp_path / "export")
    with torch.no_grad():
        assert torch.equal(src(**inputs), again(**inputs))


def _scope(s: torch.Tensor, n: int, group: bool) -> torch.Tensor:
    return (s // n) % n if group else s % n  # docs/Report-v1.3.0.md: Single Skip / Group Skip scopes


@pytest.mark.parametrize("group", [False, True])
@pytest.mark.parametrize("seq", [32, 27])  # 27: not a multiple of n^2 = 4, padded like the authors
def test_skiparse_equals_scope_masked_dense_attention(group: bool, seq: int) -> None:
    torch.manual_seed(0)
    attn = OpenSoraAttention(
        query_dim=24, heads=2, dim_head=12, bias=True, processor=OpenSoraPlanAttnProcessor(2, group)
    )
    x = torch.randn(2, seq, 24)
    got = attn(x)
    q, k, v = (p(x).unflatten(-1, (2, 12)).transpose(1, 2) for p in (attn.to_q, attn.to_k, attn.to_v))
    s = torch.arange(seq)
    allowed = _scope(s, 2, group)[:, None] == _scope(s, 2, group)[None, :]  # (S, S)
    want = attn.to_out[0](F.scaled_dot_product_attention(q, k, v, attn_mask=allowed).transpose(1, 2).flatten(2))
    assert (got - want).abs().max() < 1e-5
    dense = attn.to_out[0](F.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2))
    assert (got - dense).abs().max() > 1e-3  # the sparsity is real


def test_rope_matches_complex_rotation() -> None:
    rope = OpenSoraRoPE3D(12, (1.0, 2.0, 0.5))
    cos, sin = rope(2, 3, 4, torch.device("cpu"), torch.float32)
    x = torch.randn(1, 24, 2, 12)
    from flowspeed.engines.models.dits.opensoraplan_layers import apply_rope3d

    got = apply_rope3d(x, cos, sin)
    t, y, w = torch.meshgrid(torch.arange(2.0), torch.arange(3.0), torch.arange(4.0), indexing="ij")
    parts = []
    for c, (pos, scale) in enumerate(zip((t, y, w), (1.0, 2.0, 0.5), strict=True)):
        third = x[..., 4 * c : 4 * c + 4]  # pairs (j, j + 2) rotate by pos/scale * 10000^(-2j/4)
        z = torch.complex(third[..., :2], third[..., 2:])
        angle = (pos.reshape(-1) / scale)[:, None] * 10000.0 ** (-torch.arange(0, 4, 2) / 4)
        z = z * torch.polar(torch.ones_like(angle), angle)[None, :, None]
        parts += [torch.cat([z.real, z.imag], dim=-1)]
    assert (got - torch.cat(parts, dim=-1)).abs().max() < 1e-5


def test_compress_mask_i2v_and_condition_wiring() -> None:
    mask = torch.ones(1, 1, 9, 16, 16)
    mask[:, :, 0] = 0  # i2v: frame 0 given
    latent = compress_mask(mask)
    assert latent.shape == (1, 4, 3, 2, 2)
    assert torch.equal(latent[:, :, 0], torch.zeros(1, 4, 2, 2)) and torch.equal(
        latent[:, :, 1:], torch.ones(1, 4, 2, 2, 2)
    )
    # zero-initialised branches: the i2v model loaded with T2V weights computes the T2V function
    torch.manual_seed(0)
    t2v = build("tiny")
    i2v = build("tiny-i2v")
    report = checkpoint.load_published(i2v, to_published(t2v.state_dict()), from_published, allow_missing=True)
    assert len(report.missing) == 6  # the masked-video and mask branches (conv w/b + linear each)
    inputs = _inputs(i2v)
    with torch.no_grad():
        want = t2v(**dict(inputs, hidden_states=inputs["hidden_states"][:, :4]))
        assert torch.equal(i2v(**inputs), want)
        _randomise_condition(i2v)
        assert (i2v(**inputs) - want).abs().max() > 1e-3  # and the condition channels do reach the output
    with pytest.raises(ValueError, match="12 channels, got 4"):
        i2v(**dict(inputs, hidden_states=inputs["hidden_states"][:, :4]))


def test_v12_and_v13_dense_are_the_same_function() -> None:
    torch.manual_seed(0)
    v12 = build("tiny-v1.2")
    v13 = build("tiny", sparse1d=False)
    v13.load_state_dict(v12.state_dict())
    inputs = _inputs(v12)
    with torch.no_grad():
        assert torch.equal(v12(**inputs), v13(**inputs))
    assert MODEL_CLASSES["tiny-v1.2"] is OpenSoraT2V and MODEL_CLASSES["tiny"] is OpenSoraT2V_v1_3
    with pytest.raises(ValueError, match="known: "):
        build("OpenSoraT2V-XL")
    assert set(PUBLISHED) <= set(PRESETS)


# ---- context parallelism --------------------------------------------------------------------------------------------
def _cp_on_ranks(rank: int, world: int) -> dict:
    from flowspeed.engines.torch_engine.context_parallel import (
        apply_context_parallel,
        reduce_cp_grads,
        register_cp_plan,
    )

    register_cp_plan("OpenSoraT2V_v1_3")
    register_cp_plan("OpenSoraInpaint_v1_3")
    mesh = init_device_mesh("cpu", (world,), mesh_dim_names=("cp",))
    out: dict = {}
    for mode in ("ulysses", "ring"):
        torch.manual_seed(0)
        ref = build("tiny")
        cp = build("tiny")
        cp.load_state_dict(ref.state_dict())
        apply_context_parallel(cp, mesh, mode)
        inputs = _inputs(ref)  # 2 x 4 x 4 = 32 tokens = 2 ranks x 16, 16 % n^2 = 0
        want, got = ref(**inputs), cp(**inputs)
        target = torch.randn(want.shape, generator=torch.Generator().manual_seed(2))
        F.mse_loss(want, target).backward()
        F.mse_loss(got, target).backward()
        reduce_cp_grads(cp, mesh)
        grads = max(
            (a.grad - b.grad).abs().max().item() for a, b in zip(ref.parameters(), cp.parameters(), strict=True)
        )
        out[mode] = dict(forward=(got - want).abs().max().item(), grads=grads, scale=want.abs().mean().item())
        try:  # 1 x 6 x 6 = 36 tokens: splits over 2 ranks, but 18 is no multiple of 4 -> refused before any collective
            cp(**_inputs(ref, frames=1, size=12))
            out[mode]["odd"] = "no error"
        except ValueError as exc:
            out[mode]["odd"] = str(exc)
    torch.manual_seed(0)
    ref = build("tiny-i2v")
    _randomise_condition(ref)
    cp = build("tiny-i2v")
    cp.load_state_dict(ref.state_dict())
    apply_context_parallel(cp, mesh, "ulysses")
    with torch.no_grad():
        inputs = _inputs(ref)
        out["i2v"] = (cp(**inputs) - ref(**inputs)).abs().max().item()
    return out


def test_cp2_sparse_model_matches_single_process() -> None:
    for r in run_ranks(_cp_on_ranks, 2):
        for mode in ("ulysses", "ring"):
            stats = r[mode]
            assert stats["forward"] < 1e-5 and stats["grads"] < 1e-5 and stats["scale"] > 1e-2, (mode, stats)
            assert "multiple of CP degree x sparse_n^2 = 8" in stats["odd"], stats["odd"]
        assert r["i2v"] < 1e-5
