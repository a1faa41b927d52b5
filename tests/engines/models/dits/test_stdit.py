"""OpenSora 1.0 STDiT and 1.2 STDiT3: published key layouts, loading, parameter counts, conditioning semantics,
block-call contract (T/S keywords) and Ulysses context parallelism on 2 gloo ranks."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from flowspeed.engines.models.dits import checkpoint, stdit, stdit3
from flowspeed.engines.models.dits.opensora_layers import SinCosPosEmbed2D, apply_interleaved_rope
from flowspeed.engines.models.video_objectives import RectifiedFlow
from torch.distributed.device_mesh import init_device_mesh

from tests.distributed import run_ranks
from tests.fidelity import FACTS

MODELS = {"stdit": (stdit, stdit.STDiT), "stdit3": (stdit3, stdit3.STDiT3)}


def _tiny(name: str) -> torch.nn.Module:
    mod, cls = MODELS[name]
    torch.manual_seed(0)
    model = cls(**mod.PRESETS["tiny"]).eval()
    with torch.no_grad():  # the authors zero-init some projections; random values make the comparisons meaningful
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return model


def _inputs(t: int = 2, hw: int = 8) -> dict:
    g = torch.Generator().manual_seed(1)
    mask = torch.ones(2, 8)
    mask[1, 5:] = 0
    return dict(hidden_states=torch.randn(2, 4, t, hw, hw, generator=g), timestep=torch.tensor([10.0, 700.0]),
                encoder_hidden_states=torch.randn(2, 8, 16, generator=g), encoder_attention_mask=mask)  # fmt: skip


# ---- published layouts --------------------------------------------------------------------------------------------
# The full key -> shape tables of the released files, written from the authors' modules at v1.0.0 / v1.2.0 by
# docs/fidelity/ref_opensora_facts.py (tests/facts/); here against the model classes directly, preset by preset.
@pytest.mark.parametrize(
    ("name", "variant", "facts"),
    [("stdit", "STDiT-XL/2", "stdit-xl2-256.json"), ("stdit", "STDiT-XL/2-512", "stdit-xl2-512.json"),
     ("stdit3", "STDiT3-XL/2", "stdit3-xl2.json")],
)  # fmt: skip
def test_published_keys_and_counts(name: str, variant: str, facts: str) -> None:
    mod, cls = MODELS[name]
    with torch.device("meta"):
        model = cls(**mod.PRESETS[variant])
    published = {k: list(v.shape) for k, v in mod.to_published(model.state_dict()).items()}
    assert published == json.loads((FACTS / facts).read_text())["keys"]
    count = sum(p.numel() for p in model.parameters())
    assert abs(count - mod.PUBLISHED[variant][0]) <= 0.01 * mod.PUBLISHED[variant][0]


def test_stdit3_velocity_is_the_first_half_of_the_released_head() -> None:
    """The released STDiT3 keeps pred_sigma (8 output channels for 4 latent ones); RF uses channels 0..3."""
    model = _tiny("stdit3")
    assert model.config.pred_sigma and model.final_layer.linear.out_features == 2 * 4 * 4
    with torch.no_grad():
        out = model(**_inputs())
    assert out.shape == (2, 8, 2, 8, 8)
    rf, x0, noise, t = RectifiedFlow(), out[:, :4], torch.zeros_like(out[:, :4]), torch.zeros(2)
    assert rf.loss_at(lambda x, t: out, x0, noise, t) == 0  # target x0 - noise sits in channels 0..3
    swapped = torch.cat([out[:, 4:], out[:, :4]], dim=1)
    assert rf.loss_at(lambda x, t: swapped, x0, noise, t) > 1e-3


@pytest.mark.parametrize("name", ["stdit", "stdit3"])
def test_load_published_layout(name: str, tmp_path) -> None:
    mod, cls = MODELS[name]
    src, dst = _tiny(name), cls(**mod.PRESETS["tiny"]).eval()
    published = mod.to_published(src.state_dict())
    if name == "stdit":  # a bare .pth, with the training size's fixed sin-cos tables in it
        assert published["pos_embed"].shape == (1, 16, 32) and published["pos_embed_temporal"].shape == (1, 2, 32)
        path = tmp_path / "OpenSora-v1-16x256x256.pth"
        torch.save(published, path)
    else:
        from safetensors.torch import save_file

        path = tmp_path / "OpenSora-STDiT-v3"
        path.mkdir()
        save_file({k: v.contiguous() for k, v in published.items()}, str(path / "model.safetensors"))
    assert checkpoint.load_published(dst, path, mod.from_published).clean
    with torch.no_grad():
        assert torch.equal(src(**_inputs()), dst(**_inputs()))
    bad = dict(published, **{"final_layer.linear.weight": torch.zeros(7, 32)})
    with pytest.raises(ValueError, match="final_layer.linear.weight"):
        checkpoint.load_published(dst, bad, mod.from_published)


def test_save_pretrained_roundtrip(tmp_path) -> None:
    model = _tiny("stdit3")
    model.save_pretrained(tmp_path)
    again = stdit3.STDiT3.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        assert torch.equal(model(**_inputs()), again(**_inputs()))


# ---- semantics ----------------------------------------------------------------------------------------------------
def _authors_2d_sincos(dim: int, h: int, w: int, scale: float, base_size: int | None) -> np.ndarray:
    """numpy transcription of the MAE table the authors build (meshgrid with w first, [sin | cos] halves)."""
    gh, gw = np.arange(h) / scale, np.arange(w) / scale
    if base_size is not None:
        gh, gw = gh * base_size / h, gw * base_size / w
    grid = np.stack(np.meshgrid(gw, gh), 0).reshape(2, -1)  # grid[0] = w positions, row-major (h, w)
    omega = 1.0 / 10000 ** (np.arange(dim // 4) / (dim / 4))
    halves = [np.einsum("m,d->md", g, omega) for g in grid]
    return np.concatenate([np.concatenate([np.sin(a), np.cos(a)], 1) for a in halves], 1)


def test_sincos_and_rope_values() -> None:
    for h, w, scale, base in ((4, 6, 0.5, None), (3, 5, 1.4, 4)):
        ours = SinCosPosEmbed2D(16)(h, w, scale, base, torch.device("cpu"))[0].double().numpy()
        np.testing.assert_allclose(ours, _authors_2d_sincos(16, h, w, scale, base), atol=1e-5)
    model = stdit3.STDiT3(**stdit3.PRESETS["tiny"])
    cos, sin = model.rope(5, torch.device("cpu"))  # (T, 16)
    x = torch.randn(1, 5, 2, 16)
    z = torch.view_as_complex(x.reshape(1, 5, 2, 8, 2))  # interleaved pairs as complex numbers
    freqs = torch.arange(5.0)[:, None] * (1.0 / 10000 ** (torch.arange(0, 16, 2) / 16))[None]  # (T, 8)
    want = torch.view_as_real(z * torch.polar(torch.ones_like(freqs), freqs)[None, :, None]).flatten(-2)
    torch.testing.assert_close(apply_interleaved_rope(x, cos, sin), want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", ["stdit", "stdit3"])
def test_caption_mask_hides_padding(name: str) -> None:
    model, inputs = _tiny(name), _inputs()
    changed = dict(inputs, encoder_hidden_states=inputs["encoder_hidden_states"].clone())
    changed["encoder_hidden_states"][1, 5:] += 3.0  # only masked-out tokens of sample 1
    with torch.no_grad():
        a, b = model(**inputs), model(**changed)
        unmasked = model(**dict(changed, encoder_attention_mask=None))
    assert a.shape == (2, 8, 2, 8, 8)  # both keep PixArt's learned-sigma head (pred_sigma)
    torch.testing.assert_close(a, b, atol=1e-6, rtol=0)
    assert (unmasked - a)[1].abs().max() > 1e-3


def test_stdit3_extras() -> None:
    model, inputs = _tiny("stdit3"), _inputs(t=3)
    with torch.no_grad():
        base = model(**inputs)
        all_true = model(**inputs, x_mask=torch.ones(2, 3, dtype=torch.bool))
        cond = model(**inputs, x_mask=torch.tensor([[False, True, True], [True, True, True]]))
        fps = model(**inputs, fps=torch.tensor([8.0, 8.0]))
        res = model(**inputs, height=torch.tensor([720.0, 720.0]), width=torch.tensor([1280.0, 1280.0]))
        explicit = model(**inputs, fps=24.0, height=64, width=64)  # the defaults: latent 8 x 8 x vae_downsample 8
    assert torch.equal(base, all_true) and torch.equal(base, explicit)
    assert (cond - base)[0].abs().max() > 1e-3
    torch.testing.assert_close(cond[1], base[1])  # x_mask of sample 0 touches sample 0 only
    assert (fps - base).abs().max() > 1e-3 and (res - base).abs().max() > 1e-3


def test_blocks_take_t_and_s_keywords() -> None:
    """A Dynamic-Sequence-Parallel hook reads (and may rewrite) T and S from the block kwargs."""
    model, seen = _tiny("stdit3"), []
    hooks = [blk.register_forward_pre_hook(lambda m, a, kw: seen.append((a[0].shape, kw["T"], kw["S"])),
                                           with_kwargs=True)
             for blk in [*model.spatial_blocks, *model.temporal_blocks]]  # fmt: skip
    with torch.no_grad():
        model(**_inputs(t=3))
    for h in hooks:
        h.remove()
    assert seen == [(torch.Size([2, 3 * 16, 32]), 3, 16)] * 4


# ---- context parallelism ------------------------------------------------------------------------------------------
def _cp_on_ranks(rank: int, world: int) -> dict:
    from flowspeed.engines.torch_engine.context_parallel import apply_context_parallel, register_cp_plan

    mesh = init_device_mesh("cpu", (world,), mesh_dim_names=("cp",))
    errors = {}
    for name in MODELS:
        for mode in ("ulysses", "ring"):
            ref, cp = _tiny(name), _tiny(name)
            register_cp_plan(type(cp).__name__)
            apply_context_parallel(cp, mesh, mode)
            first = cp.blocks[0] if name == "stdit" else cp.spatial_blocks[0]
            seen = []
            first.register_forward_pre_hook(lambda m, a, kw, seen=seen: seen.append((a[0].shape[1], kw["S"])),
                                            with_kwargs=True)  # fmt: skip
            extras = {"x_mask": torch.tensor([[False, True], [True, True]])} if name == "stdit3" else {}
            with torch.no_grad():
                want, got = ref(**_inputs(), **extras), cp(**_inputs(), **extras)
            errors[name, mode] = (got - want).abs().max().item()
            assert seen == [(2 * 16 // world, 16 // world)], seen  # each rank really held half of the 16 tokens/frame
    return errors


def test_context_parallel_matches_single_process() -> None:
    for errors in run_ranks(_cp_on_ranks, 2):
        assert all(math.isfinite(e) and e < 1e-5 for e in errors.values()), errors
