"""The training objectives and samplers of the video DiTs that diffusers does not ship as pipelines.

Each is what its authors trained with, on latents x0 (B, C, T', H', W') and a denoiser `predict(x_t, t) -> output`:

- `RectifiedFlow` (OpenSora 1.2, `opensora/schedulers/rf` at v1.2.0): x_t = (1 - t/1000) x0 + (t/1000) eps, the model
  predicts v = x0 - eps in the first half of its output channels when it has twice the latent channels (their
  `chunk(2, dim=1)[0]`; STDiT3's released head keeps PixArt's learned-sigma width), t drawn logit-normal then shifted
  towards noise by sqrt(pixels / 512^2) x sqrt(frames) (their `timestep_transform`; its frame count is
  `num_frames // 17 * 5`, which the family maps from latent frames through `shift_frames`). Frames where `x_mask` is
  False are kept clean (t = 0) and left out of each sample's mean: image/video conditioning. Sampling: diffusers'
  `FlowMatchEulerDiscreteScheduler`, whose `shift` is exactly that transform (s' = k s / (1 + (k - 1) s)), over
  OpenSora's uniform grid (1 - i/N); its velocity is eps - x0, so -v is fed.
- `IDDPM` (OpenSora 1.0, `opensora/schedulers/iddpm` at v1.0.0): linear betas 1e-4..0.02 over 1000 steps, eps
  prediction with a learned variance range (the model outputs 2C channels): loss = MSE(eps) + the variational bound
  on the variance head with the mean detached (improved-diffusion's hybrid loss, `LossType.MSE`). Sampling:
  diffusers' `DDPMScheduler(variance_type="learned_range")` over improved-diffusion's respaced timesteps
  (`respaced_timesteps`: their `space_timesteps(1000, "100")` keeps 100 indices 0..999 at a stride of 999/99, rounded),
  the model seeing the original indices, as their SpacedDiffusion does. Guidance is the family's (OpenSora 1.0 mixes
  only the first 3 eps channels, as the authors' `forward_with_cfg` does).
- `EpsilonPrediction` / `VPrediction` (OpenSoraPlan; `opensora/train/train_t2v_diffusers.py`): diffusers'
  `DDPMScheduler` training with uniform integer t, a noise offset `offset * N(0, 1)` per (sample, channel) added to the
  noise (the target includes it), and min-SNR weights min(snr, gamma) / snr (eps) or / (snr + 1) (v), the batch's
  global mean. v1.2.0 (`train_t2v.sh` + parser defaults): eps on the default linear betas, gamma 5, offset 0.02,
  sampled by a default `EulerAncestralDiscreteScheduler()` (eps, linspace spacing). v1.3.0 (`train_t2v_v1_3.sh`):
  `--prediction_type v_prediction --rescale_betas_zero_snr --snr_gamma 5.0`, offset 0 (parser default), sampled by
  `EulerAncestralDiscrete` with the same betas and trailing timesteps (`sample_utils.get_scheduler`).
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


def _per_sample_mean(x: torch.Tensor, frame_mask: torch.Tensor | None) -> torch.Tensor:
    """OpenSora's `mean_flat(x, mask)` then the batch mean: each sample's mean over its masked-in frames (all frames
    without a mask), averaged over samples."""
    if frame_mask is None:
        return x.mean()
    m = frame_mask[:, None, :, None, None].to(x.dtype).expand_as(x)
    return ((x * m).flatten(1).sum(1) / m.flatten(1).sum(1).clamp(min=1.0)).mean()


class RectifiedFlow(Objective):
    name = "rflow"

    def __init__(
        self, num_timesteps: int = 1000, base_pixels: int = 512**2, shift_frames: Callable[[int], int] | None = None
    ) -> None:
        """`shift_frames`: latent frame count -> the frame count the shift uses (OpenSora 1.2 counts its VAE's frames
        its own way; see opensora.py); None uses the latent frame count."""
        self.num_timesteps = num_timesteps
        self.base_pixels = base_pixels
        self.shift_frames = shift_frames

    def shift(self, shape: tuple[int, int, int] | None) -> float:
        """OpenSora 1.2's resolution- and length-dependent shift k for `shape` = (latent frames, pixel height, pixel
        width): sqrt(H W / 512^2) x sqrt(frames) (their `timestep_transform`), 1 without a shape."""
        if shape is None:
            return 1.0
        latent_frames, height, width = shape
        frames = latent_frames if self.shift_frames is None else self.shift_frames(latent_frames)
        return math.sqrt(height * width / self.base_pixels) * math.sqrt(frames)

    def loss(self, predict, x0, generator, *, frame_mask=None, shape=None):  # noqa: ANN001, ANN201
        b = x0.shape[0]
        s = torch.sigmoid(torch.randn(b, generator=generator)).to(x0.device)  # logit-normal(0, 1)
        k = self.shift(shape)
        s = k * s / (1 + (k - 1) * s)  # (B,) fraction of noise
        noise = torch.randn(x0.shape, generator=generator).to(x0.device, x0.dtype)
        return self.loss_at(predict, x0, noise, s * self.num_timesteps, frame_mask)

    def loss_at(
        self,
        predict: Predict,
        x0: torch.Tensor,
        noise: torch.Tensor,
        t: torch.Tensor,
        frame_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The loss at given timesteps t (B,) in [0, num_timesteps] (already shifted) and noise: their
        `RFlowScheduler.training_losses(..., t=t)` averaged over the batch. The velocity is the first half of the
        output channels when the model has twice the latent channels (their `chunk(2, dim=1)[0]`)."""
        s = (t.float() / self.num_timesteps).view(-1, 1, 1, 1, 1)
        x_t = (1 - s) * x0 + s * noise
        if frame_mask is not None:  # conditioning frames stay clean (t0 = 0)
            x_t = torch.where(frame_mask[:, None, :, None, None], x_t, x0)
        v = predict(x_t, t)[:, : x0.shape[1]].float()
        return _per_sample_mean((v - (x0.float() - noise.float())) ** 2, frame_mask)

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
        # the loss's tables in float64, as improved-diffusion builds them (numpy): diffusers' float32 alphas_cumprod
        # is off by 2e-4 relative in 1 - alpha_bar at t = 0, which moves the decoder NLL term by 0.4%
        betas = torch.linspace(1e-4, 0.02, num_timesteps, dtype=torch.float64)
        ac = torch.cumprod(1 - betas, dim=0)
        ac_prev = torch.cat([ac.new_ones(1), ac[:-1]])
        self.post_var = betas * (1 - ac_prev) / (1 - ac)
        # improved-diffusion clips the t=0 posterior variance (0 there) to the t=1 value before the log
        self.post_logvar = torch.log(torch.cat([self.post_var[1:2], self.post_var[1:]]))
        self.coef_x0 = betas * ac_prev.sqrt() / (1 - ac)
        self.coef_xt = (1 - ac_prev) * (1 - betas).sqrt() / (1 - ac)
        self.log_betas = torch.log(betas)
        self.ac = ac

    def loss(self, predict, x0, generator, *, frame_mask=None, shape=None):  # noqa: ANN001, ANN201
        b = x0.shape[0]
        t = torch.randint(0, self.scheduler.config.num_train_timesteps, (b,), generator=generator).to(x0.device)
        noise = torch.randn(x0.shape, generator=generator).to(x0.device, x0.dtype)
        return self.loss_at(predict, x0, noise, t, frame_mask)

    def loss_at(
        self,
        predict: Predict,
        x0: torch.Tensor,
        noise: torch.Tensor,
        t: torch.Tensor,
        frame_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The loss at given integer timesteps t (B,) and noise: their `GaussianDiffusion.training_losses(model, x0,
        t, noise=noise)["loss"]` (MSE on eps + the variance head's bound) averaged over the batch."""
        c = x0.shape[1]
        x_t = self._at(self.ac.sqrt(), t, x0) * x0 + self._at((1 - self.ac).sqrt(), t, x0) * noise
        out = predict(x_t, t).float()
        eps, var_raw = out[:, :c], out[:, c:]
        mse = _mean_over((eps - noise.float()) ** 2, frame_mask)
        vb = self._vb(eps.detach(), var_raw, x0.float(), x_t.float(), t)  # (B, C, T, H, W) in bits
        return mse + _mean_over(vb, frame_mask)

    def _vb(self, eps: torch.Tensor, var_raw: torch.Tensor, x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor):
        """KL(q(x_{t-1} | x_t, x0) || p(x_{t-1} | x_t)) per element, and at t = 0 the decoder NLL (bits)."""

        def at(arr: torch.Tensor) -> torch.Tensor:
            return self._at(arr, t, x0)

        frac = (var_raw + 1) / 2
        logvar = frac * at(self.log_betas) + (1 - frac) * at(self.post_logvar)
        x0_pred = at(self.ac.rsqrt()) * x_t - at((1 / self.ac - 1).sqrt()) * eps  # coefficients from float64
        mean = at(self.coef_x0) * x0_pred + at(self.coef_xt) * x_t
        true_mean = at(self.coef_x0) * x0 + at(self.coef_xt) * x_t
        true_logvar = at(self.post_logvar)
        sq = (true_mean - mean) ** 2
        kl = 0.5 * (-1 + logvar - true_logvar + torch.exp(true_logvar - logvar) + sq * torch.exp(-logvar))
        nll = -_discretized_gaussian_log_likelihood(x0, mean, 0.5 * logvar)
        first = (t == 0).view(-1, 1, 1, 1, 1)
        return torch.where(first, nll, kl) / math.log(2.0)

    @staticmethod
    def _at(table: torch.Tensor, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """table[t] as float32 (B, 1, 1, 1, 1) on `like`'s device: their `_extract_into_tensor`."""
        return table[t.cpu()].float().to(like.device).view(-1, 1, 1, 1, 1)

    def inference_scheduler(self) -> DDPMScheduler:
        return DDPMScheduler.from_config(self.scheduler.config)

    def sample(self, predict, scheduler, noise, steps, generator, shape):  # noqa: ANN001, ANN201
        timesteps = respaced_timesteps(scheduler.config.num_train_timesteps, steps)
        scheduler.set_timesteps(timesteps=timesteps, device=noise.device)
        z = noise
        for t in scheduler.timesteps:
            out = predict(z, t.expand(z.shape[0]).to(z.device))
            z = scheduler.step(out, t, z, generator=generator, return_dict=False)[0]
        return z


def respaced_timesteps(num_timesteps: int, steps: int) -> list[int]:
    """The timesteps improved-diffusion's `space_timesteps(num_timesteps, str(steps))` keeps (OpenSora 1.0 samples
    with `num_sampling_steps=100`): `steps` points from 0 to num_timesteps - 1 at a fractional stride, each rounded
    as Python rounds, in descending order for diffusers' custom timesteps. The model sees these original indices
    and DDPMScheduler's step between neighbours is the respaced step (betas from the kept alphas_cumprod)."""
    if not 1 <= steps <= num_timesteps:
        raise ValueError(f"IDDPM sampling takes 1..{num_timesteps} steps, not {steps}")
    stride = (num_timesteps - 1) / (steps - 1) if steps > 1 else 1.0
    kept, idx = [], 0.0
    for _ in range(steps):
        kept.append(round(idx))
        idx += stride
    return sorted(set(kept), reverse=True)


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


class _DiffusersDDPM(Objective):
    """OpenSoraPlan's `train_t2v_diffusers.py` objective on a diffusers `DDPMScheduler`; subclasses fix the version."""

    prediction_type: str

    def __init__(self, *, zero_snr: bool, snr_gamma: float | None, noise_offset: float, spacing: str) -> None:
        self.scheduler = DDPMScheduler(prediction_type=self.prediction_type, rescale_betas_zero_snr=zero_snr)
        self.snr_gamma, self.noise_offset, self.spacing = snr_gamma, noise_offset, spacing

    def describe(self) -> str:
        """One line for logs and reports: which objective and sampler a run uses."""
        c = self.scheduler.config
        betas = "zero-terminal-SNR " if c.rescale_betas_zero_snr else ""
        return (f"{self.prediction_type} prediction on {betas}{c.beta_schedule} betas {c.beta_start}..{c.beta_end}, "
                f"min-SNR gamma {self.snr_gamma}, noise offset {self.noise_offset}; sampler EulerAncestralDiscrete "
                f"({self.spacing} timesteps)")  # fmt: skip

    def loss(self, predict, x0, generator, *, frame_mask=None, shape=None):  # noqa: ANN001, ANN201
        b, c = x0.shape[:2]
        t = torch.randint(0, self.scheduler.config.num_train_timesteps, (b,), generator=generator).to(x0.device)
        noise = torch.randn(x0.shape, generator=generator)
        if self.noise_offset:  # one offset per (sample, channel), as the authors draw it
            noise = noise + self.noise_offset * torch.randn((b, c, 1, 1, 1), generator=generator)
        return self.loss_at(predict, x0, noise.to(x0.device, x0.dtype), t, frame_mask)

    def loss_at(
        self,
        predict: Predict,
        x0: torch.Tensor,
        noise: torch.Tensor,
        t: torch.Tensor,
        frame_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The loss at integer timesteps t (B,) for `noise` (offset included): the authors' `run` without its draws."""
        x_t = self.scheduler.add_noise(x0, noise, t)
        if self.prediction_type == "epsilon":
            target = noise.float()
        else:
            target = self.scheduler.get_velocity(x0, noise, t).float()
        err = (predict(x_t, t)[:, : x0.shape[1]].float() - target) ** 2
        if self.snr_gamma is not None:
            snr = compute_snr(self.scheduler, t.cpu()).to(x0.device)
            weight = torch.minimum(snr, torch.full_like(snr, self.snr_gamma))
            weight = weight / snr if self.prediction_type == "epsilon" else weight / (snr + 1)
            err = err * weight.view(-1, 1, 1, 1, 1)
        return _mean_over(err, frame_mask)

    def inference_scheduler(self) -> EulerAncestralDiscreteScheduler:
        c = self.scheduler.config
        return EulerAncestralDiscreteScheduler(
            prediction_type=self.prediction_type, rescale_betas_zero_snr=c.rescale_betas_zero_snr,
            timestep_spacing=self.spacing,
        )  # fmt: skip

    def sample(self, predict, scheduler, noise, steps, generator, shape):  # noqa: ANN001, ANN201
        scheduler.set_timesteps(steps, device=noise.device)
        z = noise * scheduler.init_noise_sigma
        for t in scheduler.timesteps:
            x_in = scheduler.scale_model_input(z, t)
            out = predict(x_in, t.expand(z.shape[0]))[:, : z.shape[1]]
            z = scheduler.step(out, t, z, generator=generator, return_dict=False)[0]
        return z


class EpsilonPrediction(_DiffusersDDPM):
    """OpenSoraPlan v1.2.0: eps on the default DDPM betas, min-SNR 5, noise offset 0.02, default EulerAncestral."""

    name = "epsilon"
    prediction_type = "epsilon"

    def __init__(self, snr_gamma: float | None = 5.0, noise_offset: float = 0.02) -> None:
        super().__init__(zero_snr=False, snr_gamma=snr_gamma, noise_offset=noise_offset, spacing="linspace")


class VPrediction(_DiffusersDDPM):
    """OpenSoraPlan v1.3.0: v on zero-terminal-SNR betas, min-SNR 5, no noise offset, EulerAncestral trailing."""

    name = "v_prediction"
    prediction_type = "v_prediction"

    def __init__(self, snr_gamma: float | None = 5.0, noise_offset: float = 0.0) -> None:
        super().__init__(zero_snr=True, snr_gamma=snr_gamma, noise_offset=noise_offset, spacing="trailing")


OBJECTIVES: dict[str, type[Objective]] = {
    cls.name: cls for cls in (RectifiedFlow, IDDPM, EpsilonPrediction, VPrediction)
}
