"""WF-VAE (OpenSoraPlan v1.3's video VAE, arXiv 2411.17459): 8 latent channels, 8x spatial / 4x temporal
compression of 4k+1-frame clips, causal 3D convolutions, and Haar-wavelet "energy flow" pathways that carry the
low-frequency (LLL) sub-band of the clip straight into the latent and back out of it.

Shapes: x (B, 3, 4k+1, H, W) in [-1, 1] -> encode -> (B, 2*8, k+1, H/8, W/8) = mean ++ logvar -> decode(z
(B, 8, k+1, H/8, W/8)) -> (B, 3, 4k+1, H, W). Encode runs the whole clip at once (the authors' causal-cache
chunked inference, `enable_tiling`, is not implemented here; with LayerNorm it is lossless, so outputs are equal).

Latent normalisation: the authors' `WFVAEModelWrapper` (opensora/models/causalvideovae/__init__.py) feeds the DiT
`(z - shift) * scale` and decodes `z / scale + shift`, per channel, with `scale`/`shift` read from the VAE's
config.json. The class defaults there are scale 0.18215 and shift 0 for every channel; the hub folder's config.json
(LanguageBind/Open-Sora-Plan-v1.3.0/vae) carries the values actually used, and `from_pretrained` of a folder with
that config overrides ours. `normalize_latents` / `denormalize_latents` apply them.

Published layout: the hub `vae/` folder is a diffusers-style folder (config.json + one weights file) or a training
`.ckpt` with the weights under "ema_state_dict" / "state_dict" (`checkpoint.read_state_dict` unnests those; a
"state_dict" holding "gen_model" must be passed as that inner dict). Module and parameter names here are the
authors' (modeling_wfvae.py + modules/*.py at v1.3.1), so `from_published` / `to_published` only touch the Haar
modules: e.g.
`encoder.down1.0.weight` (frame-wise Conv2d), `encoder.down2.1.conv1.conv.weight` (CausalConv3d wraps `.conv`),
`decoder.mid.0.norm1.norm.weight` (LayerNorm wraps `.norm`), plus the fixed Haar filters the authors keep in the
state dict under their spelling (`encoder.wavelet_tranform_l2.h_conv.conv.weight` parameters,
`encoder.wavelet_tranform_l1.aa` buffers; their input/output transforms are built in encode/decode and not saved,
ours are submodules, so `to_published` drops and `from_published` fills them, as it fills any Haar constant an EMA
checkpoint, which holds trainable parameters only, lacks).

The building blocks (causal conv, resnet blocks, attention, up/down samplers, Haar transforms) are shared with the
v1.2 CausalVAE (causalvae.py) and by `vae_training_loss`, the authors' generator objective.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn


def nonlinearity(x: torch.Tensor) -> torch.Tensor:
    return F.silu(x)


def _frames(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """Apply a 2D op to each frame of (B, C, T, H, W); 4D input passes straight through."""
    if x.dim() == 4:
        return fn(x)
    b, _, t = x.shape[:3]
    y = fn(x.transpose(1, 2).flatten(0, 1))  # (B*T, C, H, W)
    return y.unflatten(0, (b, t)).transpose(1, 2)


class Conv2d(nn.Conv2d):
    """Frame-wise 2D convolution (keys `weight`, `bias` like the authors' Conv2d)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _frames(super().forward, x)


class CausalConv3d(nn.Module):
    """3D convolution padded in time only on the left, by repeating the first frame (k_t - 1) times, so frame t
    never sees frames after it and the first frame is encoded like an image. Key `conv`."""

    def __init__(self, chan_in: int, chan_out: int, kernel_size, stride=1, padding=0, bias: bool = True) -> None:
        super().__init__()
        k = tuple(kernel_size) if isinstance(kernel_size, (tuple, list)) else (kernel_size,) * 3
        p = list(padding) if isinstance(padding, (tuple, list)) else [padding] * 3
        p[0] = 0
        self.time_kernel_size = k[0]
        self.conv = nn.Conv3d(chan_in, chan_out, k, stride=stride, padding=tuple(p), bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pad = x[:, :, :1].expand(-1, -1, self.time_kernel_size - 1, -1, -1)
        return self.conv(torch.cat([pad, x], dim=2))


class LayerNorm(nn.Module):
    """Channel LayerNorm on (B, C, ...) (key `norm`); per position, so temporal chunking stays lossless."""

    def __init__(self, num_channels: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(num_channels, eps=eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x.movedim(1, -1)).movedim(-1, 1)


def Normalize(channels: int, norm_type: str = "groupnorm") -> nn.Module:  # noqa: N802 (the authors' name)
    if norm_type == "groupnorm":
        return nn.GroupNorm(32, channels, eps=1e-6, affine=True)
    if norm_type == "layernorm":
        return LayerNorm(channels)
    raise ValueError(f"norm_type must be 'groupnorm' or 'layernorm', got {norm_type!r}")


class ResnetBlock2D(nn.Module):
    """norm-SiLU-conv x2 with a 1x1 shortcut when widths differ; frame-wise."""

    def __init__(self, in_channels: int, out_channels: int, dropout: float = 0.0, norm_type: str = "groupnorm"):
        super().__init__()
        self.in_channels, self.out_channels = in_channels, out_channels
        self.norm1 = Normalize(in_channels, norm_type)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = Normalize(out_channels, norm_type)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        if in_channels != out_channels:
            self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1)

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(nonlinearity(self.norm1(x)))
        h = self.conv2(self.dropout(nonlinearity(self.norm2(h))))
        return (self.nin_shortcut(x) if self.in_channels != self.out_channels else x) + h

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _frames(self._forward, x)


class ResnetBlock3D(nn.Module):
    """ResnetBlock2D with causal 3x3x3 convolutions."""

    def __init__(self, in_channels: int, out_channels: int, dropout: float = 0.0, norm_type: str = "groupnorm"):
        super().__init__()
        self.in_channels, self.out_channels = in_channels, out_channels
        self.norm1 = Normalize(in_channels, norm_type)
        self.conv1 = CausalConv3d(in_channels, out_channels, 3, padding=1)
        self.norm2 = Normalize(out_channels, norm_type)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = CausalConv3d(out_channels, out_channels, 3, padding=1)
        if in_channels != out_channels:
            self.nin_shortcut = CausalConv3d(in_channels, out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(nonlinearity(self.norm1(x)))
        h = self.conv2(self.dropout(nonlinearity(self.norm2(h))))
        return (self.nin_shortcut(x) if self.in_channels != self.out_channels else x) + h


class AttnBlock3DFix(nn.Module):
    """Single-head spatial self-attention within each frame (1x1 causal convs for q, k, v, proj_out). A VAE's
    attention is never context-parallel, so it calls SDPA directly."""

    def __init__(self, in_channels: int, norm_type: str = "groupnorm") -> None:
        super().__init__()
        self.norm = Normalize(in_channels, norm_type)
        self.q, self.k, self.v, self.proj_out = (CausalConv3d(in_channels, in_channels, 1) for _ in range(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm(x)
        b, c, t, hh, ww = x.shape

        def tokens(y: torch.Tensor) -> torch.Tensor:
            return y.permute(0, 2, 3, 4, 1).reshape(b * t, 1, hh * ww, c)  # (B*T, 1, S, C)

        out = F.scaled_dot_product_attention(tokens(self.q(h)), tokens(self.k(h)), tokens(self.v(h)))
        out = out.reshape(b, t, hh, ww, c).permute(0, 4, 1, 2, 3)
        return x + self.proj_out(out)


class Downsample(nn.Module):
    """Frame-wise stride-2 3x3 conv with the (right, bottom) zero pad of the LDM VAE."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _frames(lambda y: self.conv(F.pad(y, (0, 1, 0, 1))), x)


class Upsample(nn.Module):
    """Frame-wise nearest 2x upsampling + 3x3 conv."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _frames(lambda y: self.conv(F.interpolate(y, scale_factor=2.0, mode="nearest")), x)


class Spatial2xTime2x3DDownsample(nn.Module):
    """Causal stride-2 3x3x3 conv: T = 2k+1 -> k+1, H -> H/2."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.conv = CausalConv3d(in_channels, out_channels, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1, 0, 0)))


class SpatialUpsample2x(nn.Module):
    """Nearest 2x spatial upsampling + causal 1x3x3 conv (v1.2 CausalVAE)."""

    def __init__(self, chan_in: int, chan_out: int) -> None:
        super().__init__()
        self.conv = CausalConv3d(chan_in, chan_out, (1, 3, 3), padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(_frames(lambda y: F.interpolate(y, scale_factor=2.0, mode="nearest"), x))


class Spatial2xTime2x3DUpsample(nn.Module):
    """T = k+1 -> 2k+1 (the first frame stays single, the rest double), H -> 2H, then a causal 3x3x3 conv."""

    def __init__(self, in_channels: int, out_channels: int, t_interpolation: str = "trilinear") -> None:
        super().__init__()
        self.t_interpolation = t_interpolation
        self.conv = CausalConv3d(in_channels, out_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        first = F.interpolate(x[:, :, :1], scale_factor=(1, 2, 2), mode="trilinear")
        if x.shape[2] > 1:
            rest = F.interpolate(x[:, :, 1:], scale_factor=(2, 1, 1), mode=self.t_interpolation)
            rest = F.interpolate(rest, scale_factor=(1, 2, 2), mode="trilinear")
            first = torch.cat([first, rest], dim=2)
        return self.conv(first)


# ---- Haar wavelets ------------------------------------------------------------------------------------------------
# Sub-band order of the authors: for each filter the (t, h, w) sign pattern; low = (+,+), high = (+,-).
_HAAR3D = {
    "h": (1, 1, 1),
    "g": (1, 1, -1),
    "hh": (1, -1, 1),
    "gh": (1, -1, -1),
    "h_v": (-1, 1, 1),
    "g_v": (-1, 1, -1),
    "hh_v": (-1, -1, 1),
    "gh_v": (-1, -1, -1),
}
_HAAR2D = {"aa": (1, 1), "ad": (-1, 1), "da": (1, -1), "dd": (-1, -1)}


def _haar_filter(signs: tuple[int, ...], norm: float) -> torch.Tensor:
    """Separable 2-tap Haar filter: along each axis (1, 1) for low or (1, -1) for high, times `norm`."""
    out = torch.ones(())
    for s in signs:
        out = out[..., None] * torch.tensor([1.0, float(s)])
    return (out * norm)[None, None]  # (1, 1, 2, 2[, 2])


class HaarWaveletTransform3D(nn.Module):
    """(B, C, 2k+1, H, W) -> (B, 8C, k+1, H/2, W/2), band-major channels (LLL of every channel first). The
    authors keep the filters as frozen CausalConv3d parameters (`h_conv.conv.weight`, ...), scale 0.3536."""

    def __init__(self) -> None:
        super().__init__()
        for name, signs in _HAAR3D.items():
            conv = CausalConv3d(1, 1, 2, stride=2, bias=False)
            conv.conv.weight.data.copy_(_haar_filter(signs, 0.3536))
            conv.requires_grad_(False)
            self.add_module(f"{name}_conv", conv)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c = x.shape[:2]
        weight = torch.cat([getattr(self, f"{n}_conv").conv.weight for n in _HAAR3D])  # (8, 1, 2, 2, 2)
        y = x.flatten(0, 1)[:, None]  # (B*C, 1, T, H, W)
        y = F.conv3d(torch.cat([y[:, :, :1], y], dim=2), weight.to(y.dtype), stride=2)  # (B*C, 8, T', h, w)
        return y.unflatten(0, (b, c)).transpose(1, 2).flatten(1, 2)  # (B, 8C, T', h, w)


class InverseHaarWaveletTransform3D(nn.Module):
    """(B, 8C, k+1, h, w) -> (B, C, 2k+1, 2h, 2w): transposed filters, dropping the causal pad frame."""

    def __init__(self) -> None:
        super().__init__()
        for name, signs in _HAAR3D.items():
            self.register_buffer(name, _haar_filter(signs, 0.3536))

    def forward(self, coeffs: torch.Tensor) -> torch.Tensor:
        b, c8 = coeffs.shape[:2]
        weight = torch.cat([getattr(self, n) for n in _HAAR3D])  # (8, 1, 2, 2, 2)
        y = coeffs.unflatten(1, (8, c8 // 8)).transpose(1, 2).flatten(0, 1)  # (B*C, 8, T', h, w)
        y = F.conv_transpose3d(y, weight.to(y.dtype), stride=2)[:, :, 1:]  # (B*C, 1, 2T'-1, 2h, 2w)
        return y[:, 0].unflatten(0, (b, c8 // 8))


class HaarWaveletTransform2D(nn.Module):
    """Frame-wise 2D Haar: (B, C, T, H, W) -> (B, 4C, T, H/2, W/2), band-major, scale 1/2 (buffers aa..dd)."""

    def __init__(self) -> None:
        super().__init__()
        for name, signs in _HAAR2D.items():
            self.register_buffer(name, _haar_filter(signs, 0.5))

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c = x.shape[:2]
        weight = torch.cat([getattr(self, k) for k in _HAAR2D])  # (4, 1, 2, 2)
        y = F.conv2d(x.flatten(0, 1)[:, None], weight.to(x.dtype), stride=2)  # (N*C, 4, h, w)
        return y.unflatten(0, (n, c)).transpose(1, 2).flatten(1, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _frames(self._forward, x)


class InverseHaarWaveletTransform2D(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        for name, signs in _HAAR2D.items():
            self.register_buffer(name, _haar_filter(signs, 0.5))

    def _forward(self, coeffs: torch.Tensor) -> torch.Tensor:
        n, c4 = coeffs.shape[:2]
        weight = torch.cat([getattr(self, k) for k in _HAAR2D])  # (4, 1, 2, 2)
        y = coeffs.unflatten(1, (4, c4 // 4)).transpose(1, 2).flatten(0, 1)  # (N*C, 4, h, w)
        return F.conv_transpose2d(y, weight.to(y.dtype), stride=2)[:, 0].unflatten(0, (n, c4 // 4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _frames(self._forward, x)


# ---- WF-VAE -------------------------------------------------------------------------------------------------------
class Encoder(nn.Module):
    """Main path on the 3D-Haar coefficients (24 ch at H/2), with the LLL band's 2D-Haar (l1) and 3D-Haar (l2)
    coefficients injected at H/4 and H/8 through `connect_l1` / `connect_l2` (the energy-flow pathways)."""

    def __init__(
        self,
        latent_dim: int,
        base_channels: int,
        num_resblocks: int,
        energy_flow_hidden_size: int,
        dropout: float,
        use_attention: bool,
        norm_type: str,
    ) -> None:
        super().__init__()
        c, ef = base_channels, energy_flow_hidden_size
        self.down1 = nn.Sequential(
            Conv2d(24, c, 3, padding=1),
            *[ResnetBlock2D(c, c, dropout, norm_type) for _ in range(num_resblocks)],
            Downsample(c, c),
        )
        self.down2 = nn.Sequential(
            Conv2d(c + ef, 2 * c, 3, padding=1),
            *[ResnetBlock3D(2 * c, 2 * c, dropout, norm_type) for _ in range(num_resblocks)],
            Spatial2xTime2x3DDownsample(2 * c, 2 * c),
        )
        self.connect_l1 = Conv2d(12, ef, 3, padding=1)
        self.connect_l2 = Conv2d(24, ef, 3, padding=1)
        mid = [ResnetBlock3D(2 * c + ef, 4 * c, dropout, norm_type), ResnetBlock3D(4 * c, 4 * c, dropout, norm_type)]
        if use_attention:
            mid.insert(1, AttnBlock3DFix(4 * c, norm_type))
        self.mid = nn.Sequential(*mid)
        self.norm_out = Normalize(4 * c, norm_type)
        self.conv_out = CausalConv3d(4 * c, 2 * latent_dim, 3, padding=1)
        self.wavelet_transform_in = HaarWaveletTransform3D()
        self.wavelet_transform_l1 = HaarWaveletTransform2D()
        self.wavelet_transform_l2 = HaarWaveletTransform3D()

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        coeffs = self.wavelet_transform_in(x)  # (B, 24, 2k+1, H/2, W/2)
        l1_coeffs = self.wavelet_transform_l1(coeffs[:, :3])  # (B, 12, 2k+1, H/4, W/4)
        l2_coeffs = self.wavelet_transform_l2(l1_coeffs[:, :3])  # (B, 24, k+1, H/8, W/8)
        h = torch.cat([self.down1(coeffs), self.connect_l1(l1_coeffs)], dim=1)
        h = torch.cat([self.down2(h), self.connect_l2(l2_coeffs)], dim=1)
        h = self.conv_out(nonlinearity(self.norm_out(self.mid(h))))  # (B, 2*latent, k+1, H/8, W/8)
        return h, (l1_coeffs, l2_coeffs)


class Decoder(nn.Module):
    """Mirror of the encoder: the last `energy_flow_hidden_size` channels after `mid` and after `up2` predict the
    l2 / l1 wavelet coefficients, which are inverted and added onto the LLL band one level up."""

    def __init__(
        self,
        latent_dim: int,
        base_channels: int,
        num_resblocks: int,
        energy_flow_hidden_size: int,
        dropout: float,
        use_attention: bool,
        norm_type: str,
        t_interpolation: str,
        connect_res_layer_num: int,
    ) -> None:
        super().__init__()
        c, ef = base_channels, energy_flow_hidden_size
        self.energy_flow_hidden_size = ef
        self.conv_in = CausalConv3d(latent_dim, 4 * c, 3, padding=1)
        mid = [ResnetBlock3D(4 * c, 4 * c, dropout, norm_type), ResnetBlock3D(4 * c, 4 * c + ef, dropout, norm_type)]
        if use_attention:
            mid.insert(1, AttnBlock3DFix(4 * c, norm_type))
        self.mid = nn.Sequential(*mid)
        self.up2 = nn.Sequential(
            *[ResnetBlock3D(4 * c, 4 * c, dropout, norm_type) for _ in range(num_resblocks)],
            Spatial2xTime2x3DUpsample(4 * c, 4 * c, t_interpolation),
            ResnetBlock3D(4 * c, 4 * c + ef, dropout, norm_type),
        )
        self.up1 = nn.Sequential(
            *[ResnetBlock3D(4 * c if i == 0 else 2 * c, 2 * c, dropout, norm_type) for i in range(num_resblocks)],
            Upsample(2 * c, 2 * c),
            ResnetBlock3D(2 * c, 2 * c, dropout, norm_type),
        )
        self.layer = nn.Sequential(*[ResnetBlock3D(2 * c if i == 0 else c, c, dropout, norm_type) for i in range(2)])

        def connect(out_channels: int) -> nn.Sequential:
            blocks = [ResnetBlock3D(ef, ef, dropout, norm_type) for _ in range(connect_res_layer_num)]
            return nn.Sequential(*blocks, Conv2d(ef, out_channels, 3, padding=1))

        self.connect_l1, self.connect_l2 = connect(12), connect(24)
        self.norm_out = Normalize(c, norm_type)
        self.conv_out = Conv2d(c, 24, 3, padding=1)
        self.inverse_wavelet_transform_out = InverseHaarWaveletTransform3D()
        self.inverse_wavelet_transform_l1 = InverseHaarWaveletTransform2D()
        self.inverse_wavelet_transform_l2 = InverseHaarWaveletTransform3D()

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        ef = self.energy_flow_hidden_size
        h = self.mid(self.conv_in(z))  # (B, 4c + ef, k+1, H/8, W/8)
        l2_coeffs = self.connect_l2(h[:, -ef:])  # (B, 24, k+1, H/8, W/8)
        l2 = self.inverse_wavelet_transform_l2(l2_coeffs)  # (B, 3, 2k+1, H/4, W/4)
        h = self.up2(h[:, :-ef])  # (B, 4c + ef, 2k+1, H/4, W/4)
        l1_coeffs = self.connect_l1(h[:, -ef:])  # (B, 12, 2k+1, H/4, W/4)
        l1_coeffs = torch.cat([l1_coeffs[:, :3] + l2, l1_coeffs[:, 3:]], dim=1)
        l1 = self.inverse_wavelet_transform_l1(l1_coeffs)  # (B, 3, 2k+1, H/2, W/2)
        h = self.layer(self.up1(h[:, :-ef]))
        h = self.conv_out(nonlinearity(self.norm_out(h)))  # (B, 24, 2k+1, H/2, W/2)
        h = torch.cat([h[:, :3] + l1, h[:, 3:]], dim=1)
        return self.inverse_wavelet_transform_out(h), (l1_coeffs, l2_coeffs)  # (B, 3, 4k+1, H, W)


class _VideoVAEMixin:
    """What both OpenSoraPlan VAEs share: the posterior split, the latent normalisation, the shape checks."""

    temporal_compression: int
    spatial_compression: int
    latent_channels: int

    def _check_input(self, x: torch.Tensor) -> None:
        s, t = self.spatial_compression, self.temporal_compression
        if x.dim() != 5 or x.shape[1] != 3 or (x.shape[2] - 1) % t or x.shape[3] % s or x.shape[4] % s:
            raise ValueError(
                f"{type(self).__name__} expects (B, 3, {t}k+1, H, W) with H, W multiples of {s}, got {tuple(x.shape)}"
            )

    def normalize_latents(self, z: torch.Tensor) -> torch.Tensor:
        """(z - shift) * scale per channel: what the authors' wrapper hands the DiT."""
        scale, shift = (
            torch.tensor(v, device=z.device, dtype=z.dtype)[None, :, None, None, None]
            for v in (self.config.scale, self.config.shift)
        )
        return (z - shift) * scale

    def denormalize_latents(self, z: torch.Tensor) -> torch.Tensor:
        scale, shift = (
            torch.tensor(v, device=z.device, dtype=z.dtype)[None, :, None, None, None]
            for v in (self.config.scale, self.config.shift)
        )
        return z / scale + shift

    def reconstruct(self, x: torch.Tensor, sample_posterior: bool = True, generator: torch.Generator | None = None):
        """x -> (reconstruction, moments (B, 2C, ...), [(encoder, decoder) wavelet coefficient pairs])."""
        self._check_input(x)
        moments, enc_aux = self._encode_aux(x)
        mean, logvar = moments.chunk(2, dim=1)
        z = mean
        if sample_posterior:
            noise = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
            z = mean + torch.exp(0.5 * logvar.clamp(-30.0, 20.0)) * noise
        rec, dec_aux = self._decode_aux(z)
        return rec, moments, list(zip(enc_aux, dec_aux, strict=False))  # CausalVAE has none

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, T, H, W) in [-1, 1] -> (B, 2*C, T', H', W') = posterior mean ++ logvar (logvar unclamped)."""
        self._check_input(x)
        return self._encode_aux(x)[0]

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """(B, C, T', H', W') raw (un-normalised) latent -> (B, 3, T, H, W)."""
        return self._decode_aux(z)[0]


class WFVAEModel(_VideoVAEMixin, ModelMixin, ConfigMixin):
    """WF-VAE; config names are the authors' (modeling_wfvae.py). `encoder` / `decoder` hold the blocks in
    nn.Sequentials (`encoder.down1/down2/mid`, `decoder.mid/up2/up1/layer`)."""

    _supports_gradient_checkpointing = False
    temporal_compression = 4
    spatial_compression = 8

    @register_to_config
    def __init__(
        self,
        latent_dim: int = 8,
        base_channels: int = 128,
        encoder_num_resblocks: int = 2,
        encoder_energy_flow_hidden_size: int = 64,
        decoder_num_resblocks: int = 2,
        decoder_energy_flow_hidden_size: int = 128,
        use_attention: bool = True,
        dropout: float = 0.0,
        norm_type: str = "layernorm",
        t_interpolation: str = "trilinear",
        connect_res_layer_num: int = 2,
        scale: list[float] | None = None,
        shift: list[float] | None = None,
    ) -> None:
        super().__init__()
        for name, value in (("scale", scale), ("shift", shift)):
            if value is not None and len(value) != latent_dim:
                raise ValueError(f"{name} needs one value per latent channel ({latent_dim}), got {len(value)}")
        if scale is None or shift is None:  # the authors' class defaults
            self.register_to_config(scale=scale or [0.18215] * latent_dim, shift=shift or [0.0] * latent_dim)
        self.latent_channels = latent_dim
        self.encoder = Encoder(
            latent_dim,
            base_channels,
            encoder_num_resblocks,
            encoder_energy_flow_hidden_size,
            dropout,
            use_attention,
            norm_type,
        )
        self.decoder = Decoder(
            latent_dim,
            base_channels,
            decoder_num_resblocks,
            decoder_energy_flow_hidden_size,
            dropout,
            use_attention,
            norm_type,
            t_interpolation,
            connect_res_layer_num,
        )

    def _encode_aux(self, x: torch.Tensor):
        return self.encoder(x)

    def _decode_aux(self, z: torch.Tensor):
        return self.decoder(z)


# ---- training objective -------------------------------------------------------------------------------------------
def vae_training_loss(
    model: _VideoVAEMixin,
    x: torch.Tensor,
    *,
    kl_weight: float = 1e-6,
    wavelet_weight: float = 0.1,
    perceptual_weight: float = 0.0,
    perceptual_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    sample_posterior: bool = True,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """The generator half of the authors' LPIPSWithDiscriminator3D (losses/perceptual_loss.py), logvar fixed at 0:

        loss = sum|x - x_rec| / (B*T) [+ perceptual_weight * sum LPIPS / (B*T)]
             + kl_weight * KL(q(z|x) || N(0, I)) summed / B
             + wavelet_weight * sum_l sum|enc_coeffs_l - dec_coeffs_l| / B      (WF-VAE only: l1, l2 pathways)

    Defaults are scripts/causalvae/train.sh's (wavelet_weight 0.1) and the v1.2 config's kl_weight 1e-6.
    `perceptual_fn((B*T, 3, H, W), same) -> (B*T,)` is LPIPS when the caller has local weights (none are shipped;
    with perceptual_weight > 0 and no fn this raises). The GAN term (NLayerDiscriminator3D, hinge loss, adaptive
    weight from `decoder.conv_out`) is not implemented: TODO, it only starts after `disc_start` steps anyway.
    """
    if perceptual_weight > 0 and perceptual_fn is None:
        raise ValueError("perceptual_weight > 0 needs perceptual_fn (an LPIPS built from local weights)")
    b, t = x.shape[0], x.shape[2]
    rec, moments, wavelet_pairs = model.reconstruct(x, sample_posterior, generator)
    rec_loss = (x - rec).abs().sum() / (b * t)
    logs = {"rec_loss": float(rec_loss.detach())}
    loss = rec_loss
    if perceptual_weight > 0:
        frames = (y.transpose(1, 2).flatten(0, 1) for y in (x, rec))  # (B*T, 3, H, W)
        p_loss = perceptual_fn(*frames).sum() / (b * t) * x[0].numel() / t
        logs["p_loss"] = float(p_loss.detach())
        loss = loss + perceptual_weight * p_loss
    mean, logvar = moments.chunk(2, dim=1)
    logvar = logvar.clamp(-30.0, 20.0)
    kl = 0.5 * (mean.pow(2) + logvar.exp() - 1.0 - logvar).sum() / b
    logs["kl_loss"] = float(kl.detach())
    loss = loss + kl_weight * kl
    if wavelet_pairs:
        wl = sum((enc - dec).abs().sum() for enc, dec in wavelet_pairs) / b
        logs["wl_loss"] = float(wl.detach())
        loss = loss + wavelet_weight * wl
    logs["loss"] = float(loss.detach())
    return loss, logs


# ---- variants / published layout ----------------------------------------------------------------------------------
PRESETS: dict[str, dict] = {
    "tiny": dict(
        latent_dim=4,
        base_channels=32,
        encoder_num_resblocks=1,
        encoder_energy_flow_hidden_size=32,
        decoder_num_resblocks=1,
        decoder_energy_flow_hidden_size=32,
        connect_res_layer_num=1,
    ),
    # WF-VAE-S, 8 channels, released in LanguageBind/Open-Sora-Plan-v1.3.0 vae/: config as MindSpeed-MM's loading
    # test of that checkpoint states it (base 128, energy flow 64 / 128, connect_res_layer_num 2, layernorm,
    # trilinear), the rest the class defaults of modeling_wfvae.py.
    "wfvae-v1.3": dict(
        latent_dim=8,
        base_channels=128,
        encoder_energy_flow_hidden_size=64,
        decoder_energy_flow_hidden_size=128,
        connect_res_layer_num=2,
        norm_type="layernorm",
    ),
}

# Summing the preset gives 147,347,788 (encoder 37.18M, decoder 110.17M, incl. 192 frozen Haar weights), identical to
# the authors' WFVAEModel built with the same config; the stated 146M is 0.9% below (the report's 38M + 108M split
# matches connect_res_layer_num=1 / encoder flow 128, the 4-dim training config, better than the released 8-dim one).
PUBLISHED: dict[str, tuple[int, str]] = {
    "wfvae-v1.3": (
        146_000_000,
        "docs/Report-v1.3.0.md table 'WFVAE-S (Distillion)': 38M + 108M params; "
        "WF-VAE README '8-channel WF-VAE-S (146M)'",
    ),
}


def _haar_constants() -> dict[str, torch.Tensor]:
    """The fixed Haar filters under their published keys (they do not depend on the config)."""
    parts = {
        "encoder.wavelet_transform_in": HaarWaveletTransform3D(),
        "encoder.wavelet_transform_l1": HaarWaveletTransform2D(),
        "encoder.wavelet_transform_l2": HaarWaveletTransform3D(),
        "decoder.inverse_wavelet_transform_out": InverseHaarWaveletTransform3D(),
        "decoder.inverse_wavelet_transform_l1": InverseHaarWaveletTransform2D(),
        "decoder.inverse_wavelet_transform_l2": InverseHaarWaveletTransform3D(),
    }
    return {f"{prefix}.{k}": v for prefix, mod in parts.items() for k, v in mod.state_dict().items()}


# The authors' module (modeling_wfvae.py at v1.3.1) spells its level-1/2 Haar modules `wavelet_tranform_l{1,2}` /
# `inverse_wavelet_tranform_l{1,2}` and builds the input/output Haar transforms fresh in encode/decode (not in its
# state dict); ours hold them as `wavelet_transform_in` / `inverse_wavelet_transform_out`.
_OURS_L, _THEIRS_L = "wavelet_transform_l", "wavelet_tranform_l"
_NOT_PUBLISHED = ("encoder.wavelet_transform_in.", "decoder.inverse_wavelet_transform_out.")


def from_published(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The authors' keys -> ours: `wavelet_tranform_l*` renamed (either spelling is accepted), a "gen_model" nesting
    unwrapped, and the fixed Haar filters filled in where absent (the authors' state dict has no input/output
    transform, and their EMA (model/ema_model.py) shadows only parameters that require grad)."""
    if "gen_model" in state_dict and isinstance(state_dict["gen_model"], dict):
        state_dict = state_dict["gen_model"]
    return {**_haar_constants(), **{k.replace(_THEIRS_L, _OURS_L): v for k, v in state_dict.items()}}


def to_published(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Ours -> the authors' v1.3.1 state-dict names (no input/output Haar constants)."""
    return {k.replace(_OURS_L, _THEIRS_L): v for k, v in state_dict.items() if not k.startswith(_NOT_PUBLISHED)}
