"""Reference outputs of the authors' STDiT (v1.0.0), STDiT3 and OpenSora VAE (v1.2.0) on tiny seeded configs.

Source: github.com/hpcaitech/Open-Sora at tags v1.0.0 (opensora/models/stdit/stdit.py, opensora/models/layers/
blocks.py) and v1.2.0 (opensora/models/stdit/stdit3.py, opensora/models/layers/blocks.py, opensora/models/vae/
{vae,vae_temporal,utils}.py), unpacked by `git archive <tag> | tar -x -C /tmp/osora/<dir>`. Run from the repo root:
    .venv/bin/python docs/fidelity/ref_opensora_forward.py /tmp/osora/v10 /tmp/osora/v12
(torch 2.14.1 CPU float32; stubs in ref_opensora_shim.py). Weights: `tests.fidelity.seeded_weights` over the
module's own state-dict names (= the released names), seed 0, except the fixed tables each side computes itself
(STDiT's `pos_embed`/`pos_embed_temporal`, STDiT3's `rope.freqs`, the VAE's latent `scale`/`shift`). Inputs:
`seeded_tensor` by name. The VAE's posteriors are read at their means (the pipeline's `sample()` calls patched to
`mode()`), so encode is deterministic. Prints, per output, shape, sum, abs-sum and a few elements;
tests/engines/models/dits/test_opensora_reference.py keeps them.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from ref_opensora_shim import AUTOENCODER_CONFIGS, print_numbers, use_tag  # noqa: E402

from tests.fidelity import seeded_tensor, seeded_weights  # noqa: E402

TINY = dict(hidden_size=32, depth=2, num_heads=2, caption_channels=16, model_max_length=8, in_channels=4)
LATENT = (2, 4, 3, 8, 12)  # (B, C, T, H, W): non-square, 3 frames
PICKS = [(0, 0, 0, 0, 0), (0, 3, 1, 4, 7), (1, 2, 2, 7, 11), (1, 5, 0, 3, 2), (1, 7, 2, 5, 9)]
VAE_PICKS = [(0, 0, 0, 0, 0), (0, 1, 7, 5, 9), (0, 2, 19, 15, 15), (0, 0, 17, 8, 3)]
Z_PICKS = [(0, 0, 0, 0, 0), (0, 1, 3, 1, 0), (0, 3, 5, 1, 1)]


def load(module: torch.nn.Module, skip: set[str]) -> None:
    shapes = {k: tuple(v.shape) for k, v in module.state_dict().items() if k not in skip}
    missing, unexpected = module.load_state_dict(seeded_weights(shapes), strict=False)
    assert set(missing) == skip and not unexpected, (missing, unexpected)


def dit_inputs() -> dict[str, torch.Tensor]:
    mask = torch.ones(2, 8, dtype=torch.long)  # the T5 tokenizer's attention mask
    mask[1, 5:] = 0
    return dict(x=seeded_tensor("x", LATENT, scale=1.0), t=torch.tensor([10.0, 700.0]),
                y=seeded_tensor("y", (2, 8, 16), scale=1.0), mask=mask)  # fmt: skip


def stdit(src: str) -> None:
    use_tag(src)
    from opensora.models.stdit.stdit import STDiT

    model = STDiT(input_size=LATENT[2:], patch_size=(1, 2, 2), space_scale=0.5, time_scale=1.0, **TINY).eval()
    load(model, {"pos_embed", "pos_embed_temporal"})
    i = dit_inputs()
    with torch.no_grad():
        out = model(i["x"], i["t"], i["y"][:, None], mask=i["mask"])
    print_numbers("stdit", out, PICKS)


def stdit3(src: str) -> None:
    use_tag(src)
    from opensora.models.stdit.stdit3 import STDiT3, STDiT3Config

    model = STDiT3(STDiT3Config(patch_size=(1, 2, 2), qk_norm=True, **TINY)).eval()
    load(model, {"rope.freqs"})
    i = dit_inputs()
    extras = dict(fps=torch.tensor([24.0, 120.0]), height=torch.tensor([64.0, 64.0]), width=torch.tensor([96.0, 96.0]))
    x_mask = torch.tensor([[False, True, True], [True, True, True]])
    with torch.no_grad():
        out = model(i["x"], i["t"], i["y"][:, None], mask=i["mask"], **extras)
        masked = model(i["x"], i["t"], i["y"][:, None], mask=i["mask"], x_mask=x_mask, **extras)
    print_numbers("stdit3", out, PICKS)
    print_numbers("stdit3_xmask", masked, PICKS)


def vae(src: str) -> None:
    use_tag(src)
    from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution as SpatialPosterior
    from opensora.models.vae import vae_temporal  # noqa: F401  (registers VAE_Temporal)
    from opensora.models.vae.utils import DiagonalGaussianDistribution as TemporalPosterior
    from opensora.models.vae.vae import VideoAutoencoderPipeline, VideoAutoencoderPipelineConfig

    SpatialPosterior.sample = lambda self, generator=None: self.mean
    TemporalPosterior.sample = lambda self: self.mean
    # our "tiny" preset's spatial AutoencoderKL (opensora_vae.PRESETS["tiny"])
    AUTOENCODER_CONFIGS["tiny-sdxl-vae"] = dict(
        block_out_channels=(8, 8, 16, 16), layers_per_block=1, norm_num_groups=4, latent_channels=4,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
    )  # fmt: skip
    config = VideoAutoencoderPipelineConfig(
        vae_2d=dict(type="VideoAutoencoderKL", from_pretrained="tiny-sdxl-vae", micro_batch_size=4),
        vae_temporal=dict(
            type="VAE_Temporal",
            in_out_channels=4,
            latent_embed_dim=4,
            embed_dim=4,
            filters=8,
            num_res_blocks=1,
            channel_multipliers=(1, 2, 2, 4),
            temporal_downsample=(False, True, True),
            num_groups=4,
        ),  # fmt: skip
        micro_frame_size=17,
        shift=(-0.10, 0.34, 0.27, 0.98),
        scale=(3.85, 2.32, 2.33, 3.06),
    )
    model = VideoAutoencoderPipeline(config).eval()
    load(model, {"scale", "shift"})
    video = seeded_tensor("video", (1, 3, 20, 16, 16), scale=0.5)  # 20 frames: a 17-chunk and a 3-frame rest
    z = seeded_tensor("z", (1, 4, 6, 2, 2), scale=1.0)
    with torch.no_grad():
        encoded = model.encode(video)  # (z - shift) / scale of the posterior means
        x_z = model.spatial_vae.encode(video)
        logvar = torch.cat([model.temporal_vae.encode(x_z[:, :, i : i + 17]).logvar for i in (0, 17)], dim=2)
        decoded = model.decode(z, num_frames=20)
    print_numbers("vae_encode", encoded, Z_PICKS)
    print_numbers("vae_logvar", logvar, Z_PICKS)
    print_numbers("vae_decode", decoded, VAE_PICKS)


if __name__ == "__main__":
    stdit(sys.argv[1])
    stdit3(sys.argv[2])
    vae(sys.argv[2])
