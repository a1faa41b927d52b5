"""LTX-Video text-to-video (`ltx`): the objective against LTX-Video-Trainer's own numbers, the latent normalisation
against diffusers' `LTXPipeline`, training, generation, LoRA in peft's format and the released-weights recipes.

The released layouts (transformer, VAE, T5) are held by tests/engines/models/test_fact_tables.py and the parameter
counts by test_variants.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import LTXPipeline, LTXVideoTransformer3DModel
from flowspeed.configs import ModelConfig, load_config
from flowspeed.datasets_prep.demo import render_clip
from flowspeed.engines.models import get_family
from flowspeed.engines.models.ltx import token_shift
from flowspeed.engines.models.registry import seeded_init

from tests.conftest import REPO
from tests.engines.models.family_checks import (
    assert_lora_round_trip,
    mean_loss,
    train_steps,
)

TEXT_LEN = 16
CFG = ModelConfig(family="ltx", max_text_length=TEXT_LEN)

# docs/fidelity/ref_ltx_loss.py, printed by Lightricks/LTX-Video-Trainer@31b1273's sampler and StandardTrainingStrategy
SHIFTS = {8: 0.5861979166666665, 1024: 0.95, 4096: 2.05, 32760: 12.313802083333334}
# seed -> (first_frame_conditioning_p, sigmas, loss) with the tiny diffusers transformer seeded 0
TRAINER = {
    11: (0.0, (0.789817750453949, 0.9263636469841003), 3.841742992401123),
    12: (1.0, (0.5920349359512329, 0.3117899000644684), 3.8035972118377686),
}
TINY = dict(in_channels=128, out_channels=128, num_attention_heads=2, attention_head_dim=16, cross_attention_dim=32,
            caption_channels=32, num_layers=2)  # fmt: skip


@pytest.fixture(scope="module")
def batch() -> dict[str, torch.Tensor]:
    """What prep caches for two 9-frame 64x64 demo clips with the tiny VAE and T5."""
    fam = get_family("ltx")
    clips = np.stack([render_clip("circle", "red", "black", "from left to right", 64, 64, 9),
                      render_clip("square", "blue", "grey", "from top to bottom", 64, 64, 9)])  # fmt: skip
    tok, enc = fam.load_text_encoder(CFG)
    with torch.no_grad():
        params = fam.encode_video(fam.load_vae(CFG), torch.from_numpy(clips))
        text = fam.encode_text(tok, enc, ["a red circle moving right", "a blue square"], TEXT_LEN)
    return {"latent_params": params, **text, "clips": torch.from_numpy(clips)}


def test_objective_equals_ltx_video_trainers() -> None:
    fam = get_family("ltx")
    for n, shift in SHIFTS.items():
        assert token_shift(n) == pytest.approx(shift, rel=1e-12)
    with seeded_init(0):
        model = LTXVideoTransformer3DModel(**TINY).eval()
    g = torch.Generator().manual_seed(7)
    x0 = 1.5 * torch.randn(2, 128, 2, 2, 2, generator=g)
    text = torch.randn(2, 8, 32, generator=g)
    mask = torch.tensor([[1.0] * 8, [1.0] * 3 + [0.0] * 5])
    for seed, (p, sigmas, loss) in TRAINER.items():
        g = torch.Generator().manual_seed(seed)  # the trainer's global-RNG order: the logit-normal draw, then eps
        sigma = torch.sigmoid(torch.randn(2, generator=g) + token_shift(8))
        noise = torch.randn(2, 8, 128, generator=g).view(2, 2, 2, 2, 128).permute(0, 4, 1, 2, 3)  # unpacked
        torch.testing.assert_close(sigma, torch.tensor(sigmas), rtol=1e-6, atol=0)
        with torch.no_grad():
            ours = fam.flow_loss(model, x0, noise, sigma, p == 1.0, text, mask).item()
        assert ours == pytest.approx(loss, rel=1e-5), seed
    # the checks can fail: a fixed shift of 1.0 (no token-count line) moves the sigmas by > 5%, and leaving the first
    # frame noised and in the loss (no conditioning) moves the conditioned case's loss by > 0.1%
    g = torch.Generator().manual_seed(11)
    assert not torch.allclose(torch.sigmoid(torch.randn(2, generator=g) + 1.0), torch.tensor(TRAINER[11][1]), rtol=0.05)
    g = torch.Generator().manual_seed(12)
    sigma = torch.sigmoid(torch.randn(2, generator=g) + token_shift(8))
    noise = torch.randn(2, 8, 128, generator=g).view(2, 2, 2, 2, 128).permute(0, 4, 1, 2, 3)
    with torch.no_grad():
        moved = fam.flow_loss(model, x0, noise, sigma, False, text, mask).item()
    assert abs(moved - TRAINER[12][2]) > 1e-3 * TRAINER[12][2], moved


def test_latents_are_normalised_as_ltx_pipeline_does(batch: dict[str, torch.Tensor]) -> None:
    fam = get_family("ltx")
    vae = fam.load_vae(CFG)
    assert (vae.spatial_compression_ratio, vae.temporal_compression_ratio) == (32, 8)  # the released VAE's factors
    g = torch.Generator().manual_seed(0)  # release-like statistics (the tiny preset's buffers are 0 and 1)
    vae.latents_mean.copy_(torch.randn(128, generator=g))
    vae.latents_std.copy_(torch.rand(128, generator=g) + 0.5)
    vae.register_to_config(scaling_factor=0.7)
    x = batch["clips"].permute(0, 4, 1, 2, 3).float() / 127.5 - 1.0
    with torch.no_grad():
        mu, logvar = vae.encode(x).latent_dist.parameters.chunk(2, dim=1)  # (B, 128, 2, 2, 2): 9 frames -> 2
        ours_mu, ours_logvar = fam.encode_video(vae, batch["clips"]).chunk(2, dim=1)
    torch.testing.assert_close(ours_mu, LTXPipeline._normalize_latents(mu, vae.latents_mean, vae.latents_std, 0.7))
    torch.testing.assert_close(ours_logvar, logvar + 2 * torch.log(0.7 / vae.latents_std.view(1, -1, 1, 1, 1)))
    back = LTXPipeline._denormalize_latents(ours_mu, vae.latents_mean, vae.latents_std, 0.7)
    torch.testing.assert_close(back, mu, rtol=1e-5, atol=1e-5)  # what the pipeline undoes before decoding
    assert fam.frame_count_error(89) is None and "8k+1" in fam.frame_count_error(85)
    assert fam.latent_frame_count(121) == 16 and fam.latent_frame_count(17) == 3


def test_loss_falls_over_twenty_steps(batch: dict[str, torch.Tensor]) -> None:
    fam = get_family("ltx")
    model = fam.load_transformer(CFG, batch["text_embeds"].shape[-1], batch["latent_params"].shape[1] // 2)
    data = {k: batch[k] for k in ("latent_params", "text_embeds", "text_mask")}

    before = mean_loss(fam, model, None, data)
    train_steps(fam, model.train(), None, data, steps=20, lr=1e-2, first_seed=100)
    after = mean_loss(fam, model, None, data)
    assert after < 0.85 * before, (before, after)


def test_generate_returns_the_requested_shape(tmp_path: Path) -> None:
    fam = get_family("ltx")
    fam.save_pretrained(tmp_path / "ckpt", CFG, fam.load_transformer(CFG, 32, 128))
    tokenizer = json.loads((tmp_path / "ckpt" / "tokenizer" / "tokenizer_config.json").read_text())
    assert tokenizer["model_max_length"] == TEXT_LEN  # what generate pads prompts to, as the cache was
    assert json.loads((tmp_path / "ckpt" / "model_index.json").read_text())["_class_name"] == "LTXPipeline"
    kw = dict(num_frames=9, height=32, width=64, steps=2, guidance_scale=3.0, seed=0, device=torch.device("cpu"))
    videos = fam.generate(tmp_path / "ckpt", ["a red circle", "a blue square"], **kw)
    assert videos.shape == (2, 9, 32, 64, 3) and videos.dtype == np.uint8
    with pytest.raises(ValueError, match="text-to-video"):
        fam.generate(tmp_path / "ckpt", ["a"], images=[np.zeros((32, 64, 3), np.uint8)], **kw)
    with pytest.raises(ValueError, match="8k\\+1"):
        fam.generate(tmp_path / "ckpt", ["a"], **{**kw, "num_frames": 5})
    with pytest.raises(ValueError, match="multiples of 32"):
        fam.generate(tmp_path / "ckpt", ["a"], **{**kw, "height": 48})


def test_released_folder_loads_back_and_keeps_its_own_sampler(tmp_path: Path) -> None:
    """The `pretrained:` route a released LTX-Video diffusers folder takes (vae/, text_encoder/ + tokenizer/,
    transformer/, scheduler/), exercised on our own export: every weight comes back, the export's sampler is the
    authors' (token-count shift 0.95..2.05, terminal 0.1), and a re-export keeps a release's own scheduler."""
    fam = get_family("ltx")
    model = fam.load_transformer(CFG, 32, 128)
    fam.save_pretrained(tmp_path / "rel", CFG, model)
    config = tmp_path / "rel" / "scheduler" / "scheduler_config.json"
    ours = json.loads(config.read_text())
    assert (ours["use_dynamic_shifting"], ours["base_shift"], ours["max_shift"], ours["shift_terminal"]) == (
        True, 0.95, 2.05, 0.1)  # fmt: skip
    config.write_text(json.dumps({**ours, "max_shift": 1.5}))
    parts = {name: {"pretrained": str(tmp_path / "rel"), "subfolder": name} for name in ("vae", "text_encoder",
                                                                                          "transformer")}  # fmt: skip
    cfg = ModelConfig.model_validate({"family": "ltx", "max_text_length": TEXT_LEN, **parts})
    again = fam.load_transformer(cfg, 0, 0)
    assert all(torch.equal(v, again.state_dict()[k]) for k, v in model.state_dict().items())
    tok, enc = fam.load_text_encoder(cfg)
    ref_tok, ref_enc = fam.load_text_encoder(CFG)
    with torch.no_grad():
        got = fam.encode_text(tok, enc, ["a cat"], TEXT_LEN)
        ref = fam.encode_text(ref_tok, ref_enc, ["a cat"], TEXT_LEN)
    assert all(torch.equal(got[k], ref[k]) for k in ("text_embeds", "text_mask"))
    assert fam.load_vae(cfg).config.latent_channels == 128
    assert fam.sample_scheduler(cfg).config.max_shift == 1.5


def test_lora_adapter_saves_and_reloads_exactly_in_peft_format(tmp_path: Path) -> None:
    fam = get_family("ltx")
    g = torch.Generator().manual_seed(1)
    inputs = dict(hidden_states=torch.randn(1, 8, 128, generator=g), timestep=torch.tensor([500]),
                  encoder_hidden_states=torch.randn(1, 6, 32, generator=g), encoder_attention_mask=torch.ones(1, 6),
                  num_frames=2, height=2, width=2, return_dict=False)  # fmt: skip
    assert_lora_round_trip(fam, lambda: fam.load_transformer(CFG, 32, 128), inputs, tmp_path / "lora", "ltx/tiny")


PUBLISHED = sorted((REPO / "configs" / "pipelines" / "published").glob("ltx*.yaml"))


@pytest.mark.parametrize("recipe", PUBLISHED, ids=[p.stem for p in PUBLISHED])
def test_released_weights_recipes_follow_the_authors(recipe: Path) -> None:
    cfg = load_config(recipe)
    fam, m, p = get_family("ltx"), cfg.model, cfg.train.parallel
    assert all(c.pretrained for c in (m.vae, m.text_encoder, m.transformer)), "a finetune names every weight file"
    # LTX-Video-Trainer configs/ltxv_2b_full.yaml: validation video_dims [768, 448, 89], guidance 3.5, 50 steps
    assert m.max_text_length == 256 and cfg.data.num_frames == 89 and (cfg.data.height, cfg.data.width) == (448, 768)
    assert cfg.train.nproc_per_node == 8 and p.dp_shard * p.cp * p.tp * p.dp_replicate == 8
    assert fam.frame_count_error(cfg.data.num_frames) is None
    assert cfg.data.height % fam.size_multiple == 0 and cfg.data.width % fam.size_multiple == 0
    assert (cfg.eval.guidance_scale, cfg.eval.num_inference_steps, cfg.data.target_fps) == (3.5, 50, 24)
