"""Reference values for the LTX-Video objective, printed by LTX-Video-Trainer's own code (OUTSIDE this project).

Lightricks/LTX-Video-Trainer@31b1273 is the authors' training code. Its modules are loaded from the mirror at that
commit and only called: `timestep_samplers.py` (`ShiftedLogitNormalTimestepSampler`), `ltxv_utils.py` and
`training_strategies.py` (`StandardTrainingStrategy.prepare_batch`, `prepare_model_inputs`, `compute_loss`). Stubs:
the package's `__init__` (its rich logger) and `config.py` (pydantic models importing the model loader; only
`ConditioningConfig.first_frame_conditioning_p` is read, given here as a plain attribute).

The denoiser is diffusers' `LTXVideoTransformer3DModel` (what the trainer trains) at a tiny size, its weights drawn
after `torch.manual_seed(0)`: in_channels 128, 2 heads of 16, cross_attention_dim 32, caption_channels 32, 2 layers.
Inputs (the test rebuilds them): x0 = 1.5 randn(2, 128, 2, 2, 2) from torch.Generator().manual_seed(7), packed to
(2, 8, 128) tokens; prompt states randn(2, 8, 32) from the same generator, mask [1]*8 and [1]*3 + [0]*5. The trainer
draws sigma and noise from the global RNG: `torch.manual_seed(seed)` before `prepare_batch`, so a generator seeded
alike gives randn(2) (the logit-normal draw) then randn(2, 8, 128) (eps). First-frame conditioning: p = 0 and p = 1.

Run: .venv/bin/python docs/fidelity/ref_ltx_loss.py (needs the mirror fetched under /work/.mirror). Prints the token
shifts, then per case the sigmas and the loss; tests/engines/models/test_ltx.py keeps them.
"""

from __future__ import annotations

import importlib
import logging
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from diffusers import LTXVideoTransformer3DModel

TRAINER = "/work/.mirror/Lightricks+LTX-Video-Trainer/repo"
REV = "31b1273"
TINY = dict(in_channels=128, out_channels=128, num_attention_heads=2, attention_head_dim=16, cross_attention_dim=32,
            caption_channels=32, num_layers=2)  # fmt: skip
CASES = [(11, 0.0), (12, 1.0)]  # (seed, first_frame_conditioning_p)


def _their_package() -> None:
    root = Path(tempfile.mkdtemp()) / "ltxv_trainer"
    root.mkdir()
    (root / "__init__.py").write_text("import logging\nlogger = logging.getLogger('ltxv_trainer')\n")
    (root / "config.py").write_text("class ConditioningConfig:\n    first_frame_conditioning_p = 0.0\n")
    for name in ("timestep_samplers.py", "ltxv_utils.py", "training_strategies.py"):
        text = subprocess.run(["git", f"--git-dir={TRAINER}", "show", f"{REV}:src/ltxv_trainer/{name}"],
                              check=True, capture_output=True, text=True).stdout  # fmt: skip
        (root / name).write_text(text)
    sys.path.insert(0, str(root.parent))


def main() -> None:
    logging.disable(logging.WARNING)
    _their_package()
    samplers = importlib.import_module("ltxv_trainer.timestep_samplers")
    strategies = importlib.import_module("ltxv_trainer.training_strategies")
    config = importlib.import_module("ltxv_trainer.config")
    sampler = samplers.ShiftedLogitNormalTimestepSampler()
    for n in (8, 1024, 4096, 32760):
        print(f"shift({n}) = {sampler._get_shift_for_sequence_length(n)!r}")

    torch.manual_seed(0)
    model = LTXVideoTransformer3DModel(**TINY).eval()
    g = torch.Generator().manual_seed(7)
    x0 = 1.5 * torch.randn(2, 128, 2, 2, 2, generator=g)
    text = torch.randn(2, 8, 32, generator=g)
    mask = torch.tensor([[1] * 8, [1] * 3 + [0] * 5])
    # (B, T'H'W', C): LTXPipeline._pack_latents with 1x1x1 patches; contiguous as the trainer's collated batch is (a
    # strided view would make their `randn_like` draw eps in another memory order)
    packed = x0.permute(0, 2, 3, 4, 1).flatten(1, 3).contiguous()
    for seed, p in CASES:
        cond = config.ConditioningConfig()
        cond.first_frame_conditioning_p = p
        strategy = strategies.StandardTrainingStrategy(cond)
        batch = {"latents": {"latents": packed, "num_frames": torch.tensor([2]), "height": torch.tensor([2]),
                             "width": torch.tensor([2]), "fps": torch.tensor([24])},
                 "conditions": {"prompt_embeds": text, "prompt_attention_mask": mask}}  # fmt: skip
        torch.manual_seed(seed)
        prepared = strategy.prepare_batch(batch, sampler)
        with torch.no_grad():
            pred = model(**strategy.prepare_model_inputs(prepared))[0]
        loss = strategy.compute_loss(pred, prepared)
        print(f"seed {seed} p {p}: sigmas {prepared.sigmas.flatten().tolist()!r} "
              f"conditioned {bool(prepared.conditioning_mask.any())} loss {loss.item()!r}")  # fmt: skip


if __name__ == "__main__":
    main()
