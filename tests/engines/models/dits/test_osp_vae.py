"""OpenSoraPlan's video VAEs: WF-VAE (v1.3) and CausalVAE (v1.2).

.venv/bin/pytest tests/engines/models/dits/test_osp_vae.py -x -q
"""

from __future__ import annotations

import json

import pytest
import torch
from flowspeed.configs.schema import ComponentConfig, ModelConfig
from flowspeed.engines.models import get_family
from flowspeed.engines.models.dits import causalvae, wfvae
from flowspeed.engines.models.dits.checkpoint import load_published

MODULES = {"wfvae": (wfvae, wfvae.WFVAEModel), "causalvae": (causalvae, causalvae.CausalVAEModel)}


def _tiny(name: str, seed: int = 0, **overrides):
    torch.manual_seed(seed)
    module, cls = MODULES[name]
    return cls(**{**module.PRESETS["tiny"], **overrides}).eval()


def _clip(t: int = 9, hw: int = 32, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(1, 3, t, hw, hw, generator=g) * 2 - 1  # (B, 3, 4k+1, H, W) in [-1, 1]


@pytest.mark.parametrize("name", list(MODULES))
def test_shapes_attributes_and_causality(name: str) -> None:
    model = _tiny(name)
    assert (model.temporal_compression, model.spatial_compression) == (4, 8)
    x = _clip()
    with torch.no_grad():
        moments = model.encode(x)
        c = model.latent_channels
        assert moments.shape == (1, 2 * c, 3, 4, 4)
        assert model.decode(moments[:, :c]).shape == x.shape
        # causal in time: changing the last frame leaves the first latent frame untouched, moves the last one.
        # v1.2's GroupNorm pools statistics over all frames, so its convolutions are causal only with LayerNorm.
        causal = model if name == "wfvae" else _tiny(name, norm_type="layernorm")
        x2 = x.clone()
        x2[:, :, -1] = 0.0
        moments, moments2 = causal.encode(x), causal.encode(x2)
    torch.testing.assert_close(moments2[:, :, 0], moments[:, :, 0], rtol=0, atol=1e-6)
    assert (moments2[:, :, -1] - moments[:, :, -1]).abs().max() > 1e-4
    with pytest.raises(ValueError, match="4k\\+1"):
        model.encode(x[:, :, :8])


def test_haar_transforms_invert_and_put_energy_in_lll() -> None:
    x = _clip(t=5, hw=8)
    coeffs = wfvae.HaarWaveletTransform3D()(x)  # (1, 24, 3, 4, 4)
    assert coeffs.shape == (1, 24, 3, 4, 4)
    # LLL of the first (causally padded) frame pair is 2 * 0.3536 * the sum of each 2x2 block of frame 0
    expected = 2 * 0.3536 * x[:, :, 0].unfold(2, 2, 2).unfold(3, 2, 2).sum((-1, -2))
    torch.testing.assert_close(coeffs[:, :3, 0], expected, rtol=1e-5, atol=1e-5)
    back = wfvae.InverseHaarWaveletTransform3D()(coeffs)
    torch.testing.assert_close(back, x, rtol=2e-3, atol=2e-3)  # the authors' 0.3536 is 1/sqrt(8) to 4 digits
    c2 = wfvae.HaarWaveletTransform2D()(x)
    assert c2.shape == (1, 12, 5, 4, 4)
    torch.testing.assert_close(wfvae.InverseHaarWaveletTransform2D()(c2), x, rtol=1e-5, atol=1e-5)


# The released key names and shapes are held in tests/facts/osp-{wfvae-v1.3,causalvae-v1.2}.json (written from the
# authors' modules by docs/fidelity/ref_osp.py) and checked by tests/engines/models/test_fact_tables.py.
@pytest.mark.parametrize("name,variant", [("wfvae", "wfvae-v1.3"), ("causalvae", "causalvae-v1.2-488")])
def test_published_variant_counts_and_keys(name: str, variant: str) -> None:
    module, cls = MODULES[name]
    with torch.device("meta"):
        model = cls(**module.PRESETS[variant])
    count = sum(p.numel() for p in model.parameters())
    published, source = module.PUBLISHED[variant]
    assert abs(count - published) / published < 0.01, (count, published, source)
    sd = module.to_published(model.state_dict())
    assert module.from_published(sd).keys() == model.state_dict().keys()


@pytest.mark.parametrize("name", list(MODULES))
def test_load_published_ckpt_and_save_pretrained(name: str, tmp_path) -> None:
    module, cls = MODULES[name]
    src = _tiny(name, seed=0)
    path = tmp_path / "vae.ckpt"  # the authors' training checkpoint layout
    torch.save({"ema_state_dict": module.to_published(src.state_dict()), "state_dict": {}}, path)
    dst = _tiny(name, seed=5)
    x = _clip(t=5, hw=16)
    with torch.no_grad():
        assert not torch.equal(dst.encode(x), src.encode(x))
        assert load_published(dst, path, module.from_published).clean
        torch.testing.assert_close(dst.encode(x), src.encode(x), rtol=0, atol=0)
    src.save_pretrained(tmp_path / "export")
    again = cls.from_pretrained(tmp_path / "export").eval()
    assert list(again.config.scale) == list(src.config.scale)
    with torch.no_grad():
        torch.testing.assert_close(
            again.decode(src.encode(x)[:, : src.latent_channels]), src.decode(src.encode(x)[:, : src.latent_channels])
        )
    if name == "wfvae":  # the authors' EMA shadows trainable parameters only: no Haar filters / buffers
        ema = {k: v for k, v in src.state_dict().items() if "wavelet" not in k}
        assert len(ema) < len(src.state_dict())
        torch.save({"ema_state_dict": ema}, tmp_path / "ema.ckpt")
        fresh = _tiny(name, seed=7)
        assert load_published(fresh, tmp_path / "ema.ckpt", module.from_published).clean
        with torch.no_grad():
            torch.testing.assert_close(fresh.encode(x), src.encode(x), rtol=0, atol=0)
    wrong = cls(
        **{
            **module.PRESETS["tiny"],
            "dropout": 0.0,
            **({"base_channels": 64} if name == "wfvae" else {"hidden_size": 64}),
        }
    )
    with pytest.raises(ValueError, match="wrong shape"):
        load_published(wrong, path, module.from_published)


def test_latent_normalisation_matches_the_wrappers() -> None:
    model = wfvae.WFVAEModel(**wfvae.PRESETS["tiny"], scale=[2.0, 1.0, 0.5, 1.0], shift=[1.0, 0.0, 0.0, -1.0])
    z = torch.randn(1, 4, 2, 2, 2)
    n = model.normalize_latents(z)
    torch.testing.assert_close(n[:, 0], (z[:, 0] - 1.0) * 2.0)
    torch.testing.assert_close(n[:, 3], z[:, 3] + 1.0)
    torch.testing.assert_close(model.denormalize_latents(n), z)
    v12 = causalvae.CausalVAEModel(**causalvae.PRESETS["tiny"])
    torch.testing.assert_close(v12.normalize_latents(z), z * 0.18215)  # CausalVAEModelWrapper's constant
    assert wfvae.WFVAEModel(**wfvae.PRESETS["tiny"]).config.scale == [0.18215] * 4


@pytest.mark.parametrize("name", list(MODULES))
def test_the_family_loads_the_authors_folder_and_our_export(name: str, tmp_path) -> None:
    """The released vae/ folder: a config.json naming WFVAEModel / CausalVAEModel (our class names too) beside a
    training .ckpt under the authors' names. It must load through `from_published` (diffusers' from_pretrained
    cannot read their names) with the config's scale and shift; our own export folder loads the same way."""
    module, cls = MODULES[name]
    src = _tiny(name, seed=3)
    c = src.latent_channels
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    config = {
        **dict(src.config),
        "_class_name": cls.__name__,
        "scale": [0.5] * c,
        "shift": [0.25] * c,
        "l1_dowmsample_block": "Downsample",  # a key of theirs ours does not take
    }
    (theirs / "config.json").write_text(json.dumps(config))
    torch.save({"state_dict": {"gen_model": module.to_published(src.state_dict())}}, theirs / "merged.ckpt")
    src.save_pretrained(tmp_path / "ours")
    fam = get_family("opensoraplan")
    for folder, scale in ((theirs, 0.5), (tmp_path / "ours", src.config.scale[0])):
        preset = "tiny" if name == "wfvae" else "tiny-causalvae"
        vae = fam.load_vae(
            ModelConfig(family="opensoraplan", vae=ComponentConfig(preset=preset, pretrained=str(folder)))
        )
        assert vae.config.scale == [scale] * c
        for k, v in src.state_dict().items():
            torch.testing.assert_close(vae.state_dict()[k], v, rtol=0, atol=0)


def test_wavelet_term_is_the_energy_flow_mismatch() -> None:
    model = _tiny("wfvae")
    x = _clip(t=5, hw=16)
    with torch.no_grad():
        with_wl, logs = wfvae.vae_training_loss(model, x, kl_weight=1e-6, wavelet_weight=0.1, sample_posterior=False)
        without, _ = wfvae.vae_training_loss(model, x, kl_weight=1e-6, wavelet_weight=0.0, sample_posterior=False)
        _, (enc_l1, enc_l2) = model.encoder(x)
        _, (dec_l1, dec_l2) = model.decoder(model.encode(x)[:, : model.latent_channels])
    expected = (enc_l1 - dec_l1).abs().sum() + (enc_l2 - dec_l2).abs().sum()
    assert logs["wl_loss"] == pytest.approx(float(expected), rel=1e-5)
    assert float(with_wl - without) == pytest.approx(0.1 * logs["wl_loss"], rel=1e-4)
    rec = model.decode(model.encode(x)[:, : model.latent_channels])
    assert logs["rec_loss"] == pytest.approx(float((x - rec).detach().abs().sum() / x.shape[2]), rel=1e-5)
    with pytest.raises(ValueError, match="perceptual_fn"):
        wfvae.vae_training_loss(model, x, kl_weight=1e-6, perceptual_weight=1.0)


@pytest.mark.parametrize("name,steps", [("wfvae", 12), ("causalvae", 12)])  # both end ~37% below the start (bar: 30%)
def test_training_loss_falls_and_reaches_encoder(name: str, steps: int) -> None:
    model = _tiny(name).train()
    t, h, w = torch.meshgrid(torch.arange(5.0), torch.arange(16.0), torch.arange(16.0), indexing="ij")
    x = torch.stack([0.8 * torch.sin(0.4 * h + 0.3 * w + 0.5 * t + k) for k in range(3)])[None]  # smooth, fixed
    opt = torch.optim.AdamW(model.parameters(), lr=3e-4)
    losses = []
    for step in range(steps):
        g = torch.Generator().manual_seed(step)
        loss, logs = wfvae.vae_training_loss(model, x, kl_weight=1e-6, generator=g)
        opt.zero_grad()
        loss.backward()
        if step == 0:
            grad = model.encoder.conv_out.conv.weight.grad
            assert grad is not None and grad.abs().sum() > 0
            assert ("wl_loss" in logs) == (name == "wfvae")
        opt.step()
        losses.append(logs["loss"])
    assert sum(losses[-3:]) / 3 < 0.7 * sum(losses[:3]) / 3, losses
