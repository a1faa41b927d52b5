"""Reference losses of OpenSora's own objectives on fixed inputs, per bucket shape of each released variant.

Source: github.com/hpcaitech/Open-Sora at v1.0.0 (opensora/schedulers/iddpm: `IDDPM(timestep_respacing="")` as
configs/opensora/train/16x{256,512}x512.py build it, `training_losses(model, x0, t, noise=noise)["loss"]`) and
v1.2.0 (opensora/schedulers/rf: `RFLOW(use_timestep_transform=True, sample_method="logit-normal")` as
configs/opensora-v1-2/train/stage*.py build it; `timestep_transform(t, {height, width, num_frames})` then
`training_losses(model, x0, model_kwargs, noise=noise, mask=mask, t=t')["loss"]`; image sizes from
opensora/datasets/aspect.py `get_image_size`). The loss is each script's per-sample loss averaged over the batch,
as their train.py does (`loss_dict["loss"].mean()`). Run from the repo root:
    .venv/bin/python docs/fidelity/ref_opensora_objectives.py /tmp/osora/v10 /tmp/osora/v12
Fixed inputs, by name through `tests.fidelity.seeded_tensor` (scale 1): x0 (B, 4, T', H', W'), noise, and the
"model output" (B, 8, T', H', W'): the IDDPM denoiser returns it whatever its input, the rectified-flow one adds
0.5 x_t to it (`model` below). Also prints the timesteps their IDDPM sampler keeps (`space_timesteps`) and one run
of their RFLOW sampler with a stand-in denoiser (`velocity_model`). Timesteps are given: 1.0 integer t, 1.2
the raw draw t in [0, 1000] before their shift. Prints the transformed timesteps and the loss per bucket; the
numbers are kept in tests/engines/models/test_opensora_objectives.py.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from ref_opensora_shim import use_tag  # noqa: E402

from tests.fidelity import seeded_tensor  # noqa: E402

# v1.0: configs/opensora/train/16x256x256.py and 16x512x512.py (SD VAE: latent = pixels / 8), t incl. 0 (decoder NLL)
IDDPM_BUCKETS = {"16x256x256": (16, 32, 32), "16x512x512": (16, 64, 64)}
IDDPM_T = [0, 417, 999]
# v1.2: (resolution, frames, aspect) from configs/opensora-v1-2/train/stage*.py bucket_config; latent frames are
# their VAE's (17 -> 5), latent sides their SDXL VAE's (three stride-2 convs: 426 -> 53)
RF_BUCKETS = {
    "144p-51-9:16": ("144p", 51, "9:16", 15),
    "240p-102-9:16": ("240p", 102, "9:16", 30),
    "144p-408-9:16": ("144p", 408, "9:16", 120),
    "360p-204-1:1": ("360p", 204, "1:1", 60),
    "720p-1-16:9": ("720p", 1, "16:9", 1),
}
RF_T = [50.0, 500.0, 950.0]


def latent_side(pixels: int) -> int:
    for _ in range(3):  # diffusers Downsample2D: pad (0, 1) then a 3x3 stride-2 conv
        pixels = (pixels - 2) // 2 + 1
    return pixels


def inputs(name: str, latent: tuple[int, int, int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    b = 3
    return (seeded_tensor(f"{name}/x0", (b, 4, *latent), scale=1.0),
            seeded_tensor(f"{name}/noise", (b, 4, *latent), scale=1.0),
            seeded_tensor(f"{name}/out", (b, 8, *latent), scale=1.0))  # fmt: skip


def fixed(out: torch.Tensor):  # noqa: ANN201
    """The stand-in denoiser of the IDDPM checks: a fixed output whatever its input."""
    return lambda x, t, **kw: out


def model(out: torch.Tensor):  # noqa: ANN201
    """The stand-in denoiser of the rectified-flow checks: a fixed output plus half of x_t in both channel halves, so
    the loss depends on how x_t was formed (noising convention, shifted t, clean conditioning frames)."""
    return lambda x, t, **kw: out + 0.5 * torch.cat([x, x], dim=1)


def iddpm(src: str) -> None:
    use_tag(src)
    from opensora.schedulers.iddpm import IDDPM

    diffusion = IDDPM(timestep_respacing="")
    for name, latent in IDDPM_BUCKETS.items():
        x0, noise, out = inputs(name, latent)
        loss = diffusion.training_losses(fixed(out), x0, torch.tensor(IDDPM_T), noise=noise)["loss"]
        print(f"iddpm {name}: latent={latent} t={IDDPM_T} loss={loss.mean().item()!r}")


def rflow(src: str) -> None:
    use_tag(src)
    from opensora.datasets.aspect import get_image_size
    from opensora.schedulers.rf import RFLOW
    from opensora.schedulers.rf.rectified_flow import timestep_transform

    rf = RFLOW(use_timestep_transform=True, sample_method="logit-normal")
    for name, (res, frames, ar, latent_t) in RF_BUCKETS.items():
        h, w = get_image_size(res, ar)
        latent = (latent_t, latent_side(h), latent_side(w))
        x0, noise, out = inputs(name, latent)
        kwargs = {"height": torch.tensor([float(h)] * 3), "width": torch.tensor([float(w)] * 3),
                  "num_frames": torch.tensor([float(frames)] * 3)}  # fmt: skip
        t = timestep_transform(torch.tensor(RF_T), kwargs, num_timesteps=1000)
        loss = rf.training_losses(model(out), x0, kwargs, noise=noise, t=t)["loss"].mean()
        print(f"rflow {name}: pixels=({frames}, {h}, {w}) latent={latent} t={t.tolist()!r} loss={loss.item()!r}")
    # a frame mask (their image/video conditioning): per-sample means over the masked-in frames
    name, latent = "240p-102-9:16", (30, 30, 53)
    x0, noise, out = inputs(name, latent)
    mask = torch.ones(3, 30, dtype=torch.bool)
    mask[0, :5], mask[2, -10:] = False, False
    t = torch.tensor([300.0, 600.0, 900.0])
    loss = rf.training_losses(model(out), x0, {}, noise=noise, mask=mask, t=t)["loss"].mean()
    print(f"rflow masked {name}: t={t.tolist()} loss={loss.item()!r}")


def iddpm_respacing(src: str) -> None:
    """The timesteps their IDDPM(num_sampling_steps=N) samples over (v1.0.0 inference configs: N = 100)."""
    use_tag(src)
    from opensora.schedulers.iddpm.respace import space_timesteps

    for steps in (100, 30, 7):
        print(f"iddpm respaced {steps}: {sorted(space_timesteps(1000, str(steps)), reverse=True)}")


class _Text:
    """Their sampler's text encoder interface: a constant caption and a constant null caption."""

    def encode(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        return {"y": torch.full((len(prompts), 1, 4, 8), 0.5), "mask": torch.ones(len(prompts), 4, dtype=torch.long)}

    def null(self, n: int) -> torch.Tensor:
        return torch.full((n, 1, 4, 8), -0.25)


def velocity_model(z: torch.Tensor, t: torch.Tensor, y: torch.Tensor, **kwargs) -> torch.Tensor:
    """The stand-in denoiser of the sampler check: depends on z, t and the caption; 8 channels, velocity first."""
    v = 0.2 * z + torch.sin(t / 300.0).view(-1, 1, 1, 1, 1) * y.mean(dim=(1, 2, 3)).view(-1, 1, 1, 1, 1)
    return torch.cat([v, 100.0 + z], dim=1)  # the second half must be ignored


def rflow_sample(src: str) -> None:
    """Their RFLOW sampler as configs/opensora-v1-2/inference/sample.py sets it (30 steps, cfg 7.0, shifted)."""
    use_tag(src)
    from opensora.schedulers.rf import RFLOW

    rf = RFLOW(use_timestep_transform=True, num_sampling_steps=30, cfg_scale=7.0)
    z = seeded_tensor("rflow_sample/z", (1, 4, 15, 4, 6), scale=1.0)
    args = {"height": torch.tensor([240.0]), "width": torch.tensor([426.0]), "num_frames": torch.tensor([51.0])}
    out = rf.sample(velocity_model, _Text(), z.clone(), ["a"], "cpu", additional_args=args, progress=False)
    print(f"rflow sample 240x426x51: sum={out.double().sum().item()!r} abs_sum={out.double().abs().sum().item()!r}")
    print(f"rflow sample picks: {[out[0, c, f, 1, 2].item() for c, f in ((0, 0), (1, 7), (3, 14))]!r}")


if __name__ == "__main__":
    iddpm(sys.argv[1])
    iddpm_respacing(sys.argv[1])
    rflow(sys.argv[2])
    rflow_sample(sys.argv[2])
