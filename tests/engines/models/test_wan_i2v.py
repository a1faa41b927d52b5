"""Wan image-to-video (`wan_i2v`): the cached training inputs against what `WanImageToVideoPipeline` feeds its
transformer while sampling, training, generation from an image, LoRA in peft's format, the cache round trip of the
image tensors, the config's image encoder and the released-weights recipes; then Wan2.2 I2V-A14B (no image encoder,
the expert pair split at 0.900, the two-expert export sampled with both).

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
from flowspeed.engines.models.wan import NEGATIVE_PROMPT, NUM_TRAIN_TIMESTEPS, latent_stats
from flowspeed.engines.models.wan_i2v import (
    I2V_A14B_BOUNDARY,
    I2V_A14B_GUIDANCE_HIGH,
    I2V_A14B_GUIDANCE_LOW,
    I2V_A14B_SAMPLE_SHIFT,
    I2V_A14B_SAMPLE_STEPS,
    I2V_NEGATIVE_PROMPT,
    SAMPLE_STEPS,
)
from PIL import Image

from tests.conftest import REPO
from tests.engines.models.family_checks import assert_lora_round_trip, mean_loss, train_steps

CFG = ModelConfig(family="wan_i2v", max_text_length=512)  # 512: diffusers' Wan attention splits image tokens before it
CAPTIONS = ["a red circle moving right", "a blue square moving down"]


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    """Tiny tensors gain nothing from intra-op threads, and on a shared CPU the threads' contention costs 10x."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


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
    with pytest.raises(ValueError, match="not a Wan image-to-video transformer"):
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
    no_features = {k: v for k, v in batch.items() if k != "image_embeds"}  # a Wan2.2 I2V-A14B cache
    with pytest.raises(ValueError, match="cache has no image features, but this transformer takes them"):
        fam.training_loss(model, scheduler, no_features, g)
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
    assert ModelConfig(family="wan_i2v", image_encoder=None).image_encoder is None  # null: none (Wan2.2 I2V-A14B)
    assert ModelConfig.model_validate({"family": "wan_i2v", "image_encoder": None}).image_encoder is None
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


# ---- Wan2.2 I2V-A14B: no image encoder, two experts split at 0.900 -------------------------------------------------
def a14b_cfg(train: str, **model: object) -> ModelConfig:
    """A tiny I2V-A14B pair: `image_encoder: null`, both experts the 2.2 layout (no image embedding) from presets."""
    experts = {"train": train, "other": {"preset": "tiny-2.2"}, "boundary": I2V_A14B_BOUNDARY}
    return ModelConfig.model_validate({"family": "wan_i2v", "max_text_length": 512, "image_encoder": None,
                                       "transformer": {"preset": "tiny-2.2"}, "experts": experts, **model})  # fmt: skip


@pytest.fixture(scope="module")
def a14b_prepared(prepared: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """What prep caches for the same two clips with `model.image_encoder: null` (prep passes encode_video no image
    encoder, as `load_image_encoder` gives none)."""
    fam = get_family("wan_i2v")
    assert fam.load_image_encoder(a14b_cfg("high_noise")) is None
    with torch.no_grad():
        out = fam.encode_video(fam.load_vae(a14b_cfg("high_noise")), prepared["clips"])
    return {**out, "text_embeds": prepared["text_embeds"]}


class _Probe(torch.nn.Module):
    """pred = 0.3 x_t (the noisy-latent channels) + 0.5 t / 1000, called as the I2V loss calls a Wan2.2 I2V transformer
    (no image embedding); records what it is given."""

    def __init__(self) -> None:
        super().__init__()
        self.config = type("Config", (), {"image_dim": None})()
        self.seen: list[tuple[torch.Tensor, torch.Tensor, object]] = []

    def forward(self, hidden_states, timestep, encoder_hidden_states, encoder_hidden_states_image, return_dict=False):  # noqa: ANN001, ANN201
        self.seen.append((hidden_states.clone(), timestep.clone(), encoder_hidden_states_image))
        return (0.3 * hidden_states[:, :16] + 0.5 * timestep.float().view(-1, 1, 1, 1, 1) / 1000,)


def test_a14b_prep_caches_the_condition_alone_and_each_expert_trains_on_its_own_timesteps(
    prepared: dict[str, torch.Tensor], a14b_prepared: dict[str, torch.Tensor]
) -> None:
    fam = get_family("wan_i2v")
    # no CLIP features; the condition (mask + first frame's VAE latents) and the clip's latents are what Wan2.1 caches
    assert sorted(a14b_prepared) == ["image_condition", "latent_params", "text_embeds"]
    for name in ("latent_params", "image_condition"):
        torch.testing.assert_close(a14b_prepared[name], prepared[name], rtol=0, atol=0)
    # the authors' boundary 0.900 on the shift-5 training grid: DiffSynth-Studio's Wan2.2-I2V-A14B.sh
    # --max_timestep_boundary 0.358 (high noise) / --min_timestep_boundary 0.358 (low noise): "timesteps [900, 1000]"
    high, low = fam.load_scheduler(a14b_cfg("high_noise")), fam.load_scheduler(a14b_cfg("low_noise"))
    assert (high.expert_indices, low.expert_indices) == ((0, 358), (358, NUM_TRAIN_TIMESTEPS))
    assert high.timesteps[357] >= 900 > high.timesteps[358]
    batch = {k: a14b_prepared[k] for k in ("latent_params", "image_condition", "text_embeds")}
    for scheduler, is_high in ((high, True), (low, False)):
        probe = _Probe()
        for seed in range(8):
            fam.training_loss(probe, scheduler, batch, torch.Generator().manual_seed(seed))
        ts = torch.cat([t for _, t, _ in probe.seen])
        assert bool((ts >= 900).all()) if is_high else bool((ts < 900).all()), ts
        assert len(set(ts.tolist())) > 4
        for hidden, _, image in probe.seen:  # noisy latents, then the cached condition; no image features
            assert hidden.shape[1] == 36 and image is None
            torch.testing.assert_close(hidden[:, 16:], batch["image_condition"], rtol=0, atol=0)
    # the real tiny expert learns on its own timesteps
    cfg = a14b_cfg("low_noise")
    model = fam.load_transformer(cfg, 32, 16)
    assert (model.config.in_channels, model.config.image_dim, model.config.added_kv_proj_dim) == (36, None, None)
    before = mean_loss(fam, model, low, batch)
    train_steps(fam, model.train(), low, batch, steps=20, lr=3e-3, first_seed=100)
    assert mean_loss(fam, model, low, batch) < 0.8 * before


def test_a14b_export_samples_with_both_experts_from_what_prep_cached(
    a14b_prepared: dict[str, torch.Tensor], prepared: dict[str, torch.Tensor], tmp_path: Path
) -> None:
    fam, cpu = get_family("wan_i2v"), torch.device("cpu")
    cfg = a14b_cfg("low_noise")  # the trained expert goes to transformer_2, the other to transformer
    trained = fam.load_transformer(cfg, 32, 16)
    folder = fam.save_pretrained(tmp_path / "final", cfg, trained)
    index = json.loads((folder / "model_index.json").read_text())
    # Wan-AI/Wan2.2-I2V-A14B-Diffusers' layout (convert_wan_to_diffusers.py): no image encoder, both experts, 0.9
    assert index["_class_name"] == "WanImageToVideoPipeline" and index["boundary_ratio"] == I2V_A14B_BOUNDARY
    assert index["image_encoder"] == [None, None] and index["image_processor"] == [None, None]
    assert index["transformer_2"] == ["diffusers", "WanTransformer3DModel"]
    flow_shift = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())["flow_shift"]
    assert flow_shift == I2V_A14B_SAMPLE_SHIFT == 5.0
    with keep_loaded():  # the pipeline generate loads, with hooks on both experts and on its prompt encoding
        pipe = loaded(lambda: WanImageToVideoPipeline.from_pretrained(folder).to(cpu), folder, cpu)
        assert all(torch.equal(v, pipe.transformer_2.state_dict()[k]) for k, v in trained.state_dict().items())
        seen: dict[str, list] = {"transformer": [], "transformer_2": []}
        for name, calls in seen.items():
            getattr(pipe, name).register_forward_pre_hook(lambda _m, _a, k, c=calls: c.append(k), with_kwargs=True)
        negatives, encode = [], pipe.encode_prompt
        pipe.encode_prompt = lambda *a, **k: negatives.append(k["negative_prompt"]) or encode(*a, **k)
        try:
            videos = fam.generate(folder, [CAPTIONS[0]], images=[prepared["clips"][0, 0].numpy()], num_frames=9,
                                  height=32, width=32, steps=6, guidance_scale=I2V_A14B_GUIDANCE_HIGH, seed=0,
                                  device=cpu)  # fmt: skip
        finally:
            del pipe.encode_prompt
    assert videos.shape == (1, 9, 32, 32, 3) and videos.dtype == np.uint8
    assert seen["transformer"] and seen["transformer_2"], seen  # both experts sampled, split at t = 900
    assert min(float(k["timestep"][0]) for k in seen["transformer"]) >= 900
    assert max(float(k["timestep"][0]) for k in seen["transformer_2"]) < 900
    for kw in seen["transformer"] + seen["transformer_2"]:  # the condition the pipeline builds is prep's
        assert kw["encoder_hidden_states_image"] is None
        torch.testing.assert_close(kw["hidden_states"][0, 16:], a14b_prepared["image_condition"][0], rtol=0, atol=0)
    # the authors' (3.5, 3.5) and shared negative prompt (wan_i2v_A14B.py), not Wan2.1 I2V's
    assert (pipe._guidance_scale, pipe._guidance_scale_2) == (I2V_A14B_GUIDANCE_HIGH, I2V_A14B_GUIDANCE_LOW)
    assert negatives == [NEGATIVE_PROMPT] and NEGATIVE_PROMPT != I2V_NEGATIVE_PROMPT


def test_a14b_both_experts_train_in_one_run_on_the_image_condition(
    a14b_prepared: dict[str, torch.Tensor], tmp_path: Path
) -> None:
    """`experts.train: both` (wan.py's `WanExpertPair`) through the I2V loss: each call runs one expert on its own
    timesteps with the cached condition on channels, and the export holds both as trained."""
    from diffusers import WanTransformer3DModel

    fam, cfg = get_family("wan_i2v"), a14b_cfg("both")
    pair, scheduler = fam.load_transformer(cfg, 32, 16), fam.load_scheduler(cfg)
    assert scheduler.expert_ranges == {"high_noise": (0, 358), "low_noise": (358, NUM_TRAIN_TIMESTEPS)}
    seen: dict[str, list] = {"transformer": [], "transformer_2": []}
    for name, calls in seen.items():
        getattr(pair, name).register_forward_pre_hook(lambda _m, _a, k, c=calls: c.append(k), with_kwargs=True)
    batch = {k: a14b_prepared[k] for k in ("latent_params", "image_condition", "text_embeds")}
    opt = torch.optim.AdamW(pair.parameters(), lr=1e-3)
    for seed in range(6):
        fam.training_loss(pair.train(), scheduler, batch, torch.Generator().manual_seed(seed)).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    assert seen["transformer"] and seen["transformer_2"]
    for name, calls in seen.items():
        for kw in calls:
            high = bool((kw["timestep"] >= 900).all())
            assert high if name == "transformer" else not bool((kw["timestep"] >= 900).any())
            assert kw["encoder_hidden_states_image"] is None and kw["hidden_states"].shape[1] == 36
            torch.testing.assert_close(kw["hidden_states"][:, 16:], batch["image_condition"], rtol=0, atol=0)
    folder = fam.save_pretrained(tmp_path / "final", cfg, pair)
    assert json.loads((folder / "model_index.json").read_text())["boundary_ratio"] == I2V_A14B_BOUNDARY
    for slot in ("transformer", "transformer_2"):
        saved = WanTransformer3DModel.from_pretrained(folder / slot).state_dict()
        assert all(torch.equal(v, saved[k]) for k, v in getattr(pair, slot).state_dict().items()), slot


def test_a14b_image_encoder_and_cache_mismatches_are_refused(
    prepared: dict[str, torch.Tensor], export: Path, tmp_path: Path
) -> None:
    fam = get_family("wan_i2v")
    with pytest.raises(ValueError, match="no image embedding .* set model.image_encoder: null"):
        fam.load_image_encoder(a14b_cfg("high_noise", image_encoder={"preset": "tiny"}))  # prep refuses a CLIP
    wan21 = {"family": "wan_i2v", "image_encoder": None, "transformer": {"pretrained": str(export),
                                                                         "subfolder": "transformer"}}  # fmt: skip
    with pytest.raises(ValueError, match="model.image_encoder is null, but this transformer takes image features"):
        fam.load_image_encoder(ModelConfig.model_validate(wan21))  # read from the release's config.json, at prep
    with pytest.raises(ValueError, match="model.image_encoder is null, but this transformer takes image features"):
        fam.load_transformer(a14b_cfg("high_noise", transformer={"preset": "tiny"}), 32, 16)
    model, scheduler = fam.load_transformer(a14b_cfg("high_noise"), 32, 16), fam.load_scheduler(a14b_cfg("high_noise"))
    wan21_cache = {k: prepared[k] for k in ("latent_params", "image_condition", "image_embeds", "text_embeds")}
    with pytest.raises(ValueError, match="holds image features, but this transformer has no image embedding"):
        fam.training_loss(model, scheduler, wan21_cache, torch.Generator())
    mixed = a14b_cfg("high_noise", experts={"train": "high_noise", "other": {"preset": "tiny"}, "boundary": 0.9})
    with pytest.raises(ValueError, match="the two experts' image embeddings differ"):
        fam.save_pretrained(tmp_path / "mixed", mixed, model)


def test_released_a14b_recipe_follows_the_authors() -> None:
    cfg = load_config(REPO / "configs" / "pipelines" / "published" / "wan2.2-i2v-a14b.yaml")
    fam, m, p, e = get_family("wan_i2v"), cfg.model, cfg.train.parallel, cfg.model.experts
    assert m.image_encoder is None and "|image=" not in cfg.encoder_identity()  # no CLIP in Wan2.2 I2V
    assert all(c.pretrained for c in (m.vae, m.text_encoder, m.transformer, e.other)), "a finetune names every weight"
    # Wan-Video/Wan2.2 wan/configs/wan_i2v_A14B.py boundary 0.900, 40 steps, guidance (3.5, 3.5); shared_config.py 81
    # frames, 16 fps, 512 tokens; SUPPORTED_SIZES['i2v-A14B'] has 480*832
    assert e.boundary == I2V_A14B_BOUNDARY and e.train in ("high_noise", "low_noise")
    assert {m.transformer.subfolder, e.other.subfolder} == {"transformer", "transformer_2"}
    assert m.transformer.pretrained == e.other.pretrained
    assert (m.transformer.subfolder == "transformer") == (e.train == "high_noise")  # the release's slot of each
    assert m.max_text_length == 512 and cfg.data.num_frames == 81 and (cfg.data.height, cfg.data.width) == (480, 832)
    assert (cfg.eval.guidance_scale, cfg.eval.num_inference_steps, cfg.eval.fps, cfg.data.target_fps) == (
        I2V_A14B_GUIDANCE_HIGH, I2V_A14B_SAMPLE_STEPS, 16, 16)  # fmt: skip
    assert cfg.train.lr == 1e-5  # DiffSynth-Studio's Wan2.2-I2V-A14B full finetune
    assert cfg.train.nproc_per_node == 8 and p.dp_shard * p.cp * p.tp * p.dp_replicate == 8
    variant = get_variant("wan_i2v", "wan2.2-i2v-a14b")
    assert variant.components["transformer"] == variant.components["transformer_2"]
    assert variant.components["transformer"].kwargs.get("image_dim") is None and "image_encoder" not in (
        variant.components)  # fmt: skip
    assert p.cp_mode != "ulysses" or variant.components["transformer"].kwargs["num_attention_heads"] % p.cp == 0
    assert fam.frame_count_error(cfg.data.num_frames) is None
    assert cfg.data.height % fam.size_multiple == 0 and cfg.data.width % fam.size_multiple == 0
