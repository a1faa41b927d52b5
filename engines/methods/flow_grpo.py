"""Flow-GRPO (Liu et al. 2025, "Flow-GRPO: Training Flow Matching Models via Online RL") for the flow-matching image
families (`configs.catalog.FLOW_GRPO_FAMILIES`: SD3, Flux): samples drawn with an SDE, scored by a reward.

    train: {method: {name: flow_grpo, rewards: [{name: clip_score}], group_size: 4, kl_coef: 0.04},
            lora: {enabled: true}}

The data is the family's ordinary cache: each record's text embeddings are the prompt, its caption the text the
reward reads, its latent shape (2C, h, w) the sample's shape. Per micro-batch of B prompts:

1. rollouts: `group_size` (G) starts per prompt from N(0, I), integrated over the family's sampling grid
   (`family.sampling_sigmas`: its scheduler's `set_timesteps` with its shift, as its pipeline samples,
   `sampling_steps` steps) by the SDE below, the whole B x G batch in one denoiser call per step, in eval mode
   without grad. Every step's (x_t, x_next) and log-probability is kept. No classifier-free guidance: the cache
   holds no negative-prompt embeddings (the authors' no-CFG configs sample and train at guidance 1 likewise);
2. rewards: the final latents decoded by the family's VAE (scaling and shift undone as its pipeline does) to uint8
   frames, scored by `evaluation.rewards`; advantages per prompt group (r - mean) / (std + 1e-4);
3. loss: for every stored step, the reference's transition mean (under no_grad; with LoRA the policy with its adapters
   off), then the policy's log-probability of the stored x_next; ratio = exp(logp - old logp), the
   PPO-clipped surrogate max(-A ratio, -A clip(ratio, 1 - eps, 1 + eps)) plus kl_coef x the KL of the two Gaussian
   transitions, averaged over samples and steps. One update per rollout batch (on-policy).

The SDE step (the paper's eq. 9; the authors' `sde_step_with_logprob`, sde_type "sde"): from x at sigma to sigma_next
(dt = sigma_next - sigma < 0), with s = a sqrt(sigma / (1 - sigma)) (a = `noise_level`, 0.7 by default; at sigma = 1
the denominator takes the grid's second sigma instead, as theirs does):
    mean = x (1 + s^2 dt / (2 sigma)) + v (1 + s^2 (1 - sigma) / (2 sigma)) dt,    std = s sqrt(-dt)
and x_next = mean + std eps. The log-probability is the Gaussian log density averaged over the latent's elements (the
authors' convention: it keeps the ratio's scale independent of the image size). The KL penalty is the authors' code's
||mean - mean_ref||^2 / (2 s^2), averaged over elements likewise: the exact KL of the policy's and the reference's
Gaussian transitions (variance s^2 |dt|) times |dt|, the scale their kl_coef (beta: 0.04 GenEval / OCR, 0.01
PickScore) was tuned at. The exact KL under the same coefficient would weigh 1/|dt| more (10x to 110x on SD3's
10-step grid, whose last step is 0.009 long): on the tiny SD3 it held the reward flat over 20 steps where this one
lets it rise. train/kl logs the penalised quantity.

The returned loss is the micro-batch's whole objective, one tensor the engine backpropagates once, so gradient sync,
accumulation, clipping and the non-finite check stay the engine's; the price is that autograd keeps every step's
graph until then (memory grows with `sampling_steps` x B x G: use recomputation or fewer steps for large models).
All noise comes from the engine's per-step generator, so a resumed run samples what an uninterrupted one does.

Metrics: train/reward_mean (all rollouts), train/reward_std (the mean within-group standard deviation, as grpo logs
it: 0 means no group had a signal to learn from), train/kl (the penalised KL above, mean over steps and samples) and
train/clip_fraction (share of (sample, step) ratios outside 1 +- clip_range: 0 while there is one update per rollout
batch, where the ratio is 1 in value and its gradient the policy gradient; the authors' clip_range of 1e-4 bites
only from a second update on the same rollouts).
"""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np
import torch
from flowspeed.configs import PipelineConfig
from flowspeed.configs.catalog import FLOW_GRPO_FAMILIES
from flowspeed.engines.methods import MethodContext, TrainingMethod, group_advantages, register_method
from flowspeed.engines.methods.reference import Reference
from flowspeed.engines.models.registry import ModelFamily
from flowspeed.evaluation.rewards import build_reward


def noise_scales(sigmas: torch.Tensor, noise_level: float) -> torch.Tensor:
    """(steps,) the SDE's s at each step's starting sigma: a sqrt(sigma / (1 - sigma)), with the grid's second sigma
    in the denominator where sigma = 1 (where the formula is infinite), as the authors do."""
    sigma = sigmas[:-1]
    return noise_level * torch.sqrt(sigma / (1 - torch.where(sigma == 1, sigmas[1], sigma)))


def sde_transition(
    x: torch.Tensor, velocity: torch.Tensor, sigma: float, sigma_next: float, scale: float
) -> tuple[torch.Tensor, float]:
    """(mean, std) of the Gaussian x_next | x of one SDE step from `sigma` to `sigma_next` with noise scale `scale`."""
    dt = sigma_next - sigma
    mean = x * (1 + scale**2 * dt / (2 * sigma)) + velocity * (1 + scale**2 * (1 - sigma) / (2 * sigma)) * dt
    return mean, scale * (-dt) ** 0.5


def log_prob(x_next: torch.Tensor, mean: torch.Tensor, std: float) -> torch.Tensor:
    """(N,) the Gaussian log density of each sample's x_next, averaged over its elements."""
    lp = -((x_next.detach() - mean) ** 2) / (2 * std**2) - np.log(std) - 0.5 * np.log(2 * np.pi)
    return lp.flatten(1).mean(1)


def decode(vae: torch.nn.Module, latents: torch.Tensor) -> np.ndarray:
    """Denoiser latents (N, C, h, w) -> uint8 frames (N, 1, H, W, 3), as the SD3 and Flux pipelines decode them."""
    z = latents / vae.config.scaling_factor + (vae.config.shift_factor or 0.0)
    images = (vae.decode(z.to(next(vae.parameters()).dtype)).sample.float() / 2 + 0.5).clamp(0, 1)
    return (images.permute(0, 2, 3, 1) * 255).round().to(torch.uint8).cpu().numpy()[:, None]


class FlowGRPO(TrainingMethod):
    name: ClassVar[str] = "flow_grpo"
    token_normalized: ClassVar[bool] = False

    def check(self, family: ModelFamily, cfg: PipelineConfig) -> None:
        if family.name not in FLOW_GRPO_FAMILIES or not hasattr(family, "flow_velocity"):
            raise ValueError(
                f"train.method.name=flow_grpo trains the flow-matching image families "
                f"({', '.join(FLOW_GRPO_FAMILIES)}); model.family={family.name} is not one: use diffusion_dpo, or sft"
            )
        if not cfg.train.method.rewards:
            raise ValueError("train.method.name=flow_grpo needs train.method.rewards (e.g. [{name: clip_score}])")
        if cfg.train.packing.max_tokens is not None:
            raise ValueError("train.method.name=flow_grpo samples whole images per prompt: set "
                             "train.packing.max_tokens: null")  # fmt: skip

    def setup(self, ctx: MethodContext) -> None:
        cfg = ctx.cfg
        ctx.state["flow_grpo"] = {
            "reference": Reference(ctx),
            "vae": ctx.family.load_vae(cfg.model).to(ctx.device),
            "reward": build_reward(ctx.method.rewards, cfg.eval.clip, ctx.device),
            "sigmas": {},  # latent shape -> its sampling grid
        }

    def collate(self, family: ModelFamily, items: list[dict[str, torch.Tensor]], pack: bool) -> dict[str, torch.Tensor]:
        return family.collate(items)

    def loss(
        self, ctx: MethodContext, batch: dict[str, torch.Tensor], records: list[dict[str, Any]],
        generator: torch.Generator,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:  # fmt: skip
        m, state, family, device = ctx.method, ctx.state["flow_grpo"], ctx.family, ctx.device
        g = m.group_size
        shape = tuple(records[0]["latent_shape"])
        c, h, w = shape[0] // 2, shape[1], shape[2]  # the cache keeps the posterior's (mean, logvar): 2C channels
        if shape not in state["sigmas"]:
            state["sigmas"][shape] = family.sampling_sigmas(ctx.scheduler, m.sampling_steps, (c, h, w)).tolist()
        sigmas = state["sigmas"][shape]
        scales = noise_scales(torch.tensor(sigmas, dtype=torch.float64), m.noise_level).tolist()
        # prompt i -> rows iG .. iG + G - 1
        cond = {k: batch[k].repeat_interleave(g, dim=0) for k in ("text_embeds", "pooled_embeds")}
        n = cond["text_embeds"].shape[0]

        # 1. rollouts: the policy as it is now, no grad, eval mode (no dropout in what the log-probs are compared to)
        was_training = ctx.model.training
        ctx.model.eval()
        xs, old_logps = [torch.randn((n, c, h, w), generator=generator).to(device)], []
        try:
            with torch.no_grad():
                for j in range(len(sigmas) - 1):
                    v = family.flow_velocity(ctx.model, xs[-1], torch.full((n,), sigmas[j], device=device), cond)
                    mean, std = sde_transition(xs[-1], v, sigmas[j], sigmas[j + 1], scales[j])
                    x_next = mean + std * torch.randn(mean.shape, generator=generator).to(device)
                    old_logps.append(log_prob(x_next, mean, std))
                    xs.append(x_next)
                # 2. rewards and group advantages
                frames = decode(state["vae"], xs[-1])
                rewards = state["reward"].media(frames, [r["caption"] for r in records for _ in range(g)]).to(device)
        finally:
            ctx.model.train(was_training)
        adv, group_std = group_advantages(rewards, g, unbiased=False)  # Flow-GRPO's stat tracker: numpy's std

        # 3. the reference's transition means first, then the policy's log-probabilities with grad
        with state["reference"].use() as ref:
            ref_means = [
                sde_transition(xs[j], family.flow_velocity(ref, xs[j], torch.full((n,), sigmas[j], device=device),
                                                           cond), sigmas[j], sigmas[j + 1], scales[j])[0]
                for j in range(len(sigmas) - 1)
            ]  # fmt: skip
        total, kls, clipped = torch.zeros((), device=device), [], []
        for j in range(len(sigmas) - 1):
            v = family.flow_velocity(ctx.model, xs[j], torch.full((n,), sigmas[j], device=device), cond)
            mean, std = sde_transition(xs[j], v, sigmas[j], sigmas[j + 1], scales[j])
            ratio = torch.exp(log_prob(xs[j + 1], mean, std) - old_logps[j])
            bounded = ratio.clamp(1 - m.clip_range, 1 + m.clip_range)
            policy = torch.maximum(-adv * ratio, -adv * bounded).mean()
            kl = ((mean - ref_means[j]) ** 2).flatten(1).mean(1) / (2 * scales[j] ** 2)  # the authors' (see top)
            total = total + policy + m.kl_coef * kl.mean()
            kls.append(kl.detach().mean())
            clipped.append(((ratio.detach() - 1).abs() > m.clip_range).float().mean())
        steps = len(sigmas) - 1
        metrics = {
            "train/reward_mean": rewards.mean(),
            "train/reward_std": group_std.mean(),
            "train/kl": torch.stack(kls).mean(),
            "train/clip_fraction": torch.stack(clipped).mean(),
        }
        return total / steps, metrics


register_method(FlowGRPO())
