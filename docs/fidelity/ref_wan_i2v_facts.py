"""Write the tests/facts/ tables of Wan2.1 image-to-video 14B (480P and 720P share one layout) from code and values that
come from OUTSIDE this project (never from engines/models/variants.py), the way docs/fidelity/ref_wan_facts.py writes
the text-to-video ones (its helpers are reused: the authors' package at their revision, diffusers' script, the writer).

- transformer: Wan-Video/Wan2.1@9737cba `wan/modules/model.py` `WanModel(model_type="i2v")` sized by the authors'
  `wan/configs/wan_i2v_14B.py` (dim 5120, ffn 13824, freq 256, 40 heads, 40 layers; in_dim 36 = 16 noisy + 4 mask +
  16 image latents, out_dim 16 as `wan/image2video.py` builds it; the `img_emb` MLPProj(1280, dim) takes CLIP
  features) on the meta device, fed to huggingface/diffusers@58eb52c `scripts/convert_wan_to_diffusers.py`
  `convert_transformer("Wan-I2V-14B-480p")` (and "-720p": the same `diffusers_config`), whose strict load into
  `WanTransformer3DModel` proves the conversion's config builds exactly the authors' layout.
- image encoder: the conversion script loads `CLIPVisionModelWithProjection.from_pretrained(
  "laion/CLIP-ViT-H-14-laion2B-s32B-b79K")`; its vision tower is open_clip's ViT-H-14 (`model_configs/ViT-H-14.json`
  of the installed open_clip: width 1280, 32 layers, head width 80 -> 16 heads, 14 px patches at 224, embed 1024,
  GELU; MLP 4 x width), built here as transformers' class with those values. The authors' own CLIP
  (`wan/modules/clip.py` `clip_xlm_roberta_vit_h_14`) has the same vision tower.

Run: .venv/bin/python docs/fidelity/ref_wan_i2v_facts.py (needs the Wan2.1 and diffusers mirrors under /work/.mirror).
Prints one line per table (file, keys, parameters), writes tests/facts/wan2.1-i2v-14b_*.json.
"""

from __future__ import annotations

import importlib
import json
import sys
import tempfile
from pathlib import Path

import torch
from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

sys.path.insert(0, str(Path(__file__).resolve().parent))
import ref_wan_facts as t2v  # noqa: E402

OPEN_CLIP_VIT_H_14 = "open_clip/model_configs/ViT-H-14.json"
USED_BY = [["wan_i2v", "wan2.1-i2v-14b-480p"], ["wan_i2v", "wan2.1-i2v-14b-720p"]]


def _open_clip_vit_h14() -> CLIPVisionConfig:
    """open_clip's ViT-H-14 vision tower as transformers' config (read from the installed open_clip's file)."""
    import open_clip

    cfg = json.loads((Path(open_clip.__file__).parent / "model_configs" / "ViT-H-14.json").read_text())
    v = cfg["vision_cfg"]
    return CLIPVisionConfig(
        hidden_size=v["width"], num_hidden_layers=v["layers"], num_attention_heads=v["width"] // v["head_width"],
        intermediate_size=4 * v["width"], patch_size=v["patch_size"], image_size=v["image_size"],
        projection_dim=cfg["embed_dim"], hidden_act="gelu",
    )  # fmt: skip


def main() -> None:
    paths = ["modules/model.py", "modules/attention.py", "configs/shared_config.py", "configs/wan_i2v_14B.py"]
    pkg = t2v._authors_package("wan21_i2v_ref", t2v.WAN, t2v.WAN_REV, paths)
    c = importlib.import_module(f"{pkg}.configs.wan_i2v_14B").i2v_14B
    script = t2v._their_script()
    script.WanTransformer3DModel = t2v._StayOnMeta
    script.snapshot_download = lambda *a, **k: tempfile.mkdtemp()
    with torch.device("meta"):
        theirs = importlib.import_module(f"{pkg}.modules.model").WanModel(
            model_type="i2v", patch_size=c.patch_size, text_len=c.text_len, in_dim=36, dim=c.dim, ffn_dim=c.ffn_dim,
            freq_dim=c.freq_dim, text_dim=4096, out_dim=16, num_heads=c.num_heads, num_layers=c.num_layers,
            window_size=c.window_size, qk_norm=c.qk_norm, cross_attn_norm=c.cross_attn_norm, eps=c.eps,
        )  # fmt: skip
    authors = sum(p.numel() for p in theirs.parameters())
    script.load_sharded_safetensors = lambda _dir, sd=theirs.state_dict(): dict(sd)
    layouts = {kind: script.convert_transformer(kind) for kind in ("Wan-I2V-14B-480p", "Wan-I2V-14B-720p")}
    one, other = (t2v.released_shapes(m) for m in layouts.values())
    assert one == other, "the 480P and 720P conversions give one layout"
    source = (
        f"Wan-Video/Wan2.1@{t2v.WAN_REV} wan/modules/model.py WanModel(model_type='i2v') on meta -> {t2v.CONVERSION} "
        f"wan_i2v_14B.i2v_14B (in_dim 36), convert_transformer('Wan-I2V-14B-480p' / '-720p'); authors' count "
        f"{authors:,}"
    )
    t2v._write("wan2.1-i2v-14b_transformer", source, [[*u, "transformer"] for u in USED_BY],
               layouts["Wan-I2V-14B-480p"])  # fmt: skip
    with torch.device("meta"):
        clip = CLIPVisionModelWithProjection(_open_clip_vit_h14())
    source = (
        f"{t2v.CONVERSION}: CLIPVisionModelWithProjection of laion/CLIP-ViT-H-14-laion2B-s32B-b79K, sized by the "
        f"installed {OPEN_CLIP_VIT_H_14}"
    )
    t2v._write("wan2.1-i2v-14b_image_encoder", source, [[*u, "image_encoder"] for u in USED_BY], clip)


if __name__ == "__main__":
    main()
