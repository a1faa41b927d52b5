"""Diffusion-DPO (`train.method.name: diffusion_dpo`): preference pairs on a diffusion or flow family's own objective.

    data: {manifest: pairs.jsonl}   # rows {"caption": ..., "chosen": "a.png", "rejected": "b.png"}
    train: {method: {name: diffusion_dpo, beta: 5000}}

Wallace et al. 2023, "Diffusion Model Alignment Using Direct Preference Optimization" (SalesforceAIResearch/
DiffusionDPO, train.py): both sides of a pair are noised with the SAME noise at the SAME timestep; the per-sample
denoising losses of the policy (l_w chosen, l_l rejected) and of the frozen reference (r_w, r_l) give

    inside = -0.5 * beta * ((l_w - l_l) - (r_w - r_l)),    loss = -logsigmoid(inside).mean()

so the policy is pushed to denoise the chosen image better than the reference does, relative to the rejected one.
The default beta is the authors' 5000 (`--beta_dpo 5000` in their launchers/sd15.sh and launchers/sdxl.sh); it
multiplies per-sample mean squared errors, so a family whose losses are much larger or smaller may want another.

The objective is each family's own `training_loss` (SD3's weighted flow loss, SDXL's epsilon loss, CogVideoX's
v-loss, ...) under `per_sample_losses()`, called with generators of identical state for the chosen and the
rejected batch: every random draw (posterior sample, noise, timestep) is the same on both sides, as the authors
repeat one half's noise and timesteps for the other. The reference sees the same states again, and runs before the
policy (with LoRA it is the policy with its adapters off).

The reference's losses are computed every step, never cached: they depend on the step's noise and timestep, which
are drawn fresh each step; a cache would only be right for a fixed noise per sample, a different objective from
the authors' (config validation already refuses `reference: precomputed` for this method).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from flowspeed.configs import PipelineConfig
from flowspeed.engines.common.io import read_jsonl
from flowspeed.engines.methods import MethodContext, TrainingMethod, register_method
from flowspeed.engines.methods.reference import Reference
from flowspeed.engines.models.registry import Capability, ModelFamily, per_sample_losses
from torch import nn

#: the authors' beta (SalesforceAIResearch/DiffusionDPO launchers/sd15.sh and sdxl.sh: `--beta_dpo 5000`)
DEFAULT_BETA = 5000.0
#: what the latent prep caches for the rejected side of a pair (datasets_prep/prep.py): `rejected_<name>`
REJECTED = "rejected_"
PAIR_HELP = (
    'a preference manifest: rows {"caption": "...", "chosen": "a.png", "rejected": "b.png"} (JSONL/JSON/CSV/'
    "Parquet), prepped with `flowspeed prep`, which caches both sides' latents (latent_params and "
    "rejected_latent_params)"
)


def require_pairs(records: list[dict[str, Any]], where: str) -> None:
    """Refuse a cache that is not (only) preference pairs: Diffusion-DPO has nothing to compare in a single image."""
    bad = [r for r in records if not r.get("preference") or f"{REJECTED}latent_params" not in r.get("tensors", ())]
    if bad:
        raise ValueError(
            f"train.method.name=diffusion_dpo trains on preference pairs, but {len(bad)} of the {len(records)} "
            f"samples in {where} are not pairs (first: {bad[0].get('source')}); point data.manifest at {PAIR_HELP}"
        )


def split_pair(batch: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """A pairs batch -> (the chosen batch, the rejected batch): the rejected side's tensors under the names the
    family's objective reads, everything else (text embeddings, latent normalisation) shared."""
    chosen = {k: v for k, v in batch.items() if not k.startswith(REJECTED)}
    rejected = {**chosen, **{k.removeprefix(REJECTED): v for k, v in batch.items() if k.startswith(REJECTED)}}
    return chosen, rejected


def pair_losses(
    family: ModelFamily, model: nn.Module, scheduler: Any, chosen: dict[str, torch.Tensor],
    rejected: dict[str, torch.Tensor], generator: torch.Generator,
) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """(chosen, rejected) per-sample losses (B,) of `model`, each side from a copy of `generator`'s state: the same
    noise and timestep for both images of a pair. `generator` itself is not advanced."""
    state = generator.get_state()
    out = []
    for side in (chosen, rejected):
        gen = torch.Generator(device=generator.device)
        gen.set_state(state)
        with per_sample_losses():
            loss = family.training_loss(model, scheduler, side, gen)
        b = side["latent_params"].shape[0]
        if loss.shape != (b,):
            raise ValueError(
                f"train.method.name=diffusion_dpo needs one loss per sample from {family.name}'s objective inside "
                f"per_sample_losses(), got shape {tuple(loss.shape)} for a batch of {b}: its training_loss must end "
                "with `batch_loss(<(B,) per-sample losses>)` (engines/models/registry.py)"
            )
        out.append(loss.float())
    return out[0], out[1]


def dpo_objective(
    l_w: torch.Tensor, l_l: torch.Tensor, r_w: torch.Tensor, r_l: torch.Tensor, beta: float
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The authors' loss and its metrics from the four (B,) per-sample losses. The implicit rewards are
    -0.5 beta (policy - reference) loss per side, so margin = chosen_reward - rejected_reward = inside."""
    scale = -0.5 * beta
    inside = scale * ((l_w - l_l) - (r_w - r_l))
    loss = -F.logsigmoid(inside).mean()
    metrics = {
        "train/chosen_reward": (scale * (l_w - r_w)).mean(),
        "train/rejected_reward": (scale * (l_l - r_l)).mean(),
        "train/margin": inside.mean(),
        "train/accuracy": (inside > 0).float().mean(),
    }
    return loss, {k: v.detach() for k, v in metrics.items()}


class DiffusionDPO(TrainingMethod):
    name = "diffusion_dpo"
    requires = Capability.LATENTS
    token_normalized = False

    def check(self, family: ModelFamily, cfg: PipelineConfig) -> None:
        super().check(family, cfg)
        experts = cfg.model.experts
        if experts is not None and experts.train == "both":
            raise ValueError(
                "train.method.name=diffusion_dpo with model.experts.train=both: the expert pair picks one expert per "
                "call, so the chosen and rejected sides (and the reference) would run different experts; train one "
                "expert at a time (model.experts.train: high_noise or low_noise)"
            )
        samples = cfg.prep_dir / "samples.jsonl"
        if samples.is_file():  # before any model loads; setup checks the records the run actually trains on
            require_pairs(read_jsonl(samples), str(samples))

    def setup(self, ctx: MethodContext) -> None:
        require_pairs(ctx.records, f"{ctx.cfg.prep_dir / 'samples.jsonl'} (the training split)")
        ctx.state["reference"] = Reference(ctx)

    def loss(
        self, ctx: MethodContext, batch: dict[str, torch.Tensor], records: list[dict[str, Any]],
        generator: torch.Generator,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:  # fmt: skip
        chosen, rejected = split_pair(batch)
        reference: Reference = ctx.state["reference"]
        with reference.use() as ref:  # first, under no_grad: nothing of it is in the policy's graph
            r_w, r_l = pair_losses(ctx.family, ref, ctx.scheduler, chosen, rejected, generator)
        l_w, l_l = pair_losses(ctx.family, ctx.model, ctx.scheduler, chosen, rejected, generator)
        beta = ctx.method.beta if ctx.method.beta is not None else DEFAULT_BETA
        return dpo_objective(l_w, l_l, r_w, r_l, beta)


register_method(DiffusionDPO())
