"""Qihoo-T2X PT-DiT, the Proxy-Tokenized Diffusion Transformer (Wang et al., "Qihoo-T2X: An Efficient
Proxy-Tokenized Diffusion Transformer for Text-to-Any-Task", ICLR 2025, arXiv 2409.04005; 360CVGroup).

Where the facts come from. github.com/360CVGroup/Qihoo-T2X holds only a README, which points to the released code in
Ascend/MindSpeed-MM: `mindspeed_mm/models/predictor/dits/pt_dit_diffusers.py` (class `PTDiTDiffuser`, block
`ProxyTokensTransformerBlock`) and `examples/qihoo_t2x/inference_model_image.json` (the released T2I config), read
at tag v2.0.0 (the first release shipping it; unchanged in substance since commit 2e7ccce6 that added it; the example
folder was removed from master later). Every layer below follows that file, and a seeded tiny forward matches theirs
(docs/fidelity/ref_ptdit.py, tests/engines/models/dits/test_pt_dit_reference.py); where the paper says otherwise (its v1
abstract: one *randomly sampled* token per window) the released code wins (v2 abstract and code: the window *average*).

Latent tokens (B, T, h, w, C) after the patch embedding are grouped into spatio-temporal windows of
`compress_ratios` (t, h, w) tokens; our token stream is (B, P, N, C), P windows in (t, h, w) order, N tokens per
window in (t, h, w) order. Per block (`transformer_blocks`):
1. proxy tokens: per window, the mean over a strided sub-grid (`proxy_compress_ratios`; equal ratios = one proxy,
   the window mean, as released), then self-attention among all proxies of the sample (`proxy_attn1`, pre-LN
   `proxy_norm1`, residual, no adaLN);
2. global information injection: every visual token cross-attends to the proxies (`pvisual_attn2`, queries
   `norm_before`(x), keys `proxy_cross_norm`(proxies)), through the zero-initialised `linear_1_visual`;
3. texture complement: window self-attention (`attn1`, adaLN-modulated `norm1`, gated), then shift-window attention
   (`attn3`, rolled by half a window with Swin's region mask, `shift_window_norm` modulated by
   `proxy_scale_shift_table` + the first 3 timestep chunks, gated, then the zero-initialised `linear_2`);
4. cross-attention to the caption (`attn2`, no norm, PixArt style), 5. adaLN-modulated GELU-tanh MLP (`ff`).
adaLN-single (PixArt-alpha): `adaln_single` gives (B, 6C) per sample, each block adds its `scale_shift_table`.

Released setup (inference_model_image.json): 28 blocks, 16 heads x 72 = 1152, patch 2 (per frame), windows (1,8,8)
with one proxy each, 4 latent channels in and 8 out (the pipeline keeps channels 0..3: the velocity; 4..7 are an
unused PixArt learned-sigma leftover), T5 captions (EasyAnimateV2's T5 text_encoder, 4096-d, 200 tokens), the
OpenSoraPlan 1.2 CausalVAE (4 ch, 4x8x8), rectified flow ("rflow": target x0 - noise, logit-normal t, timesteps in
[0, 1000)), fixed 3D sin-cos positions (temporal 1/4 of the channels, spatial 3/4).

Deviations, on purpose: the authors broadcast the block modulation with `repeat(window_number)`, which pairs window
rows with the wrong sample when a batch mixes timesteps; we modulate per sample (identical when all timesteps of the
batch are equal, as in their sampler). Their shift-window mask is cached for the first input size and reused for
every later size; we build it per input.

Published layout: the Hugging Face repo qihoo360/Qihoo-T2X holds the `PTDiTDiffuser` state dict as a `.pt` (bare or
under "model"/"state_dict", which `checkpoint.read_state_dict` unnests). Our module and parameter names are the
authors' exactly (`pos_embed.proj`, `adaln_single.*`, `caption_projection.linear_1/2`, `transformer_blocks.i.
{proxy_attn1,pvisual_attn2,attn1,attn2,attn3}.to_{q,k,v,out.0}`, `ff.net.0.proj`, `ff.net.2`, `linear_1_visual`,
`linear_2`, `scale_shift_table`, `proxy_scale_shift_table`, top `scale_shift_table`, `proj_out`, and the persistent
buffer `pos_embed.pos_embed` (1, frame, (sample_size/patch)^2, D): the sin-cos table of the training size, used for
inputs of exactly that size, computed for others, as theirs), so both mappings are the identity. The released file
could not be opened here (model hubs unreachable): tests/facts/qihoo_t2x_ptdit_1.1b.json is their module's state
dict built on meta; their loader is `strict=False`, so a file saved without the buffer would show it as missing.

Context parallelism (`_cp_plan`, Ulysses or ring): the plan splits the visual tokens by whole windows (dim 1 of
(B, P, N, C)) at the patch embedding and the position table, and gathers `proj_out`'s output. Each attention then:
- `proxy_attn1` (proxies among themselves) needs every proxy: it is a split attention (`_parallel_config`), the
  proxies being split with their windows; there are only P*n of them, so this is cheap;
- `pvisual_attn2` (visual tokens -> proxies) needs all proxies as keys: split attention too (queries and keys are
  both window-split; Ulysses all-to-alls them separately, ring rotates the proxy chunks);
- `attn1` (window) is local: a rank holds whole windows;
- `attn3` (shift window) is local only if no shifted window crosses ranks: the split must hold whole latent frames
  and the temporal window must be 1 (no temporal shift), so latent frames % CP degree == 0 is required; a single
  image cannot be split (its shifted windows straddle any split of its rows), which raises a ValueError;
- `attn2` (text) is local: caption keys are never split.
"""

from __future__ import annotations

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models._modeling_parallel import ContextParallelInput, ContextParallelOutput
from diffusers.models.attention import AttentionModuleMixin, FeedForward
from diffusers.models.attention_dispatch import dispatch_attention_fn
from diffusers.models.embeddings import PixArtAlphaTextProjection
from diffusers.models.modeling_utils import ModelMixin
from diffusers.models.normalization import AdaLayerNormSingle
from torch import nn

PRESETS: dict[str, dict] = {
    "tiny": dict(
        num_attention_heads=2,
        attention_head_dim=16,
        num_layers=2,
        caption_channels=16,
        compress_ratios=(1, 4, 4),
        proxy_compress_ratios=(1, 2, 2),
    ),  # fmt: skip
    # examples/qihoo_t2x/inference_model_image.json (MindSpeed-MM v2.0.0): the released Qihoo-T2I checkpoint
    "Qihoo-T2I-1.1B": dict(
        num_attention_heads=16,
        attention_head_dim=72,
        num_layers=28,
        caption_channels=4096,
        compress_ratios=(1, 8, 8),
        proxy_compress_ratios=(1, 8, 8),
        sample_size=32,
        frame=1,
    ),  # fmt: skip
}
# MindSpeed-MM README model table: "Qihoo-T2X | 1.1B" linking huggingface.co/qihoo360/Qihoo-T2X. The exact count is
# that of the authors' PTDiTDiffuser for the released config, built on meta (docs/fidelity/ref_ptdit.py prints it);
# the file itself was not reachable to count.
PUBLISHED: dict[str, tuple[int, str]] = {
    "Qihoo-T2I-1.1B": (1_131_629_216, "MindSpeed-MM README (Qihoo-T2X, 1.1B, hf qihoo360/Qihoo-T2X); exact count of "
                       "PTDiTDiffuser for examples/qihoo_t2x/inference_model_image.json"),
}  # fmt: skip


def from_published(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return dict(state_dict)


def to_published(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return dict(state_dict)


# ---- windows ------------------------------------------------------------------------------------------------------
def to_windows(x: torch.Tensor, cr: tuple[int, int, int]) -> torch.Tensor:
    """(B, T, H, W, C) -> (B, P, N, C): P windows in (t, h, w) order, N = ct*ch*cw tokens in (t, h, w) order."""
    b, t, h, w, c = x.shape
    ct, ch, cw = cr
    x = x.reshape(b, t // ct, ct, h // ch, ch, w // cw, cw, c).permute(0, 1, 3, 5, 2, 4, 6, 7)
    return x.reshape(b, -1, ct * ch * cw, c)


def from_windows(x: torch.Tensor, cr: tuple[int, int, int], hw: tuple[int, int]) -> torch.Tensor:
    """(B, P, N, C) -> (B, T, H, W, C) for a window grid (P / (gh*gw), gh, gw), gh x gw = `hw`."""
    b, p, _, c = x.shape
    ct, ch, cw = cr
    gh, gw = hw
    x = x.reshape(b, p // (gh * gw), gh, gw, ct, ch, cw, c).permute(0, 1, 4, 2, 5, 3, 6, 7)
    return x.reshape(b, -1, gh * ch, gw * cw, c)


def shift_window_mask(grid: tuple[int, int, int], cr: tuple[int, int, int], device: torch.device) -> torch.Tensor:
    """Swin's mask for the rolled volume: True where two tokens of a shifted window come from the same region (per
    axis: < L-c, [L-c, L-s), >= L-s, s = c // 2; one region when s = 0). (Tm, gh*gw, N, N), Tm = 1 without a
    temporal shift (the mask is then the same for every frame)."""
    shifts = [c // 2 for c in cr]
    lengths = [(g if i or shifts[0] else 1) * c for i, (g, c) in enumerate(zip(grid, cr, strict=True))]
    regions = []
    for length, c, s in zip(lengths, cr, shifts, strict=True):
        idx = torch.arange(length, device=device)
        regions.append((idx >= length - c).long() + (idx >= length - s).long() if s else torch.zeros_like(idx))
    rid = regions[0][:, None, None] * 9 + regions[1][None, :, None] * 3 + regions[2][None, None, :]  # (T, H, W)
    rid = to_windows(rid[None, ..., None], cr)[..., 0]  # (1, Tm*gh*gw, N)
    rid = rid.reshape(-1, grid[1] * grid[2], rid.shape[-1])
    return rid[..., :, None] == rid[..., None, :]  # (Tm, gh*gw, N, N)


# ---- attention ----------------------------------------------------------------------------------------------------
class SplitAttnProcessor:
    """Attention over sequences CP splits (proxy self-attention, visual->proxy cross-attention): diffusers'
    `enable_parallelism` sets `_parallel_config` and the dispatcher runs Ulysses/ring."""

    _attention_backend = None
    _parallel_config = None

    def __call__(self, attn: PTAttention, x: torch.Tensor, context: torch.Tensor | None, mask: torch.Tensor | None):
        q, k, v = attn.project(x, context)
        out = dispatch_attention_fn(q, k, v, attn_mask=mask, backend=self._attention_backend,
                                    parallel_config=self._parallel_config)  # fmt: skip
        return attn.to_out[0](out.flatten(2))


class LocalAttnProcessor:
    """Attention that stays on each rank's tokens under CP (window, shift-window, text): no `_parallel_config`."""

    _attention_backend = None

    def __call__(self, attn: PTAttention, x: torch.Tensor, context: torch.Tensor | None, mask: torch.Tensor | None):
        q, k, v = attn.project(x, context)
        out = dispatch_attention_fn(q, k, v, attn_mask=mask, backend=self._attention_backend, parallel_config=None)
        return attn.to_out[0](out.flatten(2))


class PTAttention(nn.Module, AttentionModuleMixin):
    """diffusers' `Attention` parameter layout (`to_q`, `to_k`, `to_v`, `to_out.0`), (B', S, C) -> (B', S, C)."""

    _default_processor_cls = SplitAttnProcessor
    _available_processors = [SplitAttnProcessor, LocalAttnProcessor]

    def __init__(self, dim: int, heads: int, head_dim: int, bias: bool = True, local: bool = False) -> None:
        super().__init__()
        self.heads = heads
        inner = heads * head_dim
        self.to_q, self.to_k, self.to_v = (nn.Linear(dim, inner, bias=bias) for _ in range(3))
        self.to_out = nn.ModuleList([nn.Linear(inner, dim), nn.Dropout(0.0)])
        self.set_processor(LocalAttnProcessor() if local else SplitAttnProcessor())

    def project(self, x: torch.Tensor, context: torch.Tensor | None):
        context = x if context is None else context
        q = self.to_q(x).unflatten(-1, (self.heads, -1))  # (B', S, H, D)
        return q, self.to_k(context).unflatten(-1, (self.heads, -1)), self.to_v(context).unflatten(-1, (self.heads, -1))

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None, mask: torch.Tensor | None = None):
        return self.processor(self, x, context, mask)


# ---- blocks -------------------------------------------------------------------------------------------------------
class ProxyTokensTransformerBlock(nn.Module):
    def __init__(self, dim: int, heads: int, head_dim: int, compress_ratios: tuple[int, int, int],
                 proxy_compress_ratios: tuple[int, int, int], shift_window: bool = True, eps: float = 1e-6,
                 bias: bool = True) -> None:  # fmt: skip
        super().__init__()
        self.cr = tuple(compress_ratios)
        # proxies per window along (h, w); the authors never subdivide time (their scale_ratio[0] is always 1)
        self.proxy_grid = (self.cr[1] // proxy_compress_ratios[1], self.cr[2] // proxy_compress_ratios[2])
        norm = lambda: nn.LayerNorm(dim, elementwise_affine=False, eps=eps)  # noqa: E731
        self.proxy_norm1, self.norm1, self.proxy_cross_norm, self.norm2, self.norm_before = (norm() for _ in range(5))
        self.proxy_attn1 = PTAttention(dim, heads, head_dim, bias)  # among proxies: split under CP
        self.attn1 = PTAttention(dim, heads, head_dim, bias, local=True)  # window
        self.pvisual_attn2 = PTAttention(dim, heads, head_dim, bias)  # visual -> proxies: split under CP
        self.attn2 = PTAttention(dim, heads, head_dim, bias, local=True)  # text
        self.shift_window = shift_window
        if shift_window:
            self.attn3 = PTAttention(dim, heads, head_dim, bias, local=True)  # shifted windows
            self.shift_window_norm = norm()
            self.linear_2 = nn.Linear(dim, dim)
            self.proxy_scale_shift_table = nn.Parameter(torch.randn(3, dim) / dim**0.5)
        self.ff = FeedForward(dim, activation_fn="gelu-approximate")
        self.linear_1_visual = nn.Linear(dim, dim)
        self.scale_shift_table = nn.Parameter(torch.randn(6, dim) / dim**0.5)
        for zero in (self.linear_1_visual, getattr(self, "linear_2", None)):  # the authors' zero_module init
            if zero is not None:
                nn.init.zeros_(zero.weight), nn.init.zeros_(zero.bias)

    def proxies(self, x: torch.Tensor) -> torch.Tensor:
        """(B, P, N, C) -> (B, P*n, C): per window, proxy (i, j) = mean of the tokens at (h, w) offsets
        (a*sh + i, b*sw + j) over all frames of the window (the authors' strided 'mean' mode)."""
        b, p, _, c = x.shape
        (ct, ch, cw), (sh, sw) = self.cr, self.proxy_grid
        x = x.reshape(b, p, ct, ch // sh, sh, cw // sw, sw, c).mean(dim=(2, 3, 5))  # (B, P, sh, sw, C)
        return x.reshape(b, p * sh * sw, c)

    def forward(self, x: torch.Tensor, y: torch.Tensor, t_mod: torch.Tensor, y_mask: torch.Tensor | None,
                shift_mask: torch.Tensor | None, *, grid: tuple[int, int, int]) -> torch.Tensor:  # fmt: skip
        """x (B, P, N, C) this rank's windows, y (B, L, C) projected caption, t_mod (B, 6C), y_mask (B, 1, 1, L) bool,
        shift_mask (Tm, gh*gw, N, N) bool, grid = the FULL window grid (gt, gh, gw) (x may hold a frame slice)."""
        b, p, n, c = x.shape
        mods = (self.scale_shift_table[None] + t_mod.reshape(b, 6, c))[:, :, None, None]  # (B, 6, 1, 1, C)
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = mods.unbind(1)
        proxy = self.proxies(x)  # (B, P*n, C)
        proxy = proxy + self.proxy_attn1(self.proxy_norm1(proxy))
        inject = self.pvisual_attn2(self.norm_before(x).reshape(b, p * n, c), self.proxy_cross_norm(proxy))
        x = x + self.linear_1_visual(inject).reshape(b, p, n, c)
        h = self.norm1(x) * (1 + scale_msa) + shift_msa
        x = x + gate_msa * self.attn1(h.reshape(b * p, n, c)).reshape(b, p, n, c)
        if self.shift_window:
            x = x + self.linear_2(self._shifted_attention(x, t_mod, shift_mask, grid))
        x = x + self.attn2(x.reshape(b, p * n, c), y, y_mask).reshape(b, p, n, c)
        return x + gate_mlp * self.ff(self.norm2(x) * (1 + scale_mlp) + shift_mlp)

    def _shifted_attention(self, x: torch.Tensor, t_mod: torch.Tensor, mask: torch.Tensor, grid: tuple[int, int, int]):
        b, p, n, c = x.shape
        gt, gh, gw = grid
        if p % (gh * gw) or (p != gt * gh * gw and self.cr[0] > 1):
            raise ValueError(_whole_frames_error(f"{p} of {gt * gh * gw} windows"))
        shift, scale, gate = (self.proxy_scale_shift_table[None] + t_mod.reshape(b, 6, c)[:, :3])[:, :, None].unbind(1)
        h = self.shift_window_norm(x) * (1 + scale[:, None]) + shift[:, None]  # per token, so it commutes with roll
        s = [r // 2 for r in self.cr]
        vol = from_windows(h, self.cr, (gh, gw)).roll((-s[0], -s[1], -s[2]), dims=(1, 2, 3))  # (B, T, H, W, C)
        win = to_windows(vol, self.cr)  # (B, P, N, C) windows of the rolled volume
        mask = mask.expand(p // (mask.shape[1]), -1, -1, -1).reshape(1, p, 1, n, n).expand(b, -1, -1, -1, -1)
        out = self.attn3(win.reshape(b * p, n, c), mask=mask.reshape(b * p, 1, n, n)).reshape(b, p, n, c)
        out = from_windows(out, self.cr, (gh, gw)).roll((s[0], s[1], s[2]), dims=(1, 2, 3))
        return gate[:, None] * to_windows(out, self.cr)


# ---- model --------------------------------------------------------------------------------------------------------
class PatchEmbed(nn.Module):
    """Per-frame Conv2d patchify (the authors' `pos_embed.proj`), (B, C, T, H, W) -> windows (B, P, N, D). Holds the
    position table of the training size (`frame` x (sample_size / patch)^2 tokens) as the persistent buffer
    `pos_embed` the authors' checkpoint carries; the model adds it to inputs of exactly that size (as theirs does)."""

    def __init__(self, patch_size: int, in_channels: int, dim: int, cr: tuple[int, int, int], frame: int,
                 sample_size: int, scale: float) -> None:  # fmt: skip
        super().__init__()
        self.cr = cr
        self.proj = nn.Conv2d(in_channels, dim, kernel_size=patch_size, stride=patch_size)
        side = sample_size // patch_size
        self.register_buffer("pos_embed", sincos_table(dim, frame, side, side, scale)[None])  # (1, T, S, D)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, t, h, w = x.shape
        x = self.proj(x.transpose(1, 2).reshape(b * t, c, h, w))  # (B*T, D, h', w')
        return to_windows(x.permute(0, 2, 3, 1).reshape(b, t, *x.shape[2:], -1), self.cr)


def _sincos64(pos: torch.Tensor, dim: int) -> torch.Tensor:
    """(M,) -> (M, dim) [sin | cos] in float64, as the authors' numpy table (a float32 one differs by ~1e-6)."""
    omega = 1.0 / 10000 ** (torch.arange(dim // 2, device=pos.device, dtype=torch.float64) / (dim / 2.0))
    out = pos.double()[:, None] * omega[None]
    return torch.cat([out.sin(), out.cos()], dim=-1)


def sincos_table(dim: int, t: int, h: int, w: int, scale: float, device: torch.device | None = None) -> torch.Tensor:
    """The authors' 3D sin-cos table (T, h*w, D) float32, row-major tokens. Channels: [temporal (D/4) | spatial
    (3D/4)], spatial = [first half | second half] from their meshgrid over (H, W), i.e. the token at row-major index
    n = i*W + j gets positions (n % H, n // H) (= (w, h) for square latents); spatial positions / `scale`."""
    if dim % 16:
        raise ValueError(f"PT-DiT's 3D sin-cos table needs hidden size % 16 == 0, got {dim}")
    n = torch.arange(h * w, device=device, dtype=torch.float64)
    ds = 3 * dim // 8
    spatial = torch.cat([_sincos64((n % h) / scale, ds), _sincos64(torch.div(n, h, rounding_mode="floor") / scale,
                                                                   ds)], dim=-1)  # fmt: skip
    temporal = _sincos64(torch.arange(t, device=device), dim // 4)  # (T, D/4)
    return torch.cat([temporal[:, None].expand(-1, h * w, -1), spatial[None].expand(t, -1, -1)], dim=-1).float()


class WindowPosTable(nn.Module):
    """The position table windowed like the tokens: (1, P, N, D). At the training size the patch embedding's stored
    table is used, elsewhere it is computed (the authors' rule). No parameters; a module so a CP plan can split its
    output."""

    def __init__(self, dim: int, cr: tuple[int, int, int]) -> None:
        super().__init__()
        self.dim, self.cr = dim, cr

    def forward(self, t: int, h: int, w: int, scale: float, device: torch.device,
                stored: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
        if stored is not None and stored.shape[1] == t and h == w and h * w == stored.shape[2]:  # square training size
            table = stored[0].float()
        else:
            table = sincos_table(self.dim, t, h, w, scale, device)
        return to_windows(table.reshape(1, t, h, w, self.dim), self.cr)  # (1, P, N, D)


def _whole_frames_error(seen: str) -> str:
    return (
        f"PT-DiT shift-window attention sees {seen} on this rank: context parallelism must split whole latent frames "
        "with a temporal window of 1 (latent frames % CP degree == 0; a single image cannot be split). Use CP=1 for "
        "this input, or a latent frame count divisible by the CP degree."
    )


class PTDiT(ModelMixin, ConfigMixin):
    """Qihoo-T2X PT-DiT denoiser. Block list: `transformer_blocks`. No forward extras beyond the contract."""

    _supports_gradient_checkpointing = False
    _no_split_modules = ["ProxyTokensTransformerBlock"]
    _cp_plan = {
        "pos_embed": {0: ContextParallelInput(split_dim=1, expected_dims=4, split_output=True)},  # (B, P, N, C)
        "pos_table": {0: ContextParallelInput(split_dim=1, expected_dims=4, split_output=True)},  # (1, P, N, C)
        "proj_out": ContextParallelOutput(gather_dim=1, expected_dims=4),  # (B, P/N_cp, N, p*p*C_out) -> (B, P, ...)
    }

    @register_to_config
    def __init__(self, num_attention_heads: int = 16, attention_head_dim: int = 72, in_channels: int = 4,
                 out_channels: int = 8, num_layers: int = 28, patch_size: int = 2, caption_channels: int = 4096,
                 compress_ratios: tuple[int, int, int] = (1, 8, 8),
                 proxy_compress_ratios: tuple[int, int, int] = (1, 8, 8), shift_window: bool = True,
                 attention_bias: bool = True, norm_eps: float = 1e-6, sample_size: int = 32,
                 frame: int = 1) -> None:  # fmt: skip
        super().__init__()
        dim = num_attention_heads * attention_head_dim
        cr, pcr = tuple(compress_ratios), tuple(proxy_compress_ratios)
        if any(c % q for c, q in zip(cr[1:], pcr[1:], strict=True)):
            raise ValueError(f"proxy_compress_ratios {pcr} must divide compress_ratios {cr} in h and w")
        if sample_size == 128:  # their adaln_single then adds resolution/aspect-ratio embedders (PixArt 1024-MS)
            raise ValueError("PT-DiT with sample_size 128 (size-conditioned adaLN) is not supported")
        self.cr = cr
        interpolation = max(sample_size // 64, 1)  # the authors' interpolation_scale
        self.pos_embed = PatchEmbed(patch_size, in_channels, dim, cr, frame, sample_size, interpolation)
        self.pos_table = WindowPosTable(dim, cr)
        self.adaln_single = AdaLayerNormSingle(dim, use_additional_conditions=False)
        self.caption_projection = PixArtAlphaTextProjection(in_features=caption_channels, hidden_size=dim)
        self.transformer_blocks = nn.ModuleList(
            ProxyTokensTransformerBlock(
                dim, num_attention_heads, attention_head_dim, cr, pcr, shift_window, norm_eps, attention_bias
            )  # q/k/v biases; the output projection always has one
            for _ in range(num_layers)
        )
        self.norm_out = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.scale_shift_table = nn.Parameter(torch.randn(2, dim) / dim**0.5)
        self.proj_out = nn.Linear(dim, patch_size * patch_size * out_channels)

    def forward(self, hidden_states: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor,
                encoder_attention_mask: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
        """hidden_states (B, 4, T, H, W) CausalVAE latents (T = 1 for images), timestep (B,) rectified-flow time in
        [0, 1000), encoder_hidden_states (B, L, 4096) T5 features, encoder_attention_mask (B, L) 1 = real token.
        Returns (B, 8, T, H, W) float32; channels 0..3 are the velocity the authors' sampler uses. Needs H, W
        divisible by patch * window and T by the temporal window."""
        cfg, (ct, ch, cw) = self.config, self.cr
        b, _, t, height, width = hidden_states.shape
        p = cfg.patch_size
        if t % ct or height % (p * ch) or width % (p * cw):
            raise ValueError(
                f"PT-DiT needs latent frames % {ct} == 0 and latent H, W divisible by patch x window = {p * ch} x "
                f"{p * cw}; got (T, H, W) = {(t, height, width)}. Resize or crop the input."
            )
        h, w = height // p, width // p
        grid = (t // ct, h // ch, w // cw)
        parallel = getattr(self._parallel_config, "context_parallel_config", None)
        degree = getattr(parallel, "_world_size", None) or 1
        if grid[0] % degree:  # caught here: the plan's window split below would fail with a bare assertion
            raise ValueError(_whole_frames_error(f"{grid[0]} latent frames split {degree} ways"))
        x = self.pos_embed(hidden_states)  # (B, P, N, C) (this rank's windows under CP)
        interpolation = max(cfg.sample_size // 64, 1)  # the authors' interpolation_scale
        x = (x.float() + self.pos_table(t, h, w, interpolation, x.device, self.pos_embed.pos_embed)).to(x.dtype)
        t_mod, t_emb = self.adaln_single(timestep, {"resolution": None, "aspect_ratio": None}, batch_size=b,
                                         hidden_dtype=x.dtype)  # (B, 6C), (B, C)  # fmt: skip
        y = self.caption_projection(encoder_hidden_states)  # (B, L, C)
        y_mask = None if encoder_attention_mask is None else encoder_attention_mask.bool()[:, None, None, :]
        shift_mask = shift_window_mask(grid, self.cr, x.device) if cfg.shift_window else None
        for block in self.transformer_blocks:
            x = block(x, y, t_mod, y_mask, shift_mask, grid=grid)
        shift, scale = (self.scale_shift_table[None] + t_emb[:, None])[:, :, None, None].unbind(1)  # (B, 1, 1, C)
        out = self.proj_out(self.norm_out(x) * (1 + scale) + shift)  # (B, P, N, p*p*C_out), gathered under CP
        out = from_windows(out, self.cr, grid[1:]).reshape(b, t, h, w, p, p, -1)  # channels (p_h, p_w, C_out)
        return out.permute(0, 6, 1, 2, 4, 3, 5).reshape(b, -1, t, height, width).float()
