"""Reference values for the HunyuanVideo objective, printed by finetrainers' own code (OUTSIDE this project).

The authors (Tencent/HunyuanVideo) publish inference code only; the published trainer for HunyuanVideo is
finetrainers (a-r-r-o-w/finetrainers@f476c37). Its files are loaded from the mirror at that commit and only called:
`finetrainers/models/hunyuan_video/base_specification.py` (`HunyuanVideoModelSpecification.forward`: x0 drawn from
the cached posterior and scaled, eps, x_t, timesteps, the guidance embedding's input, the target),
`finetrainers/utils/diffusion.py` (`prepare_sigmas`, `prepare_loss_weights`) and `finetrainers/functional/diffusion.py`
(`flow_match_xt`, `flow_match_target`). Stubs: the package `__init__`s and the modules base_specification.py imports
but `forward` never touches (data, logging, modeling_utils, processors, typing, utils' helpers). The loss itself is
the SFT trainer's three lines (`finetrainers/trainer/sft_trainer/trainer.py`, "4. Compute loss"): weights * (pred -
target)^2, the mean over all but the batch dimension, then the batch mean; they are written out below.

Settings as their HunyuanVideo example (examples/training/sft/hunyuan_video/modal_labs_dissolve/train.sh):
`--flow_weighting_scheme logit_normal` (args.py defaults: logit mean 0, std 1), `FlowMatchEulerDiscreteScheduler()`
(the spec's `load_diffusion_models`), `compute_posterior=False` (the precomputed posterior, what our cache holds),
one CPU generator seeded per case and used in the trainer's order (sigmas, then the spec's posterior draw and eps).

The denoiser is diffusers' `HunyuanVideoTransformer3DModel` (what the spec trains) at a tiny size, its weights drawn
after `torch.manual_seed(0)`: 16 latent channels, 2 heads of 16, 1 double + 1 single block, 1 refiner layer, RoPE
(4, 6, 6), text 32 wide, pooled 32, guidance embedding on. Inputs (the test rebuilds them) from
torch.Generator().manual_seed(7), in this order: posterior mean randn(2, 16, 2, 4, 4), log-variance
-2 + 0.5 randn(2, 16, 2, 4, 4), text states randn(2, 8, 32), pooled randn(2, 32); text mask [1]*8 and [1]*3 + [0]*5.
The VAE's scaling_factor is the release's 0.476986.

Run: .venv/bin/python docs/fidelity/ref_hunyuanvideo_loss.py (needs the finetrainers mirror fetched under
/work/.mirror). Prints per seed the sigmas, timesteps and loss; tests/engines/models/test_hunyuanvideo.py keeps them.
"""

from __future__ import annotations

import importlib
import subprocess
import sys
import tempfile
from pathlib import Path
from types import SimpleNamespace

import torch
from diffusers import FlowMatchEulerDiscreteScheduler, HunyuanVideoTransformer3DModel

TRAINER = "/work/.mirror/a-r-r-o-w+finetrainers/repo"
REV = "f476c37"
TINY = dict(in_channels=16, out_channels=16, num_attention_heads=2, attention_head_dim=16, num_layers=1,
            num_single_layers=1, num_refiner_layers=1, mlp_ratio=4.0, patch_size=2, patch_size_t=1,
            rope_axes_dim=(4, 6, 6), guidance_embeds=True, text_embed_dim=32, pooled_projection_dim=32)  # fmt: skip
SCALING_FACTOR = 0.476986
SEEDS = (11, 12)
STUBS = {
    "__init__.py": "",
    "functional/__init__.py": "from .diffusion import flow_match_target, flow_match_xt\n",
    "data.py": "VideoArtifact = object\n",
    "logging.py": "import logging\n\ndef get_logger():\n    return logging.getLogger('finetrainers')\n",
    "models/__init__.py": "",
    "models/hunyuan_video/__init__.py": "",
    "models/modeling_utils.py": "class ModelSpecification:\n    pass\n",
    "processors.py": "CLIPPooledProcessor = LlamaProcessor = ProcessorMixin = object\n",
    "typing.py": "ArtifactType = SchedulerType = object\n",
    "utils/__init__.py": "_enable_vae_memory_optimizations = get_non_null_items = None\n"
    "safetensors_torch_save_function = None\n",
}
THEIRS = ("functional/diffusion.py", "utils/diffusion.py", "models/hunyuan_video/base_specification.py")


def _their_package() -> None:
    root = Path(tempfile.mkdtemp()) / "finetrainers"
    for name, text in STUBS.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    for name in THEIRS:
        text = subprocess.run(["git", f"--git-dir={TRAINER}", "show", f"{REV}:finetrainers/{name}"],
                              check=True, capture_output=True, text=True).stdout  # fmt: skip
        (root / name).write_text(text)
    sys.path.insert(0, str(root.parent))


def main() -> None:
    _their_package()
    spec_module = importlib.import_module("finetrainers.models.hunyuan_video.base_specification")
    diffusion = importlib.import_module("finetrainers.utils.diffusion")
    torch.manual_seed(0)
    model = HunyuanVideoTransformer3DModel(**TINY).eval()
    g = torch.Generator().manual_seed(7)
    mean = torch.randn(2, 16, 2, 4, 4, generator=g)
    logvar = -2 + 0.5 * torch.randn(2, 16, 2, 4, 4, generator=g)
    text = torch.randn(2, 8, 32, generator=g)
    pooled = torch.randn(2, 32, generator=g)
    mask = torch.tensor([[1.0] * 8, [1.0] * 3 + [0.0] * 5])
    scheduler = FlowMatchEulerDiscreteScheduler()
    spec = SimpleNamespace(vae_config=SimpleNamespace(scaling_factor=SCALING_FACTOR))
    for seed in SEEDS:
        generator = torch.Generator().manual_seed(seed)
        sigmas = diffusion.prepare_sigmas(
            scheduler, scheduler.sigmas.clone().float(), batch_size=2, num_train_timesteps=1000,
            flow_weighting_scheme="logit_normal", flow_logit_mean=0.0, flow_logit_std=1.0, generator=generator,
        ).view(-1, 1, 1, 1, 1)  # fmt: skip
        with torch.no_grad():
            pred, target, sigmas = spec_module.HunyuanVideoModelSpecification.forward(
                spec, model, {"encoder_hidden_states": text, "encoder_attention_mask": mask,
                              "pooled_projections": pooled},
                {"latents": torch.cat([mean, logvar], dim=1)}, sigmas, generator=generator, compute_posterior=False,
            )  # fmt: skip
        weights = diffusion.prepare_loss_weights(scheduler, sigmas=sigmas, flow_weighting_scheme="logit_normal")
        loss = (weights.float() * (pred.float() - target.float()).pow(2)).mean(list(range(1, pred.ndim))).mean()
        print(f"seed {seed}: sigmas {sigmas.flatten().tolist()!r} timesteps {(sigmas.flatten() * 1000).long().tolist()}"
              f" loss {loss.item()!r}")  # fmt: skip


if __name__ == "__main__":
    main()
