"""OpenSoraPlan video DiTs (PKU-YuanGroup/Open-Sora-Plan): v1.2 `OpenSoraT2V` (full 3D attention), v1.3
`OpenSoraT2V_v1_3` (Skiparse sparse attention) and the v1.3 image-to-video `OpenSoraInpaint_v1_3`.

Architecture (all three, per opensora/models/diffusion/opensora{,_v1_3}/ at tags v1.2.0 / v1.3.0): per-frame
Conv2d patchify (patch 1x2x2, no absolute position embedding), 3D RoPE on self-attention q/k, PixArt-style
adaLN-single (`adaln_single` -> 6 modulations per block + 2 for the output), `caption_projection` of the 4096-d
mT5-XXL states, blocks of self-attention / cross-attention / GELU-tanh MLP, `norm_out` + `proj_out` + unpatchify.
v1.2 runs on CausalVAE 4x8x8 latents (4 channels), v1.3 on WF-VAE 4x8x8 latents (8 channels). v1.2 and v1.3 compute
the same function when Skiparse is off; they are kept as two classes so each loads its own released config.json.

Skiparse (v1.3, `sparse1d=True`, `sparse_n`=k): blocks 2..29 (hard-coded by the authors, whatever num_layers) split
the token sequence into k scopes and attend within each; block i uses "single skip" (tokens s % k equal) when i is
even and "group skip" (tokens (s // k) % k equal) when i is odd; blocks 0, 1, 30, 31 are full attention.

Context parallelism (`_cp_plan`): the tokens are split contiguously at `transformer_blocks.0`, the RoPE tables at
the `rope` module's output, and gathered after `proj_out`; self-attention goes through Ulysses/ring, cross-attention
stays local (its keys, the caption, are never split). Skiparse commutes with that split: for a rank holding tokens
[r*S/N, (r+1)*S/N), if S/N is a multiple of k^2 then s % k and (s // k) % k of a token are those of its local index,
so regrouping each chunk locally picks the same scope members, and the Ulysses all-to-all (or the ring's pass over
key chunks) concatenates them in rank order, i.e. in global order: exactly the authors' regrouping of the full
sequence. With S/N not a multiple of k^2 a scope would mix chunks differently (and the authors' end-of-sequence
padding would land on one rank only), so the model raises ValueError under CP unless S % (N * k^2) == 0
(S = frames * h/2 * w/2; e.g. 93x480x640 -> 24*30*40 = 28800 = 16 * 1800 works for N up to 8).

Published layout (HF LanguageBind/Open-Sora-Plan-v1.2.0/<res>/ and -v1.3.0/any93x640x640{,_i2v}/): diffusers
folders, config.json + diffusion_pytorch_model(.safetensors | -0000x-of-00002.safetensors + index), saved by the
authors' ModelMixin from the module tree our classes reproduce; so `from_published` / `to_published` are the
identity (every key keeps its name; nothing fuses or splits). Keys: `pos_embed.proj.{weight,bias}`,
`caption_projection.linear_{1,2}.*`, `adaln_single.emb.timestep_embedder.linear_{1,2}.*`, `adaln_single.linear.*`,
`transformer_blocks.{i}.{attn1,attn2}.{to_q,to_k,to_v,to_out.0}.*`, `.ff.net.0.proj.*`, `.ff.net.2.*`,
`.scale_shift_table`, `scale_shift_table`, `proj_out.*`; the i2v model adds `pos_embed_masked_hidden_states.{0.proj.*,
1.weight}` and `pos_embed_mask.{0.proj.*, 1.weight}`.

Not reproduced: the authors' video `attention_mask` (latent-padding mask for mixed-size batches; their pipelines
pass all ones, which is a zero bias) and `use_image_num` joint image batches; patch_size_t must be 1 (as released).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models._modeling_parallel import ContextParallelInput, ContextParallelOutput
from diffusers.models.embeddings import PixArtAlphaTextProjection
from diffusers.models.modeling_utils import ModelMixin
from diffusers.models.normalization import AdaLayerNormSingle
from flowspeed.engines.models.dits.opensoraplan_layers import NEG_BIAS, OpenSoraPlanBlock, OpenSoraRoPE3D, PatchEmbed2D
from torch import nn

# Blocks [_SPARSE_FROM, _SPARSE_UNTIL) use Skiparse when sparse1d (modeling_opensora.py v1.3.0: `i > 1 and i < 30`).
_SPARSE_FROM, _SPARSE_UNTIL = 2, 30


class _OpenSoraPlanDiT(ModelMixin, ConfigMixin):
    """Shared body; the public classes below only declare their config. Block list: `transformer_blocks`."""

    _supports_gradient_checkpointing = False
    _no_split_modules = ["OpenSoraPlanBlock"]
    _cp_plan = {
        "rope": {i: ContextParallelInput(split_dim=0, expected_dims=2, split_output=True) for i in (0, 1)},
        "transformer_blocks.0": {"hidden_states": ContextParallelInput(split_dim=1, expected_dims=3)},  # (B, S, D)
        "proj_out": ContextParallelOutput(gather_dim=1, expected_dims=3),  # (B, S/N, p*p*C) -> (B, S, p*p*C)
    }

    def _build(self) -> None:
        """The modules, from `self.config` (diffusers' `register_to_config` records it before `__init__` runs), so
        each public class only declares its released config."""
        c = self.config
        heads, head_dim, p = c.num_attention_heads, c.attention_head_dim, c.patch_size
        sparse_n = c.sparse_n if c.get("sparse1d", False) else 1
        dim = heads * head_dim
        if c.patch_size_t != 1:
            raise ValueError(f"patch_size_t={c.patch_size_t}: the authors' per-frame patch embedding only supports 1")
        if c.cross_attention_dim != dim:
            raise ValueError(f"cross_attention_dim={c.cross_attention_dim} must equal heads * head_dim = {dim}: the "
                             "caption projection maps the text states to the hidden size")  # fmt: skip
        self.in_channels, self.out_channels = c.in_channels, c.out_channels or c.in_channels
        self.patch_size, self.sparse_n = p, sparse_n
        self.pos_embed = PatchEmbed2D(p, c.in_channels, dim)
        self.caption_projection = PixArtAlphaTextProjection(in_features=c.caption_channels, hidden_size=dim)
        self.adaln_single = AdaLayerNormSingle(dim, use_additional_conditions=False)
        self.rope = OpenSoraRoPE3D(
            head_dim, (c.interpolation_scale_t, c.interpolation_scale_h, c.interpolation_scale_w)
        )
        self.transformer_blocks = nn.ModuleList(
            OpenSoraPlanBlock(dim, heads, head_dim, c.cross_attention_dim, c.activation_fn, c.attention_bias,
                              c.norm_eps, c.norm_elementwise_affine,
                              sparse_n=sparse_n if _SPARSE_FROM <= i < _SPARSE_UNTIL else 1, sparse_group=i % 2 == 1)
            for i in range(c.num_layers)
        )  # fmt: skip
        self.norm_out = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.scale_shift_table = nn.Parameter(torch.randn(2, dim) / dim**0.5)
        self.proj_out = nn.Linear(dim, c.patch_size_t * p * p * self.out_channels)

    def _embed(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.pos_embed(hidden_states)  # (B, S, D)

    def _check_sparse_cp(self, tokens: int) -> None:
        """Refuse CP shapes on which Skiparse would not be exact (see the module docstring), before any collective."""
        cp = getattr(getattr(self, "_parallel_config", None), "context_parallel_config", None)
        sparse = self.sparse_n > 1 and len(self.transformer_blocks) > _SPARSE_FROM
        if cp is None or not sparse:
            return
        if getattr(cp, "ulysses_anything", False) or getattr(cp, "ring_anything", False):
            raise ValueError("Skiparse attention needs equal contiguous CP chunks; turn off ulysses/ring_anything")
        degree, n = cp.ring_degree * cp.ulysses_degree, self.sparse_n
        if tokens % (degree * n * n):
            raise ValueError(
                f"{type(self).__name__}: Skiparse (sparse_n={n}) under context parallelism of degree {degree} is "
                f"exact only when the {tokens} video tokens (frames x h/{self.patch_size} x w/{self.patch_size}) are a "
                f"multiple of CP degree x sparse_n^2 = {degree * n * n}; change the latent frames/size or the CP "
                "degree."
            )

    def forward(
        self,
        hidden_states: torch.Tensor,  # (B, C_in, T, H, W)
        timestep: torch.Tensor,  # (B,) in [0, 1000)
        encoder_hidden_states: torch.Tensor,  # (B, L, caption_channels)
        encoder_attention_mask: torch.Tensor | None = None,  # (B, L) 1 = real token
    ) -> torch.Tensor:
        """-> (B, C_out, T, H, W). No extras: the i2v model takes its condition as input channels (see there)."""
        b, _, frames, height, width = hidden_states.shape
        p = self.patch_size
        if height % p or width % p:
            raise ValueError(f"latent height/width {height}x{width} must be multiples of the patch size {p}")
        h, w = height // p, width // p
        self._check_sparse_cp(frames * h * w)
        dtype = self.proj_out.weight.dtype
        x = self._embed(hidden_states.to(dtype))  # (B, S, D)
        temb, embedded = self.adaln_single(timestep, {"resolution": None, "aspect_ratio": None}, batch_size=b,
                                           hidden_dtype=dtype)  # (B, 6D), (B, D)  # fmt: skip
        context = self.caption_projection(encoder_hidden_states.to(dtype))  # (B, L, D)
        mask = None
        if encoder_attention_mask is not None:
            mask = ((1 - encoder_attention_mask.to(dtype)) * NEG_BIAS)[:, None, None, :]  # (B, 1, 1, L)
        rotary = self.rope(frames, h, w, x.device, dtype)  # 2 x (S, head_dim)
        for block in self.transformer_blocks:
            x = block(hidden_states=x, encoder_hidden_states=context, timestep=temb, encoder_attention_mask=mask,
                      rotary_emb=rotary)  # fmt: skip
        shift, scale = (self.scale_shift_table[None] + embedded[:, None]).chunk(2, dim=1)  # (B, 1, D) each
        x = self.proj_out(self.norm_out(x) * (1 + scale) + shift)  # (B, S, p*p*C)
        x = x.reshape(b, frames, h, w, p, p, self.out_channels).permute(0, 6, 1, 2, 4, 3, 5)  # (B, C, T, h, p, w, p)
        return x.reshape(b, self.out_channels, frames, height, width)


class OpenSoraT2V(_OpenSoraPlanDiT):
    """Open-Sora-Plan v1.2 text-to-video DiT ("OpenSoraT2V-ROPE-L/122"): full 3D attention over all tokens.
    Config names are the authors'; only norm_type="ada_norm_single" with use_rope=True was released."""

    @register_to_config
    def __init__(self, num_attention_heads: int = 24, attention_head_dim: int = 96, in_channels: int = 4,
                 out_channels: int | None = 4, num_layers: int = 32, cross_attention_dim: int = 2304,
                 caption_channels: int = 4096, patch_size: int = 2, patch_size_t: int = 1,
                 activation_fn: str = "gelu-approximate", attention_bias: bool = True,
                 norm_type: str = "ada_norm_single", norm_elementwise_affine: bool = False, norm_eps: float = 1e-6,
                 interpolation_scale_t: float = 1.0, interpolation_scale_h: float = 1.0,
                 interpolation_scale_w: float = 1.0, use_rope: bool = True) -> None:  # fmt: skip
        super().__init__()
        if norm_type != "ada_norm_single" or not use_rope:
            raise ValueError("only the released v1.2 layout is supported: norm_type='ada_norm_single', use_rope=True")
        self._build()


class OpenSoraT2V_v1_3(_OpenSoraPlanDiT):  # noqa: N801 (the authors' class name, as in their config.json)
    """Open-Sora-Plan v1.3 text-to-video DiT ("OpenSoraT2V_v1_3-2B/122") with Skiparse attention."""

    @register_to_config
    def __init__(self, num_attention_heads: int = 24, attention_head_dim: int = 96, in_channels: int = 8,
                 out_channels: int | None = 8, num_layers: int = 32, cross_attention_dim: int = 2304,
                 caption_channels: int = 4096, patch_size: int = 2, patch_size_t: int = 1,
                 activation_fn: str = "gelu-approximate", attention_bias: bool = True,
                 norm_elementwise_affine: bool = False, norm_eps: float = 1e-6, interpolation_scale_t: float = 1.0,
                 interpolation_scale_h: float = 1.0, interpolation_scale_w: float = 1.0, sparse1d: bool = True,
                 sparse_n: int = 4) -> None:  # fmt: skip
        super().__init__()
        self._build()


class OpenSoraInpaint_v1_3(_OpenSoraPlanDiT):  # noqa: N801
    """Open-Sora-Plan v1.3 image/video-to-video DiT ("OpenSoraInpaint_v1_3-2B/122"): the v1.3 T2V model plus two
    zero-initialised input branches. `hidden_states` is the channel concat the authors feed (C = in_channels = 8):

        [noisy latents (C) | masked-video latents (C) | latent mask (vae_scale_factor_t = 4)]  -> (B, 2C+4, T, H, W)

    and the output is the C-channel prediction for the noisy latents. Building the condition from an image
    (pipeline_inpaint.py / mask_utils.py at v1.3.0): pixel mask (B, 1, T_pix, H_pix, W_pix), 1 = frame to generate,
    0 = given (i2v: frame 0 is 0, the rest 1); masked video = the pixel video with the masked frames black, i.e. -1 in
    the [-1, 1] range (the authors zero the 0..255 pixels before 2x/255-1), encoded by WF-VAE and normalised exactly
    like the noisy latents ((z - shift) * scale); latent mask = `compress_mask(pixel mask)`."""

    @register_to_config
    def __init__(self, num_attention_heads: int = 24, attention_head_dim: int = 96, in_channels: int = 8,
                 out_channels: int | None = 8, num_layers: int = 32, cross_attention_dim: int = 2304,
                 caption_channels: int = 4096, patch_size: int = 2, patch_size_t: int = 1,
                 activation_fn: str = "gelu-approximate", attention_bias: bool = True,
                 norm_elementwise_affine: bool = False, norm_eps: float = 1e-6, interpolation_scale_t: float = 1.0,
                 interpolation_scale_h: float = 1.0, interpolation_scale_w: float = 1.0, sparse1d: bool = True,
                 sparse_n: int = 4, vae_scale_factor_t: int = 4) -> None:  # fmt: skip
        super().__init__()
        self._build()
        dim, self.vae_scale_factor_t = num_attention_heads * attention_head_dim, vae_scale_factor_t
        self.pos_embed_masked_hidden_states = nn.ModuleList(
            [PatchEmbed2D(patch_size, in_channels, dim), nn.Linear(dim, dim, bias=False)]
        )
        self.pos_embed_mask = nn.ModuleList(
            [PatchEmbed2D(patch_size, vae_scale_factor_t, dim), nn.Linear(dim, dim, bias=False)]
        )
        # zero-initialised like the authors, so a fresh model (or the T2V weights loaded into it) starts as T2V
        nn.init.zeros_(self.pos_embed_masked_hidden_states[1].weight)
        nn.init.zeros_(self.pos_embed_mask[1].weight)

    def _embed(self, hidden_states: torch.Tensor) -> torch.Tensor:
        c, m = self.in_channels, self.vae_scale_factor_t
        if hidden_states.shape[1] != 2 * c + m:
            raise ValueError(f"OpenSoraInpaint_v1_3 takes [noisy ({c}) | masked video ({c}) | mask ({m})] = "
                             f"{2 * c + m} channels, got {hidden_states.shape[1]}")  # fmt: skip
        noisy, masked, mask = hidden_states.split([c, c, m], dim=1)
        masked = self.pos_embed_masked_hidden_states[1](self.pos_embed_masked_hidden_states[0](masked))
        mask = self.pos_embed_mask[1](self.pos_embed_mask[0](mask))
        return self.pos_embed(noisy) + masked + mask  # (B, S, D)


def compress_mask(mask: torch.Tensor, ae_stride: tuple[int, int, int] = (4, 8, 8)) -> torch.Tensor:
    """The authors' `MaskCompressor`: pixel mask (B, 1, T, H, W) -> latent mask (B, stride_t, T', H/8, W/8).
    Each frame is bilinearly resized to the latent grid; for odd T (causal VAE: 1 + 4k frames) the first frame's
    mask is repeated stride_t times, then every stride_t consecutive frames become the channels of one latent frame."""
    b, _, t, height, width = mask.shape
    st, sh, sw = ae_stride
    h, w = height // sh, width // sw
    m = F.interpolate(mask.transpose(1, 2).reshape(b * t, 1, height, width), size=(h, w), mode="bilinear")
    m = m.reshape(b, t, h, w)
    if t % 2 == 1:
        m = torch.cat([m[:, :1].expand(-1, st, -1, -1), m[:, 1:]], dim=1)  # (B, T-1+st, h, w)
    return m.reshape(b, -1, st, h, w).transpose(1, 2).contiguous()  # (B, st, T', h, w)


def from_published(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Authors' released keys -> ours: identical names (see the module docstring)."""
    return dict(state_dict)


def to_published(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Ours -> the authors' released keys: identical names."""
    return dict(state_dict)


_COMMON = dict(num_attention_heads=24, attention_head_dim=96, num_layers=32, cross_attention_dim=2304,
               caption_channels=4096, patch_size=2, patch_size_t=1, activation_fn="gelu-approximate",
               attention_bias=True, norm_elementwise_affine=False, norm_eps=1e-6)  # fmt: skip
_TINY = dict(num_attention_heads=2, attention_head_dim=12, num_layers=4, cross_attention_dim=24, caption_channels=16,
             patch_size=2, patch_size_t=1, activation_fn="gelu-approximate", attention_bias=True,
             norm_elementwise_affine=False, norm_eps=1e-6)  # fmt: skip
# "tiny" keeps the authors' layer rule, so with 4 blocks: 0, 1 full, 2 single skip, 3 group skip (sparse_n 2).
PRESETS: dict[str, dict] = {
    "tiny": dict(_TINY, in_channels=4, out_channels=4, sparse1d=True, sparse_n=2),
    "tiny-v1.2": dict(_TINY, in_channels=4, out_channels=4),
    "tiny-i2v": dict(_TINY, in_channels=4, out_channels=4, sparse1d=True, sparse_n=2, vae_scale_factor_t=4),
    # released config.json files (HF LanguageBind/Open-Sora-Plan-v1.2.0/93x720p, -v1.3.0/any93x640x640{,_i2v})
    "OpenSoraT2V-ROPE-L/122": dict(_COMMON, in_channels=4, out_channels=4),
    "OpenSoraT2V_v1_3-2B/122": dict(_COMMON, in_channels=8, out_channels=8, sparse1d=True, sparse_n=4),
    "OpenSoraInpaint_v1_3-2B/122": dict(
        _COMMON, in_channels=8, out_channels=8, sparse1d=True, sparse_n=4, vae_scale_factor_t=4
    ),  # fmt: skip
}
MODEL_CLASSES: dict[str, type[_OpenSoraPlanDiT]] = {
    "tiny": OpenSoraT2V_v1_3,
    "tiny-v1.2": OpenSoraT2V,
    "tiny-i2v": OpenSoraInpaint_v1_3,
    "OpenSoraT2V-ROPE-L/122": OpenSoraT2V,
    "OpenSoraT2V_v1_3-2B/122": OpenSoraT2V_v1_3,
    "OpenSoraInpaint_v1_3-2B/122": OpenSoraInpaint_v1_3,
}
# The released files are fp32 safetensors (4 bytes per parameter); the HF file listings give their sizes.
PUBLISHED: dict[str, tuple[int, str]] = {
    "OpenSoraT2V-ROPE-L/122": (2_775_000_000, "HF LanguageBind/Open-Sora-Plan-v1.2.0 93x720p/"
                               "diffusion_pytorch_model.safetensors, 11.1 GB fp32 / 4 B (also 29x720p, 93x480p); "
                               "docs/Report-v1.3.0.md: 'Open-Sora Plan v1.2, training a 2.7-billion-parameter model'"),
    "OpenSoraT2V_v1_3-2B/122": (2_772_500_000, "HF LanguageBind/Open-Sora-Plan-v1.3.0 any93x640x640: 9.98 GB + "
                                "1.11 GB fp32 safetensors shards / 4 B; modeling_opensora.py v1.3.0 comment '2.7B'"),
    "OpenSoraInpaint_v1_3-2B/122": (2_782_500_000, "HF LanguageBind/Open-Sora-Plan-v1.3.0 any93x640x640_i2v: "
                                    "9.98 GB + 1.15 GB fp32 safetensors shards / 4 B"),
}  # fmt: skip


def build(name: str, **overrides) -> _OpenSoraPlanDiT:
    """A model from a preset name; an unknown name lists the known ones."""
    if name not in PRESETS:
        raise ValueError(f"unknown OpenSoraPlan preset {name!r}; known: {sorted(PRESETS)}")
    return MODEL_CLASSES[name](**{**PRESETS[name], **overrides})
