"""HunyuanVideo 1.5 text-to-video (`hunyuanvideo15`): the objective against the authors' train.py, the two cached text
encodings against `HunyuanVideo15Pipeline`, training, generation, LoRA in peft's format, the frame and size rules,
the released-weights recipe and FSDP2 on two ranks.

The released transformer layout is held by tests/engines/models/test_fact_tables.py against a table written from the
authors' module through diffusers' conversion script (docs/fidelity/ref_hunyuanvideo15_facts.py), and the parameter
count by test_variants.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import ClassifierFreeGuidance, HunyuanVideo15Pipeline
from flowspeed.configs import LoraConfig, ModelConfig, load_config
from flowspeed.datasets_prep.demo import render_clip
from flowspeed.engines.models import get_family
from flowspeed.engines.models.hunyuanvideo15 import (
    GLYPH_LENGTH,
    GUIDANCE_SCALE,
    NUM_FRAMES,
    SAMPLE_STEPS,
    SYSTEM_MESSAGE,
    TEXT_LENGTH,
    TRAIN_EPS,
    TRIM_MULTIPLE,
    crop_start,
    shifted,
    trim_text_padding,
)
from flowspeed.engines.models.variants import get_variant
from flowspeed.engines.torch_engine.lora import apply_lora, load_adapter, save_adapter
from torch import nn

from tests.conftest import REPO
from tests.engines.models.family_checks import mean_loss, train_steps

TEXT_LEN = 96
CFG = ModelConfig(family="hunyuanvideo15", max_text_length=TEXT_LEN)
CAPTIONS = ['a red circle moving right past a sign that says "STOP"', "a blue square moving down"]

# docs/fidelity/ref_hunyuanvideo15_loss.py, printed by Tencent-Hunyuan/HunyuanVideo-1.5@60783e7 train.py's own
# TimestepSampler (lognorm), timestep_transform (shift 3) and LinearInterpolationSchedule: u -> (model timestep, loss
# of the probe pred = 0.3 x_t + 0.5 t / 1000 against eps - x0) for x0 = 1.5 N(0, 1) (seed 7), eps (seed 8)
AUTHORS = {
    -2.5: (197.6151580810547, 3.940206527709961),
    -0.3: (689.6788330078125, 3.010002613067627),
    0.0: (750.0, 2.9153432846069336),
    0.7: (857.9780883789062, 2.756464958190918),
    3.0: (983.6719360351562, 2.5885961055755615),
}


class _Probe(nn.Module):
    """The reference's "model": pred = 0.3 x_t + 0.5 t / 1000, called as the family calls the transformer (x_t is the
    first 32 of the 65 input channels; the rest is the zero condition)."""

    config = type("Config", (), {"image_embed_dim": 8})()

    def forward(self, hidden_states, timestep, image_embeds, return_dict=False, **text):  # noqa: ANN001, ANN003, ANN201
        assert image_embeds.shape[1] == 0 and not hidden_states[:, 32:].any()  # no vision tokens, zero condition
        return (0.3 * hidden_states[:, :32] + 0.5 * timestep.float().view(-1, 1, 1, 1, 1) / 1000,)


@pytest.fixture(scope="module")
def parts() -> dict:
    """What prep caches for two 9-frame 32x32 demo clips with the tiny VAE and text encoders, and the models."""
    fam = get_family("hunyuanvideo15")
    clips = np.stack([render_clip("circle", "red", "black", "from left to right", 32, 32, 9),
                      render_clip("square", "blue", "grey", "from top to bottom", 32, 32, 9)])  # fmt: skip
    vae = fam.load_vae(CFG)
    toks, encs = fam.load_text_encoder(CFG)
    with torch.no_grad():
        params = fam.encode_video(vae, torch.from_numpy(clips))
        text = fam.encode_text(toks, encs, CAPTIONS, TEXT_LEN)
    scaling = torch.full((2,), float(vae.config.scaling_factor))
    batch = {"latent_params": params, "scaling_factor": scaling, **text}
    return {"batch": batch, "vae": vae, "toks": toks, "encs": encs, "clips": torch.from_numpy(clips)}


def _model() -> nn.Module:
    return get_family("hunyuanvideo15").load_transformer(CFG, 32, 32)


def test_objective_equals_the_authors_train_py() -> None:
    fam = get_family("hunyuanvideo15")
    x0 = 1.5 * torch.randn(1, 32, 2, 2, 2, generator=torch.Generator().manual_seed(7))
    eps = torch.randn(x0.shape, generator=torch.Generator().manual_seed(8))
    text = {"text_embeds": torch.zeros(1, 4, 8), "text_mask": torch.ones(1, 4),
            "text_embeds_2": torch.zeros(1, 4, 8), "text_mask_2": torch.zeros(1, 4)}  # fmt: skip
    for u, (timestep, loss) in AUTHORS.items():
        sigma = shifted(torch.sigmoid(torch.tensor([u])) * (1 - 2 * TRAIN_EPS) + TRAIN_EPS)
        assert 1000 * sigma.item() == pytest.approx(timestep, rel=1e-6)
        assert fam.flow_loss(_Probe(), x0, eps, sigma, text).item() == pytest.approx(loss, rel=1e-6), u
    # the check can fail: the sampling shift (5) in place of the training shift (3) moves the loss by > 1%
    sigma5 = shifted(torch.sigmoid(torch.tensor([0.0])), shift=5.0)
    assert abs(fam.flow_loss(_Probe(), x0, eps, sigma5, text).item() - AUTHORS[0.0][1]) > 0.01 * AUTHORS[0.0][1]


def test_text_cache_is_what_the_pipeline_encodes(parts: dict) -> None:
    """Both cached encodings equal `HunyuanVideo15Pipeline.encode_prompt` run with the export's settings (the text
    length recorded on the tokenizer, the crop computed for it): train == inference."""
    fam, (tok, glyph_tok), (qwen, glyph) = get_family("hunyuanvideo15"), parts["toks"], parts["encs"]
    text = parts["batch"]
    pipe = HunyuanVideo15Pipeline(text_encoder=qwen, tokenizer=tok, transformer=_model(), vae=parts["vae"],
                                  scheduler=fam.sample_scheduler(CFG), text_encoder_2=glyph, tokenizer_2=glyph_tok,
                                  guider=ClassifierFreeGuidance())  # fmt: skip
    pipe.tokenizer_max_length, pipe.prompt_template_encode_start_idx = TEXT_LEN, crop_start(tok, SYSTEM_MESSAGE)
    with torch.no_grad():
        embeds, mask, embeds_2, mask_2 = pipe.encode_prompt(CAPTIONS, device=torch.device("cpu"), batch_size=2)
    for ours, theirs in ((text["text_embeds"], embeds), (text["text_mask"], mask), (text["text_embeds_2"], embeds_2),
                         (text["text_mask_2"], mask_2)):  # fmt: skip
        torch.testing.assert_close(ours, theirs, rtol=0, atol=0)
    # the crop leaves the caption itself first (the template's prefix gone), as the authors' crop after "user\n"
    first = tok.decode(
        tok.apply_chat_template(
            [{"role": "system", "content": SYSTEM_MESSAGE}, {"role": "user", "content": CAPTIONS[1]}],
            add_generation_prompt=True,
            tokenize=True,
            return_dict=True,
        )["input_ids"][pipe.prompt_template_encode_start_idx :]
    )
    assert first.startswith(CAPTIONS[1] + "<|im_end|>")
    # ByT5 sees the quoted text as the authors format it, and nothing for a caption without quotes
    assert text["text_mask_2"][0].sum() == len(glyph_tok('Text "STOP". ')["input_ids"])
    assert text["text_embeds_2"].shape == (2, GLYPH_LENGTH, glyph.config.d_model)
    assert text["text_mask_2"][1].sum() == 0 and not text["text_embeds_2"][1].any()


def test_latents_and_frame_and_size_rules(parts: dict) -> None:
    fam, vae = get_family("hunyuanvideo15"), parts["vae"]
    params = parts["batch"]["latent_params"]
    assert params.shape == (2, 64, 3, 2, 2)  # 32 channels' mean ++ logvar; 9 frames -> 3, 32 px -> 2 (16x)
    x = parts["clips"][:1].permute(0, 4, 1, 2, 3).float() / 127.5 - 1.0
    with torch.no_grad():
        torch.testing.assert_close(params[:1], vae.encode(x).latent_dist.parameters)  # one clip alone: the same
    assert fam.frame_count_error(121) is None and "4k+1" in fam.frame_count_error(120)
    with pytest.raises(ValueError, match="multiples of 16"):
        fam.encode_video(vae, torch.zeros(1, 9, 40, 32, 3, dtype=torch.uint8))
    with pytest.raises(ValueError, match="4k\\+1"):
        fam.encode_video(vae, torch.zeros(1, 8, 32, 32, 3, dtype=torch.uint8))
    assert fam.latent_frame_count(121) == 31 and fam.latent_frame_count(120) is None  # prep's buckets


def test_training_inputs_predict_as_the_pipelines_do(parts: dict) -> None:
    """The authors train text-to-video with no vision tokens; the pipeline feeds 729 all-zero ones, masked out, and
    every text token up to the padded lengths. The family's empty `image_embeds` and text cut after the batch's last
    real token (`trim_text_padding`) give the pipeline's prediction."""
    model, text = _model().eval(), parts["batch"]
    trimmed = trim_text_padding(text)
    glyphs = len(parts["toks"][1]('Text "STOP". ')["input_ids"])  # the longest glyph text in the batch
    rounded = -(-glyphs // TRIM_MULTIPLE) * TRIM_MULTIPLE  # cut after the last real token, rounded up for CP
    assert trimmed["text_embeds"].shape[1] < TEXT_LEN and trimmed["text_embeds_2"].shape[1] == rounded
    assert trimmed["text_embeds"].shape[1] % TRIM_MULTIPLE == 0 and trimmed["text_mask_2"][:, glyphs:].sum() == 0
    assert trim_text_padding({**text, "text_mask_2": torch.zeros(2, GLYPH_LENGTH)})["text_embeds_2"].shape[1] == 0
    x = torch.randn(2, 65, 3, 2, 2, generator=torch.Generator().manual_seed(0))

    def predict(image_tokens: int, t: dict[str, torch.Tensor]) -> torch.Tensor:
        with torch.no_grad():
            return model(
                hidden_states=x, timestep=torch.tensor([700.0, 300.0]), image_embeds=torch.zeros(2, image_tokens, 16),
                encoder_hidden_states=t["text_embeds"], encoder_attention_mask=t["text_mask"],
                encoder_hidden_states_2=t["text_embeds_2"], encoder_attention_mask_2=t["text_mask_2"],
                return_dict=False,
            )[0]  # fmt: skip

    torch.testing.assert_close(predict(0, trimmed), predict(729, text), rtol=1e-5, atol=1e-6)
    # the check can fail: a real token cut off changes the prediction
    last = int(text["text_mask"].bool().any(0).nonzero().max())  # the batch's last real prompt token
    cut = {**trimmed, "text_embeds": trimmed["text_embeds"][:, :last], "text_mask": trimmed["text_mask"][:, :last]}
    assert not torch.allclose(predict(0, cut), predict(729, text), atol=1e-4)


def test_loss_falls_over_twenty_steps(parts: dict) -> None:
    fam, batch = get_family("hunyuanvideo15"), parts["batch"]
    model = _model()
    before = mean_loss(fam, model, None, batch)
    train_steps(fam, model.train(), None, batch, steps=20, lr=3e-3, first_seed=100)
    after = mean_loss(fam, model, None, batch)
    assert after < 0.8 * before, (before, after)


@pytest.fixture(scope="module")
def export(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model exported as a HunyuanVideo15Pipeline folder."""
    folder = tmp_path_factory.mktemp("hv15") / "ckpt"
    get_family("hunyuanvideo15").save_pretrained(folder, CFG, _model())
    return folder


def test_generate_returns_the_requested_shape(export: Path) -> None:
    fam = get_family("hunyuanvideo15")
    index = json.loads((export / "model_index.json").read_text())
    assert index["_class_name"] == "HunyuanVideo15Pipeline" and index["guider"][1] == "ClassifierFreeGuidance"
    assert json.loads((export / "guider" / "guider_config.json").read_text())["guidance_scale"] == 6.0
    assert json.loads((export / "scheduler" / "scheduler_config.json").read_text())["shift"] == 5.0
    tokenizer = json.loads((export / "tokenizer" / "tokenizer_config.json").read_text())
    assert tokenizer["model_max_length"] == TEXT_LEN  # what generate pads prompts to, as the cache was
    kw = dict(num_frames=5, height=32, width=48, steps=2, guidance_scale=6.0, seed=0, device=torch.device("cpu"))
    videos = fam.generate(export, ['a sign that says "HI"', "a blue square"], **kw)
    assert videos.shape == (2, 5, 32, 48, 3) and videos.dtype == np.uint8
    unguided = fam.generate(export, ['a sign that says "HI"'], **{**kw, "guidance_scale": 1.0})  # the guider's scale
    assert not np.array_equal(unguided[0], videos[0])
    with pytest.raises(ValueError, match="text-to-video"):
        fam.generate(export, ["a"], images=[np.zeros((32, 48, 3), np.uint8)], **kw)
    with pytest.raises(ValueError, match="4k\\+1"):
        fam.generate(export, ["a"], **{**kw, "num_frames": 8})
    with pytest.raises(ValueError, match="multiples of 16"):
        fam.generate(export, ["a"], **{**kw, "width": 40})


def test_released_folder_loads_back_and_keeps_its_own_sampler(export: Path, parts: dict) -> None:
    """The `pretrained:` route a released HunyuanVideo-1.5-Diffusers folder takes (the text encoder from the root,
    both encoders and tokenizers; the rest by subfolder), exercised on our own export: every weight and the cached
    text come back, and the release's own scheduler is kept (720p ships shift 9.0, not the 480p 5.0)."""
    fam = get_family("hunyuanvideo15")
    config = export / "scheduler" / "scheduler_config.json"
    saved = json.loads(config.read_text())
    parts_cfg = {"vae": {"pretrained": str(export), "subfolder": "vae"}, "text_encoder": {"pretrained": str(export)},
                 "transformer": {"pretrained": str(export), "subfolder": "transformer"}}  # fmt: skip
    cfg = ModelConfig.model_validate({"family": "hunyuanvideo15", "max_text_length": TEXT_LEN, **parts_cfg})
    again, model = fam.load_transformer(cfg, 0, 0), _model()
    assert all(torch.equal(v, again.state_dict()[k]) for k, v in model.state_dict().items())
    toks, encs = fam.load_text_encoder(cfg)
    with torch.no_grad():
        text = fam.encode_text(toks, encs, CAPTIONS, TEXT_LEN)
    for name, tensor in text.items():
        torch.testing.assert_close(tensor, parts["batch"][name], rtol=0, atol=0)
    assert fam.glyph_width(cfg) == 32 and fam.load_vae(cfg).config.latent_channels == 32
    try:
        config.write_text(json.dumps({**saved, "shift": 9.0}))
        assert fam.sample_scheduler(cfg).config.shift == 9.0
    finally:
        config.write_text(json.dumps(saved))
    with pytest.raises(ValueError, match="remove subfolder"):
        fam.load_text_encoder(cfg.model_copy(update={"text_encoder": cfg.transformer}))


def test_lora_adapts_every_linear_and_reloads_exactly_in_peft_format(tmp_path: Path) -> None:
    """The authors' LoRA default is peft's "all-linear": every nn.Linear of the transformer is adapted, nothing else
    trains; the adapter saved in peft's layout and loaded onto a fresh model gives the same output bit for bit."""
    fam, lora = get_family("hunyuanvideo15"), LoraConfig(enabled=True, rank=4)
    linears = {n for n, m in _model().named_modules() if isinstance(m, nn.Linear)}
    model = apply_lora(_model(), lora, fam.lora_targets).eval()
    adapted = {n.removesuffix(".lora_A") for n, _ in model.named_modules() if n.endswith(".lora_A")}
    assert {n.removeprefix("base_model.model.") for n in adapted} == linears
    assert all("lora_" in n for n, p in model.named_parameters() if p.requires_grad)
    for n, p in model.named_parameters():
        if "lora_B" in n:  # B starts at zero: give the adapters an effect to check
            torch.nn.init.normal_(p, std=0.1, generator=torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(1)
    inputs = dict(hidden_states=torch.randn(1, 65, 2, 2, 2, generator=g), timestep=torch.tensor([500.0]),
                  encoder_hidden_states=torch.randn(1, 6, 32, generator=g), encoder_attention_mask=torch.ones(1, 6),
                  encoder_hidden_states_2=torch.randn(1, 4, 32, generator=g), encoder_attention_mask_2=torch.ones(1, 4),
                  image_embeds=torch.zeros(1, 0, 16), return_dict=False)  # fmt: skip
    with torch.no_grad():
        out, base = model(**inputs)[0], _model().eval()(**inputs)[0]
    save_adapter(model, tmp_path / "lora", "hunyuanvideo15/tiny")
    config = json.loads((tmp_path / "lora" / "adapter_config.json").read_text())
    assert (
        config["peft_type"] == "LORA"
        and config["r"] == 4
        and (tmp_path / "lora" / "adapter_model.safetensors").is_file()
    )
    again = load_adapter(apply_lora(_model(), lora, fam.lora_targets), tmp_path / "lora")
    with torch.no_grad():
        assert torch.equal(again.eval()(**inputs)[0], out)
    assert not torch.allclose(base, out, atol=1e-4)


def test_released_weights_recipe_follows_the_authors() -> None:
    recipe = REPO / "configs" / "pipelines" / "published" / "hunyuanvideo1.5-t2v-480p.yaml"
    cfg = load_config(recipe)
    fam, m, p, t = get_family("hunyuanvideo15"), cfg.model, cfg.train.parallel, cfg.train
    assert all(c.pretrained for c in (m.vae, m.text_encoder, m.transformer)), "a finetune names every weight file"
    assert not m.text_encoder.subfolder  # the root: both text encoders
    # generate.py --video_length 121 at 480p (the pipeline's 640 base: 848x480 for 16:9), 24 fps; 1000 Qwen tokens
    assert (cfg.data.num_frames, cfg.data.height, cfg.data.width, cfg.data.target_fps) == (NUM_FRAMES, 480, 848, 24)
    assert m.max_text_length == TEXT_LENGTH and fam.frame_count_error(cfg.data.num_frames) is None
    assert cfg.data.height % fam.size_multiple == 0 and cfg.data.width % fam.size_multiple == 0
    # train.py defaults: lr 1e-5 constant after 500 warmup steps, weight decay 0.01, clip 1.0, bf16, checkpointing
    assert (t.lr, t.min_lr_ratio, t.warmup_steps, t.weight_decay, t.max_grad_norm) == (1e-5, 1.0, 500, 0.01, 1.0)
    assert t.mixed_precision == "bf16" and t.activation_checkpointing == "full"
    assert t.nproc_per_node == 8 and p.dp_shard * p.cp * p.tp * p.dp_replicate == 8
    heads = get_variant("hunyuanvideo15", recipe.stem).components["transformer"].kwargs["num_attention_heads"]
    assert p.cp == 1 or heads % p.cp == 0
    # PIPELINE_CONFIGS['480p_t2v']: guidance 6, 50 steps
    assert (cfg.eval.guidance_scale, cfg.eval.num_inference_steps, cfg.eval.fps) == (GUIDANCE_SCALE, SAMPLE_STEPS, 24)
