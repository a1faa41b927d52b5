"""Named real variants: built on the meta device, each denoiser within 1% of its published count.

The published figures and their sources live beside each variant in engines/models/variants.py:
CogVideoX-2b 1,693,783,872 (released weights; the card only says "2B"), CogVideoX-5b 5,570,283,072
(finetrainers' full-finetune log), SD3 Medium 2,028,328,000 (released weights; card "2B"),
SD3.5 Large 8.1B (Stability AI announcement), FLUX.1 dev 11,901,408,320 / schnell 11,891,178,560
(released weights; cards "12B"), SDXL base UNet 2,567,463,684 (released weights; SDXL paper "2.6B"),
Qwen2-VL 7B 8,291,375,616 / 2B 2,208,985,600 / 72B 73,405,560,320, LLaVA-1.5 7B 7,063,427,072 / 13B 13.4B,
Whisper large-v3 1,543,490,560 / small 241,734,912 (the Hub's parameter totals of the released checkpoints),
InternVL2 2B / 8B / 26B / Llama3-76B 2.2B / 8.1B / 25.5B / 76B (the model cards' rounded "Model Size").
"""

import pytest
from flowspeed.engines.models import get_family, known_families
from flowspeed.engines.models.sequence import SequenceFamily
from flowspeed.engines.models.variants import (
    TINY,
    build_on_meta,
    family_summary,
    get_variant,
    known_variants,
    parameter_counts,
)

REAL = [(f, n) for f in known_families() for n in known_variants(f) if n != TINY]


def test_every_family_has_tiny_and_the_required_variants() -> None:
    assert {n for _, n in REAL} >= {"cogvideox-2b", "cogvideox-5b", "sd3-medium", "flux.1-dev", "sdxl-base-1.0",
                                    "qwen2-vl-7b", "llava-1.5-7b", "whisper-large-v3", "qwen2-vl-72b",
                                    "internvl2-2b", "internvl2-8b", "internvl2-26b", "internvl2-76b",
                                    "llava-1.5-13b"}  # fmt: skip
    assert all(known_variants(f)[0] == TINY for f in known_families())


@pytest.mark.parametrize(("family", "name"), REAL)
def test_variant_builds_on_meta_within_one_percent_of_published(family: str, name: str) -> None:
    counts = parameter_counts(family, name)
    published = get_variant(family, name).published
    trained = next(iter(counts["components"]))  # the denoiser (or the whole VLM / ASR model) comes first
    # Released weights count every tensor, frozen ones too (Whisper's sinusoidal encoder positions).
    assert published and counts["components"][trained] == pytest.approx(published, rel=0.01), counts
    assert counts["parameters"] <= counts["components"][trained]
    if isinstance(get_family(family), SequenceFamily):
        assert set(counts["components"]) == {"model"}
    else:
        assert set(counts["components"]) >= {"vae", "text_encoder"}
        assert counts["components"][trained] == counts["parameters"]


def test_meta_build_allocates_nothing() -> None:
    parts = build_on_meta("flux", "flux.1-dev")  # 17B parameters in all
    assert all(p.is_meta for m in parts.values() for p in m.parameters())


def test_tiny_counts_what_preset_tiny_trains() -> None:
    from flowspeed.configs import ModelConfig
    from flowspeed.engines.models import get_family

    fam, cfg = get_family("cogvideox"), ModelConfig()
    _, enc = fam.load_text_encoder(cfg)
    real = fam.load_transformer(cfg, enc.config.d_model, fam.load_vae(cfg).config.latent_channels)
    assert parameter_counts("cogvideox", TINY)["parameters"] == sum(p.numel() for p in real.parameters())


def test_tasks_are_read_off_the_family() -> None:
    assert family_summary("cogvideox")["tasks"][0] == "t2v"
    assert family_summary("sdxl")["tasks"] == ["t2i", "pretrain", "finetune", "lora"]


def test_unknown_names_list_the_known_ones() -> None:
    with pytest.raises(ValueError, match="known variants: tiny, cogvideox-2b, cogvideox-5b"):
        get_variant("cogvideox", "cogvideox-50b")
    with pytest.raises(ValueError, match="known families: cogvideox"):
        known_variants("sora")


def test_the_spec_names_the_parallel_plans_that_cover_each_family() -> None:
    plans = {f: parameter_counts(f, TINY)["parallel_plans"] for f in ("cogvideox", "flux", "sdxl", "wan")}
    assert plans == {"cogvideox": {"tp": True, "cp": True}, "flux": {"tp": False, "cp": True},
                     "sdxl": {"tp": False, "cp": False}, "wan": {"tp": True, "cp": True}}  # fmt: skip
