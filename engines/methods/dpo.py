"""DPO for the vision-language families: the sigmoid loss of Rafailov et al. 2023 (eq. 7) on cached preference pairs.

    train: {method: {name: dpo, beta: 0.1, label_smoothing: 0.0, sft_weight: 0.0, reference: model}}

A micro-batch of B pairs is ONE batch of 2B rows (the B chosen conversations, then the B rejected ones, media
repeated in the same order), so the policy runs one forward per micro-batch, as FSDP wants. A side's
log-probability is the sum over its answer tokens (labels != IGNORE_INDEX, shifted as the SFT loss shifts them) of
log_softmax; the reference's comes from `Reference` (a frozen copy, or with LoRA the policy with its adapters off)
before the policy's forward, or from `<train_dir>/reference_logps.json` (`reference: precomputed`), written once by
`setup` before the first step and read, never recomputed, on resume. With h = beta * ((pi_c - ref_c) - (pi_r -
ref_r)) the loss is -(1 - eps) * logsigmoid(h) - eps * logsigmoid(-h) (conservative DPO's label smoothing eps, as
TRL's `sigmoid` loss), the mean over pairs, plus `sft_weight` x the chosen answers' per-token NLL (TRL's
`rpo_alpha`). It is a micro-batch mean: the engine divides it by grad_accum (not `token_normalized`).
"""

from __future__ import annotations

import json
import math
from contextlib import nullcontext
from typing import Any, ClassVar

import torch
import torch.distributed as dist
import torch.nn.functional as F
from flowspeed.configs import PipelineConfig
from flowspeed.datasets_prep.sequence_prep import SIDES
from flowspeed.engines.common.io import atomic_write_text
from flowspeed.engines.methods import MethodContext, TrainingMethod, register_method, token_logprobs
from flowspeed.engines.methods.reference import Reference
from flowspeed.engines.models.registry import Capability, ModelFamily
from flowspeed.engines.models.sequence import IGNORE_INDEX
from torch import nn

BETA = 0.1  # TRL DPOConfig's default beta
REFERENCE_FILE = "reference_logps.json"


def dpo_loss(
    policy: torch.Tensor, reference: torch.Tensor, beta: float, label_smoothing: float = 0.0, sft_weight: float = 0.0,
    chosen_tokens: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:  # fmt: skip
    """(the loss, its metrics) from (B, 2) summed answer log-probabilities [chosen, rejected] of the policy and the
    reference: the sigmoid DPO loss's mean over the B pairs, plus `sft_weight` x the chosen answers' NLL per token
    (their summed log-probabilities over `chosen_tokens` (B,), their answer token counts)."""
    rewards = beta * (policy - reference).float()  # (B, 2): the implicit rewards beta * log(pi / ref)
    h = rewards[:, 0] - rewards[:, 1]  # (B,)
    loss = (-(1 - label_smoothing) * F.logsigmoid(h) - label_smoothing * F.logsigmoid(-h)).mean()
    if sft_weight > 0:
        if chosen_tokens is None:
            raise ValueError("the SFT term needs the chosen answers' token counts")
        loss = loss + sft_weight * (-policy[:, 0].sum() / chosen_tokens.sum().clamp(min=1))
    r = rewards.detach()
    metrics = {
        "train/chosen_reward": r[:, 0].mean(),
        "train/rejected_reward": r[:, 1].mean(),
        "train/margin": (r[:, 0] - r[:, 1]).mean(),
        "train/accuracy": (r[:, 0] > r[:, 1]).float().mean(),
    }
    return loss, metrics


def answer_logps(
    family: ModelFamily, model: nn.Module, batch: dict[str, torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(per-row sums of the answer tokens' log-probabilities (N,), per-row answer token counts (N,), the vision
    tower's zero-weight touch) of a padded batch of N rows, in one forward."""
    batch = {k: v for k, v in batch.items() if k != "loss_normalizer"}
    labels = batch.pop("labels")
    with family.vision_touch(model, batch) as touched:  # FSDP: every rank runs the vision tower (sequence.py)
        logits = model(**batch, use_cache=False).logits  # (N, L, vocab)
    if family.shift_labels:
        logits, labels = logits[:, :-1], labels[:, 1:]
    mask = labels != IGNORE_INDEX  # (N, L')
    picked = token_logprobs(logits, labels.clamp(min=0))  # (N, L'): the labels' log-probs
    zero = sum(t.sum() for t in touched) * 0.0 if touched else torch.zeros((), device=picked.device)
    return (picked * mask).sum(-1), mask.sum(-1), zero


def pair_rows(family: ModelFamily, items: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """B cached pairs -> one padded batch of 2B rows, chosen rows first: each row a side's token rows (its
    `chosen_` / `rejected_` names under the plain ones) with the pair's media, so the family's `collate` repeats
    the media in row order."""
    rows = [k for k in family.pad_values if f"chosen_{k}" in items[0]]
    prefixed = tuple(f"{side}_" for side in SIDES)
    sides = []
    for side in SIDES:
        for it in items:
            media = {k: v for k, v in it.items() if k not in family.pad_values and not k.startswith(prefixed)}
            sides.append({**media, **{k: it[f"{side}_{k}"] for k in rows}})
    return family.collate(sides)


def _require_preference(records: list[dict[str, Any]]) -> None:
    plain = [r.get("source", "?") for r in records if not r.get("preference")]
    if plain:
        raise ValueError(
            f"train.method.name=dpo trains on preference pairs, but {len(plain)} of {len(records)} cached records "
            f"are not (e.g. {plain[0]}): give data.manifest preference records, each with a prompt and two answers "
            '("chosen" and "rejected" beside ShareGPT "conversations" + "images", or table columns image, prompt, '
            "chosen, rejected), and rerun prep"
        )


class DPO(TrainingMethod):
    name: ClassVar[str] = "dpo"
    requires: ClassVar[Capability | None] = Capability.TOKEN_LOSS
    token_normalized: ClassVar[bool] = False

    def sample_tokens(self, family: ModelFamily, model_config: Any, record: dict[str, Any]) -> int:
        """Both sides' decoder tokens: the policy computes the chosen and the rejected row of every pair."""
        return sum(int(record["shapes"][f"{side}_input_ids"][0]) for side in SIDES)

    def check(self, family: ModelFamily, cfg: PipelineConfig) -> None:
        super().check(family, cfg)
        if cfg.train.packing.max_tokens is not None:
            raise ValueError(
                "train.method.name=dpo pads each micro-batch's pairs (its chosen and rejected rows in one forward); "
                "set train.packing.max_tokens: null"
            )
        samples = cfg.prep_dir / "samples.jsonl"
        if samples.is_file():  # prep has run: refuse a non-preference cache before any model loads
            from flowspeed.datasets_prep.prep import load_samples

            _require_preference(load_samples(cfg.prep_dir))

    def setup(self, ctx: MethodContext) -> None:
        _require_preference(ctx.records)
        if ctx.method.reference == "model":
            ctx.state["reference"] = Reference(ctx)
        else:
            ctx.state["reference_logps"] = precomputed_reference(ctx)

    def collate(self, family: ModelFamily, items: list[dict[str, torch.Tensor]], pack: bool) -> dict[str, torch.Tensor]:
        return pair_rows(family, items)

    def loss(
        self, ctx: MethodContext, batch: dict[str, torch.Tensor], records: list[dict[str, Any]],
        generator: torch.Generator,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:  # fmt: skip
        m, n = ctx.method, len(records)
        if "reference_logps" in ctx.state:
            table = ctx.state["reference_logps"]
            ref = torch.tensor([table[r["key"]] for r in records], dtype=torch.float64, device=ctx.device)
        else:
            with ctx.state["reference"].use() as reference:  # under no_grad, before the policy's forward
                ref = answer_logps(ctx.family, reference, batch)[0].view(2, n).T  # (B, 2)
        logps, counts, zero = answer_logps(ctx.family, ctx.model, batch)
        policy = logps.view(2, n).T  # (B, 2): rows were [chosen..., rejected...]
        loss, metrics = dpo_loss(policy, ref, m.beta or BETA, m.label_smoothing, m.sft_weight, counts[:n])
        return loss + zero, metrics


def precomputed_reference(ctx: MethodContext) -> dict[str, list[float]]:
    """{record key: [chosen, rejected] summed log-probabilities} of the starting model on every training record.

    Read from `<train_dir>/reference_logps.json` when it exists (a resumed run: the policy has moved on, so it must
    never be recomputed); otherwise every data-parallel rank scores its share of the records (shares padded to the
    same number of forwards, which FSDP's collectives need), the shares are gathered, and rank 0 writes the file
    once, atomically, before the first step."""
    path = ctx.cfg.train_dir / REFERENCE_FILE
    keys = [r["key"] for r in ctx.records]
    if path.is_file():
        table = json.loads(path.read_text())["logps"]
        missing = sorted(set(keys) - set(table))
        if missing:
            raise ValueError(
                f"{path} has no reference log-probabilities for {len(missing)} training records (e.g. {missing[0]}): "
                "it was written for other data. The starting model is gone once training moved on, so start a new "
                "run (another workdir, or delete the train dir) or set train.method.reference: model"
            )
        return table
    resumed = ctx.resumed_from
    if resumed is not None:  # without the file: the policy is not the starting model any more
        raise ValueError(
            f"train.method.reference=precomputed: {path} is missing but the run resumed from {resumed}, so the "
            "starting model is gone; start a new run (another workdir) or set train.method.reference: model"
        )
    per_rank = math.ceil(len(keys) / ctx.dp_world)
    mine = list(range(ctx.dp_rank, len(keys), ctx.dp_world))
    mine += mine[:1] * (per_rank - len(mine))  # padding forwards, discarded: every rank runs per_rank of them
    bs = ctx.cfg.train.batch_size
    t = ctx.cfg.train
    autocast = torch.autocast(ctx.device.type, dtype=torch.bfloat16) if t.mixed_precision == "bf16" else nullcontext()
    out = []
    with torch.no_grad(), autocast:
        for start in range(0, per_rank, bs):
            idx = mine[start : start + bs]
            cpu = pair_rows(ctx.family, [ctx.dataset[i] for i in idx])
            logps = answer_logps(ctx.family, ctx.model, {k: v.to(ctx.device) for k, v in cpu.items()})[0]
            out.append(logps.double().view(2, len(idx)).T)  # (b, 2)
    share = torch.cat(out) if out else torch.zeros(0, 2, dtype=torch.float64, device=ctx.device)
    shares = [share]
    if ctx.dp_group is not None and ctx.dp_world > 1:
        shares = [torch.empty_like(share) for _ in range(ctx.dp_world)]
        dist.all_gather(shares, share, group=ctx.dp_group)
    table: dict[str, list[float]] = {}
    for rank, values in enumerate(shares):
        for j, i in enumerate(range(rank, len(keys), ctx.dp_world)):  # the padding rows come after these
            table[keys[i]] = values[j].tolist()
    if ctx.rank == 0:
        atomic_write_text(path, json.dumps({"model": ctx.cfg.model.transformer.identity(), "logps": table}))
    return table


register_method(DPO())
