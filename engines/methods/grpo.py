"""GRPO (Shao et al. 2024, DeepSeekMath) for the vision-language families: sampled answers scored by a reward.

    train: {method: {name: grpo, group_size: 8, rewards: [{name: exact_answer}], kl_coef: 0.04}, lora: {enabled: true}}

The data is the family's ordinary SFT cache: each record's LAST assistant turn is the reference answer, the prompt is
the token row before that answer's first labelled token (so it ends with the `<|im_start|>assistant\\n` header: the
generation prompt), with the record's media. Per micro-batch:

1. rollouts: every prompt repeated `group_size` times (its media with it) and sampled in ONE `generate` call, left
   padded, in eval mode without grad, with the model's own generation_config (its eos ids) and plain sampling
   (temperature; top-k, top-p and repetition penalty off, whatever a checkpoint's generation_config says; the
   media tokens suppressed, which the answer's scoring forward would take for media that is not there).
   The sampling RNG is seeded from the engine's per-step generator inside `fork_rng`, so a resumed run samples
   what an uninterrupted one does. With several ranks `synced_gpus` keeps a rank whose answers ended early
   stepping with the others (FSDP gathers parameters in every forward), and under FSDP2 the root group stays
   gathered for the call (`gathered_root`);
2. rewards: `evaluation.rewards` on the decoded answers (special tokens skipped, cut at the first eos) against
   the reference answers; advantages per group (r - mean) / (std + 1e-4) (TRL's default `scale_rewards`);
3. loss: per-token log-probabilities of the answer tokens (logits / temperature, as TRL scores them) under the
   reference (under no_grad; with LoRA the policy with its adapters off) and the policy, on the prompt +
   answer rows with the tokens after each answer's first eos masked out. One update per rollout batch (on-policy):
   the old log-probabilities are the policy's own, detached, so the ratio is 1 in value and its gradient is the
   policy gradient; the PPO-clipped objective min(ratio A, clip(ratio, 1 - eps, 1 + eps) A) minus kl_coef times
   the k3 estimator exp(ref - logp) - (ref - logp) - 1 is averaged over each answer's tokens, then over answers
   (GRPO's original normalisation, TRL's `loss_type="grpo"`), and negated.

Metrics: train/reward_mean (all rollouts), train/reward_std (the mean within-group standard deviation, what TRL logs
as reward_std: 0 means no group had a signal to learn from), train/kl (mean per-token k3 KL) and train/clip_fraction
(share of answer tokens whose clipped term was the minimum: 0 while there is one update per rollout batch).
"""

from __future__ import annotations

import inspect
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, ClassVar

import torch
from flowspeed.configs import PipelineConfig
from flowspeed.engines.methods import (
    MethodContext,
    TrainingMethod,
    group_advantages,
    register_method,
    token_logprobs,
)
from flowspeed.engines.methods.reference import Reference
from flowspeed.engines.models.registry import Capability, ModelFamily
from flowspeed.engines.models.sequence import IGNORE_INDEX
from flowspeed.engines.torch_engine.setup import unwrap
from flowspeed.evaluation.rewards import build_reward, reward_prompt

#: batch keys prefixed so: per prompt, how many rows of a concatenated media tensor it owns (never given to the model)
ROWS = "grpo_rows:"


def prompt_length(labels: torch.Tensor) -> int:
    """Where the last assistant answer starts: the first token of the last run of labelled tokens."""
    at = (labels != IGNORE_INDEX).nonzero().flatten()
    if at.numel() == 0:
        raise ValueError("a cached sample has no labelled answer tokens: GRPO needs an assistant turn to end on")
    starts = at[torch.cat([torch.tensor([True], device=at.device), at[1:] - at[:-1] > 1])]
    return int(starts[-1])


def left_pad(rows: list[torch.Tensor], value: int) -> torch.Tensor:
    """(B, longest): generation continues from the right edge of every row."""
    longest = max(len(r) for r in rows)
    out = torch.full((len(rows), longest), value, dtype=rows[0].dtype)
    for i, r in enumerate(rows):
        out[i, longest - len(r) :] = r
    return out


def repeat_groups(batch: dict[str, torch.Tensor], concat_keys: tuple[str, ...], group: int) -> dict[str, torch.Tensor]:
    """The prompt batch with each prompt `group` times in a row (prompt i -> rows i*G .. i*G+G-1), its media with it:
    token rows repeat row-wise, concatenated media repeat as each prompt's block of rows, in the same order."""
    out = {}
    for key, value in batch.items():
        if key.startswith(ROWS):
            continue
        if key in concat_keys:
            blocks = value.split(batch[ROWS + key].tolist())
            out[key] = torch.cat([b for b in blocks for _ in range(group)])
        else:
            out[key] = value.repeat_interleave(group, dim=0)
    return out


def completion_mask(completions: torch.Tensor, eos_ids: list[int]) -> torch.Tensor:
    """(N, T) 1 on each answer's tokens up to and including its first eos, 0 after."""
    is_eos = torch.isin(completions, torch.tensor(eos_ids, dtype=completions.dtype, device=completions.device))
    after = (is_eos.cumsum(1) - is_eos.long()) > 0  # strictly after the first eos
    return (~after).long()


def media_token_ids(config: Any) -> list[int]:
    """The ids of a VLM config's media tokens (image / video placeholders, vision start / end markers). A sampled
    answer must not contain one: the forward that scores it would count a placeholder more than the media has
    features and refuse the batch, and M-RoPE reads the token after each vision start as its media's kind (a
    trained model never writes them; a young one can)."""
    media = ("image", "video", "vision", "audio")
    return sorted({v for k, v in vars(config).items() if k.endswith(("_token_id", "_token_index"))
                   and any(m in k for m in media) and isinstance(v, int) and v >= 0})  # fmt: skip


def clipped_objective(
    logp: torch.Tensor, old_logp: torch.Tensor, ref_logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
    clip_range: float, kl_coef: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    """(loss, mean token KL, clip fraction) of answers' token log-probabilities (N, T) under the policy (with grad),
    at sampling time and under the reference; advantages (N,), mask (N, T) on the answer tokens.

    Per token: min(ratio A, clip(ratio, 1 - eps, 1 + eps) A) - kl_coef KL, with the k3 estimator
    KL = exp(ref - logp) - (ref - logp) - 1 (unbiased, >= 0); averaged over each answer's tokens, then over the
    answers (GRPO's own normalisation: a short answer weighs as much as a long one), negated. The clip fraction is
    the share of answer tokens whose clipped term was the smaller one (the gradient cut off)."""
    ratio = torch.exp(logp - old_logp)
    clipped = torch.clamp(ratio, 1 - clip_range, 1 + clip_range)
    adv = advantages[:, None]
    diff = ref_logp - logp
    kl = torch.exp(diff) - diff - 1
    objective = torch.min(ratio * adv, clipped * adv) - kl_coef * kl  # (N, T)
    maskf = mask.float()
    loss = -((objective * maskf).sum(1) / maskf.sum(1).clamp(min=1)).mean()
    tokens = maskf.sum().clamp(min=1)
    cut = ((clipped * adv < ratio * adv) & mask.bool()).float().sum() / tokens
    return loss, (kl * maskf).sum() / tokens, cut


class Grpo(TrainingMethod):
    name: ClassVar[str] = "grpo"
    requires: ClassVar[Capability | None] = Capability.ANSWERS
    token_normalized: ClassVar[bool] = False  # the loss is already a per-answer mean: the engine divides by grad_accum

    def check(self, family: ModelFamily, cfg: PipelineConfig) -> None:
        super().check(family, cfg)
        if not family.can(Capability.TOKEN_LOSS):
            raise ValueError(f"train.method.name=grpo scores tokens; {family.name} has no token loss")
        if not cfg.train.method.rewards:
            raise ValueError("train.method.name=grpo needs train.method.rewards (e.g. [{name: exact_answer}])")
        p = cfg.train.parallel
        if p.cp > 1 or p.pp > 1:
            raise ValueError(
                f"train.method.name=grpo samples answers token by token, which context parallel (cp={p.cp}) and "
                f"pipeline stages (pp={p.pp}) do not run: set train.parallel.cp: 1 and pp: 1 (FSDP, DDP, tp shard it)"
            )

    def setup(self, ctx: MethodContext) -> None:
        processor = ctx.family.load_processor(ctx.cfg.model)
        ctx.state["tokenizer"] = getattr(processor, "tokenizer", processor)
        ctx.state["reward"] = build_reward(ctx.method.rewards, ctx.cfg.eval.clip, ctx.device)
        ctx.state["reference"] = Reference(ctx)  # collective when LoRA is off (a frozen sharded copy)
        core = unwrap(ctx.model)
        ctx.state["logits_to_keep"] = "logits_to_keep" in inspect.signature(core.forward).parameters
        ctx.state["media_ids"] = media_token_ids(core.config)

    def collate(self, family: ModelFamily, items: list[dict[str, torch.Tensor]], pack: bool) -> dict[str, torch.Tensor]:
        """The prompts, left-padded, with their media concatenated as the family collates them and each prompt's share
        of every media tensor (`grpo_rows:<key>`, to repeat them per group). Packing only sizes the micro-batches
        here: generation needs the prompts as rows of their own."""
        ends = [prompt_length(it["labels"]) for it in items]
        batch: dict[str, torch.Tensor] = {}
        for key, value in family.pad_values.items():
            if key == "labels" or key not in items[0]:
                continue
            batch[key] = left_pad([it[key][:n] for it, n in zip(items, ends, strict=True)], value)
        if "attention_mask" not in batch:
            batch["attention_mask"] = left_pad([torch.ones(n, dtype=torch.long) for n in ends], 0)
        for key in family.concat_keys:
            parts = [it[key] for it in items if key in it]
            if parts:  # a prompt without this media owns 0 of its rows
                batch[key] = torch.cat(parts)  # (sum over the prompts, ...) in prompt order
                batch[ROWS + key] = torch.tensor([len(it[key]) if key in it else 0 for it in items])
        return batch

    def loss(
        self, ctx: MethodContext, batch: dict[str, torch.Tensor], records: list[dict[str, Any]],
        generator: torch.Generator,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:  # fmt: skip
        m, family = ctx.method, ctx.family
        group = m.group_size
        prompts = repeat_groups(batch, family.concat_keys, group)  # (N = B x G, P) rows + media
        completions = self.sample(ctx, prompts, generator)  # (N, T)
        gen_config = unwrap(ctx.model).generation_config
        eos = gen_config.eos_token_id
        eos_ids = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
        mask = completion_mask(completions, eos_ids)  # (N, T)

        # rewards and group-normalised advantages
        tokenizer = ctx.state["tokenizer"]
        answers = tokenizer.batch_decode([c[: int(k.sum())] for c, k in zip(completions, mask, strict=True)],
                                         skip_special_tokens=True)  # fmt: skip
        references = [r["messages"][-1]["content"] for r in records for _ in range(group)]
        questions = [reward_prompt(r["messages"]) for r in records for _ in range(group)]
        rewards = ctx.state["reward"].text(answers, references, questions).to(ctx.device)  # (N,)
        advantages, std = group_advantages(rewards, group, unbiased=True)  # (N,), (B,): TRL's sample std

        # log-probabilities of the answers: the reference first, then the policy (with grad)
        inputs = dict(prompts)
        inputs["input_ids"] = torch.cat([prompts["input_ids"], completions], dim=1)  # (N, P + T)
        inputs["attention_mask"] = torch.cat([prompts["attention_mask"], mask.to(prompts["attention_mask"])], dim=1)
        for key, value in family.pad_values.items():
            if key in prompts and key not in ("input_ids", "attention_mask"):  # e.g. mm_token_type_ids: text
                inputs[key] = torch.cat([prompts[key], torch.full_like(completions, value).to(prompts[key])], dim=1)
        with ctx.state["reference"].use() as ref_model:
            ref_logp = self.logprobs(ctx, ref_model, inputs, completions)
        with family.vision_touch(ctx.model, inputs) as touched:
            logp = self.logprobs(ctx, ctx.model, inputs, completions)  # (N, T)

        # one update per rollout batch: the old log-probabilities are the policy's own, detached
        loss, kl, cut = clipped_objective(logp, logp.detach(), ref_logp, advantages, mask, m.clip_range, m.kl_coef)
        if touched:
            loss = loss + sum(t.sum() for t in touched) * 0.0
        metrics = {
            "train/reward_mean": rewards.mean().detach(),
            "train/reward_std": std.mean().detach(),
            "train/kl": kl.detach(),
            "train/clip_fraction": cut.detach(),
        }
        return loss, metrics

    def sample(self, ctx: MethodContext, prompts: dict[str, torch.Tensor], generator: torch.Generator) -> torch.Tensor:
        """(N, T) sampled answer tokens (T: the longest answer, <= max_new_tokens), reproducible from `generator`."""
        m, model = ctx.method, unwrap(ctx.model)
        device = ctx.device
        seed = int(torch.randint(0, 2**62, (1,), generator=generator))
        devices = [] if device.type == "cpu" else [device.index if device.index is not None else 0]
        was_training = model.training
        model.eval()
        try:
            with torch.random.fork_rng(devices=devices, device_type="cuda" if device.type == "cpu" else device.type):
                torch.manual_seed(seed)
                with torch.no_grad(), gathered_root(model):
                    out = model.generate(
                        **prompts, max_new_tokens=m.max_new_tokens, do_sample=True, temperature=m.temperature,
                        top_k=0, top_p=1.0, min_p=None, repetition_penalty=1.0, synced_gpus=ctx.world > 1,
                        suppress_tokens=ctx.state["media_ids"] or None, use_cache=True,
                    )  # fmt: skip
        finally:
            model.train(was_training)
        return out[:, prompts["input_ids"].shape[1] :]

    def logprobs(
        self, ctx: MethodContext, model: Any, inputs: dict[str, torch.Tensor], completions: torch.Tensor
    ) -> torch.Tensor:
        """(N, T) log-probabilities of `completions`, the last T tokens of `inputs`' rows, under `model`."""
        n = completions.shape[1]
        extra = {"logits_to_keep": n + 1} if ctx.state["logits_to_keep"] else {}
        logits = model(**inputs, use_cache=False, **extra).logits[:, -(n + 1) : -1]  # (N, T, V): token t from t-1
        return token_logprobs(logits, completions, ctx.method.temperature)


@contextmanager
def gathered_root(model: Any) -> Iterator[None]:
    """Under FSDP2, the root group's parameters gathered for the whole `generate` call. transformers' generate
    encodes the media before the first decoder step by calling the vision tower directly (`get_image_features`),
    outside the root's forward whose hook would gather them; the decoder blocks, sharded on their own, still
    gather in their forward. Every rank calls generate together, so the all-gather pairs up."""
    if not (hasattr(model, "unshard") and hasattr(model, "reshard")):  # not an FSDPModule
        yield
        return
    model.unshard()
    try:
        yield
    finally:
        model.reshard()


register_method(Grpo())
