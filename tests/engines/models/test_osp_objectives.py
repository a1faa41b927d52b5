"""OpenSoraPlan's objectives and samplers, per variant, against the authors' training recipe.

v1.2.0 trains eps on the default DDPM betas with min-SNR 5 and noise offset 0.02 and samples with a default
EulerAncestralDiscreteScheduler; v1.3.0 trains v on zero-terminal-SNR betas with min-SNR 5 and samples with Euler
ancestral on trailing timesteps (docs/fidelity.md (opensoraplan) gives the lines). The loss values below were computed
once by docs/fidelity/ref_osp.py (`loss`), which restates the authors' `run` with their diffusers calls.

.venv/bin/pytest tests/engines/models/test_osp_objectives.py -q
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from flowspeed.configs.schema import ComponentConfig, ModelConfig
from flowspeed.engines.models import get_family
from flowspeed.engines.models.dits.opensoraplan import OpenSoraInpaint_v1_3, OpenSoraT2V, OpenSoraT2V_v1_3
from flowspeed.engines.models.video_objectives import EpsilonPrediction, VPrediction

from tests.fidelity import seeded_tensor

LOSS_T = (0, 999, 500, 37)
# `ref_osp.py loss` (diffusers' DDPMScheduler + compute_snr as the authors' train_t2v_diffusers.py uses them), keyed by
# latent (C, T, H, W): v1.2 buckets 29x480x640, 93x720p, 1x480p; v1.3 buckets 93x352x640, 93x480x480, 1x352x640.
REFERENCE = {
    "epsilon": {"4x8x60x80": 0.5231491923332214, "4x24x90x160": 0.5248009562492371, "4x1x60x80": 0.5298530459403992},
    "v_prediction": {"8x24x44x80": 0.053817350417375565, "8x24x60x60": 0.053818341344594955,
                     "8x1x44x80": 0.05366181209683418},
}  # fmt: skip
OBJECTIVES = {"epsilon": EpsilonPrediction, "v_prediction": VPrediction}


def _stand_in(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    return 0.7 * torch.tanh(x_t) + 1e-3 * t.float().view(-1, 1, 1, 1, 1)  # ref_osp.py's `_stand_in`


def _inputs(shape: tuple[int, ...], offset: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    b, (c, t, h, w) = len(LOSS_T), shape
    x0 = seeded_tensor("osp.loss.x0", (b, c, t, h, w), 2, scale=1.0)
    noise = seeded_tensor("osp.loss.noise", (b, c, t, h, w), 2, scale=1.0)
    noise = noise + offset * seeded_tensor("osp.loss.offset", (b, c, 1, 1, 1), 2, scale=1.0)
    return x0, noise, torch.tensor(LOSS_T)


@pytest.mark.parametrize("name", list(REFERENCE))
def test_loss_matches_the_authors_formula_on_every_bucket(name: str) -> None:
    obj = OBJECTIVES[name]()
    for key, expected in REFERENCE[name].items():
        x0, noise, t = _inputs(tuple(map(int, key.split("x"))), obj.noise_offset)
        # float32 means over up to 5.5M terms: pairwise summation keeps the relative error ~1e-6
        assert obj.loss_at(_stand_in, x0, noise, t).item() == pytest.approx(expected, rel=1e-5), key


def test_loss_draws_the_authors_noise_offset_then_uses_loss_at() -> None:
    obj = EpsilonPrediction()
    x0 = seeded_tensor("osp.draw.x0", (2, 4, 3, 4, 4), 3, scale=1.0)
    g = torch.Generator().manual_seed(7)
    t = torch.randint(0, 1000, (2,), generator=g)
    noise = torch.randn(x0.shape, generator=g) + 0.02 * torch.randn((2, 4, 1, 1, 1), generator=g)
    expected = obj.loss_at(_stand_in, x0, noise, t)
    assert obj.loss(_stand_in, x0, torch.Generator().manual_seed(7)).item() == pytest.approx(expected.item(), rel=1e-6)
    # without the offset the loss differs: the offset reaches the target
    plain = EpsilonPrediction(noise_offset=0.0).loss(_stand_in, x0, torch.Generator().manual_seed(7))
    assert plain.item() != pytest.approx(expected.item(), rel=1e-6)


def test_schedulers_are_the_released_ones() -> None:
    eps, v = EpsilonPrediction(), VPrediction()
    assert eps.scheduler.alphas_cumprod[-1] > 0 and v.scheduler.alphas_cumprod[-1] == 0  # zero terminal SNR (v1.3)
    assert (eps.snr_gamma, eps.noise_offset, v.snr_gamma, v.noise_offset) == (5.0, 0.02, 5.0, 0.0)
    e, s = eps.inference_scheduler().config, v.inference_scheduler().config
    assert (e.prediction_type, e.timestep_spacing, e.rescale_betas_zero_snr, e.beta_schedule) == (
        "epsilon", "linspace", False, "linear")  # fmt: skip
    assert (s.prediction_type, s.timestep_spacing, s.rescale_betas_zero_snr) == ("v_prediction", "trailing", True)
    assert "epsilon prediction" in eps.describe() and "noise offset 0.02" in eps.describe()


def test_epsilon_oracle_has_zero_loss_and_samples_x0() -> None:
    obj = EpsilonPrediction(noise_offset=0.0)
    x0 = seeded_tensor("osp.oracle.x0", (1, 4, 3, 8, 8), 3, scale=0.5)
    ac = obj.scheduler.alphas_cumprod

    def oracle(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        a = ac[t.long()].view(-1, 1, 1, 1, 1)
        return (x_t - a.sqrt() * x0) / (1 - a).sqrt()

    assert obj.loss(oracle, x0, torch.Generator().manual_seed(3)).item() < 1e-8
    sched = obj.inference_scheduler()
    g = torch.Generator().manual_seed(4)

    def euler_oracle(x_in: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        # Euler ancestral feeds x / sqrt(sigma^2 + 1) = sqrt(a) x0 + sqrt(1 - a) eps at sigma^2 = (1 - a) / a, its
        # sigma interpolated linearly at the (fractional) timestep
        sigmas = ((1 - ac) / ac).sqrt().numpy()
        s = torch.tensor(np.interp(t.double().numpy(), np.arange(len(sigmas)), sigmas)).float().view(-1, 1, 1, 1, 1)
        a = 1 / (s**2 + 1)
        return (x_in - a.sqrt() * x0) / (1 - a).sqrt()

    z = obj.sample(euler_oracle, sched, torch.randn(x0.shape, generator=g), 20, g, (3, 64, 64))
    assert torch.allclose(z, x0, atol=1e-3)


@pytest.mark.parametrize(
    ("family", "preset", "cls", "objective"),
    [
        ("opensoraplan", "tiny", OpenSoraT2V_v1_3, VPrediction),
        ("opensoraplan", "tiny-v1.2", OpenSoraT2V, EpsilonPrediction),
        ("opensoraplan", "OpenSoraT2V-ROPE-L/122", OpenSoraT2V, EpsilonPrediction),
        ("opensoraplan", "OpenSoraT2V_v1_3-2B/122", OpenSoraT2V_v1_3, VPrediction),
        ("opensoraplan_i2v", "tiny", OpenSoraInpaint_v1_3, VPrediction),
        ("opensoraplan_i2v", "OpenSoraInpaint_v1_3-2B/122", OpenSoraInpaint_v1_3, VPrediction),
    ],
)
def test_each_variant_trains_and_exports_its_own_objective(
    family: str, preset: str, cls: type, objective: type
) -> None:
    fam = get_family(family)
    # a released variant named with its weights' folder picks the same objective as without (the class decides)
    for comp in (ComponentConfig(preset=preset), ComponentConfig(preset=preset, pretrained="/nonexistent/weights")):
        cfg = ModelConfig(family=family, transformer=comp)
        assert fam.transformer_class(cfg) is cls
        assert type(fam.load_scheduler(cfg)) is objective
        assert fam.load_scheduler(cfg).inference_scheduler().config.prediction_type == objective.prediction_type


def test_an_export_keeps_the_objective_of_its_recorded_class(tmp_path) -> None:
    fam = get_family("opensoraplan")
    (tmp_path / "transformer").mkdir()
    (tmp_path / "transformer" / "config.json").write_text(json.dumps({"_class_name": "OpenSoraT2V"}))
    export = ComponentConfig(preset=None, pretrained=str(tmp_path), subfolder="transformer")
    cfg = ModelConfig(family="opensoraplan", transformer=export)
    assert type(fam.load_scheduler(cfg)) is EpsilonPrediction
    with pytest.raises(ValueError, match="not a variant"):
        fam.load_scheduler(ModelConfig(family="opensoraplan", transformer=ComponentConfig(preset="OpenSoraT2V-XL")))
