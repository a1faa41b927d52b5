"""Write tests/facts/ tables for the released Wan2.1 transformers, the Wan2.1 VAE and UMT5-XXL, from code and values
that come from OUTSIDE this project (never from engines/models/variants.py).

The released diffusers folders (Wan-AI/Wan2.1-T2V-{1.3B,14B}-Diffusers) were made by diffusers'
`scripts/convert_wan_to_diffusers.py`: it loads the authors' checkpoint, renames every key
(`TRANSFORMER_KEYS_RENAME_DICT`, `convert_vae`'s maps) and loads the result *strictly* into `WanTransformer3DModel` /
`AutoencoderKLWan`. This script runs that conversion on the authors' own modules built on the meta device:

- transformer: Wan-Video/Wan2.1@9737cba `wan/modules/model.py` `WanModel`, sized by the authors' configs
  (`wan/configs/wan_t2v_1_3B.py`, `wan_t2v_14B.py`: dim, ffn_dim, freq_dim, heads, layers; `shared_config.py`: text_len
  512), fed to huggingface/diffusers@58eb52c `convert_transformer(model_type)` (its download and file loading replaced
  by the meta state dict), so the table is the authors' checkpoint under the names the conversion gives it, and the
  strict load proves the conversion's `diffusers_config` builds exactly that layout.
- VAE: the authors' `wan/modules/vae.py` `WanVAE_` with `_video_vae`'s config (dim 96, z_dim 16, dim_mult [1, 2, 4, 4],
  2 res blocks, temporal downsample [False, True, True]) through `convert_vae()` the same way (shared by every
  Wan2.1 release: the same `Wan2.1_VAE.pth`).
- Wan2.2 TI2V-5B: Wan-Video/Wan2.2@42bf4cf `WanModel` (`wan/configs/wan_ti2v_5B.py`: dim 3072, ffn 14336, 24 heads, 30
  layers, 48 latent channels) through `convert_transformer("Wan2.2-TI2V-5B")`, and its VAE (`wan/modules/vae2_2.py`
  `WanVAE_` with `Wan2_2_VAE`'s defaults: dim 160, z_dim 48) through `convert_vae_22()`; the script's
  `vae22_diffusers_config` carries `clip_output`, a decode flag newer than the installed diffusers 0.42.1, dropped
  here (no shape depends on it).
- text encoder: google/umt5-xxl config.json (vocab 256384, d_model 4096, d_kv 64, d_ff 10240, 24 layers, 64 heads,
  gated GELU, untied; the conversion script loads `UMT5EncoderModel.from_pretrained("google/umt5-xxl")`) built as
  transformers' `UMT5EncoderModel`.

Stubs: `easydict` (the configs' EasyDict: a dict with attribute access) and `einops` (imported by vae.py, used only in
forward passes). Run: .venv/bin/python docs/fidelity/ref_wan_facts.py (needs the Wan2.1, Wan2.2 and diffusers
mirrors fetched under /work/.mirror). Prints one line per table (file, keys, parameters), writes tests/facts/wan*.json.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import subprocess
import sys
import tempfile
import types
from pathlib import Path
from typing import Any

import torch
from diffusers import WanTransformer3DModel
from torch import nn
from transformers import UMT5Config, UMT5EncoderModel

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
from tests.fidelity import released_shapes  # noqa: E402

WAN = "/work/.mirror/Wan-Video+Wan2.1/repo"
WAN_REV = "9737cba"
WAN22 = "/work/.mirror/Wan-Video+Wan2.2/repo"
WAN22_REV = "42bf4cf"
DIFFUSERS = "/work/.mirror/huggingface+diffusers/repo"
DIFFUSERS_REV = "58eb52c"
SCRIPT = "scripts/convert_wan_to_diffusers.py"
CONVERSION = f"huggingface/diffusers@{DIFFUSERS_REV}:{SCRIPT}"

# (variant, family, the conversion script's model_type, the authors' config module and attribute, model_type,
#  latent channels, Wan release)
RELEASES = [
    ("wan2.1-t2v-1.3b", "wan", "Wan-T2V-1.3B", "wan_t2v_1_3B", "t2v_1_3B", "t2v", 16, "2.1"),
    ("wan2.1-t2v-14b", "wan", "Wan-T2V-14B", "wan_t2v_14B", "t2v_14B", "t2v", 16, "2.1"),
    ("wan2.2-ti2v-5b", "wan", "Wan2.2-TI2V-5B", "wan_ti2v_5B", "ti2v_5B", "ti2v", 48, "2.2"),
]
# Releases on the same Wan2.1 VAE and UMT5-XXL whose transformer tables other scripts write: Wan2.1 image-to-video
# 14B (family wan_i2v; docs/fidelity/ref_wan_i2v_facts.py, with its CLIP) and the Wan2.2 T2V-A14B and I2V-A14B expert
# pairs (wan/configs/wan_t2v_A14B.py and wan_i2v_A14B.py: `vae_checkpoint = 'Wan2.1_VAE.pth'`, `t5_checkpoint =
# 'models_t5_umt5-xxl-enc-bf16.pth'`; docs/fidelity/ref_wan22_facts.py)
SHARED_VAE_TEXT_VARIANTS = [
    ("wan2.1-i2v-14b-480p", "wan_i2v"),
    ("wan2.1-i2v-14b-720p", "wan_i2v"),
    ("wan2.2-t2v-a14b", "wan"),
    ("wan2.2-i2v-a14b", "wan_i2v"),
]
# google/umt5-xxl config.json
UMT5_XXL = dict(vocab_size=256384, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
                feed_forward_proj="gated-gelu", tie_word_embeddings=False)  # fmt: skip


def _git_show(git_dir: str, rev: str, path: str) -> str:
    return subprocess.run(
        ["git", f"--git-dir={git_dir}", "show", f"{rev}:{path}"], check=True, capture_output=True, text=True
    ).stdout


def _authors_package(pkg: str, git_dir: str, rev: str, paths: list[str]) -> str:
    """The authors' modules and configs at the revision, as an importable package `pkg` (only called, never copied)."""
    root = Path(tempfile.mkdtemp())
    for sub in ("modules", "configs"):
        (root / pkg / sub).mkdir(parents=True)
        (root / pkg / sub / "__init__.py").write_text("")
    (root / pkg / "__init__.py").write_text("")
    for path in paths:
        (root / pkg / path).write_text(_git_show(git_dir, rev, f"wan/{path}"))
    easydict = types.ModuleType("easydict")

    class EasyDict(dict):
        def __getattr__(self, k: str) -> Any:
            return self[k]

        def __setattr__(self, k: str, v: Any) -> None:
            self[k] = v

    easydict.EasyDict = EasyDict
    sys.modules.setdefault("easydict", easydict)
    sys.modules.setdefault("einops", types.ModuleType("einops"))
    sys.modules["einops"].rearrange = None
    sys.path.insert(0, str(root))
    return pkg


def _their_script() -> Any:
    path = Path(tempfile.mkdtemp()) / "convert_wan_to_diffusers.py"
    path.write_text(_git_show(DIFFUSERS, DIFFUSERS_REV, SCRIPT))
    spec = importlib.util.spec_from_file_location("convert_wan_to_diffusers", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class _StayOnMeta(WanTransformer3DModel):
    """convert_transformer ends with `.to("cpu")`, which a meta model cannot do; the layout is what matters."""

    def to(self, *args: Any, **kwargs: Any) -> _StayOnMeta:
        return self


def _write(name: str, source: str, used_by: list[list[str]], module: nn.Module) -> None:
    keys = released_shapes(module)
    table = {"source": source, "used_by": used_by, "keys": {k: list(v) for k, v in sorted(keys.items())}}
    (REPO / "tests" / "facts" / f"{name}.json").write_text(json.dumps(table, indent=1) + "\n")
    print(f"{name}.json: {len(keys)} keys, {sum(p.numel() for p in module.parameters()):,} parameters")


def main() -> None:
    repos = {
        "2.1": ("wan21_ref", WAN, WAN_REV, "modules/vae.py"),
        "2.2": ("wan22_ref", WAN22, WAN22_REV, "modules/vae2_2.py"),
    }
    pkgs = {}
    for release, (pkg, git_dir, rev, vae_file) in repos.items():
        configs = [f"configs/{r[3]}.py" for r in RELEASES if r[7] == release]
        paths = ["modules/model.py", "modules/attention.py", vae_file, "configs/shared_config.py", *configs]
        pkgs[release] = _authors_package(pkg, git_dir, rev, paths)
    script = _their_script()
    # a decode-time flag newer than the installed diffusers (0.42.1) knows; it changes no shape
    script.vae22_diffusers_config.pop("clip_output", None)
    script.WanTransformer3DModel = _StayOnMeta
    script.snapshot_download = lambda *a, **k: tempfile.mkdtemp()
    for variant, family, model_type, cfg_module, cfg_name, kind, channels, release in RELEASES:
        pkg, _, rev, _ = repos[release]
        c = getattr(importlib.import_module(f"{pkg}.configs.{cfg_module}"), cfg_name)
        with torch.device("meta"):
            theirs = importlib.import_module(f"{pkg}.modules.model").WanModel(
                model_type=kind, patch_size=c.patch_size, text_len=c.text_len, in_dim=channels, dim=c.dim,
                ffn_dim=c.ffn_dim, freq_dim=c.freq_dim, text_dim=4096, out_dim=channels, num_heads=c.num_heads,
                num_layers=c.num_layers, window_size=c.window_size, qk_norm=c.qk_norm,
                cross_attn_norm=c.cross_attn_norm, eps=c.eps,
            )  # fmt: skip
        authors = sum(p.numel() for p in theirs.parameters())
        script.load_sharded_safetensors = lambda _dir, sd=theirs.state_dict(): dict(sd)
        model = script.convert_transformer(model_type)
        source = f"Wan-Video/Wan{release}@{rev} wan/modules/model.py WanModel on meta -> {CONVERSION}"
        what = f"{variant}: {cfg_module}.{cfg_name}, convert_transformer({model_type!r}); authors' count {authors:,}"
        _write(f"{variant}_transformer", f"{source} {what}", [[family, variant, "transformer"]], model)

    # The VAEs: Wan2.1's `_video_vae` config (dim 96, z 16); Wan2.2's `Wan2_2_VAE` defaults (c_dim 160, z 48,
    # temporal downsample [False, True, True]) into `_video_vae` (dec_dim 256 is WanVAE_'s default there).
    vaes = {"2.1": (dict(dim=96, z_dim=16), "modules.vae", "convert_vae", "Wan2.1_VAE.pth"),
            "2.2": (dict(dim=160, z_dim=48), "modules.vae2_2", "convert_vae_22", "Wan2.2_VAE.pth")}  # fmt: skip
    for release, (cfg, module, convert, file) in vaes.items():
        pkg, _, rev, vae_file = repos[release]
        with torch.device("meta"):
            their_vae = importlib.import_module(f"{pkg}.{module}").WanVAE_(
                **cfg, dim_mult=[1, 2, 4, 4], num_res_blocks=2, attn_scales=[],
                temperal_downsample=[False, True, True], dropout=0.0)  # fmt: skip
        state = their_vae.state_dict()
        script.hf_hub_download = lambda *a, file=file, **k: file
        script.torch = types.SimpleNamespace(load=lambda *a, state=state, **k: dict(state))
        vae = getattr(script, convert)()
        assert all(p.is_meta for p in vae.parameters())
        used = [[r[1], r[0], "vae"] for r in RELEASES if r[7] == release]
        used += [[family, variant, "vae"] for variant, family in SHARED_VAE_TEXT_VARIANTS if release == "2.1"]
        source = f"Wan-Video/Wan{release}@{rev} wan/{vae_file} WanVAE_ on meta -> {CONVERSION} {convert}()"
        _write(f"wan{release}_vae", source, used, vae)

    with torch.device("meta"):
        umt5 = UMT5EncoderModel(UMT5Config(**UMT5_XXL))
    used = [[family, variant, "text_encoder"] for variant, family, *_ in RELEASES]
    used += [[family, variant, "text_encoder"] for variant, family in SHARED_VAE_TEXT_VARIANTS]
    _write("wan_umt5_xxl_encoder", "google/umt5-xxl config.json; transformers UMT5EncoderModel", used, umt5)


if __name__ == "__main__":
    main()
