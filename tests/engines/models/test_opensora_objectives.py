"""OpenSora 1.0's IDDPM and OpenSora 1.2's rectified flow against losses the authors' own schedulers computed on the
same fixed inputs, one case per bucket shape of the released variants (hpcaitech/Open-Sora v1.0.0 / v1.2.0, run once
by docs/fidelity/ref_opensora_objectives.py; CI never imports their code).

The inputs are rebuilt here by name (`seeded_tensor`); the stand-in denoisers are the script's: a fixed output
(IDDPM), and that output plus 0.5 x_t (rectified flow, so x_t's formation counts). Tolerance: their schedules are
float64 numpy tables cast to float32 per use, ours float32 tensors (diffusers' betas, alphas_cumprod), and sums
over up to 5M elements run in another order: about 1e-6 relative, held to 2e-5.
"""

from __future__ import annotations

import pytest
import torch
from flowspeed.engines.models import get_family

from tests.fidelity import seeded_tensor

# ref_opensora_objectives.py: bucket -> (latent (T', H', W'), loss) at t = [0, 417, 999]
IDDPM_REFERENCE = {
    "16x256x256": ((16, 32, 32), 2.978713035583496),
    "16x512x512": ((16, 64, 64), 2.969902276992798),
}
# bucket -> ((pixel frames, height, width), latent, shifted t for raw t = [50, 500, 950], loss)
RF_REFERENCE = {
    "144p-51-9:16": ((51, 144, 256), (15, 18, 32), [71.01226043701172, 592.23095703125, 965.02880859375],
                     3.2707252502441406),
    "240p-102-9:16": ((102, 240, 426), (30, 30, 53), [152.564697265625, 773.7859497070312, 984.8464965820312],
                      3.4711849689483643),
    "144p-408-9:16": ((408, 144, 256), (120, 18, 32), [177.77105712890625, 804.2255859375, 987.349853515625],
                      3.5170364379882812),
    "360p-204-1:1": ((204, 480, 480), (60, 60, 60), [276.51690673828125, 878.9616088867188, 992.8043823242188],
                     3.632722854614258),
    "720p-1-16:9": ((1, 1280, 720), (1, 160, 90), [89.82035827636719, 652.1739501953125, 972.6962280273438],
                    3.3557796478271484),
}  # fmt: skip
RF_MASKED = 3.3615620136260986  # 240p-102-9:16, t = [300, 600, 900], frames masked out per sample (see below)


def _inputs(name: str, latent: tuple[int, int, int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    shape = (3, 4, *latent)
    return (seeded_tensor(f"{name}/x0", shape, scale=1.0), seeded_tensor(f"{name}/noise", shape, scale=1.0),
            seeded_tensor(f"{name}/out", (3, 8, *latent), scale=1.0))  # fmt: skip


@pytest.mark.parametrize("bucket", list(IDDPM_REFERENCE))
def test_iddpm_loss_matches_opensora_1_0(bucket: str) -> None:
    latent, want = IDDPM_REFERENCE[bucket]
    x0, noise, out = _inputs(bucket, latent)
    loss = get_family("opensora").objective.loss_at(lambda x, t: out, x0, noise, torch.tensor([0, 417, 999]))
    assert loss.item() == pytest.approx(want, rel=2e-5)


def _rf_model(out: torch.Tensor):  # noqa: ANN202
    return lambda x, t: out + 0.5 * torch.cat([x, x], dim=1)


@pytest.mark.parametrize("bucket", list(RF_REFERENCE))
def test_rectified_flow_shift_and_loss_match_opensora_1_2(bucket: str) -> None:
    (_, height, width), latent, want_t, want = RF_REFERENCE[bucket]
    rf = get_family("opensora1.2").objective
    k = rf.shift((latent[0], height, width))  # the family maps latent frames to their `num_frames // 17 * 5`
    s = torch.tensor([50.0, 500.0, 950.0]) / 1000
    t = k * s / (1 + (k - 1) * s) * 1000
    torch.testing.assert_close(t, torch.tensor(want_t), rtol=2e-6, atol=0)
    x0, noise, out = _inputs(bucket, latent)
    assert rf.loss_at(_rf_model(out), x0, noise, torch.tensor(want_t)).item() == pytest.approx(want, rel=2e-5)


def test_rectified_flow_frame_mask_matches_opensora_1_2() -> None:
    """Masked-out frames stay clean in x_t and each sample averages over its own masked-in frames (their
    `mean_flat(..., mask)`), which a mean over the whole batch would not give."""
    bucket = "240p-102-9:16"
    x0, noise, out = _inputs(bucket, RF_REFERENCE[bucket][1])
    mask = torch.ones(3, 30, dtype=torch.bool)
    mask[0, :5], mask[2, -10:] = False, False
    rf = get_family("opensora1.2").objective
    loss = rf.loss_at(_rf_model(out), x0, noise, torch.tensor([300.0, 600.0, 900.0]), frame_mask=mask)
    assert loss.item() == pytest.approx(RF_MASKED, rel=2e-5)


# ref_opensora_objectives.py: sorted(space_timesteps(1000, str(steps)), reverse=True) of their respace.py (v1.0.0)
RESPACED = {
    7: [999, 832, 666, 500, 333, 166, 0],
    30: [999, 965, 930, 896, 861, 827, 792, 758, 723, 689, 655, 620, 586, 551, 517, 482, 448, 413, 379, 344, 310, 276,
         241, 207, 172, 138, 103, 69, 34, 0],
    100: [
          999, 989, 979, 969, 959, 949, 938, 928, 918, 908, 898, 888, 878, 868, 858, 848, 838, 827, 817, 807,
          797, 787, 777, 767, 757, 747, 737, 727, 716, 706, 696, 686, 676, 666, 656, 646, 636, 626, 616, 605,
          595, 585, 575, 565, 555, 545, 535, 525, 515, 505, 494, 484, 474, 464, 454, 444, 434, 424, 414, 404,
          394, 383, 373, 363, 353, 343, 333, 323, 313, 303, 293, 283, 272, 262, 252, 242, 232, 222, 212, 202,
          192, 182, 172, 161, 151, 141, 131, 121, 111, 101, 91, 81, 71, 61, 50, 40, 30, 20, 10, 0
    ],
}  # fmt: skip


def test_iddpm_sampler_visits_opensora_1_0s_respaced_timesteps() -> None:
    obj = get_family("opensora").objective
    for steps, want in RESPACED.items():
        seen: list[int] = []

        def predict(x: torch.Tensor, t: torch.Tensor, seen: list[int] = seen) -> torch.Tensor:
            seen.append(int(t[0]))
            return torch.zeros(1, 8, 1, 2, 2)

        obj.sample(predict, obj.inference_scheduler(), torch.zeros(1, 4, 1, 2, 2), steps, torch.Generator(), None)
        assert seen == want, steps


# their RFLOW(use_timestep_transform=True, num_sampling_steps=30, cfg_scale=7.0).sample with the stand-in below, from
# z = seeded "rflow_sample/z" (1, 4, 15, 4, 6) at 240x426 pixels, 51 frames: sum, abs-sum, z[0, c, f, 1, 2] picks
RF_SAMPLE = (4722.198962800205, 4726.98693651706, {(0, 0): 3.1978557109832764, (1, 7): 3.593519687652588,
                                                   (3, 14): 3.096193790435791})  # fmt: skip


def test_rectified_flow_sampler_matches_opensora_1_2() -> None:
    """The whole sampling path of the family (guidance over the null caption on the first half of 8 output
    channels, the shifted 30-step grid, the Euler update) against their sampler on the same stand-in denoiser."""

    def stand_in(x, timestep, encoder_hidden_states, encoder_attention_mask, fps):  # noqa: ANN001, ANN202
        y = encoder_hidden_states.mean(dim=(1, 2)).view(-1, 1, 1, 1, 1)
        v = 0.2 * x + torch.sin(timestep / 300.0).view(-1, 1, 1, 1, 1) * y
        return torch.cat([v, 100.0 + x], dim=1)  # the second half must be ignored

    fam = get_family("opensora1.2")
    cond = {"text_embeds": torch.full((1, 4, 8), 0.5), "text_mask": torch.ones(1, 4)}
    uncond = {"text_embeds": torch.full((1, 4, 8), -0.25), "text_mask": torch.ones(1, 4)}
    predict = fam.guided(stand_in, cond, uncond, 7.0, None)
    z = seeded_tensor("rflow_sample/z", (1, 4, 15, 4, 6), scale=1.0)
    obj = fam.objective
    out = obj.sample(predict, obj.inference_scheduler(), z, 30, torch.Generator(), (15, 240, 426)).double()
    total, abs_total, picks = RF_SAMPLE
    assert out.sum().item() == pytest.approx(total, rel=2e-5)
    assert out.abs().sum().item() == pytest.approx(abs_total, rel=2e-5)
    for (c, f), value in picks.items():
        assert out[0, c, f, 1, 2].item() == pytest.approx(value, rel=2e-5)


def test_opensora_1_0_guidance_mixes_the_first_three_eps_channels() -> None:
    """v1.0.0 opensora/schedulers/iddpm/__init__.py `forward_with_cfg` guides `model_out[:, :3]` and keeps the
    rest (eps channel 3 and the variance channels) from the conditional pass; the released samples were made so."""

    def stand_in(x, timestep, encoder_hidden_states, encoder_attention_mask):  # noqa: ANN001, ANN202
        y = encoder_hidden_states.mean(dim=(1, 2)).view(-1, 1, 1, 1, 1)
        return torch.cat([x + y, x - y], dim=1)

    cond = {"text_embeds": torch.full((1, 4, 8), 0.5), "text_mask": torch.ones(1, 4)}
    uncond = {"text_embeds": torch.full((1, 4, 8), -0.25), "text_mask": torch.ones(1, 4)}
    x = torch.zeros(1, 4, 1, 2, 2)
    out = get_family("opensora").guided(stand_in, cond, uncond, 7.0, None)(x, torch.tensor([500]))
    assert torch.allclose(out[:, :3], torch.full_like(out[:, :3], -0.25 + 7.0 * 0.75))
    assert torch.allclose(out[:, 3], torch.full_like(out[:, 3], 0.5))  # conditional, unguided
    assert torch.allclose(out[:, 4:], torch.full_like(out[:, 4:], -0.5))


def test_shift_frame_count_is_their_num_frames_rule() -> None:
    """Their `timestep_transform` counts `num_frames // 17 * 5` (1 for an image); we only see latent frames, which
    the family maps back exactly for every clip of 17+ frames (and for images)."""
    from flowspeed.engines.models.opensora import shift_frames

    fam = get_family("opensora1.2")
    assert shift_frames(fam.latent_frame_count(1)) == 1
    for n in range(17, 700):
        assert shift_frames(fam.latent_frame_count(n)) == n // 17 * 5, n
