"""Write tests/facts/ tables for the five released CogVideoX transformers and their VAE, from values that come from
OUTSIDE this project (never from engines/models/variants.py).

Source: huggingface/diffusers@v0.40.0 scripts/convert_cogvideox_to_diffusers.py, the script that produced the released
diffusers folders (unchanged at 58eb52c). Its own `get_transformer_init_kwargs(version)` is imported and run (1.0:
patch 2, patch bias, 60x90x49 sample; 1.5: temporal patch 2, no patch bias, 300x300x81); its argparse help gives the
per-size values ("For CogVideoX-2B, num_layers is 30. For 5B, it is 42", heads 30 / 48, RoPE off for 2B / on for 5B,
VAE scaling_factor 1.15258426 / 0.7); `convert_transformer` sets in_channels 32 for I2V, the learned positional table
for 1.0 I2V (CogVideoX-5B-I2V) and ofs_embed_dim 512 for 1.5 I2V; `convert_vae` builds AutoencoderKLCogVideoX with its
defaults plus the scaling factor (and invert_scale_latents for 1.5, a config flag that changes no shape). The five
releases share one VAE layout, so one VAE table serves all five.

Run: .venv/bin/python docs/fidelity/ref_cogvideox_facts.py  (needs the diffusers mirror fetched under /work/.mirror).
Prints one line per table (file, keys, parameters) and writes tests/facts/cogvideox*.json.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKLCogVideoX, CogVideoXTransformer3DModel
from torch import nn

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
from tests.fidelity import released_shapes  # noqa: E402

DIFFUSERS = "/work/.mirror/huggingface+diffusers/repo"
TAG = "v0.40.0"
SCRIPT = "scripts/convert_cogvideox_to_diffusers.py"
SOURCE = f"huggingface/diffusers@{TAG}:{SCRIPT}"

# (variant, family, version, i2v, num_layers, num_attention_heads, use_rotary_positional_embeddings)
RELEASES = [
    ("cogvideox-2b", "cogvideox", "1.0", False, 30, 30, False),
    ("cogvideox-5b", "cogvideox", "1.0", False, 42, 48, True),
    ("cogvideox-5b-i2v", "cogvideox_i2v", "1.0", True, 42, 48, True),
    ("cogvideox1.5-5b", "cogvideox1.5", "1.5", False, 42, 48, True),
    ("cogvideox1.5-5b-i2v", "cogvideox_i2v", "1.5", True, 42, 48, True),
]


def _their_script() -> Any:
    """The conversion script at the tag, imported as a module (its functions are only called, never copied)."""
    text = subprocess.run(
        ["git", f"--git-dir={DIFFUSERS}", "show", f"{TAG}:{SCRIPT}"], check=True, capture_output=True, text=True
    ).stdout
    path = Path(tempfile.mkdtemp()) / "convert_cogvideox_to_diffusers.py"
    path.write_text(text)
    spec = importlib.util.spec_from_file_location("convert_cogvideox_to_diffusers", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _write(name: str, source: str, used_by: list[list[str]], module: nn.Module) -> None:
    keys = released_shapes(module)
    table = {"source": source, "used_by": used_by, "keys": {k: list(v) for k, v in sorted(keys.items())}}
    (REPO / "tests" / "facts" / f"{name}.json").write_text(json.dumps(table, indent=1) + "\n")
    print(f"{name}.json: {len(keys)} keys, {sum(p.numel() for p in module.parameters()):,} parameters")


def main() -> None:
    script = _their_script()
    for variant, family, version, i2v, layers, heads, rotary in RELEASES:
        init = script.get_transformer_init_kwargs(version)
        with torch.device("meta"):
            model = CogVideoXTransformer3DModel(
                in_channels=32 if i2v else 16,
                num_layers=layers,
                num_attention_heads=heads,
                use_rotary_positional_embeddings=rotary,
                ofs_embed_dim=512 if (i2v and init["patch_size_t"] is not None) else None,
                use_learned_positional_embeddings=i2v and init["patch_size_t"] is None,
                **init,
            )
        what = f"{variant}: convert_transformer(version={version}, i2v={i2v}, layers={layers}, heads={heads})"
        _write(f"{variant}_transformer", f"{SOURCE} {what}", [[family, variant, "transformer"]], model)
    with torch.device("meta"):
        vae = AutoencoderKLCogVideoX(scaling_factor=0.7)  # convert_vae: the class defaults + the scaling factor
    used = [[family, variant, "vae"] for variant, family, *_ in RELEASES]
    _write("cogvideox_vae", f"{SOURCE} convert_vae (AutoencoderKLCogVideoX defaults; shared by all five)", used, vae)


if __name__ == "__main__":
    main()
