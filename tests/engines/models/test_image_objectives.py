"""Each image family's training loss against its authors' formula, on fixed inputs at several latent sizes.

The expected values were computed once by docs/fidelity/ref_image_losses.py: the same seeded weights (by key name,
tests.fidelity.seeded_weights) loaded into the library denoiser, the same inputs and draws, and the loss assembled
as the authors' training code assembles it (diffusers' train_dreambooth_sd3.py / train_dreambooth_flux.py /
train_text_to_image_sdxl.py, Kolors' dreambooth/train_dreambooth_lora.py, and Hunyuan-DiT's own
`GaussianDiffusion.training_losses`, run from their repository). CI only runs our side.
"""

from __future__ import annotations

import pytest
import torch
from diffusers import DDPMScheduler
from flowspeed.configs import ComponentConfig, PipelineConfig
from flowspeed.engines.models import get_family
from flowspeed.engines.models.hunyuandit import V1_2_SCHEDULER_CONFIG

from tests.fidelity import seeded_tensor, seeded_weights

# (family, transformer preset) -> (text width, pooled width, text tokens, scaling, shift)
SETUPS: dict[tuple[str, str], tuple[int, int, int, float, float]] = {
    ("sd3", "tiny"): (64, 64, 77 + 16, 1.5305, 0.0609),
    ("flux", "tiny"): (64, 32, 16, 0.3611, 0.1159),
    ("flux", "tiny-dev"): (64, 32, 16, 0.3611, 0.1159),
    ("sdxl", "tiny"): (64, 32, 77, 0.13025, 0.0),
    ("kolors", "tiny"): (32, 32, 16, 0.13025, 0.0),
    ("hunyuandit", "tiny"): (32, 0, 77, 0.13025, 0.0),
}
SIZES = [(8, 8), (8, 12), (16, 8)]  # latent (h, w): 64x64, 64x96 and 128x64 pixels
# generator seeds per case; at 8x8 latents seed 732 draws t = (760, 0) for Hunyuan-DiT: L_vb's decoder-NLL branch
SEEDS: dict[tuple[str, int, int], tuple[int, ...]] = {("hunyuandit", 8, 8): (0, 732)}
BATCH = 2


def image_batch(family: str, preset: str, h: int, w: int) -> dict[str, torch.Tensor]:
    """Cached-batch tensors defined by name and seed alone (the reference script builds the same)."""
    text, pooled, tokens, scale, shift = SETUPS[(family, preset)]
    tag = f"{family}/{h}x{w}"
    batch = {
        "latent_params": seeded_tensor(f"{tag}/latent_params", (BATCH, 8, h, w), scale=1.0),
        "scaling_factor": torch.full((BATCH,), scale),
        "shift_factor": torch.full((BATCH,), shift),
        "text_embeds": seeded_tensor(f"{tag}/text_embeds", (BATCH, tokens, text), scale=1.0),
    }
    if pooled:
        batch["pooled_embeds"] = seeded_tensor(f"{tag}/pooled_embeds", (BATCH, pooled), scale=1.0)
    if family == "hunyuandit":  # mT5 states beside the CLIP ones; masks with real padding
        batch["text_embeds_t5"] = seeded_tensor(f"{tag}/text_embeds_t5", (BATCH, 256, 64), scale=1.0)
        batch["text_mask"] = (torch.arange(77) < torch.tensor([[9], [77]])).long()
        batch["text_mask_t5"] = (torch.arange(256) < torch.tensor([[12], [200]])).long()
    return batch


def seeded_denoiser(family: str, preset: str) -> torch.nn.Module:
    """Our family's tiny denoiser with the seeded weights the reference loaded into the library class."""
    fam = get_family(family)
    text, *_ = SETUPS[(family, preset)]
    cfg = PipelineConfig().model.model_copy(update={"family": family, "transformer": ComponentConfig(preset=preset)})
    model = fam.load_transformer(cfg, text, 4)
    model.load_state_dict(seeded_weights({k: tuple(v.shape) for k, v in model.state_dict().items()}), strict=True)
    return model.eval()


# The authors' loss on these inputs, from docs/fidelity/ref_image_losses.py (float32, CPU):
# (family, preset, scheduler, h, w, seed) -> loss
REFERENCE: dict[tuple[str, str, str, int, int, int], float] = {
    ('sd3', 'tiny', 'default', 8, 8, 0): 7.740837097167969,
    ('sd3', 'tiny', 'default', 8, 8, 1): 6.96928071975708,
    ('sd3', 'tiny', 'default', 8, 12, 0): 6.927310943603516,
    ('sd3', 'tiny', 'default', 8, 12, 1): 3.850830078125,
    ('sd3', 'tiny', 'default', 16, 8, 0): 4.806074619293213,
    ('sd3', 'tiny', 'default', 16, 8, 1): 4.594168663024902,
    ('flux', 'tiny', 'default', 8, 8, 0): 2.7326321601867676,
    ('flux', 'tiny', 'default', 8, 8, 1): 2.7870116233825684,
    ('flux', 'tiny', 'default', 8, 12, 0): 2.711308479309082,
    ('flux', 'tiny', 'default', 8, 12, 1): 2.949559450149536,
    ('flux', 'tiny', 'default', 16, 8, 0): 2.806319236755371,
    ('flux', 'tiny', 'default', 16, 8, 1): 2.933063268661499,
    ('flux', 'tiny-dev', 'default', 8, 8, 0): 2.7724015712738037,
    ('flux', 'tiny-dev', 'default', 8, 8, 1): 2.6617350578308105,
    ('flux', 'tiny-dev', 'default', 8, 12, 0): 2.602660655975342,
    ('flux', 'tiny-dev', 'default', 8, 12, 1): 2.979410171508789,
    ('flux', 'tiny-dev', 'default', 16, 8, 0): 3.1508402824401855,
    ('flux', 'tiny-dev', 'default', 16, 8, 1): 3.3436853885650635,
    ('sdxl', 'tiny', 'default', 8, 8, 0): 1.743612289428711,
    ('sdxl', 'tiny', 'default', 8, 8, 1): 1.8084239959716797,
    ('sdxl', 'tiny', 'default', 8, 12, 0): 1.669400691986084,
    ('sdxl', 'tiny', 'default', 8, 12, 1): 1.6541318893432617,
    ('sdxl', 'tiny', 'default', 16, 8, 0): 1.5373693704605103,
    ('sdxl', 'tiny', 'default', 16, 8, 1): 1.7154711484909058,
    ('kolors', 'tiny', 'default', 8, 8, 0): 1.8353878259658813,
    ('kolors', 'tiny', 'default', 8, 8, 1): 1.7509266138076782,
    ('kolors', 'tiny', 'default', 8, 12, 0): 1.6533647775650024,
    ('kolors', 'tiny', 'default', 8, 12, 1): 1.7835379838943481,
    ('kolors', 'tiny', 'default', 16, 8, 0): 1.606609582901001,
    ('kolors', 'tiny', 'default', 16, 8, 1): 1.9202243089675903,
    ('hunyuandit', 'tiny', 'default', 8, 8, 0): 1.9787132740020752,
    ('hunyuandit', 'tiny', 'v1.2', 8, 8, 0): 1.999281406402588,
    ('hunyuandit', 'tiny', 'default', 8, 8, 732): 6.03082275390625,
    ('hunyuandit', 'tiny', 'v1.2', 8, 8, 732): 6.033618450164795,
    ('hunyuandit', 'tiny', 'default', 8, 12, 0): 3.0166492462158203,
    ('hunyuandit', 'tiny', 'v1.2', 8, 12, 0): 3.036644220352173,
    ('hunyuandit', 'tiny', 'default', 8, 12, 1): 3.2972121238708496,
    ('hunyuandit', 'tiny', 'v1.2', 8, 12, 1): 3.3096466064453125,
    ('hunyuandit', 'tiny', 'default', 16, 8, 0): 2.1291606426239014,
    ('hunyuandit', 'tiny', 'v1.2', 16, 8, 0): 2.1919116973876953,
    ('hunyuandit', 'tiny', 'default', 16, 8, 1): 1.890643835067749,
    ('hunyuandit', 'tiny', 'v1.2', 16, 8, 1): 1.9011046886444092,
}  # fmt: skip


@pytest.mark.parametrize("case", sorted(REFERENCE), ids=lambda c: "-".join(map(str, c)))
def test_training_loss_matches_the_authors_formula(case: tuple[str, str, str, int, int, int]) -> None:
    family, preset, schedule, h, w, seed = case
    fam = get_family(family)
    cfg = PipelineConfig().model.model_copy(update={"family": family, "transformer": ComponentConfig(preset=preset)})
    scheduler = DDPMScheduler(**V1_2_SCHEDULER_CONFIG) if schedule == "v1.2" else fam.load_scheduler(cfg)
    with torch.no_grad():
        loss = fam.training_loss(seeded_denoiser(family, preset), scheduler, image_batch(family, preset, h, w),
                                 torch.Generator().manual_seed(seed))  # fmt: skip
    # float32 forward passes of the same library module on the same weights; the few ops that differ (our
    # float64 vs their numpy float64 schedule tables, lookup vs index of sigmas) agree to ~1e-6 relative.
    assert loss.item() == pytest.approx(REFERENCE[case], rel=2e-5, abs=1e-6)


def test_variant_schedules_follow_the_release() -> None:
    """FLUX dev samples with its dynamic (resolution) shift, schnell without; Hunyuan-DiT v1.2's betas end at 0.018,
    <= 1.1's (size/style conditions, the tiny preset) at 0.03."""
    model = PipelineConfig().model
    flux = get_family("flux")
    dev_model = model.model_copy(update={"family": "flux", "transformer": ComponentConfig(preset="tiny-dev")})
    dev = flux.load_scheduler(dev_model)
    schnell = flux.load_scheduler(model.model_copy(update={"family": "flux"}))
    assert dev.config.use_dynamic_shifting and dev.config.shift == 3.0
    assert not schnell.config.use_dynamic_shifting and schnell.config.shift == 1.0
    assert torch.equal(dev.sigmas, schnell.sigmas)  # training draws from the same unshifted grid
    hunyuan = get_family("hunyuandit").load_scheduler(model.model_copy(update={"family": "hunyuandit"}))
    assert hunyuan.config.beta_end == 0.03 and V1_2_SCHEDULER_CONFIG["beta_end"] == 0.018


def test_every_shared_encoder_and_image_component_has_a_fact_table() -> None:
    """Every variant component built from a shared encoder / image VAE class, and every image-family component, is
    listed in some tests/facts table's `used_by`, so test_fact_tables checks it against the released layout."""
    from diffusers import AutoencoderKL
    from flowspeed.engines.models.variants import get_variant, known_variants
    from transformers import BertModel, CLIPTextModel, T5EncoderModel

    from tests.fidelity import load_facts

    covered = {tuple(u) for table in load_facts() for u in table["used_by"]}
    shared = (AutoencoderKL, BertModel, CLIPTextModel, T5EncoderModel)  # CLIPTextModelWithProjection: by name
    image = {"sd3", "flux", "sdxl", "kolors", "hunyuandit"}
    missing = []
    for family in sorted({*image, "cogvideox", "cogvideox_i2v", "cogvideox1.5", "opensora", "opensora1.2",
                          "opensoraplan", "opensoraplan_i2v", "qihoo_t2x"}):  # fmt: skip
        for name in known_variants(family)[1:]:
            for part, comp in get_variant(family, name).components.items():
                is_shared = issubclass(comp.cls, shared) or comp.cls.__name__.startswith("CLIPText")
                if (family in image or is_shared) and (family, name, part) not in covered:
                    missing.append((family, name, part))
    assert not missing
