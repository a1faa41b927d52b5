"""Checks the video-family tests (Wan, LTX-Video) make the same way: the LoRA adapter's round trip in peft's
format, and a few steps of the family's own training loss, the one-process reference of the 2-rank parity tests."""

from __future__ import annotations

import json
import statistics
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from flowspeed.configs import LoraConfig
from flowspeed.engines.models.registry import ModelFamily
from flowspeed.engines.torch_engine.lora import apply_lora, load_adapter, save_adapter
from torch import nn
from torch.distributed.tensor import DTensor


def assert_lora_round_trip(
    fam: ModelFamily, build: Callable[[], nn.Module], inputs: dict[str, Any], folder: Path, base_name: str
) -> None:
    """Rank-4 LoRA on the family's targets (self- and cross-attention adapted, nothing else trainable), saved in
    peft's layout and loaded onto a fresh model: the same output bit for bit, and not the base model's."""
    assert_lora_adapts(fam, build, inputs, folder, base_name, (".attn1.to_q.", ".attn2.to_out.0."))


def assert_lora_adapts(
    fam: ModelFamily,
    build: Callable[[], nn.Module],
    inputs: dict[str, Any],
    folder: Path,
    base_name: str,
    expected: tuple[str, ...],
) -> None:
    """`assert_lora_round_trip` for any attention layout: each of `expected` (module-name fragments, e.g. a joint
    attention's ".attn.to_q." and ".attn.add_k_proj.") must be among the adapted modules; the family's
    `lora_exclude` applies, as in the engine."""
    lora = LoraConfig(enabled=True, rank=4)
    model = apply_lora(build(), lora, fam.lora_targets, fam.lora_exclude).eval()
    assert all("lora_" in n for n, p in model.named_parameters() if p.requires_grad)
    adapted = {n for n, _ in model.named_modules() if n.endswith("lora_A")}
    assert all(any(e in n for n in adapted) for e in expected), (expected, sorted(adapted))
    for n, p in model.named_parameters():
        if "lora_B" in n:  # B starts at zero: give the adapters an effect to check
            torch.nn.init.normal_(p, std=0.1, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = model(**inputs)[0]
        base = build().eval()(**inputs)[0]
    save_adapter(model, folder, base_name)
    config = json.loads((folder / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 4
    assert (folder / "adapter_model.safetensors").is_file()
    again = load_adapter(apply_lora(build(), lora, fam.lora_targets, fam.lora_exclude), folder)
    with torch.no_grad():
        assert torch.equal(again.eval()(**inputs)[0], out)
    assert not torch.allclose(base, out, atol=1e-4)


def train_steps(
    fam: ModelFamily,
    model: nn.Module,
    scheduler: Any,
    batch: dict[str, torch.Tensor],
    after_backward: Callable[[nn.Module], None] | None = None,
    steps: int = 3,
    lr: float = 1e-3,
    first_seed: int = 10,
) -> tuple[list[float], list[torch.Tensor]]:
    """`steps` AdamW steps of the family's `training_loss` on one batch (noise seeded per step): the losses and the
    final weights, gathered whole where they are sharded. `after_backward` reduces gradients (context parallel)."""
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    losses = []
    for step in range(steps):
        loss = fam.training_loss(model, scheduler, batch, torch.Generator().manual_seed(first_seed + step))
        loss.backward()
        if after_backward is not None:
            after_backward(model)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses, [p.full_tensor() if isinstance(p, DTensor) else p.detach() for p in model.parameters()]


def mean_loss(fam: ModelFamily, model: nn.Module, scheduler: Any, batch: dict[str, torch.Tensor]) -> float:
    """The family's loss on `batch` averaged over 6 fixed noise draws, in eval mode: what "the loss fell" compares."""
    with torch.no_grad():
        gens = (torch.Generator().manual_seed(s) for s in range(6))
        return statistics.mean(fam.training_loss(model.eval(), scheduler, batch, g).item() for g in gens)


def max_difference(run: tuple[list[float], list[torch.Tensor]], ref: tuple[list[float], list[torch.Tensor]]) -> float:
    """The largest difference between two `train_steps` results, losses and weights together."""
    (losses, weights), (ref_losses, ref_weights) = run, ref
    return max(
        [abs(a - b) for a, b in zip(losses, ref_losses, strict=True)]
        + [(a - b).abs().max().item() for a, b in zip(weights, ref_weights, strict=True)]
    )


def moved(weights: list[torch.Tensor], fresh: nn.Module) -> float:
    """How far training moved the weights from a fresh model's: a parity test over unmoved weights proves nothing."""
    return max((a - b).abs().max().item() for a, b in zip(weights, fresh.parameters(), strict=True))
