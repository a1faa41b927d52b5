"""Wan2.1 image-to-video (`wan_i2v`): the cached training inputs against what `WanImageToVideoPipeline` feeds its
transformer while sampling, training, generation from an image, LoRA in peft's format, the cache round trip of the
image tensors, the config's image encoder and the released-weights recipes.

The released layouts (transformer, CLIP vision tower; the VAE and UMT5 are Wan2.1's) are held by
tests/engines/models/test_fact_tables.py against tables written from the authors' `WanModel(model_type="i2v")` through
diffusers' conversion script (docs/fidelity/ref_wan_i2v_facts.py), and the parameter count by test_variants.py.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import WanImageToVideoPipeline
from flowspeed.configs import ModelConfig, load_config
from flowspeed.datasets_prep.cache import CachedLatents, LatentCache, collate
from flowspeed.datasets_prep.demo import render_clip
from flowspeed.engines.models import get_family
from flowspeed.engines.models.registry import keep_loaded, loaded
from flowspeed.engines.models.variants import get_variant
from flowspeed.engines.models.wan import latent_stats
from flowspeed.engines.models.wan_i2v import I2V_NEGATIVE_PROMPT, SAMPLE_STEPS
from PIL import Image

from tests.conftest import REPO
from tests.engines.models.family_checks import assert_lora_round_trip, mean_loss, train_steps

CFG = ModelConfig(family="wan_i2v", max_text_length=512)  # 512: diffusers' Wan attention splits image tokens before it
CAPTIONS = ["a red circle moving right", "a blue square moving down"]


@pytest.fixture(scope="module")
def prepared() -> dict[str, torch.Tensor]:
    """What prep caches for two 9-frame 32x32 demo clips with the tiny VAE, UMT5 and CLIP."""
    fam = get_family("wan_i2v")
    clips = np.stack([render_clip("circle", "red", "black", "from left to right", 32, 32, 9),
                      render_clip("square", "blue", "grey", "from top to bottom", 32, 32, 9)])  # fmt: skip
    tok, enc = fam.load_text_encoder(CFG)
    with torch.no_grad():
        out = fam.encode_video(fam.load_vae(CFG), torch.from_numpy(clips), image_encoder=fam.load_image_encoder(CFG))
        text = fam.encode_text(tok, enc, CAPTIONS, 512)
    return {**out, "text_embeds": text, "clips": torch.from_numpy(clips)}


@pytest.fixture(scope="module")
def export(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A tiny export, its pipeline loaded once for the module's `generate` calls (as an eval keeps it)."""
    fam = get_family("wan_i2v")
    folder = tmp_path_factory.mktemp("wan_i2v") / "ckpt"
    with keep_loaded():
        yield fam.save_pretrained(folder, CFG, fam.load_transformer(CFG, 32, 16))


def _batch(prepared: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: prepared[k] for k in ("latent_params", "image_condition", "image_embeds", "text_embeds")}


def test_training_inputs_are_what_the_pipeline_feeds_its_transformer(
    prepared: dict[str, torch.Tensor], export: Path
) -> None:
    """Sampling from clip 0's first frame, the transformer's extra channels and image features are the cache's."""
    fam, cpu = get_family("wan_i2v"), torch.device("cpu")
    seen: list[dict] = []
    # the pipeline object `generate` reuses (the fixture keeps it loaded), with a hook on its transformer
    pipe = loaded(lambda: WanImageToVideoPipeline.from_pretrained(export).to(cpu), export, cpu)
    hook = pipe.transformer.register_forward_pre_hook(lambda m, a, kw: seen.append(kw), with_kwargs=True)
    first = prepared["clips"][0, 0].numpy()
    try:
        videos = fam.generate(export, [CAPTIONS[0]], images=[first], num_frames=9, height=32, width=32, steps=1,
                              guidance_scale=1.0, seed=0, device=cpu)  # fmt: skip
    finally:
        hook.remove()
    assert videos.shape == (1, 9, 32, 32, 3) and videos.dtype == np.uint8
    (kw,) = seen
    torch.testing.assert_close(kw["hidden_states"][0, 16:], prepared["image_condition"][0], rtol=0, atol=0)
    torch.testing.assert_close(kw["encoder_hidden_states_image"][0], prepared["image_embeds"][0], rtol=0, atol=0)
    # ... and they are what Wan builds: the frame mask, the normalised VAE mode of [first frame, zeros], CLIP's
    # second-to-last hidden states of the processed frame (computed here without the pipeline)
    cond = prepared["image_condition"]  # (B, 4 + 16, 3, 4, 4)
    assert cond.shape == (2, 20, 3, 4, 4)
    assert torch.all(cond[:, :4, 0] == 1) and torch.all(cond[:, :4, 1:] == 0)
    vae = fam.load_vae(CFG)
    pixels = torch.zeros(2, 3, 9, 32, 32)
    pixels[:, :, 0] = prepared["clips"][:, 0].permute(0, 3, 1, 2).float() / 127.5 - 1
    with torch.no_grad():
        mode = vae.encode(pixels).latent_dist.mode()
    mean, std = latent_stats(vae, mode)
    torch.testing.assert_close(cond[:, 4:], (mode - mean) / std, rtol=1e-4, atol=1e-5)
    clip_0 = prepared["latent_params"][:, :16]
    assert (cond[:, 4:] - clip_0).abs().max() > 1e-2  # not the clip's own latents: frames 1.. are zeros here
    processor, clip = fam.load_image_encoder(CFG)
    inputs = processor(images=[Image.fromarray(f) for f in prepared["clips"][:, 0].numpy()], return_tensors="pt")
    with torch.no_grad():
        states = clip(**inputs, output_hidden_states=True).hidden_states
    torch.testing.assert_close(prepared["image_embeds"], states[-2])
    assert not torch.allclose(prepared["image_embeds"], states[-1])
    # the export: the I2V pipeline with CLIP, the trained text length and the authors' I2V negative prompt
    index = json.loads((export / "model_index.json").read_text())
    assert index["_class_name"] == "WanImageToVideoPipeline" and index["image_encoder"][1] == "CLIPVisionModel"
    assert json.loads((export / "tokenizer" / "tokenizer_config.json").read_text())["model_max_length"] == 512
    assert fam.negative_prompt == I2V_NEGATIVE_PROMPT and I2V_NEGATIVE_PROMPT.startswith("镜头晃动，")


def test_generate_checks_its_inputs(export: Path) -> None:
    fam = get_family("wan_i2v")
    kw = dict(num_frames=5, height=32, width=48, steps=1, guidance_scale=1.0, seed=0, device=torch.device("cpu"))
    videos = fam.generate(export, ["a red circle"], **kw)  # no image: a mid-grey first frame (eval's default)
    assert videos.shape == (1, 5, 32, 48, 3)
    with pytest.raises(ValueError, match="one image per prompt"):
        fam.generate(export, ["a", "b"], images=[np.zeros((32, 48, 3), np.uint8)], **kw)
    with pytest.raises(ValueError, match="4k\\+1"):
        fam.generate(export, ["a"], **{**kw, "num_frames": 8})


def test_a_release_folder_loads_back_through_pretrained(
    export: Path, prepared: dict[str, torch.Tensor], tmp_path: Path
) -> None:
    """The `pretrained:` route a Wan2.1-I2V-14B-*-Diffusers folder takes (image_encoder/ with image_processor/ beside
    it, transformer/, vae/, text_encoder/ + tokenizer/), on our export: the same CLIP features and transformer."""
    fam = get_family("wan_i2v")
    parts = {n: {"pretrained": str(export), "subfolder": n} for n in ("vae", "text_encoder", "image_encoder",
                                                                       "transformer")}  # fmt: skip
    cfg = ModelConfig.model_validate({"family": "wan_i2v", "max_text_length": 512, **parts})
    processor, clip = fam.load_image_encoder(cfg)
    assert processor.crop_size == {"height": 32, "width": 32}  # the tiny preset's, read from image_processor/
    first = [Image.fromarray(f) for f in prepared["clips"][:, 0].numpy()]
    with torch.no_grad():
        states = clip(**processor(images=first, return_tensors="pt"), output_hidden_states=True).hidden_states
    torch.testing.assert_close(states[-2], prepared["image_embeds"], rtol=0, atol=0)
    again, fresh = fam.load_transformer(cfg, 0, 0), fam.load_transformer(CFG, 32, 16)
    assert all(torch.equal(v, again.state_dict()[k]) for k, v in fresh.state_dict().items())
    get_family("wan").load_transformer(ModelConfig(family="wan"), 32, 16).save_pretrained(tmp_path / "t2v")
    t2v = cfg.model_copy(update={"transformer": cfg.transformer.model_copy(update={"pretrained": str(tmp_path / "t2v"),
                                                                                   "subfolder": None})})  # fmt: skip
    with pytest.raises(ValueError, match="not a Wan2.1 image-to-video transformer"):
        fam.load_transformer(t2v, 32, 16)


def test_loss_falls_over_twenty_steps(prepared: dict[str, torch.Tensor]) -> None:
    fam = get_family("wan_i2v")
    scheduler = fam.load_scheduler(CFG)
    model = fam.load_transformer(CFG, 32, 16)
    assert model.config.in_channels == 36 and model.config.image_dim == 32
    batch = _batch(prepared)
    before = mean_loss(fam, model, scheduler, batch)
    train_steps(fam, model.train(), scheduler, batch, steps=20, lr=3e-3, first_seed=100)
    after = mean_loss(fam, model, scheduler, batch)
    assert after < 0.8 * before, (before, after)
    # the condition reaches the loss: zeroing it changes it
    zeroed = {**batch, "image_condition": torch.zeros_like(batch["image_condition"])}
    with torch.no_grad():
        losses = [fam.training_loss(model, scheduler, b, torch.Generator().manual_seed(0)) for b in (batch, zeroed)]
    assert losses[0] != losses[1]


def test_bad_caches_and_transformers_are_refused(prepared: dict[str, torch.Tensor]) -> None:
    fam = get_family("wan_i2v")
    model, scheduler, g = fam.load_transformer(CFG, 32, 16), fam.load_scheduler(CFG), torch.Generator()
    batch = _batch(prepared)
    t2v = {k: batch[k] for k in ("latent_params", "text_embeds")}
    with pytest.raises(ValueError, match="prep it again with model.family: wan_i2v"):
        fam.training_loss(model, scheduler, t2v, g)
    with pytest.raises(ValueError, match="512 text tokens"):
        fam.training_loss(model, scheduler, {**batch, "text_embeds": batch["text_embeds"][:, :64]}, g)
    with pytest.raises(ValueError, match="image_dim"):
        fam.training_loss(model, scheduler, {**batch, "image_embeds": torch.zeros(2, 17, 48)}, g)
    with pytest.raises(ValueError, match="image_encoder="):
        fam.encode_video(fam.load_vae(CFG), prepared["clips"])
    with pytest.raises(ValueError, match="known presets: tiny$"):  # Wan2.2's VAE is TI2V-5B's, not I2V-14B's
        fam.load_vae(CFG.model_copy(update={"vae": CFG.vae.model_copy(update={"preset": "tiny-2.2"})}))


def test_cache_round_trip_keeps_the_image_tensors(prepared: dict[str, torch.Tensor], tmp_path: Path) -> None:
    """Prep's cache stores every name `encode_video` returns and the engine's reader batches them back."""
    cache = LatentCache(tmp_path / "cache")
    names = ("latent_params", "image_condition", "image_embeds", "text_embeds")
    cache.write_shard([({"key": f"k{i}", "latent_shape": list(prepared["latent_params"][i].shape)},
                        {n: prepared[n][i] for n in names}) for i in range(2)])  # fmt: skip
    records = cache.records()
    assert sorted(records[0]["tensors"]) == sorted(names)
    batch = collate([CachedLatents(tmp_path / "cache", records)[i] for i in range(2)])
    for n in names:
        assert torch.equal(batch[n], prepared[n]), n
    assert cache.verify() == []


def test_the_config_gives_the_image_encoder_to_wan_i2v_only() -> None:
    assert ModelConfig(family="wan_i2v").image_encoder.preset == "tiny"  # unset: the tiny preset, as the others
    assert ModelConfig(family="wan").image_encoder is None
    with pytest.raises(ValueError, match="takes no image encoder"):
        ModelConfig(family="wan", image_encoder={"preset": "tiny"})
    assert get_family("wan").load_image_encoder(ModelConfig(family="wan")) is None
    from flowspeed.configs import PipelineConfig

    ident = PipelineConfig.model_validate({"model": {"family": "wan_i2v"}}).encoder_identity()
    pretrained = {"pretrained": "/m", "subfolder": "image_encoder"}
    other = PipelineConfig.model_validate({"model": {"family": "wan_i2v", "image_encoder": pretrained}})
    assert "|image=preset:tiny" in ident and other.encoder_identity() != ident  # cached features follow the encoder


def test_lora_adapter_saves_and_reloads_exactly_in_peft_format(tmp_path: Path) -> None:
    fam = get_family("wan_i2v")
    g = torch.Generator().manual_seed(1)
    inputs = dict(hidden_states=torch.randn(1, 36, 3, 4, 4, generator=g), timestep=torch.tensor([500]),
                  encoder_hidden_states=torch.randn(1, 512, 32, generator=g),
                  encoder_hidden_states_image=torch.randn(1, 17, 32, generator=g), return_dict=False)  # fmt: skip
    assert_lora_round_trip(fam, lambda: fam.load_transformer(CFG, 32, 16), inputs, tmp_path / "lora", "wan_i2v/tiny")


PUBLISHED = sorted((REPO / "configs" / "pipelines" / "published").glob("wan2.1-i2v*.yaml"))


@pytest.mark.parametrize("recipe", PUBLISHED, ids=[p.stem for p in PUBLISHED])
def test_released_weights_recipes_follow_the_authors(recipe: Path) -> None:
    cfg = load_config(recipe)
    fam, m, p = get_family("wan_i2v"), cfg.model, cfg.train.parallel
    parts = (m.vae, m.text_encoder, m.image_encoder, m.transformer)
    assert all(c.pretrained for c in parts), "a finetune names every weight file"
    assert m.image_encoder.subfolder == "image_encoder" and recipe.stem.split("-")[-1].upper() in m.vae.pretrained
    # the authors: 81 frames, 16 fps, 512 tokens at their 480P (480x832) and 720P (720x1280) sizes
    size = {"480p": (480, 832), "720p": (720, 1280)}[recipe.stem.rsplit("-", 1)[-1]]
    assert m.max_text_length == 512 and cfg.data.num_frames == 81 and (cfg.data.height, cfg.data.width) == size
    assert cfg.train.nproc_per_node == 8 and p.dp_shard * p.cp * p.tp * p.dp_replicate == 8
    heads = get_variant("wan_i2v", recipe.stem).components["transformer"].kwargs["num_attention_heads"]
    assert p.cp_mode != "ulysses" or heads % p.cp == 0
    assert fam.frame_count_error(cfg.data.num_frames) is None
    assert cfg.data.height % 16 == 0 and cfg.data.width % 16 == 0  # 8x VAE x 2x2 patches
    assert cfg.train.lr == 1e-5  # DiffSynth-Studio's Wan2.1-I2V-14B full finetune
    assert (cfg.eval.guidance_scale, cfg.eval.num_inference_steps, cfg.eval.fps, cfg.data.target_fps) == (
        5.0, SAMPLE_STEPS, 16, 16)  # fmt: skip
