"""OpenSora 1.2's video VAE (SDXL AutoencoderKL per frame + causal temporal VAE).

.venv/bin/pytest tests/engines/models/dits/test_opensora_vae.py -x -q
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from flowspeed.engines.models.dits.checkpoint import load_published
from flowspeed.engines.models.dits.opensora_vae import PRESETS, PUBLISHED, OpenSoraVAE, from_published, to_published
from safetensors.torch import save_file

# Keys and shapes of the released pipeline state dict (hpcai-tech/OpenSora-VAE-v1.2), as the authors' v1.2.0 code
# builds them: VideoAutoencoderPipeline.{spatial_vae.module (diffusers AutoencoderKL), temporal_vae (VAE_Temporal_SD),
# scale, shift}; vae_temporal.py's CausalConv3d wraps `.conv`, encoder/decoder conv_blocks.0 is an nn.Identity.
REAL_KEYS = {
    "scale": (1, 4, 1, 1, 1),
    "shift": (1, 4, 1, 1, 1),
    "spatial_vae.module.encoder.conv_in.weight": (128, 3, 3, 3),
    "spatial_vae.module.encoder.mid_block.attentions.0.to_q.weight": (512, 512),
    "spatial_vae.module.quant_conv.weight": (8, 8, 1, 1),
    "spatial_vae.module.post_quant_conv.weight": (4, 4, 1, 1),
    "spatial_vae.module.decoder.conv_out.weight": (3, 128, 3, 3),
    "temporal_vae.encoder.conv_in.conv.weight": (128, 4, 3, 3, 3),
    "temporal_vae.encoder.block_res_blocks.0.0.conv1.conv.weight": (128, 128, 3, 3, 3),
    "temporal_vae.encoder.block_res_blocks.1.0.conv3.conv.weight": (256, 128, 1, 1, 1),
    "temporal_vae.encoder.block_res_blocks.3.3.norm2.weight": (512,),
    "temporal_vae.encoder.conv_blocks.1.conv.weight": (256, 256, 3, 3, 3),
    "temporal_vae.encoder.conv_blocks.2.conv.bias": (256,),
    "temporal_vae.encoder.res_blocks.3.conv2.conv.weight": (512, 512, 3, 3, 3),
    "temporal_vae.encoder.conv2.conv.weight": (8, 512, 1, 1, 1),
    "temporal_vae.quant_conv.conv.weight": (8, 8, 1, 1, 1),
    "temporal_vae.post_quant_conv.conv.weight": (4, 4, 1, 1, 1),
    "temporal_vae.decoder.conv1.conv.weight": (512, 4, 3, 3, 3),
    "temporal_vae.decoder.conv_blocks.1.conv.weight": (512, 256, 3, 3, 3),
    "temporal_vae.decoder.conv_blocks.2.conv.weight": (1024, 512, 3, 3, 3),
    "temporal_vae.decoder.block_res_blocks.0.0.conv1.conv.weight": (128, 256, 3, 3, 3),
    "temporal_vae.decoder.conv_out.conv.weight": (4, 128, 3, 3, 3),
}


def _tiny(seed: int = 0, **overrides) -> OpenSoraVAE:
    torch.manual_seed(seed)
    return OpenSoraVAE(**{**PRESETS["tiny"], **overrides}).eval()


def _clip(t: int, hw: int = 16, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(1, 3, t, hw, hw, generator=g) * 2 - 1  # (B, 3, T, H, W) in [-1, 1]


def test_published_variant_count_and_keys() -> None:
    with torch.device("meta"):
        model = OpenSoraVAE(**PRESETS["opensora-vae-v1.2"])
    count, _source = PUBLISHED["opensora-vae-v1.2"]
    n = sum(p.numel() for p in model.parameters())
    assert abs(n - count) / count < 0.01
    assert sum(p.numel() for p in model.spatial_vae.parameters()) == 83_653_863  # the SDXL VAE ("83M", report_03)
    assert abs(n - 384_000_000) / 384e6 < 0.03  # README's rounded "384M" (83M + "300M")
    sd = to_published(model.state_dict())
    assert {k: tuple(sd[k].shape) for k in REAL_KEYS} == REAL_KEYS
    assert not any(".conv_blocks.0." in k for k in sd)  # the Identity holds nothing
    assert (model.temporal_compression, model.spatial_compression, model.latent_channels) == (4, 8, 4)
    assert model.scaling_factor == (3.85, 2.32, 2.33, 3.06) and model.shift_factor == (-0.10, 0.34, 0.27, 0.98)


def test_frame_counts_shapes_and_normalisation() -> None:
    model = _tiny()
    assert [model.latent_frames(t) for t in (1, 4, 5, 17, 20, 51, 102, 204, 408)] == [1, 1, 2, 5, 6, 15, 30, 60, 120]
    with torch.no_grad():
        for t, t_lat in ((1, 1), (17, 5), (39, 12)):
            moments = model.encode(_clip(t), sample_spatial=False)
            assert moments.shape == (1, 8, t_lat, 2, 2)
            assert model.decode(moments[:, :4], num_frames=t).shape == (1, 3, t, 16, 16)
        with pytest.raises(ValueError, match="latent frames"):
            model.decode(moments[:, :4], num_frames=17)
        with pytest.raises(ValueError, match="multiples of 8"):
            model.encode(_clip(5, hw=12))
    z = torch.randn(2, 4, 3, 2, 2)
    shift = torch.tensor([-0.10, 0.34, 0.27, 0.98])[None, :, None, None, None]
    scale = torch.tensor([3.85, 2.32, 2.33, 3.06])[None, :, None, None, None]
    torch.testing.assert_close(model.normalize_latents(z), (z - shift) / scale)
    torch.testing.assert_close(model.denormalize_latents(model.normalize_latents(z)), z)


def test_micro_batching_semantics() -> None:
    model = _tiny()
    x = _clip(34)
    with torch.no_grad():
        whole = model.encode(x, sample_spatial=False)  # (1, 8, 10, 2, 2): two 17-frame chunks
        halves = [model.encode(x[:, :, i : i + 17], sample_spatial=False) for i in (0, 17)]
        # the spatial VAE's 4-frame micro-batches straddle the chunk border in `whole` only, and CPU conv kernels
        # pick their algorithm (so their summation order) by batch size. A reordered float32 sum of K terms moves by
        # ~sqrt(K) u (u = 2^-24) of its unit-scale inputs; the encoder chains L = 40 convs/linears of K <= 864
        # (3x3x3 x 32): sqrt(L K) u = 1.1e-5, twice that bounds the difference (1.07e-6 on one CPU, <1e-6 on another)
        torch.testing.assert_close(whole, torch.cat(halves, 2), rtol=0, atol=math.sqrt(40 * 864) * 2.0**-24 * 2)
        # 17 frames are front-padded to 20 inside the chunk; decode cuts those 3 padded frames off again
        z = whole[:, :4, :5]
        tvae = model.temporal_vae
        torch.testing.assert_close(model.decode_temporal(z, 17), tvae.decode(z, 20)[:, :, 3:])
        # the spatial micro-batch (4 frames at a time) changes memory, not values
        one_pass = _tiny(micro_batch_size=None)
        torch.testing.assert_close(one_pass.encode(x, sample_spatial=False), whole, rtol=1e-5, atol=1e-6)
        # the spatial posterior is sampled by default (as the authors), reproducibly with a generator
        s1 = model.encode(x[:, :, :5], generator=torch.Generator().manual_seed(3))
        s2 = model.encode(x[:, :, :5], generator=torch.Generator().manual_seed(3))
        torch.testing.assert_close(s1, s2)
        assert (s1 - whole[:, :, :2]).abs().max() > 1e-4


def test_load_published_and_save_pretrained(tmp_path) -> None:
    model, fresh = _tiny(seed=0), _tiny(seed=1)
    path = tmp_path / "model.safetensors"
    save_file({k: v.contiguous() for k, v in to_published(model.state_dict()).items()}, str(path))
    report = load_published(fresh, path, from_published)
    assert report.clean
    x = _clip(5)
    with torch.no_grad():
        torch.testing.assert_close(fresh.encode(x, sample_spatial=False), model.encode(x, sample_spatial=False))
    # a file without the scale/shift buffers gets the published ones
    sd = {k: v for k, v in to_published(model.state_dict()).items() if k not in ("scale", "shift")}
    assert load_published(_tiny(seed=2), sd, from_published).clean
    bad = dict(sd)
    bad["temporal_vae.quant_conv.conv.weight"] = torch.zeros(8, 8, 3, 1, 1)
    with pytest.raises(ValueError, match="wrong shape"):
        load_published(_tiny(seed=2), bad, from_published)
    model.save_pretrained(tmp_path / "export")
    again = OpenSoraVAE.from_pretrained(tmp_path / "export").eval()
    assert again.config.micro_frame_size == 17 and again.scaling_factor == model.scaling_factor
    with torch.no_grad():
        torch.testing.assert_close(again.encode(x, sample_spatial=False), model.encode(x, sample_spatial=False))


def test_training_step_changes_temporal_weights_and_loss_falls() -> None:
    model = _tiny(freeze_vae_2d=True).train()
    assert not any(p.requires_grad for p in model.spatial_vae.parameters())
    x = _clip(5, seed=4)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    before = model.temporal_vae.encoder.conv_in.conv.weight.detach().clone()
    losses = []
    for step in range(20):
        g = torch.Generator().manual_seed(step)
        _, x_z_rec, moments, x_z = model(x, sample_spatial=False, generator=g)
        mean, logvar = moments.chunk(2, dim=1)
        kl = 0.5 * (mean.pow(2) + logvar.exp() - 1 - logvar).sum() / x.shape[0]
        # with the random spatial VAE frozen, what the temporal VAE can learn is to reproduce its latent
        loss = F.mse_loss(x_z_rec, x_z) + 1e-6 * kl
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
        if step == 0:
            assert (model.temporal_vae.encoder.conv_in.conv.weight - before).abs().max() > 0
    assert losses[-1] < 0.2 * losses[0], losses
    # unfrozen, the spatial VAE gets gradients too
    model = _tiny().train()
    model(x, generator=torch.Generator().manual_seed(0))[0].pow(2).mean().backward()
    assert model.spatial_vae.module.encoder.conv_in.weight.grad.abs().max() > 0
