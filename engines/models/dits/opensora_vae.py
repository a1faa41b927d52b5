"""OpenSora 1.2's video VAE (hpcaitech/Open-Sora v1.2.0, opensora/models/vae/vae.py `VideoAutoencoderPipeline`
built by `OpenSoraVAE_V1_2`, and vae_temporal.py `VAE_Temporal_SD`): a per-frame 2D VAE (the SDXL VAE as shipped in
PixArt-alpha/pixart_sigma_sdxlvae_T5_diffusers/vae: diffusers' AutoencoderKL, 8x spatial, 4 channels) followed by a
MAGVIT-v2-style temporal VAE of causal 3D convolutions (4x temporal, 4 channels, no spatial change).

Shapes: x (B, 3, T, H, W) in [-1, 1], H and W multiples of 8 -> encode -> (B, 2*4, T', H/8, W/8) = temporal
posterior mean ++ logvar (logvar clamped to [-30, 20] as the authors' DiagonalGaussianDistribution does) ->
decode(z (B, 4, T', H/8, W/8), num_frames=T) -> (B, 3, T, H, W).

Spatial posterior: the authors SAMPLE it (`latent_dist.sample() * 0.18215`, the SD-1 factor, hard-coded, not SDXL's
0.13025) and then encode that sample temporally; `encode(..., sample_spatial=False)` uses its mean instead (for
deterministic tests / caching). The spatial VAE runs `micro_batch_size` frames at a time (4), which changes memory,
not values.

Frames: the temporal VAE runs on chunks of `micro_frame_size` (17) spatial-latent frames; each chunk of n frames is
front-padded with zeros to a multiple of 4 and yields ceil(n / 4) latent frames, so a 17-frame chunk gives 5.
Any T >= 1 is accepted: T = 17k + r -> T' = 5k + ceil(r / 4) (`latent_frames(T)`); the sampling presets use 1 -> 1
(images), 51 -> 15, 102 -> 30, 204 -> 60, 408 -> 120. `decode` splits z into chunks of 5 and needs the frame count
(the front padding is cut off per chunk), and raises if num_frames does not encode to z's T'.

Latent normalisation (the pipeline's `scale`/`shift` buffers, per channel): the DiT sees (z - shift) / scale with
shift = (-0.10, 0.34, 0.27, 0.98), scale = (3.85, 2.32, 2.33, 3.06); `normalize_latents` / `denormalize_latents`
apply them, `shift_factor` / `scaling_factor` expose them. encode/decode work on raw latents, like our other VAEs.

Published layout (hpcai-tech/OpenSora-VAE-v1.2: a transformers `PreTrainedModel` folder, model.safetensors holding
the pipeline's state dict): `spatial_vae.module.<diffusers AutoencoderKL keys>` (e.g.
`spatial_vae.module.encoder.down_blocks.0.resnets.0.conv1.weight`, `...mid_block.attentions.0.to_q.weight`),
`temporal_vae.{encoder,decoder}.*` (CausalConv3d wraps `.conv`: `temporal_vae.encoder.conv_in.conv.weight`,
`temporal_vae.encoder.block_res_blocks.{i}.{j}.{norm1,conv1.conv,norm2,conv2.conv,conv3.conv}`,
`temporal_vae.encoder.conv_blocks.{1,2}.conv` (index 0 is a parameterless Identity), `temporal_vae.quant_conv.conv`,
`temporal_vae.post_quant_conv.conv`, `temporal_vae.decoder.conv_blocks.{1,2}.conv`, `temporal_vae.decoder.conv_out`)
and the persistent buffers `scale`, `shift` of shape (1, 4, 1, 1, 1). Our module names are the authors', so the
mapping is the identity; `from_published` adds the published scale/shift if a file lacks them.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn

__all__ = ["OpenSoraVAE", "PRESETS", "PUBLISHED", "from_published", "to_published"]

_SHIFT = (-0.10, 0.34, 0.27, 0.98)  # OpenSoraVAE_V1_2 in vae.py
_SCALE = (3.85, 2.32, 2.33, 3.06)


class CausalConv3d(nn.Module):
    """3D conv padded only towards the past in time (zeros), 'same' in space; `.conv` holds the weights."""

    def __init__(self, chan_in: int, chan_out: int, kernel_size: int | tuple, t_stride: int = 1, bias: bool = True):
        super().__init__()
        kt, kh, kw = kernel_size if isinstance(kernel_size, tuple) else (kernel_size,) * 3
        self.padding = (kw // 2, kw // 2, kh // 2, kh // 2, kt - t_stride, 0)  # (W, W, H, H, T_past, T_future)
        self.conv = nn.Conv3d(chan_in, chan_out, (kt, kh, kw), stride=(t_stride, 1, 1), bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, self.padding))


class ResBlock(nn.Module):
    """GroupNorm-SiLU-conv twice, bias-free convs, a 1x1x1 shortcut (`conv3`) when the width changes."""

    def __init__(self, chan_in: int, chan_out: int, num_groups: int) -> None:
        super().__init__()
        self.norm1 = nn.GroupNorm(num_groups, chan_in)
        self.conv1 = CausalConv3d(chan_in, chan_out, 3, bias=False)
        self.norm2 = nn.GroupNorm(num_groups, chan_out)
        self.conv2 = CausalConv3d(chan_out, chan_out, 3, bias=False)
        self.conv3 = CausalConv3d(chan_in, chan_out, 1, bias=False) if chan_in != chan_out else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return h + (self.conv3(x) if self.conv3 is not None else x)


class Encoder(nn.Module):
    """conv_in -> per level `block_res_blocks[i]` + `conv_blocks[i]` (stride-2 in time or Identity) -> `res_blocks`."""

    def __init__(self, chan_in: int, chan_out: int, filters: int, num_res_blocks: int, mults, t_down, groups: int):
        super().__init__()
        self.conv_in = CausalConv3d(chan_in, filters, 3, bias=False)
        self.block_res_blocks, self.conv_blocks = nn.ModuleList(), nn.ModuleList()
        prev = filters
        for i, mult in enumerate(mults):
            width = filters * mult
            level = nn.ModuleList()
            for _ in range(num_res_blocks):
                level.append(ResBlock(prev, width, groups))
                prev = width
            self.block_res_blocks.append(level)
            if i < len(mults) - 1:
                self.conv_blocks.append(CausalConv3d(prev, width, 3, t_stride=2) if t_down[i] else nn.Identity())
        self.res_blocks = nn.ModuleList(ResBlock(prev, prev, groups) for _ in range(num_res_blocks))
        self.norm1 = nn.GroupNorm(groups, prev)
        self.conv2 = CausalConv3d(prev, chan_out, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv_in(x)
        for i, level in enumerate(self.block_res_blocks):
            for block in level:
                x = block(x)
            if i < len(self.conv_blocks):
                x = self.conv_blocks[i](x)
        for block in self.res_blocks:
            x = block(x)
        return self.conv2(F.silu(self.norm1(x)))


class Decoder(nn.Module):
    """conv1 -> `res_blocks` -> levels deepest first: `block_res_blocks[i]`, then `conv_blocks[i-1]` doubling the
    channels and depth-to-space into time ((C, 2) -> C channels, T -> 2T) -> norm1 -> conv_out."""

    def __init__(self, chan_in: int, chan_out: int, filters: int, num_res_blocks: int, mults, t_down, groups: int):
        super().__init__()
        self.t_down = tuple(t_down)
        prev = filters * mults[-1]
        self.conv1 = CausalConv3d(chan_in, prev, 3)
        self.res_blocks = nn.ModuleList(ResBlock(prev, prev, groups) for _ in range(num_res_blocks))
        levels, convs = [], []
        for i in reversed(range(len(mults))):
            width = filters * mults[i]
            level = nn.ModuleList()
            for _ in range(num_res_blocks):
                level.append(ResBlock(prev, width, groups))
                prev = width
            levels.insert(0, level)
            if i > 0:
                convs.insert(0, CausalConv3d(prev, prev * 2, 3) if t_down[i - 1] else nn.Identity())
        self.block_res_blocks, self.conv_blocks = nn.ModuleList(levels), nn.ModuleList(convs)
        self.norm1 = nn.GroupNorm(groups, prev)
        self.conv_out = CausalConv3d(prev, chan_out, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv1(x)
        for block in self.res_blocks:
            x = block(x)
        for i in reversed(range(len(self.block_res_blocks))):
            for block in self.block_res_blocks[i]:
                x = block(x)
            if i > 0:
                x = self.conv_blocks[i - 1](x)
                if self.t_down[i - 1]:  # (B, C*2, T, H, W) -> (B, C, 2T, H, W), channel-major as the authors
                    b, c2, t, h, w = x.shape
                    x = x.reshape(b, c2 // 2, 2, t, h, w).permute(0, 1, 3, 2, 4, 5).reshape(b, c2 // 2, 2 * t, h, w)
        return self.conv_out(F.silu(self.norm1(x)))


class TemporalVAE(nn.Module):
    """The authors' `VAE_Temporal`: encoder -> quant_conv -> moments; post_quant_conv -> decoder."""

    def __init__(self, chan: int, embed_dim: int, filters: int, num_res_blocks: int, mults, t_down, groups: int):
        super().__init__()
        self.factor = 2 ** sum(t_down)
        self.encoder = Encoder(chan, 2 * embed_dim, filters, num_res_blocks, mults, t_down, groups)
        self.quant_conv = CausalConv3d(2 * embed_dim, 2 * embed_dim, 1)
        self.post_quant_conv = CausalConv3d(embed_dim, embed_dim, 1)
        self.decoder = Decoder(embed_dim, chan, filters, num_res_blocks, mults, t_down, groups)

    def encode(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, n, h, w) -> (B, 2E, ceil(n / f), h, w)
        pad = -x.shape[2] % self.factor
        x = F.pad(x, (0, 0, 0, 0, pad, 0))  # zeros before the first frame
        return self.quant_conv(self.encoder(x))

    def decode(self, z: torch.Tensor, num_frames: int) -> torch.Tensor:  # (B, E, t, h, w) -> (B, C, num_frames, h, w)
        x = self.decoder(self.post_quant_conv(z))
        return x[:, :, -num_frames % self.factor :]


class SpatialVAE(nn.Module):
    """The authors' `VideoAutoencoderKL` holder: `module` is diffusers' AutoencoderKL, applied frame by frame."""

    def __init__(self, **autoencoder_kl_kwargs) -> None:
        super().__init__()
        self.module = AutoencoderKL(**autoencoder_kl_kwargs)


class OpenSoraVAE(ModelMixin, ConfigMixin):
    """VideoAutoencoderPipeline of OpenSora 1.2: `spatial_vae.module` (AutoencoderKL) then `temporal_vae`.

    No repeated-block list for FSDP/AC: the temporal blocks sit in `temporal_vae.{encoder,decoder}.block_res_blocks`
    (nested ModuleLists) and `.res_blocks`.
    """

    _supports_gradient_checkpointing = False

    @register_to_config
    def __init__(
        self,
        spatial_block_out_channels: tuple[int, ...] = (128, 256, 512, 512),
        spatial_layers_per_block: int = 2,
        spatial_norm_num_groups: int = 32,
        spatial_latent_channels: int = 4,
        spatial_scaling_factor: float = 0.18215,
        latent_channels: int = 4,
        filters: int = 128,
        num_res_blocks: int = 4,
        channel_multipliers: tuple[int, ...] = (1, 2, 2, 4),
        temporal_downsample: tuple[bool, ...] = (False, True, True),
        num_groups: int = 32,
        micro_frame_size: int = 17,
        micro_batch_size: int | None = 4,
        latent_scale: tuple[float, ...] = _SCALE,
        latent_shift: tuple[float, ...] = _SHIFT,
        freeze_vae_2d: bool = False,
    ) -> None:
        super().__init__()
        if len(temporal_downsample) != len(channel_multipliers) - 1:
            raise ValueError("temporal_downsample needs one entry per level transition (len(channel_multipliers) - 1)")
        if len(latent_scale) != latent_channels or len(latent_shift) != latent_channels:
            raise ValueError(f"latent_scale and latent_shift need one value per latent channel ({latent_channels})")
        n = len(spatial_block_out_channels)
        self.spatial_vae = SpatialVAE(
            down_block_types=("DownEncoderBlock2D",) * n,
            up_block_types=("UpDecoderBlock2D",) * n,
            block_out_channels=tuple(spatial_block_out_channels),
            layers_per_block=spatial_layers_per_block,
            norm_num_groups=spatial_norm_num_groups,
            latent_channels=spatial_latent_channels,
        )
        self.temporal_vae = TemporalVAE(
            spatial_latent_channels,
            latent_channels,
            filters,
            num_res_blocks,
            tuple(channel_multipliers),
            tuple(temporal_downsample),
            num_groups,
        )
        self.register_buffer("scale", torch.tensor(latent_scale, dtype=torch.float32)[None, :, None, None, None])
        self.register_buffer("shift", torch.tensor(latent_shift, dtype=torch.float32)[None, :, None, None, None])
        if freeze_vae_2d:  # the authors' VAE training stages 1-2 keep the SDXL VAE fixed
            self.spatial_vae.requires_grad_(False)
        self.temporal_compression = 2 ** sum(temporal_downsample)
        self.spatial_compression = 2 ** (n - 1)
        self.latent_channels = latent_channels
        self.micro_z_frame_size = self.latent_frames(micro_frame_size)

    @property
    def scaling_factor(self) -> tuple[float, ...]:
        return tuple(self.config.latent_scale)

    @property
    def shift_factor(self) -> tuple[float, ...]:
        return tuple(self.config.latent_shift)

    def latent_frames(self, num_frames: int) -> int:
        """Latent frame count for num_frames input frames: 5 per full 17-frame chunk, ceil(r / 4) for the rest."""
        k, r = divmod(num_frames, self.config.micro_frame_size)
        f = self.temporal_compression
        return k * math.ceil(self.config.micro_frame_size / f) + math.ceil(r / f)

    def normalize_latents(self, z: torch.Tensor) -> torch.Tensor:
        """(z - shift) / scale per channel: what the pipeline hands the DiT."""
        return (z - self.shift.to(z.dtype)) / self.scale.to(z.dtype)

    def denormalize_latents(self, z: torch.Tensor) -> torch.Tensor:
        return z * self.scale.to(z.dtype) + self.shift.to(z.dtype)

    def _frames(self, fn, x: torch.Tensor) -> torch.Tensor:
        """Apply a 2D fn to every frame of (B, C, T, H, W), `micro_batch_size` frames at a time."""
        b, c, t, h, w = x.shape
        flat = x.permute(0, 2, 1, 3, 4).reshape(b * t, c, h, w)  # (B*T, C, H, W)
        step = self.config.micro_batch_size or flat.shape[0]
        out = torch.cat([fn(flat[i : i + step]) for i in range(0, flat.shape[0], step)])
        return out.reshape(b, t, *out.shape[1:]).permute(0, 2, 1, 3, 4)

    def encode_spatial(
        self, x: torch.Tensor, sample_spatial: bool = True, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """(B, 3, T, H, W) -> (B, 4, T, H/8, W/8) scaled spatial latent (a posterior sample, or its mean)."""
        s = self.spatial_compression
        if x.dim() != 5 or x.shape[1] != 3 or x.shape[3] % s or x.shape[4] % s:
            raise ValueError(f"OpenSoraVAE expects (B, 3, T, H, W) with H, W multiples of {s}, got {tuple(x.shape)}")

        def enc(frames: torch.Tensor) -> torch.Tensor:
            dist = self.spatial_vae.module.encode(frames).latent_dist
            return dist.sample(generator) if sample_spatial else dist.mode()

        return self._frames(enc, x) * self.config.spatial_scaling_factor

    def encode(
        self, x: torch.Tensor, sample_spatial: bool = True, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """(B, 3, T, H, W) in [-1, 1] -> (B, 8, T', H/8, W/8) = temporal posterior mean ++ clamped logvar."""
        return self._encode_temporal(self.encode_spatial(x, sample_spatial, generator))

    def _encode_temporal(self, x_z: torch.Tensor) -> torch.Tensor:
        m = self.config.micro_frame_size
        moments = torch.cat([self.temporal_vae.encode(x_z[:, :, i : i + m]) for i in range(0, x_z.shape[2], m)], 2)
        mean, logvar = moments.chunk(2, dim=1)
        return torch.cat([mean, logvar.clamp(-30.0, 20.0)], dim=1)

    def decode_temporal(self, z: torch.Tensor, num_frames: int) -> torch.Tensor:
        """(B, 4, T', h, w) raw latent -> (B, 4, num_frames, h, w) scaled spatial latent, chunk by chunk."""
        if self.latent_frames(num_frames) != z.shape[2]:
            raise ValueError(
                f"{num_frames} frames encode to {self.latent_frames(num_frames)} latent frames, not {z.shape[2]}"
            )
        m, mz, out = self.config.micro_frame_size, self.micro_z_frame_size, []
        for i in range(0, z.shape[2], mz):
            out.append(self.temporal_vae.decode(z[:, :, i : i + mz], num_frames=min(m, num_frames)))
            num_frames -= m
        return torch.cat(out, dim=2)

    def decode_spatial(self, x_z: torch.Tensor) -> torch.Tensor:
        scale = self.config.spatial_scaling_factor
        return self._frames(lambda f: self.spatial_vae.module.decode(f / scale).sample, x_z)

    def decode(self, z: torch.Tensor, num_frames: int) -> torch.Tensor:
        """(B, 4, T', H/8, W/8) raw (un-normalised) latent -> (B, 3, num_frames, H, W)."""
        return self.decode_spatial(self.decode_temporal(z, num_frames))

    def forward(
        self,
        x: torch.Tensor,
        sample_posterior: bool = True,
        sample_spatial: bool = True,
        generator: torch.Generator | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Training pass (the authors' cal_loss forward): x -> (x_rec, x_z_rec, moments, x_z), x_z being the
        spatial latent the temporal VAE reconstructs as x_z_rec."""
        x_z = self.encode_spatial(x, sample_spatial, generator)
        moments = self._encode_temporal(x_z)
        mean, logvar = moments.chunk(2, dim=1)
        z = mean
        if sample_posterior:
            z = mean + torch.exp(0.5 * logvar) * torch.randn(mean.shape, generator=generator, dtype=mean.dtype).to(mean)
        x_z_rec = self.decode_temporal(z, x.shape[2])
        return self.decode_spatial(x_z_rec), x_z_rec, moments, x_z


PRESETS: dict[str, dict] = {
    "tiny": dict(
        spatial_block_out_channels=(8, 8, 16, 16),
        spatial_layers_per_block=1,
        spatial_norm_num_groups=4,
        filters=8,
        num_res_blocks=1,
        num_groups=4,
    ),
    # OpenSoraVAE_V1_2 (vae.py): SDXL VAE config of pixart_sigma_sdxlvae_T5_diffusers/vae + VAE_Temporal_SD.
    "opensora-vae-v1.2": dict(),
}

PUBLISHED: dict[str, tuple[int, str]] = {
    # No exact count is stated: README v1.2.0 says "VAE | 384M" and docs/report_03.md "83M 2D VAE" + "300M" 3D VAE,
    # both rounded. This is the sum of the shapes the authors' code builds (vae.py OpenSoraVAE_V1_2 with the
    # pixart_sigma_sdxlvae_T5_diffusers/vae AutoencoderKL config + vae_temporal.py VAE_Temporal_SD), 2.4% above 384M.
    "opensora-vae-v1.2": (
        393_341_007,
        "sum of the config's shapes in hpcaitech/Open-Sora v1.2.0 vae.py + vae_temporal.py: 83,653,863 (SDXL "
        "AutoencoderKL) + 309,687,144 (VAE_Temporal_SD); README states the rounded '384M'",
    ),
}


def from_published(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Identity (the authors' names are ours); the published scale/shift buffers are added if absent."""
    out = dict(state_dict)
    for name, value in (("scale", _SCALE), ("shift", _SHIFT)):
        out.setdefault(name, torch.tensor(value)[None, :, None, None, None])
    return out


def to_published(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return dict(state_dict)
