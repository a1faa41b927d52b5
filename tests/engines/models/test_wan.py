"""Wan2.1 text-to-video (`wan`): the objective against DiffSynth-Studio's own numbers, Wan's latent normalisation,
training, generation through `WanPipeline`, LoRA in peft's format and the released-weights recipes.

The released layouts (transformer, VAE, UMT5) are held by tests/engines/models/test_fact_tables.py against tables
written from the authors' modules through diffusers' conversion script (docs/fidelity/ref_wan_facts.py), and the
parameter counts by test_variants.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from flowspeed.configs import ModelConfig, load_config
from flowspeed.datasets_prep.demo import render_clip
from flowspeed.engines.models import get_family
from flowspeed.engines.models.variants import get_variant
from flowspeed.engines.models.wan import NUM_TRAIN_TIMESTEPS, bsmntw_weights, latent_stats
from torch import nn

from tests.conftest import REPO
from tests.engines.models.family_checks import (
    assert_lora_round_trip,
    mean_loss,
    train_steps,
)

TEXT_LEN = 64
CFG = ModelConfig(family="wan", max_text_length=TEXT_LEN)

# docs/fidelity/ref_wan_loss.py, printed by DiffSynth-Studio@fed7b18 FlowMatchScheduler("Wan") (training=True) and
# FlowMatchSFTLoss's steps: index -> (sigma, timestep, weight, loss of the probe pred = 0.3 x_t + 0.5 t / 1000)
DIFFSYNTH = {
    0: (1.0, 1000.0, 0.0, 0.0),
    1: (0.9997997879981995, 999.7998046875, 0.0012814513174816966, 0.00371766509488225),
    137: (0.9692273736000061, 969.2273559570312, 0.1967395842075348, 0.5785602331161499),
    500: (0.8333333134651184, 833.3333129882812, 1.0248619318008423, 3.2072463035583496),
    999: (0.004980080295354128, 4.9800801277160645, 0.031879011541604996, 0.15068192780017853),
}
# Wan-Video/Wan2.1 wan/modules/vae.py `WanVAE.__init__`: the per-channel latent statistics (first and last channel)
WAN_MEAN, WAN_STD = (-0.7571, -0.2921), (2.8184, 1.9160)


class _Probe(nn.Module):
    """The reference's "model": pred = 0.3 x_t + 0.5 t / 1000, called as the family calls a Wan transformer."""

    def forward(self, hidden_states, timestep, encoder_hidden_states, return_dict=False):  # noqa: ANN001, ANN201
        return (0.3 * hidden_states + 0.5 * timestep.float().view(-1, 1, 1, 1, 1) / 1000,)


@pytest.fixture(scope="module")
def batch() -> dict[str, torch.Tensor]:
    """What prep caches for two 9-frame 32x32 demo clips with the tiny VAE and UMT5."""
    fam = get_family("wan")
    clips = np.stack([render_clip("circle", "red", "black", "from left to right", 32, 32, 9),
                      render_clip("square", "blue", "grey", "from top to bottom", 32, 32, 9)])  # fmt: skip
    tok, enc = fam.load_text_encoder(CFG)
    with torch.no_grad():
        params = fam.encode_video(fam.load_vae(CFG), torch.from_numpy(clips))
        text = fam.encode_text(tok, enc, ["a red circle moving right", "a blue square moving down"], TEXT_LEN)
    return {"latent_params": params, "text_embeds": text, "clips": torch.from_numpy(clips)}


def test_objective_equals_diffsynth_studios_wan_trainer() -> None:
    fam = get_family("wan")
    scheduler = fam.load_scheduler(CFG)
    g = torch.Generator().manual_seed(7)
    x0 = 1.5 * torch.randn(1, 16, 3, 4, 4, generator=g)
    eps = torch.randn(x0.shape, generator=g)
    weights = bsmntw_weights(scheduler.timesteps[:NUM_TRAIN_TIMESTEPS])
    for i, (sigma, timestep, weight, loss) in DIFFSYNTH.items():
        assert scheduler.sigmas[i].item() == pytest.approx(sigma, rel=1e-6, abs=1e-7)
        assert scheduler.timesteps[i].item() == pytest.approx(timestep, rel=1e-6)
        assert weights[i].item() == pytest.approx(weight, rel=1e-5, abs=1e-7)
        ours = fam.flow_loss(_Probe(), scheduler, x0, eps, torch.tensor([i]), torch.zeros(1, 4, 8))
        assert ours.item() == pytest.approx(loss, rel=1e-5, abs=1e-7), i
    assert weights.mean().item() == pytest.approx(1.0, rel=1e-6)  # their normalisation: the grid sums to 1000
    # the check can fail: diffusers' release sampling shift (3.0) as the training shift moves the loss by > 1%
    wrong = type(scheduler)(num_train_timesteps=NUM_TRAIN_TIMESTEPS, shift=3.0)
    moved = fam.flow_loss(_Probe(), wrong, x0, eps, torch.tensor([500]), torch.zeros(1, 4, 8)).item()
    assert abs(moved - DIFFSYNTH[500][3]) > 0.01 * DIFFSYNTH[500][3]


def test_latents_are_normalised_per_channel_as_wan_does(batch: dict[str, torch.Tensor]) -> None:
    fam = get_family("wan")
    vae = fam.load_vae(CFG)
    assert (vae.config.latents_mean[0], vae.config.latents_mean[-1]) == WAN_MEAN
    assert (vae.config.latents_std[0], vae.config.latents_std[-1]) == WAN_STD
    x = batch["clips"].permute(0, 4, 1, 2, 3).float() / 127.5 - 1.0
    with torch.no_grad():
        mu, logvar = vae.encode(x).latent_dist.parameters.chunk(2, dim=1)  # (B, 16, 3, 4, 4): 9 frames -> 3
    mean, std = latent_stats(vae, mu)
    cached_mu, cached_logvar = batch["latent_params"].chunk(2, dim=1)
    torch.testing.assert_close(cached_mu, (mu - mean) / std)  # what WanPipeline undoes: z / (1 / std) + mean
    torch.testing.assert_close(cached_logvar, logvar - 2 * torch.log(std))
    assert fam.frame_count_error(81) is None and "4k+1" in fam.frame_count_error(80)


def test_loss_falls_over_twenty_steps(batch: dict[str, torch.Tensor]) -> None:
    fam = get_family("wan")
    scheduler = fam.load_scheduler(CFG)
    model = fam.load_transformer(CFG, batch["text_embeds"].shape[-1], batch["latent_params"].shape[1] // 2)
    data = {k: batch[k] for k in ("latent_params", "text_embeds")}

    before = mean_loss(fam, model, scheduler, data)
    train_steps(fam, model.train(), scheduler, data, steps=20, lr=3e-3, first_seed=100)
    after = mean_loss(fam, model, scheduler, data)
    assert after < 0.8 * before, (before, after)


def test_generate_returns_the_requested_shape(tmp_path: Path) -> None:
    fam = get_family("wan")
    fam.save_pretrained(tmp_path / "ckpt", CFG, fam.load_transformer(CFG, 32, 16))
    tokenizer = json.loads((tmp_path / "ckpt" / "tokenizer" / "tokenizer_config.json").read_text())
    assert tokenizer["model_max_length"] == TEXT_LEN  # what generate pads prompts to, as the cache was
    assert json.loads((tmp_path / "ckpt" / "model_index.json").read_text())["_class_name"] == "WanPipeline"
    kw = dict(num_frames=5, height=32, width=48, steps=2, guidance_scale=1.0, seed=0, device=torch.device("cpu"))
    videos = fam.generate(tmp_path / "ckpt", ["a red circle", "a blue square"], **kw)
    assert videos.shape == (2, 5, 32, 48, 3) and videos.dtype == np.uint8
    with pytest.raises(ValueError, match="text-to-video"):
        fam.generate(tmp_path / "ckpt", ["a"], images=[np.zeros((32, 48, 3), np.uint8)], **kw)
    with pytest.raises(ValueError, match="4k\\+1"):
        fam.generate(tmp_path / "ckpt", ["a"], **{**kw, "num_frames": 8})


def test_released_folder_loads_back_and_keeps_its_own_sampler(tmp_path: Path) -> None:
    """The `pretrained:` route a released Wan2.1-*-Diffusers folder takes (vae/, text_encoder/ + tokenizer/,
    transformer/, scheduler/), exercised on our own export: every weight comes back, and a re-export samples with the
    release's scheduler (diffusers' folders ship flow_shift 3.0), not the authors' default 5.0."""
    fam = get_family("wan")
    model = fam.load_transformer(CFG, 32, 16)
    fam.save_pretrained(tmp_path / "rel", CFG, model)
    config = tmp_path / "rel" / "scheduler" / "scheduler_config.json"
    assert json.loads(config.read_text())["flow_shift"] == 5.0  # generate.py's T2V sample_shift
    config.write_text(json.dumps({**json.loads(config.read_text()), "flow_shift": 3.0}))
    parts = {name: {"pretrained": str(tmp_path / "rel"), "subfolder": name} for name in ("vae", "text_encoder",
                                                                                          "transformer")}  # fmt: skip
    cfg = ModelConfig.model_validate({"family": "wan", "max_text_length": TEXT_LEN, **parts})
    again = fam.load_transformer(cfg, 0, 0)
    assert all(torch.equal(v, again.state_dict()[k]) for k, v in model.state_dict().items())
    tok, enc = fam.load_text_encoder(cfg)
    ref_tok, ref_enc = fam.load_text_encoder(CFG)
    with torch.no_grad():
        torch.testing.assert_close(fam.encode_text(tok, enc, ["a cat"], TEXT_LEN),
                                   fam.encode_text(ref_tok, ref_enc, ["a cat"], TEXT_LEN), rtol=0, atol=0)  # fmt: skip
    assert fam.load_vae(cfg).config.z_dim == 16
    sampler = fam.sample_scheduler(cfg)
    assert type(sampler).__name__ == "UniPCMultistepScheduler" and sampler.config.flow_shift == 3.0


def test_lora_adapter_saves_and_reloads_exactly_in_peft_format(tmp_path: Path) -> None:
    fam = get_family("wan")
    g = torch.Generator().manual_seed(1)
    inputs = dict(hidden_states=torch.randn(1, 16, 3, 4, 4, generator=g), timestep=torch.tensor([500]),
                  encoder_hidden_states=torch.randn(1, 8, 32, generator=g), return_dict=False)  # fmt: skip
    assert_lora_round_trip(fam, lambda: fam.load_transformer(CFG, 32, 16), inputs, tmp_path / "lora", "wan/tiny")


# the one-transformer text-to-video releases (the A14B pair's recipe: test_wan22.py; image-to-video: test_wan_i2v.py)
PUBLISHED = sorted(
    p
    for p in (REPO / "configs" / "pipelines" / "published").glob("wan*.yaml")
    if not {"a14b", "i2v"} & set(p.stem.split("-"))
)


@pytest.mark.parametrize("recipe", PUBLISHED, ids=[p.stem for p in PUBLISHED])
def test_released_weights_recipes_follow_the_authors(recipe: Path) -> None:
    cfg = load_config(recipe)
    fam, m, p = get_family("wan"), cfg.model, cfg.train.parallel
    assert all(c.pretrained for c in (m.vae, m.text_encoder, m.transformer)), "a finetune names every weight file"
    # the authors' generate.py / configs: 81 frames at 480P for Wan2.1, 121 at 704x1280 and 24 fps for TI2V-5B
    frames, size, fps = (121, (704, 1280), 24) if recipe.stem.startswith("wan2.2") else (81, (480, 832), 16)
    assert m.max_text_length == 512 and cfg.data.num_frames == frames and (cfg.data.height, cfg.data.width) == size
    assert cfg.train.nproc_per_node == 8 and p.dp_shard * p.cp * p.tp * p.dp_replicate == 8
    heads = get_variant("wan", recipe.stem).components["transformer"].kwargs["num_attention_heads"]
    assert p.cp_mode != "ulysses" or heads % p.cp == 0
    assert fam.frame_count_error(cfg.data.num_frames) is None
    vae = get_variant("wan", recipe.stem).components["vae"].kwargs
    multiple = vae.get("scale_factor_spatial", fam.spatial_compression) * 2  # the VAE's factor x 2x2 patches
    assert cfg.data.height % multiple == 0 and cfg.data.width % multiple == 0
    assert (cfg.eval.guidance_scale, cfg.eval.num_inference_steps, cfg.eval.fps, cfg.data.target_fps) == (
        5.0, 50, fps, fps)  # fmt: skip
