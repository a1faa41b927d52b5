"""A stand-in CogVideoX transformer for loss references: a fixed "model output" that still reads every input.

A real transformer would make the reference depend on weights nobody can pin down cheaply; a constant would not
notice a wrong input. This probe returns seeded numbers plus small terms of the noisy latents and the condition
channels (mixed per channel), the timestep, the text, the ofs value and the rotary tables, so a loss computed with
the authors' trainer and one computed with ours agree only when both feed the transformer the same things. Both
`docs/fidelity/ref_cogvideox_loss.py` (the authors' code) and `tests/engines/models/test_cogvideox_fidelity.py` (ours)
build it from the same lines.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import torch
from torch import nn

from tests.fidelity import seeded_tensor

# The released transformer configs' values the trainers read (diffusers convert_cogvideox_to_diffusers.py):
# 1.0: patch 2, no temporal patch, 60x90 sample grid; 1.5: temporal patch 2, 300x300 grid; 64-wide heads.
LAYOUTS: dict[str, dict[str, Any]] = {
    "cogvideox-2b": dict(rotary=False, patch_size_t=None, ofs=None, in_channels=16, grid=(60, 90)),
    "cogvideox-5b": dict(rotary=True, patch_size_t=None, ofs=None, in_channels=16, grid=(60, 90)),
    "cogvideox-5b-i2v": dict(rotary=True, patch_size_t=None, ofs=None, in_channels=32, grid=(60, 90)),
    "cogvideox1.5-5b": dict(rotary=True, patch_size_t=2, ofs=None, in_channels=16, grid=(300, 300)),
    "cogvideox1.5-5b-i2v": dict(rotary=True, patch_size_t=2, ofs=512, in_channels=32, grid=(300, 300)),
}


class ProbeTransformer(nn.Module):
    """Called like CogVideoXTransformer3DModel; `config` carries the fields both trainers read."""

    def __init__(self, variant: str) -> None:
        super().__init__()
        lay = LAYOUTS[variant]
        self.config = SimpleNamespace(
            in_channels=lay["in_channels"],
            out_channels=16,
            patch_size=2,
            patch_size_t=lay["patch_size_t"],
            attention_head_dim=64,
            sample_height=lay["grid"][0],
            sample_width=lay["grid"][1],
            sample_frames=81 if lay["patch_size_t"] else 49,
            temporal_compression_ratio=4,
            max_text_seq_length=226,
            use_rotary_positional_embeddings=lay["rotary"],
            ofs_embed_dim=lay["ofs"],
        )

    def forward(
        self,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        timestep: torch.Tensor,
        ofs: torch.Tensor | None = None,
        image_rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
        return_dict: bool = False,
    ) -> tuple[torch.Tensor]:
        b, f, c, h, w = hidden_states.shape
        out = seeded_tensor("model_output", (b, f, 16, h, w), seed=17, scale=0.3)
        mix = seeded_tensor("mix", (16, c), seed=17, scale=0.25)
        out = out + torch.tanh(torch.einsum("oc,bfchw->bfohw", mix, hidden_states.float()))
        out = out + 1e-3 * timestep.float().view(b, 1, 1, 1, 1)
        out = out + 0.1 * encoder_hidden_states.float().mean(dim=(1, 2)).view(b, 1, 1, 1, 1)
        if ofs is not None:
            out = out + 0.01 * ofs.float().sum()
        if image_rotary_emb is not None:
            cos, sin = image_rotary_emb  # (tokens, head_dim) each
            out = out + 0.1 * (cos.float().mean() + sin.float().std() + cos.shape[0] / 1e5)
        return (out,)


def fixed_inputs(frames: int, height: int, width: int, batch: int, i2v: bool) -> dict[str, torch.Tensor]:
    """The fixed latents, text and image latent of one case, as THUDM's batch holds them: (B, C, T', H', W')
    VAE latents (already scaled), (B, 226, D) text states, (B, C, 1, H', W') image latent for I2V. The latents'
    std of 2 (not the noise's 1) makes the v target, and so the loss, depend on the noise schedule."""
    t_lat, h_lat, w_lat = (frames - 1) // 4 + 1, height // 8, width // 8
    tag = f"{frames}x{height}x{width}x{batch}"
    out = {
        "latents": seeded_tensor(f"latents/{tag}", (batch, 16, t_lat, h_lat, w_lat), seed=17, scale=2.0),
        "text": seeded_tensor(f"text/{tag}", (batch, 226, 32), seed=17, scale=0.2),
    }
    if i2v:
        out["image"] = seeded_tensor(f"image/{tag}", (batch, 16, 1, h_lat, w_lat), seed=17, scale=1.0)
    return out


def fixed_noise(shape: tuple[int, ...]) -> torch.Tensor:
    """The noise of a case, (B, F, C, H', W') after any temporal padding."""
    return seeded_tensor(f"noise/{'x'.join(map(str, shape))}", shape, seed=17, scale=1.0)


# (variant, frames, height, width, batch, timesteps): each variant's recommended shape (cli_demo RESOLUTION_MAP:
# 480x720 for 1.0, 768x1360 for 1.5; 49 / 81 / 161 frames), then other shapes its trainer takes (5B: 480x720 only).
CASES = [
    ("cogvideox-2b", 49, 480, 720, 2, [999, 37]),
    ("cogvideox-2b", 25, 320, 512, 2, [500, 0]),
    ("cogvideox-5b", 49, 480, 720, 2, [999, 37]),
    ("cogvideox-5b", 25, 480, 720, 2, [250, 700]),
    ("cogvideox-5b-i2v", 49, 480, 720, 2, [999, 37]),
    ("cogvideox-5b-i2v", 33, 480, 720, 2, [1, 640]),
    ("cogvideox1.5-5b", 81, 768, 1360, 2, [999, 37]),
    ("cogvideox1.5-5b", 161, 768, 1360, 1, [420]),
    ("cogvideox1.5-5b", 29, 480, 720, 2, [3, 888]),  # 8 latent frames: no padding
    ("cogvideox1.5-5b-i2v", 81, 768, 1360, 2, [999, 37]),
    ("cogvideox1.5-5b-i2v", 81, 768, 1024, 2, [123, 456]),
    ("cogvideox1.5-5b-i2v", 161, 768, 1360, 1, [789]),
]


def case_id(variant: str, frames: int, height: int, width: int, batch: int) -> str:
    return f"{variant}:{frames}x{height}x{width}:b{batch}"
