"""The reference model of a preference or reward method: the starting model, never trained.

With LoRA the reference is the policy itself with its adapters switched off (peft's layers: no second copy of
the weights, as TRL does for a peft model); otherwise a frozen copy of the starting model built in the policy's
own parallel layout (`build_model(frozen=True)`: sharded the same way, no optimizer state, never wrapped for
gradient reduction). Either way it runs under `torch.no_grad`, so nothing it computes can reach the optimizer.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from flowspeed.engines.methods import MethodContext
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn


def adapter_layers(model: nn.Module) -> list[BaseTunerLayer]:
    return [m for m in model.modules() if isinstance(m, BaseTunerLayer)]


@contextmanager
def adapters_off(model: nn.Module) -> Iterator[nn.Module]:
    """`model` computing as its base model: every peft adapter layer disabled inside, re-enabled after.

    Only the flag peft's forward reads (`_disable_adapters`, what its `disable_adapters` property returns) is set:
    peft's `enable_adapters(False/True)` also flips the adapters' `requires_grad`, and under FSDP2 the flag set back
    on a block kept gathered after its forward (the last one) does not reach the sharded parameter, whose adapters
    then never train (a 2-rank LoRA run lost a block's gradients that way)."""
    layers = [layer for layer in adapter_layers(model) if not layer.disable_adapters]
    for layer in layers:
        layer._disable_adapters = True
    try:
        yield model
    finally:
        for layer in layers:
            layer._disable_adapters = False


class Reference:
    """`with ref.use() as model:` the reference model, gradient-free. Built once per run (collective)."""

    def __init__(self, ctx: MethodContext) -> None:
        self.lora = ctx.cfg.train.lora.enabled
        self.policy = ctx.model
        self.frozen: nn.Module | None = None
        if not self.lora:
            self.frozen = ctx.build_frozen().eval()

    @contextmanager
    def use(self) -> Iterator[nn.Module]:
        with torch.no_grad():
            if self.frozen is not None:
                yield self.frozen
            else:
                with adapters_off(self.policy) as base:
                    yield base
