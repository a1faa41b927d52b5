"""Write tests/facts/ tables for the released LTX-Video transformers, VAEs and T5-XXL, from code and values that come
from OUTSIDE this project (never from engines/models/variants.py).

The released diffusers folders (Lightricks/LTX-Video, Lightricks/LTX-Video-0.9.7-dev) were made by diffusers'
`scripts/convert_ltx_to_diffusers.py`: it loads the authors' checkpoint, renames every key
(`TRANSFORMER_KEYS_RENAME_DICT`, `VAE_KEYS_RENAME_DICT` and their special remaps) and loads the result *strictly* into
`LTXVideoTransformer3DModel` / `AutoencoderKLLTXVideo` built from `get_transformer_config` / `get_vae_config`. This
script runs that conversion on the authors' own modules built on the meta device:

- 2B transformer: Lightricks/LTX-Video@5260738 `ltx_video/models/transformers/transformer3d.py` `Transformer3DModel`
  from the authors' own config of the 2B release (`ltx_video/utils/diffusers_config_mapping.py`
  `OURS_TRANSFORMER_CONFIG`: 28 layers, 32 heads of 64, cross-attention 2048, captions 4096, 128 channels), through
  huggingface/diffusers@58eb52c `convert_transformer` with `get_transformer_config("0.9.0")` (the same values as the
  authors' `DIFFUSERS_TRANSFORMER_CONFIG`); the script gives every 2B version it knows (0.9.0, 0.9.1, 0.9.5) this
  layout.
- 13B transformer (0.9.7): the same authors' module with the 13B sizes the conversion's
  `get_transformer_config("0.9.7")` states (48 layers, 32 heads of 128, cross-attention 4096), through
  `convert_transformer`.
- 0.9.0 VAE: the authors' `ltx_video/models/autoencoders/causal_video_autoencoder.py` `CausalVideoAutoencoder` from
  `OURS_VAE_CONFIG`, through `convert_vae` with `get_vae_config("0.9.0")`.
- 0.9.7 VAE: the authors' repository holds no `CausalVideoAutoencoder` config for it; the table is diffusers'
  `AutoencoderKLLTXVideo` built from the conversion script's `get_vae_config("0.9.7")` (the config the released
  0.9.7 folder was written with).
- text encoder: google/t5-v1_1-xxl config.json (vocab 32128, d_model 4096, d_kv 64, d_ff 10240, 24 layers, 64 heads,
  gated GELU, untied; the conversion script loads `T5EncoderModel.from_pretrained("google/t5-v1_1-xxl")`).

Stub: `einops` (imported by the authors' modules, used only in forward passes). Run:
.venv/bin/python docs/fidelity/ref_ltx_facts.py (needs the LTX-Video and diffusers mirrors fetched under /work/.mirror).
Prints one line per table (file, keys, parameters), writes tests/facts/ltx*.json.
"""

from __future__ import annotations

import importlib.util
import io
import json
import subprocess
import sys
import tarfile
import tempfile
import types
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import T5Config, T5EncoderModel

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
from tests.fidelity import released_shapes  # noqa: E402

LTX = "/work/.mirror/Lightricks+LTX-Video/repo"
LTX_REV = "5260738"
DIFFUSERS = "/work/.mirror/huggingface+diffusers/repo"
DIFFUSERS_REV = "58eb52c"
SCRIPT = "scripts/convert_ltx_to_diffusers.py"
CONVERSION = f"huggingface/diffusers@{DIFFUSERS_REV}:{SCRIPT}"
# google/t5-v1_1-xxl config.json
T5_XXL = dict(vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
              feed_forward_proj="gated-gelu", tie_word_embeddings=False)  # fmt: skip
# (variant, release the conversion script names)
RELEASES = [("ltx-video-2b-v0.9", "0.9.0"), ("ltx-video-13b-v0.9.7", "0.9.7")]


def _authors_package() -> None:
    """The authors' `ltx_video` package at the revision, importable (only called, never copied)."""
    root = Path(tempfile.mkdtemp())
    archive = subprocess.run(["git", f"--git-dir={LTX}", "archive", LTX_REV, "ltx_video"], check=True,
                             capture_output=True).stdout  # fmt: skip
    tarfile.open(fileobj=io.BytesIO(archive)).extractall(root, filter="data")
    einops = types.ModuleType("einops")
    einops.rearrange = einops.repeat = None
    sys.modules.setdefault("einops", einops)
    sys.path.insert(0, str(root))


def _their_script() -> Any:
    text = subprocess.run(["git", f"--git-dir={DIFFUSERS}", "show", f"{DIFFUSERS_REV}:{SCRIPT}"], check=True,
                          capture_output=True, text=True).stdout  # fmt: skip
    path = Path(tempfile.mkdtemp()) / "convert_ltx_to_diffusers.py"
    path.write_text(text)
    spec = importlib.util.spec_from_file_location("convert_ltx_to_diffusers", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _write(name: str, source: str, used_by: list[list[str]], module: nn.Module) -> None:
    keys = released_shapes(module)
    table = {"source": source, "used_by": used_by, "keys": {k: list(v) for k, v in sorted(keys.items())}}
    (REPO / "tests" / "facts" / f"{name}.json").write_text(json.dumps(table, indent=1) + "\n")
    print(f"{name}.json: {len(keys)} keys, {sum(p.numel() for p in module.parameters()):,} parameters")


def main() -> None:
    _authors_package()
    from ltx_video.models.autoencoders.causal_video_autoencoder import CausalVideoAutoencoder
    from ltx_video.models.transformers.transformer3d import Transformer3DModel
    from ltx_video.utils.diffusers_config_mapping import OURS_TRANSFORMER_CONFIG, OURS_VAE_CONFIG

    script = _their_script()
    sizes = {"0.9.0": {}, "0.9.7": {"attention_head_dim": 128, "cross_attention_dim": 4096, "num_layers": 48}}
    for variant, version in RELEASES:
        with torch.device("meta"):
            theirs = Transformer3DModel.from_config({**OURS_TRANSFORMER_CONFIG, **sizes[version]})
        authors = sum(p.numel() for p in theirs.parameters())
        script.load_file = lambda _path, sd=theirs.state_dict(): dict(sd)
        model = script.convert_transformer("unused", script.get_transformer_config(version), torch.float32)
        assert all(p.is_meta for p in model.parameters())
        source = (f"Lightricks/LTX-Video@{LTX_REV} ltx_video/models/transformers/transformer3d.py Transformer3DModel "
                  f"on meta (OURS_TRANSFORMER_CONFIG, sizes {sizes[version] or 'as is'}) -> {CONVERSION} "
                  f"convert_transformer(get_transformer_config({version!r})); authors' count {authors:,}")  # fmt: skip
        _write(f"{variant}_transformer", source, [["ltx", variant, "transformer"]], model)

    with torch.device("meta"):
        their_vae = CausalVideoAutoencoder.from_config(OURS_VAE_CONFIG)
    # the authors' checkpoints carry the latent statistics beside the module's weights (their loader reads
    # `per_channel_statistics.*` from the file, or from per_channel_statistics.json, 128 values each)
    stats = {f"per_channel_statistics.{k}": torch.empty(128, device="meta") for k in ("mean-of-means", "std-of-means")}
    script.load_file = lambda _path, sd={**their_vae.state_dict(), **stats}: dict(sd)
    vae = script.convert_vae("unused", script.get_vae_config("0.9.0"), torch.float32)
    source = (
        f"Lightricks/LTX-Video@{LTX_REV} ltx_video/models/autoencoders/causal_video_autoencoder.py "
        f"CausalVideoAutoencoder on meta (OURS_VAE_CONFIG) -> {CONVERSION} convert_vae(get_vae_config('0.9.0'))"
    )
    _write("ltx-video-0.9_vae", source, [["ltx", "ltx-video-2b-v0.9", "vae"]], vae)

    config = script.get_vae_config("0.9.7")
    with torch.device("meta"):
        vae = script.AutoencoderKLLTXVideo(**config)
    source = f"{CONVERSION} get_vae_config('0.9.7') in diffusers AutoencoderKLLTXVideo (no authors' config published)"
    _write("ltx-video-0.9.7_vae", source, [["ltx", "ltx-video-13b-v0.9.7", "vae"]], vae)

    with torch.device("meta"):
        t5 = T5EncoderModel(T5Config(**T5_XXL))
    used = [["ltx", variant, "text_encoder"] for variant, _ in RELEASES]
    _write("ltx_t5_v1_1_xxl_encoder", "google/t5-v1_1-xxl config.json; transformers T5EncoderModel", used, t5)


if __name__ == "__main__":
    main()
