"""Reference numbers for HunyuanVideo 1.5's training objective, printed by the authors' own code.

The authors' `train.py` (Tencent-Hunyuan/HunyuanVideo-1.5@60783e7) defines the objective in four pieces: `SNRType`,
`TimestepSampler` (logit-normal t on [1e-5, 1 - 1e-5], times T = 1000), `timestep_transform` (the shift, 3.0 by
default) and `LinearInterpolationSchedule` (x_t = (1 - t/T) x0 + (t/T) eps); `HunyuanVideoTrainer.train_step` then
takes `mse_loss(model_pred, noise - latents)`. Importing train.py needs their whole pipeline (CUDA, flash attention,
the checkpoints), so this script takes those four definitions out of the file at the revision (`ast`, their source
text unchanged) and runs them, then the loss of a probe "model" pred = 0.3 x_t + 0.5 t/T on fixed x0 and eps.

The u ~ N(0, 1) each sample draws is fixed here (the sampler's own `torch.normal` is replaced by one returning
these values), so the test can hand the same u to flowspeed's objective. Run:
    .venv/bin/python docs/fidelity/ref_hunyuanvideo15_loss.py     (needs the mirror fetched under /work/.mirror)
It prints `u: (timestep, loss)` lines: tests/engines/models/test_hunyuanvideo15.py AUTHORS holds them.
"""

from __future__ import annotations

import ast
import subprocess
import types

import torch

REPO = "/work/.mirror/Tencent-Hunyuan+HunyuanVideo-1.5/repo"
REV = "60783e7"
NAMES = {"SNRType", "TimestepSampler", "timestep_transform", "LinearInterpolationSchedule"}
U = (-2.5, -0.3, 0.0, 0.7, 3.0)  # logit-normal draws: t from ~0.08 to ~0.95 before the shift


def authors_objective() -> types.SimpleNamespace:
    """The four definitions, exec'd from train.py's text at REV with the imports they use."""
    source = subprocess.run(["git", f"--git-dir={REPO}", "show", f"{REV}:train.py"], check=True,
                            capture_output=True, text=True).stdout  # fmt: skip
    tree = ast.parse(source)
    picked = [node for node in tree.body if getattr(node, "name", None) in NAMES]
    assert {node.name for node in picked} == NAMES, "train.py no longer defines the objective's pieces"
    namespace: dict = {}
    exec("import math\nimport torch\nfrom enum import Enum\n", namespace)
    exec(compile(ast.Module(body=picked, type_ignores=[]), "train.py", "exec"), namespace)
    return types.SimpleNamespace(**{name: namespace[name] for name in NAMES})


def main() -> None:
    ref = authors_objective()
    x0 = 1.5 * torch.randn(1, 32, 2, 2, 2, generator=torch.Generator().manual_seed(7))
    eps = torch.randn(x0.shape, generator=torch.Generator().manual_seed(8))
    sampler = ref.TimestepSampler(T=1000, device=torch.device("cpu"), snr_type="lognorm")
    schedule = ref.LinearInterpolationSchedule(T=1000)
    normal = torch.normal
    for u in U:
        torch.normal = lambda *a, u=u, **k: torch.tensor([u])  # the draw, fixed
        try:
            t = sampler.sample(1, device=torch.device("cpu"))
        finally:
            torch.normal = normal
        t = ref.timestep_transform(t, 1000, 3.0)  # train.py's default --train_timestep_shift
        x_t = schedule.forward(x0, eps, t)
        pred = 0.3 * x_t + 0.5 * t.view(-1, 1, 1, 1, 1) / 1000
        loss = torch.nn.functional.mse_loss(pred, eps - x0)
        print(f"{u}: ({t.item()!r}, {loss.item()!r}),")


if __name__ == "__main__":
    main()
