"""Hunyuan-DiT and Kolors: prep -> train -> eval on the demo data through their recipes, save/reload, LoRA
adapter and merged exports, and generation through their diffusers pipelines."""

import math
import statistics
from pathlib import Path

import flowspeed.engines.models.hunyuandit  # noqa: F401  (registers the family)
import flowspeed.engines.models.kolors  # noqa: F401
import numpy as np
import pytest
import torch
from flowspeed.configs import ComponentConfig, PipelineConfig, load_config
from flowspeed.datasets_prep.cache import CachedLatents, collate
from flowspeed.datasets_prep.prep import run_prep
from flowspeed.engines.common.io import read_jsonl
from flowspeed.engines.export import plain_model
from flowspeed.engines.launch import launch
from flowspeed.engines.models.registry import get_family
from flowspeed.engines.models.variants import family_summary
from flowspeed.engines.torch_engine import checkpoint as ckpt
from flowspeed.engines.torch_engine.lora import load_adapter
from flowspeed.evaluation.common import trained_model
from flowspeed.evaluation.run import run_eval
from PIL import Image
from safetensors.torch import load_file

from tests.conftest import REPO

# family -> (recipe, cached tensors, text_embeds shape): BERT 77 tokens (+ mT5 256 beside it) / ChatGLM 256.
FAMILIES = {
    "hunyuandit": (
        "hunyuandit-t2i.yaml",
        ["latent_params", "text_embeds", "text_embeds_t5", "text_mask", "text_mask_t5"],
        [77, 32],
    ),
    "kolors": ("kolors-t2i.yaml", ["latent_params", "pooled_embeds", "text_embeds"], [256, 32]),
}
PROMPT = "a red circle"


def recipe_config(family: str, workdir: Path, manifest: Path, *overrides: str) -> PipelineConfig:
    return load_config(REPO / "configs" / "pipelines" / FAMILIES[family][0],
                       [f"data.manifest={manifest}", "data.max_samples=2", "train.val_fraction=0", *overrides],
                       workdir=workdir)  # fmt: skip


def cached_batch(cfg: PipelineConfig) -> dict[str, torch.Tensor]:
    samples = read_jsonl(cfg.prep_dir / "samples.jsonl")
    return collate([CachedLatents(cfg.cache_dir, samples)[i] for i in range(len(samples))])


def fixed_noise_losses(cfg: PipelineConfig, model: torch.nn.Module, seeds: int = 8) -> list[float]:
    fam, batch = get_family(cfg.model.family), cached_batch(cfg)
    with torch.no_grad():
        return [fam.training_loss(model.eval(), fam.load_scheduler(cfg.model), batch,
                                  torch.Generator().manual_seed(s)).item() for s in range(seeds)]  # fmt: skip


def denoiser_output(cfg: PipelineConfig, model: torch.nn.Module) -> torch.Tensor:
    """What the denoiser returns inside the family's training loss on the cached batch, fixed noise."""
    seen: list[torch.Tensor] = []
    hook = model.register_forward_hook(lambda _m, _a, out: seen.append(out[0]))
    try:
        fixed_noise_losses(cfg, model, seeds=1)
    finally:
        hook.remove()
    return seen[0]  # (B, C or 2C, h, w)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_prep_train_eval_on_the_demo_data(family: str, tmp_path: Path, demo_manifest: Path) -> None:
    # 2 samples, batch 2: every step sees the same batch, so 20 steps must bring its loss down.
    cfg = recipe_config(family, tmp_path, demo_manifest, "train.max_steps=20", "train.lr=5e-3",
                        "train.batch_size=2", "train.checkpoint_every=20", f"eval.prompts=[{PROMPT}]",
                        "eval.num_inference_steps=2")  # fmt: skip
    rec = read_jsonl(Path(run_prep(cfg).samples))[0]
    assert rec["tensors"] == FAMILIES[family][1]
    assert rec["latent_shape"] == [8, 8, 8] and rec["text_shape"] == FAMILIES[family][2]
    fam = get_family(family)
    before = statistics.mean(fixed_noise_losses(cfg, fam.load_transformer(cfg.model, 32, 4)))
    out = launch(cfg, None, None)
    assert len(out.losses) == 20 and all(math.isfinite(x) for x in out.losses)
    after = statistics.mean(fixed_noise_losses(cfg, trained_model(cfg, Path(out.final_dir))))
    assert after < 0.9 * before, (before, after)
    (png,) = run_eval(cfg).videos
    with Image.open(png) as img:
        assert img.size == (64, 64)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_save_reload_and_generate(family: str, tmp_path: Path) -> None:
    fam = get_family(family)
    cfg = PipelineConfig().model.model_copy(update={"family": family, "max_text_length": 16})
    tokenizers, encoders = fam.load_text_encoder(cfg)
    with torch.no_grad():
        text = fam.encode_text(tokenizers, encoders, [PROMPT, "x"], 16)
    model = fam.load_transformer(cfg, text["text_embeds"].shape[-1], 4)
    root = fam.save_pretrained(tmp_path / family, cfg, model)
    loaded = cfg.model_copy(update={
        "vae": ComponentConfig(pretrained=str(root), subfolder="vae"),
        "text_encoder": ComponentConfig(pretrained=str(root)),
        "transformer": ComponentConfig(pretrained=str(root), subfolder=fam.denoiser_subfolder),
    })  # fmt: skip
    with torch.no_grad():
        again = fam.encode_text(*fam.load_text_encoder(loaded), [PROMPT, "x"], 16)
        assert text.keys() == again.keys() and all(torch.equal(text[k], again[k]) for k in text)
        frames = torch.randint(0, 256, (2, 1, 64, 64, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
        latents = [fam.encode_video(v, frames) for v in (fam.load_vae(cfg), fam.load_vae(loaded))]
        assert torch.equal(*latents)
        batch = {"latent_params": latents[0], "scaling_factor": torch.full((2,), 0.13025), **text}
        reloaded = fam.load_transformer(loaded, 0, 0)
        losses = [fam.training_loss(m.eval(), fam.load_scheduler(cfg), batch, torch.Generator().manual_seed(1))
                  for m in (model, reloaded)]  # fmt: skip
    assert torch.isfinite(losses[0]) and torch.equal(*losses)
    videos = fam.generate(root, [PROMPT, "x"], num_frames=1, height=64, width=64, steps=2, guidance_scale=4.0,
                          seed=0, device=torch.device("cpu"))  # fmt: skip
    assert videos.shape == (2, 1, 64, 64, 3) and videos.dtype == np.uint8
    assert fam.frame_count_error(9) and fam.frame_count_error(1) is None
    assert family_summary(family)["tasks"][:2] == ["t2i", "pretrain"]  # the tiny build on meta works too


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_lora_exports_adapter_and_merged_model(family: str, tmp_path: Path, demo_manifest: Path) -> None:
    cfg = recipe_config(family, tmp_path, demo_manifest, "train.max_steps=3", "train.checkpoint_every=3",
                        "train.lora.enabled=true", "train.lora.rank=2", "train.lr=1e-2")  # fmt: skip
    run_prep(cfg)
    final = Path(launch(cfg, None, None).final_dir)
    adapter = load_file(str(final / "lora" / "adapter_model.safetensors"))
    assert adapter and all("lora_" in k for k in adapter)  # the adapter alone
    fam = get_family(family)
    args = {"text_embed_dim": 32, "latent_channels": 4}
    trained = plain_model(fam, cfg, args)
    ckpt.load_model_weights(ckpt.latest(cfg.train_dir), trained)
    reloaded = load_adapter(plain_model(fam, cfg, args), final / "lora")
    merged = trained_model(cfg, final)
    assert not any("lora" in k for k in merged.state_dict())
    y_trained = denoiser_output(cfg, trained)
    assert torch.equal(denoiser_output(cfg, reloaded), y_trained)
    assert torch.allclose(denoiser_output(cfg, merged), y_trained, atol=1e-5)
    assert not torch.allclose(denoiser_output(cfg, fam.load_transformer(cfg.model, **args)), y_trained, atol=1e-4)
