"""HunyuanVideo text-to-video (`hunyuanvideo`): the objective against finetrainers' own numbers, the two text encoders
as `HunyuanVideoPipeline.encode_prompt` computes them (template crop, the Llama layer, the mask that reaches the
transformer, CLIP's pooled output), training, generation, LoRA in peft's format, the released-weights recipe, and
context parallel (Ulysses, ring) and FSDP2 on 2 ranks against one process.

The released layout (transformer) is held by tests/engines/models/test_fact_tables.py against a table written from
the authors' module through diffusers' conversion script (docs/fidelity/ref_hunyuanvideo_facts.py), and the parameter
count by test_variants.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import HunyuanVideoTransformer3DModel
from flowspeed.configs import LoraConfig, ModelConfig, load_config
from flowspeed.datasets_prep.demo import render_clip
from flowspeed.engines.models import get_family, hunyuanvideo
from flowspeed.engines.models.hunyuanvideo import PROMPT_TEMPLATE, prompt_template
from flowspeed.engines.models.registry import seeded_init
from flowspeed.engines.models.variants import get_variant
from flowspeed.engines.torch_engine.lora import apply_lora

from tests.conftest import REPO
from tests.engines.models.family_checks import (
    assert_lora_adapts,
    mean_loss,
    train_steps,
)

TEXT_LEN = 48
CFG = ModelConfig(family="hunyuanvideo", max_text_length=TEXT_LEN)
SCALING = 0.476986  # the released vae/config.json scaling_factor (AutoencoderKLHunyuanVideo's default)

# docs/fidelity/ref_hunyuanvideo_loss.py, printed by a-r-r-o-w/finetrainers@f476c37's HunyuanVideo spec and SFT
# trainer (logit-normal sigmas on FlowMatchEulerDiscreteScheduler()'s grid, guidance 1.0 x 1000), tiny transformer
# seeded 0: seed -> (sigmas, loss)
FINETRAINERS = {
    11: ((0.3240000009536743, 0.125), 1.678974986076355),
    12: ((0.5540000200271606, 0.7990000247955322), 1.6816115379333496),
}
TINY = dict(in_channels=16, out_channels=16, num_attention_heads=2, attention_head_dim=16, num_layers=1,
            num_single_layers=1, num_refiner_layers=1, mlp_ratio=4.0, patch_size=2, patch_size_t=1,
            rope_axes_dim=(4, 6, 6), guidance_embeds=True, text_embed_dim=32, pooled_projection_dim=32)  # fmt: skip


def _reference_batch() -> dict[str, torch.Tensor]:
    """The reference script's inputs, in its draw order."""
    g = torch.Generator().manual_seed(7)
    mean = torch.randn(2, 16, 2, 4, 4, generator=g)
    logvar = -2 + 0.5 * torch.randn(2, 16, 2, 4, 4, generator=g)
    text = torch.randn(2, 8, 32, generator=g)
    pooled = torch.randn(2, 32, generator=g)
    mask = torch.tensor([[1.0] * 8, [1.0] * 3 + [0.0] * 5])
    return {"latent_params": torch.cat([mean, logvar], dim=1), "text_embeds": text, "pooled_embeds": pooled,
            "text_mask": mask, "scaling_factor": torch.full((2,), SCALING)}  # fmt: skip


@pytest.fixture(scope="module")
def batch() -> dict[str, torch.Tensor]:
    """What prep caches for two 9-frame 32x32 demo clips with the tiny VAE, Llama and CLIP."""
    fam = get_family("hunyuanvideo")
    clips = np.stack([render_clip("circle", "red", "black", "from left to right", 32, 32, 9),
                      render_clip("square", "blue", "grey", "from top to bottom", 32, 32, 9)])  # fmt: skip
    tok, enc = fam.load_text_encoder(CFG)
    vae = fam.load_vae(CFG)
    with torch.no_grad():
        params = fam.encode_video(vae, torch.from_numpy(clips))
        text = fam.encode_text(tok, enc, ["a red circle moving right", "a blue square"], TEXT_LEN)
    return {"latent_params": params, **text, "scaling_factor": torch.full((2,), vae.config.scaling_factor)}


def test_objective_equals_finetrainers_hunyuanvideo_trainer(monkeypatch: pytest.MonkeyPatch) -> None:
    fam = get_family("hunyuanvideo")
    scheduler = fam.load_scheduler(CFG)
    with seeded_init(0):
        model = HunyuanVideoTransformer3DModel(**TINY).eval()
    data = _reference_batch()
    for seed, (sigmas, loss) in FINETRAINERS.items():
        idx = (torch.sigmoid(torch.randn(2, generator=torch.Generator().manual_seed(seed))) * 1000).long()
        torch.testing.assert_close(scheduler.sigmas[idx], torch.tensor(sigmas), rtol=0, atol=0)
        with torch.no_grad():
            ours = fam.training_loss(model, scheduler, data, torch.Generator().manual_seed(seed)).item()
        assert ours == pytest.approx(loss, rel=1e-5), seed
    # the checks can fail: the sampling grid (shift 7) as the training grid, or the sampling guidance (6.0) in the
    # embedding, each moves the loss by > 0.1%
    shifted = type(scheduler)(num_train_timesteps=1000, shift=7.0)
    with torch.no_grad():
        wrong = fam.training_loss(model, shifted, data, torch.Generator().manual_seed(11)).item()
    assert abs(wrong - FINETRAINERS[11][1]) > 1e-3 * FINETRAINERS[11][1], wrong
    monkeypatch.setattr(hunyuanvideo, "TRAIN_GUIDANCE", hunyuanvideo.EMBEDDED_GUIDANCE)
    with torch.no_grad():
        wrong = fam.training_loss(model, scheduler, data, torch.Generator().manual_seed(11)).item()
    assert abs(wrong - FINETRAINERS[11][1]) > 1e-3 * FINETRAINERS[11][1], wrong


def test_text_is_encoded_as_the_pipeline_does(batch: dict[str, torch.Tensor]) -> None:
    """The Llama states 2 below the top of the caption in the authors' template, the template cropped off, the
    padding masked (a caption of n tokens: n + the template's closing tokens); CLIP's pooled output beside them."""
    fam = get_family("hunyuanvideo")
    (tok, tok_2), (llama, clip) = fam.load_text_encoder(CFG)
    crop = prompt_template(tok)["crop_start"]
    assert crop == len(PROMPT_TEMPLATE.split("{}")[0].encode())  # the byte-level tokenizer: one token per byte
    ids = tok(PROMPT_TEMPLATE.format("a blue square"), padding="max_length", max_length=crop + TEXT_LEN,
              return_tensors="pt")  # fmt: skip
    with torch.no_grad():
        states = llama(**ids, output_hidden_states=True).hidden_states[-3][:, crop:]
        pooled = clip(tok_2(["a blue square"], padding="max_length", max_length=77, return_tensors="pt")
                      .input_ids).pooler_output  # fmt: skip
    torch.testing.assert_close(batch["text_embeds"][1:], states)
    torch.testing.assert_close(batch["pooled_embeds"][1:], pooled)
    tail = len("a blue square") + len("<|eot_id|>") + 1  # the caption, the template's end, EOS
    assert batch["text_mask"][1].tolist() == [1.0] * tail + [0.0] * (TEXT_LEN - tail)
    assert batch["text_mask"][0].sum() > batch["text_mask"][1].sum()
    # the authors' Llama-3 tokenizer has the header tokens: their crop 95 (hyvideo/constants.py)
    tok.add_special_tokens({"additional_special_tokens": ["<|start_header_id|>"]})
    assert prompt_template(tok)["crop_start"] == 95


def test_the_text_mask_reaches_the_transformer(batch: dict[str, torch.Tensor]) -> None:
    """Training feeds the mask as the pipeline does: states under the padding change nothing, unmasked they would."""
    fam = get_family("hunyuanvideo")
    model = fam.load_transformer(CFG, 32, 16).eval()
    scheduler = fam.load_scheduler(CFG)
    data = {k: v[1:] for k, v in batch.items()}
    noisy = {**data, "text_embeds": data["text_embeds"] + 5.0 * (1 - data["text_mask"]).unsqueeze(-1)}
    with torch.no_grad():
        base = fam.training_loss(model, scheduler, data, torch.Generator().manual_seed(0))
        same = fam.training_loss(model, scheduler, noisy, torch.Generator().manual_seed(0))
        unmasked = fam.training_loss(model, scheduler, {**noisy, "text_mask": torch.ones_like(data["text_mask"])},
                                     torch.Generator().manual_seed(0))  # fmt: skip
    torch.testing.assert_close(same, base, rtol=1e-5, atol=1e-6)
    assert abs(unmasked.item() - base.item()) > 1e-4


def test_loss_falls_over_twenty_steps(batch: dict[str, torch.Tensor]) -> None:
    fam = get_family("hunyuanvideo")
    scheduler = fam.load_scheduler(CFG)
    model = fam.load_transformer(CFG, batch["text_embeds"].shape[-1], batch["latent_params"].shape[1] // 2)
    before = mean_loss(fam, model, scheduler, batch)
    train_steps(fam, model.train(), scheduler, batch, steps=20, lr=3e-3, first_seed=100)
    after = mean_loss(fam, model, scheduler, batch)
    assert after < 0.8 * before, (before, after)


def test_generate_returns_the_requested_shape(tmp_path: Path) -> None:
    fam = get_family("hunyuanvideo")
    fam.save_pretrained(tmp_path / "ckpt", CFG, fam.load_transformer(CFG, 32, 16))
    tokenizer = json.loads((tmp_path / "ckpt" / "tokenizer" / "tokenizer_config.json").read_text())
    assert tokenizer["model_max_length"] == TEXT_LEN  # what generate encodes prompts to, as the cache was
    index = json.loads((tmp_path / "ckpt" / "model_index.json").read_text())
    assert index["_class_name"] == "HunyuanVideoPipeline" and index["text_encoder_2"][1] == "CLIPTextModel"
    kw = dict(num_frames=5, height=32, width=48, steps=2, guidance_scale=6.0, seed=0, device=torch.device("cpu"))
    videos = fam.generate(tmp_path / "ckpt", ["a red circle", "a blue square"], **kw)
    assert videos.shape == (2, 5, 32, 48, 3) and videos.dtype == np.uint8
    with pytest.raises(ValueError, match="text-to-video"):
        fam.generate(tmp_path / "ckpt", ["a"], images=[np.zeros((32, 48, 3), np.uint8)], **kw)
    with pytest.raises(ValueError, match="4k\\+1"):
        fam.generate(tmp_path / "ckpt", ["a"], **{**kw, "num_frames": 8})
    with pytest.raises(ValueError, match="multiples of 16"):
        fam.generate(tmp_path / "ckpt", ["a"], **{**kw, "height": 40})


def test_released_folder_loads_back_and_keeps_its_own_sampler(tmp_path: Path) -> None:
    """The `pretrained:` route a released diffusers folder takes (vae/, text_encoder/ + tokenizer/, text_encoder_2/
    + tokenizer_2/, transformer/, scheduler/), exercised on our own export: every weight and both text encodings
    come back, the export samples with the authors' shift 7.0, and a re-export keeps a release's own scheduler."""
    fam = get_family("hunyuanvideo")
    model = fam.load_transformer(CFG, 32, 16)
    fam.save_pretrained(tmp_path / "rel", CFG, model)
    config = tmp_path / "rel" / "scheduler" / "scheduler_config.json"
    assert json.loads(config.read_text())["shift"] == 7.0  # hyvideo/config.py --flow-shift
    config.write_text(json.dumps({**json.loads(config.read_text()), "shift": 5.0}))
    parts = {name: {"pretrained": str(tmp_path / "rel"), "subfolder": name} for name in ("vae", "text_encoder",
                                                                                          "transformer")}  # fmt: skip
    cfg = ModelConfig.model_validate({"family": "hunyuanvideo", "max_text_length": TEXT_LEN, **parts})
    again = fam.load_transformer(cfg, 0, 0)
    assert all(torch.equal(v, again.state_dict()[k]) for k, v in model.state_dict().items())
    with torch.no_grad():
        got = fam.encode_text(*fam.load_text_encoder(cfg), ["a cat"], TEXT_LEN)
        ref = fam.encode_text(*fam.load_text_encoder(CFG), ["a cat"], TEXT_LEN)
    assert all(torch.equal(got[k], ref[k]) for k in ("text_embeds", "text_mask", "pooled_embeds"))
    assert fam.load_vae(cfg).config.latent_channels == 16
    assert fam.sample_scheduler(cfg).config.shift == 5.0


def test_lora_adapter_saves_and_reloads_exactly_in_peft_format(tmp_path: Path) -> None:
    fam = get_family("hunyuanvideo")
    g = torch.Generator().manual_seed(1)
    inputs = dict(hidden_states=torch.randn(1, 16, 2, 4, 4, generator=g), timestep=torch.tensor([500]),
                  encoder_hidden_states=torch.randn(1, 6, 32, generator=g), encoder_attention_mask=torch.ones(1, 6),
                  pooled_projections=torch.randn(1, 32, generator=g), guidance=torch.tensor([1000.0]),
                  return_dict=False)  # fmt: skip
    # finetrainers' targets: both streams of the dual-stream blocks (video to_out, text add_*/to_add_out), the
    # single-stream blocks' q/k/v; not the token refiner
    expected = ("transformer_blocks.0.attn.to_out.0.", "transformer_blocks.0.attn.add_k_proj.",
                "transformer_blocks.0.attn.to_add_out.", "single_transformer_blocks.0.attn.to_v.")  # fmt: skip
    assert_lora_adapts(fam, lambda: fam.load_transformer(CFG, 32, 16), inputs, tmp_path / "lora", "hunyuanvideo/tiny",
                       expected)  # fmt: skip
    model = apply_lora(fam.load_transformer(CFG, 32, 16), LoraConfig(enabled=True), fam.lora_targets, fam.lora_exclude)
    adapted = [n for n, _ in model.named_modules() if n.endswith("lora_A")]
    assert adapted and not any(n.startswith("context_embedder.") for n in adapted)


PUBLISHED = sorted((REPO / "configs" / "pipelines" / "published").glob("hunyuanvideo-*.yaml"))


@pytest.mark.parametrize("recipe", PUBLISHED, ids=[p.stem for p in PUBLISHED])
def test_released_weights_recipes_follow_the_authors(recipe: Path) -> None:
    cfg = load_config(recipe)
    fam, m, p = get_family("hunyuanvideo"), cfg.model, cfg.train.parallel
    assert all(c.pretrained for c in (m.vae, m.text_encoder, m.transformer)), "a finetune names every weight file"
    # hyvideo/config.py: --text-len 256, --video-length 129, --video-size 720 1280; 50 steps, embedded guidance 6.0
    assert m.max_text_length == 256 and cfg.data.num_frames == 129 and (cfg.data.height, cfg.data.width) == (720, 1280)
    assert cfg.train.nproc_per_node == 8 and p.dp_shard * p.cp * p.tp * p.dp_replicate == 8
    heads = get_variant("hunyuanvideo", recipe.stem).components["transformer"].kwargs["num_attention_heads"]
    assert p.cp_mode != "ulysses" or heads % p.cp == 0
    assert fam.frame_count_error(cfg.data.num_frames) is None
    assert cfg.data.height % fam.size_multiple == 0 and cfg.data.width % fam.size_multiple == 0
    # the token count splits evenly over CP: 33 x 45 x 80 video tokens, 256 text tokens
    assert (33 * 45 * 80) % p.cp == 0 and m.max_text_length % p.cp == 0
    assert (cfg.eval.guidance_scale, cfg.eval.num_inference_steps) == (6.0, 50)
    # finetrainers' HunyuanVideo example: LoRA rank 32 / alpha 32, lr 3e-5, weight decay 1e-4, grad norm 1.0
    lora = cfg.train.lora
    assert (lora.enabled, lora.rank, lora.alpha, cfg.train.lr) == (True, 32, 32.0, 3e-5)
    assert (cfg.train.weight_decay, cfg.train.max_grad_norm) == (1e-4, 1.0)
