"""Training methods: what the torch engine optimises on a family's cached data (`train.method.name`).

    train: {method: {name: dpo, beta: 0.1}, init_from: champion, lora: {enabled: true}}

A method is one module here that registers a `TrainingMethod`: supervised finetuning (`sft`, the family's own
objective), and the preference / reward post-training methods (`dpo`, `diffusion_dpo`, `grpo`, `flow_grpo`). The
engine's step, its parallel layout, checkpoints, resume and tracking are the same for all of them: a method only
decides how a micro-batch is collated (`collate`), what loss it gives (`loss`, with the per-step metrics it
reports under the same names across families: `train/reward_mean`, `train/margin`, ...), and what it prepares
once the model is built (`setup`: a frozen reference model, precomputed reference log-probabilities). The family
protocol is unchanged: methods call the family's own objective, processor and forward.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
from flowspeed.configs import PipelineConfig
from flowspeed.configs.schema import MethodConfig
from flowspeed.engines.models.registry import Capability, ModelFamily
from torch import nn

#: every metric a method may report, by the name MLflow shows (the same across families; `train/` like the loss)
METRIC_NAMES = (
    "train/reward_mean",  # mean reward of the step's rollouts (grpo, flow_grpo)
    "train/reward_std",  # the mean within-group standard deviation (TRL's reward_std: 0, no group had a signal)
    "train/kl",  # KL estimate of the policy to the reference on the step's samples
    "train/clip_fraction",  # share of ratios PPO clipping cut (grpo, flow_grpo; 0 with one update per rollout batch)
    "train/chosen_reward",  # implicit reward of the chosen side: beta x (policy - reference) (dpo, diffusion_dpo)
    "train/rejected_reward",  # the same for the rejected side
    "train/margin",  # chosen_reward - rejected_reward
    "train/accuracy",  # share of pairs whose margin is positive
)


@dataclass
class MethodContext:
    """What a method works with once the engine has built the model: the (wrapped) model a loss must call so
    gradients synchronise, the family, its scheduler, the config and the data-parallel coordinates."""

    cfg: PipelineConfig
    family: ModelFamily
    model: nn.Module
    scheduler: Any
    device: torch.device
    rank: int
    world: int
    dp_rank: int
    dp_world: int
    dp_group: Any  # torch.distributed group of the data-parallel ranks, None in one process
    #: builds a frozen copy of the starting model in the same parallel layout (collective): what `reference_model`
    #: uses when LoRA is off
    build_frozen: Callable[[], nn.Module]
    records: list[dict[str, Any]] = field(default_factory=list)
    dataset: Any = None
    state: dict[str, Any] = field(default_factory=dict)  # anything a method keeps between steps
    #: the checkpoint this run resumed from (None: a fresh start), set before `setup`
    resumed_from: Path | None = None

    @property
    def method(self) -> MethodConfig:
        return self.cfg.train.method


class TrainingMethod:
    """One way of training a family on its cache. The defaults are supervised finetuning's."""

    name: ClassVar[str] = "sft"
    #: the capability a family needs for this method (config checks name the families that have it)
    requires: ClassVar[Capability | None] = None
    #: whether the engine's token-loss normaliser applies (the SFT token loss: the global batch's per-token mean)
    token_normalized: ClassVar[bool] = True

    def check(self, family: ModelFamily, cfg: PipelineConfig) -> None:
        """Refuse a family or config this method cannot train, before any model loads (ValueError, naming the fix)."""
        if self.requires is not None and not family.can(self.requires):
            raise ValueError(
                f"train.method.name={self.name} needs a family with {self.requires.value}; {family.name} has "
                f"{', '.join(sorted(c.value for c in family.capabilities))}"
            )

    def setup(self, ctx: MethodContext) -> None:
        """After the model is built and the checkpoint loaded, before the first step (every rank, collective)."""

    def collate(self, family: ModelFamily, items: list[dict[str, torch.Tensor]], pack: bool) -> dict[str, torch.Tensor]:
        """The micro-batch's cached samples as one batch."""
        return family.pack(items) if pack else family.collate(items)

    def sample_tokens(self, family: ModelFamily, model_config: Any, record: dict[str, Any]) -> int:
        """Tokens the model computes for this record in one step, for tokens/s and MFU: the family's count, unless
        the method runs more than one sequence per record (a preference pair's two sides)."""
        return family.sample_tokens(model_config, record)

    def loss(
        self, ctx: MethodContext, batch: dict[str, torch.Tensor], records: list[dict[str, Any]],
        generator: torch.Generator,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:  # fmt: skip
        """(the micro-batch's loss, its metrics as 0-dim tensors keyed by METRIC_NAMES): the keys must be the same
        on every rank and every step (the engine averages them over micro-batches and data-parallel ranks)."""
        return ctx.family.training_loss(ctx.model, ctx.scheduler, batch, generator), {}


_METHODS: dict[str, TrainingMethod] = {"sft": TrainingMethod()}
#: the module that registers each method (imported on first use, so SFT never imports the RL code)
_MODULES = {
    "dpo": "flowspeed.engines.methods.dpo",
    "diffusion_dpo": "flowspeed.engines.methods.diffusion_dpo",
    "grpo": "flowspeed.engines.methods.grpo",
    "flow_grpo": "flowspeed.engines.methods.flow_grpo",
}


def register_method(method: TrainingMethod) -> TrainingMethod:
    if method.name in _METHODS:
        raise ValueError(f"training method {method.name!r} is registered twice")
    _METHODS[method.name] = method
    return method


def get_method(name: str) -> TrainingMethod:
    """The registered method `name`, importing its module on first use."""
    if name not in _METHODS and name in _MODULES:
        importlib.import_module(_MODULES[name])
    try:
        return _METHODS[name]
    except KeyError:
        known = ", ".join(sorted({*_METHODS, *_MODULES}))
        raise ValueError(f"unknown training method {name!r}; known: {known}") from None


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """(N, T) log-probability of each token under logits (N, T, V) at `temperature`, in float32: log_softmax at the
    token only, never a second (N, T, V) tensor (DPO's answers, GRPO's samples)."""
    logits = logits.float() / temperature
    return logits.gather(-1, tokens.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, dim=-1)


#: what keeps a group whose rewards are all equal from dividing by zero (TRL's and Flow-GRPO's 1e-4)
STD_EPS = 1e-4


def group_advantages(rewards: torch.Tensor, group: int, *, unbiased: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """((N,) advantages, (N / group,) each group's standard deviation) of rewards (N,) laid out group by group:
    (r - group mean) / (group std + STD_EPS), GRPO's normalisation. `unbiased`: the std the method's authors take
    (TRL's GRPOTrainer the sample std, Flow-GRPO's stat tracker numpy's population std); `train/reward_std` is the
    mean of these per-group values, so a group with one reward for all samples (no signal) counts 0."""
    grouped = rewards.view(-1, group)  # (B, G)
    std = grouped.std(dim=1, unbiased=unbiased)
    return ((grouped - grouped.mean(dim=1, keepdim=True)) / (std[:, None] + STD_EPS)).flatten(), std


def reduce_metrics(metrics: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """The micro-batches' metrics averaged (what the engine sums over data-parallel ranks next)."""
    if not metrics:
        return {}
    keys = sorted(metrics[0])
    return {k: torch.stack([m[k].detach().float() for m in metrics]).mean() for k in keys}
