"""The image families (SD3, Flux, SDXL): the same prep, engine and eval as CogVideoX, with their own encoders."""

import statistics
from pathlib import Path

import pytest
import torch
from flowspeed.configs import ComponentConfig, PipelineConfig, load_config
from flowspeed.datasets_prep.cache import CachedLatents, collate
from flowspeed.datasets_prep.prep import run_prep
from flowspeed.engines.common.io import read_jsonl
from flowspeed.engines.launch import launch
from flowspeed.engines.models import get_family
from flowspeed.evaluation.common import trained_model
from flowspeed.evaluation.run import run_eval
from PIL import Image

from tests.conftest import REPO

# family -> (its quickstart, per-token text width, the cached text tensor shape)
FAMILIES = {
    "sd3": ("sd3-quickstart.yaml", 64, [77 + 64, 64]),
    "flux": ("flux-quickstart.yaml", 64, [64, 64]),
    "sdxl": ("sdxl-quickstart.yaml", 64, [77, 64]),
}


def family_config(family: str, workdir: Path, manifest: Path, *overrides: str) -> PipelineConfig:
    return load_config(REPO / "configs" / FAMILIES[family][0], [f"data.manifest={manifest}", *overrides],
                       workdir=workdir)  # fmt: skip


def _fixed_noise_loss(cfg: PipelineConfig, model: torch.nn.Module) -> float:
    fam = get_family(cfg.model.family)
    samples = read_jsonl(cfg.prep_dir / "samples.jsonl")
    batch = collate([CachedLatents(cfg.cache_dir, samples)[i] for i in range(len(samples))])
    with torch.no_grad():
        return statistics.mean(
            fam.training_loss(model.eval(), fam.load_scheduler(cfg.model), batch, torch.Generator().manual_seed(s))
            .item() for s in range(8)
        )  # fmt: skip


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_image_family_prep_train_eval(family: str, tmp_path: Path, demo_manifest: Path) -> None:
    cfg = family_config(
        family,
        tmp_path,
        demo_manifest,
        "train.max_steps=80",
        "train.val_fraction=0",
        "train.lr=5e-3",
        "data.max_samples=2",
        "train.batch_size=2",
        "eval.prompts=[a red circle]",
    )
    res = run_prep(cfg)
    rec = read_jsonl(Path(res.samples))[0]
    assert rec["tensors"] == ["latent_params", "pooled_embeds", "text_embeds"]
    assert rec["latent_shape"] == [8, 8, 8] and rec["text_shape"] == FAMILIES[family][2]
    assert rec["shift_factor"] == pytest.approx({"sd3": 0.0609, "flux": 0.1159, "sdxl": 0.0}[family])
    fam = get_family(family)
    before = _fixed_noise_loss(cfg, fam.load_transformer(cfg.model, FAMILIES[family][1], 4))
    out = launch(cfg, None, None)
    after = _fixed_noise_loss(cfg, trained_model(cfg, Path(out.final_dir)))
    assert after < 0.9 * before
    ev = run_eval(cfg)
    (png,) = ev.videos
    with Image.open(png) as img:
        assert img.size == (64, 64)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_image_family_loads_what_it_saved_and_refuses_video_frame_counts(family: str, tmp_path: Path) -> None:
    fam = get_family(family)
    cfg = PipelineConfig().model.model_copy(update={"family": family, "max_text_length": 16})
    tr = fam.load_transformer(cfg, 64, 4)
    fam.save_pretrained(tmp_path / family, cfg, tr)
    root = str(tmp_path / family)
    loaded = cfg.model_copy(
        update={
            "vae": ComponentConfig(pretrained=root, subfolder="vae"),
            "text_encoder": ComponentConfig(pretrained=root),
            "transformer": ComponentConfig(pretrained=root, subfolder=fam.denoiser_subfolder),
        }
    )
    a_tok, a_enc = fam.load_text_encoder(cfg)
    b_tok, b_enc = fam.load_text_encoder(loaded)
    with torch.no_grad():
        a = fam.encode_text(a_tok, a_enc, ["a red circle"], 16)
        b = fam.encode_text(b_tok, b_enc, ["a red circle"], 16)
    assert torch.equal(a["text_embeds"], b["text_embeds"]) and torch.equal(a["pooled_embeds"], b["pooled_embeds"])
    t2 = fam.load_transformer(loaded, 0, 0)
    assert all(torch.equal(x, y) for x, y in zip(tr.state_dict().values(), t2.state_dict().values(), strict=True))
    assert fam.frame_count_error(9) and fam.frame_count_error(1) is None


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_image_family_lora_exports_adapter_and_merged_model(family: str, tmp_path: Path, demo_manifest: Path) -> None:
    cfg = family_config(family, tmp_path, demo_manifest, "train.max_steps=3", "data.max_samples=2",
                        "train.val_fraction=0", "train.lora.enabled=true", "train.lora.rank=2")  # fmt: skip
    run_prep(cfg)
    final = Path(launch(cfg, None, None).final_dir)
    assert (final / "lora" / "adapter_model.safetensors").is_file()
    fam = get_family(family)
    merged = cfg.model.model_copy(
        update={"transformer": ComponentConfig(pretrained=str(final), subfolder=fam.denoiser_subfolder)}
    )
    assert not any("lora" in k for k in fam.load_transformer(merged, 0, 0).state_dict())


@pytest.mark.parametrize(("family", "preset"), [("sd3", "tiny-3.5"), ("flux", "tiny-dev")])
def test_architecture_presets_train_save_and_reload(family: str, preset: str, tmp_path: Path) -> None:
    """SD3.5's qk-norm + MMDiT-X dual attention; FLUX dev's guidance embedding."""
    fam = get_family(family)
    cfg = PipelineConfig().model.model_copy(
        update={"family": family, "transformer": ComponentConfig(preset=preset), "max_text_length": 16}
    )
    model = fam.load_transformer(cfg, 64, 4)
    if family == "sd3":
        assert model.transformer_blocks[0].attn2 is not None and model.transformer_blocks[1].attn2 is None
        assert model.transformer_blocks[0].attn.norm_q is not None  # qk-norm
    else:
        assert model.config.guidance_embeds
    g = torch.Generator().manual_seed(0)
    tokens = (77 if family == "sd3" else 0) + 16  # SD3 prepends CLIP's 77 tokens to T5's
    batch = {"latent_params": torch.randn(2, 8, 8, 8, generator=g), "scaling_factor": torch.ones(2),
             "shift_factor": torch.zeros(2), "text_embeds": torch.randn(2, tokens, 64, generator=g),
             "pooled_embeds": torch.randn(2, model.config.pooled_projection_dim, generator=g)}  # fmt: skip
    sched = fam.load_scheduler(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for step in range(20):
        loss = fam.training_loss(model, sched, batch, torch.Generator().manual_seed(step % 2))
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert statistics.mean(losses[-4:]) < 0.8 * statistics.mean(losses[:4])
    fam.save_pretrained(tmp_path, cfg, model)
    again = fam.load_transformer(
        cfg.model_copy(update={"transformer": ComponentConfig(pretrained=str(tmp_path), subfolder="transformer")}), 0, 0
    )
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values(), strict=True))
