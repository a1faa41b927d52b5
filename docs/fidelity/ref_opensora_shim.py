"""Import the authors' Open-Sora modules (hpcaitech/Open-Sora at a release tag) without their training stack.

Used by the other docs/fidelity/ref_opensora_*.py scripts; never imported by the test suite. `use_tag(src)` puts one
checkout (`git archive v1.0.0` or `v1.2.0` of github.com/hpcaitech/Open-Sora) on sys.path and registers what the
modelling files need but this machine lacks or must not run:

- the `opensora`, `opensora.models`, `opensora.models.{stdit,vae}`, `opensora.schedulers`, `opensora.datasets` __init__s
  are skipped (they import every model, the text encoders and the data pipeline); the module files themselves run
  unchanged;
- `opensora.utils.ckpt_utils` (colossalai checkpoint IO, hub download): only `load_checkpoint` is referenced, and
  never called here (no `from_pretrained`);
- `colossalai.utils.get_current_device` (imported by v1.2.0's iddpm/respace.py): the CPU;
- `mmengine.registry.Registry`: a dict with `register_module` / `build` (their registry.py runs on top of it);
- `xformers.ops.memory_efficient_attention` with `fmha.BlockDiagonalMask.from_seqlens`: the cross-attention kernel
  (no CPU build of xformers). The stand-in is plain softmax attention, scale 1/sqrt(head_dim), where query block i
  (the i-th sample's tokens) sees only key block i (the i-th sample's real caption tokens), which is what the
  block-diagonal mask means; with no mask every query sees every key (as xformers does).
- `diffusers.models.AutoencoderKL.from_pretrained(name)`: builds `AutoencoderKL(**AUTOENCODER_CONFIGS[name])`
  (the hub is unreachable); the configs are set by the calling script, from the released config.json values.

Third-party packages the authors pin (requirements/requirements.txt at v1.2.0): timm==0.9.16,
rotary_embedding_torch==0.5.3, einops; installed outside the project venv:
    .venv/bin/pip install --no-deps --target /tmp/osora/pkgs einops rotary_embedding_torch==0.5.3 timm==0.9.16
"""

from __future__ import annotations

import math
import sys
import types
from pathlib import Path

import torch

AUTOENCODER_CONFIGS: dict[str, dict] = {}


class _Registry(dict):
    def __init__(self, name: str, *args, **kwargs) -> None:
        super().__init__()
        self.name = name

    def register_module(self, name: str | None = None, module=None, force: bool = False):
        def deco(obj):
            self[name or obj.__name__] = obj
            return obj

        return deco(module) if module is not None else deco

    def build(self, cfg: dict):
        cfg = dict(cfg)
        return self[cfg.pop("type")](**cfg)


class _BlockDiagonalMask:
    def __init__(self, q_lens: list[int], k_lens: list[int]) -> None:
        self.q_lens, self.k_lens = list(q_lens), list(k_lens)

    @classmethod
    def from_seqlens(cls, q_seqlen: list[int], kv_seqlen: list[int]) -> _BlockDiagonalMask:
        return cls(q_seqlen, kv_seqlen)

    def dense(self) -> torch.Tensor:
        keep = torch.zeros(sum(self.q_lens), sum(self.k_lens), dtype=torch.bool)
        q0 = k0 = 0
        for nq, nk in zip(self.q_lens, self.k_lens, strict=True):
            keep[q0 : q0 + nq, k0 : k0 + nk] = True
            q0, k0 = q0 + nq, k0 + nk
        return keep


def _memory_efficient_attention(q, k, v, p: float = 0.0, attn_bias=None, **_):
    """q (1, Nq, H, D), k/v (1, Nk, H, D) -> (1, Nq, H, D)."""
    scores = torch.einsum("bqhd,bkhd->bhqk", q.float(), k.float()) / math.sqrt(q.shape[-1])
    if attn_bias is not None:
        scores = scores.masked_fill(~attn_bias.dense()[None, None], float("-inf"))
    out = torch.einsum("bhqk,bkhd->bqhd", scores.softmax(-1), v.float())
    return out.to(q.dtype).contiguous()  # xformers returns a contiguous (1, Nq, H, D)


def _package(name: str, path: Path) -> None:
    mod = types.ModuleType(name)
    mod.__path__ = [str(path)]
    sys.modules[name] = mod


def _module(name: str, **attrs) -> types.ModuleType:
    mod = types.ModuleType(name)
    mod.__dict__.update(attrs)
    sys.modules[name] = mod
    return mod


def use_tag(src: str | Path) -> None:
    """Make `import opensora.<module>` load from the checkout at `src` (forgetting any other tag's modules)."""
    from diffusers.models import AutoencoderKL  # before the xformers stand-in: diffusers probes for xformers

    src = Path(src).resolve()
    for name in [n for n in sys.modules if n == "opensora" or n.startswith("opensora.")]:
        del sys.modules[name]
    pkgs = Path("/tmp/osora/pkgs")
    for p in (str(pkgs), str(src)):
        if p not in sys.path:
            sys.path.insert(0, p)
    pkgs_to_skip = (
        "opensora",
        "opensora.models",
        "opensora.models.stdit",
        "opensora.models.vae",
        "opensora.schedulers",
        "opensora.datasets",
    )
    for pkg in pkgs_to_skip:
        _package(pkg, src / Path(*pkg.split(".")))
    _module("opensora.utils.ckpt_utils", load_checkpoint=None)
    _module("colossalai")  # v1.2.0 iddpm/respace.py imports get_current_device (used only by its sampler)
    _module("colossalai.utils", get_current_device=lambda: torch.device("cpu"))
    _module("mmengine")
    _module("mmengine.registry", Registry=_Registry)
    fmha = _module("xformers.ops.fmha", BlockDiagonalMask=_BlockDiagonalMask)
    ops = _module("xformers.ops", memory_efficient_attention=_memory_efficient_attention, fmha=fmha)
    _module("xformers", ops=ops)

    def from_pretrained(name: str, **kwargs) -> AutoencoderKL:
        return AutoencoderKL(**AUTOENCODER_CONFIGS[name])

    AutoencoderKL.from_pretrained = staticmethod(from_pretrained)


def print_numbers(label: str, out: torch.Tensor, picks: list[tuple[int, ...]]) -> None:
    """The few numbers a test keeps: shape, sum, abs-sum and some elements, in float64 repr."""
    out = out.double()
    print(f"{label}: shape={tuple(out.shape)} sum={out.sum().item()!r} abs_sum={out.abs().sum().item()!r}")
    print(f"{label}: picks={[(idx, out[idx].item()) for idx in picks]!r}")
