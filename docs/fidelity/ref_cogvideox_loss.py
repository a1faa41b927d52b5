"""Reference training losses for the CogVideoX families, computed by THUDM's own finetune trainers.

Authors' code: zai-org/CogVideo (formerly THUDM/CogVideo) @ 7a1af71 (main; the finetune/ directory has no release
tag), `finetune/models/cogvideox_t2v/lora_trainer.py` CogVideoXT2VLoraTrainer.compute_loss (which the 1.5 T2V
trainer inherits unchanged) and `finetune/models/cogvideox_i2v/lora_trainer.py` CogVideoXI2VLoraTrainer.compute_loss
(inherited by 1.5 I2V), run on diffusers 0.42.1 as installed in the project venv.

What is fixed, and how:
- the scheduler: CogVideoXDPMScheduler, as the trainers load it, with the released scheduler_config.json values
  (THUDM/CogVideoX-2b and -5b: scaled_linear 0.00085..0.012, v_prediction, rescale_betas_zero_snr, trailing,
  snr_shift_scale 3.0 for 2B and 1.0 for 5B; 1.5: sat/configs/cogvideox1.5_5b*.yaml, shift_scale 1.0);
- latents, text states, the image latent, the noise: `tests.engines.models.cogvideox_probe` (seeded by name and shape);
  `torch.randn_like` is patched to hand the trainer that noise (the I2V trainer's pixel noise on the image gets
  zeros: the stand-in VAE ignores its input and returns the fixed image latent, with scaling_factor 1.0);
- the timesteps: `torch.randint` is patched to return each case's list (cases:
  `tests.engines.models.cogvideox_probe.CASES`);
- the "model output": `ProbeTransformer` (seeded numbers plus terms of every input it is handed).

Stubbed (not needed for compute_loss): finetune.trainer.Trainer (an empty base class), finetune.schemas.Components,
finetune.utils.unwrap_model, and finetune.models' package __init__ (it imports every trainer).

Run: PYTHONPATH=/tmp/cogvx/CogVideo:. .venv/bin/python docs/fidelity/ref_cogvideox_loss.py, with the finetune/
directory of that commit under /tmp/cogvx/CogVideo (git archive). Prints `REFERENCE = {...}`: case -> loss, the
numbers tests/engines/models/test_cogvideox_fidelity.py holds.
"""

from __future__ import annotations

import importlib
import sys
import types
from functools import partial
from pathlib import Path
from types import SimpleNamespace

import torch
from diffusers import CogVideoXDPMScheduler

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
from tests.engines.models.cogvideox_probe import CASES, ProbeTransformer, case_id, fixed_inputs, fixed_noise  # noqa: E402

RELEASED_SCHEDULER = dict(
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    clip_sample=False,
    num_train_timesteps=1000,
    prediction_type="v_prediction",
    rescale_betas_zero_snr=True,
    set_alpha_to_one=True,
    steps_offset=0,
    timestep_spacing="trailing",
)
SNR_SHIFT = {"cogvideox-2b": 3.0}  # every 5B-line release: 1.0


def _stub_finetune_package() -> None:
    """Only the trainers' modules are imported; their heavy siblings are replaced by the few names they use."""
    root = Path(importlib.util.find_spec("finetune").submodule_search_locations[0])
    stubs = {
        "finetune.trainer": {"Trainer": type("Trainer", (), {})},
        "finetune.schemas": {"Components": SimpleNamespace},
        "finetune.utils": {"unwrap_model": lambda accelerator, model: model},
    }
    for name, attrs in stubs.items():
        module = types.ModuleType(name)
        module.__dict__.update(attrs)
        sys.modules[name] = module
    models = types.ModuleType("finetune.models")
    models.__path__ = [str(root / "models")]
    sys.modules["finetune.models"] = models


def _authors_loss(trainer_cls: type, variant: str, inputs: dict, timesteps: list[int]) -> float:
    probe = ProbeTransformer(variant)
    scheduler = CogVideoXDPMScheduler(**RELEASED_SCHEDULER, snr_shift_scale=SNR_SHIFT.get(variant, 1.0))
    image = inputs.get("image")
    vae = SimpleNamespace(
        config=SimpleNamespace(scaling_factor=1.0, block_out_channels=(128, 256, 256, 512)),
        dtype=torch.float32,
        encode=lambda x: SimpleNamespace(latent_dist=SimpleNamespace(sample=lambda: image)),
    )
    me = SimpleNamespace(
        components=SimpleNamespace(scheduler=scheduler, transformer=probe, vae=vae),
        state=SimpleNamespace(transformer_config=probe.config),
        accelerator=SimpleNamespace(device=torch.device("cpu")),
    )
    me.prepare_rotary_positional_embeddings = partial(trainer_cls.prepare_rotary_positional_embeddings, me)
    batch = {"encoded_videos": inputs["latents"], "prompt_embedding": inputs["text"]}
    if image is not None:
        b, _, _, h, w = inputs["latents"].shape
        batch["images"] = torch.zeros(b, 3, h * 8, w * 8)  # pixels; only their shape reaches the stand-in VAE

    real_randn_like, real_randint = torch.randn_like, torch.randint
    torch.randn_like = lambda x, **kw: fixed_noise(tuple(x.shape)) if x.shape[2] == 16 else torch.zeros_like(x)
    torch.randint = lambda *a, **kw: torch.tensor(timesteps)
    try:
        with torch.no_grad():
            return float(trainer_cls.compute_loss(me, batch))
    finally:
        torch.randn_like, torch.randint = real_randn_like, real_randint


def main() -> None:
    _stub_finetune_package()
    t2v = importlib.import_module("finetune.models.cogvideox_t2v.lora_trainer").CogVideoXT2VLoraTrainer
    i2v = importlib.import_module("finetune.models.cogvideox_i2v.lora_trainer").CogVideoXI2VLoraTrainer
    out = {}
    for variant, frames, height, width, batch, timesteps in CASES:
        is_i2v = variant.endswith("i2v")
        inputs = fixed_inputs(frames, height, width, batch, is_i2v)
        out[case_id(variant, frames, height, width, batch)] = _authors_loss(
            i2v if is_i2v else t2v, variant, inputs, timesteps
        )
    print("REFERENCE = {")
    for key, value in out.items():
        print(f"    {key!r}: {value!r},")
    print("}")


if __name__ == "__main__":
    main()
