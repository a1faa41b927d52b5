"""The video DiT objectives against an oracle denoiser that knows x0: its training loss is zero and the sampler, run
through diffusers' scheduler, lands on x0. That pins each parametrisation (sign, scale, timestep units) end to end;
OpenSora 1.2's resolution shift is checked against their `timestep_transform` formula, written out here."""

from __future__ import annotations

import math

import pytest
import torch
from flowspeed.engines.models.video_objectives import IDDPM, RectifiedFlow, VPrediction

X0 = torch.randn(2, 4, 3, 4, 4, generator=torch.Generator().manual_seed(0))


def test_rflow_shift_is_opensoras_timestep_transform() -> None:
    rf = RectifiedFlow()
    # 240p 16:9, 51 frames -> their VAE's 51 // 17 * 5 = 15 latent frames
    k = rf.shift((15, 240, 426))
    assert k == pytest.approx(math.sqrt(240 * 426 / 512**2) * math.sqrt(15))
    sched = rf.inference_scheduler()
    from diffusers import FlowMatchEulerDiscreteScheduler

    sched = FlowMatchEulerDiscreteScheduler.from_config(sched.config, shift=k)
    steps = 30
    sched.set_timesteps(sigmas=[1 - i / steps for i in range(steps)])
    t = torch.tensor([1 - i / steps for i in range(steps)], dtype=torch.float64)
    theirs = k * t / (1 + (k - 1) * t) * 1000  # timestep_transform(t * 1000) at v1.2.0
    assert torch.allclose(sched.timesteps.double(), theirs, atol=1e-3)


def test_rflow_oracle_has_zero_loss_and_samples_x0() -> None:
    rf = RectifiedFlow()

    def oracle(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:  # v = x0 - eps = (x0 - x_t) / s
        s = (t / 1000).view(-1, 1, 1, 1, 1)
        return (X0 - x_t) / s

    g = torch.Generator().manual_seed(1)
    assert rf.loss(oracle, X0, g, shape=(3, 32, 32)).item() < 1e-8
    mask = torch.tensor([[False, True, True], [True, True, True]])  # frame 0 of sample 0 conditions
    assert rf.loss(oracle, X0, g, frame_mask=mask, shape=(3, 32, 32)).item() < 1e-8
    noise = torch.randn(X0.shape, generator=g)
    z = rf.sample(oracle, rf.inference_scheduler(), noise, 8, g, (3, 256, 256))
    assert torch.allclose(z, X0, atol=1e-4)
    # a wrong-signed velocity must not pass
    assert rf.loss(lambda x, t: -oracle(x, t), X0, g).item() > 0.1


def test_iddpm_oracle_has_zero_mse_and_kl_and_samples_x0() -> None:
    obj = IDDPM()
    ac = obj.scheduler.alphas_cumprod

    def oracle(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        a = ac[t.long()].view(-1, 1, 1, 1, 1)
        eps = (x_t - a.sqrt() * X0) / (1 - a).sqrt()
        return torch.cat([eps, -torch.ones_like(eps)], dim=1)  # var_raw = -1: the true posterior variance

    g = torch.Generator().manual_seed(2)
    # t = 0 draws carry the decoder NLL, which is not zero; every other t has KL(q || p) = 0 for the oracle
    losses = [obj.loss(oracle, X0, torch.Generator().manual_seed(s)).item() for s in range(5)]
    assert min(losses) < 1e-6
    noise = torch.randn(X0.shape, generator=g)
    z = obj.sample(oracle, obj.inference_scheduler(), noise, 10, g, (3, 32, 32))
    assert torch.allclose(z, X0, atol=1e-3)
    assert obj.out_channel_factor == 2


def test_v_prediction_oracle_has_zero_loss_and_samples_x0() -> None:
    obj = VPrediction()
    ac = obj.scheduler.alphas_cumprod

    def oracle(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        a = ac[t.long()].view(-1, 1, 1, 1, 1)
        eps = (x_t - a.sqrt() * X0) / (1 - a).clamp(min=1e-12).sqrt()
        return a.sqrt() * eps - (1 - a).sqrt() * X0

    g = torch.Generator().manual_seed(3)
    assert obj.loss(oracle, X0, g).item() < 1e-8
    sched = obj.inference_scheduler()

    def scaled_oracle(x_in: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        # the Euler scheduler feeds x / sqrt(sigma^2 + 1) = the DDPM x_t of timestep t
        return oracle(x_in, t)

    z = obj.sample(scaled_oracle, sched, torch.randn(X0.shape, generator=g), 10, g, (3, 32, 32))
    assert torch.allclose(z, X0, atol=1e-3)
