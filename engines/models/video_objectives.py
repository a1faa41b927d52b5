"""The training objectives and samplers of the video DiTs that diffusers does not ship as pipelines.

Each is what its authors trained with, on latents x0 (B, C, T', H', W') and a denoiser `predict(x_t, t) -> output`:

- `RectifiedFlow` (OpenSora 1.2, `opensora/schedulers/rf` at v1.2.0): x_t = (1 - t/1000) x0 + (t/1000) eps, the model
  predicts v = x0 - eps, t drawn logit-normal then shifted towards noise by sqrt(pixels / 512^2) x sqrt(latent frames)
  (their `timestep_transform`, whose latent frame count is `frames // 17 * 5` for their VAE). Frames where
  `x_mask` is False are kept clean (t = 0) and left out of the loss: image/video conditioning.
  Sampling: diffusers' `FlowMatchEulerDiscreteScheduler`, whose `shift` is exactly that transform
  (s' = k s / (1 + (k - 1) s)), over OpenSora's uniform grid (1 - i/N); its velocity is eps - x0, so -v is fed.
- `IDDPM` (OpenSora 1.0, `opensora/schedulers/iddpm` at v1.0.0): linear betas 1e-4..0.02 over 1000 steps, eps
  prediction with a learned variance range (the model outputs 2C channels): loss = MSE(eps) + the variational bound
  on the variance head with the mean detached (improved-diffusion's hybrid loss, `LossType.MSE`). Sampling:
  diffusers' `DDPMScheduler(variance_type="learned_range")`, which respaces the variance like their SpacedDiffusion.
  Guidance mixes all C eps channels (OpenSora 1.0's `forward_with_cfg` mixes only the first 3, a PixArt leftover).
- `VPrediction` (OpenSoraPlan 1.2/1.3, `opensora/train/train_t2v_diffusers.py` at v1.3.0 with `--prediction_type
  v_prediction --rescale_betas_zero_snr --snr_gamma 5.0`): diffusers' `DDPMScheduler` defaults with zero-terminal-SNR
  betas, v target from `get_velocity`, min-SNR-5 weights min(snr, 5) / (snr + 1). Sampling: their
  `EulerAncestralDiscrete` with the same betas and trailing timesteps.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import Any

import torch
from diffusers import DDPMScheduler, EulerAncestralDiscreteScheduler, FlowMatchEulerDiscreteScheduler
from diffusers.training_utils import compute_snr

Predict = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (x_t, t (B,)) -> model output


def _mean_over(x: torch.Tensor, frame_mask: torch.Tensor | None) -> torch.Tensor:
    """Mean of (B, C, T, H, W) over the frames whose mask (B, T) is True (all frames without a mask)."""
    if frame_mask is None:
        return x.mean()
    m = frame_mask[:, None, :, None, None].to(x.dtype).expand_as(x)
    return (x * m).sum() / m.sum().clamp(min=1.0)


class Objective(ABC):
    name: str
    #: output channels per latent channel (2 for a learned variance)
    out_channel_factor: int = 1

    @abstractmethod
    def loss(
        self,
        predict: Predict,
        x0: torch.Tensor,
        generator: torch.Generator,
        *,
        frame_mask: torch.Tensor | None = None,
        shape: tuple[int, int, int] | None = None,
    ) -> torch.Tensor:
        """Training loss on clean latents x0 (B, C, T, H, W). `frame_mask` (B, T): True = frame is generated (False
        frames are conditioning, kept clean). `shape` (latent frames, pixel height, pixel width) for
        resolution-aware schedules."""

    @abstractmethod
    def inference_scheduler(self) -> Any:
        """The diffusers scheduler the export carries for sampling."""

    @abstractmethod
    def sample(
        self,
        predict: Predict,
        scheduler: Any,
        noise: torch.Tensor,
        steps: int,
        generator: torch.Generator,
        shape: tuple[int, int, int],
    ) -> torch.Tensor:
        """Denoise `noise` (B, C, T, H, W) in `steps`; `predict` already applies classifier-free guidance."""


class RectifiedFlow(Objective):
    name = "rflow"

    def __init__(self, num_timesteps: int = 1000, base_pixels: int = 512**2):
        self.num_timesteps = num_timesteps
        self.base_pixels = base_pixels

    def shift(self, shape: tuple[int, int, int] | None) -> float:
        """OpenSora 1.2's resolution- and length-dependent shift k for `shape` = (latent frames, pixel height, pixel
        width); their transform counts latent frames as `frames // 17 * 5`, which is what their VAE yields."""
        if shape is None:
            return 1.0
        latent_frames, height, width = shape
        return math.sqrt(height * width / self.base_pixels) * math.sqrt(latent_frames)

    def loss(self, predict, x0, generator, *, frame_mask=None, shape=None):  # noqa: ANN001, ANN201
        b = x0.shape[0]
        s = torch.sigmoid(torch.randn(b, generator=generator)).to(x0.device)  # logit-normal(0, 1)
        k = self.shift(shape)
        s = k * s / (1 + (k - 1) * s)  # (B,) fraction of noise
        noise = torch.randn(x0.shape, generator=generator).to(x0.device, x0.dtype)
        view = (-1, 1, 1, 1, 1)
        x_t = (1 - s).view(view) * x0 + s.view(view) * noise
        if frame_mask is not None:  # conditioning frames stay clean (t0 = 0)
            x_t = torch.where(frame_mask[:, None, :, None, None], x_t, x0)
        out = predict(x_t, s * self.num_timesteps)
        v = out[:, : x0.shape[1]].float()
        return _mean_over((v - (x0 - noise).float()) ** 2, frame_mask)

    def inference_scheduler(self) -> FlowMatchEulerDiscreteScheduler:
        return FlowMatchEulerDiscreteScheduler(num_train_timesteps=self.num_timesteps, shift=1.0)

    def sample(self, predict, scheduler, noise, steps, generator, shape):  # noqa: ANN001, ANN201
        scheduler = FlowMatchEulerDiscreteScheduler.from_config(scheduler.config, shift=self.shift(shape))
        scheduler.set_timesteps(sigmas=[1.0 - i / steps for i in range(steps)], device=noise.device)
        z = noise
        for t in scheduler.timesteps:
            v = predict(z, t.expand(z.shape[0]).to(z.dtype))[:, : z.shape[1]]
            z = scheduler.step(-v, t, z, return_dict=False)[0]  # diffusers' velocity is eps - x0
        return z


class IDDPM(Objective):
    name = "iddpm"
    out_channel_factor = 2

    def __init__(self, num_timesteps: int = 1000):
        self.scheduler = DDPMScheduler(
            num_train_timesteps=num_timesteps, beta_start=1e-4, beta_end=0.02, beta_schedule="linear",
            variance_type="learned_range", clip_sample=False, prediction_type="epsilon",
        )  # fmt: skip
        betas = self.scheduler.betas.double()
        ac = self.scheduler.alphas_cumprod.double()
        ac_prev = torch.cat([ac.new_ones(1), ac[:-1]])
        self.post_var = betas * (1 - ac_prev) / (1 - ac)
        # improved-diffusion clips the t=0 posterior variance (0 there) to the t=1 value before the log
        self.post_logvar = torch.log(torch.cat([self.post_var[1:2], self.post_var[1:]]))
        self.coef_x0 = betas * ac_prev.sqrt() / (1 - ac)
        self.coef_xt = (1 - ac_prev) * (1 - betas).sqrt() / (1 - ac)
        self.log_betas = torch.log(betas)
        self.ac = ac

    def loss(self, predict, x0, generator, *, frame_mask=None, shape=None):  # noqa: ANN001, ANN201
        b, c = x0.shape[:2]
        t = torch.randint(0, self.scheduler.config.num_train_timesteps, (b,), generator=generator).to(x0.device)
        noise = torch.randn(x0.shape, generator=generator).to(x0.device, x0.dtype)
        x_t = self.scheduler.add_noise(x0, noise, t)
        out = predict(x_t, t).float()
        eps, var_raw = out[:, :c], out[:, c:]
        mse = _mean_over((eps - noise.float()) ** 2, frame_mask)
        vb = self._vb(eps.detach(), var_raw, x0.float(), x_t.float(), t)  # (B, C, T, H, W) in bits
        return mse + _mean_over(vb, frame_mask)

    def _vb(self, eps: torch.Tensor, var_raw: torch.Tensor, x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor):
        """KL(q(x_{t-1} | x_t, x0) || p(x_{t-1} | x_t)) per element, and at t = 0 the decoder NLL (bits)."""

        def at(arr: torch.Tensor) -> torch.Tensor:
            return arr.to(x0.device)[t].float().view(-1, 1, 1, 1, 1)

        frac = (var_raw + 1) / 2
        logvar = frac * at(self.log_betas) + (1 - frac) * at(self.post_logvar)
        x0_pred = (x_t - (1 - at(self.ac)).sqrt() * eps) / at(self.ac).sqrt()
        mean = at(self.coef_x0) * x0_pred + at(self.coef_xt) * x_t
        true_mean = at(self.coef_x0) * x0 + at(self.coef_xt) * x_t
        true_logvar = at(self.post_logvar)
        sq = (true_mean - mean) ** 2
        kl = 0.5 * (-1 + logvar - true_logvar + torch.exp(true_logvar - logvar) + sq * torch.exp(-logvar))
        nll = -_discretized_gaussian_log_likelihood(x0, mean, 0.5 * logvar)
        first = (t == 0).view(-1, 1, 1, 1, 1)
        return torch.where(first, nll, kl) / math.log(2.0)

    def inference_scheduler(self) -> DDPMScheduler:
        return DDPMScheduler.from_config(self.scheduler.config)

    def sample(self, predict, scheduler, noise, steps, generator, shape):  # noqa: ANN001, ANN201
        scheduler.set_timesteps(steps, device=noise.device)
        z = noise
        for t in scheduler.timesteps:
            out = predict(z, t.expand(z.shape[0]))
            z = scheduler.step(out, t, z, generator=generator, return_dict=False)[0]
        return z


def _discretized_gaussian_log_likelihood(x: torch.Tensor, mean: torch.Tensor, log_scale: torch.Tensor) -> torch.Tensor:
    """improved-diffusion's decoder likelihood of data in [-1, 1] quantised to 256 levels, per element."""

    def cdf(v: torch.Tensor) -> torch.Tensor:
        return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (v + 0.044715 * v**3)))

    inv_std = torch.exp(-log_scale)
    cdf_plus, cdf_minus = cdf(inv_std * (x - mean + 1 / 255)), cdf(inv_std * (x - mean - 1 / 255))
    log_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus = torch.log((1 - cdf_minus).clamp(min=1e-12))
    log_delta = torch.log((cdf_plus - cdf_minus).clamp(min=1e-12))
    return torch.where(x < -0.999, log_plus, torch.where(x > 0.999, log_one_minus, log_delta))


class VPrediction(Objective):
    name = "v_prediction"

    def __init__(self, snr_gamma: float | None = 5.0):
        self.scheduler = DDPMScheduler(prediction_type="v_prediction", rescale_betas_zero_snr=True)
        self.snr_gamma = snr_gamma

    def loss(self, predict, x0, generator, *, frame_mask=None, shape=None):  # noqa: ANN001, ANN201
        b = x0.shape[0]
        t = torch.randint(0, self.scheduler.config.num_train_timesteps, (b,), generator=generator).to(x0.device)
        noise = torch.randn(x0.shape, generator=generator).to(x0.device, x0.dtype)
        x_t = self.scheduler.add_noise(x0, noise, t)
        target = self.scheduler.get_velocity(x0, noise, t).float()
        err = (predict(x_t, t)[:, : x0.shape[1]].float() - target) ** 2
        if self.snr_gamma is not None:
            snr = compute_snr(self.scheduler, t.cpu()).to(x0.device)
            weight = torch.minimum(snr, torch.full_like(snr, self.snr_gamma)) / (snr + 1)
            err = err * weight.view(-1, 1, 1, 1, 1)
        return _mean_over(err, frame_mask)

    def inference_scheduler(self) -> EulerAncestralDiscreteScheduler:
        return EulerAncestralDiscreteScheduler(
            prediction_type="v_prediction", rescale_betas_zero_snr=True, timestep_spacing="trailing"
        )

    def sample(self, predict, scheduler, noise, steps, generator, shape):  # noqa: ANN001, ANN201
        scheduler.set_timesteps(steps, device=noise.device)
        z = noise * scheduler.init_noise_sigma
        for t in scheduler.timesteps:
            x_in = scheduler.scale_model_input(z, t)
            out = predict(x_in, t.expand(z.shape[0]))[:, : z.shape[1]]
            z = scheduler.step(out, t, z, generator=generator, return_dict=False)[0]
        return z


OBJECTIVES: dict[str, type[Objective]] = {cls.name: cls for cls in (RectifiedFlow, IDDPM, VPrediction)}
