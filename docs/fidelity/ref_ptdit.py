"""Reference values for Qihoo-T2X's PT-DiT, computed with the authors' released code, run once (CI never runs it).

Source: Ascend/MindSpeed-MM@v2.0.0 (the first release tag that ships Qihoo-T2X; the model and pipeline files are
unchanged in substance since commit 2e7ccce6, 2024-12-16, "Qihoo-T2X 模型代码"), files
`mindspeed_mm/models/predictor/dits/pt_dit_diffusers.py` (PTDiTDiffuser), `mindspeed_mm/models/common/embeddings/
pos_patch_encoding.py` (its patch embedding and 3D sin-cos table), `mindspeed_mm/models/diffusion/rflow.py` (RFlow:
q_sample, timestep_transform, training_losses) and `examples/qihoo_t2x/inference_model_image.json` (the released
Qihoo-T2I config).

Run with the project venv (torch 2.14.1, diffusers 0.42.1) plus einops installed outside it:
    mkdir -p /tmp/qihoo/MindSpeed-MM /tmp/qihoo/pkgs
    git --git-dir=/work/.mirror/Ascend+MindSpeed-MM/repo archive v2.0.0 mindspeed_mm examples/qihoo_t2x \
        | tar -x -C /tmp/qihoo/MindSpeed-MM
    .venv/bin/pip install --no-deps --target /tmp/qihoo/pkgs einops
    PYTHONPATH=/tmp/qihoo/pkgs:. .venv/bin/python docs/fidelity/ref_ptdit.py /tmp/qihoo/MindSpeed-MM [--write-facts]

Stubbed: `torch_npu` (an empty module; the file imports it but the model never calls it), and the `mindspeed_mm`
package `__init__`s (they pull in megatron/mindspeed); only the four files above are executed.

Prints (JSON): the released transformer's parameter count; per forward case, the output's sum, absolute sum and
16 values at fixed flat indices; per objective case, the loss; per sampler case, the same summary of the latents.
`--write-facts` also writes tests/facts/qihoo_t2x_ptdit_1.1b.json (the released config's module built on meta).
Numbers used by tests/engines/models/dits/test_pt_dit_reference.py (FORWARD, LOSSES, SAMPLES).
"""

from __future__ import annotations

import importlib
import json
import sys
import types
from pathlib import Path

import torch

from tests.fidelity import seeded_tensor, seeded_weights

FACTS = Path(__file__).resolve().parents[2] / "tests" / "facts" / "qihoo_t2x_ptdit_1.1b.json"
SOURCE = (
    "Ascend/MindSpeed-MM@v2.0.0: mindspeed_mm/models/predictor/dits/pt_dit_diffusers.py PTDiTDiffuser with the "
    "predictor block of examples/qihoo_t2x/inference_model_image.json, built on meta (docs/fidelity/ref_ptdit.py)"
)
# the same tiny module configs and inputs as tests/engines/models/dits/test_pt_dit_reference.py
TINY = dict(num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=8, num_layers=2,
            caption_channels=16, sample_size=32)  # fmt: skip
CONFIGS = {"tiny": dict(compress_ratios=[1, 4, 4], proxy_compress_ratios=[1, 2, 2]),
           "temporal": dict(compress_ratios=[2, 4, 4], proxy_compress_ratios=[1, 4, 4])}  # fmt: skip
CASES = {"image-train-size": ("tiny", 1, 32, 32), "video-16x32": ("tiny", 2, 16, 32),
         "temporal-window": ("temporal", 4, 16, 16)}  # fmt: skip
LOSS_CASES = {"image-1024": (1, 1024, 1024), "image-512": (1, 512, 512), "image-512x1024": (1, 512, 1024),
              "video-17x512": (17, 512, 512), "video-29x512x768": (29, 512, 768)}  # fmt: skip
SAMPLE_CASES = {"image-1024": (1, 1024, 1024), "video-29x512x768": (29, 512, 768)}
PICK = 16


def load_authors(root: Path) -> tuple[types.ModuleType, types.ModuleType]:
    for name in ("diffusers.models.modeling_utils", "diffusers.models.attention", "diffusers.models.embeddings",
                 "diffusers.models.attention_processor", "diffusers.models.normalization"):  # fmt: skip
        importlib.import_module(name)  # before the stub: diffusers/accelerate probe for a real torch_npu at import
    sys.modules["torch_npu"] = types.ModuleType("torch_npu")
    for pkg in ("mindspeed_mm", "mindspeed_mm.models", "mindspeed_mm.models.common",
                "mindspeed_mm.models.common.embeddings", "mindspeed_mm.models.predictor",
                "mindspeed_mm.models.predictor.dits", "mindspeed_mm.models.diffusion"):  # fmt: skip
        mod = types.ModuleType(pkg)
        mod.__path__ = [str(root / pkg.replace(".", "/"))]
        sys.modules[pkg] = mod
    sys.path.insert(0, str(root))
    pos = importlib.import_module("mindspeed_mm.models.common.embeddings.pos_patch_encoding")
    sys.modules["mindspeed_mm.models.common.embeddings"].PatchEmbed2D_3DsincosPE = pos.PatchEmbed2D_3DsincosPE
    dit = importlib.import_module("mindspeed_mm.models.predictor.dits.pt_dit_diffusers")
    rflow = importlib.import_module("mindspeed_mm.models.diffusion.rflow")
    return dit, rflow


def released_config(root: Path) -> dict:
    cfg = json.loads((root / "examples/qihoo_t2x/inference_model_image.json").read_text())["predictor"]
    return {k: v for k, v in cfg.items() if k not in ("dtype", "model_id", "from_pretrained")}


def authors_tiny(dit: types.ModuleType, name: str) -> torch.nn.Module:
    model = dit.PTDiTDiffuser(**TINY, **CONFIGS[name], cross_attention_dim=32, attention_bias=True, frame=1,
                              patch_size=2, activation_fn="gelu-approximate", num_embeds_ada_norm=1000,
                              norm_type="ada_norm_single", norm_elementwise_affine=False, norm_eps=1e-6,
                              shift_window=True)  # fmt: skip
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    model.load_state_dict(seeded_weights(shapes, seed=17), strict=True)
    return model.eval()


def forward_inputs(t: int, h: int, w: int) -> dict[str, torch.Tensor]:
    """Two samples, one timestep (the authors' block modulation pairs windows with samples correctly only then),
    different captions and masks."""
    mask = torch.ones(2, 6)
    mask[1, 4:] = 0
    return dict(hidden_states=seeded_tensor(f"x{t}x{h}x{w}", (2, 4, t, h, w), 17, scale=1.0),
                timestep=torch.tensor([437.0, 437.0]),
                encoder_hidden_states=seeded_tensor("caption", (2, 6, 16), 17, scale=1.0),
                encoder_attention_mask=mask)  # fmt: skip


def summary(out: torch.Tensor) -> dict:
    flat = out.double().flatten()
    idx = torch.linspace(0, flat.numel() - 1, PICK).round().long()
    return {"shape": list(out.shape), "sum": flat.sum().item(), "abs_sum": flat.abs().sum().item(),
            "values": flat[idx].tolist()}  # fmt: skip


def stand_in_model(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """A fixed 'denoiser' for the objective: velocity half depends on x_t and t, the second half (the sigma
    leftover) is junk the loss must ignore."""
    v = 0.7 * x_t - 0.3 * (t / 1000.0).view(-1, 1, 1, 1, 1) + 0.05
    return torch.cat([v, torch.full_like(v, 9.0)], dim=1)


def authors_loss(rflow: types.ModuleType, frames: int, height: int, width: int) -> float:
    """MindSpeed-MM's RFlow as the released diffusion block configures it (logit-normal, use_timestep_transform),
    on the draws our RectifiedFlow.loss makes from torch.Generator().manual_seed(5): the logit-normal sample first
    (sigmoid of one normal per sample: LogisticNormal's first coordinate), then the noise."""
    latent = (1 if frames == 1 else (frames - 1) // 4 + 1, height // 8, width // 8)
    x0 = seeded_tensor(f"x0-{frames}x{height}x{width}", (2, 4, *latent), 5, scale=1.0)
    g = torch.Generator().manual_seed(5)
    u = torch.sigmoid(torch.randn(2, generator=g))
    noise = torch.randn(x0.shape, generator=g)
    rf = rflow.RFlow(num_inference_steps=30, use_timestep_transform=True, sample_method="logit-normal", cfg_scale=4.0)
    rf.sample_t = lambda x: u  # the distribution's draw, fixed
    kwargs = {"height": torch.tensor([float(height)] * 2), "width": torch.tensor([float(width)] * 2),
              "num_frames": torch.tensor([frames] * 2)}  # fmt: skip
    x_t, noise, t = rf.q_sample(x0, noise=noise, model_kwargs=kwargs)
    return rf.training_losses(stand_in_model(x_t, t), x0, noise=noise, t=t).mean().item()


def stand_in_sampler_model(z: torch.Tensor, t: torch.Tensor, **_: object) -> torch.Tensor:
    """A fixed velocity field for the sampler, twice the latent channels like the released head."""
    v = -0.5 * z + torch.sin(3.0 * t / 1000.0).view(-1, 1, 1, 1, 1)
    return torch.cat([v, torch.full_like(v, 9.0)], dim=1)


def authors_sample(rflow: types.ModuleType, frames: int, height: int, width: int) -> dict:
    """RFlow.sample as the released config sets it (30 steps, transform on, guidance 4.0 over a doubled batch whose
    halves agree here, so the stand-in's velocity is what steps), from seeded noise on small latents: the transform
    reads the pixel sizes from model_kwargs, as the pipeline passes them."""
    z = seeded_tensor(f"noise-{frames}x{height}x{width}", (1, 4, 2 if frames > 1 else 1, 8, 8), 5, scale=1.0)
    rf = rflow.RFlow(num_inference_steps=30, use_timestep_transform=True, sample_method="logit-normal", cfg_scale=4.0)
    kwargs = {"height": torch.tensor([float(height)]), "width": torch.tensor([float(width)]),
              "num_frames": torch.tensor([frames])}  # fmt: skip
    return summary(rf.sample(stand_in_sampler_model, z, model_kwargs=kwargs, progress=False))


def main() -> None:
    root = Path(sys.argv[1])
    dit, rflow = load_authors(root)
    torch.manual_seed(0)
    with torch.device("meta"):
        released = dit.PTDiTDiffuser(**released_config(root))
    keys = {k: list(v.shape) for k, v in released.state_dict().items()}
    result = {"released_parameters": sum(p.numel() for p in released.parameters()), "released_keys": len(keys)}
    if "--write-facts" in sys.argv:
        table = {"source": SOURCE, "used_by": [["qihoo_t2x", "qihoo-t2x-1.1b", "transformer"]], "keys": keys}
        FACTS.write_text(json.dumps(table, indent=1) + "\n")
    models = {name: authors_tiny(dit, name) for name in CONFIGS}
    with torch.no_grad():
        for case, (name, t, h, w) in CASES.items():
            models[name].shift_window_attention_mask = None  # their cache keeps the first input size's mask
            result[case] = summary(models[name](**forward_inputs(t, h, w)))
    result["losses"] = {case: authors_loss(rflow, *shape) for case, shape in LOSS_CASES.items()}
    result["samples"] = {case: authors_sample(rflow, *shape) for case, shape in SAMPLE_CASES.items()}
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
