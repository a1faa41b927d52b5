"""PT-DiT, its objective and its sampler against numbers computed once with the authors' released code.

Every expected figure below was printed by docs/fidelity/ref_ptdit.py running Ascend/MindSpeed-MM@v2.0.0's
`PTDiTDiffuser` (mindspeed_mm/models/predictor/dits/pt_dit_diffusers.py) and `RFlow`
(mindspeed_mm/models/diffusion/rflow.py, configured as examples/qihoo_t2x/inference_model_image.json's diffusion
block) on the same seeded weights and inputs (tests/fidelity.py); CI never runs their code.
"""

from __future__ import annotations

import pytest
import torch
from flowspeed.engines.models.dits import pt_dit
from flowspeed.engines.models.qihoo_t2x import QihooT2X
from flowspeed.engines.models.registry import get_family

from tests.fidelity import seeded_tensor, seeded_weights

TINY = dict(num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=8, num_layers=2,
            caption_channels=16, sample_size=32)  # fmt: skip
CONFIGS = {"tiny": dict(compress_ratios=(1, 4, 4), proxy_compress_ratios=(1, 2, 2)),
           "temporal": dict(compress_ratios=(2, 4, 4), proxy_compress_ratios=(1, 4, 4))}  # fmt: skip
# case -> (config, latent T, H, W); the first is the buffer's training size (their stored table), the others compute
CASES = {"image-train-size": ("tiny", 1, 32, 32), "video-16x32": ("tiny", 2, 16, 32),
         "temporal-window": ("temporal", 4, 16, 16)}  # fmt: skip
# ref_ptdit.py output: (sum, absolute sum, 16 values at evenly spaced flat indices) of the (2, 8, T, H, W) output
FORWARD = {
    "image-train-size": (-4150.943472117186, 14939.217550553381, [
        0.5072952508926392, -1.2140332460403442, -0.11028245091438293, -1.2442796230316162,
        -2.343066930770874, -2.5348641872406006, 1.613577127456665, 0.37180012464523315,
        -1.4879707098007202, 0.021345119923353195, 0.5160729885101318, 0.6057098507881165,
        -0.9207009673118591, -1.1957321166992188, 0.5788105130195618, 0.08285066485404968,
    ]),
    "video-16x32": (-2842.7968771904707, 13084.422341428697, [
        -1.0626282691955566, -0.5694582462310791, 0.04798056185245514, 0.9340295195579529,
        0.4677402377128601, 0.025796473026275635, 0.23645393550395966, -0.4438919425010681,
        0.40942391753196716, 0.539840042591095, -0.42874813079833984, 0.45250675082206726,
        -0.9170546531677246, -0.24355432391166687, -0.22171038389205933, 0.774911105632782,
    ]),
    "temporal-window": (-1586.7251456500962, 12923.132850897498, [
        -1.8721346855163574, -0.12386053055524826, 1.091710090637207, -0.38886940479278564,
        -1.547621488571167, 0.5388875007629395, -0.7100088596343994, 1.5629172325134277,
        0.5206075310707092, 0.3014114201068878, -0.7796260118484497, 2.04890775680542,
        -0.3991602063179016, 0.18250983953475952, -0.940434455871582, 1.0047006607055664,
    ]),
}  # fmt: skip
# ref_ptdit.py: RFlow.q_sample + training_losses (batch mean) per (pixel frames, height, width)
LOSS_CASES = {"image-1024": (1, 1024, 1024), "image-512": (1, 512, 512), "image-512x1024": (1, 512, 1024),
              "video-17x512": (17, 512, 512), "video-29x512x768": (29, 512, 768)}  # fmt: skip
LOSSES = {
    "image-1024": 2.3794326782226562,
    "image-512": 1.8943650722503662,
    "image-512x1024": 2.120326042175293,
    "video-17x512": 2.455798387527466,
    "video-29x512x768": 2.5985612869262695,
}  # fmt: skip
# ref_ptdit.py: RFlow.sample, 30 steps with the transform, from seeded noise; (sum, absolute sum, 16 values)
SAMPLE_CASES = {"image-1024": (1, 1024, 1024), "video-29x512x768": (29, 512, 768)}
SAMPLES = {
    "image-1024": (139.4600231880322, 163.70559155289084, [
        0.6863015294075012, 2.050945520401001, 0.6032137274742126, -0.293494313955307,
        0.4081692397594452, -0.12338082492351532, 1.4433295726776123, 0.2280619740486145,
        0.2319210320711136, 0.8144981265068054, 0.748551070690155, 0.34131908416748047,
        0.747812807559967, -0.7578766942024231, 0.6849724650382996, 1.13881516456604,
    ]),
    "video-29x512x768": (291.73594681173563, 344.48540426418185, [
        1.4251692295074463, 1.3513705730438232, 0.2594646215438843, 0.2059527486562729,
        -0.4502936899662018, 0.1892249584197998, -0.38766324520111084, 0.17934656143188477,
        1.1414930820465088, 0.8575915098190308, 0.8948764801025391, 0.6967419385910034,
        0.9642468094825745, -0.06659485399723053, -0.23454414308071136, 1.3976788520812988,
    ]),
}  # fmt: skip


def _picked(out: torch.Tensor) -> tuple[float, float, torch.Tensor]:
    flat = out.double().flatten()
    idx = torch.linspace(0, flat.numel() - 1, 16).round().long()
    return flat.sum().item(), flat.abs().sum().item(), flat[idx]


@pytest.mark.parametrize("case", list(CASES))
def test_forward_matches_authors(case: str) -> None:
    name, t, h, w = CASES[case]
    model = pt_dit.PTDiT(**TINY, **CONFIGS[name]).eval()
    shapes = {k: tuple(v.shape) for k, v in pt_dit.to_published(model.state_dict()).items()}
    model.load_state_dict(pt_dit.from_published(seeded_weights(shapes, seed=17)), strict=True)
    mask = torch.ones(2, 6)
    mask[1, 4:] = 0
    with torch.no_grad():
        out = model(hidden_states=seeded_tensor(f"x{t}x{h}x{w}", (2, 4, t, h, w), 17, scale=1.0),
                    timestep=torch.tensor([437.0, 437.0]), encoder_attention_mask=mask,
                    encoder_hidden_states=seeded_tensor("caption", (2, 6, 16), 17, scale=1.0))  # fmt: skip
    total, absolute, values = _picked(out)
    want_total, want_abs, want_values = FORWARD[case]
    # float32 through two blocks with O(1) activations: the two codes differ by ~1e-6 per element (reduction
    # orders, additive -1e4 vs boolean masks); 2e-5 per value and 2e-6 of the absolute sum bound that with margin
    torch.testing.assert_close(values, torch.tensor(want_values, dtype=torch.float64), rtol=0, atol=2e-5)
    assert abs(total - want_total) < 2e-6 * want_abs and abs(absolute - want_abs) < 2e-6 * want_abs


def _stand_in(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    v = 0.7 * x_t - 0.3 * (t / 1000.0).view(-1, 1, 1, 1, 1) + 0.05
    return torch.cat([v, torch.full_like(v, 9.0)], dim=1)  # the second half is the unread sigma leftover


@pytest.mark.parametrize("case", list(LOSS_CASES))
def test_objective_matches_authors(case: str) -> None:
    frames, height, width = LOSS_CASES[case]
    family = get_family("qihoo_t2x")
    assert isinstance(family, QihooT2X)
    latent = (1 if frames == 1 else (frames - 1) // 4 + 1, height // 8, width // 8)
    x0 = seeded_tensor(f"x0-{frames}x{height}x{width}", (2, 4, *latent), 5, scale=1.0)
    loss = family.objective.loss(_stand_in, x0, torch.Generator().manual_seed(5), shape=family.schedule_shape(x0))
    # a float32 mean over up to 262k elements: summation order moves it by ~1e-7 relative
    assert loss.item() == pytest.approx(LOSSES[case], rel=1e-5)


def _velocity(z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    v = -0.5 * z + torch.sin(3.0 * t / 1000.0).view(-1, 1, 1, 1, 1)
    return torch.cat([v, torch.full_like(v, 9.0)], dim=1)


@pytest.mark.parametrize("case", list(SAMPLE_CASES))
def test_sampler_matches_authors(case: str) -> None:
    frames, height, width = SAMPLE_CASES[case]
    family = get_family("qihoo_t2x")
    noise = seeded_tensor(f"noise-{frames}x{height}x{width}", (1, 4, 2 if frames > 1 else 1, 8, 8), 5, scale=1.0)
    shape = (1 if frames == 1 else (frames - 1) // 4 + 1, height, width)  # what generate passes: latent frames, pixels
    scheduler = family.objective.inference_scheduler()
    z = family.objective.sample(_velocity, scheduler, noise, 30, torch.Generator().manual_seed(0), shape)
    total, absolute, values = _picked(z)
    want_total, want_abs, want_values = SAMPLES[case]
    # 30 float32 Euler steps of O(1) values: agreement to ~1e-6
    torch.testing.assert_close(values, torch.tensor(want_values, dtype=torch.float64), rtol=0, atol=1e-5)
    assert abs(total - want_total) < 1e-5 * want_abs and abs(absolute - want_abs) < 1e-5 * want_abs
