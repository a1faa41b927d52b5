"""CogVideoX families against their authors: the training loss, the image conditioning and the sampler.

REFERENCE holds losses computed once by THUDM's own finetune trainers (zai-org/CogVideo@7a1af71
finetune/models/cogvideox_{t2v,i2v}/lora_trainer.py compute_loss, run by docs/fidelity/ref_cogvideox_loss.py) on
the fixed inputs of tests/engines/models/cogvideox_probe.py, for
each released variant at its recommended shape and others
its trainer takes. Here the same inputs go through our families: their schedule, latent layout (1.5's front
padding, the I2V condition), ofs value, rotary tables, x0-from-v estimate and 1/(1 - alpha_bar) weighting.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import flowspeed.engines.models.cogvideox15  # noqa: F401  (registers cogvideox1.5)
import flowspeed.engines.models.cogvideox_i2v  # noqa: F401  (registers cogvideox_i2v)
import pytest
import torch
from diffusers import CogVideoXDDIMScheduler, CogVideoXDPMScheduler
from flowspeed.configs import ComponentConfig, ModelConfig
from flowspeed.engines.models import get_family
from flowspeed.engines.models.cogvideox import SCHEDULER_CONFIG, authors_sampler
from flowspeed.engines.models.cogvideox_i2v import IMAGE_DROPOUT
from flowspeed.engines.models.variants import get_variant

from tests.engines.models.cogvideox_probe import CASES, ProbeTransformer, case_id, fixed_inputs, fixed_noise

# docs/fidelity/ref_cogvideox_loss.py output (THUDM's compute_loss, diffusers 0.42.1, CPU float32)
REFERENCE = {
    "cogvideox-2b:49x480x720:b2": 3.708752435610603,
    "cogvideox-2b:25x320x512:b2": 3.048566081509985,
    "cogvideox-5b:49x480x720:b2": 3.774407121218672,
    "cogvideox-5b:25x480x720:b2": 3.825244872318593,
    "cogvideox-5b-i2v:49x480x720:b2": 3.789522576530439,
    "cogvideox-5b-i2v:33x480x720:b2": 3.2763938883009085,
    "cogvideox1.5-5b:81x768x1360:b2": 3.8029206342220125,
    "cogvideox1.5-5b:161x768x1360:b1": 3.760531719725137,
    "cogvideox1.5-5b:29x480x720:b2": 3.5779271249843125,
    "cogvideox1.5-5b-i2v:81x768x1360:b2": 3.8421984081691867,
    "cogvideox1.5-5b-i2v:81x768x1024:b2": 3.13478035285791,
    "cogvideox1.5-5b-i2v:161x768x1360:b1": 5.413995413542631,
}
FAMILY = {
    "cogvideox-2b": "cogvideox",
    "cogvideox-5b": "cogvideox",
    "cogvideox-5b-i2v": "cogvideox_i2v",
    "cogvideox1.5-5b": "cogvideox1.5",
    "cogvideox1.5-5b-i2v": "cogvideox_i2v",
}
# Both sides run float32 in different orders: measured gaps are <= 2e-6 relative (largest where t is 0 or 1 and the
# weight 1/(1 - alpha_bar) is ~1000); a 2B trained on 5B's schedule moves the loss by 7%.
RTOL = 2e-5


def _scheduler(variant: str, tmp_path: Path) -> CogVideoXDDIMScheduler:
    """What the family trains on: its presets' schedule, or for CogVideoX-5b (whose family presets are 2B's) the
    release's own scheduler/ folder (THUDM/CogVideoX-5b scheduler_config.json: 2b's with snr_shift_scale 1.0)."""
    family = FAMILY[variant]
    cfg = ModelConfig(family=family)
    if variant == "cogvideox-5b":
        CogVideoXDDIMScheduler(**{**SCHEDULER_CONFIG, "snr_shift_scale": 1.0}).save_pretrained(tmp_path / "scheduler")
        cfg = ModelConfig(family=family, transformer=ComponentConfig(pretrained=str(tmp_path), subfolder="transformer"))
    return get_family(family).load_scheduler(cfg)


def _our_loss(variant: str, frames: int, height: int, width: int, batch: int, timesteps: list[int], scheduler) -> float:
    fam, probe = get_family(FAMILY[variant]), ProbeTransformer(variant)
    inputs = fixed_inputs(frames, height, width, batch, variant.endswith("i2v"))
    z = inputs["latents"].permute(0, 2, 1, 3, 4)  # (B, T', C, H', W'), as sample_latents leaves them
    if "image" in inputs:  # our cache appends the image latent as one more frame
        z = torch.cat([z, inputs["image"].permute(0, 2, 1, 3, 4)], dim=1)
    latents, condition = fam.denoiser_latents(probe, z, None)
    noise = fixed_noise(tuple(latents.shape))
    with torch.no_grad():
        loss = fam.v_loss(probe, scheduler, latents, noise, torch.tensor(timesteps), inputs["text"], condition)
    return loss.item()


@pytest.mark.parametrize("case", CASES, ids=[case_id(*c[:5]) for c in CASES])
def test_loss_equals_the_authors_trainer(case: tuple, tmp_path: Path) -> None:
    variant, frames, height, width, batch, timesteps = case
    ours = _our_loss(variant, frames, height, width, batch, timesteps, _scheduler(variant, tmp_path))
    assert ours == pytest.approx(REFERENCE[case_id(*case[:5])], rel=RTOL)


def test_the_reference_notices_a_wrong_objective(tmp_path: Path) -> None:
    """The probe and tolerance can fail: a 2B trained on the 5B schedule, or 1.5 I2V without its condition."""
    variant, frames, height, width, batch, timesteps = CASES[1]  # cogvideox-2b 25x320x512
    wrong = CogVideoXDDIMScheduler(**{**SCHEDULER_CONFIG, "snr_shift_scale": 1.0})
    loss = _our_loss(variant, frames, height, width, batch, timesteps, wrong)
    assert loss != pytest.approx(REFERENCE[case_id(*CASES[1][:5])], rel=10 * RTOL)

    variant, frames, height, width, batch, timesteps = CASES[10]  # 1.5 I2V 81x768x1024
    fam, probe = get_family(FAMILY[variant]), ProbeTransformer(variant)
    inputs = fixed_inputs(frames, height, width, batch, True)
    z = torch.cat([inputs["latents"], inputs["image"]], dim=2).permute(0, 2, 1, 3, 4)
    latents, condition = fam.denoiser_latents(probe, z, None)
    with torch.no_grad():
        loss = fam.v_loss(
            probe, _scheduler(variant, tmp_path), latents, fixed_noise(tuple(latents.shape)),
            torch.tensor(timesteps), inputs["text"], torch.zeros_like(condition),
        ).item()  # fmt: skip
    assert loss != pytest.approx(REFERENCE[case_id(*CASES[10][:5])], rel=10 * RTOL)


def test_presets_train_on_their_releases_noise_schedule() -> None:
    """2B's snr_shift_scale 3.0 for the 1.0 T2V presets; 1.0 for 1.5 and for both I2V releases (5B line)."""
    shifts = {
        f: get_family(f).load_scheduler(ModelConfig(family=f)).config.snr_shift_scale for f in set(FAMILY.values())
    }
    assert shifts == {"cogvideox": 3.0, "cogvideox1.5": 1.0, "cogvideox_i2v": 1.0}


def test_image_condition_is_dropped_at_the_authors_rate() -> None:
    """SAT's noised_image_dropout / diffusers' example's default: 5% of image conditions zeroed, per sample."""
    fam, probe = get_family("cogvideox_i2v"), ProbeTransformer("cogvideox-5b-i2v")
    z = torch.ones(4000, 3, 1, 1, 1)  # 2 clip frames + the image frame
    _, condition = fam.denoiser_latents(probe, z, torch.Generator().manual_seed(0))
    kept = condition[:, 0].flatten(1).amax(1)
    assert set(kept.tolist()) == {0.0, 1.0} and condition[:, 1:].abs().sum() == 0
    assert (kept == 0).float().mean().item() == pytest.approx(IMAGE_DROPOUT, abs=0.01)


def _pipe(rotary: bool) -> SimpleNamespace:
    """The two pipeline components authors_sampler reads (a real pipeline samples in test_cogvideox_i2v)."""
    core = ProbeTransformer("cogvideox-5b" if rotary else "cogvideox-2b")
    return SimpleNamespace(transformer=core, scheduler=CogVideoXDDIMScheduler(**SCHEDULER_CONFIG))


def test_sampler_is_ddim_for_2b_and_dpm_with_dynamic_cfg_for_the_5b_line() -> None:
    """CogVideo inference/cli_demo.py: DDIM for 2B; DPM with use_dynamic_cfg=True for 5B, 5B-I2V and 1.5."""
    two, five = _pipe(rotary=False), _pipe(rotary=True)
    assert authors_sampler(two) is False and type(two.scheduler) is CogVideoXDDIMScheduler
    assert authors_sampler(five) is True and type(five.scheduler) is CogVideoXDPMScheduler
    kept = {k: v for k, v in five.scheduler.config.items() if not k.startswith("_")}
    assert kept["snr_shift_scale"] == SCHEDULER_CONFIG["snr_shift_scale"] and kept["timestep_spacing"] == "trailing"
    assert kept["prediction_type"] == "v_prediction" and kept["rescale_betas_zero_snr"]


def test_cogvideox15_vae_inverts_the_image_latent_scale() -> None:
    """diffusers scripts/convert_cogvideox_to_diffusers.py convert_vae: `invert_scale_latents` for 1.5 only."""
    flags = {
        (fam, name): get_variant(fam, name).components["vae"].kwargs.get("invert_scale_latents", False)
        for name, fam in FAMILY.items()
    }
    assert {k for k, v in flags.items() if v} == {
        ("cogvideox1.5", "cogvideox1.5-5b"),
        ("cogvideox_i2v", "cogvideox1.5-5b-i2v"),
    }
