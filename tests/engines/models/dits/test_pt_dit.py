"""Qihoo-T2X PT-DiT: published key layout and count, loading, the authors' position table / shift mask / proxy
semantics, window locality, caption masking, image and video inputs, and context parallelism on 2 gloo ranks."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from flowspeed.engines.models.dits import checkpoint, pt_dit
from torch.distributed.device_mesh import init_device_mesh

from tests.distributed import run_ranks


def _tiny(**overrides) -> pt_dit.PTDiT:
    torch.manual_seed(0)
    model = pt_dit.PTDiT(**dict(pt_dit.PRESETS["tiny"], **overrides)).eval()
    with torch.no_grad():  # linear_1_visual / linear_2 are zero-initialised; random values make comparisons meaningful
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return model


def _inputs(t: int = 2, hw: int = 16) -> dict:
    g = torch.Generator().manual_seed(1)
    mask = torch.ones(2, 8)
    mask[1, 5:] = 0
    return dict(hidden_states=torch.randn(2, 4, t, hw, hw, generator=g), timestep=torch.tensor([10.0, 700.0]),
                encoder_hidden_states=torch.randn(2, 8, 16, generator=g), encoder_attention_mask=mask)  # fmt: skip


# ---- published layout ---------------------------------------------------------------------------------------------
# PTDiTDiffuser (MindSpeed-MM pt_dit_diffusers.py) for examples/qihoo_t2x/inference_model_image.json; the whole table
# is tests/facts/qihoo_t2x_ptdit_1.1b.json (tests/engines/models/test_fact_tables.py), these are a readable
# sample of it.
PUBLISHED_KEYS = {
    "pos_embed.pos_embed": (1, 1, 256, 1152),
    "pos_embed.proj.weight": (1152, 4, 2, 2), "adaln_single.emb.timestep_embedder.linear_1.weight": (1152, 256),
    "adaln_single.linear.weight": (6912, 1152), "caption_projection.linear_1.weight": (1152, 4096),
    "caption_projection.linear_2.bias": (1152,), "scale_shift_table": (2, 1152), "proj_out.weight": (32, 1152),
    "transformer_blocks.0.scale_shift_table": (6, 1152), "transformer_blocks.0.proxy_scale_shift_table": (3, 1152),
    "transformer_blocks.0.proxy_attn1.to_q.weight": (1152, 1152), "transformer_blocks.0.attn1.to_k.bias": (1152,),
    "transformer_blocks.0.pvisual_attn2.to_v.weight": (1152, 1152),
    "transformer_blocks.0.attn2.to_out.0.weight": (1152, 1152), "transformer_blocks.0.attn3.to_q.bias": (1152,),
    "transformer_blocks.0.linear_1_visual.weight": (1152, 1152), "transformer_blocks.0.linear_2.bias": (1152,),
    "transformer_blocks.0.ff.net.0.proj.weight": (4608, 1152), "transformer_blocks.27.ff.net.2.weight": (1152, 4608),
}  # fmt: skip


def test_published_keys_and_count() -> None:
    with torch.device("meta"):
        model = pt_dit.PTDiT(**pt_dit.PRESETS["Qihoo-T2I-1.1B"])
    published = pt_dit.to_published(model.state_dict())
    assert {k: tuple(published[k].shape) for k in PUBLISHED_KEYS} == PUBLISHED_KEYS
    assert len(published) == 2 + 14 + 28 * 50  # top level + adaln/caption + 50 tensors per block, nothing else
    count, (want, _) = sum(p.numel() for p in model.parameters()), pt_dit.PUBLISHED["Qihoo-T2I-1.1B"]
    assert abs(count - want) <= 0.01 * want and abs(count - 1.1e9) <= 0.05e9  # README: "1.1B"


def test_load_published_layout(tmp_path) -> None:
    src, dst = _tiny(), pt_dit.PTDiT(**pt_dit.PRESETS["tiny"]).eval()
    published = pt_dit.to_published(src.state_dict())
    path = tmp_path / "qihoo_t2i.pt"
    torch.save({"model": published}, path)  # the authors' loader accepts a bare dict or one under "model"
    assert checkpoint.load_published(dst, path, pt_dit.from_published).clean
    with torch.no_grad():
        assert torch.equal(src(**_inputs()), dst(**_inputs()))
    bad = dict(published, **{"proj_out.weight": torch.zeros(7, 32)})
    with pytest.raises(ValueError, match="proj_out.weight"):
        checkpoint.load_published(dst, bad, pt_dit.from_published)


def test_save_pretrained_roundtrip(tmp_path) -> None:
    model = _tiny()
    model.save_pretrained(tmp_path)
    again = pt_dit.PTDiT.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        assert torch.equal(model(**_inputs(t=1)), again(**_inputs(t=1)))


# ---- semantics against the authors' constructions -----------------------------------------------------------------
def _authors_sincos(dim: int, t: int, h: int, w: int) -> np.ndarray:
    """numpy transcription of MindSpeed-MM's get_3d_sincos_pos_embed(dim, spatial_size=(h, w), temporal_size=t)."""

    def one_d(d: int, pos: np.ndarray) -> np.ndarray:
        out = np.einsum("m,d->md", pos.reshape(-1), 1.0 / 10000 ** (np.arange(d // 2) / (d / 2.0)))
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    grid = np.stack(np.meshgrid(np.arange(h, dtype=np.float32), np.arange(w, dtype=np.float32)), 0)  # (2, w, h)
    spatial = np.concatenate([one_d(dim * 3 // 8, grid[0]), one_d(dim * 3 // 8, grid[1])], 1)  # (h*w, 3D/4)
    temporal = one_d(dim // 4, np.arange(t, dtype=np.float32))
    return np.concatenate([np.repeat(temporal[:, None], h * w, 1), np.repeat(spatial[None], t, 0)], -1)


def test_position_table_matches_authors_including_non_square() -> None:
    table = pt_dit.WindowPosTable(32, (1, 2, 2))(2, 4, 6, 1.0, torch.device("cpu"))  # (1, P, N, D) windowed
    ours = pt_dit.from_windows(table, (1, 2, 2), (2, 3))[0].reshape(2, 24, 32).double().numpy()
    np.testing.assert_allclose(ours, _authors_sincos(32, 2, 4, 6), atol=1e-5)


def _authors_region_ids(t: int, h: int, w: int, cr: tuple[int, int, int]) -> np.ndarray:
    """The authors' get_shift_window_attention_mask labelling: nested slice assignment, later slices overwrite."""
    img = np.zeros((t, h, w))
    s = [c // 2 for c in cr]
    axes = [(slice(0, -c), slice(-c, -k), slice(-k, None)) for c, k in zip(cr, s, strict=True)]
    cnt = 0
    for fs in axes[0]:
        for hs in axes[1]:
            for ws in axes[2]:
                img[fs, hs, ws] = cnt
                cnt += 1
    return img


@pytest.mark.parametrize("cr", [(1, 4, 4), (2, 2, 4)])
def test_shift_mask_matches_authors(cr: tuple[int, int, int]) -> None:
    t, h, w = 2 * cr[0], 3 * cr[1], 2 * cr[2]
    ids = torch.from_numpy(_authors_region_ids(t, h, w, cr))
    win = pt_dit.to_windows(ids[None, ..., None], cr)[0, ..., 0]  # (P, N)
    want = (win[:, :, None] == win[:, None, :]).reshape(t // cr[0], -1, win.shape[1], win.shape[1])
    got = pt_dit.shift_window_mask((t // cr[0], h // cr[1], w // cr[2]), cr, torch.device("cpu"))
    assert torch.equal(got.expand_as(want), want) and not got.all()  # some pairs really are masked


def test_proxies_are_strided_window_means() -> None:
    block = _tiny().transformer_blocks[0]  # windows (1, 4, 4), 2 x 2 proxies per window
    x = torch.randn(1, 3, 16, 8)  # (B, P, N, C)
    proxies = block.proxies(x).reshape(1, 3, 2, 2, 8)
    grid = x.reshape(1, 3, 4, 4, 8)  # (h, w) offsets inside the window
    assert torch.allclose(proxies[0, 1, 1, 0], grid[0, 1, 1::2, 0::2].mean(dim=(0, 1)), atol=1e-6)
    assert torch.allclose(proxies[0, 2, 0, 1], grid[0, 2, 0::2, 1::2].mean(dim=(0, 1)), atol=1e-6)


@pytest.mark.parametrize("shift", [False, True])
def test_window_locality(shift: bool) -> None:
    """Without the proxy injection (linear_1_visual = 0) one block mixes tokens only inside a window, plus the
    half-window-shifted neighbours when shift-window attention is on; with it, information reaches every window."""
    model = _tiny(num_layers=1, shift_window=shift)
    block = model.transformer_blocks[0]
    x, y = torch.randn(1, 1, 16, 16, 32), torch.randn(1, 8, 32)  # one frame of 16x16 tokens: 4x4 windows of 4x4
    t_mod = torch.randn(1, 192)
    mask = pt_dit.shift_window_mask((1, 4, 4), (1, 4, 4), torch.device("cpu"))
    bumped = x.clone()
    bumped[0, 0, 5, 5] += torch.randn(32)  # token in window (1, 1); not a constant, LayerNorm removes those

    def changed() -> torch.Tensor:
        run = lambda v: block(pt_dit.to_windows(v, (1, 4, 4)), y, t_mod, None, mask, grid=(1, 4, 4))  # noqa: E731
        with torch.no_grad():
            diff = (run(bumped) - run(x)).abs().amax(dim=(2, 3))[0]  # (P,)
        return diff.reshape(4, 4) > 1e-6

    with torch.no_grad():
        block.linear_1_visual.weight.zero_(), block.linear_1_visual.bias.zero_()
    local = changed()
    expected = torch.zeros(4, 4, dtype=torch.bool)
    expected[1, 1] = True
    if shift:  # window (1, 1) = rows/cols 4..7 after attn1; the shifted windows over it span rows/cols 2..9
        expected[0:3, 0:3] = True
    assert torch.equal(local, expected)
    with torch.no_grad():
        block.linear_1_visual.weight.normal_()
    assert changed().all()


def test_caption_mask_and_image_video_inputs() -> None:
    model, inputs = _tiny(), _inputs()
    changed = dict(inputs, encoder_hidden_states=inputs["encoder_hidden_states"].clone())
    changed["encoder_hidden_states"][1, 5:] += 3.0  # only masked-out tokens of sample 1
    with torch.no_grad():
        a, b = model(**inputs), model(**changed)
        unmasked = model(**dict(changed, encoder_attention_mask=None))
        image = model(**_inputs(t=1))
    assert a.shape == (2, 8, 2, 16, 16) and image.shape == (2, 8, 1, 16, 16)
    torch.testing.assert_close(a, b, atol=1e-6, rtol=0)
    assert (unmasked - a)[1].abs().max() > 1e-3 and torch.isfinite(image).all()
    with pytest.raises(ValueError, match="divisible by patch x window"):
        model(**_inputs(hw=12))


# ---- context parallelism ------------------------------------------------------------------------------------------
def _cp_on_ranks(rank: int, world: int) -> dict:
    from flowspeed.engines.torch_engine.context_parallel import apply_context_parallel, register_cp_plan

    mesh = init_device_mesh("cpu", (world,), mesh_dim_names=("cp",))
    register_cp_plan("PTDiT")
    errors: dict = {}
    for mode in ("ulysses", "ring"):
        ref, cp = _tiny(), _tiny()
        apply_context_parallel(cp, mesh, mode)
        seen = []
        cp.transformer_blocks[0].register_forward_pre_hook(lambda m, a, kw, seen=seen: seen.append(a[0].shape[1]),
                                                           with_kwargs=True)  # fmt: skip
        with torch.no_grad():
            want, got = ref(**_inputs()), cp(**_inputs())
        errors[mode] = (got - want).abs().max().item()
        assert seen == [4], seen  # 2 frames x 4 windows: each rank held one frame's 4 windows
        with pytest.raises(ValueError, match="cannot be split"):
            cp(**_inputs(t=1))  # a single image: shifted windows straddle the ranks
    return errors


def test_context_parallel_matches_single_process() -> None:
    for errors in run_ranks(_cp_on_ranks, 2):
        assert all(math.isfinite(e) and e < 1e-5 for e in errors.values()), errors
