"""CausalVAE of OpenSoraPlan v1.2 (the "OD-VAE", `CausalVAEModel_D4_4x8x8`): 4 latent channels, 4x temporal and
8x spatial compression of 4k+1-frame clips with causal 3D convolutions (the first frame is coded like an image).

Shapes: x (B, 3, 4k+1, H, W) in [-1, 1] -> encode -> (B, 8, k+1, H/8, W/8) = mean ++ logvar -> decode(z (B, 4,
k+1, H/8, W/8)) -> (B, 3, 4k+1, H, W). Its convolutions are causal, but the released GroupNorm pools statistics
over all frames, so latent frame 0 does depend on later frames (v1.3 moved to LayerNorm for that reason). No tiled
encode/decode (the authors' `enable_tiling` blends overlapping spatial / temporal tiles for memory; absent here).

Latent normalisation: the authors' `CausalVAEModelWrapper` (opensora/models/causalvideovae/__init__.py) hands the
DiT `z * 0.18215` and decodes `z / 0.18215`: one scale for every channel, no shift, hard-coded in the wrapper (not in
the config). Our config carries it as scale = [0.18215] * 4, shift = [0] * 4 so `normalize_latents` is shared with
WF-VAE.

Published layout (LanguageBind/Open-Sora-Plan-v1.2.0, vae/: a diffusers-style folder, or a training `.ckpt` with
"ema_state_dict" / "state_dict"[/"gen_model"]): the authors' module names are kept, so the mapping is the identity:
`encoder.conv_in.weight` (frame-wise Conv2d), `encoder.down.{i}.block.{j}.conv1.weight` (ResnetBlock2D levels 0-1)
or `.conv1.conv.weight` (ResnetBlock3D levels 2-3), `encoder.down.{i}.downsample.conv[.conv].weight`,
`encoder.mid.{block_1,attn_1,block_2}`, `quant_conv.conv.weight`, `post_quant_conv.conv.weight`,
`decoder.up.{i}.block.{j}`, `decoder.up.{i}.upsample.conv.conv.weight`, GroupNorm as `norm1.weight`.
"""

from __future__ import annotations

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from flowspeed.engines.models.dits.wfvae import (
    AttnBlock3DFix,
    CausalConv3d,
    Conv2d,
    Downsample,
    Normalize,
    ResnetBlock2D,
    ResnetBlock3D,
    Spatial2xTime2x3DDownsample,
    Spatial2xTime2x3DUpsample,
    SpatialUpsample2x,
    _VideoVAEMixin,
    nonlinearity,
    vae_training_loss,
)
from torch import nn

__all__ = ["CausalVAEModel", "PRESETS", "PUBLISHED", "from_published", "to_published", "vae_training_loss"]

_RESNETS = {"ResnetBlock2D": ResnetBlock2D, "ResnetBlock3D": ResnetBlock3D}
_DOWN = {"Downsample": Downsample, "Spatial2xTime2x3DDownsample": Spatial2xTime2x3DDownsample}
_UP = {"SpatialUpsample2x": SpatialUpsample2x, "Spatial2xTime2x3DUpsample": Spatial2xTime2x3DUpsample}


def _mid(width: int, dropout: float, norm_type: str) -> nn.Module:
    mid = nn.Module()
    mid.block_1 = ResnetBlock3D(width, width, dropout, norm_type)
    mid.attn_1 = AttnBlock3DFix(width, norm_type)
    mid.block_2 = ResnetBlock3D(width, width, dropout, norm_type)
    return mid


class Encoder(nn.Module):
    """conv_in -> `down` levels (nn.ModuleList; each: `block` resnets, optional `downsample`) -> mid -> conv_out."""

    def __init__(
        self,
        z_channels: int,
        hidden_size: int,
        hidden_size_mult: list[int],
        resnet_blocks: list[str],
        spatial_downsample: list[str],
        num_res_blocks: int,
        dropout: float,
        norm_type: str,
        conv_in: str,
    ) -> None:
        super().__init__()
        c0 = hidden_size
        self.conv_in = Conv2d(3, c0, 3, padding=1) if conv_in == "Conv2d" else CausalConv3d(3, c0, 3, padding=1)
        self.down = nn.ModuleList()
        block_in = c0
        for level, mult in enumerate(hidden_size_mult):
            down = nn.Module()
            down.block = nn.ModuleList()
            for _ in range(num_res_blocks):
                down.block.append(_RESNETS[resnet_blocks[level]](block_in, c0 * mult, dropout, norm_type))
                block_in = c0 * mult
            down.attn = nn.ModuleList()  # attn_resolutions is [] in every released config
            if spatial_downsample[level]:
                down.downsample = _DOWN[spatial_downsample[level]](block_in, block_in)
            self.down.append(down)
        self.mid = _mid(block_in, dropout, norm_type)
        self.norm_out = Normalize(block_in, norm_type)
        self.conv_out = CausalConv3d(block_in, 2 * z_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for down in self.down:
            for block in down.block:
                h = block(h)
            if hasattr(down, "downsample"):
                h = down.downsample(h)
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h)))
        return self.conv_out(nonlinearity(self.norm_out(h)))


class Decoder(nn.Module):
    """conv_in -> mid -> `up` levels run from the last index down (each: num_res_blocks + 1 resnets, optional
    `upsample`) -> conv_out. `up[i]` is level i, as the authors index it."""

    def __init__(
        self,
        z_channels: int,
        hidden_size: int,
        hidden_size_mult: list[int],
        spatial_upsample: list[str],
        num_res_blocks: int,
        dropout: float,
        norm_type: str,
    ) -> None:
        super().__init__()
        block_in = hidden_size * hidden_size_mult[-1]
        self.conv_in = CausalConv3d(z_channels, block_in, 3, padding=1)
        self.mid = _mid(block_in, dropout, norm_type)
        ups = []
        for level in reversed(range(len(hidden_size_mult))):
            up = nn.Module()
            up.block = nn.ModuleList()
            for _ in range(num_res_blocks + 1):
                up.block.append(ResnetBlock3D(block_in, hidden_size * hidden_size_mult[level], dropout, norm_type))
                block_in = hidden_size * hidden_size_mult[level]
            up.attn = nn.ModuleList()
            if spatial_upsample[level]:
                up.upsample = _UP[spatial_upsample[level]](block_in, block_in)
            ups.insert(0, up)
        self.up = nn.ModuleList(ups)
        self.norm_out = Normalize(block_in, norm_type)
        self.conv_out = CausalConv3d(block_in, 3, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(z)
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h)))
        for up in reversed(self.up):
            for block in up.block:
                h = block(h)
            if hasattr(up, "upsample"):
                h = up.upsample(h)
        return self.conv_out(nonlinearity(self.norm_out(h)))


class CausalVAEModel(_VideoVAEMixin, ModelMixin, ConfigMixin):
    """v1.2 CausalVAE; config names are the authors' (modeling_causalvae.py), module names given as strings in
    their config are fixed to the released choice except the per-level resnet / sampler lists."""

    _supports_gradient_checkpointing = False
    temporal_compression = 4
    spatial_compression = 8

    @register_to_config
    def __init__(
        self,
        hidden_size: int = 128,
        z_channels: int = 4,
        hidden_size_mult: tuple[int, ...] = (1, 2, 4, 4),
        embed_dim: int = 4,
        num_res_blocks: int = 2,
        dropout: float = 0.0,
        norm_type: str = "groupnorm",
        encoder_conv_in: str = "Conv2d",
        encoder_resnet_blocks: tuple[str, ...] = ("ResnetBlock2D", "ResnetBlock2D", "ResnetBlock3D", "ResnetBlock3D"),
        encoder_spatial_downsample: tuple[str, ...] = (
            "Downsample",
            "Spatial2xTime2x3DDownsample",
            "Spatial2xTime2x3DDownsample",
            "",
        ),
        decoder_spatial_upsample: tuple[str, ...] = (
            "",
            "SpatialUpsample2x",
            "Spatial2xTime2x3DUpsample",
            "Spatial2xTime2x3DUpsample",
        ),
        use_quant_layer: bool = True,
        scale: list[float] | None = None,
        shift: list[float] | None = None,
    ) -> None:
        super().__init__()
        levels = len(hidden_size_mult)
        if not (
            len(encoder_resnet_blocks) == len(encoder_spatial_downsample) == len(decoder_spatial_upsample) == levels
        ):
            raise ValueError("encoder_resnet_blocks / *_spatial_*sample need one entry per hidden_size_mult level")
        if scale is None or shift is None:  # the wrapper's hard-coded 0.18215, no shift
            self.register_to_config(scale=scale or [0.18215] * embed_dim, shift=shift or [0.0] * embed_dim)
        self.latent_channels = embed_dim
        self.use_quant_layer = use_quant_layer
        self.encoder = Encoder(
            z_channels,
            hidden_size,
            list(hidden_size_mult),
            list(encoder_resnet_blocks),
            list(encoder_spatial_downsample),
            num_res_blocks,
            dropout,
            norm_type,
            encoder_conv_in,
        )
        self.decoder = Decoder(
            z_channels,
            hidden_size,
            list(hidden_size_mult),
            list(decoder_spatial_upsample),
            num_res_blocks,
            dropout,
            norm_type,
        )
        if use_quant_layer:
            self.quant_conv = CausalConv3d(2 * z_channels, 2 * embed_dim, 1)
            self.post_quant_conv = CausalConv3d(embed_dim, z_channels, 1)

    def _encode_aux(self, x: torch.Tensor):
        h = self.encoder(x)
        return (self.quant_conv(h) if self.use_quant_layer else h), ()

    def _decode_aux(self, z: torch.Tensor):
        return self.decoder(self.post_quant_conv(z) if self.use_quant_layer else z), ()


PRESETS: dict[str, dict] = {
    "tiny": dict(hidden_size=32, hidden_size_mult=(1, 1, 2, 2), num_res_blocks=1),
    # CausalVAEModel_D4_4x8x8 (v1.2.0 vae/config.json as quoted in the authors' docs): the class defaults above.
    "causalvae-v1.2-488": dict(),
}

PUBLISHED: dict[str, tuple[int, str]] = {
    "causalvae-v1.2-488": (238_000_000, "docs/Report-v1.3.0.md table 'OD-VAE (Our VAE in v1.2.0)': 94M + 144M"),
}


def from_published(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Identity (the authors' names are ours); a "gen_model" nesting is unwrapped."""
    if "gen_model" in state_dict and isinstance(state_dict["gen_model"], dict):
        state_dict = state_dict["gen_model"]
    return dict(state_dict)


def to_published(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return dict(state_dict)
