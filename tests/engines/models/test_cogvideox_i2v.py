"""CogVideoX image-to-video (1.0 and 1.5 layouts) and CogVideoX 1.5 text-to-video.

Training must see what `CogVideoXImageToVideoPipeline` / `CogVideoXPipeline` build at inference: the
image latent (frame 0 encoded alone, zero-padded over the clip) on the input channels, and for 1.5
an even latent frame count, padded at the front.
"""

import statistics
from pathlib import Path

import flowspeed.engines.models.cogvideox15  # noqa: F401  (registers cogvideox1.5)
import flowspeed.engines.models.cogvideox_i2v  # noqa: F401  (registers cogvideox_i2v)
import numpy as np
import pytest
import torch
from diffusers import CogVideoXImageToVideoPipeline
from flowspeed.configs import ComponentConfig, LoraConfig, ModelConfig, PipelineConfig, load_config
from flowspeed.datasets_prep.cache import CachedLatents, collate
from flowspeed.datasets_prep.demo import render_clip
from flowspeed.datasets_prep.prep import run_prep
from flowspeed.engines.common.io import read_jsonl
from flowspeed.engines.launch import launch
from flowspeed.engines.models import get_family
from flowspeed.engines.models.cogvideox import encode_pixels, to_pixels
from flowspeed.engines.models.cogvideox_i2v import image_condition, noised_first_frame
from flowspeed.engines.torch_engine.lora import apply_lora, load_adapter, merge, save_adapter
from flowspeed.evaluation.common import trained_model
from flowspeed.evaluation.run import run_eval

from tests.conftest import REPO

CASES = [("cogvideox_i2v", "tiny"), ("cogvideox_i2v", "tiny-1.5"), ("cogvideox1.5", "tiny-1.5")]
IDS = ["i2v-1.0", "i2v-1.5", "t2v-1.5"]
TEXT_LEN = 32


def _model_cfg(family: str, preset: str) -> ModelConfig:
    return ModelConfig(family=family, max_text_length=TEXT_LEN, transformer=ComponentConfig(preset=preset))


def _clips() -> torch.Tensor:
    """Two 9-frame 64x64 demo clips: (2, 9, 64, 64, 3) uint8."""
    a = render_clip("circle", "red", "black", "from left to right", 64, 64, 9)
    b = render_clip("square", "blue", "grey", "from top to bottom", 64, 64, 9)
    return torch.from_numpy(np.stack([a, b]))


def _batch(family: str, cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """What prep caches and the engine batches: latent_params, text_embeds, the VAE's scale."""
    fam = get_family(family)
    vae = fam.load_vae(cfg)
    tok, enc = fam.load_text_encoder(cfg)
    with torch.no_grad():
        params = fam.encode_video(vae, _clips())
        text = fam.encode_text(tok, enc, ["a red circle moving right", "a blue square moving down"], TEXT_LEN)
    scale = torch.full((2,), float(vae.config.scaling_factor))
    return {"latent_params": params, "text_embeds": text, "scaling_factor": scale, "shift_factor": torch.zeros(2)}


def _mean_loss(family: str, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> float:
    fam = get_family(family)
    scheduler = fam.load_scheduler(ModelConfig(family=family))
    with torch.no_grad():
        return statistics.mean(
            fam.training_loss(model.eval(), scheduler, batch, torch.Generator().manual_seed(s)).item() for s in range(8)
        )


def _inputs(model: torch.nn.Module, frames: int = 3, seed: int = 0) -> dict:
    """Transformer inputs of the right width; `frames` latent frames (1.5: padded to even)."""
    c, g = model.config, torch.Generator().manual_seed(seed)
    frames += frames % (c.patch_size_t or 1)
    ofs = None if c.ofs_embed_dim is None else torch.tensor([2.0])
    rotary = get_family("cogvideox")._rotary(model, (1, frames, 0, 8, 8), torch.device("cpu"))
    return dict(hidden_states=torch.randn(1, frames, c.in_channels, 8, 8, generator=g),
                encoder_hidden_states=torch.randn(1, TEXT_LEN, 32, generator=g), timestep=torch.tensor([500]),
                ofs=ofs, image_rotary_emb=rotary)  # fmt: skip


@pytest.mark.parametrize(("family", "preset"), CASES, ids=IDS)
def test_loss_falls_on_a_fixed_batch(family: str, preset: str) -> None:
    cfg = _model_cfg(family, preset)
    batch = _batch(family, cfg)
    fam = get_family(family)
    model = fam.load_transformer(cfg, batch["text_embeds"].shape[-1], batch["latent_params"].shape[1] // 2)
    assert model.config.in_channels == (8 if family == "cogvideox_i2v" else 4)
    before = _mean_loss(family, model, batch)
    opt, scheduler = torch.optim.AdamW(model.parameters(), lr=3e-3), fam.load_scheduler(cfg)
    model.train()
    for step in range(20):
        loss = fam.training_loss(model, scheduler, batch, torch.Generator().manual_seed(100 + step))
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = _mean_loss(family, model, batch)
    assert after < 0.9 * before


@pytest.mark.parametrize("preset", ["tiny", "tiny-1.5"])
def test_training_conditions_on_the_latents_the_pipeline_builds(preset: str) -> None:
    cfg = _model_cfg("cogvideox_i2v", preset)
    fam = get_family("cogvideox_i2v")
    vae, clips = fam.load_vae(cfg), _clips()
    with torch.no_grad():
        params = fam.encode_video(vae, clips)  # (2, 2*Cz, 3+1, 8, 8)
        noised = noised_first_frame(clips)
        alone = encode_pixels(vae, noised)
    assert params.shape == (2, 8, 4, 8, 8)
    assert torch.equal(params[:, :, -1:], alone)  # the (noised) image's own encoding, as the pipeline makes it
    sigma = (noised - to_pixels(clips[:, :1])).flatten(1).std(1)  # exp(N(-3, 0.5)): ~0.05, a clip's own draw
    assert ((sigma > 0.005) & (sigma < 0.5)).all() and sigma[0] != sigma[1]
    assert torch.equal(noised_first_frame(clips[1:]), noised[1:])  # per clip, whatever the batch
    assert not torch.allclose(params[:, :, :1], alone, atol=1e-2)  # not the clip's first latent frame

    batch = _batch("cogvideox_i2v", cfg)
    batch["latent_params"][:, 4:, -1] = -30.0  # image posterior std ~0: its sample is its mean
    model = fam.load_transformer(cfg, batch["text_embeds"].shape[-1], 4)
    seen = {}
    model.register_forward_pre_hook(lambda m, a, kw: seen.update(kw), with_kwargs=True)
    fam.training_loss(model, fam.load_scheduler(cfg), batch, torch.Generator().manual_seed(0))
    cond = seen["hidden_states"][:, :, 4:]  # (B, F, Cz, 8, 8)

    pipe = CogVideoXImageToVideoPipeline(None, None, vae, model, fam.load_scheduler(cfg))
    with torch.no_grad():
        _, expected = pipe.prepare_latents(
            torch.zeros(2, 3, 64, 64), 2, 4, 9 + (4 if preset == "tiny-1.5" else 0), 64, 64, torch.float32, "cpu"
        )  # the pipeline adds 4 pixel frames per padding latent frame before calling this
    assert cond.shape == expected.shape == (2, 4 if preset == "tiny-1.5" else 3, 4, 8, 8)
    assert cond[:, 1:].abs().sum() == 0 and expected[:, 1:].abs().sum() == 0
    image_mean = batch["latent_params"][:, :4, -1] * vae.config.scaling_factor
    torch.testing.assert_close(cond[:, 0], image_mean, atol=1e-5, rtol=1e-5)
    assert (seen["ofs"] is None) == (preset == "tiny")
    assert torch.equal(image_condition(cond[:, :1], 5)[:, :1], cond[:, :1])


def test_vae_with_inverted_image_scale_conditions_as_the_pipeline_does() -> None:
    """A VAE with `invert_scale_latents` (the pipeline divides its image latent by the scaling factor):
    the cached image posterior is stored so that training's usual `* scale` still yields z / scale."""
    cfg = _model_cfg("cogvideox_i2v", "tiny")
    fam = get_family("cogvideox_i2v")
    vae = fam.load_vae(cfg)
    vae.register_to_config(invert_scale_latents=True)
    s, clips = float(vae.config.scaling_factor), _clips()
    with torch.no_grad():
        params = fam.encode_video(vae, clips)
        alone = encode_pixels(vae, noised_first_frame(clips))  # (2, 8, 1, 8, 8)
    params[:, 4:, -1] = -30.0  # image posterior std ~0: its sample is its mean
    batch = {**_batch("cogvideox_i2v", cfg), "latent_params": params}
    model = fam.load_transformer(cfg, batch["text_embeds"].shape[-1], 4)
    seen = {}
    model.register_forward_pre_hook(lambda m, a, kw: seen.update(kw), with_kwargs=True)
    fam.training_loss(model, fam.load_scheduler(cfg), batch, torch.Generator().manual_seed(0))
    torch.testing.assert_close(seen["hidden_states"][:, 0, 4:], alone[:, :4, 0] / s, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(("family", "preset"), CASES, ids=IDS)
def test_save_reload_gives_identical_outputs(family: str, preset: str, tmp_path: Path) -> None:
    fam, cfg = get_family(family), _model_cfg(family, preset)
    model = fam.load_transformer(cfg, 32, 4).eval()
    fam.save_pretrained(tmp_path / "ckpt", cfg, model)
    loaded = cfg.model_copy(
        update={"transformer": ComponentConfig(preset=None, pretrained=str(tmp_path / "ckpt"), subfolder="transformer")}
    )
    again = fam.load_transformer(loaded, 0, 0).eval()
    reloaded = again.state_dict()
    assert all(torch.equal(v, reloaded[k]) for k, v in model.state_dict().items())  # every weight, bit for bit
    with torch.no_grad():  # the same weights; kernels may still sum in another order (seen: 3.6e-7)
        torch.testing.assert_close(model(**_inputs(model), return_dict=False)[0],
                                   again(**_inputs(model), return_dict=False)[0], atol=1e-6, rtol=1e-6)  # fmt: skip
    if family == "cogvideox1.5":  # a text-to-video transformer is refused by the I2V family, with the fix
        with pytest.raises(ValueError, match="not an image-to-video transformer"):
            get_family("cogvideox_i2v").load_transformer(loaded, 0, 0)


@pytest.mark.parametrize(("family", "preset"), CASES, ids=IDS)
def test_lora_adapters_apply_reload_and_merge(family: str, preset: str, tmp_path: Path) -> None:
    fam, cfg = get_family(family), _model_cfg(family, preset)
    lora = LoraConfig(enabled=True, rank=4)
    model = apply_lora(fam.load_transformer(cfg, 32, 4), lora, fam.lora_targets).eval()
    assert all("lora_" in n for n, p in model.named_parameters() if p.requires_grad)
    for n, p in model.named_parameters():
        if "lora_B" in n:  # B starts at zero: give the adapters an effect to check
            torch.nn.init.normal_(p, std=0.1, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        adapted = model(**_inputs(model), return_dict=False)[0]
        base = fam.load_transformer(cfg, 32, 4).eval()(**_inputs(model), return_dict=False)[0]
    save_adapter(model, tmp_path / "lora", f"{fam.name}/tiny")
    again = load_adapter(apply_lora(fam.load_transformer(cfg, 32, 4), lora, fam.lora_targets), tmp_path / "lora")
    merged = merge(model)
    assert not any("lora" in k for k in merged.state_dict())
    with torch.no_grad():
        assert torch.equal(again.eval()(**_inputs(model), return_dict=False)[0], adapted)
        torch.testing.assert_close(merged(**_inputs(model), return_dict=False)[0], adapted, atol=1e-5, rtol=0)
    assert not torch.allclose(base, adapted, atol=1e-4)


@pytest.mark.parametrize(("family", "preset"), CASES, ids=IDS)
def test_generate_returns_videos_of_the_requested_shape(family: str, preset: str, tmp_path: Path) -> None:
    fam, cfg = get_family(family), _model_cfg(family, preset)
    fam.save_pretrained(tmp_path / "ckpt", cfg, fam.load_transformer(cfg, 32, 4))
    kw = dict(num_frames=9, height=32, width=48, steps=2, guidance_scale=1.0, seed=0, device=torch.device("cpu"))
    plain = fam.generate(tmp_path / "ckpt", ["a red circle", "a blue square"], **kw)
    assert plain.shape == (2, 9, 32, 48, 3) and plain.dtype == np.uint8
    if family == "cogvideox_i2v":
        img = render_clip("circle", "red", "black", "from left to right", 96, 64, 1)[0]  # any size: resized
        cond = fam.generate(tmp_path / "ckpt", ["a red circle"], images=[img], **kw)
        assert cond.shape == (1, 9, 32, 48, 3) and cond.dtype == np.uint8
        assert not np.array_equal(cond[0], plain[0])  # the image, not the grey default, conditioned it
        with pytest.raises(ValueError, match="one image per prompt"):
            fam.generate(tmp_path / "ckpt", ["a", "b"], images=[img], **kw)


@pytest.mark.parametrize("family", ["cogvideox_i2v", "cogvideox1.5"])
def test_bad_frame_count_is_refused_with_the_rule(family: str, tmp_path: Path, demo_manifest: Path) -> None:
    fam = get_family(family)
    assert "4k+1" in fam.frame_count_error(8) and fam.frame_count_error(9) is None
    assert fam.frame_count_error(13) is None  # 4 latent frames: even already, no 1.5 padding
    quick = REPO / "configs" / "quickstart.yaml"
    overrides = [f"data.manifest={demo_manifest}", f"model.family={family}", "data.num_frames=8"]
    with pytest.raises(ValueError, match=r"data\.num_frames.*4k\+1"):  # refused when the config loads ...
        load_config(quick, overrides, workdir=tmp_path)
    cfg = load_config(quick, overrides, workdir=tmp_path, check=False)
    with pytest.raises(ValueError, match=r"data\.num_frames: .*4k\+1 frames \(e\.g\. 5 or 9\)"):  # ... and by prep
        run_prep(cfg)


def _fixed_noise_loss(cfg: PipelineConfig, model: torch.nn.Module) -> float:
    samples = read_jsonl(cfg.prep_dir / "samples.jsonl")
    batch = collate([CachedLatents(cfg.cache_dir, samples)[i] for i in range(len(samples))])
    return _mean_loss(cfg.model.family, model, batch)


@pytest.mark.parametrize("preset", ["tiny", "tiny-1.5"])
def test_i2v_prep_train_eval_on_demo_data(preset: str, tmp_path: Path, demo_manifest: Path) -> None:
    cfg = load_config(REPO / "configs" / "pipelines" / "cogvideox_i2v-i2v.yaml",
                      [f"data.manifest={demo_manifest}", f"model.transformer.preset={preset}", "data.max_samples=2",
                       "train.max_steps=20", "train.batch_size=2", "train.val_fraction=0", "train.lr=3e-3",
                       "eval.prompts=[a red circle]"], workdir=tmp_path)  # fmt: skip
    res = run_prep(cfg)
    rec = read_jsonl(Path(res.samples))[0]
    assert rec["latent_shape"] == [8, 3 + 1, 8, 8]  # 9 frames -> 3 latent frames, then the image's own
    fam = get_family("cogvideox_i2v")
    before = _fixed_noise_loss(cfg, fam.load_transformer(cfg.model, 32, 4))
    out = launch(cfg, None, None)
    after = _fixed_noise_loss(cfg, trained_model(cfg, Path(out.final_dir)))
    assert after < 0.9 * before
    assert CogVideoXImageToVideoPipeline.from_pretrained(out.final_dir).transformer.config.in_channels == 8
    ev = run_eval(cfg)  # eval passes no images: the grey default frame conditions the videos
    (video,) = ev.videos
    assert Path(video).suffix == ".mp4" and Path(video).stat().st_size > 0
