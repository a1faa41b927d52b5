"""Pipeline parallelism for transformers causal LMs with `torch.distributed.pipelining`.

    runner = build_pipeline(model, mesh["pp"], schedule="interleaved_1f1b", n_microbatches=4, virtual_stages=2)
    loss = runner.step(input_ids, labels)   # forward + backward of the whole batch; the loss on the last stage
    runner.clip_grad_norm_(1.0)             # over all stages' gradients
    optimizer = AdamW(p for m in runner.modules for p in m.parameters())

Why: a model too deep for one device splits by layers; micro-batches keep every stage busy (1F1B keeps at
most pp micro-batches of activations alive; interleaving several smaller stages per rank shrinks the bubble).

How: the decoder layers are split evenly into pp * virtual_stages stages, torchtitan-style: a stage is a
module that keeps only its own layers (under their original names, so state-dict keys match the whole
model's), the embeddings on the first stage, the final norm and lm_head on the last, and the rotary
embedding on every stage. Rank r owns stages r, r + pp, r + 2pp, ... Each is wrapped in a PipelineStage
and driven by Schedule1F1B or ScheduleInterleaved1F1B. The per-micro-batch loss is re-weighted by its share
of the batch's label tokens, so the sum over micro-batches is exactly the full-batch mean.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleInterleaved1F1B
from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

IGNORE_INDEX = -100
SCHEDULES = {"1f1b": Schedule1F1B, "interleaved_1f1b": ScheduleInterleaved1F1B}
SUPPORTED = ("Qwen2ForCausalLM", "LlamaForCausalLM")


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over label tokens != -100, as transformers computes it."""
    # logits (B, S, V) predict labels shifted left by one: position s scores token s+1
    targets = F.pad(labels, (0, 1), value=IGNORE_INDEX)[:, 1:]  # (B, S)
    return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX)


def _label_tokens(labels: torch.Tensor) -> torch.Tensor:
    return (labels[:, 1:] != IGNORE_INDEX).sum()  # what causal_lm_loss averages over


class CausalLMStage(nn.Module):
    """Part of a *ForCausalLM: some decoder layers (+ embeddings if first, + norm and lm_head if last)."""

    def __init__(self, lm: nn.Module, layer_ids: range, first: bool, last: bool):
        super().__init__()
        self.config = lm.config
        self.model = nn.Module()  # same prefixes as the full model: model.layers.<i>, lm_head
        self.model.embed_tokens = lm.model.embed_tokens if first else None
        self.model.layers = nn.ModuleDict({str(i): lm.model.layers[i] for i in layer_ids})
        self.model.norm = lm.model.norm if last else None
        self.model.rotary_emb = lm.model.rotary_emb  # buffers only; shared by a rank's stages
        self.lm_head = lm.lm_head if last else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # first stage: token ids (B, S); later stages: hidden states (B, S, D)
        h = self.model.embed_tokens(x) if self.model.embed_tokens is not None else x  # (B, S, D)
        pos = torch.arange(h.shape[1], device=h.device).unsqueeze(0)  # (1, S)
        rope = self.model.rotary_emb(h, pos)  # (cos, sin), each (1, S, head_dim)
        # the same masks Qwen2Model/LlamaModel build (None where sdpa's is_causal does the job)
        kw = dict(config=self.config, inputs_embeds=h, attention_mask=None, cache=None, position_ids=pos)
        masks = {"full_attention": create_causal_mask(**kw)}
        if "sliding_attention" in (getattr(self.config, "layer_types", None) or ()):
            masks["sliding_attention"] = create_sliding_window_causal_mask(**kw)
        for layer in self.model.layers.values():
            kind = getattr(layer.self_attn, "layer_type", None) or "full_attention"
            h = layer(h, attention_mask=masks[kind], position_embeddings=rope, position_ids=pos)
        if self.lm_head is not None:
            h = self.lm_head(self.model.norm(h))  # (B, S, V) logits
        return h


class PipelineRunner:
    """One training step through the schedule; `modules` are this rank's stages (optimizer, checkpoints)."""

    def __init__(self, schedule, stages: list[PipelineStage], modules: list[nn.Module], n_microbatches: int, group):
        self.schedule, self.stages, self.modules = schedule, stages, modules
        self.n_microbatches, self.group = n_microbatches, group
        self.has_first = any(s.is_first for s in stages)
        self.has_last = any(s.is_last for s in stages)
        self._batch_tokens: torch.Tensor | None = None  # label tokens of the whole batch, set per step

    def step(self, input_ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor | None:
        """input_ids, labels: (B, S) on every rank. Returns the full-batch mean loss on the last stage's rank."""
        if input_ids.shape[0] % self.n_microbatches:
            raise ValueError(
                f"batch of {input_ids.shape[0]} sequences does not split into n_microbatches="
                f"{self.n_microbatches}; make the per-rank batch a multiple of it"
            )
        self._batch_tokens = _label_tokens(labels).clamp(min=1)
        losses: list[torch.Tensor] = []
        args = (input_ids,) if self.has_first else ()
        target = labels if self.has_last else None
        self.schedule.step(*args, target=target, losses=losses, return_outputs=False)
        return torch.stack(losses).sum().detach() if self.has_last else None

    def clip_grad_norm_(self, max_norm: float) -> torch.Tensor:
        """Clip by the gradient norm over all stages (clip_grad_norm_ on one rank sees only its own)."""
        params = [p for m in self.modules for p in m.parameters() if p.grad is not None]
        sq = torch.nn.utils.get_total_norm([p.grad for p in params]) ** 2  # this rank's share of the squared norm
        dist.all_reduce(sq, group=self.group)
        total = sq.sqrt()
        torch.nn.utils.clip_grads_with_norm_(params, max_norm, total)
        return total


def build_pipeline(
    model: nn.Module,
    pp_mesh: DeviceMesh,
    *,
    schedule: str = "1f1b",
    n_microbatches: int,
    virtual_stages: int = 1,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = causal_lm_loss,
) -> PipelineRunner:
    """Split `model` over the 1-D `pp_mesh`. `loss_fn(logits, labels)` must be a mean over the label
    tokens of its micro-batch (like `causal_lm_loss`); drop `model` afterwards, the runner keeps its parts."""
    name = type(model).__name__
    if name not in SUPPORTED:
        raise ValueError(f"pipeline parallel supports {list(SUPPORTED)}, not {name}; set train.parallel.pp: 1")
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown pipeline schedule {schedule!r}; valid: {sorted(SCHEDULES)}")
    if schedule == "1f1b" and virtual_stages != 1:
        raise ValueError(f"schedule '1f1b' runs one stage per rank, got virtual_stages={virtual_stages}; "
                         "use schedule 'interleaved_1f1b' for several")  # fmt: skip
    if schedule == "interleaved_1f1b" and virtual_stages < 2:
        raise ValueError(f"schedule 'interleaved_1f1b' needs virtual_stages >= 2, got {virtual_stages}")
    pp, rank = pp_mesh.size(), pp_mesh.get_local_rank()
    n_stages, n_layers = pp * virtual_stages, len(model.model.layers)
    if n_layers % n_stages:
        raise ValueError(
            f"{n_layers} decoder layers do not split evenly into pp * virtual_stages = {pp} * {virtual_stages} "
            f"= {n_stages} stages; pick pp and virtual_stages whose product divides {n_layers}"
        )
    if model.get_output_embeddings().weight is model.get_input_embeddings().weight:
        raise ValueError(
            f"{name} ties lm_head to embed_tokens, which live on the first and the last stage: untie them first "
            "(lm_head.weight = nn.Parameter(lm_head.weight.detach().clone()); config.tie_word_embeddings = False)"
        )
    per = n_layers // n_stages
    device = next(model.parameters()).device
    stages, modules = [], []
    for idx in range(rank, n_stages, pp):  # loop-style placement: rank r owns r, r + pp, ...
        mod = CausalLMStage(model, range(idx * per, (idx + 1) * per), first=idx == 0, last=idx == n_stages - 1)
        modules.append(mod)
        stages.append(PipelineStage(mod, idx, n_stages, device, group=pp_mesh.get_group()))

    runner: PipelineRunner

    def weighted_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        # a micro-batch's mean times its share of the batch's label tokens: the shares sum to the batch mean
        n = _label_tokens(labels)
        if n == 0:  # all padding: the mean would be 0/0
            return logits.sum() * 0.0
        return loss_fn(logits, labels) * n / runner._batch_tokens

    cls = SCHEDULES[schedule]
    sched = cls(stages[0] if cls is Schedule1F1B else stages, n_microbatches, loss_fn=weighted_loss, scale_grads=False)
    runner = PipelineRunner(sched, stages, modules, n_microbatches, pp_mesh.get_group())
    return runner
