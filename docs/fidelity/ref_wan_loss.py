"""Reference values for the Wan objective, printed by DiffSynth-Studio's own scheduler and loss (OUTSIDE this project).

DiffSynth-Studio is the training code the Wan2.1 README points to (the authors published no trainer).
modelscope/DiffSynth-Studio@fed7b18 `diffsynth/diffusion/flow_match.py` `FlowMatchScheduler("Wan")` with
`set_timesteps(1000, training=True)` (sigmas linspace(1, 0, 1001)[:-1] shifted by 5, the "bsmntw" weights) and
`diffsynth/diffusion/loss.py` `FlowMatchSFTLoss`: timestep = timesteps[id], x_t = add_noise(x0, eps, timestep),
loss = mse(pred, eps - x0) * training_weight(timestep). Their scheduler module is imported at the commit (its code is
only called); FlowMatchSFTLoss's four lines are applied by hand with their scheduler's methods, and the "model" is a
probe pred = 0.3 x_t + 0.5 t / 1000 (so the loss depends on x_t and t).

Inputs (the test draws the same): x0 = 1.5 * randn(1, 16, 3, 4, 4) from torch.Generator().manual_seed(7), then
eps = randn of that shape from the same generator; one case per grid index.

Run: .venv/bin/python docs/fidelity/ref_wan_loss.py (needs the DiffSynth-Studio mirror under /work/.mirror). Prints
the grid values and one loss per index; tests/engines/models/test_wan.py keeps them.
"""

from __future__ import annotations

import importlib.util
import subprocess
import tempfile
from pathlib import Path

import torch

DIFFSYNTH = "/work/.mirror/modelscope+DiffSynth-Studio/repo"
REV = "fed7b18"
INDICES = [0, 1, 137, 500, 999]


def _their_scheduler() -> type:
    text = subprocess.run(["git", f"--git-dir={DIFFSYNTH}", "show", f"{REV}:diffsynth/diffusion/flow_match.py"],
                          check=True, capture_output=True, text=True).stdout  # fmt: skip
    path = Path(tempfile.mkdtemp()) / "flow_match.py"
    path.write_text(text)
    spec = importlib.util.spec_from_file_location("diffsynth_flow_match", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.FlowMatchScheduler


def main() -> None:
    scheduler = _their_scheduler()("Wan")
    scheduler.set_timesteps(1000, training=True)
    g = torch.Generator().manual_seed(7)
    x0 = 1.5 * torch.randn(1, 16, 3, 4, 4, generator=g)
    eps = torch.randn(x0.shape, generator=g)
    for i in INDICES:
        timestep = scheduler.timesteps[i : i + 1]
        x_t = scheduler.add_noise(x0, eps, timestep)
        pred = 0.3 * x_t + 0.5 * timestep.view(-1, 1, 1, 1, 1) / 1000
        loss = torch.nn.functional.mse_loss(pred.float(), scheduler.training_target(x0, eps, timestep).float())
        loss = loss * scheduler.training_weight(timestep)
        print(f"index {i}: sigma {scheduler.sigmas[i].item()!r} timestep {timestep.item()!r} "
              f"weight {scheduler.training_weight(timestep).item()!r} loss {loss.item()!r}")  # fmt: skip


if __name__ == "__main__":
    main()
